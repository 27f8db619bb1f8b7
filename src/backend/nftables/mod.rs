//! The nftables backend (`--native-nftables`): the capture as Istio's native nftables mode
//! lays it out (`map.rs`), applied as one nf_tables netlink batch sent from this process —
//! one kernel transaction across every table and both families, no program run, only
//! `CAP_NET_ADMIN`.
//!
//! Effects: `NETLINK_NETFILTER` sockets (the batch; an install reads the run's one dump of the
//! tables, handed over in [`Install`], and a removal dumps them itself);
//! reads `/proc/thread-self/net/ip{,6}_tables_names` for the coexistence check.
//!
//! Design: `docs/design.md`, "The nftables backend".

pub mod map;

use anyhow::{Context, anyhow};
use netlink_packet_netfilter::NetfilterProtoFamily;

use crate::backend::{Firewall, Found, Install};
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
    /// The counts of the transaction [`Firewall::install`] built, for [`Firewall::log_plan`]
    /// while it runs (`at_commit`), which would otherwise build the transaction again.
    pub planned: std::sync::OnceLock<String>,
}

impl Nftables {
    /// The backend, resolving owner groups with `group`.
    pub fn new(group: fn(&str) -> Option<u32>) -> Nftables {
        Nftables {
            group,
            planned: std::sync::OnceLock::new(),
        }
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

    fn log_plan(&self, capture: &Capture) {
        // The transaction is built here only when install has not (a dry run, a handover of
        // the other backend) or for the debug listing.
        let tx = (self.planned.get().is_none() || log::log_enabled!(log::Level::Debug))
            .then(|| map::transaction(capture, &[], &self.group).ok())
            .flatten();
        let summary = self.planned.get().cloned();
        if let Some(summary) = summary.or_else(|| tx.as_ref().map(|tx| counts(capture, tx))) {
            log::info!("nftables ruleset: {summary}");
        }
        if let Some(tx) = &tx {
            log::debug!("nftables transaction:\n{}", nft::render(tx));
        }
    }

    fn install(&self, capture: &Capture, how: &mut Install<'_>) -> anyhow::Result<()> {
        let present = ours(how.tables);
        let mut tx = map::transaction(capture, &present, &self.group)
            .map_err(|map::UnknownGroup(g)| anyhow!("owner group {g:?} does not resolve"))?;
        let summary = counts(capture, &tx);
        let _ = self.planned.set(summary.clone());
        // The other mode's rules that are nf_tables objects go first: one transaction
        // removes them and adds ours.
        let theirs = how.also_remove;
        tx.ops.splice(0..0, theirs.ops.iter().cloned());
        // Encoded before the routes go in (`at_commit`), so that a SIGKILL between the two
        // has as little time as possible to land in.
        let batch = wire::encode(&tx).map_err(|e| anyhow!("applying the nftables rules: {e}"))?;
        (how.at_commit)()?;
        wire::send(&tx, &batch).map_err(|e| anyhow!("applying the nftables rules: {e}"))?;
        let removed = if theirs.ops.is_empty() {
            String::new()
        } else {
            format!(
                ", which also removed the iptables mode's rules ({})",
                theirs.what.join("; ")
            )
        };
        if present.is_empty() {
            log::info!("nftables: applied {summary} in one transaction{removed}");
        } else {
            log::info!(
                "nftables: replaced inet {} with {summary} in one transaction{removed}",
                present.join(", inet ")
            );
        }
        Ok(())
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

    fn inspect(&self, tables: &[Table]) -> anyhow::Result<Found> {
        Ok(Found {
            what: ours(tables)
                .into_iter()
                .map(|t| format!("inet {t}"))
                .collect(),
        })
    }
}
