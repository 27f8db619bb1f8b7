//! The apply path against the real kernel: real namespaces, real iptables-restore, real TCP
//! and UDP, redirection checked with `SO_ORIGINAL_DST`. Every test creates its own
//! namespaces (deleted on drop) and never touches the host's.

use istio_init::settings::cli::INJECTOR_DEFAULT_ARGS;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::util::{
    Netns, ShimDir, accept_within, assert_code, assert_ok, bin, connect_as, error_line, istio_init,
    original_dst, output, privileged, stderr, stdout, udp_bind, udp_recv, udp_send_as, veth, which,
};

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// A pod namespace and a peer namespace joined by a veth pair, dual stack.
fn pod_and_peer(tag: &str) -> (Netns, Netns) {
    let pod = Netns::new(&format!("{tag}p"));
    let peer = Netns::new(&format!("{tag}q"));
    veth(
        &pod,
        &["198.18.0.1/24", "2001:db8::1/64"],
        &peer,
        &["198.18.0.2/24", "2001:db8::2/64"],
    );
    (pod, peer)
}

const FAMILIES: [(&str, &str, &str, &str); 2] = [
    ("0.0.0.0", "127.0.0.1", "198.18.0.1", "198.18.0.2"),
    ("::", "::1", "2001:db8::1", "2001:db8::2"),
];

#[test]
fn standard_sidecar_redirects_real_tcp_ipv4_and_ipv6() {
    if !privileged("standard_sidecar_redirects_real_tcp_ipv4_and_ipv6") {
        return;
    }
    let (pod, peer) = pod_and_peer("tcp");
    let o = pod.istio_init(&[], &[]);
    assert_ok(&o);
    assert!(stderr(&o).contains("IPv6 rules enabled"), "{}", stderr(&o));

    for (any, lo, pod_ip, peer_ip) in FAMILIES {
        let outbound = crate::util::listen(&pod, sa(any, 15001), false);
        let inbound = crate::util::listen(&pod, sa(any, 15006), false);
        let app_local = crate::util::listen(&pod, sa(lo, 9999), false);
        let server = crate::util::listen(&peer, sa(any, 80), false);

        // The app (uid 1000) connecting out is redirected to 15001, destination intact.
        let _c = connect_as(&pod, Some((1000, 1000)), sa(peer_ip, 80)).expect("app connect");
        let s = accept_within(&outbound, 2000).expect("app traffic did not reach 15001");
        assert_eq!(original_dst(&s), Some(sa(peer_ip, 80)), "{pod_ip}");
        assert!(
            accept_within(&server, 0).is_none(),
            "app traffic bypassed the proxy"
        );

        // The proxy (uid 1337) goes direct.
        let _c = connect_as(&pod, Some((1337, 1337)), sa(peer_ip, 80)).expect("proxy connect");
        assert!(
            accept_within(&server, 2000).is_some(),
            "uid 1337 traffic was not sent direct ({pod_ip})"
        );
        assert!(accept_within(&outbound, 0).is_none());

        // Inbound from the peer lands on 15006 with its original destination.
        let _c = connect_as(&peer, None, sa(pod_ip, 8080)).expect("inbound connect");
        let s = accept_within(&inbound, 2000).expect("inbound traffic did not reach 15006");
        assert_eq!(original_dst(&s), Some(sa(pod_ip, 8080)));

        // The proxy's own inbound ports are not redirected.
        for port in [15090, 15021, 15020] {
            let l = crate::util::listen(&pod, sa(any, port), false);
            let _c = connect_as(&peer, None, sa(pod_ip, port)).expect("admin connect");
            assert!(
                accept_within(&l, 2000).is_some(),
                "inbound to {port} was redirected ({pod_ip})"
            );
            assert!(accept_within(&inbound, 0).is_none());
        }

        // App to loopback is not redirected.
        let _c = connect_as(&pod, Some((1000, 1000)), sa(lo, 9999)).expect("loopback connect");
        assert!(
            accept_within(&app_local, 2000).is_some(),
            "{lo} was redirected"
        );
        assert!(accept_within(&outbound, 0).is_none());
    }
}

#[test]
fn tproxy_inbound_lands_on_15006_with_routes_in_place() {
    if !privileged("tproxy_inbound_lands_on_15006_with_routes_in_place") {
        return;
    }
    let (pod, peer) = pod_and_peer("tpx");
    let o = pod.istio_init(&["-m", "TPROXY"], &[]);
    assert_ok(&o);

    for (any, _, pod_ip, _) in FAMILIES {
        let inbound = crate::util::listen(&pod, sa(any, 15006), true);
        let _c = connect_as(&peer, None, sa(pod_ip, 8080)).expect("inbound connect");
        let s = accept_within(&inbound, 2000).expect("TPROXY inbound did not reach 15006");
        // TPROXY does not rewrite: the accepted socket's local address is the destination.
        assert_eq!(s.local_addr().ok(), Some(sa(pod_ip, 8080)));

        let admin = crate::util::listen(&pod, sa(any, 15021), false);
        let _c = connect_as(&peer, None, sa(pod_ip, 15021)).expect("admin connect");
        assert!(accept_within(&admin, 2000).is_some(), "15021 was captured");
    }

    // The policy routing exists once per family, and a re-run changes nothing.
    let o = pod.istio_init(&["-m", "TPROXY"], &[]);
    assert_ok(&o);
    for v in ["-4", "-6"] {
        let rules = pod.ok(&["ip", v, "rule"]);
        assert_eq!(
            rules.matches("fwmark 0x539 lookup 133").count(),
            1,
            "{v}: {rules}"
        );
        let routes = pod.ok(&["ip", v, "route", "show", "table", "133"]);
        assert!(routes.starts_with("local default dev lo"), "{v}: {routes}");
    }
    assert!(
        pod.ok(&["ip", "-6", "addr", "show", "dev", "lo"])
            .contains("::6/128")
    );
}

