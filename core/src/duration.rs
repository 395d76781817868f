//! Durations as people write them in config: `250ms`, `2s`, `1m`, `1h`.

use std::time::Duration;

use serde_saphyr::Spanned;

use crate::config_error::ConfigError;

/// `250ms`, `2s`, `1m`, `1h`. Plain numbers are refused: a unit-less timeout is a classic
/// source of 1000× mistakes.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

/// A command-line duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a duration such as 500ms, 30s or 24h")]
pub struct NotADuration(pub String);

/// A duration flag's value, for clap's `value_parser`.
pub fn duration_arg(text: &str) -> Result<Duration, NotADuration> {
    parse_duration(text).ok_or_else(|| NotADuration(text.to_string()))
}

/// An optional duration field of a config file, located when it does not parse.
pub fn field_duration(
    source: &str,
    value: &Option<Spanned<String>>,
    field: &str,
) -> Result<Option<Duration>, ConfigError> {
    match value {
        None => Ok(None),
        Some(v) => parse_duration(&v.value).map(Some).ok_or_else(|| {
            ConfigError::at(
                source,
                Some(v.referenced),
                field,
                format!("`{}` is not a duration (try `250ms`, `2s`, `1m`)", v.value),
            )
        }),
    }
}

/// `3d`, `5h`, `12m` or `40s`: the largest unit that fits.
pub fn coarse(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        86_400.. => format!("{}d", s / 86_400),
        3_600.. => format!("{}h", s / 3_600),
        60.. => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_durations_read_in_their_largest_unit() {
        assert_eq!(coarse(Duration::from_secs(40)), "40s");
        assert_eq!(coarse(Duration::from_secs(130)), "2m");
        assert_eq!(coarse(Duration::from_secs(3 * 86_400 + 5)), "3d");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("15"), None);
        assert_eq!(parse_duration("1.5s"), None);
        assert_eq!(parse_duration("s"), None);
    }
}
