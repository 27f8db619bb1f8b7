//! `trace`: follows the first packet of one connection through the in-memory ruleset, hook by
//! hook and rule by rule in kernel order, with jump/RETURN semantics, and reports every rule it
//! passes, the rule that decides and the verdict (redirected to a proxy port, TPROXY, bypass,
//! dropped). What it passes is named as the chosen backend lays it out in the kernel
//! ([`Layout`], implemented by each backend beside its renderer): `nat ISTIO_OUTPUT` and
//! `-m owner --uid-owner 1337 -j RETURN` in the iptables mode, `inet istio-proxy-nat
//! istio-output` and `skuid 1337 counter return` in the nftables mode.
//!
//! The model of netfilter used here:
//! - an outbound packet traverses raw, mangle and nat OUTPUT; if it leaves by `lo` (a loopback
//!   or own-address destination, or after a REDIRECT) it comes back in through raw and mangle
//!   PREROUTING (where the TPROXY rules look at it), but not nat PREROUTING: NAT is decided
//!   once per connection, and that happened in OUTPUT;
//! - an inbound packet traverses raw, mangle and nat PREROUTING;
//! - it is the first packet of a new connection: conntrack state NEW, packet and connection
//!   marks 0, source port ephemeral;
//! - `RETURN` (or the end of a chain) goes back to the calling chain; the end of a built-in
//!   chain, `ACCEPT` and the non-terminating targets (MARK, CONNMARK, CT) let the packet go on
//!   to the next table.
//!
//! Pure: takes the rulesets, returns data that displays as the report.

use std::fmt::{self, Write};
use std::net::{IpAddr, SocketAddr};

use crate::capture::{DNS_PORT, Match, Owner, Proto, Rule, Ruleset, Table, Target, chain};
use crate::net::{Family, Id, Iface};
use crate::settings::cli::TraceArgs;
use crate::settings::config::Config;

/// Which way the connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Arriving at the pod from outside.
    In,
    /// Opened by a process in the pod.
    Out,
}

/// The connection to trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub direction: Direction,
    pub proto: Proto,
    pub dst: SocketAddr,
    /// `None`: not given (outbound: the pod's own address; inbound: a remote address).
    pub src: Option<IpAddr>,
    /// The sending process's uid and primary gid (outbound only).
    pub uid: u32,
    pub gid: u32,
    /// Out: the interface the packet leaves by; in: the one it arrives on.
    pub iface: String,
}

/// A `trace` argument that does not describe a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceArgError {
    /// Not `in` or `out`.
    Direction(String),
    /// Not `tcp` or `udp` (lowercased).
    Proto(String),
    /// The destination is not ADDRESS:PORT.
    Destination(String),
    /// The destination's port is 0.
    DestinationPort0(String),
    /// `--uid` or `--gid` (`what`) is not an id.
    Id {
        what: &'static str,
        value: String,
        reason: crate::net::Reason,
    },
    /// `--src` is not an address.
    Src(String),
    /// `--src` and the destination are of different families.
    Families { src: String, dst: SocketAddr },
    /// `--iface` is not an interface name.
    Iface {
        name: String,
        reason: crate::net::Reason,
    },
    /// `--iface` is a pattern (`eth+`), not a name.
    IfacePattern(String),
}

impl fmt::Display for TraceArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceArgError::Direction(d) => {
                write!(f, "invalid direction {d:?} for trace: expected in or out")
            }
            TraceArgError::Proto(p) => write!(
                f,
                "invalid protocol {p:?} for trace --proto: expected tcp or udp"
            ),
            TraceArgError::Destination(d) => write!(
                f,
                "invalid destination {d:?} for trace: expected ADDRESS:PORT, e.g. 10.0.0.1:80 or [2001:db8::1]:80"
            ),
            TraceArgError::DestinationPort0(d) => {
                write!(f, "invalid destination {d:?} for trace: port 0")
            }
            TraceArgError::Id {
                what,
                value,
                reason,
            } => write!(f, "invalid {what} {value:?} for trace --{what}: {reason}"),
            TraceArgError::Src(s) => write!(f, "invalid address {s:?} for trace --src"),
            TraceArgError::Families { src, dst } => write!(
                f,
                "trace --src {src} and the destination {dst} are of different IP families"
            ),
            TraceArgError::Iface { name, reason } => write!(
                f,
                "invalid interface name {name:?} for trace --iface: {reason}"
            ),
            TraceArgError::IfacePattern(name) => write!(
                f,
                "invalid interface name {name:?} for trace --iface: give a real name, not a pattern"
            ),
        }
    }
}