#[test]
fn dns_queries_to_the_resolv_conf_server_land_on_15053_except_from_the_proxy() {
    if !privileged("dns_queries_to_the_resolv_conf_server_land_on_15053_except_from_the_proxy") {
        return;
    }
    let (pod, peer) = pod_and_peer("dns");
    let shim = ShimDir::new("dns");
    let resolv = shim.path.join("resolv.conf");
    std::fs::write(&resolv, "search svc.cluster.local\nnameserver 198.18.0.2\n").unwrap();
    let o = pod.istio_init(
        &[
            "--redirect-dns",
            "--resolv-conf",
            resolv.to_str().unwrap(),
            "--ipv6=false",
        ],
        &[],
    );
    assert_ok(&o);

    let agent = udp_bind(&pod, sa("0.0.0.0", 15053));
    let server = udp_bind(&peer, sa("0.0.0.0", 53));
    udp_send_as(&pod, Some((1000, 1000)), sa("198.18.0.2", 53), b"from-app");
    assert_eq!(udp_recv(&agent).as_deref(), Some(&b"from-app"[..]));
    udp_send_as(
        &pod,
        Some((1337, 1337)),
        sa("198.18.0.2", 53),
        b"from-proxy",
    );
    assert_eq!(udp_recv(&server).as_deref(), Some(&b"from-proxy"[..]));
    // Neither went to the other side.
    server
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    agent
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    assert_eq!(
        udp_recv(&server),
        None,
        "the app's query reached the server"
    );
    assert_eq!(udp_recv(&agent), None, "the proxy's query was captured");
}

const BIG: &[&str] = &[
    "-m",
    "TPROXY",
    "--drop-invalid",
    "--redirect-dns",
    "--capture-all-dns",
    "-c",
    "eth9",
    "-k",
    "veth7",
];

fn with<'a>(base: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(more).copied().collect()
}

#[test]
fn rerun_is_a_noop_drift_is_an_error_and_reconcile_converges() {
    if !privileged("rerun_is_a_noop_drift_is_an_error_and_reconcile_converges") {
        return;
    }
    let ns = Netns::new("rerun");
    let first = with(BIG, &["--ipv6=true"]);
    assert_ok(&ns.istio_init(&first, &[]));
    let applied = (
        ns.rules("iptables-nft-save"),
        ns.rules("ip6tables-nft-save"),
    );
    assert!(applied.0.iter().any(|l| l.contains("ISTIO_TPROXY")));

    let o = ns.istio_init(&first, &[]);
    assert_ok(&o);
    assert_eq!(
        stderr(&o)
            .matches("the same Istio rules are already in place")
            .count(),
        2,
        "{}",
        stderr(&o)
    );
    let after = (
        ns.rules("iptables-nft-save"),
        ns.rules("ip6tables-nft-save"),
    );
    assert_eq!(after, applied, "a re-run changed the rules");

    // --force-apply rewrites identical rules in place: same rules afterwards.
    assert_ok(&ns.istio_init(&with(&first, &["--force-apply"]), &[]));
    assert_eq!(ns.rules("iptables-nft-save"), applied.0);

    // Another configuration is drift: a clear error, nothing changed.
    let second = ["-p", "15011", "--ipv6=true"];
    let o = ns.istio_init(&second, &[]);
    assert_code(&o, 1);
    let e = error_line(&o);
    assert!(
        e.starts_with(
            "error: IPv4: the namespace already holds different Istio rules (nft backend): "
        ),
        "{e}"
    );
    assert!(e.contains("--reconcile"), "{e}");
    assert_eq!(ns.rules("iptables-nft-save"), applied.0);
    assert_eq!(ns.rules("ip6tables-nft-save"), applied.1);

    // --reconcile converges to exactly what a fresh namespace gets.
    assert_ok(&ns.istio_init(&with(&second, &["--reconcile"]), &[]));
    let fresh = Netns::new("fresh");
    assert_ok(&fresh.istio_init(&second, &[]));
    for p in ["iptables-nft-save", "ip6tables-nft-save"] {
        assert_eq!(ns.rules(p), fresh.rules(p), "{p} after --reconcile");
    }
    let o = ns.istio_init(&second, &[]);
    assert_ok(&o);
    assert!(stderr(&o).contains("already in place"), "{}", stderr(&o));
}

#[test]
fn an_interrupted_apply_is_completed() {
    if !privileged("an_interrupted_apply_is_completed") {
        return;
    }
    let args = ["-m", "TPROXY", "--ipv6=false"];
    let o = output(istio_init().args(with(&args, &["--dry-run"])));
    assert_ok(&o);
    let text = stdout(&o);
    let mangle_only = &text[..text.find("* nat").expect("nat table")];
    let ns = Netns::new("interrupted");
    let r = ns.run_with_input(&["iptables-nft-restore", "--noflush"], mangle_only);
    assert!(r.status.success(), "{}", stderr(&r));

    let o = ns.istio_init(&args, &[]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("completing an interrupted apply: adding tables nat"),
        "{}",
        stderr(&o)
    );
    let fresh = Netns::new("fresh");
    assert_ok(&fresh.istio_init(&args, &[]));
    assert_eq!(
        ns.rules("iptables-nft-save"),
        fresh.rules("iptables-nft-save")
    );
}

/// The dry-run text of one family.
fn family_text(args: &[&str], family: &str) -> String {
    let o = output(istio_init().args(with(args, &["--dry-run"])));
    assert_ok(&o);
    let text = stdout(&o);
    let start = text.find(&format!("# {family}")).expect("family section");
    let rest = &text[start..];
    let end = rest[1..].find("\n# ").map_or(rest.len(), |i| i + 2);
    rest[..end].to_owned()
}

