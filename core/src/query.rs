//! Query strings of the admin pages: `key=value&…`, values percent-encoded.

/// Each `(key, value)` pair of `query`, values decoded; `Err(key)` for a value that is not
/// valid percent-encoded UTF-8.
pub fn pairs(query: Option<&str>) -> impl Iterator<Item = Result<(&str, String), &str>> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            decode(value).map(|v| (key, v)).ok_or(key)
        })
}

/// The decoded value of `key`, if the query has it (and it decodes).
pub fn param(query: Option<&str>, key: &str) -> Option<String> {
    pairs(query).find_map(|p| p.ok().filter(|(k, _)| *k == key).map(|(_, v)| v))
}

/// `%XX` escapes and `+` for a space.
pub fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `text` with everything but unreserved characters percent-encoded.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_bad_escapes_name_their_key() {
        let text = "spiffe://t/ns/a b/";
        let query = format!("x=1&node={}", encode(text));
        assert_eq!(param(Some(&query), "node").as_deref(), Some(text));
        assert_eq!(param(Some(&query), "other"), None);
        assert_eq!(param(None, "node"), None);
        let bad: Vec<_> = pairs(Some("a=%zz&b=2")).collect();
        assert_eq!(bad[0], Err("a"));
        assert_eq!(bad[1], Ok(("b", "2".to_string())));
    }
}
