//! A config problem, located: file, line, column and field.

use std::fmt;

use serde_saphyr::Location;

#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<u64>,
    pub column: Option<u64>,
    /// A path such as `listeners[0].virtual_hosts[1].routes[2].timeout`.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn at(
        file: &str,
        location: Option<Location>,
        field: &str,
        message: impl fmt::Display,
    ) -> Self {
        // Values that came from xDS rather than a file carry no location.
        let location = location.filter(|l| *l != Location::UNKNOWN);
        ConfigError {
            file: file.to_string(),
            line: location.map(|l| l.line()),
            column: location.map(|l| l.column()),
            field: field.to_string(),
            message: message.to_string(),
        }
    }

    pub fn from_yaml(file: &str, e: &serde_saphyr::Error) -> Self {
        // The parser's own message already says which key was unexpected or mistyped.
        let location = e.location();
        let message = e.to_string();
        let message = message.lines().next().unwrap_or_default().to_string();
        ConfigError::at(file, location, "(yaml)", message)
    }

    pub fn io(file: &str, e: &std::io::Error) -> Self {
        ConfigError::at(file, None, "(file)", format!("cannot read: {e}"))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}