#[test]
fn cleanup_only_removes_our_rules_from_both_backends_and_families_and_keeps_foreign_ones() {
    if !privileged("cleanup_only_removes_our_rules_from_both_backends_and_families") {
        return;
    }
    let ns = Netns::new("cleanup");
    // Foreign rules first, in every backend and family.
    for (prog, dst) in [
        ("iptables-nft", "198.18.9.9"),
        ("iptables-legacy", "198.18.9.9"),
        ("ip6tables-nft", "2001:db8:9::9"),
        ("ip6tables-legacy", "2001:db8:9::9"),
    ] {
        ns.ok(&[prog, "-t", "nat", "-A", "OUTPUT", "-d", dst, "-j", "RETURN"]);
        ns.ok(&[
            prog, "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT",
        ]);
        ns.ok(&[prog, "-t", "mangle", "-N", "FOREIGN"]);
        ns.ok(&[prog, "-t", "mangle", "-A", "FOREIGN", "-j", "RETURN"]);
        ns.ok(&[
            prog,
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "-j",
            "FOREIGN",
        ]);
    }
    let saves = [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ];
    let foreign: Vec<Vec<String>> = saves.iter().map(|p| ns.rules(p)).collect();

    let args = with(BIG, &["--ipv6=true"]);
    let o = ns.istio_init(&args, &[]);
    assert_ok(&o);
    // The namespace had legacy rules, so istio-init chose legacy; put a second copy in nft,
    // as an earlier run of another tool could have.
    assert!(
        stderr(&o).contains("already has legacy rules"),
        "{}",
        stderr(&o)
    );
    for (family, prog) in [
        ("IPv4", "iptables-nft-restore"),
        ("IPv6", "ip6tables-nft-restore"),
    ] {
        let r = ns.run_with_input(&[prog, "--noflush"], &family_text(&args, family));
        assert!(r.status.success(), "{}", stderr(&r));
    }
    // A scratch chain an interrupted run left behind.
    ns.ok(&["iptables-nft", "-t", "nat", "-N", "ii-zz.OUTPUT"]);
    let present = ns.istio_anywhere();
    assert!(
        present.iter().any(|l| l.contains(":ii-zz.OUTPUT")),
        "{present:#?}"
    );
    for p in saves {
        assert!(
            present.iter().any(|l| l.starts_with(p)),
            "{p}: {present:#?}"
        );
    }

    let o = ns.istio_init(&with(&args, &["--cleanup-only"]), &[]);
    assert_ok(&o);
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
    let after: Vec<Vec<String>> = saves.iter().map(|p| ns.rules(p)).collect();
    assert_eq!(after, foreign, "foreign rules changed");
    // Cleaning a clean namespace is fine too.
    assert_ok(&ns.istio_init(&with(&args, &["--cleanup-only"]), &[]));
}

/// A PATH directory whose `ip6tables-nft-restore` reads its input and fails at `line`.
fn failing_ip6tables_nft_restore(tag: &str, line: usize) -> ShimDir {
    let shim = ShimDir::new(tag);
    shim.script(
        "ip6tables-nft-restore",
        &format!(
            "cat >/dev/null\n\
             echo 'ip6tables-nft-restore: line {line} failed: simulated failure' >&2\nexit 1"
        ),
    );
    shim
}

#[test]
fn a_failing_ip6tables_restore_leaves_no_ipv4_rule_behind() {
    if !privileged("a_failing_ip6tables_restore_leaves_no_ipv4_rule_behind") {
        return;
    }
    let ns = Netns::new("v6fail");
    let shim = failing_ip6tables_nft_restore("v6fail", 9);
    let before = ns.rules("iptables-nft-save");
    // TPROXY with IPv6 adds policy rules, local routes and ::6 on lo before the rules are
    // written: they must be gone again too.
    let routing = || {
        [
            &["ip", "-4", "rule"][..],
            &["ip", "-6", "rule"],
            &["ip", "-4", "route", "show", "table", "all"],
            &["ip", "-6", "route", "show", "table", "all"],
            &["ip", "-6", "addr", "show", "dev", "lo"],
        ]
        .map(|argv| ns.ok(argv))
    };
    let routing_before = routing();
    let path = shim.path_env();
    let o = ns.istio_init(&["-m", "TPROXY", "--ipv6=true"], &[("PATH", &path)]);
    assert_code(&o, 1);
    assert!(
        stderr(&o).contains("added the IPv4 policy rule `fwmark 1337 lookup 133`"),
        "the routes were not added, so their removal proves nothing: {}",
        stderr(&o)
    );
    assert_eq!(routing(), routing_before, "routing changed");
    let e = error_line(&o);
    assert!(
        e.starts_with(
            "error: IPv4 rules applied by this run were rolled back; the namespace is as it \
             was: IPv6 (nft backend): "
        ),
        "{e}"
    );
    assert!(
        e.contains("ip6tables-nft-restore failed at line 9 `"),
        "{e}"
    );
    assert!(e.ends_with(": simulated failure"), "{e}");
    assert_eq!(ns.rules("iptables-nft-save"), before);
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
}

/// A run that changed IPv4's rules in place (its log says `change`), failed in IPv6's
/// restore ([`failing_ip6tables_nft_restore`]) and put IPv4's back.
fn ipv4_reconciled_then_put_back(o: &std::process::Output, change: &str) {
    assert_code(o, 1);
    let err = stderr(o);
    assert!(
        err.contains(change),
        "IPv4 was not changed, so putting it back proves nothing: {err}"
    );
    assert!(
        err.contains("IPv4: putting back the Istio rules this run replaced"),
        "{err}"
    );
    let e = error_line(o);
    assert!(
        e.starts_with(
            "error: IPv4 rules reconciled by this run were rolled back; the namespace is as it \
             was: IPv6 (nft backend): "
        ),
        "{e}"
    );
    assert!(e.ends_with(": simulated failure"), "{e}");
}

