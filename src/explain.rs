//! `explain`: every effective setting with its source, then what the configuration does in
//! plain words — which inbound ports are captured, which outbound destinations and ports, who
//! bypasses the proxy (UIDs, GIDs, interfaces, loopback) and what happens to DNS.
//!
//! Pure: text from a [`Config`] and the [`Facts`]. The normal run logs the same summary.

use std::fmt::Write;

use crate::capture::{DNS_PORT, Facts, dns_capture};
use crate::net::Family;
use crate::settings::config::{
    Config, InboundPorts, Interception, OutboundCidrs, OwnerGroups, Source, join,
};

/// The settings table: `KEY  value  source`, aligned, one line per setting.
pub fn settings(cfg: &Config) -> String {
    let kw = cfg
        .provenance
        .iter()
        .map(|p| p.key.len())
        .max()
        .unwrap_or(0);
    let vw = cfg
        .provenance
        .iter()
        .map(|p| shown(&p.value).chars().count())
        .max()
        .unwrap_or(0)
        .min(40);
    let mut out = String::new();
    for p in &cfg.provenance {
        let source = match &p.source {
            Source::Default => "default".to_owned(),
            s => s.to_string(),
        };
        let _ = writeln!(out, "  {:kw$}  {:vw$}  {source}", p.key, shown(&p.value));
    }
    out
}

