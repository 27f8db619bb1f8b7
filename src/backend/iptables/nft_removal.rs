//! The iptables mode's rules in iptables-nft, as nf_tables operations for the nftables mode's
//! transaction (`--reconcile`): the same rules a cleanup removes ([`state::cleanup_plan`]),
//! named by their nf_tables handles, so that one kernel transaction adds the new tables and
//! removes these (never both modes' rules, never neither).
//!
//! Effects: runs `iptables-nft-save` (and, to tell the configuration's rules in built-in
//! chains from foreign ones, `iptables-nft-restore` of scratch chains, deleted again at once),
//! and dumps the rules of the chains concerned over `NETLINK_NETFILTER`. Changes no rule.

use anyhow::{anyhow, bail};

use super::state::{self, TableCleanup};
use super::{Programs, delete_scratch, read_ours, scratch_names};
use crate::backend::Batched;
use crate::capture::{Ruleset, Table};
use crate::net::Family;
use crate::netlink::tables;
use crate::nft::{self, ChainRef, Op};
use crate::settings::config::IptablesVariant;

/// The operations that remove istio-init's iptables-nft rules of every family whose
/// iptables tables exist in `nf_tables` (the namespace's nf_tables tables); `expected` is
/// the current configuration's rulesets, for its rules in built-in chains.
pub fn batched(
    nf: &dyn Programs,
    expected: &[Ruleset],
    nf_tables: &[tables::Table],
) -> anyhow::Result<Batched> {
    let mut out = Batched {
        complete: Family::ALL
            .into_iter()
            .all(|f| nf.legacy_tables(f).is_empty()),
        ..Batched::default()
    };
    for family in Family::ALL {
        let word = nft::family_word(family);
        let exists = nf_tables.iter().any(|t| {
            t.family == tables::nfproto(family) && Table::ALL.iter().any(|x| x.name() == t.name)
        });
        if !exists {
            continue;
        }
        let rs = expected.iter().find(|r| r.family == family);
        let (live, canon) = match read_ours(nf, family, IptablesVariant::Nft, rs) {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(e) => bail!(
                "{family}: reading the iptables mode's rules in iptables-nft's {word} tables, \
                 to remove them in the nftables transaction (only iptables-nft-save tells \
                 Istio's rules in built-in chains from foreign ones): {e:#}; nothing was changed"
            ),
        };
        delete_scratch(nf, family, IptablesVariant::Nft, &live)?;
        let mine = scratch_names();
        for plan in state::cleanup_plan(&live, &canon) {
            let (ops, what) = table_ops(family, &live, &plan, &|c| mine.owns(c))
                .map_err(|e| anyhow!("{family}: {e:#}; nothing was changed"))?;
            out.ops.extend(ops);
            out.what.push(what);
        }
    }
    Ok(out)
}

/// One table's removal: each rule of `plan` named by its handle (the kernel's list of the
/// chain, checked against the saved one), then its chains flushed and deleted (except
/// `skip`: this run's scratch chains, already gone). Also a description for the log.
fn table_ops(
    family: Family,
    live: &state::Saved,
    plan: &TableCleanup,
    skip: &dyn Fn(&str) -> bool,
) -> anyhow::Result<(Vec<Op>, String)> {
    let table = &plan.table;
    let at = |chain: &str| ChainRef {
        family,
        table: table.clone(),
        chain: chain.to_owned(),
    };
    let saved = live
        .table(table)
        .ok_or_else(|| anyhow!("table {table} is not in the saved state"))?;
    let mut chains: Vec<&str> = Vec::new();
    for (c, _) in &plan.rules {
        if !chains.contains(&c.as_str()) {
            chains.push(c);
        }
    }
    let mut handles = Vec::with_capacity(chains.len());
    for &chain in &chains {
        let listed = tables::rules(tables::nfproto(family), table, chain)?;
        let want = saved
            .chain(chain)
            .map(|c| c.rules.as_slice())
            .unwrap_or(&[]);
        same_order(&at(chain), want, &listed)?;
        handles.push(listed);
    }
    let mut ops = Vec::new();
    for (chain, i) in &plan.rules {
        let rule = chains
            .iter()
            .position(|c| c == chain)
            .and_then(|k| handles[k].get(*i))
            .ok_or_else(|| anyhow!("chain {}: no rule {}", at(chain), i + 1))?;
        ops.push(Op::DeleteRule(at(chain), rule.handle));
    }
    let gone: Vec<&String> = plan.chains.iter().filter(|c| !skip(c)).collect();
    ops.extend(gone.iter().map(|c| Op::FlushChain(at(c))));
    ops.extend(gone.iter().map(|c| Op::DeleteChain(at(c))));
    let what = format!(
        "{} {table}: {} in {}, {} flushed and deleted",
        nft::family_word(family),
        count(plan.rules.len(), "rule"),
        if chains.is_empty() {
            "no built-in chain".to_owned()
        } else {
            chains.join(", ")
        },
        count(gone.len(), "chain")
    );
    Ok((ops, what))
}

fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Checks that the kernel lists a chain's rules as `iptables-nft-save` printed them: as many,
/// and each jump to an Istio chain at the same place, so that a position names the rule.
fn same_order(chain: &ChainRef, saved: &[String], listed: &[tables::Rule]) -> anyhow::Result<()> {
    if saved.len() != listed.len() {
        bail!(
            "chain {chain}: iptables-nft-save printed {} rules and the kernel lists {}: it \
             changed meanwhile",
            saved.len(),
            listed.len()
        );
    }
    for (i, (s, l)) in saved.iter().zip(listed).enumerate() {
        let theirs = state::jump_target(s).filter(|t| state::is_istio_chain(t));
        let kernel = l.jump.as_deref().filter(|t| state::is_istio_chain(t));
        if theirs != kernel {
            bail!(
                "chain {chain}: rule {} is `{s}` in iptables-nft-save's output, and the kernel's \
                 rule {} (handle {}) jumps to {}: the two lists do not match",
                i + 1,
                i + 1,
                l.handle,
                kernel.unwrap_or("no Istio chain")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_name_rules_only_when_both_lists_agree() {
        let chain = ChainRef {
            family: Family::V4,
            table: "nat".into(),
            chain: "OUTPUT".into(),
        };
        let saved = ["-o eth9 -j ACCEPT".to_owned(), "-j ISTIO_OUTPUT".to_owned()];
        let rule = |handle, jump: Option<&str>| tables::Rule {
            handle,
            jump: jump.map(str::to_owned),
        };
        let listed = [rule(4, None), rule(5, Some("ISTIO_OUTPUT"))];
        assert!(same_order(&chain, &saved, &listed).is_ok());
        let swapped = [rule(5, Some("ISTIO_OUTPUT")), rule(4, None)];
        let e = same_order(&chain, &saved, &swapped)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "chain ip nat OUTPUT: rule 1 is `-o eth9 -j ACCEPT` in iptables-nft-save's output, \
             and the kernel's rule 1 (handle 5) jumps to ISTIO_OUTPUT: the two lists do not match"
        );
        let e = same_order(&chain, &saved, &listed[..1])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "chain ip nat OUTPUT: iptables-nft-save printed 2 rules and the kernel lists 1: it \
             changed meanwhile"
        );
    }
}
