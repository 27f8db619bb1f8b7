//! The single integration-test binary: CLI behaviour, golden rulesets, conformance with
//! Istio's goldens in the kernel, and privileged namespace tests.

// Test code may panic on unexpected input: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod annotations;
mod apply;
mod bad_input;
mod checks;
mod cli;
mod conformance;
mod differential;
mod diffgen;
mod faults;
mod golden;
mod image;
mod injection;
mod kubernetes;
mod layout;
mod nft_faults;
mod nft_mode;
mod nftables;
mod pods;
mod properties;
mod readme;
mod shipped;
mod trace;
mod util;
mod validation;