impl std::error::Error for TraceArgError {}

impl Connection {
    /// Validates the command-line description of a connection and fills in the defaults.
    pub fn parse(a: &TraceArgs) -> Result<Connection, TraceArgError> {
        let direction = parse_direction(&a.direction)?;
        let proto = parse_proto(&a.proto)?;
        let dst = parse_destination(&a.destination)?;
        let uid = parse_id(&a.uid, "uid")?.unwrap_or(0);
        let gid = parse_id(&a.gid, "gid")?.unwrap_or(uid);
        let src = match &a.src {
            Some(s) => Some(parse_src(s, dst)?),
            None if direction == Direction::Out && dst.ip().is_loopback() => {
                Some(Family::of(&dst.ip()).loopback())
            }
            None => None,
        };
        let iface = match &a.iface {
            Some(i) => parse_iface(i)?,
            None if dst.ip().is_loopback() => "lo".to_owned(),
            None => "eth0".to_owned(),
        };
        Ok(Connection {
            direction,
            proto,
            dst,
            src,
            uid,
            gid,
            iface,
        })
    }
}

fn parse_direction(d: &str) -> Result<Direction, TraceArgError> {
    match d {
        "in" | "inbound" => Ok(Direction::In),
        "out" | "outbound" => Ok(Direction::Out),
        d => Err(TraceArgError::Direction(d.to_owned())),
    }
}

fn parse_proto(p: &str) -> Result<Proto, TraceArgError> {
    match p.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        p => Err(TraceArgError::Proto(p.to_owned())),
    }
}

fn parse_destination(d: &str) -> Result<SocketAddr, TraceArgError> {
    let dst: SocketAddr = d
        .parse()
        .map_err(|_| TraceArgError::Destination(d.to_owned()))?;
    if dst.port() == 0 {
        return Err(TraceArgError::DestinationPort0(d.to_owned()));
    }
    Ok(dst)
}

/// `--uid` or `--gid` (`what`), if given.
fn parse_id(v: &Option<String>, what: &'static str) -> Result<Option<u32>, TraceArgError> {
    v.as_deref()
        .map(|s| {
            s.parse::<Id>()
                .map(Id::get)
                .map_err(|reason| TraceArgError::Id {
                    what,
                    value: s.to_owned(),
                    reason,
                })
        })
        .transpose()
}

/// `--src`, of the destination's family.
fn parse_src(s: &str, dst: SocketAddr) -> Result<IpAddr, TraceArgError> {
    let ip: IpAddr = s.parse().map_err(|_| TraceArgError::Src(s.to_owned()))?;
    if Family::of(&ip) != Family::of(&dst.ip()) {
        return Err(TraceArgError::Families {
            src: s.to_owned(),
            dst,
        });
    }
    Ok(ip)
}

/// `--iface`: a name, not a pattern.
fn parse_iface(i: &str) -> Result<String, TraceArgError> {
    let parsed: Iface = i.parse().map_err(|reason| TraceArgError::Iface {
        name: i.to_owned(),
        reason,
    })?;
    if parsed.as_str().ends_with('+') {
        return Err(TraceArgError::IfacePattern(i.to_owned()));
    }
    Ok(parsed.as_str().to_owned())
}

impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = self.src.map_or_else(
            || match self.direction {
                Direction::Out => "the pod's address".to_owned(),
                Direction::In => "a remote address".to_owned(),
            },
            |s| s.to_string(),
        );
        match self.direction {
            Direction::Out => write!(
                f,
                "outbound {} to {} from {src} (uid {}, gid {}), leaving by {}",
                self.proto.name(),
                self.dst,
                self.uid,
                self.gid,
                self.iface
            ),
            Direction::In => write!(
                f,
                "inbound {} to {} from {src}, arriving on {}",
                self.proto.name(),
                self.dst,
                self.iface
            ),
        }
    }
}

/// Where the connection ends up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// NAT REDIRECT to a local port (the original destination is kept for `SO_ORIGINAL_DST`).
    Redirect {
        port: u16,
    },
    /// Delivered by TPROXY to a local port (destination unchanged).
    Tproxy {
        port: u16,
    },
    /// Not captured: delivered to the destination as addressed.
    Bypass,
    Dropped,
}

