//! nf_tables transactions as data: the tables, chains and rule statements of the native
//! nftables backend, the dependencies `nft` adds to a rule on its own, and the `nft -f` text of
//! a transaction.
//!
//! Pure: nothing here touches the system. `netlink::nftables` encodes a [`Transaction`] into one
//! netlink batch exactly as `nft` encodes the text [`render`] gives, so both leave the same
//! kernel state (`nft list ruleset` and `nft --debug=netlink list ruleset` alike). Every table is
//! of family `inet`: one table holds the IPv4 and IPv6 rules; address matches name `ip` or
//! `ip6`.

use std::fmt::Write as _;

use ipnet::IpNet;

pub use crate::net::Family;

/// The family of every table of this backend.
pub const TABLE_FAMILY: &str = "inet";

/// Ordered operations applied as one kernel transaction (all or nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction {
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Deletes `inet NAME` with its chains, rules and sets if it exists; nothing otherwise.
    /// Written (and encoded) as nft 1.0.x needs it: `add table` then `delete table`.
    DeleteTable(String),
    /// `add table inet NAME`: creates the table, or leaves an existing one as it is.
    AddTable(String),
    /// `add chain inet TABLE NAME [{ type … hook … priority … ; }]`.
    AddChain(Chain),
    /// `add rule inet TABLE CHAIN STATEMENTS`: appended to the chain.
    AddRule(Rule),
    /// `delete rule FAMILY TABLE CHAIN handle N`, in another program's table (iptables-nft's:
    /// family `ip` or `ip6`): `--reconcile` removing the iptables mode's rules.
    DeleteRule(ChainRef, u64),
    /// `flush chain FAMILY TABLE CHAIN`: deletes every rule of the chain.
    FlushChain(ChainRef),
    /// `delete chain FAMILY TABLE CHAIN` (empty and no longer jumped to, by then).
    DeleteChain(ChainRef),
}

/// A chain of an iptables-nft table (family `ip` or `ip6`, not this backend's `inet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRef {
    pub family: Family,
    pub table: String,
    pub chain: String,
}

impl std::fmt::Display for ChainRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}",
            family_word(self.family),
            self.table,
            self.chain
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub table: String,
    pub name: String,
    /// `None` for a regular chain (reached by `jump`).
    pub base: Option<BaseChain>,
}

/// What makes a chain a base chain: its type, netfilter hook and priority (policy accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
    Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: String,
    pub chain: String,
    pub stmts: Vec<Stmt>,
}

/// Transport protocols of `meta l4proto` and port matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

/// Source or destination: `sport`/`dport`, `saddr`/`daddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Src,
    Dst,
}

/// An inclusive port range; a single port has `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const fn port(p: u16) -> PortRange {
        PortRange { first: p, last: p }
    }
    pub const fn range(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }
}

/// A set of conntrack states; `ct state A,B` matches a packet in any of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtStates {
    pub invalid: bool,
    pub established: bool,
    pub related: bool,
    pub new: bool,
}

