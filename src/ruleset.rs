//! Builds Istio's sidecar ruleset as typed data: tables → chains → rules, for one IP family.
//!
//! Pure. The rules, their conditions and their order follow istio-iptables (see
//! `istio-iptables-behaviour.md` §4 and §5 in the shared docs); the step numbers in the comments
//! refer to that section. Each rule holds typed matches and a typed target, so rendering
//! (`restore.rs`) and the trace walker can never disagree about what a rule means.

use std::net::IpAddr;

use crate::config::{Config, InboundPorts, Interception, OutboundCidrs, OwnerGroups};
use crate::net::{Cidr, Family, Group, Id, Iface, Mark, Port, PortItem};

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

/// A netfilter table. The order of the variants is the order tables are rendered in
/// (alphabetical, as istio-iptables renders them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Mangle,
    Nat,
    Raw,
}

impl Table {
    pub const ALL: [Table; 4] = [Table::Filter, Table::Mangle, Table::Nat, Table::Raw];

    pub fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
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
    pub table: Table,
    pub chain: &'static str,
    /// `Some(n)`: `-I chain n` (applied in order, so positions are relative to the chain at
    /// that moment); `None`: `-A chain`.
    pub insert_at: Option<u32>,
    pub matches: Vec<Match>,
    pub target: Target,
}

/// The rules of one table: the chains it declares (in declaration order) and its rules in
/// emission order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    pub table: Table,
    pub new_chains: Vec<&'static str>,
    pub rules: Vec<Rule>,
}

/// The ruleset of one IP family.
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
        let mut out: Vec<&Rule> = Vec::new();
        if let Some(t) = self.table(table) {
            for r in t.rules.iter().filter(|r| r.chain == chain) {
                match r.insert_at {
                    None => out.push(r),
                    Some(n) => {
                        let at = (n as usize).saturating_sub(1).min(out.len());
                        out.insert(at, r);
                    }
                }
            }
        }
        out
    }
}

/// Collects rules in emission order for one family.
struct Builder {
    family: Family,
    rules: Vec<Rule>,
}

impl Builder {
    fn append(&mut self, table: Table, chain: &'static str, matches: Vec<Match>, target: Target) {
        self.rules.push(Rule {
            table,
            chain,
            insert_at: None,
            matches,
            target,
        });
    }

    fn insert(
        &mut self,
        table: Table,
        chain: &'static str,
        at: u32,
        matches: Vec<Match>,
        target: Target,
    ) {
        self.rules.push(Rule {
            table,
            chain,
            insert_at: Some(at),
            matches,
            target,
        });
    }

    /// Groups the rules by table and derives the `-N` declarations the way istio-iptables
    /// does: first every non-built-in chain that holds a rule, in first-use order, then every
    /// jump target that holds none.
    fn finish(self) -> Ruleset {
        let mut tables = Vec::new();
        for table in Table::ALL {
            let rules: Vec<Rule> = self
                .rules
                .iter()
                .filter(|r| r.table == table)
                .cloned()
                .collect();
            if rules.is_empty() {
                continue;
            }
            let mut new_chains: Vec<&'static str> = Vec::new();
            for r in &rules {
                if !chain::is_builtin(r.chain) && !new_chains.contains(&r.chain) {
                    new_chains.push(r.chain);
                }
            }
            for r in &rules {
                if let Some(target) = r.target.jump_chain() {
                    if !chain::is_builtin(target) && !new_chains.contains(&target) {
                        new_chains.push(target);
                    }
                }
            }
            tables.push(TableRules {
                table,
                new_chains,
                rules,
            });
        }
        Ruleset {
            family: self.family,
            tables,
        }
    }
}

/// The agent's DNS listener.
pub const DNS_PORT: Port = Port::fixed(15053);
const PORT_53: PortItem = PortItem::One(Port::fixed(53));
const PORT_15053: PortItem = PortItem::One(Port::fixed(15053));