/// What one rule did to the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The rule did not match: the first match that does not hold, and why.
    NoMatch(String),
    /// The rule matched: what its target did.
    Matched(String),
}

/// How the chosen backend lays the capture out in the kernel. `trace` walks the capture, which
/// is the same in both modes, and names every table, chain, rule and condition as that backend
/// writes it, so that the path it prints is the one `iptables-save` or `nft list ruleset`
/// shows. Each backend implements it beside its renderer.
pub trait Layout {
    /// A table as listed (`nat`, `inet istio-proxy-nat`).
    fn table(&self, table: Table) -> String;
    /// A chain as listed (`ISTIO_OUTPUT`, `istio-output`).
    fn chain(&self, chain: &str) -> String;
    /// A rule's conditions and action (`-o lo -j RETURN`, `oifname "lo" counter return`).
    fn rule(&self, rule: &Rule) -> String;
    /// One condition of `rule`, as written in it.
    fn condition(&self, rule: &Rule, m: &Match) -> String;
}

/// One rule the packet passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The netfilter hook, with `(looped back)` for the second pass of an outbound packet.
    pub hook: String,
    /// The table and the chain as the backend lists them ([`Layout`]).
    pub table: String,
    pub chain: String,
    /// 1-based position in the chain, in kernel order.
    pub position: usize,
    /// Jump depth (0 = built-in chain).
    pub depth: usize,
    /// The rule as the backend lists it.
    pub rule: String,
    pub outcome: Outcome,
}

/// The result of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub connection: Connection,
    pub family: Family,
    pub steps: Vec<Step>,
    /// Index into `steps` of the rule that decided the verdict, if one did.
    pub deciding: Option<usize>,
    pub verdict: Verdict,
    /// What the ports mean in this configuration (proxy ports), for the report.
    port_names: Vec<(u16, &'static str)>,
    pub notes: Vec<String>,
}

/// Why the walk stopped in a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Accept,
    Drop,
    Redirect(u16),
    Tproxy(u16),
}

struct Packet {
    proto: Proto,
    src: Option<IpAddr>,
    dst: IpAddr,
    dport: u16,
    in_iface: Option<String>,
    out_iface: Option<String>,
    /// (uid, gid) of the sending socket: only for locally generated packets.
    owner: Option<(u32, u32)>,
    mark: u32,
    ctmark: u32,
}

struct Walker<'a> {
    rs: &'a Ruleset,
    pkt: Packet,
    hook: String,
    steps: Vec<Step>,
    deciding: Option<usize>,
    /// The last RETURN that matched in nat: it decides a bypass.
    last_nat_return: Option<usize>,
    /// A TPROXY rule assigned the connection: a later REDIRECT does not decide.
    tproxied: bool,
    group_gid: &'a dyn Fn(&str) -> Option<u32>,
    layout: &'a dyn Layout,
}

/// A rule's condition that does not hold for the packet, and what the packet has instead.
#[derive(Debug)]
struct Unmet {
    condition: String,
    actual: String,
}

impl fmt::Display for Unmet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} does not hold: {}", self.condition, self.actual)
    }
}

impl std::error::Error for Unmet {}

