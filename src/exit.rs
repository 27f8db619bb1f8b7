//! Exit codes and the error markers that select them.
//!
//! Pure. `main` is the only place that turns an error into a process exit status.

use std::fmt;

use crate::settings::source::ConfigError;

/// The rules are in place (or there was nothing to do, or the dry run printed them).
pub const SUCCESS: u8 = 0;
/// Something failed at run time: a missing binary, iptables-restore refusing the rules,
/// missing capabilities, a namespace that cannot be entered. Nothing is left half-applied.
pub const FAILURE: u8 = 1;
/// Invalid input or usage: a bad flag, env var, annotation or file. Nothing was touched.
pub const USAGE: u8 = 2;
/// `--run-validation` found that traffic is not redirected (Istio's contract with istio-cni).
pub const VALIDATION_FAILED: u8 = 126;

/// An input problem that is not a single bad value (an unreadable file, a conflicting option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The validation probe was not redirected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationFailed(pub String);

impl fmt::Display for ValidationFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ValidationFailed {}

/// The exit code for an error: 2 for input errors, 126 for validation failures, else 1.
pub fn code_for(err: &anyhow::Error) -> u8 {
    if err
        .chain()
        .any(|e| e.is::<ConfigError>() || e.is::<UsageError>())
    {
        USAGE
    } else if err.chain().any(|e| e.is::<ValidationFailed>()) {
        VALIDATION_FAILED
    } else {
        FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn classification_survives_context() {
        let e = anyhow::Error::new(UsageError("x".into())).context("reading");
        assert_eq!(code_for(&e), USAGE);
        let e = Err::<(), _>(ValidationFailed("y".into()))
            .context("validating")
            .unwrap_err();
        assert_eq!(code_for(&e), VALIDATION_FAILED);
        assert_eq!(code_for(&anyhow::anyhow!("boom")), FAILURE);
    }
}
