//! The single integration-test binary: CLI behaviour, golden rulesets, conformance with
//! Istio's goldens in the kernel, and privileged namespace tests.

mod cli;
mod conformance;
mod golden;
mod util;