impl Walker<'_> {
    /// Why the first of a rule's matches that does not hold fails, if one does not.
    fn first_unmet(&self, r: &Rule) -> Option<String> {
        let unmet = r.matches.iter().find_map(|m| self.check(r, m).err());
        unmet.map(|u| u.to_string())
    }

    /// Why a match does not hold, or `Ok` when it does.
    fn check(&self, r: &Rule, m: &Match) -> Result<(), Unmet> {
        let p = &self.pkt;
        let fail = |actual: String| {
            Err(Unmet {
                condition: self.layout.condition(r, m),
                actual,
            })
        };
        let holds = |b: bool, actual: String| if b { Ok(()) } else { fail(actual) };
        match m {
            Match::Proto(x) => holds(*x == p.proto, format!("protocol is {}", p.proto.name())),
            Match::InIface(i) => match &p.in_iface {
                Some(n) => holds(i.matches(n), format!("arrives on {n}")),
                None => fail("locally generated".into()),
            },
            Match::OutIface(i) => match &p.out_iface {
                Some(n) => holds(i.matches(n), format!("leaves by {n}")),
                None => fail("not leaving".into()),
            },
            Match::Src(c) => match p.src {
                Some(s) => holds(c.contains(&s), format!("source is {s}")),
                None => fail("source is not that address".into()),
            },
            Match::Dst { neg, net } => holds(
                net.contains(&p.dst) != *neg,
                format!("destination is {}", p.dst),
            ),
            Match::Dport { neg, port } => holds(
                port.contains(p.dport) != *neg,
                format!("destination port is {}", p.dport),
            ),
            Match::Sport(_) => fail("the source port is ephemeral".into()),
            Match::Dports { neg, ports } => holds(
                ports.iter().any(|x| x.contains(p.dport)) != *neg,
                format!("destination port is {}", p.dport),
            ),
            Match::Owner { neg, owner } => {
                let Some((uid, gid)) = p.owner else {
                    return fail("no local socket".into());
                };
                match owner {
                    Owner::Uid(u) => holds((u.get() == uid) != *neg, format!("sent by uid {uid}")),
                    Owner::Gid(g) => {
                        let want = match g {
                            crate::net::Group::Id(id) => Some(id.get()),
                            crate::net::Group::Name(n) => (self.group_gid)(n),
                        };
                        match want {
                            Some(w) => holds((w == gid) != *neg, format!("sent by gid {gid}")),
                            None => fail(format!("group {g} is unknown here")),
                        }
                    }
                }
            }
            Match::CtState(states) => holds(
                states.split(',').any(|s| s == "NEW"),
                "the first packet of a connection is NEW".into(),
            ),
            Match::Mark { neg, mark } => holds(
                (p.mark == *mark) != *neg,
                format!("packet mark is {}", p.mark),
            ),
            Match::Connmark(mark) => holds(
                p.ctmark == *mark,
                format!("connection mark is {}", p.ctmark),
            ),
        }
    }

    fn walk(&mut self, table: Table, chain: &'static str, depth: usize) -> Option<Stop> {
        if depth > 16 {
            return None;
        }
        let rules = self.rs.chain_rules(table, chain);
        for (i, r) in rules.iter().enumerate() {
            let failed = self.first_unmet(r);
            let idx = self.steps.len();
            self.steps.push(Step {
                hook: self.hook.clone(),
                table: self.layout.table(table),
                chain: self.layout.chain(chain),
                position: i + 1,
                depth,
                rule: self.layout.rule(r),
                outcome: Outcome::NoMatch(failed.clone().unwrap_or_default()),
            });
            if failed.is_some() {
                continue;
            }
            let mut did = |s: String| self.steps[idx].outcome = Outcome::Matched(s);
            match &r.target {
                Target::Jump(c) => {
                    did(format!("jump to {}", self.layout.chain(c)));
                    if let Some(stop) = self.walk(table, c, depth + 1) {
                        return Some(stop);
                    }
                }
                Target::Return => {
                    did(format!(
                        "RETURN{}",
                        if depth == 0 { ": leaves the table" } else { "" }
                    ));
                    if table == Table::Nat {
                        self.last_nat_return = Some(idx);
                    }
                    return None;
                }
                Target::Accept => {
                    did("ACCEPT: leaves the table".into());
                    return Some(Stop::Accept);
                }
                Target::Drop => {
                    did("DROP".into());
                    self.deciding = Some(idx);
                    return Some(Stop::Drop);
                }
                Target::Redirect { port, .. } => {
                    did(format!("REDIRECT to port {port}"));
                    if !self.tproxied {
                        self.deciding = Some(idx);
                    }
                    return Some(Stop::Redirect(port.get()));
                }
                Target::Tproxy { mark, on_port } => {
                    did(format!("TPROXY to port {on_port}, mark {mark}"));
                    self.pkt.mark = mark.get();
                    self.deciding = Some(idx);
                    self.tproxied = true;
                    return Some(Stop::Tproxy(on_port.get()));
                }
                Target::SetMark(m) => {
                    did(format!("packet mark set to {m}"));
                    self.pkt.mark = *m;
                }
                Target::ConnmarkSave => {
                    did("connection mark set from the packet mark".into());
                    self.pkt.ctmark = self.pkt.mark;
                }
                Target::ConnmarkRestore => {
                    did("packet mark set from the connection mark".into());
                    self.pkt.mark = self.pkt.ctmark;
                }
                Target::CtZone(z) => did(format!("conntrack zone {z}")),
            }
        }
        None
    }

    /// Walks one built-in chain of every table in hook order.
    fn hook(&mut self, hook: &str, tables: &[Table], chain: &'static str) -> Vec<(Table, Stop)> {
        self.hook = hook.to_owned();
        let mut out = Vec::new();
        for t in tables {
            if let Some(stop) = self.walk(*t, chain, 0) {
                out.push((*t, stop));
                if stop == Stop::Drop {
                    break;
                }
            }
        }
        out
    }
}

