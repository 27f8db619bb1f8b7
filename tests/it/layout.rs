//! The pure core stays pure: these modules must not read env vars, files or the clock, spawn
//! processes or make syscalls (house style §4.1). A cheap textual check, kept honest by
//! listing the modules explicitly.

use std::path::Path;

/// Modules that must do no I/O.
const PURE: &[&str] = &[
    "settings/cli.rs",
    "settings/config.rs",
    "net.rs",
    "capture/mod.rs",
    "capture/build.rs",
    "backend/iptables/render.rs",
    "exit.rs",
    "settings/annotations.rs",
    "settings/source.rs",
    "settings/mod.rs",
    "explain.rs",
    "trace.rs",
    "backend/iptables/state.rs",
];

/// Paths whose use means an effect.
const EFFECTS: &[&str] = &[
    "std::fs",
    "std::process",
    "std::env::var",
    "std::env::args",
    "std::time::SystemTime",
    "std::time::Instant",
    "std::io::stdout",
    "std::net::Tcp",
    "std::net::Udp",
    "nix::",
    "caps::",
    "println!",
];

#[test]
fn pure_modules_do_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for module in PURE {
        let text = std::fs::read_to_string(src.join(module)).expect("reading module");
        for effect in EFFECTS {
            // A path starts the match (`nix::` must not match `std::os::unix::`).
            let used = text.match_indices(effect).any(|(at, _)| {
                !text[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            assert!(!used, "src/{module} uses {effect}: it must stay pure");
        }
        assert!(
            text.starts_with("//!"),
            "src/{module} must start with a //! paragraph"
        );
    }
}
