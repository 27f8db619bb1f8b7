//! Istio's build steps (in the order of its `istio-iptables` capture code, numbered in the
//! comments), run
//! once for every programmed family: a rule that involves an address is emitted once per
//! family, each copy right after the other, so the per-family projections keep istio-iptables'
//! order and an inet table gets Istio's nftables order.

use super::Match::{Connmark, CtState, Dport, Dports, InIface, Mark, OutIface, Sport, Src};
use super::Table::{Mangle, Nat, Raw};
use super::chain::{
    ISTIO_DIVERT, ISTIO_DROP, ISTIO_IN_REDIRECT, ISTIO_INBOUND, ISTIO_OUTPUT, ISTIO_OUTPUT_DNS,
    ISTIO_REDIRECT, ISTIO_TPROXY, OUTPUT, PREROUTING,
};
use super::{Capture, Facts, Match, Owner, Proto, Rule, Table, Target, dns_capture};
use crate::net::{Cidr, Family, Group, Iface, Port, PortItem};
use crate::settings::config::{Config, InboundPorts, Interception, OutboundCidrs, OwnerGroups};

/// Collects rules in emission order.
struct Builder {
    families: Vec<Family>,
    rules: Vec<Rule>,
}

impl Builder {
    /// Adds a rule, tagged with the family of its address if it has one; a rule for a family
    /// that is not programmed is dropped.
    fn push(
        &mut self,
        table: Table,
        chain: &'static str,
        insert_at: Option<u32>,
        matches: Vec<Match>,
        target: Target,
    ) {
        let family = matches.iter().find_map(|m| match m {
            Match::Src(c) | Match::Dst { net: c, .. } => Some(c.family()),
            _ => None,
        });
        if family.is_some_and(|f| !self.families.contains(&f)) {
            return;
        }
        self.rules.push(Rule {
            family,
            table,
            chain,
            insert_at,
            matches,
            target,
        });
    }

    fn append(&mut self, table: Table, chain: &'static str, matches: Vec<Match>, target: Target) {
        self.push(table, chain, None, matches, target);
    }

    /// [`Builder::append`] of a rule without an address that only some of the programmed
    /// families need: once for all of them, or once per family with an explicit tag.
    fn append_for(
        &mut self,
        only: &[Family],
        table: Table,
        chain: &'static str,
        matches: Vec<Match>,
        target: Target,
    ) {
        if only == self.families.as_slice() {
            self.append(table, chain, matches, target);
            return;
        }
        for &f in only {
            self.rules.push(Rule {
                family: Some(f),
                table,
                chain,
                insert_at: None,
                matches: matches.clone(),
                target: target.clone(),
            });
        }
    }

    fn insert(
        &mut self,
        table: Table,
        chain: &'static str,
        at: u32,
        matches: Vec<Match>,
        target: Target,
    ) {
        self.push(table, chain, Some(at), matches, target);
    }
}

/// The agent's DNS listener.
pub const DNS_PORT: Port = Port::fixed(15053);
const PORT_53: PortItem = PortItem::One(Port::fixed(53));
const PORT_15053: PortItem = PortItem::One(Port::fixed(15053));

/// Builds the capture for the families [`Facts::families`] enables: Istio's steps, in its order.
pub fn build(cfg: &Config, facts: &Facts) -> Capture {
    let mut s = Steps::new(cfg, facts);
    s.excluded_interfaces(); // 1
    s.virtual_interfaces_not_inbound(); // 2
    s.drop_invalid(); // 3
    s.tunnel_port_not_inbound(); // 4
    s.redirect_chains(); // 5, 6
    s.inbound_capture(); // 7
    s.outbound_entry(); // 8
    s.outbound_port_exclusions(); // 9
    s.passthrough_source(); // 10
    s.proxy_own_traffic(); // 11, 12
    s.owner_groups(); // 13
    if s.dns {
        build_dns(&mut s.b, cfg, facts); // 14
    }
    s.loopback_destinations(); // 15
    s.outbound_cidr_exclusions(); // 16
    s.outbound_ports_included(); // 17
    s.outbound_cidr_inclusions(); // 18
    s.tproxy_marks(); // 19
    Capture {
        families: s.b.families,
        rules: s.b.rules,
    }
}

/// One build: the rules so far and what the steps read.
struct Steps<'a> {
    b: Builder,
    cfg: &'a Config,
    tproxy: bool,
    dns: bool,
    /// The proxy's owners (its uids, then its gids), each with whether it is a uid.
    owners: Vec<(Owner, bool)>,
}