impl CtStates {
    /// The kernel's bit mask (`NF_CT_STATE_*_BIT`).
    pub fn bits(&self) -> u32 {
        let mut b = 0;
        for (on, bit) in [
            (self.invalid, 1),
            (self.established, 2),
            (self.related, 4),
            (self.new, 8),
        ] {
            if on {
                b |= bit;
            }
        }
        b
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
}

/// One statement of a rule, in nft's terms. Matches come first, then actions; a verdict, if
/// any, is last. `tcp dport` needs no `meta l4proto tcp` before it, nor `ip daddr` a
/// `meta nfproto ipv4`: like nft, the encoding adds them (see [`explicit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// `meta l4proto tcp|udp`
    L4Proto(L4),
    /// `meta nfproto ipv4|ipv6` (what nft adds before `ip`/`ip6` matches in an inet table;
    /// callers need not write it).
    NfProto(Family),
    /// `tcp|udp sport|dport [!=] PORTS`: one port `N`, a range `N-M`, or an anonymous set
    /// `{ a, b-c, … }` when there are several (see [`PortSet`]). Must not be empty.
    Port {
        proto: L4,
        dir: Dir,
        negate: bool,
        ports: Vec<PortRange>,
    },
    /// `iifname NAME` (exact name, no wildcard)
    Iifname(String),
    /// `oifname NAME`
    Oifname(String),
    /// `ip|ip6 saddr|daddr [!=] ADDR/LEN`, the family is the address's; host bits are ignored.
    Addr { dir: Dir, negate: bool, net: IpNet },
    /// `skuid [!=] N`
    SkUid { negate: bool, id: u32 },
    /// `skgid [!=] N`
    SkGid { negate: bool, id: u32 },
    /// `mark [!=] N` (the packet mark)
    Mark { negate: bool, value: u32 },
    /// `ct mark N`
    CtMark(u32),
    /// `ct state S[,S…]`
    CtState(CtStates),
    /// `counter`
    Counter,
    /// `meta mark set N`
    SetMark(u32),
    /// `meta mark set ct mark`
    SetMarkFromCt,
    /// `ct mark set mark`
    SetCtMarkFromMark,
    /// `ct zone set N`
    SetCtZone(u16),
    /// `redirect to :PORT` (after a transport protocol match)
    Redirect(u16),
    /// `tproxy ip|ip6 to :PORT` (after a transport protocol match)
    Tproxy { family: Family, port: u16 },
    /// `accept`, `drop`, `return`, `jump CHAIN`: last in a rule.
    Verdict(Verdict),
}

/// A transaction, rule or name nft or the kernel would not take as meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Index of the op in [`Transaction::ops`].
    pub op: usize,
    /// The op in nft syntax.
    pub text: String,
    pub reason: Reason,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid nftables operation `{}`: {}",
            self.text, self.reason
        )
    }
}

impl std::error::Error for Invalid {}

/// Why nft (or the kernel) would not take a rule or a name: the reason of an [`Invalid`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A verdict before the last statement of a rule.
    VerdictNotLast,
    /// A port match with an empty list of ports.
    NoPorts,
    /// A port range `first-last` with `first > last`.
    ReversedRange(u16, u16),
    /// A match of protocol `want` after one of `have`, at the same layer.
    ConflictingProtocols {
        want: &'static str,
        have: &'static str,
    },
    /// `redirect to :PORT` without a transport protocol match before it.
    RedirectWithoutL4,
    /// `tproxy` without a transport protocol match before it.
    TproxyWithoutL4,
    /// `tproxy` of one family in a rule that matches the other's addresses.
    TproxyFamily { tproxy: Family, matched: Family },
    /// An interface name Linux or nft would not take (see [`check_ifname`]).
    Ifname(String),
    /// A table or chain name nft would not take (see [`check_name`]).
    Name(String),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::VerdictNotLast => f.write_str("a verdict must be the last statement of a rule"),
            Reason::NoPorts => f.write_str("a port match needs at least one port"),
            Reason::ReversedRange(first, last) => {
                write!(f, "port range {first}-{last} is reversed")
            }
            Reason::ConflictingProtocols { want, have } => {
                write!(f, "conflicting protocols: {want} after a {have} match")
            }
            Reason::RedirectWithoutL4 => {
                f.write_str("`redirect to :PORT` needs a transport protocol match first")
            }
            Reason::TproxyWithoutL4 => {
                f.write_str("`tproxy` needs a transport protocol match first")
            }
            Reason::TproxyFamily { tproxy, matched } => write!(
                f,
                "`tproxy {}` in a rule that matches {} addresses",
                family_word(*tproxy),
                family_word(*matched)
            ),
            Reason::Ifname(name) => write!(f, "invalid interface name {name:?}"),
            Reason::Name(name) => write!(f, "invalid table or chain name {name:?}"),
        }
    }
}

impl std::error::Error for Reason {}

