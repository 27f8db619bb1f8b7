//! Firewall backends: each installs, inspects and removes the [`Capture`] in the current
//! network namespace. `iptables/` drives the iptables programs (one restore per family).
//!
//! The seam is at the height of a whole capture (as a container network stack's firewall
//! driver is): what to capture is decided once, in [`crate::capture`]; how it becomes kernel
//! state, how a re-run converges and how a failure is undone are each backend's own.

pub mod iptables;
pub mod nftables;

use crate::capture::Capture;
use crate::netlink::tables::Table;
use crate::nft::Op;

/// What an install is allowed to do beyond writing the rules, and what it may take as read.
pub struct Install<'a> {
    /// The namespace's nf_tables tables, listed once per run (see `lib.rs`'s `install`) and
    /// unchanged since: the coexistence check and the backend read the same snapshot.
    pub tables: &'a [Table],
    /// Nothing is left to do after the rules (no routes, no validation, no other namespace to
    /// return from): the backend may hand the process over to the program that applies them.
    pub rules_only: bool,
    /// Called once, at the last moment before the rules take effect (the TPROXY routes are
    /// added there, and what the rules do is logged); when it fails, no rule is applied.
    pub at_commit: &'a mut dyn FnMut() -> anyhow::Result<()>,
    /// Called just before a hand-over, which does not return.
    pub before_handover: &'a dyn Fn(),
    /// The other mode's rules to remove in the same nf_tables transaction (`--reconcile`):
    /// only the nftables backend has one, and only the iptables mode's rules have any (see
    /// [`Firewall::batched_removal`]); empty otherwise.
    pub also_remove: &'a Batched,
}

impl std::fmt::Debug for Install<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Install")
            .field("tables", &self.tables)
            .field("rules_only", &self.rules_only)
            .field("also_remove", &self.also_remove)
            .finish_non_exhaustive()
    }
}

/// Whether another mode's capture is present in the namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// What was found, for a message (`ISTIO_OUTPUT in ip nat`, `inet istio-proxy-nat`).
    pub what: Vec<String>,
}

/// The part of a mode's rules that are nf_tables objects, as operations for another
/// backend's nf_tables transaction: removed in the same kernel transaction that adds the new
/// rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batched {
    /// The operations, in order (rules, then chains flushed, then chains deleted).
    pub ops: Vec<Op>,
    /// What they remove, for the log (`ip nat: 3 rules in OUTPUT, PREROUTING; 4 chains`).
    pub what: Vec<String>,
    /// Whether nothing of the mode's rules is left after them (otherwise
    /// [`Firewall::remove`] still runs after the install).
    pub complete: bool,
}

/// A firewall backend.
pub trait Firewall: Sync {
    /// The backend's name in logs and messages.
    fn name(&self) -> &'static str;
    /// The capabilities an install or removal needs (all others are dropped first).
    fn capabilities(&self) -> &'static [caps::Capability];
    /// The dry-run document: exactly what [`Firewall::install`] writes, in the syntax of the
    /// program that would load it.
    fn render(&self, capture: &Capture) -> String;
    /// Logs what an install writes: counts at info level, the text at debug level.
    fn log_plan(&self, capture: &Capture);
    /// Installs the capture, all or nothing: on error the namespace is as it was. A re-run of
    /// the same capture is a no-op (or converges, as the backend's options say).
    fn install(&self, capture: &Capture, how: &mut Install<'_>) -> anyhow::Result<()>;
    /// Removes what any istio-init run may have installed with this backend; `capture` is the
    /// current configuration's, for rules in built-in chains.
    fn remove(&self, capture: &Capture) -> anyhow::Result<()>;
    /// This backend's capture, if present; `tables` is the namespace's nf_tables tables.
    fn inspect(&self, tables: &[Table]) -> anyhow::Result<Found>;
    /// For `--reconcile` by the other (nftables) backend: this backend's rules that are
    /// nf_tables objects, as operations to put into that backend's transaction. Reads only;
    /// fails, before anything changes, when they cannot be told from foreign rules. By
    /// default nothing: the removal is [`Firewall::remove`], after the install.
    fn batched_removal(&self, _capture: &Capture, _tables: &[Table]) -> anyhow::Result<Batched> {
        Ok(Batched::default())
    }
}
