//! The capture as Istio's native nftables mode writes it: three `inet` tables, base chains at
//! Istio's hooks and priorities, `istio-*` regular chains, `counter` on every rule, IPv4 and
//! IPv6 rules in the same chains, and each rule's statements in the order Istio's nftables
//! builder writes them (the kernel keeps that order, so `nft list ruleset` shows it).
//!
//! Pure: `group` resolves owner-group names (a lookup the caller provides).

use crate::capture::{Capture, Match, Owner, Proto, Rule, Table, Target, chain};
use crate::net::{Cidr, Family, Group, PortItem};
use crate::nft::{
    BaseChain, Chain, ChainType, CtStates, Dir, Hook, L4, Op, PortRange, Rule as NftRule, Stmt,
    Transaction, Verdict,
};

/// The tables of this backend, in the order they are created (and listed).
pub const TABLES: [Table; 3] = [Table::Nat, Table::Mangle, Table::Raw];

/// `istio-proxy-nat`, `istio-proxy-mangle`, `istio-proxy-raw`.
pub fn table_name(t: Table) -> String {
    format!("istio-proxy-{}", t.name())
}

/// Whether `name` is one of this backend's tables.
pub fn is_ours(name: &str) -> bool {
    TABLES.iter().any(|t| table_name(*t) == name)
}

/// `ISTIO_OUTPUT_DNS` → `istio-output-dns`; `PREROUTING` → `prerouting`.
pub fn chain_name(c: &str) -> String {
    c.to_ascii_lowercase().replace('_', "-")
}

/// The hook, type and priority of a built-in chain in each table (Istio's: the iptables
/// tables' hooks and priorities).
fn base(table: Table, chain: &str) -> Option<BaseChain> {
    let hook = match chain {
        chain::PREROUTING => Hook::Prerouting,
        chain::OUTPUT => Hook::Output,
        _ => return None,
    };
    let (kind, priority) = match (table, hook) {
        (Table::Nat, _) => (ChainType::Nat, -100),
        (Table::Mangle, Hook::Output) => (ChainType::Route, -150),
        (Table::Mangle, _) => (ChainType::Filter, -150),
        (Table::Raw, _) => (ChainType::Filter, -300),
    };
    Some(BaseChain {
        kind,
        hook,
        priority,
    })
}

/// The chains of each table in Istio's creation order: base chains first, then its regular
/// chains in a fixed order (any other last, in first-use order).
const CHAIN_ORDER: [&str; 10] = [
    chain::PREROUTING,
    chain::OUTPUT,
    chain::ISTIO_DIVERT,
    chain::ISTIO_TPROXY,
    chain::ISTIO_INBOUND,
    chain::ISTIO_REDIRECT,
    chain::ISTIO_IN_REDIRECT,
    chain::ISTIO_OUTPUT,
    chain::ISTIO_OUTPUT_DNS,
    chain::ISTIO_DROP,
];

/// The chains one table needs: those with rules and every jump target.
fn chains(capture: &Capture, table: Table) -> Vec<&'static str> {
    let mut used = crate::capture::chains_used(capture.rules.iter().filter(|r| r.table == table));
    let rank = |c: &&str| {
        CHAIN_ORDER
            .iter()
            .position(|o| o == c)
            .unwrap_or(usize::MAX)
    };
    used.sort_by_key(rank);
    used
}

/// An owner-group name that does not resolve (the caller checks names before this runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownGroup(pub String);

/// The whole install as one transaction: `delete` of each table in `replace` (present now),
/// then every table of the capture with its chains and rules (inserts resolved: each chain's
/// rules are appended in their final order).
pub fn transaction(
    capture: &Capture,
    replace: &[String],
    group: &dyn Fn(&str) -> Option<u32>,
) -> Result<Transaction, UnknownGroup> {
    let mut ops: Vec<Op> = replace.iter().cloned().map(Op::DeleteTable).collect();
    for table in TABLES {
        let chains = chains(capture, table);
        if chains.is_empty() {
            continue;
        }
        let tname = table_name(table);
        ops.push(Op::AddTable(tname.clone()));
        for c in &chains {
            ops.push(Op::AddChain(Chain {
                table: tname.clone(),
                name: chain_name(c),
                base: base(table, c),
            }));
        }
        for c in &chains {
            for r in capture.chain_rules(table, c) {
                ops.push(Op::AddRule(NftRule {
                    table: tname.clone(),
                    chain: chain_name(c),
                    stmts: statements(r, group)?,
                }));
            }
        }
    }
    Ok(Transaction { ops })
}