fn v4_or_v6(family: Family, v4: Cidr, v6: &str) -> Cidr {
    match family {
        Family::V4 => v4,
        Family::V6 => v6.parse().unwrap_or(v4),
    }
}

/// Builds the ruleset for one family. IPv6 rules are only built when asked for; callers use
/// [`Facts::families`].
pub fn build(cfg: &Config, facts: &Facts, family: Family) -> Ruleset {
    use Match::*;
    use Table::*;
    use chain::*;

    let mut b = Builder {
        family,
        rules: Vec::new(),
    };
    let lo: Iface = "lo".parse().unwrap_or_else(|_| unreachable!());
    let loopback = v4_or_v6(family, cfg.loopback_cidr, "::1/128");
    let passthrough_v4: Cidr = "127.0.0.6/32".parse().unwrap_or(cfg.loopback_cidr);
    let passthrough = v4_or_v6(family, passthrough_v4, "::6/128");
    let tproxy = cfg.interception == Interception::Tproxy;
    let dns = dns_capture(cfg, facts);
    let tcp = || Proto(self::Proto::Tcp);
    let udp = || Proto(self::Proto::Udp);
    let dport = |p: PortItem| Dport {
        neg: false,
        port: p,
    };
    let tun = PortItem::One(cfg.inbound_tunnel_port);
    let gid = |neg: bool, g: Group| Owner {
        neg,
        owner: self::Owner::Gid(g),
    };

    // Step 1: excluded interfaces bypass everything (nat, and mangle in TPROXY mode).
    for x in &cfg.exclude_interfaces {
        b.append(Nat, PREROUTING, vec![InIface(x.clone())], Target::Return);
        b.append(Nat, OUTPUT, vec![OutIface(x.clone())], Target::Return);
    }
    if tproxy {
        for x in &cfg.exclude_interfaces {
            b.append(Mangle, PREROUTING, vec![InIface(x.clone())], Target::Return);
            b.append(Mangle, OUTPUT, vec![OutIface(x.clone())], Target::Return);
        }
    }

    // Step 2: inbound traffic on rerouted virtual interfaces is not captured as inbound.
    for v in &cfg.virt_interfaces {
        b.insert(Nat, PREROUTING, 1, vec![InIface(v.clone())], Target::Return);
    }

    // Step 3: drop conntrack-INVALID packets instead of letting them reset connections.
    if cfg.drop_invalid {
        b.append(
            Mangle,
            PREROUTING,
            vec![CtState("INVALID")],
            Target::Jump(ISTIO_DROP),
        );
        b.append(Mangle, ISTIO_DROP, vec![], Target::Drop);
    }

    // Step 4: the HBONE tunnel port is never captured inbound.
    b.append(Nat, ISTIO_INBOUND, vec![tcp(), dport(tun)], Target::Return);

    // Steps 5 and 6: the two redirect chains.
    let redirect = |port| Target::Redirect {
        port,
        singular: false,
    };
    b.append(Nat, ISTIO_REDIRECT, vec![tcp()], redirect(cfg.proxy_port));
    b.append(
        Nat,
        ISTIO_IN_REDIRECT,
        vec![tcp()],
        redirect(cfg.inbound_capture_port),
    );

    // Step 7: inbound capture.
    if !cfg.inbound_ports.is_empty() {
        let t = if tproxy { Mangle } else { Nat };
        if tproxy {
            b.append(
                Mangle,
                ISTIO_DIVERT,
                vec![],
                Target::SetMark(cfg.tproxy_mark.get()),
            );
            b.append(Mangle, ISTIO_DIVERT, vec![], Target::Accept);
            b.append(
                Mangle,
                ISTIO_TPROXY,
                vec![
                    Dst {
                        neg: true,
                        net: loopback,
                    },
                    tcp(),
                ],
                Target::Tproxy {
                    mark: cfg.tproxy_mark,
                    on_port: cfg.inbound_capture_port,
                },
            );
        }
        b.append(t, PREROUTING, vec![tcp()], Target::Jump(ISTIO_INBOUND));
        match &cfg.inbound_ports {
            InboundPorts::All => {
                for p in &cfg.inbound_exclude_ports {
                    b.append(t, ISTIO_INBOUND, vec![tcp(), dport(*p)], Target::Return);
                }
                if tproxy {
                    let est = CtState("RELATED,ESTABLISHED");
                    b.append(
                        Mangle,
                        ISTIO_INBOUND,
                        vec![tcp(), est],
                        Target::Jump(ISTIO_DIVERT),
                    );
                    b.append(
                        Mangle,
                        ISTIO_INBOUND,
                        vec![tcp()],
                        Target::Jump(ISTIO_TPROXY),
                    );
                } else {
                    b.append(
                        Nat,
                        ISTIO_INBOUND,
                        vec![tcp()],
                        Target::Jump(ISTIO_IN_REDIRECT),
                    );
                }
            }
            InboundPorts::Only(ports) => {
                for p in ports {
                    if tproxy {
                        let est = CtState("RELATED,ESTABLISHED");
                        b.append(
                            Mangle,
                            ISTIO_INBOUND,
                            vec![tcp(), dport(*p), est],
                            Target::Jump(ISTIO_DIVERT),
                        );
                        b.append(
                            Mangle,
                            ISTIO_INBOUND,
                            vec![tcp(), dport(*p)],
                            Target::Jump(ISTIO_TPROXY),
                        );
                    } else {
                        b.append(
                            Nat,
                            ISTIO_INBOUND,
                            vec![tcp(), dport(*p)],
                            Target::Jump(ISTIO_IN_REDIRECT),
                        );
                    }
                }
            }
        }
    }

    // Step 8: all outbound traffic enters ISTIO_OUTPUT (UDP is filtered inside).
    b.append(Nat, OUTPUT, vec![], Target::Jump(ISTIO_OUTPUT));

    // Step 9: outbound port exclusions, TCP and UDP.
    for p in &cfg.outbound_ports_exclude {
        b.append(Nat, ISTIO_OUTPUT, vec![tcp(), dport(*p)], Target::Return);
        b.append(Nat, ISTIO_OUTPUT, vec![udp(), dport(*p)], Target::Return);
    }

    // Step 10: the proxy's inbound passthrough source (127.0.0.6 / ::6) is never captured.
    b.append(
        Nat,
        ISTIO_OUTPUT,
        vec![OutIface(lo.clone()), Src(passthrough)],
        Target::Return,
    );

    // Steps 11 and 12: the proxy's own traffic.
    let include_has_loopback = match &cfg.outbound_include {
        OutboundCidrs::All => false,
        OutboundCidrs::Only(v) => v.iter().any(|c| c.is_loopback()),
    };
    let not_loopback = Dst {
        neg: true,
        net: loopback,
    };
    let owners: Vec<(self::Owner, bool)> = cfg
        .proxy_uids
        .iter()
        .map(|u| (self::Owner::Uid(*u), true))
        .chain(
            cfg.proxy_gids
                .iter()
                .map(|g| (self::Owner::Gid(Group::Id(*g)), false)),
        )
        .collect();
    for (owner, is_uid) in &owners {
        let who = |neg| Owner {
            neg,
            owner: owner.clone(),
        };
        // a: the proxy talking to the pod's own address over lo goes through inbound capture.
        let skip_ports = if dns && *is_uid {
            Dports {
                neg: true,
                ports: vec![PORT_53, tun],
            }
        } else {
            Dport {
                neg: true,
                port: tun,
            }
        };
        b.append(
            Nat,
            ISTIO_OUTPUT,
            vec![
                OutIface(lo.clone()),
                not_loopback.clone(),
                tcp(),
                skip_ports,
                who(false),
            ],
            Target::Jump(ISTIO_IN_REDIRECT),
        );
        // b: app-to-app traffic over lo is left alone (unless loopback is explicitly captured).
        if !include_has_loopback {
            let m = if dns {
                vec![
                    OutIface(lo.clone()),
                    tcp(),
                    Dport {
                        neg: true,
                        port: PORT_53,
                    },
                    who(true),
                ]
            } else {
                vec![OutIface(lo.clone()), who(true)]
            };
            b.append(Nat, ISTIO_OUTPUT, m, Target::Return);
        }
        // c: never loop the proxy's own traffic back to it.
        b.append(Nat, ISTIO_OUTPUT, vec![who(false)], Target::Return);
    }

    // Step 13: owner-group filter.
    match &cfg.owner_groups {
        OwnerGroups::AllExcept(groups) => {
            for g in groups {
                b.append(
                    Nat,
                    ISTIO_OUTPUT,
                    vec![gid(false, g.clone())],
                    Target::Return,
                );
            }
        }
        OwnerGroups::Only(groups) => {
            let m = groups.iter().map(|g| gid(true, g.clone())).collect();
            b.append(Nat, ISTIO_OUTPUT, m, Target::Return);
        }
    }

    // Step 14: DNS capture.
    if dns {
        build_dns(&mut b, cfg, facts);
    }

    // Step 15: loopback destinations are never captured.
    b.append(
        Nat,
        ISTIO_OUTPUT,
        vec![Dst {
            neg: false,
            net: loopback,
        }],
        Target::Return,
    );

    // Step 16: outbound CIDR exclusions of this family.
    for c in cfg.outbound_exclude.iter().filter(|c| c.family() == family) {
        b.append(
            Nat,
            ISTIO_OUTPUT,
            vec![Dst {
                neg: false,
                net: *c,
            }],
            Target::Return,
        );
    }

    // Step 17: outbound ports always captured.
    for p in &cfg.outbound_ports_include {
        b.append(
            Nat,
            ISTIO_OUTPUT,
            vec![tcp(), dport(*p)],
            Target::Jump(ISTIO_REDIRECT),
        );
    }

    // Step 18: outbound CIDR inclusions of this family.
    match &cfg.outbound_include {
        OutboundCidrs::All => {
            b.append(Nat, ISTIO_OUTPUT, vec![], Target::Jump(ISTIO_REDIRECT));
            for v in &cfg.virt_interfaces {
                b.insert(
                    Nat,
                    PREROUTING,
                    1,
                    vec![InIface(v.clone())],
                    Target::Jump(ISTIO_REDIRECT),
                );
            }
        }
        OutboundCidrs::Only(_) => {
            for c in cfg.outbound_include.of(family) {
                for v in &cfg.virt_interfaces {
                    b.insert(
                        Nat,
                        PREROUTING,
                        1,
                        vec![InIface(v.clone()), Dst { neg: false, net: c }],
                        Target::Jump(ISTIO_REDIRECT),
                    );
                }
                b.append(
                    Nat,
                    ISTIO_OUTPUT,
                    vec![Dst { neg: false, net: c }],
                    Target::Jump(ISTIO_REDIRECT),
                );
            }
        }
    }

    // Step 19: TPROXY marks and connmarks (whenever the mode is TPROXY).
    if tproxy {
        let mark = cfg.tproxy_mark.get();
        let plain = |neg| Mark { neg, mark };
        b.append(
            Mangle,
            PREROUTING,
            vec![tcp(), plain(false)],
            Target::ConnmarkSave,
        );
        b.append(
            Mangle,
            OUTPUT,
            vec![tcp(), OutIface(lo.clone()), plain(false)],
            Target::Return,
        );
        for (owner, _) in &owners {
            b.append(
                Mangle,
                OUTPUT,
                vec![
                    not_loopback.clone(),
                    tcp(),
                    OutIface(lo.clone()),
                    Owner {
                        neg: false,
                        owner: owner.clone(),
                    },
                ],
                Target::SetMark(crate::net::Mark::OUTBOUND.get()),
            );
        }
        b.append(
            Mangle,
            OUTPUT,
            vec![tcp(), Connmark(mark)],
            Target::ConnmarkRestore,
        );
        b.insert(
            Mangle,
            ISTIO_INBOUND,
            1,
            vec![tcp(), plain(false)],
            Target::Return,
        );
        b.insert(
            Mangle,
            ISTIO_INBOUND,
            2,
            vec![tcp(), Src(passthrough), InIface(lo.clone())],
            Target::Return,
        );
        b.insert(
            Mangle,
            ISTIO_INBOUND,
            3,
            vec![
                tcp(),
                InIface(lo),
                Mark {
                    neg: true,
                    mark: crate::net::Mark::OUTBOUND.get(),
                },
            ],
            Target::Return,
        );
    }

    b.finish()
}

