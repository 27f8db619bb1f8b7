//! Firewall backends: each installs, inspects and removes the [`crate::capture::Capture`] in the
//! current network namespace. `iptables/` drives the iptables programs (one restore per family).

pub mod iptables;