/// The transaction that removes every table of this backend (present or not).
pub fn removal() -> Transaction {
    Transaction {
        ops: TABLES
            .iter()
            .map(|t| Op::DeleteTable(table_name(*t)))
            .collect(),
    }
}

fn l4(p: Proto) -> L4 {
    match p {
        Proto::Tcp => L4::Tcp,
        Proto::Udp => L4::Udp,
    }
}

fn range(p: PortItem) -> PortRange {
    match p {
        PortItem::One(p) => PortRange::port(p.get()),
        PortItem::Range(a, b) => PortRange::range(a.get(), b.get()),
    }
}

fn net(c: Cidr) -> ipnet::IpNet {
    ipnet::IpNet::new(c.addr(), c.prefix_len()).unwrap_or_else(|_| unreachable!())
}

fn ct_states(s: &str) -> CtStates {
    let mut st = CtStates::default();
    for word in s.split(',') {
        match word {
            "INVALID" => st.invalid = true,
            "ESTABLISHED" => st.established = true,
            "RELATED" => st.related = true,
            _ => st.new = true,
        }
    }
    st
}

/// Where a match goes in Istio's nftables statement order: interface, protocol, conntrack
/// state, address, port, then the rest as written. Two kinds of rule differ: the DNS rules of
/// the raw table keep the iptables order (port before address), and the nat DNS redirects
/// put the nameserver's address first.
fn rank(rule: &Rule, m: &Match) -> u8 {
    let raw = rule.table == Table::Raw;
    let dns_redirect = rule.table == Table::Nat && rule.chain == chain::ISTIO_OUTPUT_DNS;
    match m {
        Match::InIface(_) | Match::OutIface(_) => 0,
        Match::Src(_) | Match::Dst { .. } if dns_redirect => 0,
        Match::Proto(_) => 1,
        _ if raw => 5,
        Match::CtState(_) => 2,
        Match::Src(_) | Match::Dst { .. } => 3,
        Match::Dport { .. } | Match::Sport(_) | Match::Dports { .. } => 4,
        _ => 5,
    }
}

/// One rule's statements: its matches in Istio's order, `counter`, then what it does.
pub fn statements(
    rule: &Rule,
    group: &dyn Fn(&str) -> Option<u32>,
) -> Result<Vec<Stmt>, UnknownGroup> {
    let proto = rule.matches.iter().find_map(|m| match m {
        Match::Proto(p) => Some(l4(*p)),
        _ => None,
    });
    let mut matches: Vec<&Match> = rule.matches.iter().collect();
    matches.sort_by_key(|m| rank(rule, m));
    let mut out = Vec::with_capacity(matches.len() + 3);
    // Istio's nftables mode drops only TCP packets in state INVALID.
    if proto.is_none() && matches!(rule.target, Target::Jump(chain::ISTIO_DROP)) {
        out.push(Stmt::L4Proto(L4::Tcp));
    }
    // A rule only one family needs, without an address to say so. A jump is left for both
    // (as Istio writes it): the other family finds no rule of its own in the target chain.
    let has_addr = matches
        .iter()
        .any(|m| matches!(m, Match::Src(_) | Match::Dst { .. }));
    let jump = matches!(rule.target, Target::Jump(_));
    if let (Some(f), false, false) = (rule.family, has_addr, jump) {
        out.push(Stmt::NfProto(f));
    }
    let port_proto = proto.unwrap_or(L4::Tcp);
    for m in matches {
        out.push(match_stmt(m, port_proto, group)?);
    }
    let counted = |action: Stmt| [Stmt::Counter, action];
    let action = match &rule.target {
        // Istio writes the TPROXY rule's counter after the mark, before the verdict.
        Target::Tproxy { mark, on_port } => vec![
            Stmt::Tproxy {
                family: rule.family.unwrap_or(Family::V4),
                port: on_port.get(),
            },
            Stmt::SetMark(mark.get()),
            Stmt::Counter,
            Stmt::Verdict(Verdict::Accept),
        ],
        Target::Jump(c) => counted(Stmt::Verdict(Verdict::Jump(chain_name(c)))).into(),
        Target::Return => counted(Stmt::Verdict(Verdict::Return)).into(),
        Target::Accept => counted(Stmt::Verdict(Verdict::Accept)).into(),
        Target::Drop => counted(Stmt::Verdict(Verdict::Drop)).into(),
        Target::Redirect { port, .. } => counted(Stmt::Redirect(port.get())).into(),
        Target::SetMark(m) => counted(Stmt::SetMark(*m)).into(),
        Target::ConnmarkSave => counted(Stmt::SetCtMarkFromMark).into(),
        Target::ConnmarkRestore => counted(Stmt::SetMarkFromCt).into(),
        Target::CtZone(z) => counted(Stmt::SetCtZone(*z)).into(),
    };
    out.extend(action);
    Ok(out)
}

