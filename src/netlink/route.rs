//! TPROXY policy routing and the `::6` passthrough address, over rtnetlink (no `ip` binary).
//!
//! TPROXY mode marks captured inbound packets; a policy rule `fwmark <mark> lookup <table>`
//! and a `local` default route on `lo` in that table deliver them to the proxy's transparent
//! listener. With IPv6 on, the proxy's inbound passthrough source `::6` must exist on `lo`.
//! Every object is idempotent: an identical existing rule, route or address is success, and
//! a conflicting one (another default route in the table) is a clear error.
//!
//! Two steps, so that a failure never leaves routing half-changed: [`prepare`] reads the
//! current rules and routes and finds any conflict before anything is changed (it runs before
//! the iptables programs start); [`Prepared::commit`] only sends the additions (it runs in the
//! last moment before the rules are written) and undoes its own additions when one fails; and
//! [`Added::undo`] removes exactly what this run added when the rules then fail.
//!
//! Effects: one `NETLINK_ROUTE` socket in the current thread's network namespace. The
//! message encoding and decoding are pure functions with unit tests.

use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{Context, anyhow, bail};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

use crate::config::{Config, Interception};
use crate::net::Family;
use crate::ruleset::Facts;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_DUMP: u16 = 0x300;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;
const RTPROT_BOOT: u8 = 3;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;

fn af(family: Family) -> u8 {
    match family {
        Family::V4 => AF_INET,
        Family::V6 => AF_INET6,
    }
}

/// Builds one netlink request.
#[derive(Debug)]
pub(crate) struct Request {
    buf: Vec<u8>,
}

impl Request {
    pub(crate) fn new(kind: u16, flags: u16, seq: u32) -> Request {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        Request { buf }
    }

    pub(crate) fn bytes(mut self, b: &[u8]) -> Request {
        self.buf.extend_from_slice(b);
        self
    }

    fn attr(mut self, kind: u16, payload: &[u8]) -> Request {
        let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
        self
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One received netlink message: type and payload (after the 16-byte header).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    kind: u16,
    seq: u32,
    payload: Vec<u8>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Splits a receive buffer into messages.
fn parse_messages(buf: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let Some(len) = u32_at(buf, off).map(|l| l as usize) else {
            break;
        };
        if len < 16 || off + len > buf.len() {
            break;
        }
        out.push(Message {
            kind: u16_at(buf, off + 4).unwrap_or_default(),
            seq: u32_at(buf, off + 8).unwrap_or_default(),
            payload: buf[off + 16..off + len].to_vec(),
        });
        off += align4(len);
    }
    out
}

/// The attributes after a fixed-size header, as (type, data).
fn parse_attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= b.len() {
        let len = u16_at(b, off).unwrap_or_default() as usize;
        let kind = u16_at(b, off + 2).unwrap_or_default() & 0x3fff;
        if len < 4 || off + len > b.len() {
            break;
        }
        out.push((kind, &b[off + 4..off + len]));
        off += align4(len);
    }
    out
}

fn attr_u32(attrs: &[(u16, &[u8])], kind: u16) -> Option<u32> {
    attrs
        .iter()
        .find(|(k, _)| *k == kind)
        .and_then(|(_, d)| u32_at(d, 0))
}

/// A policy rule as dumped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleInfo {
    action: u8,
    table: u32,
    fwmark: Option<u32>,
    fwmask: Option<u32>,
    selectors: bool,
}

fn parse_rule(p: &[u8]) -> Option<RuleInfo> {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags(u32)
    let hdr = p.get(..12)?;
    let attrs = parse_attrs(&p[12..]);
    Some(RuleInfo {
        action: hdr[7],
        table: attr_u32(&attrs, FRA_TABLE).unwrap_or(u32::from(hdr[4])),
        fwmark: attr_u32(&attrs, FRA_FWMARK),
        fwmask: attr_u32(&attrs, FRA_FWMASK),
        selectors: hdr[1] != 0 || hdr[2] != 0 || hdr[3] != 0,
    })
}

/// A route as dumped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouteInfo {
    table: u32,
    dst_len: u8,
    kind: u8,
    oif: Option<u32>,
    has_dst: bool,
}