/// How the ports of a match are written and encoded, as nft does after merging: anonymous
/// sets are interval sets when they hold a range (overlapping and adjacent ranges merged,
/// sorted), plain sets otherwise (duplicates dropped, order kept); a set of one element is
/// written as that element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSet {
    One(u16),
    Range(u16, u16),
    /// Several single ports: a plain anonymous set.
    Ports(Vec<u16>),
    /// Several disjoint, sorted ranges (single ports as `N-N`): an interval set.
    Intervals(Vec<(u16, u16)>),
}

impl PortSet {
    pub fn of(ports: &[PortRange]) -> PortSet {
        if ports.iter().all(|p| p.first == p.last) {
            let mut v: Vec<u16> = Vec::with_capacity(ports.len());
            for p in ports {
                if !v.contains(&p.first) {
                    v.push(p.first);
                }
            }
            return match v.as_slice() {
                [one] => PortSet::One(*one),
                _ => PortSet::Ports(v),
            };
        }
        let mut sorted: Vec<(u16, u16)> = ports.iter().map(|p| (p.first, p.last)).collect();
        sorted.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(sorted.len());
        for (a, b) in sorted {
            match merged.last_mut() {
                Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        match merged.as_slice() {
            [(a, b)] if a == b => PortSet::One(*a),
            [(a, b)] => PortSet::Range(*a, *b),
            _ => PortSet::Intervals(merged),
        }
    }
}

/// The statements of a rule with the dependencies nft inserts made explicit, in nft's order:
/// `meta l4proto P` before the first port match when no transport protocol is matched yet,
/// `meta nfproto ipv4|ipv6` before the first address match. Errors (as reasons) are what nft
/// refuses: conflicting protocols, a transport mapping without a transport protocol, a
/// verdict that is not last, an empty port list or a reversed range, a bad interface name.
pub fn explicit(stmts: &[Stmt]) -> Result<Vec<Stmt>, Reason> {
    let mut out = Vec::with_capacity(stmts.len() + 2);
    let mut l3: Option<Family> = None;
    let mut l4: Option<L4> = None;
    for (i, s) in stmts.iter().enumerate() {
        if matches!(s, Stmt::Verdict(_)) && i + 1 != stmts.len() {
            return Err(Reason::VerdictNotLast);
        }
        match s {
            Stmt::L4Proto(p) => require(&mut l4, *p, None, Stmt::L4Proto, l4_word)?,
            Stmt::NfProto(f) => require(&mut l3, *f, None, Stmt::NfProto, family_word)?,
            Stmt::Port { proto, ports, .. } => {
                if ports.is_empty() {
                    return Err(Reason::NoPorts);
                }
                if let Some(p) = ports.iter().find(|p| p.first > p.last) {
                    return Err(Reason::ReversedRange(p.first, p.last));
                }
                require(&mut l4, *proto, Some(&mut out), Stmt::L4Proto, l4_word)?;
            }
            Stmt::Addr { net, .. } => require(
                &mut l3,
                family(net),
                Some(&mut out),
                Stmt::NfProto,
                family_word,
            )?,
            Stmt::Iifname(n) | Stmt::Oifname(n) => check_ifname(n)?,
            Stmt::Redirect(_) if l4.is_none() => {
                return Err(Reason::RedirectWithoutL4);
            }
            Stmt::Tproxy { family: f, .. } => {
                if l4.is_none() {
                    return Err(Reason::TproxyWithoutL4);
                }
                if l3.is_some_and(|have| have != *f) {
                    return Err(Reason::TproxyFamily {
                        tproxy: *f,
                        matched: l3.unwrap_or(*f),
                    });
                }
            }
            _ => {}
        }
        out.push(s.clone());
    }
    Ok(out)
}

/// Records the protocol a match needs at one layer: nothing when it is known already, the
/// dependency `dep` (appended to `deps`, if given) when it is not, an error on a conflict.
fn require<T: Copy + PartialEq>(
    have: &mut Option<T>,
    want: T,
    deps: Option<&mut Vec<Stmt>>,
    dep: impl FnOnce(T) -> Stmt,
    word: fn(T) -> &'static str,
) -> Result<(), Reason> {
    match *have {
        Some(h) if h != want => Err(Reason::ConflictingProtocols {
            want: word(want),
            have: word(h),
        }),
        Some(_) => Ok(()),
        None => {
            if let Some(out) = deps {
                out.push(dep(want));
            }
            *have = Some(want);
            Ok(())
        }
    }
}

/// Linux interface names: 1 to 15 bytes, no `/`, `:` or white space; `*`, `"` and `\` are
/// refused too (nft would read a wildcard or a quote).
pub fn check_ifname(name: &str) -> Result<(), Reason> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/:*\"\\".contains(c));
    if bad {
        Err(Reason::Ifname(name.to_owned()))
    } else {
        Ok(())
    }
}

