//! Renders a family's [`Ruleset`] as `iptables-restore` input, exactly as istio-iptables writes it:
//! `* table` headers in alphabetical order, `-N` declarations, the rules in emission order,
//! `COMMIT`. No comments, no counters, no policies.
//!
//! Pure: formatting only. Every value type renders as one whitespace-free token.

use std::fmt::Write;

use crate::capture::{Match, Owner, Rule, Ruleset, Table, TableRules, Target};

fn not(neg: bool) -> &'static str {
    if neg { "! " } else { "" }
}

/// One match, as istio-iptables writes it (`-p tcp`, `! -d 127.0.0.1/32`, `-m owner …`).
fn write_match(out: &mut String, m: &Match) {
    let _ = match m {
        Match::Proto(p) => write!(out, "-p {}", p.name()),
        Match::InIface(i) => write!(out, "-i {i}"),
        Match::OutIface(i) => write!(out, "-o {i}"),
        Match::Src(c) => write!(out, "-s {c}"),
        Match::Dst { neg, net } => write!(out, "{}-d {net}", not(*neg)),
        Match::Dport { neg, port } => write!(out, "{}--dport {port}", not(*neg)),
        Match::Sport(p) => write!(out, "--sport {p}"),
        Match::Dports { neg, ports } => {
            let list: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
            write!(out, "-m multiport {}--dports {}", not(*neg), list.join(","))
        }
        Match::Owner { neg, owner } => match owner {
            Owner::Uid(u) => write!(out, "-m owner {}--uid-owner {u}", not(*neg)),
            Owner::Gid(g) => write!(out, "-m owner {}--gid-owner {g}", not(*neg)),
        },
        Match::CtState(s) => write!(out, "-m conntrack --ctstate {s}"),
        Match::Mark { neg, mark } => write!(out, "-m mark {}--mark {mark}", not(*neg)),
        Match::Connmark(m) => write!(out, "-m connmark --mark {m}"),
    };
}

/// One match's text.
pub fn match_text(m: &Match) -> String {
    let mut s = String::new();
    write_match(&mut s, m);
    s
}

/// The target, with a user chain's name as `chain` gives it (see [`spec_renamed`]).
fn write_target(out: &mut String, t: &Target, chain: &dyn Fn(&str) -> String) {
    let _ = match t {
        Target::Jump(c) => write!(out, "-j {}", chain(c)),
        Target::Return => write!(out, "-j RETURN"),
        Target::Accept => write!(out, "-j ACCEPT"),
        Target::Drop => write!(out, "-j DROP"),
        Target::Redirect { port, singular } => {
            let opt = if *singular { "--to-port" } else { "--to-ports" };
            write!(out, "-j REDIRECT {opt} {port}")
        }
        Target::Tproxy { mark, on_port } => write!(
            out,
            "-j TPROXY --tproxy-mark {mark}/0xffffffff --on-port {on_port}"
        ),
        Target::SetMark(m) => write!(out, "-j MARK --set-mark {m}"),
        Target::ConnmarkSave => write!(out, "-j CONNMARK --save-mark"),
        Target::ConnmarkRestore => write!(out, "-j CONNMARK --restore-mark"),
        Target::CtZone(z) => write!(out, "-j CT --zone {z}"),
    };
}

/// A rule's match and target part, as after `-A CHAIN`, with jump targets renamed by
/// `chain` (the scratch chains of `state.rs`).
pub fn spec_renamed(rule: &Rule, chain: &dyn Fn(&str) -> String) -> String {
    let mut s = String::new();
    for m in &rule.matches {
        write_match(&mut s, m);
        s.push(' ');
    }
    write_target(&mut s, &rule.target, chain);
    s
}

/// A rule's match and target part, as after `-A CHAIN`.
pub fn spec(rule: &Rule) -> String {
    spec_renamed(rule, &str::to_owned)
}

/// A rule's line: `-A CHAIN spec` or `-I CHAIN n spec`, with every chain name (its own and
/// its jump target's) given by `chain`.
pub fn rule_line_renamed(rule: &Rule, chain: &dyn Fn(&str) -> String) -> String {
    let spec = spec_renamed(rule, chain);
    match rule.insert_at {
        Some(n) => format!("-I {} {n} {spec}", chain(rule.chain)),
        None => format!("-A {} {spec}", chain(rule.chain)),
    }
}

/// A rule's line in the restore input.
pub fn rule_line(rule: &Rule) -> String {
    rule_line_renamed(rule, &str::to_owned)
}

/// One table's transaction: `* table`, `-N` declarations, the rules, `COMMIT`.
pub fn table_text(t: &TableRules) -> String {
    let mut out = format!("* {}\n", t.table.name());
    for c in &t.new_chains {
        let _ = writeln!(out, "-N {c}");
    }
    for r in &t.rules {
        let _ = writeln!(out, "{}", rule_line(r));
    }
    out.push_str("COMMIT\n");
    out
}

/// The complete `iptables-restore --noflush` input of one family.
pub fn ruleset_text(rs: &Ruleset) -> String {
    rs.tables.iter().map(table_text).collect()
}

/// The dry-run document: for each family a `# IPv4` / `# IPv6` comment line followed by its
/// restore input. iptables-restore ignores `#` lines, so the whole output can be fed back.
pub fn dry_run_text(rulesets: &[Ruleset]) -> String {
    let mut out = String::new();
    for rs in rulesets {
        let _ = writeln!(
            out,
            "# {} ({} rules in {} chains)",
            rs.family,
            rs.rule_count(),
            rs.chain_count()
        );
        out.push_str(&ruleset_text(rs));
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::capture::{Facts, build};
    use crate::net::Family;
    use crate::settings::cli::Defaults;
    use crate::settings::config::tests::resolve;

    #[test]
    fn default_sidecar_text() {
        let cfg = resolve(Defaults::Native, &[], &[]).unwrap();
        let text = super::ruleset_text(&build(&cfg, &Facts::default()).family(Family::V4));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "* nat");
        assert_eq!(lines[1], "-N ISTIO_INBOUND");
        assert!(lines.contains(&"-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"));
        assert!(lines.contains(&"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        assert!(text.ends_with("COMMIT\n"));
    }

    #[test]
    fn rendering_is_deterministic() {
        let cfg = resolve(Defaults::Native, &["-m", "TPROXY", "--redirect-dns"], &[]).unwrap();
        let facts = Facts {
            ipv6: true,
            dns_servers: vec!["10.0.0.10".parse().unwrap()],
        };
        let a: Vec<String> = facts
            .families()
            .iter()
            .map(|f| super::ruleset_text(&build(&cfg, &facts).family(*f)))
            .collect();
        let b: Vec<String> = facts
            .families()
            .iter()
            .map(|f| super::ruleset_text(&build(&cfg, &facts).family(*f)))
            .collect();
        assert_eq!(a, b);
    }
}

/// The iptables mode's [`Layout`](crate::trace::Layout): what `iptables-save` lists.
#[derive(Debug, Clone, Copy)]
pub struct Layout;

impl crate::trace::Layout for Layout {
    fn table(&self, table: Table) -> String {
        table.name().to_owned()
    }

    fn chain(&self, chain: &str) -> String {
        chain.to_owned()
    }

    fn rule(&self, rule: &Rule) -> String {
        spec(rule)
    }

    fn condition(&self, _rule: &Rule, m: &Match) -> String {
        match_text(m)
    }
}