/// Traces one connection. `rulesets` are the families that are programmed; a destination of
/// another family meets no rule at all. `group_gid` resolves group names used by owner rules;
/// `layout` names what the path passes as the chosen backend writes it.
pub fn trace(
    cfg: &Config,
    rulesets: &[Ruleset],
    conn: &Connection,
    group_gid: &dyn Fn(&str) -> Option<u32>,
    layout: &dyn Layout,
) -> Trace {
    let family = Family::of(&conn.dst.ip());
    let mut notes = vec![
        "first packet of a new connection: conntrack state NEW, marks 0, ephemeral source port"
            .to_owned(),
    ];
    let empty = Ruleset {
        family,
        tables: Vec::new(),
    };
    let rs = match rulesets.iter().find(|r| r.family == family) {
        Some(rs) => rs,
        None => {
            notes.push(format!(
                "no {family} rules are programmed: nothing can capture it"
            ));
            &empty
        }
    };
    let mut w = Walker {
        rs,
        pkt: first_packet(conn),
        hook: String::new(),
        steps: Vec::new(),
        deciding: None,
        last_nat_return: None,
        tproxied: false,
        group_gid,
        layout,
    };
    let verdict = match conn.direction {
        Direction::Out => w.outbound(conn, family, &mut notes),
        Direction::In => w.inbound(conn, &mut notes),
    };
    if verdict == Verdict::Bypass {
        w.deciding = w.last_nat_return;
    }
    Trace {
        connection: conn.clone(),
        family,
        steps: w.steps,
        deciding: w.deciding,
        verdict,
        port_names: port_names(cfg),
        notes,
    }
}

/// The ports a trace names: the proxy's listeners and the agent's DNS one.
fn port_names(cfg: &Config) -> Vec<(u16, &'static str)> {
    vec![
        (cfg.proxy_port.get(), "the proxy's outbound listener"),
        (
            cfg.inbound_capture_port.get(),
            "the proxy's inbound listener",
        ),
        (DNS_PORT.get(), "the agent's DNS listener"),
    ]
}

/// The first packet of the connection, before any hook (no interface, owner or mark yet).
fn first_packet(conn: &Connection) -> Packet {
    Packet {
        proto: conn.proto,
        src: conn.src,
        dst: conn.dst.ip(),
        dport: conn.dst.port(),
        in_iface: None,
        out_iface: None,
        owner: None,
        mark: 0,
        ctmark: 0,
    }
}

/// Updates the verdict with what stopped the walk of each table of a hook: a drop, a TPROXY
/// (which a later REDIRECT does not override) or a REDIRECT.
fn settle(stops: Vec<(Table, Stop)>, verdict: &mut Verdict) {
    for (_, stop) in stops {
        match stop {
            Stop::Drop => *verdict = Verdict::Dropped,
            Stop::Tproxy(p) => *verdict = Verdict::Tproxy { port: p },
            Stop::Redirect(p) if !matches!(verdict, Verdict::Tproxy { .. }) => {
                *verdict = Verdict::Redirect { port: p };
            }
            Stop::Redirect(_) | Stop::Accept => {}
        }
    }
}

const ALL_TABLES: [Table; 3] = [Table::Raw, Table::Mangle, Table::Nat];