#[test]
fn a_failure_after_reconcile_replaced_ipv4_s_rules_puts_them_back_exactly() {
    if !privileged("a_failure_after_reconcile_replaced_ipv4_s_rules_puts_them_back") {
        return;
    }
    let ns = Netns::new("rcback");
    // Foreign rules around ours: before the first run (so ours come after them) and after
    // it (after ours), in the chains both configurations use.
    let foreign = |when: &str| {
        for (tool, addr) in [
            ("iptables-nft", "198.18.9.9"),
            ("ip6tables-nft", "2001:db8::9"),
        ] {
            for chain in ["OUTPUT", "PREROUTING"] {
                ns.ok(&[
                    tool,
                    "-t",
                    "nat",
                    "-A",
                    chain,
                    "-d",
                    addr,
                    "-m",
                    "comment",
                    "--comment",
                    when,
                    "-j",
                    "RETURN",
                ]);
            }
        }
    };
    foreign("before");
    let first = with(BIG, &["--ipv6=true"]);
    assert_ok(&ns.istio_init(&first, &[]));
    foreign("after");
    let saves = ["iptables-nft-save", "ip6tables-nft-save"];
    let applied: Vec<String> = saves.iter().map(|p| ns.save(p)).collect();
    assert!(applied[0].contains("ISTIO_TPROXY"), "{}", applied[0]);

    // Another configuration (nat only, other ports, another virtual interface inserted at
    // the top of PREROUTING) with --reconcile: IPv4 converges, then IPv6's restore fails.
    let shim = failing_ip6tables_nft_restore("rcback", 2);
    let path = shim.path_env();
    let second = ["-p", "15011", "-k", "veth8", "--ipv6=true", "--reconcile"];
    let o = ns.istio_init(&second, &[("PATH", &path)]);
    ipv4_reconciled_then_put_back(&o, "IPv4: --reconcile: replacing the Istio rules in place");
    for (p, want) in saves.iter().zip(&applied) {
        assert_eq!(&ns.save(p), want, "{p} after the failed --reconcile");
    }

    // The same run without the failure does replace them (so the above was a real change).
    assert_ok(&ns.istio_init(&second, &[]));
    assert_ne!(ns.save(saves[0]), applied[0]);
}

#[test]
fn a_failure_after_reconcile_moved_ipv4_s_rules_to_nft_puts_the_legacy_ones_back() {
    if !privileged("a_failure_after_reconcile_moved_ipv4_s_rules_to_nft") {
        return;
    }
    let ns = Netns::new("rcmove");
    let first = ["-m", "TPROXY", "--ipv6=true"];
    assert_ok(&ns.istio_init(&first, &[("FORCE_IPTABLES_BINARY", "legacy")]));
    ns.ok(&[
        "iptables-legacy",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "198.18.9.9",
        "-j",
        "RETURN",
    ]);
    let legacy = ["iptables-legacy-save", "ip6tables-legacy-save"];
    let nft = ["iptables-nft-save", "ip6tables-nft-save"];
    let before: Vec<String> = legacy.iter().map(|p| ns.save(p)).collect();
    assert!(before[0].contains("ISTIO_OUTPUT"), "{}", before[0]);
    let nft_before: Vec<Vec<String>> = nft.iter().map(|p| ns.rules(p)).collect();

    let shim = failing_ip6tables_nft_restore("rcmove", 2);
    let path = shim.path_env();
    let o = ns.istio_init(
        &["--ipv6=true", "--reconcile"],
        &[("PATH", &path), ("FORCE_IPTABLES_BINARY", "nft")],
    );
    ipv4_reconciled_then_put_back(
        &o,
        "IPv4: removing the Istio rules from the legacy backend (--reconcile)",
    );
    for (p, want) in legacy.iter().zip(&before) {
        assert_eq!(&ns.save(p), want, "{p} after the failed --reconcile");
    }
    for (p, want) in nft.iter().zip(&nft_before) {
        assert_eq!(&ns.rules(p), want, "{p} after the failed --reconcile");
    }
}

#[test]
fn a_table_committed_before_a_failure_in_the_same_family_is_rolled_back() {
    if !privileged("a_table_committed_before_a_failure_in_the_same_family_is_rolled_back") {
        return;
    }
    let real = which("iptables-nft-restore").expect("iptables-nft-restore");
    let ns = Netns::new("partial");
    let shim = ShimDir::new("partial");
    // mangle commits first; nat then fails on a corrupted port.
    shim.script(
        "iptables-nft-restore",
        &format!(
            "sed 's/--to-ports 15001/--to-ports 99999/' | {} \"$@\"",
            real.display()
        ),
    );
    let path = shim.path_env();
    let o = ns.istio_init(&["-m", "TPROXY", "--ipv6=false"], &[("PATH", &path)]);
    assert_code(&o, 1);
    let e = error_line(&o);
    assert!(
        e.contains("IPv4 (nft backend): ") && e.contains("Port `99999' not valid"),
        "{e}"
    );
    assert!(
        e.contains("`-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001`"),
        "{e}"
    );
    assert!(
        stderr(&o).contains("rolling back tables mangle"),
        "{}",
        stderr(&o)
    );
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
}

#[test]
fn a_missing_restore_binary_is_a_clear_error() {
    if !privileged("a_missing_restore_binary_is_a_clear_error") {
        return;
    }
    let ns = Netns::new("nobin");
    let shim = ShimDir::new("nobin");
    let path = shim.path.display().to_string();
    let o = ns.istio_init(&["--ipv6=false"], &[("PATH", &path)]);
    assert_code(&o, 1);
    assert_eq!(
        error_line(&o),
        format!(
            "error: IPv4 (nft backend): iptables-nft-restore failed: no restore program for IPv4 \
             in the nft backend: looked for iptables-nft-restore and iptables-restore on PATH={path}"
        )
    );
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
}

