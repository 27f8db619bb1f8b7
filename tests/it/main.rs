//! The single integration-test binary: CLI behaviour, golden rulesets, conformance with
//! Istio's goldens in the kernel, and privileged namespace tests.

mod apply;
mod cli;
mod util;
