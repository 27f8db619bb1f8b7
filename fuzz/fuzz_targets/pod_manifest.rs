//! The Pod manifest reader (`annotations::parse_manifest`, JSON or YAML, pods, Lists and
//! workload templates) and the translation of its annotations, then the whole resolution and
//! build. Never a panic (deep nesting included); errors are one line.
#![no_main]

use fuzz_checks::{assert_one_line, check_pod_settings};
use istio_init::settings::annotations::{parse_manifest, translate_pod};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_manifest(text) {
        Err(e) => assert_one_line(&e.to_string()),
        Ok(pod) => check_pod_settings(translate_pod(&pod)),
    }
});
