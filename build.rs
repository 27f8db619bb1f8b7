//! Link flag of the static binary (no code is generated).
//!
//! A static-pie executable carries a relocation for every pointer in its data, applied by
//! glibc's start-up code: in the classic format that is 24 bytes each (about 90 KB here).
//! `-z pack-relative-relocs` stores them as a bitmap (DT_RELR, glibc ≥ 2.36, binutils ≥ 2.38),
//! which keeps the binary position-independent for ASLR and within its 2 MiB budget. Only
//! static builds get it: a dynamic executable linked this way needs glibc ≥ 2.36 at run time.

// A build script speaks to cargo on stdout.
#![allow(clippy::print_stdout)]

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_CFG_TARGET_FEATURE");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if linux && features.split(',').any(|f| f == "crt-static") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