/// One match as a statement; `port_proto` is the protocol a port match is written for (the
/// rule's, TCP when it has none).
fn match_stmt(
    m: &Match,
    port_proto: L4,
    group: &dyn Fn(&str) -> Option<u32>,
) -> Result<Stmt, UnknownGroup> {
    Ok(match m {
        Match::Proto(p) => Stmt::L4Proto(l4(*p)),
        Match::InIface(i) => Stmt::Iifname(i.as_str().to_owned()),
        Match::OutIface(i) => Stmt::Oifname(i.as_str().to_owned()),
        Match::Src(c) => Stmt::Addr {
            dir: Dir::Src,
            negate: false,
            net: net(*c),
        },
        Match::Dst { neg, net: c } => Stmt::Addr {
            dir: Dir::Dst,
            negate: *neg,
            net: net(*c),
        },
        Match::Dport { neg, port } => Stmt::Port {
            proto: port_proto,
            dir: Dir::Dst,
            negate: *neg,
            ports: vec![range(*port)],
        },
        Match::Sport(p) => Stmt::Port {
            proto: port_proto,
            dir: Dir::Src,
            negate: false,
            ports: vec![range(*p)],
        },
        Match::Dports { neg, ports } => Stmt::Port {
            proto: port_proto,
            dir: Dir::Dst,
            negate: *neg,
            ports: ports.iter().copied().map(range).collect(),
        },
        Match::Owner { neg, owner } => match owner {
            Owner::Uid(u) => Stmt::SkUid {
                negate: *neg,
                id: u.get(),
            },
            Owner::Gid(g) => Stmt::SkGid {
                negate: *neg,
                id: match g {
                    Group::Id(id) => id.get(),
                    Group::Name(n) => group(n).ok_or_else(|| UnknownGroup(n.clone()))?,
                },
            },
        },
        Match::CtState(s) => Stmt::CtState(ct_states(s)),
        Match::Mark { neg, mark } => Stmt::Mark {
            negate: *neg,
            value: *mark,
        },
        Match::Connmark(m) => Stmt::CtMark(*m),
    })
}

/// The nftables mode's [`Layout`](crate::trace::Layout): what `nft list ruleset` lists.
pub struct Layout<'a> {
    /// Resolves the group names of owner matches.
    pub group: &'a dyn Fn(&str) -> Option<u32>,
}

impl std::fmt::Debug for Layout<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("nftables::Layout")
    }
}

impl crate::trace::Layout for Layout<'_> {
    fn table(&self, table: Table) -> String {
        format!("inet {}", table_name(table))
    }

    fn chain(&self, chain: &str) -> String {
        chain_name(chain)
    }

    fn rule(&self, rule: &Rule) -> String {
        match statements(rule, self.group) {
            Ok(stmts) => crate::nft::render_stmts(&stmts),
            Err(UnknownGroup(g)) => format!("(owner group {g:?} does not resolve)"),
        }
    }

    fn condition(&self, rule: &Rule, m: &Match) -> String {
        let proto = rule.matches.iter().find_map(|m| match m {
            Match::Proto(p) => Some(l4(*p)),
            _ => None,
        });
        match match_stmt(m, proto.unwrap_or(L4::Tcp), self.group) {
            Ok(stmt) => crate::nft::render_stmt(&stmt),
            Err(UnknownGroup(g)) => format!("skgid {g}"),
        }
    }
}