fn parse_route(p: &[u8]) -> Option<RouteInfo> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags(u32)
    let hdr = p.get(..12)?;
    let attrs = parse_attrs(&p[12..]);
    Some(RouteInfo {
        table: attr_u32(&attrs, RTA_TABLE).unwrap_or(u32::from(hdr[4])),
        dst_len: hdr[1],
        kind: hdr[7],
        oif: attr_u32(&attrs, RTA_OIF),
        has_dst: attrs.iter().any(|(k, _)| *k == RTA_DST),
    })
}

fn table_byte(table: u32) -> u8 {
    // Tables above 255 only fit the attribute; the header then says RT_TABLE_UNSPEC.
    u8::try_from(table).unwrap_or(0)
}

/// `RTM_NEWRULE` (exclusive create) or `RTM_DELRULE` of the same rule.
fn rule_request(add: bool, family: Family, mark: u32, table: u32, seq: u32) -> Vec<u8> {
    let hdr = [
        af(family),
        0,
        0,
        0,
        table_byte(table),
        0,
        0,
        FR_ACT_TO_TBL,
        0,
        0,
        0,
        0,
    ];
    let (kind, flags) = change(add, RTM_NEWRULE, RTM_DELRULE);
    Request::new(kind, flags, seq)
        .bytes(&hdr)
        .attr(FRA_FWMARK, &mark.to_ne_bytes())
        .attr(FRA_TABLE, &table.to_ne_bytes())
        .finish()
}

