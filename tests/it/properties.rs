//! Property tests over generated *valid* configurations. The generator writes command lines
//! and environments the way a user (or the injector) would — every option through a random
//! spelling (`--long=v`, `--long v`, `-s v`, `-sv`, its env vars), with padded list items and
//! trailing commas — plus the pod's annotations (traffic annotations, interception mode,
//! `proxyMetadata`), then resolves them with `Config::resolve` and builds both families.
//!
//! Pure properties (many cases): the configuration resolves; every rule sits in a declared or
//! built-in chain of its table and every jump target exists there; no chain is declared twice;
//! resolving, building and rendering are deterministic; no address of the other family appears;
//! every rendered rule re-parses, token by token, under an independent grammar of the iptables
//! options Istio uses (so no value can carry a space or a second option); inserts are within
//! bounds; multiport lists stay within the 15-port cap.
//!
//! Kernel property (fewer cases, one namespace): the rendered text of every generated
//! configuration is accepted by `iptables-restore --test` and `ip6tables-restore --test`, nft
//! and legacy. `--test` commits nothing, so one namespace serves every case.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use istio_init::capture::{Facts, build};
use istio_init::net::{Family, Group};
use istio_init::settings::annotations;
use istio_init::settings::cli::{self, Kind};
use istio_init::settings::config::{Config, Inputs, OwnerGroups};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as PropConfig, TestRunner};

use crate::checks::{check_ruleset, parse_rule};
use crate::util::{Netns, privileged, stderr};

/// One generated input: a command line, an environment and the namespace facts.
#[derive(Debug, Clone)]
struct Case {
    istio_word: bool,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    /// The pod's annotations (applied over flags and env, as `--annotations` does).
    annotations: BTreeMap<String, String>,
    facts: Facts,
}

/// How one option is given.
#[derive(Debug, Clone)]
struct Given {
    key: &'static str,
    how: u8,
    value: String,
}

impl Given {
    fn apply(&self, case: &mut Case) {
        let Some(o) = cli::find(self.key) else {
            case.env.insert(self.key.to_owned(), self.value.clone());
            return;
        };
        let v = self.value.clone();
        match (self.how % 5, o.short, o.env.first(), o.kind) {
            (0, _, _, _) => case.args.push(format!("--{}={v}", o.long)),
            (1, _, _, Kind::Value) => case.args.extend([format!("--{}", o.long), v]),
            (2, Some(s), _, Kind::Value) => case.args.extend([format!("-{s}"), v]),
            (3, Some(s), _, Kind::Value) if !v.is_empty() => case.args.push(format!("-{s}{v}")),
            (4, _, Some(_), _) => {
                // The last env var has the highest precedence; pick one by the value's length.
                let name = o.env[v.len() % o.env.len()];
                case.env.insert(name.to_owned(), v);
            }
            (_, _, _, Kind::Bool) if v == "true" => case.args.push(format!("--{}", o.long)),
            _ => case.args.push(format!("--{}={v}", o.long)),
        }
    }
}

fn given(
    key: &'static str,
    value: impl Strategy<Value = String>,
) -> impl Strategy<Value = Option<Given>> {
    proptest::option::weighted(0.6, (any::<u8>(), value))
        .prop_map(move |o| o.map(|(how, value)| Given { key, how, value }))
}

fn port() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (1u16..=65535).prop_map(|p| p.to_string()),
        1 => Just("65535".to_owned()),
        1 => Just("1".to_owned()),
    ]
}

fn port_item() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => port(),
        1 => (1u16..=65535, 1u16..=65535)
            .prop_map(|(a, b)| format!("{}:{}", a.min(b), a.max(b))),
    ]
}

/// A list as people write them: items joined by commas, sometimes padded with spaces and
/// with a trailing comma (both accepted).
fn list_of(item: impl Strategy<Value = String>, max: usize) -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(item, 0..=max),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(items, pad, trailing)| {
            let sep = if pad { " , " } else { "," };
            let mut s = items.join(sep);
            if trailing && !s.is_empty() {
                s.push(',');
            }
            if pad {
                s = format!(" {s} ");
            }
            s
        })
}

fn cidr_v4() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (any::<u32>(), 0u8..=32).prop_map(|(a, l)| format!("{}/{l}", Ipv4Addr::from(a))),
        1 => (any::<[u8; 3]>(), 8u8..=32)
            .prop_map(|(b, l)| format!("127.{}.{}.{}/{l}", b[0], b[1], b[2])),
    ]
}

fn cidr_v6() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (any::<u128>(), 0u8..=128).prop_map(|(a, l)| format!("{}/{l}", Ipv6Addr::from(a))),
        1 => (any::<u32>(), 96u8..=128)
            .prop_map(|(a, l)| format!("::ffff:{}/{l}", Ipv4Addr::from(a))),
        1 => Just("::1/128".to_owned()),
    ]
}

