//! What one ADS client may make the control plane hold: the lengths of what it names and
//! says, how many names it subscribes to, which types it may ask for, and how many streams
//! one node may open. Past a bound the stream ends with a status that says which.

use tonic::Status;

use crate::translate::PUSH_ORDER;

/// Node ids, clusters, resource names and versions.
pub const MAX_NAME: usize = 256;
/// Resource names in one request, and subscribed per type on one stream.
pub const MAX_NAMES: usize = 10_000;
/// A NACK's message, as kept for `/status` (longer ones are cut).
pub const MAX_MESSAGE: usize = 1024;
/// Streams one node may hold open at once (a proxy needs one).
pub const MAX_STREAMS_PER_NODE: u32 = 8;
/// Nodes remembered, connected or recently gone.
pub const MAX_NODES: usize = 100_000;
/// How long a node that has gone stays in `/status` before it is forgotten.
pub const NODE_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// A type the control plane serves; anything else is not remembered per stream.
pub fn served(type_url: &str) -> bool {
    PUSH_ORDER.contains(&type_url)
}

/// Checks the node's identity strings on a stream's first request.
pub fn check_node(id: &str, cluster: &str) -> Result<(), Status> {
    if id.len() > MAX_NAME || cluster.len() > MAX_NAME {
        return Err(Status::invalid_argument(format!(
            "node.id and node.cluster are limited to {MAX_NAME} bytes"
        )));
    }
    Ok(())
}

/// Checks a request's names before any of them is kept.
pub fn check_names<'a>(
    type_url: &str,
    version: &str,
    names: impl ExactSizeIterator<Item = &'a String>,
) -> Result<(), Status> {
    if type_url.len() > MAX_NAME || version.len() > MAX_NAME {
        return Err(Status::invalid_argument(format!(
            "type_url and version_info are limited to {MAX_NAME} bytes"
        )));
    }
    if names.len() > MAX_NAMES {
        return Err(Status::resource_exhausted(format!(
            "at most {MAX_NAMES} resource names in a request"
        )));
    }
    let mut names = names;
    if names.any(|n| n.len() > MAX_NAME) {
        return Err(Status::invalid_argument(format!(
            "resource names are limited to {MAX_NAME} bytes"
        )));
    }
    Ok(())
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("short", 100), "short");
    }

    #[test]
    fn oversized_input_is_refused() {
        assert!(check_node(&"x".repeat(MAX_NAME + 1), "c").is_err());
        let names = vec!["n".to_string(); MAX_NAMES + 1];
        assert!(check_names("t", "v", names.iter()).is_err());
        let long = ["n".repeat(MAX_NAME + 1)];
        assert!(check_names("t", "v", long.iter()).is_err());
        assert!(check_names("t", "v", ["ok".to_string()].iter()).is_ok());
    }
}