/// Step 14: redirect DNS to the agent and split its UDP conntrack into two zones.
fn build_dns(b: &mut Builder, cfg: &Config, facts: &Facts) {
    use Match::*;
    use Table::*;
    use chain::*;

    let family = b.family;
    let servers: Vec<Cidr> = facts.dns_servers_of(family).map(Cidr::host).collect();
    let all = cfg.capture_all_dns;
    let tcp = || Proto(self::Proto::Tcp);
    let udp = || Proto(self::Proto::Udp);
    let dport53 = || Dport {
        neg: false,
        port: PORT_53,
    };
    let to_agent = |singular| Target::Redirect {
        port: DNS_PORT,
        singular,
    };

    b.append(Raw, OUTPUT, vec![], Target::Jump(ISTIO_OUTPUT_DNS));
    if all || !servers.is_empty() {
        b.append(Nat, ISTIO_OUTPUT, vec![], Target::Jump(ISTIO_OUTPUT_DNS));
    }
    for (proto, singular) in [(tcp(), false), (udp(), true)] {
        if all {
            b.append(
                Nat,
                ISTIO_OUTPUT_DNS,
                vec![proto.clone(), dport53()],
                to_agent(singular),
            );
        } else {
            for s in &servers {
                b.append(
                    Nat,
                    ISTIO_OUTPUT_DNS,
                    vec![
                        proto.clone(),
                        dport53(),
                        Dst {
                            neg: false,
                            net: *s,
                        },
                    ],
                    to_agent(singular),
                );
            }
        }
    }

    // Conntrack zones: 1 = proxy <-> upstream resolver, 2 = app <-> agent.
    let owners = cfg.proxy_uids.iter().map(|u| self::Owner::Uid(*u)).chain(
        cfg.proxy_gids
            .iter()
            .map(|g| self::Owner::Gid(Group::Id(*g))),
    );
    for owner in owners {
        let who = Owner { neg: false, owner };
        b.append(
            Raw,
            ISTIO_OUTPUT_DNS,
            vec![udp(), dport53(), who.clone()],
            Target::CtZone(1),
        );
        b.append(
            Raw,
            ISTIO_OUTPUT_DNS,
            vec![udp(), Sport(PORT_15053), who],
            Target::CtZone(2),
        );
    }
    if all {
        b.append(Raw, PREROUTING, vec![], Target::Jump(ISTIO_INBOUND));
        b.append(
            Raw,
            ISTIO_OUTPUT_DNS,
            vec![udp(), dport53()],
            Target::CtZone(2),
        );
        b.append(
            Raw,
            ISTIO_INBOUND,
            vec![udp(), Sport(PORT_53)],
            Target::CtZone(1),
        );
    } else if !servers.is_empty() {
        b.append(Raw, PREROUTING, vec![], Target::Jump(ISTIO_INBOUND));
        for s in &servers {
            b.append(
                Raw,
                ISTIO_OUTPUT_DNS,
                vec![
                    udp(),
                    dport53(),
                    Dst {
                        neg: false,
                        net: *s,
                    },
                ],
                Target::CtZone(2),
            );
            b.append(
                Raw,
                ISTIO_INBOUND,
                vec![udp(), Sport(PORT_53), Src(*s)],
                Target::CtZone(1),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Defaults;
    use crate::config::tests::resolve;

    fn default_v4() -> Ruleset {
        let cfg = resolve(Defaults::Native, &[], &[]).unwrap();
        build(&cfg, &Facts::default(), Family::V4)
    }

    #[test]
    fn every_jump_target_is_declared_once() {
        for args in [
            &[][..],
            &[
                "-m",
                "TPROXY",
                "--redirect-dns",
                "--drop-invalid",
                "-k",
                "eth1",
                "-c",
                "eth9",
            ],
        ] {
            let cfg = resolve(Defaults::Native, args, &[]).unwrap();
            let facts = Facts {
                ipv6: true,
                dns_servers: vec!["10.0.0.10".parse().unwrap(), "fd00::a".parse().unwrap()],
            };
            for family in facts.families() {
                let rs = build(&cfg, &facts, family);
                for t in &rs.tables {
                    let mut seen = std::collections::BTreeSet::new();
                    for c in &t.new_chains {
                        assert!(seen.insert(*c), "{c} declared twice in {:?}", t.table);
                    }
                    for r in &t.rules {
                        if let Some(j) = r.target.jump_chain() {
                            assert!(t.new_chains.contains(&j), "{j} not declared");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn default_sidecar_shape() {
        let rs = default_v4();
        assert_eq!(rs.tables.len(), 1);
        let nat = rs.table(Table::Nat).unwrap();
        assert_eq!(
            nat.new_chains,
            [
                "ISTIO_INBOUND",
                "ISTIO_REDIRECT",
                "ISTIO_IN_REDIRECT",
                "ISTIO_OUTPUT"
            ]
        );
        let inbound = rs.chain_rules(Table::Nat, chain::ISTIO_INBOUND);
        assert_eq!(inbound.len(), 5); // tunnel, 3 excludes, redirect
        assert_eq!(inbound[4].target, Target::Jump(chain::ISTIO_IN_REDIRECT));
    }

    #[test]
    fn inserts_resolve_to_kernel_order() {
        let cfg = resolve(Defaults::Native, &["-k", "eth1,eth2"], &[]).unwrap();
        let rs = build(&cfg, &Facts::default(), Family::V4);
        let pre = rs.chain_rules(Table::Nat, chain::PREROUTING);
        // The REDIRECT jumps were inserted last, so they come first; last interface first.
        let desc: Vec<String> = pre
            .iter()
            .map(|r| format!("{:?} {:?}", r.matches, r.target))
            .collect();
        assert!(
            desc[0].contains("eth2") && desc[0].contains("ISTIO_REDIRECT"),
            "{desc:?}"
        );
        assert!(
            desc[1].contains("eth1") && desc[1].contains("ISTIO_REDIRECT"),
            "{desc:?}"
        );
        assert!(
            desc[2].contains("eth2") && desc[2].contains("Return"),
            "{desc:?}"
        );
    }

    #[test]
    fn ipv6_rules_use_ipv6_addresses_only() {
        let cfg = resolve(
            Defaults::Native,
            &[
                "-i",
                "10.0.0.0/8,2001:db8::/32",
                "-x",
                "10.1.0.0/16,2001:db8:1::/48",
                "-m",
                "TPROXY",
            ],
            &[],
        )
        .unwrap();
        let facts = Facts {
            ipv6: true,
            dns_servers: vec![],
        };
        for family in Family::ALL {
            let rs = build(&cfg, &facts, family);
            for t in &rs.tables {
                for r in &t.rules {
                    for m in &r.matches {
                        if let Match::Src(c) | Match::Dst { net: c, .. } = m {
                            assert_eq!(c.family(), family, "{r:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dns_disabled_without_servers() {
        let cfg = resolve(Defaults::Native, &["--redirect-dns"], &[]).unwrap();
        assert!(!dns_capture(&cfg, &Facts::default()));
        let rs = build(&cfg, &Facts::default(), Family::V4);
        assert!(rs.table(Table::Raw).is_none());
    }
}
