//! Link flags of the static binary (no code is generated).
//!
//! A static-pie executable carries a relocation for every pointer in its data, applied by
//! glibc's start-up code: in the classic format that is 24 bytes each (about 90 KB here).
//! `-z pack-relative-relocs` stores them as a bitmap (DT_RELR, glibc ≥ 2.36, binutils ≥ 2.38),
//! which keeps the binary position-independent for ASLR and about 90 KB smaller. Only
//! static builds get it: a dynamic executable linked this way needs glibc ≥ 2.36 at run time.
//!
//! With lld, `--icf=all` folds functions with identical code into one (15 KB; Rust makes no
//! promise that two functions' addresses differ). No flag may change what a user sees: an
//! earlier `--no-eh-frame-hdr` (32 KB) removed the table the unwinder searches, and with
//! `RUST_BACKTRACE=1` set every error then aborted silently (anyhow captures a backtrace
//! when an error is made), so it is gone, and `scripts/build-static.sh` runs an error path
//! under `RUST_BACKTRACE=1` after each build.

// A build script speaks to cargo on stdout.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_CFG_TARGET_FEATURE");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if linux && features.split(',').any(|f| f == "crt-static") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        let icf = ["-Xlinker".to_owned(), "--icf=all".to_owned()];
        if linker_accepts(&icf) {
            for arg in &icf {
                println!("cargo:rustc-link-arg-bins={arg}");
            }
        }
    }
}

/// Links an empty program for the target with the build's flags plus `args`.
fn linker_accepts(args: &[String]) -> bool {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let dir = PathBuf::from(var("OUT_DIR"));
    let source = dir.join("link_probe.rs");
    if std::fs::write(&source, "fn main() {}\n").is_err() {
        return false;
    }
    let mut rustc = Command::new(var("RUSTC"));
    rustc.arg(&source).args(["--crate-type", "bin", "--target"]);
    rustc
        .arg(var("TARGET"))
        .arg("-o")
        .arg(dir.join("link_probe"));
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    rustc.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        rustc.arg(format!("-Clinker={linker}"));
    }
    rustc.args(args.iter().map(|arg| format!("-Clink-arg={arg}")));
    rustc.stdout(Stdio::null()).stderr(Stdio::null());
    rustc.status().is_ok_and(|status| status.success())
}