fn cidr() -> impl Strategy<Value = String> {
    prop_oneof![cidr_v4(), cidr_v6()]
}

fn iface() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9_.-]{0,13}\\+?"
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (0u32..70000).prop_map(|n| n.to_string()),
        1 => (0u32..u32::MAX).prop_map(|n| n.to_string()),
    ]
}

fn group() -> impl Strategy<Value = String> {
    prop_oneof![id(), "[A-Za-z_][A-Za-z0-9_.-]{0,14}\\$?"]
}

fn boolean() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["true", "false", "1", "0", "t", "F", "TRUE", "False"])
        .prop_map(str::to_owned)
}

fn star_or(list: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    prop_oneof![1 => Just("*".to_owned()), 3 => list]
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let ports = (
        given("envoy-port", port()),
        given("inbound-capture-port", port()),
        given("inbound-tunnel-port", port()),
        given("istio-inbound-ports", star_or(list_of(port_item(), 6))),
        given("istio-local-exclude-ports", list_of(port_item(), 4)),
        given("istio-outbound-ports", list_of(port_item(), 4)),
        given(
            "istio-local-outbound-ports-exclude",
            list_of(port_item(), 4),
        ),
        given("iptables-probe-port", port()),
    );
    let nets = (
        given("istio-service-cidr", star_or(list_of(cidr(), 6))),
        given("istio-service-exclude-cidr", list_of(cidr(), 6)),
        given("istio-exclude-interfaces", list_of(iface(), 3)),
        given("kube-virt-interfaces", list_of(iface(), 3)),
        given("proxy-uid", list_of(id(), 3)),
        given("proxy-gid", list_of(id(), 3)),
        given(
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
            (any::<[u8; 3]>(), 8u8..=32)
                .prop_map(|(b, l)| format!("127.{}.{}.{}/{l}", b[0], b[1], b[2])),
        ),
    );
    let modes = (
        given(
            "istio-inbound-interception-mode",
            prop::sample::select(vec!["REDIRECT", "TPROXY", ""]).prop_map(str::to_owned),
        ),
        given(
            "istio-inbound-tproxy-mark",
            (1u32..=u32::MAX)
                .prop_filter("1338 is reserved", |m| *m != 1338)
                .prop_map(|m| m.to_string()),
        ),
        given(
            "istio-inbound-tproxy-route-table",
            (1u32..=u32::MAX)
                .prop_filter("reserved tables", |t| !(253..=255).contains(t))
                .prop_map(|t| t.to_string()),
        ),
        given("redirect-dns", boolean()),
        given("capture-all-dns", boolean()),
        given("drop-invalid", boolean()),
        given("dual-stack", boolean()),
        given(
            "ipv6",
            prop::sample::select(vec!["auto", "true", ""]).prop_map(str::to_owned),
        ),
    );
    let groups = prop_oneof![
        (Just("*".to_owned()), list_of(group(), 4)),
        (list_of(group(), 6), list_of(group(), 2)),
    ]
    .prop_map(|(inc, exc)| {
        vec![
            Some(Given {
                key: "ISTIO_OUTBOUND_OWNER_GROUPS",
                how: 0,
                value: inc,
            }),
            Some(Given {
                key: "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
                how: 0,
                value: exc,
            }),
        ]
    });
    let facts = (any::<bool>(), proptest::collection::vec(ip(), 0..4))
        .prop_map(|(ipv6, dns_servers)| Facts { ipv6, dns_servers });
    (
        any::<bool>(),
        ports,
        nets,
        modes,
        proptest::option::of(groups),
        facts,
        pod_annotations(),
    )
        .prop_map(|(istio_word, p, n, m, g, facts, annotations)| {
            let mut all: Vec<Option<Given>> = vec![p.0, p.1, p.2, p.3, p.4, p.5, p.6, p.7];
            all.extend([n.0, n.1, n.2, n.3, n.4, n.5, n.6]);
            all.extend([m.0, m.1, m.2, m.3, m.4, m.5, m.6, m.7]);
            all.extend(g.unwrap_or_default());
            let mut case = Case {
                istio_word,
                args: Vec::new(),
                env: BTreeMap::new(),
                annotations,
                facts,
            };
            for g in all.into_iter().flatten() {
                g.apply(&mut case);
            }
            case
        })
}

