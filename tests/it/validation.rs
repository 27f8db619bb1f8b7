//! `--run-validation` in real namespaces: it passes when the rules are loaded and it runs as
//! the proxy user, and otherwise exits 126 saying what it checked, what it observed and the
//! likely cause. Every run is inside a namespace created here, as uid 1337 via `setpriv` where
//! the proxy's identity matters.

use std::process::Output;

use istio_init::capture::Facts;
use istio_init::net::Family;
use istio_init::settings::cli;
use istio_init::{Env, build_all};

use crate::util::{Netns, bin, output, privileged, stderr, veth};

/// Loads the ruleset of `args` (both families when `v6`) into the namespace, as the apply
/// path would; with IPv6 also the `::6` address on lo that istio-init adds.
fn load_rules(ns: &Netns, args: &[&str], v6: bool) {
    let mut argv = vec!["istio-init"];
    argv.extend_from_slice(args);
    let inv = cli::parse(argv).expect("args");
    let cfg = istio_init::resolve(&inv, &Env { var: &|_| None }).expect("config");
    let facts = Facts {
        ipv6: v6,
        dns_servers: Vec::new(),
    };
    for rs in build_all(&cfg, &facts) {
        let prog = match rs.family {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        };
        let o = ns.run_with_input(
            &[prog, "--noflush"],
            &istio_init::backend::iptables::render::ruleset_text(&rs),
        );
        assert!(o.status.success(), "{prog}: {}", stderr(&o));
    }
    if v6 {
        ns.ok(&["ip", "-6", "addr", "add", "::6/128", "dev", "lo", "nodad"]);
    }
}

/// Gives the namespace a global IPv6 address (on a veth to a helper namespace, which the
/// caller keeps alive), so that `--ipv6=auto` validates IPv6 too.
fn add_global_v6(ns: &Netns) -> Netns {
    let other = Netns::new("valpeer");
    veth(ns, &["2001:db8::1/64"], &other, &["2001:db8::2/64"]);
    other
}

/// Runs `istio-init --run-validation --skip-rule-apply` in the namespace as `uid`.
fn validate(ns: &Netns, uid: u32, extra: &[&str]) -> Output {
    let (u, g) = (format!("--reuid={uid}"), format!("--regid={uid}"));
    let mut argv = vec![
        "setpriv",
        &u,
        &g,
        "--clear-groups",
        bin(),
        "--run-validation",
        "--skip-rule-apply",
        "--probe-timeout=1s",
    ];
    argv.extend_from_slice(extra);
    let mut cmd = ns.cmd(&argv);
    cmd.env_clear();
    output(&mut cmd)
}

