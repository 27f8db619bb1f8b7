//! The binary as a user runs it: dry-run output on stdout, logs and errors on stderr,
//! exit codes.

use crate::util::{istio_init, output, stderr, stdout};

#[test]
fn dry_run_prints_only_the_ruleset_on_stdout() {
    let o = output(istio_init().args(["--dry-run", "--ipv6=false"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("# IPv4"), "{out}");
    assert!(out.lines().skip(1).all(|l| !l.starts_with('#')), "{out}");
    assert!(
        out.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n"),
        "{out}"
    );
    assert!(stderr(&o).contains("Istio config:"), "{}", stderr(&o));
}

#[test]
fn bad_value_exits_2_with_one_line() {
    let o = output(istio_init().args(["-n", "-d", "80x"]));
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "error: invalid port \"80x\" in --istio-local-exclude-ports (-d): not a number\n"
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn user_override_args_are_a_usage_error() {
    let o = output(istio_init().args(["my", "custom", "args"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("my"), "{}", stderr(&o));
}

/// With `--netns`, a dry run (and `explain`) describes the target namespace: IPv6 rules appear
/// exactly when that namespace has a global IPv6 address, whatever the caller's namespace has.
#[test]
fn dry_run_with_netns_reads_the_target_namespace() {
    use crate::util::{Netns, privileged, veth};
    if !privileged("dry_run_with_netns_reads_the_target_namespace") {
        return;
    }
    let (v4_only, dual, peer) = (Netns::new("v4only"), Netns::new("dual"), Netns::new("peer"));
    veth(&v4_only, &["198.18.10.1/24"], &peer, &["198.18.10.2/24"]);
    veth(
        &dual,
        &["198.18.11.1/24", "2001:db8:11::1/64"],
        &peer,
        &["198.18.11.2/24"],
    );
    for (ns, want_v6) in [(&v4_only, false), (&dual, true)] {
        let path = ns.path();
        let o = output(istio_init().args(["--dry-run", "--netns"]).arg(&path));
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o).contains("# IPv6"), want_v6, "{}", ns.name);
        assert!(stdout(&o).starts_with("# IPv4"));
        let o = output(istio_init().args(["explain", "--netns"]).arg(&path));
        assert!(o.status.success(), "{}", stderr(&o));
        let rules_for = if want_v6 {
            "Rules for IPv4 and IPv6."
        } else {
            "Rules for IPv4 only."
        };
        assert!(stdout(&o).contains(rules_for), "{}", stdout(&o));
        // Nothing was programmed: a dry run only reads.
        assert!(!ns.ok(&["iptables-save"]).contains("ISTIO"));
    }
}