#[test]
fn a_fresh_namespace_costs_one_restore_per_family_and_no_other_process() {
    if !privileged("a_fresh_namespace_costs_one_restore_per_family_and_no_other_process") {
        return;
    }
    let ns = Netns::new("procs");
    let shim = ShimDir::new("procs");
    let log = shim.path.join("calls.log");
    for name in [
        "iptables-nft-restore",
        "ip6tables-nft-restore",
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-restore",
        "ip6tables-legacy-restore",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
        "iptables-restore",
        "ip6tables-restore",
        "iptables-save",
        "ip6tables-save",
        "iptables",
        "ip6tables",
        "ip",
        "nft",
    ] {
        let real = which(name).unwrap_or_else(|| panic!("{name} not installed"));
        shim.script(
            name,
            &format!(
                "echo {name} >> {}\nexec {} \"$@\"",
                log.display(),
                real.display()
            ),
        );
    }
    let path = shim.path_env();
    // TPROXY so that the netlink route setup runs too.
    let o = ns.istio_init(&["-m", "TPROXY", "--ipv6=true"], &[("PATH", &path)]);
    assert_ok(&o);
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    // The two families' restores run concurrently: either may log first.
    let mut calls: Vec<&str> = calls.lines().collect();
    calls.sort_unstable();
    assert_eq!(calls, ["ip6tables-nft-restore", "iptables-nft-restore"]);

    // The injector's default arguments: one restore, which istio-init becomes.
    std::fs::remove_file(&log).unwrap();
    let ns = Netns::new("procs1");
    assert_ok(&ns.istio_init(&INJECTOR_DEFAULT_ARGS, &[("PATH", &path)]));
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(calls.lines().collect::<Vec<_>>(), ["iptables-nft-restore"]);
}

/// A shim for `iptables-nft-restore` that records the name of its parent process, then runs
/// the real one: the parent is istio-init when istio-init supervises the restore, and
/// whoever started istio-init when it handed over (became the restore).
fn parent_recording_shim(tag: &str) -> (ShimDir, std::path::PathBuf) {
    let real = which("iptables-nft-restore").expect("iptables-nft-restore");
    let shim = ShimDir::new(tag);
    let log = shim.path.join("parent");
    shim.script(
        "iptables-nft-restore",
        &format!(
            "cat /proc/$PPID/comm > {}\nexec {} \"$@\"",
            log.display(),
            real.display()
        ),
    );
    (shim, log)
}

#[test]
fn a_fresh_standard_run_hands_over_to_its_one_restore_and_a_rerun_is_supervised() {
    if !privileged("a_fresh_standard_run_hands_over") {
        return;
    }
    let (shim, log) = parent_recording_shim("handover");
    let path = shim.path_env();
    let parent = || {
        std::fs::read_to_string(&log)
            .expect("the shim ran")
            .trim()
            .to_owned()
    };
    let ns = Netns::new("handover");
    let o = ns.istio_init(&INJECTOR_DEFAULT_ARGS, &[("PATH", &path)]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("IPv4: applying 18 rules in 4 chains (nft backend, a fresh namespace) by handing over to"),
        "{}",
        stderr(&o)
    );
    assert_ne!(parent(), "istio-init", "istio-init did not hand over");
    let jumps = |ns: &Netns| {
        ns.rules("iptables-nft-save")
            .iter()
            .filter(|l| l.starts_with("nat: -A OUTPUT") && l.contains("-j ISTIO_OUTPUT"))
            .count()
    };
    assert_eq!(jumps(&ns), 1);

    // The same run again: nf_tables holds a table now, so istio-init supervises, recognises
    // its rules and changes nothing.
    let o = ns.istio_init(&INJECTOR_DEFAULT_ARGS, &[("PATH", &path)]);
    assert_ok(&o);
    assert_eq!(parent(), "istio-init");
    assert!(
        stderr(&o).contains("the same Istio rules are already in place; nothing to do"),
        "{}",
        stderr(&o)
    );
    assert_eq!(jumps(&ns), 1);

    // --handover=false (and ISTIO_INIT_HANDOVER=false) keep istio-init in charge.
    for (args, env) in [
        (vec!["--handover=false"], vec![]),
        (vec![], vec![("ISTIO_INIT_HANDOVER", "false")]),
    ] {
        let ns = Netns::new("nohandover");
        let mut env = env;
        env.push(("PATH", path.as_str()));
        let mut argv = INJECTOR_DEFAULT_ARGS.to_vec();
        argv.extend(args);
        let o = ns.istio_init(&argv, &env);
        assert_ok(&o);
        assert_eq!(parent(), "istio-init");
        assert!(
            stderr(&o).contains("IPv4: applied 18 rules in 4 chains (nft)"),
            "{}",
            stderr(&o)
        );
        assert_eq!(jumps(&ns), 1);
    }

    // An input larger than a page goes through an in-memory file instead of a pipe: the
    // same handover, every rule in place.
    let ns = Netns::new("handoverbig");
    let cidrs: Vec<String> = (0..200).map(|i| format!("198.18.1.{i}/32")).collect();
    let cidrs = cidrs.join(",");
    let mut argv = INJECTOR_DEFAULT_ARGS.to_vec();
    argv.extend(["-x", &cidrs]);
    let o = ns.istio_init(&argv, &[("PATH", &path)]);
    assert_ok(&o);
    assert_ne!(parent(), "istio-init");
    let excluded = ns
        .rules("iptables-nft-save")
        .iter()
        .filter(|l| l.contains("-d 198.18.1.") && l.ends_with("-j RETURN"))
        .count();
    assert_eq!(excluded, 200);

    // Dual stack, TPROXY routes, DNS capture's second table: more than one transaction or
    // more than the rules, so istio-init supervises.
    for extra in [&["--ipv6=true"][..], &["-m", "TPROXY"], &["--redirect-dns"]] {
        let ns = Netns::new("supervised");
        let mut argv = INJECTOR_DEFAULT_ARGS.to_vec();
        argv.extend(extra);
        let o = ns.istio_init(&argv, &[("PATH", &path)]);
        assert_ok(&o);
        assert_eq!(parent(), "istio-init", "{extra:?}");
    }
}