impl Walker<'_> {
    /// An outbound connection: OUTPUT, then (when it is redirected to, or addressed to,
    /// loopback) PREROUTING on lo.
    fn outbound(&mut self, conn: &Connection, family: Family, notes: &mut Vec<String>) -> Verdict {
        let mut verdict = Verdict::Bypass;
        self.pkt.out_iface = Some(conn.iface.clone());
        self.pkt.owner = Some((conn.uid, conn.gid));
        let stops = self.hook("OUTPUT", &ALL_TABLES, chain::OUTPUT);
        settle(stops, &mut verdict);
        if let Verdict::Redirect { port } = verdict {
            self.pkt.dst = family.loopback();
            self.pkt.dport = port;
            self.pkt.out_iface = Some("lo".into());
            notes.push(format!(
                "REDIRECT in OUTPUT rewrites the destination to {}",
                SocketAddr::new(self.pkt.dst, port)
            ));
        }
        if verdict != Verdict::Dropped && self.pkt.out_iface.as_deref() == Some("lo") {
            self.pkt.in_iface = Some("lo".into());
            self.pkt.out_iface = None;
            self.pkt.owner = None;
            notes.push(
                "it comes back in on lo: raw and mangle PREROUTING see it again; nat PREROUTING does not (NAT was decided in OUTPUT)"
                    .into(),
            );
            let stops = self.hook(
                "PREROUTING (looped back on lo)",
                &[Table::Raw, Table::Mangle],
                chain::PREROUTING,
            );
            settle(stops, &mut verdict);
        }
        verdict
    }

    /// An inbound connection: PREROUTING.
    fn inbound(&mut self, conn: &Connection, notes: &mut Vec<String>) -> Verdict {
        let mut verdict = Verdict::Bypass;
        self.pkt.in_iface = Some(conn.iface.clone());
        let stops = self.hook("PREROUTING", &ALL_TABLES, chain::PREROUTING);
        if stops.iter().any(|(_, s)| matches!(s, Stop::Tproxy(_)))
            && stops.iter().any(|(_, s)| matches!(s, Stop::Redirect(_)))
        {
            notes.push(
                "both TPROXY (mangle) and REDIRECT (nat) matched: the TPROXY socket assignment takes the connection"
                    .into(),
            );
        }
        settle(stops, &mut verdict);
        verdict
    }
}

