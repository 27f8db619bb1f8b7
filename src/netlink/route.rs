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
//! Effects: one `NETLINK_ROUTE` socket ([`super::Socket`]) in the current thread's network
//! namespace. The messages are `netlink-packet-route` types; building them and reading the
//! dumped ones are pure functions with unit tests.

use std::net::{IpAddr, Ipv6Addr};

use anyhow::{Context, anyhow, bail};
use netlink_packet_core::Emitable;
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::errno::Errno;

use super::{CHANGE, CREATE, Error, Message, Socket};
use crate::capture::Facts;
use crate::net::Family;
use crate::settings::config::{Config, Interception};

fn af(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn table_byte(table: u32) -> u8 {
    // Tables above 255 only fit the attribute; the header then says RT_TABLE_UNSPEC.
    u8::try_from(table).unwrap_or(0)
}

/// The `fwmark <mark> lookup <table>` policy rule, to add or to remove.
fn rule_message(family: Family, mark: u32, table: u32) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = af(family);
    m.header.table = table_byte(table);
    m.header.action = RuleAction::ToTable;
    m.attributes = vec![RuleAttribute::FwMark(mark), RuleAttribute::Table(table)];
    m
}

/// The `local default dev <oif> table <table>` route, to add or to remove.
fn route_message(family: Family, table: u32, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = af(family);
    m.header.table = table_byte(table);
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::Host;
    m.header.kind = RouteType::Local;
    m.attributes = vec![RouteAttribute::Table(table), RouteAttribute::Oif(oif)];
    m
}

/// An IPv6 address on interface `index` (no duplicate address detection), to add or to remove.
fn addr6_message(addr: Ipv6Addr, prefix: u8, index: u32) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet6;
    m.header.prefix_len = prefix;
    m.header.flags = AddressHeaderFlags::Nodad;
    m.header.scope = AddressScope::Universe;
    m.header.index = index;
    m.attributes = vec![
        AddressAttribute::Local(IpAddr::V6(addr)),
        AddressAttribute::Address(IpAddr::V6(addr)),
    ];
    m
}

/// The message type `netlink-packet-route` gives a kind of message (`NewRule`, `GetRoute`, …).
fn kind<T: Default>(variant: fn(T) -> RouteNetlinkMessage) -> u16 {
    variant(T::default()).message_type()
}

/// The bodies of the messages that change routing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    Rule(RuleMessage),
    Route(RouteMessage),
    Address(AddressMessage),
}

impl Emitable for Body {
    fn buffer_len(&self) -> usize {
        match self {
            Body::Rule(m) => m.buffer_len(),
            Body::Route(m) => m.buffer_len(),
            Body::Address(m) => m.buffer_len(),
        }
    }

    fn emit(&self, buffer: &mut [u8]) {
        match self {
            Body::Rule(m) => m.emit(buffer),
            Body::Route(m) => m.emit(buffer),
            Body::Address(m) => m.emit(buffer),
        }
    }
}

/// The add (exclusive create) or remove message of an object, with its header flags.
fn change<T: Default>(
    add: bool,
    body: Body,
    new: fn(T) -> RouteNetlinkMessage,
    del: fn(T) -> RouteNetlinkMessage,
) -> (Message<Body>, u16) {
    if add {
        (
            Message {
                kind: kind(new),
                body,
            },
            CREATE,
        )
    } else {
        (
            Message {
                kind: kind(del),
                body,
            },
            CHANGE,
        )
    }
}

/// A policy rule as dumped, reduced to what the match needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleInfo {
    action: RuleAction,
    table: u32,
    fwmark: Option<u32>,
    fwmask: Option<u32>,
    selectors: bool,
}

fn rule_info(m: &RuleMessage) -> RuleInfo {
    let h = &m.header;
    let mut info = RuleInfo {
        action: h.action,
        table: u32::from(h.table),
        fwmark: None,
        fwmask: None,
        selectors: h.dst_len != 0 || h.src_len != 0 || h.tos != 0,
    };
    for a in &m.attributes {
        match a {
            RuleAttribute::Table(t) => info.table = *t,
            RuleAttribute::FwMark(v) => info.fwmark = Some(*v),
            RuleAttribute::FwMask(v) => info.fwmask = Some(*v),
            _ => {}
        }
    }
    info
}