#[test]
fn a_handed_over_restore_keeps_termination_signals_blocked_and_its_outcome_is_the_run_s() {
    if !privileged("a_handed_over_restore_keeps_termination_signals_blocked") {
        return;
    }
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use std::os::unix::process::ExitStatusExt;

    // A failing restore: its message and exit status are the run's, nothing is applied.
    let ns = Netns::new("hofail");
    let shim = ShimDir::new("hofail");
    shim.script(
        "iptables-nft-restore",
        "cat >/dev/null\necho 'iptables-restore: line 7 failed' >&2\nexit 1",
    );
    let o = ns.istio_init(&INJECTOR_DEFAULT_ARGS, &[("PATH", &shim.path_env())]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("by handing over to"), "{}", stderr(&o));
    assert!(
        stderr(&o).ends_with("iptables-restore: line 7 failed\n"),
        "{}",
        stderr(&o)
    );
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());

    // A hanging restore: SIGTERM, SIGINT and SIGHUP stay blocked after the exec (the
    // critical section's mask), and --restore-timeout ends it with SIGALRM.
    let ns = Netns::new("hohang");
    let shim = ShimDir::new("hohang");
    shim.script("iptables-nft-restore", "exec sleep 1000");
    let mut argv = INJECTOR_DEFAULT_ARGS.to_vec();
    argv.push("--restore-timeout=2s");
    let mut cmd = ns.cmd(&["env", "-i", &format!("PATH={}", shim.path_env()), bin()]);
    let child = cmd
        .args(&argv)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `ip netns exec` and `env` exec in place: the child is istio-init, then the shim, then
    // sleep, all one process.
    let pid = child.id();
    let start = std::time::Instant::now();
    while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n" {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "never handed over"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(
        crate::util::blocked_signals(&pid.to_string()),
        crate::util::mask(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP])
    );
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the handed-over restore outlived --restore-timeout=2s");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.signal(),
        Some(Signal::SIGALRM as i32),
        "{}",
        stderr(&o)
    );
    assert!(start.elapsed() >= std::time::Duration::from_millis(1500));
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
}

#[test]
fn a_routing_addition_that_fails_undoes_the_others_and_applies_no_rule() {
    if !privileged("a_routing_addition_that_fails_undoes_the_others") {
        return;
    }
    // IPv6 off on lo: the `::6/128` address cannot be added (EACCES), while the policy rules
    // and the IPv4 route in the same netlink batch can.
    let ns = Netns::new("routefail");
    ns.ok(&["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);
    let rules4 = ns.ok(&["ip", "rule"]);
    let rules6 = ns.ok(&["ip", "-6", "rule"]);
    let o = ns.istio_init(&["-m", "TPROXY", "--ipv6=true"], &[]);
    assert_code(&o, 1);
    assert_eq!(
        error_line(&o),
        "error: configuring TPROXY routing: adding the ::6/128 on lo: EACCES: Permission denied"
    );
    assert!(
        stderr(&o).contains("removed the IPv4 policy rule `fwmark 1337 lookup 133` again"),
        "{}",
        stderr(&o)
    );
    assert_eq!(ns.ok(&["ip", "rule"]), rules4);
    assert_eq!(ns.ok(&["ip", "-6", "rule"]), rules6);
    assert_eq!(ns.ok(&["ip", "route", "show", "table", "133"]), "");
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
}

#[test]
fn programs_run_with_exactly_net_admin_and_net_raw() {
    if !privileged("programs_run_with_exactly_net_admin_and_net_raw") {
        return;
    }
    let real = which("iptables-nft-restore").expect("iptables-nft-restore");
    let ns = Netns::new("childcaps");
    let shim = ShimDir::new("childcaps");
    let caps = shim.path.join("caps.txt");
    shim.script(
        "iptables-nft-restore",
        &format!(
            "grep -E '^(Cap|NoNewPrivs)' /proc/self/status > {}\nexec {} \"$@\"",
            caps.display(),
            real.display()
        ),
    );
    let path = shim.path_env();
    assert_ok(&ns.istio_init(&["--ipv6=false"], &[("PATH", &path)]));
    let status = std::fs::read_to_string(&caps).expect("the shim ran");
    for want in [
        "CapPrm:\t0000000000003000",
        "CapEff:\t0000000000003000",
        "CapBnd:\t0000000000003000",
        "CapAmb:\t0000000000000000",
        "NoNewPrivs:\t1",
    ] {
        assert!(status.contains(want), "{want} not in:\n{status}");
    }
}

fn setpriv(caps: &str) -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--bounding-set=-all{caps}"),
        "--inh-caps=-all".into(),
        "--".into(),
        bin().into(),
    ]
}

