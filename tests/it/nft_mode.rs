//! `--native-nftables` end to end, against Istio's 28 nftables goldens (read from
//! `../shared/conformance`; absent: skipped locally, a failure under `CI=true`). For every case
//! the real binary applies its configuration in one fresh namespace, `nft -f` of Istio's golden
//! runs in another, and `nft -f` of our own dry run in a third: the three `nft list ruleset`
//! listings must be equal (counter values aside), and so must the two `--debug=netlink`
//! listings of ours and Istio's (expression by expression). A re-run converges to the same
//! ruleset, and `--cleanup-only` leaves nothing.
//!
//! Also, on the dual-stack TPROXY + DNS configuration of the fault tests (nat, mangle and raw
//! tables): CAP_NET_ADMIN alone with an empty `PATH` is enough and CAP_NET_RAW alone touches
//! nothing; the other mode's rules are refused, replaced with `--reconcile`, and removed by
//! `--cleanup-only` in either mode; and a re-run with REDIRECT deletes the mangle table in the
//! transaction that rewrites the others (seen with `nft monitor`). The kill test is in
//! `nft_faults.rs`.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::faults::{ROUTING, istio_init_cmd, pod, resolv_dir, run_istio_init, sidecar_args};
use crate::nftables::{debug_listing, listing, nft_f, zero_counters};
use crate::util::{
    Netns, TempDir, assert_code, assert_ok, bin, error_line, privileged, shared_conformance,
    stderr, stdout, which,
};

/// Group names the owner-group cases use, resolvable inside the test namespaces.
pub const GROUP_FILE: &str = "root:x:0:\njava:x:1001:\nftp:x:1002:\n";

/// One case of `nft-cases.json`: the arguments (base arguments first), env vars, whether the
/// namespace has IPv6 and its nameservers.
#[derive(Debug)]
pub struct NftCase {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ipv6: bool,
    pub dns: Vec<String>,
}

