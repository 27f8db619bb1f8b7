//! The process and namespace mechanics both backends share: capabilities, entering a network
//! namespace, the per-namespace lock and the deferral of termination signals.
//!
//! Effects: system calls only (no program is run).

pub mod caps;
pub mod guard;
pub mod netns;