#[test]
fn net_admin_and_net_raw_are_enough_and_without_them_nothing_is_touched() {
    if !privileged("net_admin_and_net_raw_are_enough_and_without_them_nothing_is_touched") {
        return;
    }
    for backend in ["nft", "legacy"] {
        let ns = Netns::new(&format!("caps{backend}"));
        let mut argv = vec!["env".to_owned(), format!("FORCE_IPTABLES_BINARY={backend}")];
        argv.extend(setpriv(",+net_admin,+net_raw"));
        argv.extend(["-m".into(), "TPROXY".into(), "--ipv6=true".into()]);
        let o = ns.run(&argv.iter().map(String::as_str).collect::<Vec<_>>());
        assert_ok(&o);
        assert!(!ns.istio_anywhere().is_empty());
    }

    let ns = Netns::new("nocaps");
    let mut argv = setpriv("");
    argv.extend(["-m".into(), "TPROXY".into(), "--ipv6=true".into()]);
    let o = ns.run(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    assert_code(&o, 1);
    assert_eq!(
        error_line(&o),
        "error: missing capabilities CAP_NET_ADMIN and CAP_NET_RAW: programming iptables needs \
         CAP_NET_ADMIN and CAP_NET_RAW; add them to the init container's \
         securityContext.capabilities.add: [NET_ADMIN, NET_RAW] (on GKE Autopilot the cluster \
         must also allow them: --workload-policies=allow-net-admin)"
    );
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
    assert!(!ns.ok(&["ip", "-6", "addr"]).contains("::6"));
    assert!(!ns.ok(&["ip", "rule"]).contains("fwmark"));

    let mut argv = setpriv(",+net_admin");
    argv.push("--ipv6=false".into());
    let o = ns.run(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    assert_code(&o, 1);
    assert!(
        error_line(&o).starts_with("error: missing capability CAP_NET_RAW: "),
        "{}",
        error_line(&o)
    );

    // --skip-rule-apply needs nothing and does nothing.
    let mut argv = setpriv("");
    argv.push("--skip-rule-apply".into());
    assert_ok(&ns.run(&argv.iter().map(String::as_str).collect::<Vec<_>>()));
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
}

#[test]
fn legacy_forced_stays_legacy_on_a_rerun() {
    if !privileged("legacy_forced_stays_legacy_on_a_rerun") {
        return;
    }
    let ns = Netns::new("forced");
    let o = ns.istio_init(&["--ipv6=false"], &[("FORCE_IPTABLES_BINARY", "legacy")]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("IPv4: using the legacy backend: forced by FORCE_IPTABLES_BINARY"),
        "{}",
        stderr(&o)
    );
    let o = ns.istio_init(&["--ipv6=false"], &[]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("the legacy backend already holds Istio chains"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("already in place"), "{}", stderr(&o));
    assert!(ns.rules("iptables-nft-save").is_empty());
    assert!(
        ns.rules("iptables-legacy-save")
            .iter()
            .any(|l| l.contains("ISTIO_OUTPUT"))
    );

    // Forcing nft now would leave two copies: refused, unless --reconcile moves them.
    let o = ns.istio_init(&["--ipv6=false"], &[("FORCE_IPTABLES_BINARY", "nft")]);
    assert_code(&o, 1);
    assert!(
        error_line(&o).contains("Istio chains already exist in the legacy iptables backend"),
        "{}",
        error_line(&o)
    );
    let o = ns.istio_init(
        &["--ipv6=false", "--reconcile"],
        &[("FORCE_IPTABLES_BINARY", "nft")],
    );
    assert_ok(&o);
    assert!(ns.rules("iptables-legacy-save").is_empty());
    assert!(
        ns.rules("iptables-nft-save")
            .iter()
            .any(|l| l.contains("ISTIO_OUTPUT"))
    );
}

#[test]
fn pre_existing_legacy_rules_choose_legacy_and_an_empty_probe_footprint_does_not() {
    if !privileged("pre_existing_legacy_rules_choose_legacy") {
        return;
    }
    let ns = Netns::new("legacyrules");
    ns.ok(&[
        "iptables-legacy",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "22",
        "-j",
        "ACCEPT",
    ]);
    let o = ns.istio_init(&["--ipv6=false"], &[]);
    assert_ok(&o);
    assert!(
        stderr(&o)
            .contains("IPv4: using the legacy backend: the namespace already has legacy rules"),
        "{}",
        stderr(&o)
    );
    assert!(
        ns.rules("iptables-legacy-save")
            .iter()
            .any(|l| l.contains("ISTIO_OUTPUT"))
    );
    assert!(ns.rules("iptables-nft-save").is_empty());

    // Istio's own probe instantiates an empty legacy nat table; that must not flip the choice,
    // neither on the first run nor on the re-run.
    let ns = Netns::new("footprint");
    ns.ok(&["iptables-legacy", "-t", "nat", "-L", "-n"]);
    assert!(ns.ok(&["cat", "/proc/net/ip_tables_names"]).contains("nat"));
    for _ in 0..2 {
        let o = ns.istio_init(&["--ipv6=false"], &[]);
        assert_ok(&o);
        assert!(
            stderr(&o).contains(
                "IPv4: using the nft backend: the legacy tables present (nat) hold no rules"
            ),
            "{}",
            stderr(&o)
        );
    }
    assert!(ns.rules("iptables-legacy-save").is_empty());
    assert!(
        ns.rules("iptables-nft-save")
            .iter()
            .any(|l| l.contains("ISTIO_OUTPUT"))
    );
}

#[test]
fn a_held_xtables_lock_is_waited_for_and_a_lock_held_too_long_is_a_clear_error() {
    use nix::fcntl::{Flock, FlockArg};
    if !privileged("a_held_xtables_lock_is_waited_for") {
        return;
    }
    let shim = ShimDir::new("lock");
    let lockfile = shim.path.join("xtables.lock");
    let lockpath = lockfile.to_str().unwrap().to_owned();
    let env = [
        ("FORCE_IPTABLES_BINARY", "legacy"),
        ("XTABLES_LOCKFILE", lockpath.as_str()),
    ];
    let hold = || {
        let f = std::fs::File::create(&lockfile).unwrap();
        Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap()
    };

    let ns = Netns::new("lockshort");
    let lock = hold();
    let o = ns.istio_init(&["--ipv6=false", "--xtables-wait=1"], &env);
    drop(lock);
    assert_code(&o, 1);
    let e = error_line(&o);
    assert!(e.contains("IPv4 (legacy backend): "), "{e}");
    assert!(e.contains("holding the xtables lock"), "{e}");
    assert!(
        e.contains("hint: another process held the xtables lock"),
        "{e}"
    );
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());

    let ns = Netns::new("lockwait");
    let lock = hold();
    let mut argv = vec!["env".to_owned(), "-i".to_owned()];
    argv.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    argv.extend([
        bin().to_owned(),
        "--ipv6=false".into(),
        "--xtables-wait=30".into(),
    ]);
    let mut child = ns
        .cmd(&argv.iter().map(String::as_str).collect::<Vec<_>>())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "did not wait for the lock"
    );
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
    drop(lock);
    let o = child.wait_with_output().unwrap();
    assert_ok(&o);
    assert!(
        ns.rules("iptables-legacy-save")
            .iter()
            .any(|l| l.contains("ISTIO_OUTPUT"))
    );
}

#[test]
fn netns_flag_enters_a_namespace_by_path_or_pid() {
    if !privileged("netns_flag_enters_a_namespace_by_path_or_pid") {
        return;
    }
    use std::io::BufRead;
    use std::os::unix::fs::MetadataExt;

    // By path: istio-init runs in the test's namespace and programs the target.
    let ns = Netns::new("bypath");
    let path = ns.path().display().to_string();
    let o = output(istio_init().args(["--ipv6=false", "--netns", &path]));
    assert_ok(&o);
    assert!(stderr(&o).contains(&format!("entered network namespace {path}")));
    assert!(
        ns.rules("iptables-nft-save")
            .iter()
            .any(|l| l.contains("ISTIO_OUTPUT"))
    );

    // By PID of a process inside the namespace.
    let ns = Netns::new("bypid");
    let mut sleeper = ns
        .cmd(&["sh", "-c", "echo ready; exec sleep 30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(sleeper.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    let pid = sleeper.id().to_string();
    let target = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino();
    assert_eq!(
        target,
        std::fs::metadata(ns.path()).unwrap().ino(),
        "sleeper not in the namespace yet"
    );
    let o = output(istio_init().args(["--ipv6=false", "--netns", &pid]));
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_ok(&o);
    assert!(
        ns.rules("iptables-nft-save")
            .iter()
            .any(|l| l.contains("ISTIO_OUTPUT"))
    );

    // A missing namespace is an input error.
    let o = output(istio_init().args(["--netns", "/nonexistent/netns"]));
    assert_code(&o, 2);
    assert_eq!(
        error_line(&o),
        "error: invalid network namespace \"/nonexistent/netns\" in --netns: no such file \
         (give /proc/PID/ns/net, /var/run/netns/NAME or a PID)"
    );

    // Entering needs CAP_SYS_ADMIN, and the error says so.
    let ns = Netns::new("nosysadmin");
    let mut argv = setpriv(",+net_admin,+net_raw");
    argv.extend([
        "--ipv6=false".into(),
        "--netns".into(),
        ns.path().display().to_string(),
    ]);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    let o = output(&mut cmd);
    assert_code(&o, 1);
    assert!(
        error_line(&o).contains("entering another namespace requires CAP_SYS_ADMIN"),
        "{}",
        error_line(&o)
    );
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
}

#[test]
fn an_owner_group_missing_from_etc_group_is_an_input_error_before_anything_is_touched() {
    if !privileged("an_owner_group_missing_from_etc_group_is_an_input_error") {
        return;
    }
    let ns = Netns::new("group");
    let o = ns.istio_init(
        &["-m", "TPROXY", "--ipv6=true"],
        &[("ISTIO_OUTBOUND_OWNER_GROUPS", "nosuchgroupzz")],
    );
    assert_code(&o, 2);
    assert_eq!(
        error_line(&o),
        "error: invalid group \"nosuchgroupzz\" in env ISTIO_OUTBOUND_OWNER_GROUPS: no such \
         group in /etc/group, where iptables looks group names up; use the numeric GID"
    );
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
    assert!(!ns.ok(&["ip", "rule"]).contains("fwmark"));

    // A group that exists is resolved by iptables.
    ns.etc_file("group", "root:x:0:\nappgroup:x:4242:\n");
    let o = ns.istio_init(
        &["--ipv6=false"],
        &[("ISTIO_OUTBOUND_OWNER_GROUPS", "appgroup")],
    );
    assert_ok(&o);
    assert!(
        ns.rules("iptables-nft-save")
            .iter()
            .any(|l| l.contains("! --gid-owner 4242 -j RETURN")),
        "{:#?}",
        ns.rules("iptables-nft-save")
    );
}

#[test]
fn a_kernel_without_nf_tables_falls_back_to_legacy() {
    if !privileged("a_kernel_without_nf_tables_falls_back_to_legacy") {
        return;
    }
    let ns = Netns::new("nonft");
    let shim = ShimDir::new("nonft");
    // What iptables-nft-restore prints when the kernel has no nf_tables.
    shim.script(
        "iptables-nft-restore",
        "cat >/dev/null\necho 'iptables-nft-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Protocol not supported' >&2\nexit 1",
    );
    let path = shim.path_env();
    // A shim cannot take nf_tables out of the kernel, so the fresh-namespace check of the
    // handover (a dump of the nf_tables tables, which fails on such a kernel) still passes
    // here: --handover=false puts the run where a kernel without nf_tables puts it.
    let o = ns.istio_init(&["--ipv6=false", "--handover=false"], &[("PATH", &path)]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("IPv4: nf_tables is not usable here (Could not fetch rule set generation id: Protocol not supported); falling back to the legacy backend"),
        "{}",
        stderr(&o)
    );
    assert!(
        ns.rules("iptables-legacy-save")
            .iter()
            .any(|l| l.contains("ISTIO_OUTPUT"))
    );
    assert!(ns.rules("iptables-nft-save").is_empty());

    // Forced nft does not fall back.
    let ns = Netns::new("nonftforced");
    let o = ns.istio_init(
        &["--ipv6=false"],
        &[("PATH", &path), ("FORCE_IPTABLES_BINARY", "nft")],
    );
    assert_code(&o, 1);
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new());
}
