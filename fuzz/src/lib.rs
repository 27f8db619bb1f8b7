//! The invariants the fuzz targets assert. They live in the integration tests
//! (`tests/it/checks.rs`, also used by the property tests) so both check against one grammar;
//! here each check panics on violation, which libFuzzer reports as a crash with its input.

#[path = "../../tests/it/checks.rs"]
mod checks;
mod pipeline;

pub use pipeline::check_pod_settings;

use std::fmt::{Debug, Display};
use std::str::FromStr;

use istio_init::capture::Ruleset;

fn ok(r: Result<(), String>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// A value as it appears in the restore text: one safe token.
pub fn assert_safe_token(tok: &str) {
    ok(checks::check_token(tok));
}

/// An error message is one non-empty line without control characters.
pub fn assert_one_line(msg: &str) {
    ok(checks::check_one_line(msg));
}

/// An accepted value renders as a safe token that parses back to itself; a refusal is one
/// line.
pub fn check_value<T>(s: &str)
where
    T: FromStr<Err = istio_init::net::Reason> + Display + PartialEq + Debug,
{
    ok(checks::check_value::<T>(s));
}

/// A built ruleset is sound and every rendered rule parses under the grammar; rendering is
/// deterministic.
pub fn check_ruleset(rs: &Ruleset) {
    let text = istio_init::backend::iptables::render::ruleset_text(rs);
    assert_eq!(text, istio_init::backend::iptables::render::ruleset_text(rs), "rendering is not deterministic");
    ok(checks::check_ruleset(rs, &text));
}
