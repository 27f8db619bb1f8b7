//! Wording of restore failures: iptables' own reason without its banner, the failing input
//! line, and a hint (kernel modules, the lock, capabilities, istio-cni).
//!
//! Pure.

use crate::backend::iptables::state::Layout;
use crate::net::Family;
use crate::settings::config::IptablesVariant;

use super::RestoreFailure;

/// iptables' own reason from its stderr, without the program banner, the line report and
/// the usage hint.
pub fn iptables_message(stderr: &str) -> String {
    let mut parts = Vec::new();
    for line in stderr.lines() {
        let mut l = line.trim();
        if l.is_empty() || l.starts_with("Try `") || l.starts_with("Error occurred at line") {
            continue;
        }
        // "prog v1.8.9 (nf_tables): reason" → "reason"
        if let Some(i) = l.find("): ") {
            if l[..i].contains(" v1.") || l[..i].contains(" v0.") {
                l = &l[i + 3..];
            }
        }
        if let Some(i) = l.find(" failed: ") {
            if l[..i].contains("line ") {
                l = &l[i + " failed: ".len()..];
            }
        } else if l.ends_with(" failed") && l.contains(": line ") {
            continue;
        }
        let l = l.trim();
        if !l.is_empty() && !l.ends_with("):") {
            parts.push(l.to_owned());
        }
    }
    parts.join(" ")
}

/// Kernel modules a restore line depends on, for the hint when the kernel refuses it.
fn modules_for(
    line: &str,
    backend: IptablesVariant,
    family: Family,
    table: Option<&str>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |m: String| {
        if !out.contains(&m) {
            out.push(m);
        }
    };
    if backend == IptablesVariant::Nft {
        add("nf_tables".into());
        add("nft_compat".into());
    }
    let v = match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    };
    if let Some(t) = table {
        if backend == IptablesVariant::Legacy {
            let prefix = match family {
                Family::V4 => "iptable",
                Family::V6 => "ip6table",
            };
            add(format!("{prefix}_{t}"));
        } else if t == "nat" {
            add("nft_chain_nat".into());
        }
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    for w in words.windows(2) {
        let m = match (w[0], w[1]) {
            ("-m", "owner") => "xt_owner",
            ("-m", "multiport") => "xt_multiport",
            ("-m", "conntrack") => "xt_conntrack",
            ("-m", "mark") | ("-j", "MARK") => "xt_mark",
            ("-m", "connmark") | ("-j", "CONNMARK") => "xt_connmark",
            ("-j", "REDIRECT") => "xt_REDIRECT",
            ("-j", "CT") => "xt_CT",
            ("-j", "TPROXY") => {
                add(format!("nf_tproxy_{v}"));
                "xt_TPROXY"
            }
            _ => continue,
        };
        add(m.into());
    }
    out
}

/// The extensions iptables' message says the kernel lacks (`Extension TPROXY revision 0 not
/// supported, missing kernel module?`), as rule words for [`modules_for`] (`-j TPROXY`,
/// `-m owner`): the legacy backend reports them at the table's `COMMIT` line, which names none.
fn missing_extensions(reason: &str) -> String {
    let mut words = Vec::new();
    let mut rest = reason;
    while let Some(i) = rest.find("Extension ") {
        rest = &rest[i + "Extension ".len()..];
        let Some((name, tail)) = rest.split_once(' ') else {
            break;
        };
        if tail.starts_with("revision ") {
            let flag = if name.chars().any(|c| c.is_ascii_uppercase()) {
                "-j"
            } else {
                "-m"
            };
            words.push(format!("{flag} {name}"));
        }
    }
    words.join(" ")
}

/// The module a failed `modprobe` of iptables names: busybox's `can't load module NAME (…)`,
/// kmod's `could not insert 'NAME'`.
fn unloadable_module(reason: &str) -> Option<&str> {
    let name = if let Some((_, r)) = reason.split_once("can't load module ") {
        r.split([' ', ':']).next()
    } else {
        let (_, r) = reason.split_once("could not insert '")?;
        r.split('\'').next()
    }?;
    Some(name).filter(|n| !n.is_empty())
}

