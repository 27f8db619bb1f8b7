//! Renders a [`Ruleset`] as `iptables-restore` input, exactly as istio-iptables writes it:
//! `* table` headers in alphabetical order, `-N` declarations, the rules in emission order,
//! `COMMIT`. No comments, no counters, no policies.
//!
//! Pure: formatting only. Every value type renders as one whitespace-free token.

use std::fmt::{self, Write};

use crate::ruleset::{Match, Owner, Rule, Ruleset, TableRules, Target};

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let not = |neg: bool| if neg { "! " } else { "" };
        match self {
            Match::Proto(p) => write!(f, "-p {}", p.name()),
            Match::InIface(i) => write!(f, "-i {i}"),
            Match::OutIface(i) => write!(f, "-o {i}"),
            Match::Src(c) => write!(f, "-s {c}"),
            Match::Dst { neg, net } => write!(f, "{}-d {net}", not(*neg)),
            Match::Dport { neg, port } => write!(f, "{}--dport {port}", not(*neg)),
            Match::Sport(p) => write!(f, "--sport {p}"),
            Match::Dports { neg, ports } => {
                write!(f, "-m multiport {}--dports ", not(*neg))?;
                for (i, p) in ports.iter().enumerate() {
                    if i > 0 {
                        f.write_char(',')?;
                    }
                    write!(f, "{p}")?;
                }
                Ok(())
            }
            Match::Owner { neg, owner } => match owner {
                Owner::Uid(u) => write!(f, "-m owner {}--uid-owner {u}", not(*neg)),
                Owner::Gid(g) => write!(f, "-m owner {}--gid-owner {g}", not(*neg)),
            },
            Match::CtState(s) => write!(f, "-m conntrack --ctstate {s}"),
            Match::Mark { neg, mark } => write!(f, "-m mark {}--mark {mark}", not(*neg)),
            Match::Connmark(m) => write!(f, "-m connmark --mark {m}"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Jump(c) => write!(f, "-j {c}"),
            Target::Return => f.write_str("-j RETURN"),
            Target::Accept => f.write_str("-j ACCEPT"),
            Target::Drop => f.write_str("-j DROP"),
            Target::Redirect { port, singular } => {
                let opt = if *singular { "--to-port" } else { "--to-ports" };
                write!(f, "-j REDIRECT {opt} {port}")
            }
            Target::Tproxy { mark, on_port } => {
                write!(
                    f,
                    "-j TPROXY --tproxy-mark {mark}/0xffffffff --on-port {on_port}"
                )
            }
            Target::SetMark(m) => write!(f, "-j MARK --set-mark {m}"),
            Target::ConnmarkSave => f.write_str("-j CONNMARK --save-mark"),
            Target::ConnmarkRestore => f.write_str("-j CONNMARK --restore-mark"),
            Target::CtZone(z) => write!(f, "-j CT --zone {z}"),
        }
    }
}

impl Rule {
    /// The rule's match and target part, as after `-A CHAIN`.
    pub fn spec(&self) -> String {
        let mut s = String::new();
        for m in &self.matches {
            let _ = write!(s, "{m} ");
        }
        let _ = write!(s, "{}", self.target);
        s
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.insert_at {
            Some(n) => write!(f, "-I {} {n} {}", self.chain, self.spec()),
            None => write!(f, "-A {} {}", self.chain, self.spec()),
        }
    }
}

impl fmt::Display for TableRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "* {}", self.table.name())?;
        for c in &self.new_chains {
            writeln!(f, "-N {c}")?;
        }
        for r in &self.rules {
            writeln!(f, "{r}")?;
        }
        writeln!(f, "COMMIT")
    }
}

impl fmt::Display for Ruleset {
    /// The complete `iptables-restore --noflush` input for this family.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tables {
            write!(f, "{t}")?;
        }
        Ok(())
    }
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
        let _ = write!(out, "{rs}");
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::cli::Defaults;
    use crate::config::tests::resolve;
    use crate::net::Family;
    use crate::ruleset::{Facts, build};

    #[test]
    fn default_sidecar_text() {
        let cfg = resolve(Defaults::Native, &[], &[]).unwrap();
        let text = build(&cfg, &Facts::default(), Family::V4).to_string();
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
            .map(|f| build(&cfg, &facts, *f).to_string())
            .collect();
        let b: Vec<String> = facts
            .families()
            .iter()
            .map(|f| build(&cfg, &facts, *f).to_string())
            .collect();
        assert_eq!(a, b);
    }
}