/// A route as dumped, reduced to what the conflict check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouteInfo {
    table: u32,
    dst_len: u8,
    kind: RouteType,
    oif: Option<u32>,
    has_dst: bool,
}

fn route_info(m: &RouteMessage) -> RouteInfo {
    let h = &m.header;
    let mut info = RouteInfo {
        table: u32::from(h.table),
        dst_len: h.destination_prefix_length,
        kind: h.kind,
        oif: None,
        has_dst: false,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => info.table = *t,
            RouteAttribute::Oif(i) => info.oif = Some(*i),
            RouteAttribute::Destination(_) => info.has_dst = true,
            _ => {}
        }
    }
    info
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

    /// The message that adds (exclusive create) or removes this object, with its header flags.
    fn message(self, add: bool, lo: u32) -> (Message<Body>, u16) {
        use RouteNetlinkMessage as M;
        match self {
            Step::Passthrough => {
                let addr = addr6_message(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6), 128, lo);
                change(add, Body::Address(addr), M::NewAddress, M::DelAddress)
            }
            Step::Rule {
                family,
                mark,
                table,
            } => {
                let rule = rule_message(family, mark, table);
                change(add, Body::Rule(rule), M::NewRule, M::DelRule)
            }
            Step::Route { family, table } => {
                let route = route_message(family, table, lo);
                change(add, Body::Route(route), M::NewRoute, M::DelRoute)
            }
        }
    }
}

/// The routing changes a plan still needs, found without changing anything.
#[derive(Debug)]
pub struct Prepared {
    nl: Option<Socket>,
    lo: u32,
    steps: Vec<Step>,
}