/// The hint when the kernel has not loaded a module the legacy backend needs and the
/// container could not load it (iptables runs `modprobe`, which needs CAP_SYS_MODULE).
fn module_not_loaded_hint(
    reason: &str,
    backend: IptablesVariant,
    family: Family,
    table: Option<&str>,
) -> Option<String> {
    let lower = reason.to_ascii_lowercase();
    let mods = match unloadable_module(reason) {
        Some(m) => vec![m.to_owned()],
        // Not `unable to initialize table` alone: legacy says that without CAP_NET_ADMIN too.
        None if lower.contains("do you need to insmod") => {
            let base = match family {
                Family::V4 => "ip_tables",
                Family::V6 => "ip6_tables",
            };
            let mut v = vec!["x_tables".to_owned(), base.to_owned()];
            v.extend(modules_for("", backend, family, table));
            v
        }
        None => return None,
    };
    let (what, it) = if mods.len() == 1 {
        ("module {} is", "it")
    } else {
        ("modules {} are", "them")
    };
    Some(format!(
        "the kernel {} not loaded and the container cannot load {it} (that needs \
         CAP_SYS_MODULE): load {it} on the node (modprobe {}), or use the nft backend",
        what.replace("{}", &mods.join(", ")),
        mods.join(" ")
    ))
}

/// A restore failure as one line: family, backend, program, the failing line and iptables'
/// message, plus a hint where one helps.
pub fn describe(
    family: Family,
    backend: IptablesVariant,
    text: &str,
    f: &RestoreFailure,
) -> String {
    let reason = iptables_message(&f.stderr);
    let reason = if reason.is_empty() {
        "iptables gave no reason".to_owned()
    } else {
        reason
    };
    let mut msg = format!("{family} ({backend} backend): {} failed", f.program);
    let line = f
        .line
        .and_then(|n| text.lines().nth(n.wrapping_sub(1)).map(|l| (n, l)));
    let table = f.line.and_then(|n| {
        Layout::of(text)
            .tables
            .iter()
            .find(|(_, start, commit)| *start <= n && n <= *commit)
            .map(|(name, _, _)| name.clone())
    });
    if let Some((n, l)) = line {
        msg.push_str(&format!(" at line {n} `{}`", l.trim()));
    }
    msg.push_str(&format!(": {reason}"));
    let lower = reason.to_ascii_lowercase();
    let not_loaded = module_not_loaded_hint(&reason, backend, family, table.as_deref());
    let hint = if lower.contains("holding the xtables lock") {
        Some("another process held the xtables lock for the whole wait (--xtables-wait)".to_owned())
    } else if lower.contains("lock file") {
        Some(
            "legacy iptables needs a writable lock file: mount a writable emptyDir at /run or \
             /tmp, or set XTABLES_LOCKFILE"
                .to_owned(),
        )
    } else if not_loaded.is_some() {
        not_loaded
    } else if lower.contains("permission denied") || lower.contains("operation not permitted") {
        Some(
            "the container needs NET_ADMIN and NET_RAW in the pod's own network namespace; if \
             the Istio CNI plugin is installed, istio-init should not run at all (disable the \
             init container in the injection settings)"
                .to_owned(),
        )
    } else if lower.contains("couldn't load")
        || lower.contains("no chain/target/match")
        || lower.contains("not supported")
        || lower.contains("does not exist")
        || lower.contains("can't initialize")
        || lower.contains("invalid argument")
        || lower.contains("unknown option")
    {
        let words = format!(
            "{} {}",
            line.map_or("", |(_, l)| l),
            missing_extensions(&reason)
        );
        let mods = modules_for(&words, backend, family, table.as_deref());
        let mut h = format!(
            "the kernel or the iptables extensions may lack support for this rule; make sure \
             the node has these modules loaded: {}",
            mods.join(", ")
        );
        if lower.contains("unknown option") || lower.contains("couldn't load") {
            h.push_str(
                " (and that the xtables extension libraries are installed, see XTABLES_LIBDIR)",
            );
        }
        Some(h)
    } else {
        None
    };
    if let Some(h) = hint.filter(|h| !msg.contains(h.as_str())) {
        msg.push_str(&format!("; hint: {h}"));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_named_in_iptables_messages() {
        assert_eq!(
            unloadable_module(
                "modprobe: ERROR: could not insert 'ip_tables': Operation not permitted"
            ),
            Some("ip_tables")
        );
        assert_eq!(
            unloadable_module("modprobe: can't load module xt_owner (kernel/net/xt_owner.ko): x"),
            Some("xt_owner")
        );
        assert_eq!(unloadable_module("Operation not permitted"), None);
        assert_eq!(
            missing_extensions(
                "Warning: Extension TPROXY revision 0 not supported, missing kernel module? \
                 Warning: Extension owner revision 1 not supported"
            ),
            "-j TPROXY -m owner"
        );
    }
}
