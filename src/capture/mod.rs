//! The capture: Istio's sidecar redirection as one backend-neutral, typed model.
//!
//! Pure. [`build`] turns a [`Config`] and the namespace's [`Facts`] into a [`Capture`]: every
//! rule of every table in Istio's emission order (the 19 steps of its `istio-iptables` capture
//! code, numbered in `capture/build.rs`), with typed matches and targets.
//! A rule carries an IP family only where it involves an address; the others apply to both.
//! Each backend renders from this model: the iptables backend projects it per family
//! ([`Capture::family`], one `iptables-restore` input each), the nftables backend into inet
//! tables that hold both families. Explain, trace and validation read the same model, so they
//! cannot drift from what a backend writes.

mod build;

use std::net::IpAddr;

pub use build::{DNS_PORT, build};

use crate::net::{Cidr, Family, Group, Id, Iface, Mark, Port, PortItem};
use crate::settings::config::Config;

/// Facts about the target network namespace that shape the ruleset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// Whether IPv6 rules are programmed.
    pub ipv6: bool,
    /// Nameservers from resolv.conf (only read when DNS capture needs them).
    pub dns_servers: Vec<IpAddr>,
}

impl Facts {
    pub fn dns_servers_of(&self, family: Family) -> impl Iterator<Item = IpAddr> + '_ {
        self.dns_servers
            .iter()
            .copied()
            .filter(move |a| Family::of(a) == family)
    }

    /// The families to program: IPv4 always (as Istio does), IPv6 when enabled.
    pub fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }
}

/// Whether DNS capture is in effect: requested, and either capture-all or at least one server
/// known (otherwise Istio disables it with a warning, and so do we).
pub fn dns_capture(cfg: &Config, facts: &Facts) -> bool {
    cfg.redirect_dns && (cfg.capture_all_dns || !facts.dns_servers.is_empty())
}

/// A table by its role: `nat` redirects, `mangle` marks (TPROXY, drop-invalid), `raw` sets
/// conntrack zones (DNS). The order of the variants is the order tables are rendered in
/// (alphabetical, as istio-iptables renders them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Mangle,
    Nat,
    Raw,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Mangle, Table::Nat, Table::Raw];

    /// The iptables table name (also the role in the nftables table names).
    pub fn name(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }
}

/// Chain names. Istio's own chains all start with `ISTIO_`.
pub mod chain {
    pub const PREROUTING: &str = "PREROUTING";
    pub const OUTPUT: &str = "OUTPUT";
    pub const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
    pub const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
    pub const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
    pub const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
    pub const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
    pub const ISTIO_DIVERT: &str = "ISTIO_DIVERT";
    pub const ISTIO_TPROXY: &str = "ISTIO_TPROXY";
    pub const ISTIO_DROP: &str = "ISTIO_DROP";

    /// Every chain istio-init may create, for cleanup and drift checks.
    pub const ISTIO_CHAINS: [&str; 8] = [
        ISTIO_INBOUND,
        ISTIO_OUTPUT,
        ISTIO_OUTPUT_DNS,
        ISTIO_REDIRECT,
        ISTIO_IN_REDIRECT,
        ISTIO_DIVERT,
        ISTIO_TPROXY,
        ISTIO_DROP,
    ];

    /// Names that are never declared with `-N` (built-in chains and verdicts).
    pub fn is_builtin(name: &str) -> bool {
        matches!(
            name,
            "INPUT"
                | "OUTPUT"
                | "FORWARD"
                | "PREROUTING"
                | "POSTROUTING"
                | "ACCEPT"
                | "RETURN"
                | "DROP"
        )
    }
}

/// The transport protocol of a `-p` match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Whose socket sent a packet (`-m owner`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    Uid(Id),
    Gid(Group),
}

/// One match of a rule. `neg` renders as a leading `!`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    Proto(Proto),
    InIface(Iface),
    OutIface(Iface),
    Src(Cidr),
    Dst {
        neg: bool,
        net: Cidr,
    },
    Dport {
        neg: bool,
        port: PortItem,
    },
    Sport(PortItem),
    /// `-m multiport [!] --dports a,b` (at most 15 ports; Istio only ever uses two).
    Dports {
        neg: bool,
        ports: Vec<PortItem>,
    },
    Owner {
        neg: bool,
        owner: Owner,
    },
    /// `-m conntrack --ctstate <states>`.
    CtState(&'static str),
    /// `-m mark [!] --mark <mark>`.
    Mark {
        neg: bool,
        mark: u32,
    },
    /// `-m connmark --mark <mark>`.
    Connmark(u32),
}

/// What a rule does with a matching packet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `-j <chain>` to a user chain.
    Jump(&'static str),
    Return,
    Accept,
    Drop,
    /// `-j REDIRECT --to-ports P` (`--to-port` when `singular`, as Istio writes the UDP DNS rule).
    Redirect {
        port: Port,
        singular: bool,
    },
    /// `-j TPROXY --tproxy-mark M/0xffffffff --on-port P`.
    Tproxy {
        mark: Mark,
        on_port: Port,
    },
    /// `-j MARK --set-mark M`.
    SetMark(u32),
    ConnmarkSave,
    ConnmarkRestore,
    /// `-j CT --zone Z`.
    CtZone(u16),
}