fn tcp() -> Match {
    Match::Proto(Proto::Tcp)
}

fn udp() -> Match {
    Match::Proto(Proto::Udp)
}

fn dport(port: PortItem) -> Match {
    Match::Dport { neg: false, port }
}

fn dst(net: Cidr) -> Match {
    Match::Dst { neg: false, net }
}

fn lo() -> Iface {
    "lo".parse().unwrap_or_else(|_| unreachable!())
}

fn owner(neg: bool, owner: Owner) -> Match {
    Match::Owner { neg, owner }
}

impl<'a> Steps<'a> {
    fn new(cfg: &'a Config, facts: &Facts) -> Self {
        let owners = (cfg.proxy_uids.iter().map(|u| (Owner::Uid(*u), true)))
            .chain((cfg.proxy_gids.iter()).map(|g| (Owner::Gid(Group::Id(*g)), false)))
            .collect();
        Steps {
            b: Builder {
                families: facts.families(),
                rules: Vec::new(),
            },
            cfg,
            tproxy: cfg.interception == Interception::Tproxy,
            dns: dns_capture(cfg, facts),
            owners,
        }
    }

    fn families(&self) -> Vec<Family> {
        self.b.families.clone()
    }

    /// Not the family's loopback range (the proxy's own traffic to the pod's address).
    fn not_loopback(&self, f: Family) -> Match {
        Match::Dst {
            neg: true,
            net: self.cfg.loopback_of(f),
        }
    }

    /// Step 1: excluded interfaces bypass everything (nat, and mangle in TPROXY mode).
    fn excluded_interfaces(&mut self) {
        let tables: &[Table] = if self.tproxy { &[Nat, Mangle] } else { &[Nat] };
        for &t in tables {
            for x in &self.cfg.exclude_interfaces {
                self.b
                    .append(t, PREROUTING, vec![InIface(x.clone())], Target::Return);
                self.b
                    .append(t, OUTPUT, vec![OutIface(x.clone())], Target::Return);
            }
        }
    }

    /// Step 2: inbound traffic on rerouted virtual interfaces is not captured as inbound.
    fn virtual_interfaces_not_inbound(&mut self) {
        for v in &self.cfg.virt_interfaces {
            self.b
                .insert(Nat, PREROUTING, 1, vec![InIface(v.clone())], Target::Return);
        }
    }

    /// Step 3: drop conntrack-INVALID packets instead of letting them reset connections.
    fn drop_invalid(&mut self) {
        if self.cfg.drop_invalid {
            let invalid = vec![CtState("INVALID")];
            self.b
                .append(Mangle, PREROUTING, invalid, Target::Jump(ISTIO_DROP));
            self.b.append(Mangle, ISTIO_DROP, vec![], Target::Drop);
        }
    }

    /// Step 4: the HBONE tunnel port is never captured inbound.
    fn tunnel_port_not_inbound(&mut self) {
        let tun = PortItem::One(self.cfg.inbound_tunnel_port);
        self.b
            .append(Nat, ISTIO_INBOUND, vec![tcp(), dport(tun)], Target::Return);
    }

    /// Steps 5 and 6: the two redirect chains.
    fn redirect_chains(&mut self) {
        let redirect = |port| Target::Redirect {
            port,
            singular: false,
        };
        let (out, inbound) = (self.cfg.proxy_port, self.cfg.inbound_capture_port);
        self.b
            .append(Nat, ISTIO_REDIRECT, vec![tcp()], redirect(out));
        self.b
            .append(Nat, ISTIO_IN_REDIRECT, vec![tcp()], redirect(inbound));
    }

    /// Step 7: inbound capture, by REDIRECT (nat) or TPROXY (mangle).
    fn inbound_capture(&mut self) {
        if self.cfg.inbound_ports.is_empty() {
            return;
        }
        let t = if self.tproxy { Mangle } else { Nat };
        if self.tproxy {
            self.tproxy_chains();
        }
        self.b
            .append(t, PREROUTING, vec![tcp()], Target::Jump(ISTIO_INBOUND));
        match &self.cfg.inbound_ports {
            InboundPorts::All => {
                for p in &self.cfg.inbound_exclude_ports {
                    self.b
                        .append(t, ISTIO_INBOUND, vec![tcp(), dport(*p)], Target::Return);
                }
                self.capture_inbound(vec![tcp()]);
            }
            InboundPorts::Only(ports) => {
                for p in ports {
                    self.capture_inbound(vec![tcp(), dport(*p)]);
                }
            }
        }
    }

