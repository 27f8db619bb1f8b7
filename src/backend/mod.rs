//! Firewall backends: each installs, inspects and removes the [`Capture`] in the current
//! network namespace. `iptables/` drives the iptables programs (one restore per family),
//! `nftables/` sends one nf_tables batch.
//!
//! The seam is at the height of a whole capture (as a container network stack's firewall
//! driver is) and has two phases: [`Firewall::prepare`] decides everything from the capture
//! and a [`Snapshot`] of the namespace, and returns a [`Plan`]; the run (`lib.rs`) logs the
//! plan, adds the routes and commits it. What to capture is decided once, in
//! [`crate::capture`]; how it becomes kernel state, how a re-run converges and how a failure
//! is undone are each backend's own.

pub mod iptables;
pub mod nftables;

use crate::capture::Capture;
use crate::netlink::tables::Table;
use crate::nft::Op;

/// The namespace as a run finds it, read once before anything changes: the coexistence
/// check, the other mode's removal and the backend all decide from the same facts (the
/// namespace lock keeps other istio-init runs out meanwhile).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The nf_tables tables (one netlink dump).
    pub tables: Vec<Table>,
}

impl Snapshot {
    /// Reads the calling thread's network namespace.
    pub fn read() -> anyhow::Result<Snapshot> {
        Ok(Snapshot {
            tables: crate::netlink::tables::list(None)?,
        })
    }
}

/// An install, decided by [`Firewall::prepare`]: everything is chosen, encoded and checked,
/// and nothing has changed yet. [`Plan::commit`] makes it take effect; dropped, nothing does.
#[derive(Debug)]
pub enum Plan<'a> {
    /// The iptables mode: one `*-restore` per family, started and held with its input.
    Iptables(iptables::Plan<'a>),
    /// The iptables mode on a fresh namespace where one restore does all the work: this
    /// process becomes that program.
    Handover(iptables::Handover),
    /// The nftables mode: one encoded netlink batch, one kernel transaction.
    Nftables(nftables::Plan),
}

impl Plan<'_> {
    /// Logs what the commit writes: counts at info level, the text at debug level.
    pub fn log(&self) {
        match self {
            Plan::Iptables(p) => p.log(),
            Plan::Handover(h) => h.log(),
            Plan::Nftables(p) => p.log(),
        }
    }

    /// Whether the commit replaces this process (it returns only on failure).
    pub fn hands_over(&self) -> bool {
        matches!(self, Plan::Handover(_))
    }

    /// Makes the rules take effect, all or nothing: on error the namespace is as it was.
    pub fn commit(self) -> anyhow::Result<()> {
        match self {
            Plan::Iptables(p) => p.commit().map(drop),
            Plan::Handover(h) => Err(h.exec()),
            Plan::Nftables(p) => p.commit(),
        }
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
    /// The dry-run document: exactly what an install writes, in the syntax of the program
    /// that would load it.
    fn render(&self, capture: &Capture) -> String;
    /// Decides the install of `capture` in the namespace `ns` shows, without changing it.
    /// `replacing` is the other mode's rules to remove in the same nf_tables transaction
    /// (`--reconcile`; see [`Firewall::batched_removal`]): only the nftables backend has one.
    /// A re-run of the same capture commits nothing new (or converges, as the backend's
    /// options say).
    fn prepare(
        &self,
        capture: &Capture,
        ns: &Snapshot,
        replacing: &Batched,
    ) -> anyhow::Result<Plan<'_>>;
    /// Removes what any istio-init run may have installed with this backend; `capture` is the
    /// current configuration's, for rules in built-in chains.
    fn remove(&self, capture: &Capture) -> anyhow::Result<()>;
    /// This backend's capture, if present in `ns`.
    fn inspect(&self, ns: &Snapshot) -> anyhow::Result<Found>;
    /// For `--reconcile` by the other (nftables) backend: this backend's rules that are
    /// nf_tables objects, as operations to put into that backend's transaction. Reads only;
    /// fails, before anything changes, when they cannot be told from foreign rules. By
    /// default nothing: the removal is [`Firewall::remove`], after the commit.
    fn batched_removal(&self, _capture: &Capture, _ns: &Snapshot) -> anyhow::Result<Batched> {
        Ok(Batched::default())
    }
}