/// Table and chain names: an ASCII letter, then letters, digits, `-`, `_` or `.` (nft's
/// identifiers, unquoted), at most 255 bytes.
pub fn check_name(name: &str) -> Result<(), Reason> {
    let ok = name.len() <= 255
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Reason::Name(name.to_owned()))
    }
}

/// Checks every op: names, and each rule as [`explicit`] does. Jump targets are left to the
/// kernel (a jump to a chain that does not exist fails the whole transaction).
pub fn validate(tx: &Transaction) -> Result<(), Invalid> {
    for (i, op) in tx.ops.iter().enumerate() {
        check_op(op).map_err(|reason| Invalid {
            op: i,
            text: render_op(op),
            reason,
        })?;
    }
    Ok(())
}

fn check_op(op: &Op) -> Result<(), Reason> {
    check_names(op)?;
    match op {
        Op::AddRule(r) => explicit(&r.stmts).map(drop),
        _ => Ok(()),
    }
}

/// The names an op carries (table, chain, a rule's jump target), checked as [`check_name`]
/// does: [`validate`] without the rules' statements, for an encoder that makes them explicit
/// anyway.
pub fn check_names(op: &Op) -> Result<(), Reason> {
    match op {
        Op::DeleteTable(t) | Op::AddTable(t) => check_name(t),
        Op::AddChain(c) => check_name(&c.table).and_then(|()| check_name(&c.name)),
        Op::DeleteRule(c, _) | Op::FlushChain(c) | Op::DeleteChain(c) => {
            check_name(&c.table).and_then(|()| check_name(&c.chain))
        }
        Op::AddRule(r) => {
            check_name(&r.table)?;
            check_name(&r.chain)?;
            match r.stmts.last() {
                Some(Stmt::Verdict(Verdict::Jump(target))) => check_name(target),
                _ => Ok(()),
            }
        }
    }
}

pub fn family(net: &IpNet) -> Family {
    match net {
        IpNet::V4(_) => Family::V4,
        IpNet::V6(_) => Family::V6,
    }
}

pub fn family_word(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

pub fn l4_word(p: L4) -> &'static str {
    match p {
        L4::Tcp => "tcp",
        L4::Udp => "udp",
    }
}

pub fn chain_type_word(t: ChainType) -> &'static str {
    match t {
        ChainType::Filter => "filter",
        ChainType::Nat => "nat",
        ChainType::Route => "route",
    }
}

pub fn hook_word(h: Hook) -> &'static str {
    match h {
        Hook::Prerouting => "prerouting",
        Hook::Input => "input",
        Hook::Forward => "forward",
        Hook::Output => "output",
        Hook::Postrouting => "postrouting",
    }
}

/// The `nft -f` text of a transaction, one line per command (two for [`Op::DeleteTable`]).
/// Meant for valid transactions (see [`validate`]).
pub fn render(tx: &Transaction) -> String {
    let mut s = String::new();
    for op in &tx.ops {
        s.push_str(&render_op(op));
        s.push('\n');
    }
    s
}