/// `RTM_NEWROUTE` (exclusive create) or `RTM_DELROUTE` of the `local` default route.
fn route_request(add: bool, family: Family, table: u32, oif: u32, seq: u32) -> Vec<u8> {
    let hdr = [
        af(family),
        0,
        0,
        0,
        table_byte(table),
        RTPROT_BOOT,
        RT_SCOPE_HOST,
        RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    let (kind, flags) = change(add, RTM_NEWROUTE, RTM_DELROUTE);
    Request::new(kind, flags, seq)
        .bytes(&hdr)
        .attr(RTA_TABLE, &table.to_ne_bytes())
        .attr(RTA_OIF, &oif.to_ne_bytes())
        .finish()
}

/// `RTM_NEWADDR` (exclusive create) or `RTM_DELADDR` of an IPv6 address.
fn addr6_request(add: bool, addr: Ipv6Addr, prefix: u8, ifindex: u32, seq: u32) -> Vec<u8> {
    let mut hdr = vec![AF_INET6, prefix, IFA_F_NODAD, 0];
    hdr.extend_from_slice(&ifindex.to_ne_bytes());
    let (kind, flags) = change(add, RTM_NEWADDR, RTM_DELADDR);
    Request::new(kind, flags, seq)
        .bytes(&hdr)
        .attr(IFA_LOCAL, &addr.octets())
        .attr(IFA_ADDRESS, &addr.octets())
        .finish()
}

/// The message type and flags of an addition (exclusive create) or a removal.
fn change(add: bool, new: u16, del: u16) -> (u16, u16) {
    if add {
        (new, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
    } else {
        (del, NLM_F_REQUEST | NLM_F_ACK)
    }
}

fn dump_request(kind: u16, family: Family, seq: u32) -> Vec<u8> {
    Request::new(kind, NLM_F_REQUEST | NLM_F_DUMP, seq)
        .bytes(&[af(family), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .finish()
}

/// A netlink socket (`NETLINK_ROUTE` here; `apply::fast` opens a `NETLINK_NETFILTER` one).
#[derive(Debug)]
pub(crate) struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> anyhow::Result<Netlink> {
        Self::open_protocol(SockProtocol::NetlinkRoute)
    }

    pub(crate) fn open_protocol(protocol: SockProtocol) -> anyhow::Result<Netlink> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            protocol,
        )
        .context("opening a netlink socket")?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).context("binding the netlink socket")?;
        Ok(Netlink { fd, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    fn send(&self, req: &[u8]) -> Result<(), Errno> {
        send(self.fd.as_raw_fd(), req, MsgFlags::empty()).map(|_| ())
    }

    fn receive(&self) -> Result<Vec<Message>, Errno> {
        // A dump answer comes in pieces no larger than NLMSG_GOODSIZE (under 8 KiB) unless
        // the reader has shown a larger buffer: 8 KiB holds any of them, in two pages.
        let mut buf = vec![0u8; 8 * 1024];
        let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        Ok(parse_messages(&buf[..n]))
    }

    /// Sends a request and waits for its acknowledgement.
    fn request(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> Result<(), Errno> {
        let seq = self.next_seq();
        self.send(&build(seq))?;
        loop {
            for m in self.receive()? {
                if m.seq != seq || m.kind != NLMSG_ERROR {
                    continue;
                }
                let code = u32_at(&m.payload, 0).map_or(0, |c| c as i32);
                return if code == 0 {
                    Ok(())
                } else {
                    Err(Errno::from_raw(-code))
                };
            }
        }
    }

    /// Waits for the acknowledgements of the requests numbered `seqs`, in that order.
    fn acks(&mut self, seqs: &[u32]) -> Result<Vec<Result<(), Errno>>, Errno> {
        let mut out: Vec<Option<Result<(), Errno>>> = vec![None; seqs.len()];
        while out.iter().any(Option::is_none) {
            for m in self.receive()? {
                let Some(i) = seqs.iter().position(|&s| s == m.seq) else {
                    continue;
                };
                if m.kind == NLMSG_ERROR {
                    let code = u32_at(&m.payload, 0).map_or(0, |c| c as i32);
                    out[i] = Some(if code == 0 {
                        Ok(())
                    } else {
                        Err(Errno::from_raw(-code))
                    });
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Dumps objects and returns the payloads of the messages of type `kind`.
    fn dump(&mut self, get: u16, kind: u16, family: Family) -> Result<Vec<Vec<u8>>, Errno> {
        self.dump_with(|seq| dump_request(get, family, seq), kind)
    }

    /// Sends the dump request `build` makes for a sequence number and returns the payloads of
    /// the answers of type `kind`.
    pub(crate) fn dump_with(
        &mut self,
        build: impl FnOnce(u32) -> Vec<u8>,
        kind: u16,
    ) -> Result<Vec<Vec<u8>>, Errno> {
        let seq = self.next_seq();
        self.send(&build(seq))?;
        let mut out = Vec::new();
        loop {
            for m in self.receive()? {
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = u32_at(&m.payload, 0).map_or(0, |c| c as i32);
                        return Err(Errno::from_raw(-code));
                    }
                    k if k == kind => out.push(m.payload),
                    _ => {}
                }
            }
        }
    }
}

/// What the routing step does, derived from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Add `::6/128` to `lo`.
    pub passthrough_v6: bool,
    /// TPROXY: `fwmark mark lookup table` and `local default dev lo table table`, per family.
    pub tproxy: Option<(u32, u32, Vec<Family>)>,
}

impl RoutePlan {
    /// Istio's conditions: `::6` whenever IPv6 rules are on (any mode); the TPROXY rule and
    /// route when the mode is TPROXY and some inbound port is captured.
    pub fn new(cfg: &Config, facts: &Facts) -> RoutePlan {
        let tproxy = cfg.interception == Interception::Tproxy && !cfg.inbound_ports.is_empty();
        RoutePlan {
            passthrough_v6: facts.ipv6,
            tproxy: tproxy.then(|| {
                (
                    cfg.tproxy_mark.get(),
                    cfg.tproxy_route_table.get(),
                    facts.families(),
                )
            }),
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.passthrough_v6 && self.tproxy.is_none()
    }
}

/// One change to routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `::6/128` on `lo`.
    Passthrough,
    /// `fwmark <mark> lookup <table>`.
    Rule {
        family: Family,
        mark: u32,
        table: u32,
    },
    /// `local default dev lo table <table>`.
    Route { family: Family, table: u32 },
}

impl Step {
    fn describe(self) -> String {
        match self {
            Step::Passthrough => "::6/128 on lo".into(),
            Step::Rule {
                family,
                mark,
                table,
            } => format!("{family} policy rule `fwmark {mark} lookup {table}`"),
            Step::Route { family, table } => {
                let dst = match family {
                    Family::V4 => "0.0.0.0/0",
                    Family::V6 => "::/0",
                };
                format!("{family} route `local {dst} dev lo table {table}`")
            }
        }
    }

    fn request(self, add: bool, lo: u32, seq: u32) -> Vec<u8> {
        match self {
            Step::Passthrough => {
                addr6_request(add, Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6), 128, lo, seq)
            }
            Step::Rule {
                family,
                mark,
                table,
            } => rule_request(add, family, mark, table, seq),
            Step::Route { family, table } => route_request(add, family, table, lo, seq),
        }
    }
}

/// The routing changes a plan still needs, found without changing anything.
#[derive(Debug)]
pub struct Prepared {
    nl: Option<Netlink>,
    lo: u32,
    steps: Vec<Step>,
}

/// What [`Prepared::commit`] added (objects that already existed are not in it).
#[derive(Debug)]
pub struct Added {
    nl: Option<Netlink>,
    lo: u32,
    steps: Vec<Step>,
    /// Objects found already in place when adding (EEXIST).
    existed: Vec<Step>,
}

/// Reads the current policy rules and routes of the calling thread's namespace and works out
/// what the plan still needs. A conflict (another default route in the table) is an error
/// here, before anything has changed.
pub fn prepare(plan: &RoutePlan) -> anyhow::Result<Prepared> {
    if plan.is_empty() {
        return Ok(Prepared {
            nl: None,
            lo: 0,
            steps: Vec::new(),
        });
    }
    let mut nl = Netlink::open()?;
    let lo = nix::net::if_::if_nametoindex("lo").context("looking up the lo interface")?;
    let mut steps = Vec::new();
    if plan.passthrough_v6 {
        // Whether it exists is learnt from EEXIST when adding: no dump needed.
        steps.push(Step::Passthrough);
    }
    if let Some((mark, table, families)) = &plan.tproxy {
        for &family in families {
            let (mark, table) = (*mark, *table);
            if !rule_exists(&mut nl, family, mark, table)? {
                steps.push(Step::Rule {
                    family,
                    mark,
                    table,
                });
            }
            if !local_route_exists(&mut nl, family, table, lo)? {
                steps.push(Step::Route { family, table });
            }
        }
    }
    Ok(Prepared {
        nl: Some(nl),
        lo,
        steps,
    })
}

impl Prepared {
    /// Sends the additions, all in one batch: the kernel makes every one of them within one
    /// system call, so nothing can stop istio-init between two (apply/run.rs sends them as the
    /// last change before it releases the rules). An object that appeared meanwhile (EEXIST)
    /// is success and is not recorded as ours; when an addition fails, the others are removed
    /// again. Nothing is logged here ([`Added::report`]): this runs while the restores wait.
    pub fn commit(self) -> anyhow::Result<Added> {
        let Prepared { nl, lo, steps } = self;
        let mut added = Added {
            nl,
            lo,
            steps: Vec::new(),
            existed: Vec::new(),
        };
        let Some(nl) = added.nl.as_mut() else {
            return Ok(added);
        };
        if steps.is_empty() {
            return Ok(added);
        }
        let seqs: Vec<u32> = steps.iter().map(|_| nl.next_seq()).collect();
        let batch: Vec<u8> = steps
            .iter()
            .zip(&seqs)
            .flat_map(|(step, &seq)| step.request(true, lo, seq))
            .collect();
        nl.send(&batch)
            .map_err(|e| anyhow!("adding the TPROXY routing: sending the netlink batch: {e}"))?;
        let acks = nl.acks(&seqs).map_err(|e| {
            anyhow!(
                "adding the TPROXY routing: reading the kernel's answers: {e}; some of {} may \
                 have been added (istio-init --cleanup-only leaves routing alone; check `ip \
                 rule` and `ip route show table all`)",
                steps
                    .iter()
                    .map(|s| s.describe())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let mut failed = None;
        for (step, ack) in steps.into_iter().zip(acks) {
            match ack {
                Ok(()) => added.steps.push(step),
                Err(Errno::EEXIST) => added.existed.push(step),
                Err(e) => {
                    failed.get_or_insert_with(|| format!("adding the {}: {e}", step.describe()));
                }
            }
        }
        if let Some(why) = failed {
            added.report();
            added.undo();
            bail!(why);
        }
        Ok(added)
    }
}

impl Added {
    /// Logs what was added and what was found in place.
    pub fn report(&self) {
        for step in &self.steps {
            log::info!("added the {}", step.describe());
        }
        for step in &self.existed {
            log::info!("the {} already exists", step.describe());
        }
    }

    /// Removes what this run added, newest first (after the rules failed). Failures are
    /// logged: there is nothing better to do with them at that point.
    pub fn undo(mut self) {
        let lo = self.lo;
        let Some(nl) = self.nl.as_mut() else { return };
        for step in self.steps.drain(..).rev() {
            match nl.request(|seq| step.request(false, lo, seq)) {
                Ok(()) | Err(Errno::ENOENT | Errno::ESRCH | Errno::EADDRNOTAVAIL) => {
                    log::info!("removed the {} again", step.describe());
                }
                Err(e) => log::error!("could not remove the {}: {e}", step.describe()),
            }
        }
    }
}

/// Applies the plan in the current thread's namespace: [`prepare`] then [`Prepared::commit`],
/// and logs what changed.
pub fn configure(plan: &RoutePlan) -> anyhow::Result<Added> {
    let added = prepare(plan)?.commit()?;
    added.report();
    Ok(added)
}

fn rule_exists(nl: &mut Netlink, family: Family, mark: u32, table: u32) -> anyhow::Result<bool> {
    let rules = nl
        .dump(RTM_GETRULE, RTM_NEWRULE, family)
        .map_err(|e| anyhow!("listing the {family} policy rules: {e}"))?;
    Ok(rules.iter().filter_map(|p| parse_rule(p)).any(|r| {
        r.action == FR_ACT_TO_TBL
            && r.table == table
            && r.fwmark == Some(mark)
            && r.fwmask.is_none_or(|m| m == u32::MAX)
            && !r.selectors
    }))
}

fn local_route_exists(
    nl: &mut Netlink,
    family: Family,
    table: u32,
    lo: u32,
) -> anyhow::Result<bool> {
    let what = Step::Route { family, table }.describe();
    let routes = nl
        .dump(RTM_GETROUTE, RTM_NEWROUTE, family)
        .map_err(|e| anyhow!("listing the {family} routes: {e}"))?;
    let default = routes
        .iter()
        .filter_map(|p| parse_route(p))
        .find(|r| r.table == table && r.dst_len == 0 && !r.has_dst);
    match default {
        Some(r) if r.kind == RTN_LOCAL && r.oif == Some(lo) => Ok(true),
        Some(r) => bail!(
            "adding the {what}: table {table} already has a different default route (type {}, \
             interface index {}); choose another table with --istio-inbound-tproxy-route-table",
            r.kind,
            r.oif.map_or("none".into(), |i| i.to_string())
        ),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_request_layout() {
        let r = rule_request(true, Family::V4, 1337, 133, 7);
        assert_eq!(r.len(), 16 + 12 + 8 + 8);
        assert_eq!(u32_at(&r, 0), Some(44));
        assert_eq!(u16_at(&r, 4), Some(RTM_NEWRULE));
        assert_eq!(u32_at(&r, 8), Some(7));
        assert_eq!(r[16], AF_INET);
        assert_eq!(r[16 + 4], 133);
        assert_eq!(r[16 + 7], FR_ACT_TO_TBL);
        let info = parse_rule(&r[16..]).unwrap();
        assert_eq!(info.fwmark, Some(1337));
        assert_eq!(info.table, 133);
    }

    #[test]
    fn big_tables_go_in_the_attribute() {
        let r = route_request(true, Family::V6, 1000, 1, 1);
        let info = parse_route(&r[16..]).unwrap();
        assert_eq!(r[16 + 4], 0);
        assert_eq!(info.table, 1000);
        assert_eq!(info.kind, RTN_LOCAL);
        assert_eq!(info.oif, Some(1));
        assert!(!info.has_dst);
    }

    #[test]
    fn messages_split_on_aligned_boundaries() {
        let mut buf = addr6_request(true, Ipv6Addr::LOCALHOST, 128, 1, 1);
        buf.extend(dump_request(RTM_GETROUTE, Family::V4, 2));
        let msgs = parse_messages(&buf);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].kind, RTM_NEWADDR);
        assert_eq!(msgs[1].seq, 2);
        let attrs = parse_attrs(&msgs[0].payload[8..]);
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0].1, Ipv6Addr::LOCALHOST.octets());
    }
}