/// Pod annotations with valid values, each present or not: the traffic annotations, the
/// interception mode and `proxyMetadata` in `proxy.istio.io/config`.
fn pod_annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    let t = |k: &str| format!("traffic.sidecar.istio.io/{k}");
    let opt = |k: String, v: BoxedStrategy<String>| {
        proptest::option::weighted(0.25, v).prop_map(move |v| v.map(|v| (k.clone(), v)))
    };
    let traffic = (
        opt(
            t("includeOutboundIPRanges"),
            star_or(list_of(cidr(), 4)).boxed(),
        ),
        opt(t("excludeOutboundIPRanges"), list_of(cidr(), 4).boxed()),
        opt(
            t("includeInboundPorts"),
            star_or(list_of(port_item(), 4)).boxed(),
        ),
        opt(t("excludeInboundPorts"), list_of(port_item(), 4).boxed()),
        opt(
            "status.sidecar.istio.io/port".into(),
            prop_oneof![port(), Just("0".to_owned())].boxed(),
        ),
        opt(t("includeOutboundPorts"), list_of(port_item(), 3).boxed()),
        opt(t("excludeOutboundPorts"), list_of(port_item(), 3).boxed()),
        opt(t("kubevirtInterfaces"), list_of(iface(), 2).boxed()),
        opt(
            "istio.io/reroute-virtual-interfaces".into(),
            list_of(iface(), 2).boxed(),
        ),
        opt(t("excludeInterfaces"), list_of(iface(), 2).boxed()),
    );
    let pod = (
        opt(
            "sidecar.istio.io/interceptionMode".into(),
            prop::sample::select(vec!["REDIRECT", "TPROXY"])
                .prop_map(str::to_owned)
                .boxed(),
        ),
        opt(
            "proxy.istio.io/config".into(),
            (boolean(), list_of(group(), 3))
                .prop_map(|(dns, groups)| {
                    format!(
                        "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"{dns}\"\n  \
                         ISTIO_OUTBOUND_OWNER_GROUPS: \"{groups}\"\n"
                    )
                })
                .boxed(),
        ),
    );
    (traffic, pod).prop_map(|(t, p)| {
        [t.0, t.1, t.2, t.3, t.4, t.5, t.6, t.7, t.8, t.9, p.0, p.1]
            .into_iter()
            .flatten()
            .collect()
    })
}

fn resolve(case: &Case) -> Result<Config, String> {
    let mut argv = vec!["istio-init".to_owned()];
    if case.istio_word {
        argv.push("istio-iptables".to_owned());
    }
    argv.extend(case.args.iter().cloned());
    let inv = cli::parse(&argv).map_err(|e| e.to_string())?;
    let env = |k: &str| case.env.get(k).cloned();
    let settings = annotations::translate(&case.annotations).map_err(|e| e.to_string())?;
    if let Some(why) = settings.nothing_to_do {
        return Err(format!("nothing to do: {why}"));
    }
    Config::resolve(&Inputs {
        defaults: inv.defaults,
        flags: &inv.flags,
        env: &env,
        user_uid: &|_| None,
        pod: &settings.overrides,
    })
    .map_err(|e| e.to_string())
}

fn families(facts: &Facts) -> Vec<Family> {
    facts.families()
}

fn pure_properties(case: &Case) -> Result<Vec<(Family, String)>, TestCaseError> {
    let cfg =
        resolve(case).map_err(|e| TestCaseError::fail(format!("valid input refused: {e}")))?;
    prop_assert_eq!(
        &resolve(case).ok(),
        &Some(cfg.clone()),
        "resolution is not deterministic"
    );
    let mut out = Vec::new();
    for family in families(&case.facts) {
        let rs = build(&cfg, &case.facts).family(family);
        let text = istio_init::backend::iptables::render::ruleset_text(&rs);
        prop_assert_eq!(
            &build(&cfg, &case.facts).family(family),
            &rs,
            "build is not deterministic"
        );
        prop_assert_eq!(
            &istio_init::backend::iptables::render::ruleset_text(&rs),
            &text,
            "rendering is not deterministic"
        );
        check_ruleset(&rs, &text).map_err(|e| TestCaseError::fail(format!("{family}: {e}")))?;
        out.push((family, text));
    }
    Ok(out)
}

#[test]
fn generated_configurations_build_sound_rulesets() {
    let mut runner = TestRunner::new(PropConfig {
        cases: 512,
        failure_persistence: None,
        ..PropConfig::default()
    });
    runner
        .run(&case(), |case| pure_properties(&case).map(drop))
        .unwrap();
}

