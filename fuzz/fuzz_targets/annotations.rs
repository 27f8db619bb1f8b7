//! The Downward API annotations file parser (`annotations::parse_downward`, with Go's
//! unquoting) and the translation of annotations into overrides, then the whole resolution
//! and build. Pod authors write these values. Never a panic; parse errors name a line and are
//! one line; accepted files give sound rulesets or one-line refusals.
#![no_main]

use fuzz_checks::{assert_one_line, check_pod_settings};
use istio_init::settings::annotations::{go_unquote, parse_downward, translate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = go_unquote(text) {
        assert_one_line(&e.to_string());
    }
    match parse_downward(text) {
        Err(e) => {
            assert!(e.at.starts_with("line "), "{e}");
            assert_one_line(&e.to_string());
        }
        Ok(ann) => check_pod_settings(translate(&ann)),
    }
});