impl Target {
    /// The user chain this target jumps to, if any.
    pub fn jump_chain(&self) -> Option<&'static str> {
        match self {
            Target::Jump(c) => Some(c),
            _ => None,
        }
    }
}

/// One rule: appended to its chain, or inserted at a 1-based position.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The family whose packets the rule is for: set exactly when a match involves an
    /// address; `None` applies to both.
    pub family: Option<Family>,
    pub table: Table,
    pub chain: &'static str,
    /// `Some(n)`: inserted at position `n` of the chain as built so far (applied in order, so
    /// positions are relative to the chain at that moment); `None`: appended.
    pub insert_at: Option<u32>,
    pub matches: Vec<Match>,
    pub target: Target,
}

impl Rule {
    /// Whether the rule is programmed for `family`.
    pub fn is_for(&self, family: Family) -> bool {
        self.family.is_none_or(|f| f == family)
    }
}

/// The whole capture: every rule of every table and family, in Istio's emission order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capture {
    /// The families programmed: IPv4 always (as Istio does), IPv6 when enabled.
    pub families: Vec<Family>,
    pub rules: Vec<Rule>,
}

impl Capture {
    /// The capture as one family sees it (the iptables backend's unit: one restore each).
    pub fn family(&self, family: Family) -> Ruleset {
        let mut tables = Vec::new();
        for table in Table::ALL {
            let rules: Vec<Rule> = self
                .rules
                .iter()
                .filter(|r| r.table == table && r.is_for(family))
                .cloned()
                .collect();
            if rules.is_empty() {
                continue;
            }
            let new_chains = chains_of(&rules);
            tables.push(TableRules {
                table,
                new_chains,
                rules,
            });
        }
        Ruleset { family, tables }
    }

    /// [`Capture::family`] for every programmed family, in order.
    pub fn rulesets(&self) -> Vec<Ruleset> {
        self.families.iter().map(|f| self.family(*f)).collect()
    }

    /// The rules of one chain in the order the kernel holds them once all of them are applied
    /// to an empty chain (inserts resolved), for both families: positions count every rule
    /// before them, whatever its family, as one inet chain holds them.
    pub fn chain_rules(&self, table: Table, chain: &str) -> Vec<&Rule> {
        resolve_inserts(self.rules.iter().filter(|r| r.table == table))
            .into_iter()
            .filter(|r| r.chain == chain)
            .collect()
    }
}

/// Applies a sequence of appends and inserts (positions clamped to the chain's length, as
/// an insert past the end appends) and returns the rules in their final order per chain.
fn resolve_inserts<'a>(rules: impl Iterator<Item = &'a Rule>) -> Vec<&'a Rule> {
    let mut out: Vec<&Rule> = Vec::new();
    for r in rules {
        match r.insert_at {
            None => out.push(r),
            Some(n) => {
                // The position among the rules of the same chain.
                let at = (n as usize).saturating_sub(1);
                let idx = out
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| x.chain == r.chain)
                    .map(|(i, _)| i)
                    .nth(at)
                    .unwrap_or(out.len());
                out.insert(idx, r);
            }
        }
    }
    out
}

/// Every chain `rules` use, built-in ones included: the chains rules are in, in order of first
/// appearance, then the jump targets not among them. The one derivation of a table's chains:
/// the iptables mode declares the user chains of it, its scratch copies take all of it, and
/// the nftables mode creates all of it.
pub fn chains_used<'r>(rules: impl IntoIterator<Item = &'r Rule> + Clone) -> Vec<&'static str> {
    let mut used: Vec<&'static str> = Vec::new();
    for c in rules.clone().into_iter().map(|r| r.chain) {
        if !used.contains(&c) {
            used.push(c);
        }
    }
    for c in rules.into_iter().filter_map(|r| r.target.jump_chain()) {
        if !used.contains(&c) {
            used.push(c);
        }
    }
    used
}

/// The user chains (not built-in) `rules` use, in [`chains_used`] order.
fn chains_of(rules: &[Rule]) -> Vec<&'static str> {
    let mut used = chains_used(rules);
    used.retain(|c| !chain::is_builtin(c));
    used
}

/// The rules of one table for one family: the chains it declares (in declaration order) and
/// its rules in emission order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    pub table: Table,
    pub new_chains: Vec<&'static str>,
    pub rules: Vec<Rule>,
}

/// The capture of one IP family ([`Capture::family`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub family: Family,
    /// Non-empty tables only, in render order.
    pub tables: Vec<TableRules>,
}

impl Ruleset {
    pub fn rule_count(&self) -> usize {
        self.tables.iter().map(|t| t.rules.len()).sum()
    }

    pub fn chain_count(&self) -> usize {
        self.tables.iter().map(|t| t.new_chains.len()).sum()
    }

    pub fn table(&self, table: Table) -> Option<&TableRules> {
        self.tables.iter().find(|t| t.table == table)
    }

    /// The rules of one chain in the order the kernel holds them after the whole ruleset is
    /// applied to an empty chain (inserts resolved).
    pub fn chain_rules(&self, table: Table, chain: &str) -> Vec<&Rule> {
        match self.table(table) {
            Some(t) => resolve_inserts(t.rules.iter())
                .into_iter()
                .filter(|r| r.chain == chain)
                .collect(),
            None => Vec::new(),
        }
    }
}