    /// Step 7's TPROXY chains: ISTIO_DIVERT marks and accepts, ISTIO_TPROXY diverts to the
    /// inbound capture port what is not for loopback.
    fn tproxy_chains(&mut self) {
        let mark = self.cfg.tproxy_mark;
        self.b
            .append(Mangle, ISTIO_DIVERT, vec![], Target::SetMark(mark.get()));
        self.b.append(Mangle, ISTIO_DIVERT, vec![], Target::Accept);
        for f in self.families() {
            self.b.append(
                Mangle,
                ISTIO_TPROXY,
                vec![self.not_loopback(f), tcp()],
                Target::Tproxy {
                    mark,
                    on_port: self.cfg.inbound_capture_port,
                },
            );
        }
    }

    /// Step 7's capture of inbound TCP matching `m`.
    fn capture_inbound(&mut self, m: Vec<Match>) {
        if self.tproxy {
            let mut established = m.clone();
            established.push(CtState("RELATED,ESTABLISHED"));
            self.b.append(
                Mangle,
                ISTIO_INBOUND,
                established,
                Target::Jump(ISTIO_DIVERT),
            );
            self.b
                .append(Mangle, ISTIO_INBOUND, m, Target::Jump(ISTIO_TPROXY));
        } else {
            self.b
                .append(Nat, ISTIO_INBOUND, m, Target::Jump(ISTIO_IN_REDIRECT));
        }
    }

    /// Step 8: all outbound traffic enters ISTIO_OUTPUT (UDP is filtered inside).
    fn outbound_entry(&mut self) {
        self.b
            .append(Nat, OUTPUT, vec![], Target::Jump(ISTIO_OUTPUT));
    }

    /// Step 9: outbound port exclusions, TCP and UDP.
    fn outbound_port_exclusions(&mut self) {
        for p in &self.cfg.outbound_ports_exclude {
            for proto in [tcp(), udp()] {
                self.b
                    .append(Nat, ISTIO_OUTPUT, vec![proto, dport(*p)], Target::Return);
            }
        }
    }

    /// Step 10: the proxy's inbound passthrough source (127.0.0.6 / ::6) is never captured.
    fn passthrough_source(&mut self) {
        for f in self.families() {
            let m = vec![OutIface(lo()), Src(Cidr::host(f.passthrough()))];
            self.b.append(Nat, ISTIO_OUTPUT, m, Target::Return);
        }
    }