impl Trace {
    fn port_name(&self, port: u16) -> Option<&'static str> {
        self.port_names
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, n)| *n)
    }

    /// The verdict in one line.
    pub fn verdict_text(&self) -> String {
        let dst = self.connection.dst;
        let named = |port: u16| match self.port_name(port) {
            Some(n) => format!("port {port} ({n})"),
            None => format!("port {port}"),
        };
        match self.verdict {
            Verdict::Redirect { port } => format!(
                "redirected to {}; SO_ORIGINAL_DST there is {dst}",
                named(port)
            ),
            Verdict::Tproxy { port } => format!(
                "delivered by TPROXY to {}; the local address there is {dst}",
                named(port)
            ),
            Verdict::Bypass => format!("bypass: not captured, delivered to {dst} as addressed"),
            Verdict::Dropped => "dropped".to_owned(),
        }
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Connection: {}", self.connection)?;
        writeln!(f, "Rules passed ({} ruleset, kernel order):", self.family)?;
        let mut header: Option<(String, String, String)> = None;
        let mut hook_seen: Option<String> = None;
        for (i, s) in self.steps.iter().enumerate() {
            if hook_seen.as_deref() != Some(&s.hook) {
                writeln!(f, "{}:", s.hook)?;
                hook_seen = Some(s.hook.clone());
                header = None;
            }
            let key = (s.hook.clone(), s.table.clone(), s.chain.clone());
            if header.as_ref() != Some(&key) {
                writeln!(f, "{}{} {}", "  ".repeat(s.depth + 1), s.table, s.chain)?;
                header = Some(key);
            }
            let pad = "  ".repeat(s.depth + 2);
            let mark = if Some(i) == self.deciding {
                "  <== decides"
            } else {
                ""
            };
            match &s.outcome {
                Outcome::Matched(what) => {
                    writeln!(f, "{pad}{:>2}. {}  -> {what}{mark}", s.position, s.rule)?;
                }
                Outcome::NoMatch(why) => {
                    writeln!(f, "{pad}{:>2}. {}  -- no match ({why})", s.position, s.rule)?;
                }
            }
            // After a jump returns, later rules of the outer chain get the header again.
            if let Some(next) = self.steps.get(i + 1) {
                if next.depth < s.depth {
                    header = None;
                }
            }
        }
        if self.steps.is_empty() {
            writeln!(f, "  (no rule applies)")?;
        }
        let mut deciding = String::new();
        match self.deciding.and_then(|i| self.steps.get(i)) {
            Some(s) => {
                let _ = write!(
                    deciding,
                    "{} {} rule {}: {}",
                    s.table, s.chain, s.position, s.rule
                );
            }
            None => deciding.push_str("no rule: the packet went through unchanged"),
        }
        writeln!(f, "Decided by: {deciding}")?;
        for n in &self.notes {
            writeln!(f, "Note: {n}")?;
        }
        writeln!(f, "Verdict: {}", self.verdict_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Facts, build};
    use crate::settings::cli::Defaults;
    use crate::settings::config::tests::resolve;

    fn conn(dir: &str, dst: &str, extra: &[(&str, &str)]) -> Connection {
        let mut a = TraceArgs {
            direction: dir.into(),
            destination: dst.into(),
            proto: "tcp".into(),
            uid: None,
            gid: None,
            iface: None,
            src: None,
        };
        for (k, v) in extra {
            let v = (*v).to_owned();
            match *k {
                "uid" => a.uid = Some(v),
                "gid" => a.gid = Some(v),
                "iface" => a.iface = Some(v),
                "src" => a.src = Some(v),
                "proto" => a.proto = v,
                _ => panic!("{k}"),
            }
        }
        Connection::parse(&a).unwrap()
    }

    fn verdict(args: &[&str], facts: &Facts, c: &Connection) -> (Verdict, Trace) {
        let cfg = resolve(Defaults::Native, args, &[]).unwrap();
        let rs: Vec<Ruleset> = build(&cfg, facts).rulesets();
        let t = trace(
            &cfg,
            &rs,
            c,
            &|_| None,
            &crate::backend::iptables::render::Layout,
        );
        (t.verdict, t)
    }

    #[test]
    fn default_sidecar_matrix() {
        let f = Facts::default();
        let redirect = |p| Verdict::Redirect { port: p };
        for (c, want) in [
            (
                conn("out", "10.0.0.1:80", &[("uid", "1000")]),
                redirect(15001),
            ),
            (
                conn("out", "10.0.0.1:80", &[("uid", "1337")]),
                Verdict::Bypass,
            ),
            (
                conn("out", "10.0.0.1:80", &[("gid", "1337"), ("uid", "5")]),
                Verdict::Bypass,
            ),
            (
                conn("out", "127.0.0.1:8080", &[("uid", "1000")]),
                Verdict::Bypass,
            ),
            (
                conn("out", "10.0.0.9:8080", &[("uid", "1000"), ("iface", "lo")]),
                Verdict::Bypass,
            ),
            (
                conn("out", "10.0.0.9:8080", &[("uid", "1337"), ("iface", "lo")]),
                redirect(15006),
            ),
            (
                conn("out", "10.0.0.9:15008", &[("uid", "1337"), ("iface", "lo")]),
                Verdict::Bypass,
            ),
            (
                conn("out", "10.0.0.1:53", &[("proto", "udp")]),
                Verdict::Bypass,
            ),
            (conn("in", "10.0.0.9:8080", &[]), redirect(15006)),
            (conn("in", "10.0.0.9:15021", &[]), Verdict::Bypass),
            (conn("in", "10.0.0.9:15008", &[]), Verdict::Bypass),
            (
                conn("in", "10.0.0.9:53", &[("proto", "udp")]),
                Verdict::Bypass,
            ),
        ] {
            let (got, t) = verdict(&[], &f, &c);
            assert_eq!(got, want, "{c}\n{t}");
        }
    }

    #[test]
    fn deciding_rule_and_report() {
        let c = conn("out", "10.0.0.1:80", &[("uid", "1337")]);
        let (_, t) = verdict(&[], &Facts::default(), &c);
        let d = &t.steps[t.deciding.unwrap()];
        assert_eq!(d.rule, "-m owner --uid-owner 1337 -j RETURN");
        let text = t.to_string();
        assert!(
            text.contains("Verdict: bypass: not captured, delivered to 10.0.0.1:80 as addressed"),
            "{text}"
        );
        assert!(
            text.contains("-- no match (-o lo does not hold: leaves by eth0)"),
            "{text}"
        );

        let c = conn("out", "10.0.0.1:80", &[("uid", "1000")]);
        let (_, t) = verdict(&[], &Facts::default(), &c);
        let text = t.to_string();
        assert!(
            text.contains(
                "Decided by: nat ISTIO_REDIRECT rule 1: -p tcp -j REDIRECT --to-ports 15001"
            ),
            "{text}"
        );
        assert!(text.contains("Verdict: redirected to port 15001 (the proxy's outbound listener); SO_ORIGINAL_DST there is 10.0.0.1:80"), "{text}");
    }

    #[test]
    fn dns_exclusions_and_ipv6() {
        let facts = Facts {
            ipv6: true,
            dns_servers: vec![
                "10.96.0.10".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
        };
        let args = [
            "--redirect-dns",
            "-x",
            "10.1.0.0/16",
            "-o",
            "5432",
            "-q",
            "9000",
            "-i",
            "10.0.0.0/8,2001:db8::/32",
        ];
        let redirect = |p| Verdict::Redirect { port: p };
        for (c, want) in [
            (
                conn("out", "10.96.0.10:53", &[("proto", "udp"), ("uid", "1000")]),
                redirect(15053),
            ),
            (
                conn("out", "10.96.0.10:53", &[("proto", "udp"), ("uid", "1337")]),
                Verdict::Bypass,
            ),
            (
                conn("out", "10.96.0.11:53", &[("proto", "udp"), ("uid", "1000")]),
                Verdict::Bypass,
            ),
            (
                conn("out", "[2001:db8::53]:53", &[("proto", "tcp")]),
                redirect(15053),
            ),
            (conn("out", "10.1.2.3:80", &[]), Verdict::Bypass),
            (conn("out", "10.2.2.3:5432", &[]), Verdict::Bypass),
            (conn("out", "192.0.2.1:9000", &[]), redirect(15001)),
            (conn("out", "192.0.2.1:80", &[]), Verdict::Bypass),
            (conn("out", "[2001:db8::1]:80", &[]), redirect(15001)),
            (conn("out", "[::1]:80", &[]), Verdict::Bypass),
        ] {
            let (got, t) = verdict(&args, &facts, &c);
            assert_eq!(got, want, "{c}\n{t}");
        }
        // No IPv6 rules: nothing captures IPv6.
        let c = conn("out", "[2001:db8::1]:80", &[]);
        let (got, t) = verdict(&[], &Facts::default(), &c);
        assert_eq!(got, Verdict::Bypass);
        assert!(t.notes.iter().any(|n| n.contains("no IPv6 rules")), "{t}");
    }

    #[test]
    fn tproxy_and_interfaces() {
        let f = Facts::default();
        let args = ["-m", "TPROXY", "-c", "eth9", "-k", "net1", "--drop-invalid"];
        for (c, want) in [
            (
                conn("in", "10.0.0.9:8080", &[]),
                Verdict::Tproxy { port: 15006 },
            ),
            (conn("in", "10.0.0.9:15020", &[]), Verdict::Bypass),
            (
                conn("in", "10.0.0.9:8080", &[("iface", "eth9")]),
                Verdict::Bypass,
            ),
            (
                conn("out", "10.0.0.1:80", &[("iface", "eth9")]),
                Verdict::Bypass,
            ),
            (
                conn("out", "10.0.0.9:8080", &[("uid", "1337"), ("iface", "lo")]),
                Verdict::Redirect { port: 15006 },
            ),
            (
                conn("out", "10.0.0.9:8080", &[("uid", "1000"), ("iface", "lo")]),
                Verdict::Bypass,
            ),
        ] {
            let (got, t) = verdict(&args, &f, &c);
            assert_eq!(got, want, "{c}\n{t}");
        }
        // A kube-virt interface in REDIRECT mode: inbound goes to the outbound listener.
        let c = conn("in", "10.0.0.9:80", &[("iface", "net1")]);
        let (got, t) = verdict(&["-k", "net1"], &f, &c);
        assert_eq!(got, Verdict::Redirect { port: 15001 }, "{t}");
    }

    #[test]
    fn bad_trace_arguments() {
        let mut a = TraceArgs {
            direction: "sideways".into(),
            destination: "10.0.0.1:80".into(),
            proto: "tcp".into(),
            uid: None,
            gid: None,
            iface: None,
            src: None,
        };
        assert_eq!(
            Connection::parse(&a).unwrap_err().to_string(),
            "invalid direction \"sideways\" for trace: expected in or out"
        );
        a.direction = "out".into();
        a.destination = "10.0.0.1".into();
        assert!(
            Connection::parse(&a)
                .unwrap_err()
                .to_string()
                .starts_with("invalid destination \"10.0.0.1\" for trace: expected ADDRESS:PORT")
        );
        a.destination = "10.0.0.1:80".into();
        a.uid = Some("-1".into());
        assert_eq!(
            Connection::parse(&a).unwrap_err().to_string(),
            "invalid uid \"-1\" for trace --uid: negative ids are not valid"
        );
        a.uid = None;
        a.src = Some("::1".into());
        assert!(
            Connection::parse(&a)
                .unwrap_err()
                .to_string()
                .contains("different IP families")
        );
    }
}
