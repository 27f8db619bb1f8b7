//! Capabilities: the preflight check that a real run has `CAP_NET_ADMIN` and `CAP_NET_RAW`,
//! and dropping everything else before any program is spawned.
//!
//! Effects: reads and changes the calling thread's capability sets (`capget`/`capset`,
//! `prctl`). Capabilities are per thread on Linux; [`restrict`] runs on the worker thread that
//! applies the rules (see `netns.rs`), so the process's main thread keeps its own.

use anyhow::{Context, bail};
use caps::{CapSet, Capability, CapsHashSet};

/// What a real run needs: nf_tables needs `CAP_NET_ADMIN`; legacy iptables also needs
/// `CAP_NET_RAW` (its table sockets are raw sockets).
pub const NEEDED: [Capability; 2] = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW];

/// The fix, in the words an operator needs.
pub const FIX: &str = "add them to the init container's securityContext.capabilities.add: \
                       [NET_ADMIN, NET_RAW] (on GKE Autopilot the cluster must also allow them: \
                       --workload-policies=allow-net-admin)";

/// The missing capabilities among `needed`, given the effective set.
pub fn missing(effective: &CapsHashSet) -> Vec<Capability> {
    NEEDED
        .into_iter()
        .filter(|c| !effective.contains(c))
        .collect()
}

/// Fails, naming every missing capability and the fix, unless both needed capabilities are
/// in the effective set.
pub fn preflight() -> anyhow::Result<()> {
    let effective =
        caps::read(None, CapSet::Effective).context("reading the effective capabilities")?;
    let missing = missing(&effective);
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
    bail!(
        "missing {} {}: programming iptables needs CAP_NET_ADMIN and CAP_NET_RAW; {FIX}",
        if names.len() == 1 {
            "capability"
        } else {
            "capabilities"
        },
        names.join(" and ")
    )
}

/// Drops every capability but [`NEEDED`] from every set of the calling thread, and sets
/// no-new-privs, so that the programs it spawns run with exactly those two whatever their
/// files say. The bounding set can only shrink with `CAP_SETPCAP`; without it, no-new-privs
/// still keeps children from gaining more than the permitted set.
pub fn restrict() -> anyhow::Result<()> {
    let needed: CapsHashSet = NEEDED.into_iter().collect();
    let permitted =
        caps::read(None, CapSet::Permitted).context("reading the permitted capabilities")?;
    let keep: CapsHashSet = needed.intersection(&permitted).copied().collect();
    let effective =
        caps::read(None, CapSet::Effective).context("reading the effective capabilities")?;
    if effective.contains(&Capability::CAP_SETPCAP) {
        // Dropping a capability the set does not hold succeeds, so there is no need to read
        // the set first (one prctl per capability instead of two).
        for c in caps::all().into_iter().filter(|c| !needed.contains(c)) {
            if let Err(e) = caps::drop(None, CapSet::Bounding, c) {
                // Kernels older than 5.8/5.9 do not know the newest capabilities.
                if c.index() < Capability::CAP_PERFMON.index() {
                    return Err(e).with_context(|| format!("dropping {c} from the bounding set"));
                }
            }
        }
    } else {
        log::debug!("no CAP_SETPCAP: the bounding set stays; no-new-privs limits children");
    }
    caps::clear(None, CapSet::Ambient).context("clearing the ambient capabilities")?;
    caps::set(None, CapSet::Effective, &keep).context("setting the effective capabilities")?;
    caps::set(None, CapSet::Permitted, &keep).context("setting the permitted capabilities")?;
    caps::set(None, CapSet::Inheritable, &keep).context("setting the inheritable capabilities")?;
    // A non-root caller passes capabilities to its children only through the ambient set.
    if !nix::unistd::geteuid().is_root() {
        for c in &keep {
            caps::raise(None, CapSet::Ambient, *c)
                .with_context(|| format!("raising {c} in the ambient set"))?;
        }
    }
    nix::sys::prctl::set_no_new_privs().context("setting no-new-privs")?;
    log::debug!(
        "capabilities restricted to {}",
        keep.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_missing_capability() {
        let none = CapsHashSet::new();
        assert_eq!(missing(&none), NEEDED);
        let admin: CapsHashSet = [Capability::CAP_NET_ADMIN].into_iter().collect();
        assert_eq!(missing(&admin), [Capability::CAP_NET_RAW]);
        let both: CapsHashSet = NEEDED.into_iter().collect();
        assert!(missing(&both).is_empty());
    }
}