#[test]
fn passes_with_the_rules_for_every_family() {
    if !privileged("passes_with_the_rules_for_every_family") {
        return;
    }
    let ns = Netns::new("valok");
    let _peer = add_global_v6(&ns);
    load_rules(&ns, &[], true);
    let o = validate(&ns, 1337, &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{e}");
    assert!(e.contains("validation passed: IPv4: the probe to 127.0.0.6:15002 was redirected to 127.0.0.1:15006 (SO_ORIGINAL_DST 127.0.0.6:15002)"), "{e}");
    assert!(e.contains("validation passed: IPv6: the probe to [::6]:15002 was redirected to [::1]:15006 (SO_ORIGINAL_DST [::6]:15002)"), "{e}");
    assert!(
        e.contains("iptables validation passed for IPv4 and IPv6"),
        "{e}"
    );
}

#[test]
fn fails_with_126_and_an_explanation_without_rules() {
    if !privileged("fails_with_126_and_an_explanation_without_rules") {
        return;
    }
    let ns = Netns::new("valnone");
    let o = validate(&ns, 1337, &["--ipv6=false"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(126), "{e}");
    assert!(e.contains("error: iptables validation failed; workload is not ready for Istio.\n  IPv4: checked: a TCP connection from 127.0.0.1 to 127.0.0.6:15002 as uid 1337 gid 1337, which the rules must redirect to a listener on 127.0.0.1:15001 or 127.0.0.1:15006 (for 1s)\n    observed: connection refused"), "{e}");
    assert!(
        e.contains("likely cause: the IPv4 redirect rules are not in place"),
        "{e}"
    );
}

#[test]
fn fails_when_not_running_as_the_proxy_user() {
    if !privileged("fails_when_not_running_as_the_proxy_user") {
        return;
    }
    let ns = Netns::new("valuid");
    load_rules(&ns, &[], false);
    let o = validate(&ns, 1000, &["--ipv6=false"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(126), "{e}");
    assert!(e.contains("observed: connection refused"), "{e}");
    assert!(e.contains("likely cause: this check runs as uid 1000 gid 1000, but the rules only redirect the proxy's own traffic (uid 1337, gid 1337) to 127.0.0.6: run the validation as the proxy user (runAsUser: 1337)"), "{e}");
}

#[test]
fn checks_ipv6_separately() {
    if !privileged("checks_ipv6_separately") {
        return;
    }
    // IPv4 rules only, but the namespace has a global IPv6 address: IPv6 must fail on its own.
    let ns = Netns::new("valv6");
    let _peer = add_global_v6(&ns);
    load_rules(&ns, &[], false);
    let o = validate(&ns, 1337, &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(126), "{e}");
    assert!(e.contains("validation passed: IPv4"), "{e}");
    assert!(!e.contains("  IPv4: checked"), "{e}");
    assert!(
        e.contains("  IPv6: checked: a TCP connection from ::1 to [::6]:15002"),
        "{e}"
    );
    assert!(
        e.contains("[::6]:15002 is not reachable: IPv6 needs ::6/128 on lo"),
        "{e}"
    );
}

#[test]
fn honours_the_probe_port() {
    if !privileged("honours_the_probe_port") {
        return;
    }
    // Outbound port 15002 is excluded, so the default probe is not redirected; another probe
    // port is.
    let ns = Netns::new("valport");
    load_rules(&ns, &["-o", "15002"], false);
    let o = validate(&ns, 1337, &["--ipv6=false"]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));
    let o = validate(&ns, 1337, &["--ipv6=false", "--iptables-probe-port=15003"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{e}");
    assert!(e.contains("127.0.0.6:15003 was redirected"), "{e}");
}

#[test]
fn reports_dropped_probes_as_timeouts() {
    if !privileged("reports_dropped_probes_as_timeouts") {
        return;
    }
    let ns = Netns::new("valdrop");
    ns.ok(&[
        "iptables",
        "-A",
        "OUTPUT",
        "-d",
        "127.0.0.6/32",
        "-p",
        "tcp",
        "-j",
        "DROP",
    ]);
    let o = validate(&ns, 1337, &["--ipv6=false"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(126), "{e}");
    assert!(
        e.contains("observed: no answer: the connection attempt timed out"),
        "{e}"
    );
    assert!(
        e.contains("likely cause: packets to the probe address are dropped"),
        "{e}"
    );
}

#[test]
fn reports_a_probe_that_is_not_redirected() {
    if !privileged("reports_a_probe_that_is_not_redirected") {
        return;
    }
    // Something listens on the probe port itself: the connection succeeds without a redirect.
    let ns = Netns::new("valelse");
    let path = ns.path();
    let squatter = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("opening the netns");
        nix::sched::setns(
            std::os::fd::AsFd::as_fd(&f),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .expect("setns");
        std::net::TcpListener::bind("127.0.0.6:15002").expect("listening on the probe address")
    })
    .join()
    .expect("netns thread");
    let o = validate(&ns, 1337, &["--ipv6=false"]);
    drop(squatter);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(126), "{e}");
    assert!(e.contains("observed: the connection to 127.0.0.6:15002 was accepted, but not by the proxy's ports: it was not redirected"), "{e}");
}
