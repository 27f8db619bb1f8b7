//! The nftables backend (`--native-nftables`): the capture as Istio's native nftables mode
//! lays it out (`map.rs`), applied as one nf_tables netlink batch sent from this process —
//! one kernel transaction across every table and both families, no program run, only
//! `CAP_NET_ADMIN`.
//!
//! Effects: `NETLINK_NETFILTER` sockets (the batch; an install reads the run's one dump of the
//! tables, its [`Snapshot`], and a removal dumps them itself);
//! reads `/proc/thread-self/net/ip{,6}_tables_names` for the coexistence check.
//!
//! Design: `docs/design.md`, "The nftables backend".

pub mod map;

use anyhow::{Context, anyhow};
use netlink_packet_netfilter::NetfilterProtoFamily;

use crate::backend::{Batched, Firewall, Found, Snapshot};
use crate::capture::Capture;
use crate::net::Family;
use crate::netlink::nftables as wire;
use crate::netlink::tables::{self, Table};
use crate::nft::{self, Op, Transaction};

/// The nftables backend.
#[derive(Debug)]
pub struct Nftables {
    /// Resolves owner-group names (`/etc/group`, no NSS).
    pub group: fn(&str) -> Option<u32>,
}

/// The nftables mode's install, decided: one transaction that replaces istio-init's tables
/// (and removes the other mode's nf_tables rules with `--reconcile`), encoded for the kernel.
#[derive(Debug)]
pub struct Plan {
    tx: Transaction,
    batch: wire::Batch,
    /// Its counts, for the log.
    summary: String,
    /// istio-init's tables it replaces.
    replaced: Vec<String>,
    /// The other mode's rules it removes, for the log.
    removed: Vec<String>,
}

impl Plan {
    /// Logs the transaction: counts at info level, its `nft -f` text at debug level.
    pub fn log(&self) {
        log::info!("nftables ruleset: {}", self.summary);
        log::debug!("nftables transaction:\n{}", nft::render(&self.tx));
    }

    /// Sends the batch: the kernel applies all of it or none.
    pub fn commit(self) -> anyhow::Result<()> {
        wire::send(&self.tx, &self.batch)
            .map_err(|e| anyhow!("applying the nftables rules: {e}"))?;
        let removed = if self.removed.is_empty() {
            String::new()
        } else {
            format!(
                ", which also removed the iptables mode's rules ({})",
                self.removed.join("; ")
            )
        };
        let summary = &self.summary;
        if self.replaced.is_empty() {
            log::info!("nftables: applied {summary} in one transaction{removed}");
        } else {
            log::info!(
                "nftables: replaced inet {} with {summary} in one transaction{removed}",
                self.replaced.join(", inet ")
            );
        }
        Ok(())
    }
}

/// This backend's tables among `tables` (the namespace's nf_tables tables).
pub fn ours(tables: &[Table]) -> Vec<String> {
    tables
        .iter()
        .filter(|t| t.family == NetfilterProtoFamily::Inet && map::is_ours(&t.name))
        .map(|t| t.name.clone())
        .collect()
}

/// This backend's tables present in the current network namespace.
pub fn present() -> anyhow::Result<Vec<String>> {
    Ok(ours(
        &tables::list(None).context("listing nf_tables tables")?,
    ))
}

/// Deletes these tables of this backend in one transaction.
pub fn delete(names: &[String]) -> anyhow::Result<()> {
    let tx = Transaction {
        ops: names.iter().cloned().map(Op::DeleteTable).collect(),
    };
    wire::apply(&tx).map_err(|e| anyhow::anyhow!("removing {}: {e}", names.join(", ")))
}

/// Rules, chains and tables of a transaction, per family, for the log.
fn counts(capture: &Capture, tx: &Transaction) -> String {
    let count = |f: fn(&Op) -> bool| tx.ops.iter().filter(|o| f(o)).count();
    let tables = count(|o| matches!(o, Op::AddTable(_)));
    let chains = count(|o| matches!(o, Op::AddChain(_)));
    let only = |f| capture.rules.iter().filter(|r| r.family == Some(f)).count();
    let (v4, v6) = (only(Family::V4), only(Family::V6));
    let rules = capture.rules.len();
    format!(
        "{tables} tables, {chains} chains, {rules} rules ({} for both families, {v4} IPv4 only, \
         {v6} IPv6 only)",
        rules - v4 - v6
    )
}

impl Firewall for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn capabilities(&self) -> &'static [caps::Capability] {
        &crate::sys::caps::NEEDED_NFTABLES
    }

    fn render(&self, capture: &Capture) -> String {
        let replace: Vec<String> = map::TABLES.iter().map(|t| map::table_name(*t)).collect();
        match map::transaction(capture, &replace, &self.group) {
            Ok(tx) => format!(
                "# nftables: one transaction for `nft -f` that replaces istio-init's tables \
                 ({})\n{}",
                counts(capture, &tx),
                nft::render(&tx)
            ),
            Err(map::UnknownGroup(g)) => format!("# owner group {g:?} does not resolve\n"),
        }
    }

    fn prepare(
        &self,
        capture: &Capture,
        ns: &Snapshot,
        replacing: &Batched,
    ) -> anyhow::Result<crate::backend::Plan<'_>> {
        let replaced = ours(&ns.tables);
        let mut tx = map::transaction(capture, &replaced, &self.group)
            .map_err(|map::UnknownGroup(g)| anyhow!("owner group {g:?} does not resolve"))?;
        let summary = counts(capture, &tx);
        // The other mode's rules that are nf_tables objects go first: one transaction
        // removes them and adds ours.
        tx.ops.splice(0..0, replacing.ops.iter().cloned());
        let batch = wire::encode(&tx).map_err(|e| anyhow!("applying the nftables rules: {e}"))?;
        Ok(crate::backend::Plan::Nftables(Plan {
            tx,
            batch,
            summary,
            replaced,
            removed: if replacing.ops.is_empty() {
                Vec::new()
            } else {
                replacing.what.clone()
            },
        }))
    }

    fn remove(&self, _capture: &Capture) -> anyhow::Result<()> {
        let present = present()?;
        if present.is_empty() {
            log::info!("nftables: no istio-proxy table to remove");
        } else {
            delete(&present)?;
            log::info!("nftables: removed inet {}", present.join(", inet "));
        }
        Ok(())
    }

    fn inspect(&self, ns: &Snapshot) -> anyhow::Result<Found> {
        Ok(Found {
            what: ours(&ns.tables)
                .into_iter()
                .map(|t| format!("inet {t}"))
                .collect(),
        })
    }
}
