//! Capabilities: the preflight check that a real run has what its backend needs
//! (`CAP_NET_ADMIN` and `CAP_NET_RAW` for the iptables programs, `CAP_NET_ADMIN` alone for
//! nf_tables over netlink), and dropping everything else before anything is changed.
//!
//! Effects: reads and changes the calling thread's capability sets (`capget`/`capset`,
//! `prctl`). Capabilities are per thread on Linux; [`restrict`] runs on the worker thread that
//! applies the rules (see `netns.rs`), so the process's main thread keeps its own.

use anyhow::{Context, bail};
use caps::{CapSet, Capability, CapsHashSet};

/// What the iptables backend needs: nf_tables needs `CAP_NET_ADMIN`; legacy iptables also
/// needs `CAP_NET_RAW` (its table sockets are raw sockets).
pub const NEEDED: [Capability; 2] = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW];

/// What the nftables backend needs: one netlink batch, `CAP_NET_ADMIN` only.
pub const NEEDED_NFTABLES: [Capability; 1] = [Capability::CAP_NET_ADMIN];

/// The missing capabilities among `needed`, given the effective set.
pub fn missing(effective: &CapsHashSet, needed: &[Capability]) -> Vec<Capability> {
    needed
        .iter()
        .copied()
        .filter(|c| !effective.contains(c))
        .collect()
}

/// `NET_ADMIN, NET_RAW`: the names a securityContext uses.
fn k8s_names(caps: &[Capability]) -> String {
    let names: Vec<String> = caps
        .iter()
        .map(|c| c.to_string().trim_start_matches("CAP_").to_owned())
        .collect();
    names.join(", ")
}

/// Fails, naming every missing capability, what needs them and the fix, unless every
/// capability in `needed` is in the effective set.
pub fn preflight(needed: &[Capability], what: &str) -> anyhow::Result<()> {
    let effective =
        caps::read(None, CapSet::Effective).context("reading the effective capabilities")?;
    let missing = missing(&effective, needed);
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
    let all: Vec<String> = needed.iter().map(ToString::to_string).collect();
    bail!(
        "missing {} {}: {what} needs {}; add them to the init container's \
         securityContext.capabilities.add: [{}] (on GKE Autopilot the cluster must also allow \
         them: --workload-policies=allow-net-admin)",
        if names.len() == 1 {
            "capability"
        } else {
            "capabilities"
        },
        names.join(" and "),
        all.join(" and "),
        k8s_names(needed)
    )
}

/// Drops every capability but `needed` from every set of the calling thread, and sets
/// no-new-privs, so that the programs it spawns run with exactly those whatever their
/// files say: with no-new-privs an `exec` never gains a capability beyond the permitted set.
/// With `bounding`, the bounding set is narrowed too (one `prctl` per capability, which the
/// iptables mode's tests read back in its restores); the nftables mode, whose install starts
/// no program, leaves it to no-new-privs. The bounding set can only shrink with
/// `CAP_SETPCAP`; without it, no-new-privs alone keeps children within the permitted set.
pub fn restrict(needed: &[Capability], bounding: bool) -> anyhow::Result<()> {
    let needed: CapsHashSet = needed.iter().copied().collect();
    let permitted =
        caps::read(None, CapSet::Permitted).context("reading the permitted capabilities")?;
    let keep: CapsHashSet = needed.intersection(&permitted).copied().collect();
    // Without `bounding`, no-new-privs (below) bounds every exec of this thread.
    if bounding {
        let effective =
            caps::read(None, CapSet::Effective).context("reading the effective capabilities")?;
        if effective.contains(&Capability::CAP_SETPCAP) {
            // Dropping a capability the set does not hold succeeds, so there is no need to
            // read the set first (one prctl per capability instead of two).
            for c in caps::all().into_iter().filter(|c| !needed.contains(c)) {
                if let Err(e) = caps::drop(None, CapSet::Bounding, c) {
                    // Kernels older than 5.8/5.9 do not know the newest capabilities.
                    if c.index() < Capability::CAP_PERFMON.index() {
                        return Err(e)
                            .with_context(|| format!("dropping {c} from the bounding set"));
                    }
                }
            }
        } else {
            log::debug!("no CAP_SETPCAP: the bounding set stays; no-new-privs limits children");
        }
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
        assert_eq!(missing(&none, &NEEDED), NEEDED);
        let admin: CapsHashSet = [Capability::CAP_NET_ADMIN].into_iter().collect();
        assert_eq!(missing(&admin, &NEEDED), [Capability::CAP_NET_RAW]);
        assert!(missing(&admin, &NEEDED_NFTABLES).is_empty());
        let raw: CapsHashSet = [Capability::CAP_NET_RAW].into_iter().collect();
        assert_eq!(missing(&raw, &NEEDED_NFTABLES), NEEDED_NFTABLES);
        let both: CapsHashSet = NEEDED.into_iter().collect();
        assert!(missing(&both, &NEEDED).is_empty());
        assert_eq!(k8s_names(&NEEDED), "NET_ADMIN, NET_RAW");
    }
}