fn shown(v: &str) -> String {
    if v.is_empty() {
        "\"\"".to_owned()
    } else {
        v.to_owned()
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The plain-language summary, as `- ` bullet lines under four headings.
pub fn summary(cfg: &Config, facts: &Facts) -> String {
    let mut o = String::new();
    let families = facts.families();
    let v6 = families.contains(&Family::V6);
    let _ = writeln!(
        o,
        "Rules for {}.",
        if v6 { "IPv4 and IPv6" } else { "IPv4 only" }
    );
    if cfg.interception == Interception::None {
        let _ = writeln!(
            o,
            "Interception mode NONE: nothing is captured and no rule is written."
        );
        return o;
    }

    inbound(&mut o, cfg);
    outbound(&mut o, cfg, &families);
    bypass(&mut o, cfg, v6);
    dns(&mut o, cfg, facts);
    o
}

/// The summary's inbound section.
fn inbound(o: &mut String, cfg: &Config) {
    let tproxy = cfg.interception == Interception::Tproxy;
    let _ = writeln!(o, "Inbound (TCP arriving at the pod):");
    let how = if tproxy {
        format!(
            "delivered by TPROXY to port {} (mark {}, route table {})",
            cfg.inbound_capture_port, cfg.tproxy_mark, cfg.tproxy_route_table
        )
    } else {
        format!("redirected to port {}", cfg.inbound_capture_port)
    };
    match &cfg.inbound_ports {
        InboundPorts::All => {
            let mut ex: Vec<String> = cfg
                .inbound_exclude_ports
                .iter()
                .map(|p| p.to_string())
                .collect();
            ex.push(format!("{} (HBONE tunnel)", cfg.inbound_tunnel_port));
            let _ = writeln!(o, "- every port is {how}, except ports {}", ex.join(", "));
        }
        InboundPorts::Only(v) if v.is_empty() => {
            let _ = writeln!(o, "- nothing is captured inbound (include list empty)");
        }
        InboundPorts::Only(v) => {
            let _ = writeln!(
                o,
                "- only ports {} are {how}; every other port reaches the app directly",
                list(v)
            );
            if v.iter().any(|p| p.contains(cfg.inbound_tunnel_port.get())) {
                let _ = writeln!(
                    o,
                    "- port {} is the HBONE tunnel port: never captured, although listed",
                    cfg.inbound_tunnel_port
                );
            }
        }
    }
    if !cfg.exclude_interfaces.is_empty() {
        let _ = writeln!(
            o,
            "- nothing arriving on {} is captured",
            list(&cfg.exclude_interfaces)
        );
    }
    if !cfg.virt_interfaces.is_empty() {
        let scope = match &cfg.outbound_include {
            OutboundCidrs::All => String::new(),
            OutboundCidrs::Only(v) if v.is_empty() => {
                " (no destination: include list empty)".into()
            }
            OutboundCidrs::Only(v) => format!(" for destinations in {}", list(v)),
        };
        let _ = writeln!(
            o,
            "- TCP arriving on {} is treated as outbound: redirected to port {}{scope}",
            list(&cfg.virt_interfaces),
            cfg.proxy_port
        );
    }
    let _ = writeln!(o, "- UDP is never captured inbound");
}

/// The summary's outbound section.
fn outbound(o: &mut String, cfg: &Config, families: &[Family]) {
    let v6 = families.contains(&Family::V6);
    let _ = writeln!(o, "Outbound (sent by processes in the pod):");
    let loopbacks = if v6 {
        format!("{} and ::1/128", cfg.loopback_cidr)
    } else {
        cfg.loopback_cidr.to_string()
    };
    match &cfg.outbound_include {
        OutboundCidrs::All => {
            let _ = writeln!(
                o,
                "- TCP to any destination is redirected to port {}, except:",
                cfg.proxy_port
            );
        }
        OutboundCidrs::Only(v) if v.is_empty() => {
            let _ = writeln!(
                o,
                "- no destination is captured by address (include ranges empty)"
            );
        }
        OutboundCidrs::Only(v) => {
            let shown: Vec<String> = v
                .iter()
                .filter(|c| families.contains(&c.family()))
                .map(ToString::to_string)
                .collect();
            let _ = writeln!(
                o,
                "- TCP to {} is redirected to port {}; other destinations are not captured. Exceptions:",
                if shown.is_empty() {
                    "no address of an enabled family".into()
                } else {
                    shown.join(", ")
                },
                cfg.proxy_port
            );
        }
    }
    let _ = writeln!(o, "  - loopback destinations {loopbacks}");
    let excluded: Vec<String> = cfg
        .outbound_exclude
        .iter()
        .filter(|c| families.contains(&c.family()))
        .map(ToString::to_string)
        .collect();
    if !excluded.is_empty() {
        let _ = writeln!(o, "  - excluded destinations {}", excluded.join(", "));
    }
    if !cfg.outbound_ports_exclude.is_empty() {
        let _ = writeln!(
            o,
            "  - destination ports {} (TCP and UDP, any destination)",
            list(&cfg.outbound_ports_exclude)
        );
    }
    if !cfg.outbound_ports_include.is_empty() {
        let _ = writeln!(
            o,
            "- TCP to ports {} is redirected to port {} whatever the destination (unless excluded above)",
            list(&cfg.outbound_ports_include),
            cfg.proxy_port
        );
    }
    let _ = writeln!(o, "- UDP is never redirected, except DNS (below)");
}

/// The summary's section on what bypasses the proxy.
fn bypass(o: &mut String, cfg: &Config, v6: bool) {
    let _ = writeln!(o, "Who bypasses the proxy:");
    let _ = writeln!(
        o,
        "- the proxy itself: processes running as uid {} or gid {} (their TCP to this pod's own \
         addresses over lo goes to inbound capture instead)",
        join(&cfg.proxy_uids),
        join(&cfg.proxy_gids)
    );
    match &cfg.owner_groups {
        OwnerGroups::AllExcept(g) if g.is_empty() => {}
        OwnerGroups::AllExcept(g) => {
            let _ = writeln!(
                o,
                "- processes whose group is {} (ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)",
                list(g)
            );
        }
        OwnerGroups::Only(g) => {
            let _ = writeln!(
                o,
                "- every process not in group {} (ISTIO_OUTBOUND_OWNER_GROUPS limits capture to those)",
                if g.is_empty() {
                    "(none)".into()
                } else {
                    list(g)
                }
            );
        }
    }
    if !cfg.exclude_interfaces.is_empty() {
        let _ = writeln!(
            o,
            "- all traffic on interfaces {}, both directions",
            list(&cfg.exclude_interfaces)
        );
    }
    let include_loopback = matches!(&cfg.outbound_include, OutboundCidrs::Only(v) if v.iter().any(|c| c.is_loopback()));
    if include_loopback {
        let _ = writeln!(
            o,
            "- app-to-app traffic over lo is captured: the include ranges list a loopback range"
        );
    } else {
        let _ = writeln!(
            o,
            "- app-to-app traffic over lo (to loopback or to this pod's own addresses)"
        );
    }
    let _ = writeln!(
        o,
        "- the proxy's inbound passthrough traffic from 127.0.0.6{} over lo",
        if v6 { " and ::6" } else { "" }
    );
}

/// The summary's DNS section, and the INVALID drop.
fn dns(o: &mut String, cfg: &Config, facts: &Facts) {
    let families = facts.families();
    let _ = writeln!(o, "DNS:");
    if !cfg.redirect_dns {
        let _ = writeln!(
            o,
            "- not captured (ISTIO_META_DNS_CAPTURE=true in proxyMetadata turns it on)"
        );
    } else if !dns_capture(cfg, facts) {
        let _ = writeln!(
            o,
            "- requested, but {} lists no usable nameserver and capture-all-dns is off: not captured",
            cfg.resolv_conf
        );
    } else {
        let to = if cfg.capture_all_dns {
            "any destination".to_owned()
        } else {
            let s: Vec<String> = families
                .iter()
                .flat_map(|f| facts.dns_servers_of(*f))
                .map(|a| a.to_string())
                .collect();
            format!("{} (from {})", s.join(", "), cfg.resolv_conf)
        };
        let _ = writeln!(
            o,
            "- TCP and UDP port 53 to {to} is redirected to the agent on port {DNS_PORT}, except from uid {} / gid {}",
            join(&cfg.proxy_uids),
            join(&cfg.proxy_gids)
        );
    }
    if cfg.drop_invalid {
        let _ = writeln!(o, "Packets conntrack considers INVALID are dropped.");
    }
}

/// The whole `explain` document.
pub fn explain(cfg: &Config, facts: &Facts) -> String {
    format!(
        "Effective settings (value, source):\n{}\n{}",
        settings(cfg),
        summary(cfg, facts)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::cli::Defaults;
    use crate::settings::config::tests::resolve;

    #[test]
    fn default_sidecar_summary() {
        let cfg = resolve(Defaults::Native, &[], &[]).unwrap();
        let s = summary(&cfg, &Facts::default());
        assert!(s.contains("- every port is redirected to port 15006, except ports 15090, 15021, 15020, 15008 (HBONE tunnel)\n"), "{s}");
        assert!(s.contains("- TCP to any destination is redirected to port 15001, except:\n  - loopback destinations 127.0.0.1/32\n"), "{s}");
        assert!(s.contains("uid 1337 or gid 1337"), "{s}");
        assert!(s.contains("DNS:\n- not captured"), "{s}");
    }

    #[test]
    fn settings_name_their_sources() {
        let cfg = resolve(
            Defaults::Native,
            &["-b", "80,443"],
            &[("ISTIO_META_DNS_CAPTURE", "true")],
        )
        .unwrap();
        let t = settings(&cfg);
        let line = |k: &str| {
            t.lines()
                .find(|l| l.trim_start().starts_with(&format!("{k} ")))
                .unwrap_or_else(|| panic!("{k} missing in {t}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line("INBOUND_PORTS_INCLUDE"),
            "INBOUND_PORTS_INCLUDE 80,443 --istio-inbound-ports (-b)"
        );
        assert_eq!(
            line("DNS_CAPTURE"),
            "DNS_CAPTURE true env ISTIO_META_DNS_CAPTURE"
        );
        assert_eq!(line("PROXY_PORT"), "PROXY_PORT 15001 default");
        assert_eq!(
            line("OUTBOUND_IP_RANGES_EXCLUDE"),
            "OUTBOUND_IP_RANGES_EXCLUDE \"\" default"
        );
    }

    #[test]
    fn restricted_summary() {
        let cfg = resolve(
            Defaults::Native,
            &[
                "-b",
                "8080",
                "-i",
                "10.0.0.0/8,2001:db8::/32",
                "-x",
                "10.1.0.0/16",
                "-o",
                "5432",
                "-q",
                "9000",
                "-c",
                "eth9",
                "-k",
                "net1",
                "-m",
                "TPROXY",
                "--redirect-dns",
                "--drop-invalid",
            ],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888")],
        )
        .unwrap();
        let facts = Facts {
            ipv6: false,
            dns_servers: vec!["10.96.0.10".parse().unwrap()],
        };
        let s = summary(&cfg, &facts);
        for want in [
            "Rules for IPv4 only.",
            "- only ports 8080 are delivered by TPROXY to port 15006 (mark 1337, route table 133)",
            "- nothing arriving on eth9 is captured",
            "- TCP arriving on net1 is treated as outbound: redirected to port 15001 for destinations in 10.0.0.0/8, 2001:db8::/32",
            "- TCP to 10.0.0.0/8 is redirected to port 15001; other destinations are not captured.",
            "  - excluded destinations 10.1.0.0/16",
            "  - destination ports 5432 (TCP and UDP, any destination)",
            "- TCP to ports 9000 is redirected",
            "- processes whose group is 888",
            "- TCP and UDP port 53 to 10.96.0.10 (from /etc/resolv.conf) is redirected to the agent on port 15053",
            "Packets conntrack considers INVALID are dropped.",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
    }
}