pub fn nft_cases() -> Option<(std::path::PathBuf, Vec<NftCase>)> {
    let dir = shared_conformance()?;
    let text = std::fs::read_to_string(dir.join("nft-cases.json")).expect("nft-cases.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("nft-cases.json");
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let base = strings(&json["base_args"]);
    let cases: Vec<NftCase> = json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| NftCase {
            name: c["name"].as_str().unwrap().to_owned(),
            args: base.iter().cloned().chain(strings(&c["args"])).collect(),
            env: c["env"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            ipv6: c["ipv6"].as_bool().unwrap_or(false),
            dns: strings(&c["dns_servers"]),
        })
        .collect();
    assert_eq!(cases.len(), 28, "nft-cases.json lists 28 cases");
    Some((dir, cases))
}

impl NftCase {
    /// The arguments of a run in `--native-nftables` mode, with the case's facts made explicit.
    pub fn argv(&self, tmp: &TempDir, extra: &[&str]) -> Vec<String> {
        let resolv: String = self
            .dns
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect();
        let resolv = tmp.file(&format!("{}.resolv.conf", self.name), resolv);
        let mut v: Vec<String> = vec!["istio-iptables".into()];
        v.extend(self.args.iter().cloned());
        v.push("--native-nftables".into());
        v.push(format!("--ipv6={}", self.ipv6));
        v.push(format!("--resolv-conf={}", resolv.display()));
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    }

    pub fn run(&self, ns: &Netns, tmp: &TempDir, extra: &[&str]) -> std::process::Output {
        let argv = self.argv(tmp, extra);
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        ns.istio_init(&args, &env)
    }
}

pub fn ready(test: &str) -> bool {
    if !privileged(test) {
        return false;
    }
    if which("nft").is_none() {
        let msg = format!("{test}: `nft` is not installed (scripts/test.sh installs nftables)");
        assert!(!crate::util::in_ci(), "{msg}");
        eprintln!("skipped: {msg}");
        return false;
    }
    true
}

#[test]
fn native_nftables_equals_istio_goldens_in_the_kernel() {
    if !ready("native_nftables_equals_istio_goldens_in_the_kernel") {
        return;
    }
    let Some((dir, cases)) = nft_cases() else {
        return;
    };
    let tmp = TempDir::new("nftmode");
    let mut failures = Vec::new();
    for case in &cases {
        let golden = std::fs::read_to_string(
            dir.join("istio-nft-goldens")
                .join(format!("{}.golden", case.name)),
        )
        .expect("golden");
        let (ours, theirs, text) = (Netns::new("ours"), Netns::new("istio"), Netns::new("text"));
        for ns in [&ours, &theirs, &text] {
            ns.etc_file("group", GROUP_FILE);
        }
        let o = case.run(&ours, &tmp, &[]);
        assert_ok(&o);
        nft_f(&theirs, &golden);
        let dry = case.run(&text, &tmp, &["--dry-run"]);
        assert_ok(&dry);
        nft_f(&text, &stdout(&dry));
        let want = listing(&theirs);
        for (what, got) in [("apply", listing(&ours)), ("dry-run text", listing(&text))] {
            if got != want {
                failures.push(format!(
                    "{} ({what}):\n{}",
                    case.name,
                    crate::golden::diff(&want, &got)
                ));
            }
        }
        let (w, g) = (debug_listing(&theirs), debug_listing(&ours));
        if w != g {
            failures.push(format!(
                "{} (--debug=netlink):\n{}",
                case.name,
                crate::golden::diff(&w, &g)
            ));
        }
        // A re-run converges to the same ruleset; cleanup leaves nothing of ours.
        assert_ok(&case.run(&ours, &tmp, &[]));
        if listing(&ours) != want {
            failures.push(format!("{}: a re-run changed the ruleset", case.name));
        }
        assert_ok(&case.run(&ours, &tmp, &["--cleanup-only"]));
        let left = listing(&ours);
        if left.contains("istio") {
            failures.push(format!("{}: --cleanup-only left:\n{left}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---- The dual-stack TPROXY + DNS configuration: capabilities, coexistence, re-runs ----

/// The fault tests' configuration (TPROXY, DNS capture for one nameserver per family, INVALID
/// drop, IPv6 on), in nftables mode when `nft`.
pub fn sidecar(resolv: &Path, nft: bool) -> Vec<String> {
    let mut args = sidecar_args(resolv);
    if nft {
        args.push("--native-nftables".into());
    }
    args
}

fn with(args: &[String], extra: &str) -> Vec<String> {
    args.iter().cloned().chain([extra.to_owned()]).collect()
}

/// A namespace's whole nf_tables ruleset (`nft list ruleset`, counters zeroed: iptables-nft's
/// tables show too) and its TPROXY routing, read in one `ip netns exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftState {
    pub rules: String,
    pub routing: String,
}

pub fn nft_state(ns: &Netns) -> NftState {
    let script = format!("nft list ruleset && echo @@routing && {{ {ROUTING}; }} 2>&1");
    let out = ns.ok(&["sh", "-c", &script]);
    let (rules, routing) = out.split_once("@@routing\n").expect("the routing marker");
    NftState {
        rules: zero_counters(rules),
        routing: routing.to_owned(),
    }
}

/// A fresh pod's state and the state a clean run of `args` (nftables mode, the three tables)
/// leaves in another.
pub fn reference(tag: &str, args: &[String]) -> (NftState, NftState) {
    let ns = pod(tag);
    let untouched = nft_state(&ns);
    assert_ok(&run_istio_init(&ns, args, &[]));
    let full = nft_state(&ns);
    for t in ["nat", "mangle", "raw"] {
        let table = format!("table inet istio-proxy-{t} {{");
        assert!(full.rules.contains(&table), "{table}:\n{}", full.rules);
    }
    (untouched, full)
}

/// Runs `args` where the other mode's rules are: refused (exit 1), nothing changed. Returns
/// the error line.
fn refused(ns: &Netns, args: &[String]) -> String {
    let before = nft_state(ns);
    let o = run_istio_init(ns, args, &[]);
    assert_code(&o, 1);
    assert_eq!(nft_state(ns), before, "a refused run changed the namespace");
    error_line(&o)
}

/// The `table inet istio-proxy-*` blocks of a listing.
pub fn ours(listing: &str) -> String {
    let mut out = String::new();
    let mut keep = false;
    for l in listing.lines() {
        if l.starts_with("table ") {
            keep = l.starts_with("table inet istio-proxy-");
        }
        if keep {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

#[test]
fn net_admin_alone_with_an_empty_path_is_enough_and_net_raw_alone_touches_nothing() {
    let test = "net_admin_alone_with_an_empty_path_is_enough";
    if !ready(test) {
        return;
    }
    let Some(setpriv) = which("setpriv") else {
        assert!(
            !crate::util::in_ci(),
            "{test}: setpriv (util-linux) is missing"
        );
        eprintln!("skipped: {test}: setpriv (util-linux) is missing");
        return;
    };
    let (_dir, resolv) = resolv_dir("nftcaps");
    let args = sidecar(&resolv, true);
    let (untouched, full) = reference("nftcapref", &args);

    // Inside the namespace (entering one would need CAP_SYS_ADMIN), with nothing but `caps` in
    // the bounding set (so in every set of root's exec) and an empty PATH: no program can be
    // found, so none can have been run.
    let run = |ns: &Netns, caps: &str| {
        let mut argv = vec![
            "env".to_owned(),
            "-i".into(),
            "PATH=".into(),
            setpriv.display().to_string(),
            format!("--bounding-set=-all,{caps}"),
            "--inh-caps=-all".into(),
            "--".into(),
            bin().into(),
        ];
        argv.extend(args.iter().cloned());
        ns.run(&argv.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let ns = pod("nftcapadmin");
    let o = run(&ns, "+net_admin");
    assert_ok(&o);
    assert_eq!(nft_state(&ns), full, "{}", stderr(&o));

    let ns = pod("nftcapraw");
    let o = run(&ns, "+net_raw");
    assert_code(&o, 1);
    assert_eq!(
        error_line(&o),
        "error: missing capability CAP_NET_ADMIN: programming nftables needs CAP_NET_ADMIN; add \
         them to the init container's securityContext.capabilities.add: [NET_ADMIN] (on GKE \
         Autopilot the cluster must also allow them: --workload-policies=allow-net-admin)"
    );
    let after = nft_state(&ns);
    assert_eq!(after, untouched);
    assert!(!after.rules.contains("istio-proxy"), "{}", after.rules);
    assert!(!after.routing.contains("fwmark"), "{}", after.routing);
    assert!(!after.routing.contains("::6/128"), "{}", after.routing);
}

/// `--native-nftables --dry-run` loaded with `nft -f`: the nftables mode's rules, put there
/// without istio-init's coexistence check.
fn nft_rules_beside(ns: &Netns, nft_args: &[String]) {
    let o = istio_init_cmd(ns, &with(nft_args, "--dry-run"), &[])
        .stdout(Stdio::piped())
        .output()
        .expect("running istio-init --dry-run");
    assert_ok(&o);
    nft_f(ns, &stdout(&o));
}

#[test]
fn the_other_modes_rules_are_refused_replaced_with_reconcile_and_removed_by_cleanup() {
    if !ready("the_other_modes_rules_are_refused") {
        return;
    }
    let (_dir, resolv) = resolv_dir("coexist");
    let (ipt, nft) = (sidecar(&resolv, false), sidecar(&resolv, true));
    // Each mode alone in a fresh pod: what a replacement must equal.
    let (ref_ipt, ref_nft) = (pod("coexrefipt"), pod("coexrefnft"));
    assert_ok(&run_istio_init(&ref_ipt, &ipt, &[]));
    assert_ok(&run_istio_init(&ref_nft, &nft, &[]));
    let iptables_rules = |ns: &Netns| {
        [
            ns.rules("iptables-nft-save"),
            ns.rules("ip6tables-nft-save"),
        ]
        .concat()
    };
    let want_ipt = iptables_rules(&ref_ipt);
    let want_nft = ours(&nft_state(&ref_nft).rules);
    assert!(
        want_ipt.iter().any(|l| l.contains("ISTIO_TPROXY")),
        "{want_ipt:?}"
    );
    assert!(
        want_nft.contains("table inet istio-proxy-raw"),
        "{want_nft}"
    );

    // (a) The iptables mode's rules, then nftables: refused, untouched; --reconcile replaces
    // them in the nftables mode's own transaction. Foreign rules in iptables-nft's built-in
    // chains (around Istio's jump) stay; what is left equals those rules alone in a fresh pod.
    let foreign = |ns: &Netns| {
        for (prog, addr) in [
            ("iptables-nft", "198.18.7.7"),
            ("ip6tables-nft", "2001:db8::7"),
        ] {
            let at_head = [
                prog, "-t", "nat", "-I", "OUTPUT", "1", "-o", "eth9", "-j", "ACCEPT",
            ];
            ns.ok(&at_head);
            ns.ok(&[
                prog, "-t", "nat", "-A", "OUTPUT", "-d", addr, "-j", "RETURN",
            ]);
            ns.ok(&[
                prog, "-t", "mangle", "-A", "OUTPUT", "-d", addr, "-j", "ACCEPT",
            ]);
        }
    };
    let ref_foreign = pod("coexaforeign");
    foreign(&ref_foreign);
    let want_foreign = iptables_rules(&ref_foreign);
    assert_eq!(want_foreign.len(), 6, "{want_foreign:?}");
    let ns = pod("coexa");
    assert_ok(&run_istio_init(&ns, &ipt, &[]));
    foreign(&ns);
    let e = refused(&ns, &nft);
    for want in [
        "this network namespace holds the iptables mode's Istio rules (",
        "ip nat (iptables-nft)",
        "ip6 nat (iptables-nft)",
        "ip mangle (iptables-nft)",
        "ip6 mangle (iptables-nft)",
        "both would capture traffic",
        "--cleanup-only",
        "--reconcile",
    ] {
        assert!(e.contains(want), "{want:?} not in {e}");
    }
    let reconcile = with(&nft, "--reconcile");
    let before = iptables_rules(&ns);
    // Without the programs that tell Istio's rules in built-in chains from foreign ones: a
    // clear refusal before anything changes.
    let empty = TempDir::new("coexapath");
    let path = empty.path().display().to_string();
    let o = run_istio_init(&ns, &reconcile, &[("PATH", &path)]);
    assert_code(&o, 1);
    let line = error_line(&o);
    assert!(
        line.contains("to remove them in the nftables transaction")
            && line.contains("iptables-nft-save")
            && line.ends_with("nothing was changed"),
        "{line}"
    );
    assert_eq!(iptables_rules(&ns), before);
    // Refused inside the transaction, after its iptables-nft deletions (another process owns
    // inet istio-proxy-raw, so the kernel refuses its delete): everything stays as it was.
    let owner = OwnedTable::hold(&ns, "istio-proxy-raw");
    let line = refused(&ns, &reconcile);
    assert!(
        line.contains(
            "the kernel refused `add table inet istio-proxy-raw; delete table inet istio-proxy-raw`"
        ) && line.ends_with("nothing was applied"),
        "{line}"
    );
    assert_eq!(iptables_rules(&ns), before);
    owner.release();
    // Then accepted: one transaction (one generation) deletes the iptables-nft rules and
    // chains and adds the nftables mode's tables.
    let mut monitor = Monitor::start(&ns);
    let o = run_istio_init(&ns, &reconcile, &[]);
    assert_ok(&o);
    let events = monitor
        .mark("coexaend", Duration::from_secs(5))
        .expect("the end marker reported");
    drop(monitor);
    let transactions: Vec<&[String]> = events
        .split(|l| l.starts_with("# new generation"))
        .filter(|t| {
            t.iter().any(|l| {
                l.starts_with("delete chain ip nat ISTIO_") || l.contains("table inet istio-proxy-")
            })
        })
        .collect();
    assert_eq!(transactions.len(), 1, "{events:#?}\n{}", stderr(&o));
    for want in [
        "add table inet istio-proxy-nat",
        "add table inet istio-proxy-mangle",
        "delete chain ip nat ISTIO_OUTPUT",
        "delete chain ip6 nat ISTIO_OUTPUT",
        "delete chain ip mangle ISTIO_TPROXY",
        "delete chain ip6 mangle ISTIO_DIVERT",
    ] {
        assert!(
            transactions[0].iter().any(|l| l.starts_with(want)),
            "{want:?} not in the transaction {:#?}",
            transactions[0]
        );
    }
    for want in [
        "in one transaction, which also removed the iptables mode's rules (",
        "ip nat: 1 rule in OUTPUT, 5 chains flushed and deleted",
        "ip6 mangle: 7 rules in PREROUTING, OUTPUT, 4 chains flushed and deleted",
    ] {
        assert!(stderr(&o).contains(want), "{want:?} not in {}", stderr(&o));
    }
    assert_eq!(ns.istio_anywhere(), Vec::<String>::new(), "{}", stderr(&o));
    assert_eq!(iptables_rules(&ns), want_foreign, "{}", stderr(&o));
    assert_eq!(ours(&nft_state(&ns).rules), want_nft);

    // (b) The nftables mode's rules, then iptables: refused, untouched; --reconcile replaces.
    let ns = pod("coexb");
    assert_ok(&run_istio_init(&ns, &nft, &[]));
    let e = refused(&ns, &ipt);
    assert!(
        e.contains(
            "this network namespace holds the nftables mode's Istio rules (inet \
             istio-proxy-nat, inet istio-proxy-mangle, inet istio-proxy-raw)"
        ) && e.contains("--reconcile"),
        "{e}"
    );
    let o = run_istio_init(&ns, &with(&ipt, "--reconcile"), &[]);
    assert_ok(&o);
    assert_eq!(iptables_rules(&ns), want_ipt, "{}", stderr(&o));
    assert_eq!(ours(&nft_state(&ns).rules), "");

    // (c) Both modes' rules at once (the second loaded behind istio-init's back): either
    // mode's --cleanup-only removes both; a second cleanup finds nothing and changes nothing.
    for (tag, mode) in [("coexcipt", &ipt), ("coexcnft", &nft)] {
        let ns = pod(tag);
        assert_ok(&run_istio_init(&ns, &ipt, &[]));
        nft_rules_beside(&ns, &nft);
        assert!(!ns.istio_anywhere().is_empty());
        assert_eq!(ours(&nft_state(&ns).rules), want_nft);
        let o = run_istio_init(&ns, &with(mode, "--cleanup-only"), &[]);
        assert_ok(&o);
        let left = nft_state(&ns).rules;
        assert_eq!(
            ns.istio_anywhere(),
            Vec::<String>::new(),
            "{tag}: {}",
            stderr(&o)
        );
        assert!(
            !left.contains("istio") && !left.contains("ISTIO"),
            "{tag}: {left}\n{}",
            stderr(&o)
        );
        let cleaned = nft_state(&ns);
        assert_ok(&run_istio_init(&ns, &with(mode, "--cleanup-only"), &[]));
        assert_eq!(
            nft_state(&ns),
            cleaned,
            "{tag}: a second cleanup changed something"
        );
    }
}

/// `inet NAME` created with `flags owner` by an interactive `nft`, which keeps its netlink
/// socket open until its stdin closes (the kernel then deletes the table): while held, the
/// kernel refuses any other process's delete of the table.
struct OwnedTable(std::process::Child);

impl OwnedTable {
    fn hold(ns: &Netns, name: &str) -> OwnedTable {
        let mut owner = ns
            .cmd(&["nft", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nft -i");
        {
            use std::io::Write;
            let stdin = owner.stdin.as_mut().expect("stdin");
            writeln!(stdin, "add table inet {name} {{ flags owner; }}")
                .and_then(|()| stdin.flush())
                .expect("writing to nft -i");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !nft_state(ns).rules.contains("flags owner") {
            assert!(
                std::time::Instant::now() < deadline,
                "nft -i made no owned table"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnedTable(owner)
    }

    /// Closes the owner's stdin: it exits, and the kernel deletes the table.
    fn release(mut self) {
        drop(self.0.stdin.take());
        assert!(self.0.wait().expect("nft -i").success());
    }
}

/// `nft monitor` in a namespace: its lines, once it is known to be listening.
struct Monitor {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    ns: String,
}

impl Monitor {
    fn start(ns: &Netns) -> Monitor {
        let mut child = ns
            .cmd(&["nft", "monitor"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning nft monitor");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut m = Monitor {
            child,
            lines,
            ns: ns.name.clone(),
        };
        // Listening once it reports a change made after it started.
        for i in 0..50 {
            if m.mark(&format!("iiprobe{i}"), Duration::from_millis(200))
                .is_some()
            {
                return m;
            }
        }
        panic!("nft monitor in {} never reported a change", ns.name);
    }

    /// Makes a marker change (a table added and deleted in one transaction) and returns the
    /// lines reported before it, or `None` when it is not reported within `wait`.
    fn mark(&mut self, name: &str, wait: Duration) -> Option<Vec<String>> {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft"])
            .arg(format!("add table inet {name}; delete table inet {name}"))
            .output()
            .expect("nft");
        assert!(o.status.success(), "marker {name}: {}", stderr(&o));
        let mut before = Vec::new();
        loop {
            let l = self.lines.recv_timeout(wait).ok()?;
            if l == format!("add table inet {name}") {
                break;
            }
            before.push(l);
        }
        // The rest of the marker's own transaction.
        loop {
            let l = self.lines.recv_timeout(wait).ok()?;
            if l.starts_with("# new generation") {
                return Some(before);
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_rerun_from_tproxy_to_redirect_deletes_the_mangle_table_in_the_same_transaction() {
    if !ready("a_rerun_from_tproxy_to_redirect") {
        return;
    }
    let (_dir, resolv) = resolv_dir("tp2re");
    let tproxy = sidecar(&resolv, true);
    let redirect: Vec<String> = [
        "--redirect-dns",
        "--ipv6=true",
        "--native-nftables",
        "--resolv-conf",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([resolv.display().to_string()])
    .collect();
    let fresh = pod("tp2reref");
    assert_ok(&run_istio_init(&fresh, &redirect, &[]));
    let want = ours(&nft_state(&fresh).rules);
    assert!(!want.contains("istio-proxy-mangle"), "{want}");

    let ns = pod("tp2re");
    assert_ok(&run_istio_init(&ns, &tproxy, &[]));
    assert!(
        nft_state(&ns)
            .rules
            .contains("table inet istio-proxy-mangle")
    );
    let mut monitor = Monitor::start(&ns);
    let o = run_istio_init(&ns, &redirect, &[]);
    assert_ok(&o);
    let events = monitor
        .mark("iiend", Duration::from_secs(5))
        .expect("the end marker reported");
    drop(monitor);

    // One transaction: every change of the re-run before the one generation it made.
    let generations: Vec<&String> = events
        .iter()
        .filter(|l| l.starts_with("# new generation"))
        .collect();
    assert_eq!(generations.len(), 1, "{events:#?}\n{}", stderr(&o));
    // The process is named by the sending thread (`istio-init-apply`, cut to 15 bytes).
    assert!(
        events.last().is_some_and(|l| l.contains(" (istio-init")),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|l| l == "delete table inet istio-proxy-mangle"),
        "{events:#?}"
    );
    let after = nft_state(&ns).rules;
    assert!(!after.contains("istio-proxy-mangle"), "{after}");
    assert_eq!(ours(&after), want);
}

/// A failure inside the transaction, through the binary: another process holds
/// `inet istio-proxy-raw` as its owner (`nft -i` with `flags owner`; the kernel deletes such a
/// table when its owner's socket closes), so the kernel refuses the delete that a re-run's
/// transaction starts with. The whole transaction is refused: the nat and mangle tables of the
/// first run stay byte for byte, the error names the refused command on one line, and once the
/// owner is gone the same run succeeds.
#[test]
fn a_refused_command_anywhere_leaves_every_table_as_it_was() {
    if !ready("a_refused_command_anywhere_leaves_every_table_as_it_was") {
        return;
    }
    let tmp = TempDir::new("nftown");
    let resolv = tmp.file(
        "resolv.conf",
        "nameserver 198.18.0.53\nnameserver 2001:db8::53\n",
    );
    let args = sidecar(&resolv, true);
    let (_, full) = reference("nftownref", &args);
    let ns = pod("nftown");
    assert_ok(&run_istio_init(&ns, &args, &[]));
    assert_eq!(nft_state(&ns), full);
    ns.ok(&["nft", "delete", "table", "inet", "istio-proxy-raw"]);
    let owner = OwnedTable::hold(&ns, "istio-proxy-raw");
    // A re-run with another configuration (its nat rules differ), refused at the raw table.
    let changed = with(&args, "--envoy-port=15009");
    let line = refused(&ns, &changed);
    assert!(
        line.contains(
            "the kernel refused `add table inet istio-proxy-raw; delete table inet istio-proxy-raw`"
        ) && line.contains("EPERM")
            && line.contains("flags owner")
            && line.ends_with("nothing was applied"),
        "{line}"
    );
    owner.release();
    assert_ok(&run_istio_init(&ns, &changed, &[]));
    let after = nft_state(&ns);
    assert!(
        after.rules.contains("redirect to :15009"),
        "{}",
        after.rules
    );
    assert!(
        after.rules.contains("table inet istio-proxy-raw {"),
        "{}",
        after.rules
    );
}