    /// Steps 11 and 12: the proxy's own traffic, per owner.
    fn proxy_own_traffic(&mut self) {
        let include_has_loopback = match &self.cfg.outbound_include {
            OutboundCidrs::All => false,
            OutboundCidrs::Only(v) => v.iter().any(|c| c.is_loopback()),
        };
        let tun = PortItem::One(self.cfg.inbound_tunnel_port);
        for (who, is_uid) in self.owners.clone() {
            // a: the proxy talking to the pod's own address over lo goes through inbound
            // capture.
            let skip_ports = if self.dns && is_uid {
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
            for f in self.families() {
                let m = vec![
                    OutIface(lo()),
                    self.not_loopback(f),
                    tcp(),
                    skip_ports.clone(),
                    owner(false, who.clone()),
                ];
                self.b
                    .append(Nat, ISTIO_OUTPUT, m, Target::Jump(ISTIO_IN_REDIRECT));
            }
            // b: app-to-app traffic over lo is left alone (unless loopback is explicitly
            // captured).
            if !include_has_loopback {
                let m = if self.dns {
                    let not53 = Dport {
                        neg: true,
                        port: PORT_53,
                    };
                    vec![OutIface(lo()), tcp(), not53, owner(true, who.clone())]
                } else {
                    vec![OutIface(lo()), owner(true, who.clone())]
                };
                self.b.append(Nat, ISTIO_OUTPUT, m, Target::Return);
            }
            // c: never loop the proxy's own traffic back to it.
            self.b
                .append(Nat, ISTIO_OUTPUT, vec![owner(false, who)], Target::Return);
        }
    }

    /// Step 13: owner-group filter.
    fn owner_groups(&mut self) {
        let gid = |neg: bool, g: &Group| owner(neg, Owner::Gid(g.clone()));
        match &self.cfg.owner_groups {
            OwnerGroups::AllExcept(groups) => {
                for g in groups {
                    self.b
                        .append(Nat, ISTIO_OUTPUT, vec![gid(false, g)], Target::Return);
                }
            }
            OwnerGroups::Only(groups) => {
                let m = groups.iter().map(|g| gid(true, g)).collect();
                self.b.append(Nat, ISTIO_OUTPUT, m, Target::Return);
            }
        }
    }

    /// Step 15: loopback destinations are never captured.
    fn loopback_destinations(&mut self) {
        for f in self.families() {
            let m = vec![dst(self.cfg.loopback_of(f))];
            self.b.append(Nat, ISTIO_OUTPUT, m, Target::Return);
        }
    }

    /// Step 16: outbound CIDR exclusions (of the programmed families: see `Builder::push`).
    fn outbound_cidr_exclusions(&mut self) {
        for c in ipv4_first(self.cfg.outbound_exclude.clone()) {
            self.b
                .append(Nat, ISTIO_OUTPUT, vec![dst(c)], Target::Return);
        }
    }

    /// Step 17: outbound ports always captured.
    fn outbound_ports_included(&mut self) {
        for p in &self.cfg.outbound_ports_include {
            self.b.append(
                Nat,
                ISTIO_OUTPUT,
                vec![tcp(), dport(*p)],
                Target::Jump(ISTIO_REDIRECT),
            );
        }
    }

    /// Step 18: outbound CIDR inclusions (all, or those of the programmed families), and
    /// traffic arriving on virtual interfaces redirected the same way.
    fn outbound_cidr_inclusions(&mut self) {
        let to_proxy = Target::Jump(ISTIO_REDIRECT);
        let virt = &self.cfg.virt_interfaces;
        match &self.cfg.outbound_include {
            OutboundCidrs::All => {
                self.b.append(Nat, ISTIO_OUTPUT, vec![], to_proxy.clone());
                for v in virt {
                    let m = vec![InIface(v.clone())];
                    self.b.insert(Nat, PREROUTING, 1, m, to_proxy.clone());
                }
            }
            OutboundCidrs::Only(_) => {
                let families = self.families();
                for c in families
                    .iter()
                    .flat_map(|f| self.cfg.outbound_include.of(*f))
                {
                    for v in virt {
                        let m = vec![InIface(v.clone()), dst(c)];
                        self.b.insert(Nat, PREROUTING, 1, m, to_proxy.clone());
                    }
                    self.b
                        .append(Nat, ISTIO_OUTPUT, vec![dst(c)], to_proxy.clone());
                }
            }
        }
    }

    /// Step 19: TPROXY marks and connmarks (whenever the mode is TPROXY).
    fn tproxy_marks(&mut self) {
        if !self.tproxy {
            return;
        }
        let mark = self.cfg.tproxy_mark.get();
        let plain = |neg| Mark { neg, mark };
        let outbound = crate::net::Mark::OUTBOUND.get();
        self.b.append(
            Mangle,
            PREROUTING,
            vec![tcp(), plain(false)],
            Target::ConnmarkSave,
        );
        let m = vec![tcp(), OutIface(lo()), plain(false)];
        self.b.append(Mangle, OUTPUT, m, Target::Return);
        for (who, _) in self.owners.clone() {
            for f in self.families() {
                let m = vec![
                    self.not_loopback(f),
                    tcp(),
                    OutIface(lo()),
                    owner(false, who.clone()),
                ];
                self.b.append(Mangle, OUTPUT, m, Target::SetMark(outbound));
            }
        }
        let m = vec![tcp(), Connmark(mark)];
        self.b.append(Mangle, OUTPUT, m, Target::ConnmarkRestore);
        self.b.insert(
            Mangle,
            ISTIO_INBOUND,
            1,
            vec![tcp(), plain(false)],
            Target::Return,
        );
        for f in self.families() {
            let m = vec![tcp(), Src(Cidr::host(f.passthrough())), InIface(lo())];
            self.b.insert(Mangle, ISTIO_INBOUND, 2, m, Target::Return);
        }
        let not_outbound = Mark {
            neg: true,
            mark: outbound,
        };
        let m = vec![tcp(), InIface(lo()), not_outbound];
        self.b.insert(Mangle, ISTIO_INBOUND, 3, m, Target::Return);
    }
}

/// A list's IPv4 items, then its IPv6 items, each in input order: Istio keeps one list per
/// family and writes the IPv4 one first. (Per family, as the iptables mode renders, nothing
/// changes; one inet chain of the nftables mode holds both, in this order.)
fn ipv4_first(mut list: Vec<Cidr>) -> Vec<Cidr> {
    list.sort_by_key(|c| c.family() == Family::V6);
    list
}

/// Step 14: redirect DNS to the agent and split its UDP conntrack into two zones.
fn build_dns(b: &mut Builder, cfg: &Config, facts: &Facts) {
    // A nameserver of a family not programmed still turns DNS capture on (as in Istio): the
    // rules naming no address stay; those naming it are dropped (see `Builder::push`).
    let servers: Vec<Cidr> =
        ipv4_first(facts.dns_servers.iter().copied().map(Cidr::host).collect());
    let all = cfg.capture_all_dns;
    // The families whose nameservers are captured (all of them with capture-all-dns).
    let captured: Vec<Family> = (b.families.iter().copied())
        .filter(|f| all || facts.dns_servers_of(*f).next().is_some())
        .collect();
    let dns = Dns {
        servers: if all { None } else { Some(servers) },
        captured,
    };
    dns_redirects(b, &dns);
    dns_conntrack_zones(b, cfg, &dns);
}

/// What step 14 captures.
struct Dns {
    /// The nameservers whose traffic is captured; `None`: all DNS (capture-all-dns).
    servers: Option<Vec<Cidr>>,
    /// The families whose DNS is captured.
    captured: Vec<Family>,
}

fn dport53() -> Match {
    dport(PORT_53)
}

/// Step 14, nat: DNS over TCP and UDP to the agent's port.
fn dns_redirects(b: &mut Builder, dns: &Dns) {
    b.append(Raw, OUTPUT, vec![], Target::Jump(ISTIO_OUTPUT_DNS));
    let to_dns = Target::Jump(ISTIO_OUTPUT_DNS);
    b.append_for(&dns.captured, Nat, ISTIO_OUTPUT, vec![], to_dns);
    for (proto, singular) in [(tcp(), false), (udp(), true)] {
        let to_agent = Target::Redirect {
            port: DNS_PORT,
            singular,
        };
        match &dns.servers {
            None => {
                let m = vec![proto.clone(), dport53()];
                b.append(Nat, ISTIO_OUTPUT_DNS, m, to_agent);
            }
            Some(servers) => {
                for s in servers {
                    let m = vec![proto.clone(), dport53(), dst(*s)];
                    b.append(Nat, ISTIO_OUTPUT_DNS, m, to_agent.clone());
                }
            }
        }
    }
}

/// Step 14, raw: conntrack zones, 1 = proxy <-> upstream resolver, 2 = app <-> agent.
fn dns_conntrack_zones(b: &mut Builder, cfg: &Config, dns: &Dns) {
    let owners = (cfg.proxy_uids.iter().map(|u| Owner::Uid(*u)))
        .chain((cfg.proxy_gids.iter()).map(|g| Owner::Gid(Group::Id(*g))));
    for who in owners {
        let who = owner(false, who);
        let m = vec![udp(), dport53(), who.clone()];
        b.append(Raw, ISTIO_OUTPUT_DNS, m, Target::CtZone(1));
        let m = vec![udp(), Sport(PORT_15053), who];
        b.append(Raw, ISTIO_OUTPUT_DNS, m, Target::CtZone(2));
    }
    let to_inbound = Target::Jump(ISTIO_INBOUND);
    match &dns.servers {
        None => {
            b.append(Raw, PREROUTING, vec![], to_inbound);
            let m = vec![udp(), dport53()];
            b.append(Raw, ISTIO_OUTPUT_DNS, m, Target::CtZone(2));
            let m = vec![udp(), Sport(PORT_53)];
            b.append(Raw, ISTIO_INBOUND, m, Target::CtZone(1));
        }
        Some(servers) => {
            b.append_for(&dns.captured, Raw, PREROUTING, vec![], to_inbound);
            for s in servers {
                let m = vec![udp(), dport53(), dst(*s)];
                b.append(Raw, ISTIO_OUTPUT_DNS, m, Target::CtZone(2));
                let m = vec![udp(), Sport(PORT_53), Src(*s)];
                b.append(Raw, ISTIO_INBOUND, m, Target::CtZone(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Ruleset;
    use crate::capture::chain;
    use crate::settings::cli::Defaults;
    use crate::settings::config::tests::resolve;

    fn default_v4() -> Ruleset {
        let cfg = resolve(Defaults::Native, &[], &[]).unwrap();
        build(&cfg, &Facts::default()).family(Family::V4)
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
                let rs = build(&cfg, &facts).family(family);
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
        let rs = build(&cfg, &Facts::default()).family(Family::V4);
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
            let rs = build(&cfg, &facts).family(family);
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

    /// An IPv4-only pod whose nameservers are all IPv6 gets Istio's address-independent DNS
    /// rules (the `! --dport 53` exceptions, the raw-table conntrack zones), and no rule naming
    /// the IPv6 server. (The differential test found `host::dns_servers` dropping such
    /// servers: `cli::ipv4_only_dns_capture_with_only_ipv6_nameservers_keeps_the_address_free_dns_rules`.)
    #[test]
    fn dns_rules_stay_when_every_nameserver_is_of_a_disabled_family() {
        let cfg = resolve(Defaults::Native, &["--redirect-dns"], &[]).unwrap();
        let facts = Facts {
            ipv6: false,
            dns_servers: vec!["2001:db8::53".parse().unwrap()],
        };
        assert!(dns_capture(&cfg, &facts));
        let rs = build(&cfg, &facts).family(Family::V4);
        let raw = rs
            .table(Table::Raw)
            .expect("the raw table's conntrack zones");
        assert!(raw.rules.iter().any(|r| r.target == Target::CtZone(1)));
        let nat = rs.table(Table::Nat).unwrap();
        let dport53 = |r: &&Rule| {
            r.matches
                .iter()
                .any(|m| matches!(m, Match::Dport { neg: true, port } if *port == PORT_53))
        };
        assert!(nat.rules.iter().any(|r| dport53(&r)));
        // Not in the model either (the nftables mode writes it whole, both families at once).
        let names_server = |r: &Rule| {
            let dns = [chain::ISTIO_OUTPUT_DNS, chain::ISTIO_INBOUND].contains(&r.chain);
            dns && (r.matches.iter()).any(|m| matches!(m, Match::Dst { .. } | Match::Src(_)))
        };
        assert!(!build(&cfg, &facts).rules.iter().any(names_server));
    }

    /// Found by the differential test (nftables mode): lists mixing both families (outbound
    /// exclusions, nameservers) are written IPv4 items first, then IPv6, as Istio writes them
    /// into the one inet chain.
    #[test]
    fn mixed_family_lists_are_written_ipv4_first() {
        let args = [
            "--redirect-dns",
            "-x",
            "2001:db8::7/128,198.18.0.0/15,::1/128,198.19.0.0/16",
        ];
        let cfg = resolve(Defaults::Native, &args, &[]).unwrap();
        let servers = ["2001:db8::53", "198.18.0.53", "::1", "127.0.0.53"];
        let facts = Facts {
            ipv6: true,
            dns_servers: servers.iter().map(|s| s.parse().unwrap()).collect(),
        };
        let capture = build(&cfg, &facts);
        let dsts = |table, chain| -> Vec<String> {
            let rules = capture.chain_rules(table, chain);
            let nets = rules
                .iter()
                .flat_map(|r| &r.matches)
                .filter_map(|m| match m {
                    Match::Dst { neg: false, net } => Some(net.to_string()),
                    _ => None,
                });
            nets.collect()
        };
        // After the loopback destinations (step 15).
        assert_eq!(
            dsts(Table::Nat, chain::ISTIO_OUTPUT)[2..],
            [
                "198.18.0.0/15",
                "198.19.0.0/16",
                "2001:db8::7/128",
                "::1/128"
            ]
        );
        let in_order = [
            "198.18.0.53/32",
            "127.0.0.53/32",
            "2001:db8::53/128",
            "::1/128",
        ];
        assert_eq!(dsts(Table::Raw, chain::ISTIO_OUTPUT_DNS), in_order);
        assert_eq!(
            dsts(Table::Nat, chain::ISTIO_OUTPUT_DNS),
            [in_order, in_order].concat()
        );
    }

    #[test]
    fn dns_disabled_without_servers() {
        let cfg = resolve(Defaults::Native, &["--redirect-dns"], &[]).unwrap();
        assert!(!dns_capture(&cfg, &Facts::default()));
        let rs = build(&cfg, &Facts::default()).family(Family::V4);
        assert!(rs.table(Table::Raw).is_none());
    }
}