/// One op in nft syntax, without a trailing newline.
pub fn render_op(op: &Op) -> String {
    match op {
        Op::DeleteTable(t) => {
            format!("add table {TABLE_FAMILY} {t}\ndelete table {TABLE_FAMILY} {t}")
        }
        Op::AddTable(t) => format!("add table {TABLE_FAMILY} {t}"),
        Op::AddChain(c) => {
            let mut s = format!("add chain {TABLE_FAMILY} {} {}", c.table, c.name);
            if let Some(b) = &c.base {
                let _ = write!(
                    s,
                    " {{ type {} hook {} priority {} ; }}",
                    chain_type_word(b.kind),
                    hook_word(b.hook),
                    b.priority
                );
            }
            s
        }
        Op::AddRule(r) => format!(
            "add rule {TABLE_FAMILY} {} {} {}",
            r.table,
            r.chain,
            render_stmts(&r.stmts)
        ),
        Op::DeleteRule(c, handle) => format!("delete rule {c} handle {handle}"),
        Op::FlushChain(c) => format!("flush chain {c}"),
        Op::DeleteChain(c) => format!("delete chain {c}"),
    }
}

/// Statements in nft syntax, separated by spaces.
pub fn render_stmts(stmts: &[Stmt]) -> String {
    stmts.iter().map(render_stmt).collect::<Vec<_>>().join(" ")
}

fn neq(negate: bool) -> &'static str {
    if negate { "!= " } else { "" }
}

pub fn render_stmt(s: &Stmt) -> String {
    match s {
        Stmt::L4Proto(p) => format!("meta l4proto {}", l4_word(*p)),
        Stmt::NfProto(Family::V4) => "meta nfproto ipv4".into(),
        Stmt::NfProto(Family::V6) => "meta nfproto ipv6".into(),
        Stmt::Port {
            proto,
            dir,
            negate,
            ports,
        } => {
            let field = match dir {
                Dir::Src => "sport",
                Dir::Dst => "dport",
            };
            let value = match PortSet::of(ports) {
                PortSet::One(p) => p.to_string(),
                PortSet::Range(a, b) => format!("{a}-{b}"),
                PortSet::Ports(v) => set_text(v.iter().map(u16::to_string)),
                PortSet::Intervals(v) => set_text(v.iter().map(|&(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })),
            };
            format!("{} {field} {}{value}", l4_word(*proto), neq(*negate))
        }
        Stmt::Iifname(n) => format!("iifname \"{n}\""),
        Stmt::Oifname(n) => format!("oifname \"{n}\""),
        Stmt::Addr { dir, negate, net } => {
            let field = match dir {
                Dir::Src => "saddr",
                Dir::Dst => "daddr",
            };
            format!(
                "{} {field} {}{}",
                family_word(family(net)),
                neq(*negate),
                net.trunc()
            )
        }
        Stmt::SkUid { negate, id } => format!("skuid {}{id}", neq(*negate)),
        Stmt::SkGid { negate, id } => format!("skgid {}{id}", neq(*negate)),
        Stmt::Mark { negate, value } => format!("mark {}{value}", neq(*negate)),
        Stmt::CtMark(v) => format!("ct mark {v}"),
        Stmt::CtState(st) => {
            let names: Vec<&str> = [
                (st.invalid, "invalid"),
                (st.established, "established"),
                (st.related, "related"),
                (st.new, "new"),
            ]
            .into_iter()
            .filter_map(|(on, n)| on.then_some(n))
            .collect();
            format!("ct state {}", names.join(","))
        }
        Stmt::Counter => "counter".into(),
        Stmt::SetMark(v) => format!("meta mark set {v}"),
        Stmt::SetMarkFromCt => "meta mark set ct mark".into(),
        Stmt::SetCtMarkFromMark => "ct mark set mark".into(),
        Stmt::SetCtZone(z) => format!("ct zone set {z}"),
        Stmt::Redirect(p) => format!("redirect to :{p}"),
        Stmt::Tproxy { family: f, port } => format!("tproxy {} to :{port}", family_word(*f)),
        Stmt::Verdict(Verdict::Accept) => "accept".into(),
        Stmt::Verdict(Verdict::Drop) => "drop".into(),
        Stmt::Verdict(Verdict::Return) => "return".into(),
        Stmt::Verdict(Verdict::Jump(c)) => format!("jump {c}"),
    }
}

