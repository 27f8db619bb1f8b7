//! Where a setting's value came from, and the error that names it: the leaf every settings
//! module (and every error message about a value) shares.
//!
//! Pure.

use std::fmt;

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    Flag {
        long: &'static str,
        short: Option<char>,
    },
    Env(String),
    Annotation(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("the default"),
            Source::Flag {
                long,
                short: Some(s),
            } => write!(f, "--{long} (-{s})"),
            Source::Flag { long, short: None } => write!(f, "--{long}"),
            Source::Env(name) => write!(f, "env {name}"),
            Source::Annotation(key) => write!(f, "annotation {key}"),
        }
    }
}

/// An invalid input value: what it was, the value, where it came from, and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub what: String,
    pub value: String,
    pub source: Source,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} {} in {}: {}",
            self.what,
            quote(&self.value),
            self.source,
            self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// Quotes a value for an error message: escapes control characters and quotes, and shortens
/// huge values so that one line stays one line.
pub fn quote(value: &str) -> String {
    const MAX: usize = 120;
    if value.len() <= MAX {
        return format!("{value:?}");
    }
    let mut cut = MAX;
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}… ({} bytes)", &value[..cut], value.len())
}