/// The generator is not vacuous: it reaches the interesting shapes often enough.
#[test]
fn generator_covers_the_rule_shapes() {
    let mut runner = TestRunner::deterministic();
    let mut seen = BTreeMap::<&str, u32>::new();
    for _ in 0..400 {
        let case = case().new_tree(&mut runner).unwrap().current();
        let Ok(cfg) = resolve(&case) else { continue };
        let mut hit = |key| *seen.entry(key).or_default() += 1;
        hit("resolved");
        if !case.annotations.is_empty() {
            hit("annotations");
        }
        if matches!(cfg.owner_groups, OwnerGroups::Only(_)) {
            hit("only groups");
        }
        if !group_names(&cfg).is_empty() {
            hit("group names");
        }
        for family in families(&case.facts) {
            let text = istio_init::backend::iptables::render::ruleset_text(
                &build(&cfg, &case.facts).family(family),
            );
            if family == Family::V6 {
                hit("v6");
            }
            for (key, needle) in [
                ("tproxy", "-j TPROXY"),
                ("dns", "-j CT --zone"),
                ("multiport", "--dports 53,"),
                ("insert", "\n-I "),
                ("mapped v6", " ::ffff:"),
                ("drop", "-j DROP"),
                ("virt", "-i "),
            ] {
                if text.contains(needle) {
                    hit(key);
                }
            }
            let range = text.split([' ', '\n']).any(|t| {
                t.split_once(':').is_some_and(|(a, b)| {
                    !a.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
                })
            });
            if range {
                hit("port range");
            }
        }
    }
    for key in [
        "resolved",
        "v6",
        "tproxy",
        "dns",
        "multiport",
        "port range",
        "insert",
        "mapped v6",
        "drop",
        "virt",
        "only groups",
        "group names",
        "annotations",
    ] {
        assert!(seen.get(key).copied().unwrap_or(0) >= 5, "{key}: {seen:?}");
    }
}

/// The group names a configuration refers to (iptables resolves them through /etc/group).
fn group_names(cfg: &Config) -> Vec<String> {
    let groups = match &cfg.owner_groups {
        OwnerGroups::AllExcept(g) | OwnerGroups::Only(g) => g,
    };
    groups
        .iter()
        .filter_map(|g| match g {
            Group::Name(n) => Some(n.clone()),
            Group::Id(_) => None,
        })
        .collect()
}

#[test]
fn kernel_accepts_generated_rulesets() {
    if !privileged("kernel_accepts_generated_rulesets") {
        return;
    }
    let ns = Netns::new("proptest");
    let mut runner = TestRunner::new(PropConfig {
        cases: 64,
        failure_persistence: None,
        ..PropConfig::default()
    });
    runner
        .run(&case(), |case| {
            let texts = pure_properties(&case)?;
            let cfg = resolve(&case).map_err(TestCaseError::fail)?;
            let group: String = group_names(&cfg)
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{n}:x:{}:\n", 60000 + i))
                .collect();
            ns.etc_file("group", &format!("root:x:0:\n{group}"));
            for (family, text) in texts {
                let programs: &[&str] = match family {
                    Family::V4 => &["iptables-nft-restore", "iptables-legacy-restore"],
                    Family::V6 => &["ip6tables-nft-restore", "ip6tables-legacy-restore"],
                };
                for program in programs {
                    let o = ns.run_with_input(&[program, "-w", "--test", "--noflush"], &text);
                    prop_assert!(
                        o.status.success(),
                        "{program} --test refused:\n{}\n{text}",
                        stderr(&o)
                    );
                }
            }
            Ok(())
        })
        .unwrap();
}

/// The kernel check can fail: a ruleset naming a group that /etc/group lacks, and a rule with
/// a token the grammar does not know, are refused by `--test`.
#[test]
fn kernel_check_refuses_bad_text() {
    if !privileged("kernel_check_refuses_bad_text") {
        return;
    }
    let ns = Netns::new("propneg");
    ns.etc_file("group", "root:x:0:\n");
    for text in [
        "*nat\n-A OUTPUT -m owner --gid-owner nosuchgroup -j RETURN\nCOMMIT\n",
        "*nat\n-A OUTPUT -o eth0 -j ACCEPT extra\nCOMMIT\n",
    ] {
        let o = ns.run_with_input(&["iptables-nft-restore", "-w", "--test", "--noflush"], text);
        assert!(!o.status.success(), "accepted: {text}");
    }
    for line in [
        "-A OUTPUT -o eth0 -j ACCEPT extra",
        "-A OUTPUT -o eth0 -j ACCEPT\n-A OUTPUT -j ACCEPT",
        "-A OUTPUT -d 2001:db8::/32 -j RETURN",
        "-A OUTPUT -m owner --gid-owner a b -j RETURN",
        "-I OUTPUT x -j RETURN",
    ] {
        assert!(parse_rule(line, Family::V4).is_err(), "{line}");
    }
    assert!(parse_rule("-A OUTPUT -d 10.0.0.0/8 -j RETURN", Family::V4).is_ok());
}