fn set_text(items: impl Iterator<Item = String>) -> String {
    format!("{{ {} }}", items.collect::<Vec<_>>().join(", "))
}

/// The kernel features (config options) an op relies on beyond nf_tables itself
/// (`CONFIG_NF_TABLES`, `CONFIG_NF_TABLES_INET`): what to check when the kernel refuses it.
pub fn kernel_features(op: &Op) -> Vec<&'static str> {
    let mut v = Vec::new();
    match op {
        Op::AddChain(Chain { base: Some(b), .. }) if b.kind == ChainType::Nat => {
            v.push("CONFIG_NFT_NAT (inet nat chains)")
        }
        Op::AddRule(r) => {
            for s in &r.stmts {
                let f = match s {
                    Stmt::Port { ports, .. } if ports.len() > 1 => {
                        "CONFIG_NF_TABLES_SET (anonymous sets)"
                    }
                    Stmt::CtMark(_)
                    | Stmt::CtState(_)
                    | Stmt::SetMarkFromCt
                    | Stmt::SetCtMarkFromMark
                    | Stmt::SetCtZone(_) => "CONFIG_NFT_CT (conntrack expressions)",
                    Stmt::Counter => "CONFIG_NFT_COUNTER",
                    Stmt::Redirect(_) => "CONFIG_NFT_REDIR (redirect)",
                    Stmt::Tproxy { .. } => "CONFIG_NFT_TPROXY (tproxy)",
                    _ => continue,
                };
                if !v.contains(&f) {
                    v.push(f);
                }
            }
        }
        _ => {}
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(stmts: Vec<Stmt>) -> Op {
        Op::AddRule(Rule {
            table: "t".into(),
            chain: "c".into(),
            stmts,
        })
    }

    #[test]
    fn port_sets_merge_like_nft() {
        use PortRange as P;
        assert_eq!(PortSet::of(&[P::port(53)]), PortSet::One(53));
        assert_eq!(PortSet::of(&[P::port(53), P::port(53)]), PortSet::One(53));
        assert_eq!(
            PortSet::of(&[P::port(40), P::port(10), P::port(40)]),
            PortSet::Ports(vec![40, 10])
        );
        assert_eq!(PortSet::of(&[P::range(10, 10)]), PortSet::One(10));
        assert_eq!(
            PortSet::of(&[
                P::range(21, 30),
                P::range(10, 20),
                P::port(25),
                P::port(31),
                P::port(40)
            ]),
            PortSet::Intervals(vec![(10, 31), (40, 40)])
        );
        assert_eq!(
            PortSet::of(&[P::range(10, 20), P::port(15)]),
            PortSet::Range(10, 20)
        );
    }

    #[test]
    fn dependencies_are_made_explicit_once() {
        let net: IpNet = "127.0.0.53/32".parse().unwrap();
        let got = explicit(&[
            Stmt::Addr {
                dir: Dir::Dst,
                negate: false,
                net,
            },
            Stmt::Port {
                proto: L4::Tcp,
                dir: Dir::Dst,
                negate: false,
                ports: vec![PortRange::port(53)],
            },
            Stmt::Addr {
                dir: Dir::Src,
                negate: false,
                net,
            },
            Stmt::Redirect(15053),
        ])
        .unwrap();
        let words: Vec<String> = got.iter().map(render_stmt).collect();
        assert_eq!(
            words,
            [
                "meta nfproto ipv4",
                "ip daddr 127.0.0.53/32",
                "meta l4proto tcp",
                "tcp dport 53",
                "ip saddr 127.0.0.53/32",
                "redirect to :15053"
            ]
        );
    }

    #[test]
    fn invalid_rules_are_refused_with_their_text() {
        let v6: IpNet = "::1/128".parse().unwrap();
        let cases = [
            (
                vec![
                    Stmt::L4Proto(L4::Udp),
                    Stmt::Port {
                        proto: L4::Tcp,
                        dir: Dir::Dst,
                        negate: false,
                        ports: vec![PortRange::port(1)],
                    },
                ],
                "conflicting protocols",
            ),
            (vec![Stmt::Redirect(1)], "transport protocol"),
            (
                vec![
                    Stmt::L4Proto(L4::Tcp),
                    Stmt::Addr {
                        dir: Dir::Dst,
                        negate: true,
                        net: v6,
                    },
                    Stmt::Tproxy {
                        family: Family::V4,
                        port: 1,
                    },
                ],
                "tproxy ip",
            ),
            (
                vec![Stmt::Verdict(Verdict::Accept), Stmt::Counter],
                "verdict must be the last",
            ),
            (vec![Stmt::Iifname("eth*".into())], "interface name"),
            (
                vec![Stmt::Port {
                    proto: L4::Tcp,
                    dir: Dir::Dst,
                    negate: false,
                    ports: vec![],
                }],
                "at least one port",
            ),
        ];
        for (stmts, want) in cases {
            let tx = Transaction {
                ops: vec![Op::AddTable("t".into()), rule(stmts)],
            };
            let e = validate(&tx).unwrap_err();
            assert_eq!(e.op, 1);
            assert!(e.reason.to_string().contains(want), "{e}");
            assert!(e.text.starts_with("add rule inet t c "), "{e}");
        }
    }

    #[test]
    fn renders_nft_syntax() {
        let tx = Transaction {
            ops: vec![
                Op::DeleteTable("t".into()),
                Op::AddTable("t".into()),
                Op::AddChain(Chain {
                    table: "t".into(),
                    name: "c".into(),
                    base: Some(BaseChain {
                        kind: ChainType::Nat,
                        hook: Hook::Output,
                        priority: -100,
                    }),
                }),
                rule(vec![
                    Stmt::Oifname("lo".into()),
                    Stmt::Port {
                        proto: L4::Tcp,
                        dir: Dir::Dst,
                        negate: true,
                        ports: vec![PortRange::port(53), PortRange::range(1000, 2000)],
                    },
                    Stmt::Addr {
                        dir: Dir::Dst,
                        negate: false,
                        net: "10.96.1.2/12".parse().unwrap(),
                    },
                    Stmt::CtState(CtStates {
                        related: true,
                        established: true,
                        ..CtStates::default()
                    }),
                    Stmt::Counter,
                    Stmt::Verdict(Verdict::Jump("d".into())),
                ]),
            ],
        };
        assert_eq!(
            render(&tx),
            "add table inet t\ndelete table inet t\nadd table inet t\n\
             add chain inet t c { type nat hook output priority -100 ; }\n\
             add rule inet t c oifname \"lo\" tcp dport != { 53, 1000-2000 } \
             ip daddr 10.96.0.0/12 ct state established,related counter jump d\n"
        );
    }

    #[test]
    fn removals_in_iptables_nft_tables_render_as_nft_commands() {
        let at = |family, chain: &str| ChainRef {
            family,
            table: "nat".into(),
            chain: chain.into(),
        };
        let tx = Transaction {
            ops: vec![
                Op::DeleteRule(at(Family::V4, "OUTPUT"), 7),
                Op::FlushChain(at(Family::V6, "ISTIO_OUTPUT")),
                Op::DeleteChain(at(Family::V6, "ISTIO_OUTPUT")),
            ],
        };
        assert_eq!(
            render(&tx),
            "delete rule ip nat OUTPUT handle 7\nflush chain ip6 nat ISTIO_OUTPUT\n\
             delete chain ip6 nat ISTIO_OUTPUT\n"
        );
        assert!(validate(&tx).is_ok());
        let bad = Transaction {
            ops: vec![Op::FlushChain(at(Family::V4, "a b"))],
        };
        assert!(validate(&bad).is_err());
    }
}