/// What [`Prepared::commit`] added (objects that already existed are not in it).
#[derive(Debug)]
pub struct Added {
    nl: Option<Socket>,
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
    let mut nl = Socket::route()?;
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
        let seqs = nl
            .send_all(steps.iter().map(|step| step.message(true, lo)))
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
            let (msg, flags) = step.message(false, lo);
            match nl.request(msg, flags) {
                Ok(()) | Err(Error::Os(Errno::ENOENT | Errno::ESRCH | Errno::EADDRNOTAVAIL)) => {
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

/// Whether a dumped rule is exactly `fwmark <mark> lookup <table>` (a mask of all ones is the
/// same as none; any other selector makes it a different rule).
fn is_tproxy_rule(r: &RuleInfo, mark: u32, table: u32) -> bool {
    r.action == RuleAction::ToTable
        && r.table == table
        && r.fwmark == Some(mark)
        && r.fwmask.is_none_or(|m| m == u32::MAX)
        && !r.selectors
}

fn rule_exists(nl: &mut Socket, family: Family, mark: u32, table: u32) -> anyhow::Result<bool> {
    let mut get = RuleMessage::default();
    get.header.family = af(family);
    let get = Message {
        kind: kind(RouteNetlinkMessage::GetRule),
        body: get,
    };
    let rules = nl
        .dump(get, kind(RouteNetlinkMessage::NewRule))
        .map_err(|e| anyhow!("listing the {family} policy rules: {e}"))?;
    Ok(rules
        .iter()
        .any(|r| is_tproxy_rule(&rule_info(r), mark, table)))
}

/// The default route (no destination) of `table` among dumped routes.
fn default_route(routes: &[RouteMessage], table: u32) -> Option<RouteInfo> {
    routes
        .iter()
        .map(route_info)
        .find(|r| r.table == table && r.dst_len == 0 && !r.has_dst)
}

fn local_route_exists(
    nl: &mut Socket,
    family: Family,
    table: u32,
    lo: u32,
) -> anyhow::Result<bool> {
    let what = Step::Route { family, table }.describe();
    let mut get = RouteMessage::default();
    get.header.address_family = af(family);
    let get = Message {
        kind: kind(RouteNetlinkMessage::GetRoute),
        body: get,
    };
    let routes = nl
        .dump(get, kind(RouteNetlinkMessage::NewRoute))
        .map_err(|e| anyhow!("listing the {family} routes: {e}"))?;
    match default_route(&routes, table) {
        Some(r) if r.kind == RouteType::Local && r.oif == Some(lo) => Ok(true),
        Some(r) => bail!(
            "adding the {what}: table {table} already has a different default route (type {}, \
             interface index {}); choose another table with --istio-inbound-tproxy-route-table",
            u8::from(r.kind),
            r.oif.map_or("none".into(), |i| i.to_string())
        ),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};

    use super::super::{encode, split};
    use super::*;

    /// Encodes a step's message as the batch does, and decodes it back with the crate's
    /// all-kinds decoder (which checks the message type too).
    fn round_trip(step: Step, add: bool, lo: u32, seq: u32) -> (Vec<u8>, u16, RouteNetlinkMessage) {
        let (msg, flags) = step.message(add, lo);
        let mut buf = Vec::new();
        encode(&mut buf, msg, flags, seq);
        let parts = split(&buf).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].0.sequence_number, seq);
        let decoded = NetlinkMessage::<RouteNetlinkMessage>::deserialize(parts[0].1).unwrap();
        let NetlinkPayload::InnerMessage(m) = decoded.payload else {
            panic!("not a route message: {decoded:?}");
        };
        let flags = parts[0].0.flags;
        (buf, flags, m)
    }

    #[test]
    fn rule_request_layout() {
        let step = Step::Rule {
            family: Family::V4,
            mark: 1337,
            table: 133,
        };
        let (r, flags, m) = round_trip(step, true, 1, 7);
        // Header, struct fib_rule_hdr, FRA_FWMARK and FRA_TABLE (u32 each).
        assert_eq!(r.len(), 16 + 12 + 8 + 8);
        assert_eq!(flags, CREATE);
        assert_eq!(r[16], u8::from(AddressFamily::Inet));
        assert_eq!(r[16 + 4], 133);
        assert_eq!(r[16 + 7], u8::from(RuleAction::ToTable));
        let RouteNetlinkMessage::NewRule(rule) = m else {
            panic!("not a new rule: {m:?}");
        };
        let info = rule_info(&rule);
        assert_eq!(info.fwmark, Some(1337));
        assert_eq!(info.table, 133);
        assert!(is_tproxy_rule(&info, 1337, 133));
        assert!(!is_tproxy_rule(&info, 1338, 133));
        let masked = RuleInfo {
            fwmask: Some(0xff),
            ..info.clone()
        };
        assert!(!is_tproxy_rule(&masked, 1337, 133));
        let (_, flags, m) = round_trip(step, false, 1, 8);
        assert_eq!(flags, CHANGE);
        assert!(matches!(m, RouteNetlinkMessage::DelRule(r) if r == rule));
    }

    #[test]
    fn big_tables_go_in_the_attribute() {
        let step = Step::Route {
            family: Family::V6,
            table: 1000,
        };
        let (r, _, m) = round_trip(step, true, 1, 1);
        assert_eq!(r[16 + 4], 0);
        let RouteNetlinkMessage::NewRoute(route) = m else {
            panic!("not a new route: {m:?}");
        };
        let routes = [route];
        let info = default_route(&routes, 1000).expect("the default route of table 1000");
        assert_eq!(info.table, 1000);
        assert_eq!(info.kind, RouteType::Local);
        assert_eq!(info.oif, Some(1));
        assert!(!info.has_dst);
        assert_eq!(default_route(&routes, 232), None);
    }

    #[test]
    fn passthrough_address_layout() {
        let (r, flags, m) = round_trip(Step::Passthrough, true, 1, 3);
        // Header, struct ifaddrmsg, IFA_LOCAL and IFA_ADDRESS (16 bytes each).
        assert_eq!(r.len(), 16 + 8 + 20 + 20);
        assert_eq!(flags, CREATE);
        let RouteNetlinkMessage::NewAddress(a) = m else {
            panic!("not a new address: {m:?}");
        };
        assert_eq!(a.header.prefix_len, 128);
        assert_eq!(a.header.index, 1);
        assert!(a.header.flags.contains(AddressHeaderFlags::Nodad));
        let six = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));
        assert_eq!(
            a.attributes,
            vec![AddressAttribute::Local(six), AddressAttribute::Address(six)]
        );
    }
}
