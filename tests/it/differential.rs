//! Differential test against Istio's real tool (`../shared/reference/istio-iptables`; absent:
//! skipped loudly, a failure under `CI=true`).
//!
//! Random valid configurations (`diffgen.rs`) run through Istio's tool and through istio-init,
//! each in its own fresh network namespace shaped like the pod (`lo` up, an `eth0` with the
//! pod's addresses, the pod's resolv.conf and a group file), both as
//! `env -i PATH=… VARS… TOOL istio-iptables ARGS…`. Then what each left in the kernel is
//! compared:
//! - iptables mode: `iptables-nft-save` and `ip6tables-nft-save` (counters and comments
//!   stripped);
//! - nftables mode (`--native-nftables`): `nft list ruleset` (counters zeroed);
//! - both modes: the TPROXY policy rules and routes, and the addresses of `lo` (`::6`).
//!
//! The differences the README lists under "Differences from Istio" are forgiven by rule: one
//! normalisation per listed difference, named after it ([`ipv6_on_any_global_address`],
//! [`duplicate_nameserver_once`], [`no_probe_footprint`], [`passthrough_address_nodad`]).
//! Where Istio's nftables mode fails on a valid configuration (port ranges, an insert past a
//! chain's end, a jump to a chain it never created) the test says so, counts it per class,
//! and checks that istio-init applied. Anything else fails with a one-line reproducer.
//!
//! Run sizes: `DIFF_CONFIGS` configurations per mode (default 300) from `DIFF_SEED` (default:
//! a fixed seed per mode); `DIFF_INDEX=i` runs case `i` alone; `DIFF_THREADS` (default 3).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::diffgen::{Case, case};
use crate::nft_mode::GROUP_FILE;
use crate::nftables::zero_counters;
use crate::util::{Netns, bin, in_ci, normalized_save, stderr};

const PATH: &str = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";

/// The TPROXY policy rules and routes (in whichever table `-r` names) and the addresses of
/// `lo` (`::6`), per family. Link-local routes differ between any two veths, and the
/// multicast ones come in link-up order: left out.
const ROUTING4: &str = "ip -4 rule; ip -4 route show table all";
const ROUTING6: &str = "ip -6 rule; ip -6 route show table all | grep -v -e fe80 -e multicast; ip -6 -o addr show dev lo";

/// Istio's tool, or `None` (skipped loudly; a failure under CI).
fn reference() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/istio-iptables");
    if p.is_file() {
        return Some(p);
    }
    let msg = format!("{} not found", p.display());
    assert!(
        !in_ci(),
        "{msg}: CI requires Istio's tool for the differential test"
    );
    eprintln!("skipped: differential: {msg}");
    None
}

/// A fresh namespace shaped like the case's pod.
fn pod_netns(case: &Case) -> Netns {
    let ns = Netns::new("diff");
    let mut batch = String::from("link add eth0 type veth peer name eth0p\n");
    if let Some(a) = &case.pod.v4 {
        batch += &format!("addr add {a} dev eth0\n");
    }
    if let Some(a) = &case.pod.v6 {
        batch += &format!("addr add {a} dev eth0 nodad\n");
    }
    batch += "link set eth0 up\nlink set eth0p up\n";
    let o = ns.run_with_input(&["ip", "-batch", "-"], &batch);
    assert!(o.status.success(), "shaping {}: {}", ns.name, stderr(&o));
    // Both tools read the same routes: wait for the carrier (no `linkdown` in one of them).
    let up = |ns: &Netns| {
        ns.ok(&["ip", "-o", "link", "show", "eth0"])
            .contains("LOWER_UP")
    };
    for _ in 0..200 {
        if up(&ns) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    ns.etc_file("resolv.conf", &case.pod.resolv_conf());
    ns.etc_file("group", GROUP_FILE);
    ns
}

/// Runs `program istio-iptables ARGS` in `ns` with only PATH and the case's env.
fn run_tool(ns: &Netns, program: &str, case: &Case) -> Output {
    let mut argv: Vec<String> = vec!["env".into(), "-i".into(), PATH.into()];
    let env = case.env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    argv.extend(env.map(|(k, v)| format!("{k}={v}")));
    argv.push(program.into());
    argv.push("istio-iptables".into());
    argv.extend(case.args.iter().cloned());
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    ns.run(&refs)
}

/// What a run left in the kernel, by component.
type State = BTreeMap<&'static str, String>;

fn read_state(ns: &Netns, nft: bool) -> State {
    let parts: &[(&'static str, &str)] = if nft {
        &[
            ("nft", "nft list ruleset"),
            ("routing4", ROUTING4),
            ("routing6", ROUTING6),
        ]
    } else {
        &[
            ("iptables", "iptables-nft-save"),
            ("ip6tables", "ip6tables-nft-save"),
            ("routing4", ROUTING4),
            ("routing6", ROUTING6),
        ]
    };
    // Without stderr: the saves warn there about iptables-legacy tables (Istio's probes
    // make them).
    let mut state = ns.outputs(parts, false);
    for (key, text) in state.iter_mut() {
        *text = match *key {
            "nft" => zero_counters(text),
            "routing4" | "routing6" => std::mem::take(text),
            _ => normalized_save(text),
        };
    }
    state
}

/// One tool's run: its output and the state it left.
struct Run {
    out: Output,
    state: State,
}

fn run_in_pod(program: &str, case: &Case) -> Run {
    let ns = pod_netns(case);
    let out = run_tool(&ns, program, case);
    let state = read_state(&ns, case.nft);
    Run { out, state }
}

// ---- Forgiven differences: one normalisation per entry of the README's list ----

/// README "Differences from Istio": *IPv6 is on when the pod has any global IPv6 address*.
/// Istio decides from the first address (IPv4 comes first in a dual-stack pod) unless
/// `--dual-stack`. Where Istio's choice is off and ours would be on, istio-init runs in the
/// pod without its IPv6 address (where both choose IPv4 only: see [`check`]), and here the
/// routes that address gives are removed from Istio's state.
fn ipv6_on_any_global_address(case: &Case, component: &str, text: &str) -> String {
    match (case.ipv6_choices_differ(), component, &case.pod.v6) {
        (true, "routing6", Some(v6)) => {
            // `2001:db8:a::b/64`: its routes name `2001:db8:a::/64` and `2001:db8:a::b`.
            let prefix = &v6[..v6.find("::").map_or(v6.len(), |i| i + 2)];
            drop_lines(text, |l| l.contains(prefix))
        }
        _ => text.to_owned(),
    }
}

/// README "Differences from Istio": *`::6` is added without duplicate address detection*
/// (usable at once; Istio's can be `tentative` for a moment, without its routes yet). The
/// address flags of `::6` and its kernel routes are left out of both states.
fn passthrough_address_nodad(component: &str, text: &str) -> String {
    if component != "routing6" {
        return text.to_owned();
    }
    let routes = drop_lines(text, |l| {
        l.starts_with("::6 dev lo") || l.starts_with("local ::6 dev lo")
    });
    (routes.split_inclusive('\n'))
        .map(|l| match l.contains("::6/128") {
            true => l.replace(" nodad", "").replace(" tentative", ""),
            false => l.to_owned(),
        })
        .collect()
}

/// `text` without the lines `drop` selects (line ends kept as they were).
fn drop_lines(text: &str, mut drop: impl FnMut(&str) -> bool) -> String {
    text.split_inclusive('\n')
        .filter(|l| !drop(l.trim_end_matches('\n')))
        .collect()
}

/// README "Differences from Istio": *a nameserver listed twice gives one set of DNS rules*.
/// Removes from Istio's state each DNS rule (port 53) that repeats an earlier rule of the
/// same table and chain and names a nameserver the pod lists twice.
fn duplicate_nameserver_once(case: &Case, text: &str) -> String {
    let dups = case.pod.duplicate_nameservers();
    if dups.is_empty() {
        return text.to_owned();
    }
    // A DNS rule (port 53) naming the server: other rules may name the same address (a
    // loopback nameserver is also a loopback destination).
    let names_dup = |l: &str| {
        (l.contains("dport 53 ") || l.contains("sport 53 "))
            && l.split([' ', '/']).any(|tok| dups.contains(&tok))
    };
    let mut seen: Vec<String> = Vec::new();
    drop_lines(text, |l| {
        let t = l.trim_start();
        if t.starts_with('*') || t.starts_with("table ") || t.starts_with("chain ") {
            seen.clear();
        }
        if names_dup(l) && seen.iter().any(|s| s == l) {
            return true;
        }
        seen.push(l.to_owned());
        false
    })
}

/// README "Differences from Istio": *no probe footprint*. Istio's backend detection leaves
/// tables behind that hold no rule (an `ip6 nat` table with only its built-in chains, even
/// with IPv6 off); istio-init's creates nothing. Drops such tables from an
/// `iptables-save` text.
fn no_probe_footprint(text: &str) -> String {
    let mut out = Vec::new();
    let mut table: Vec<&str> = Vec::new();
    for l in text.lines() {
        if l.starts_with('*') {
            table.clear();
        }
        table.push(l);
        if l == "COMMIT" {
            let empty = table.iter().all(|l| {
                l.starts_with('*') || *l == "COMMIT" || (l.starts_with(':') && !l.ends_with(" -"))
            });
            if !empty {
                out.append(&mut table);
            }
            table.clear();
        }
    }
    out.extend(table);
    out.join("\n")
}

// ---- One case ----

/// The outcome of one case.
enum Outcome {
    /// Equal, after the listed normalisations (the names of those that changed something).
    Equal(Vec<&'static str>),
    /// Istio's tool failed on a valid configuration (the class); istio-init applied.
    IstioFailed(&'static str),
    /// An unexplained difference: the reproducer and what differs.
    Differs(String),
}

/// Why Istio's nftables mode refused a valid configuration, from its error output (`nft`
/// prints the refused command after its error line).
fn istio_failure_class(err: &str) -> Option<&'static str> {
    if err.contains("unexpected colon") || err.contains("Could not resolve service") {
        return Some("port range written a:b");
    }
    let mut lines = err.lines();
    lines.find(|l| l.contains("Could not process rule: No such file or directory"))?;
    match lines.next()? {
        l if l.contains(" jump ") => Some("jump to a chain it never created"),
        l if l.starts_with("insert rule") => Some("insert past a chain's end"),
        _ => None,
    }
}

/// Istio's tool logs on stdout, istio-init on stderr: both, for the error lines.
fn log(o: &Output) -> String {
    format!("{}{}", crate::util::stdout(o), stderr(o))
}

fn last_error(o: &Output) -> String {
    let log = log(o);
    let mut errors = log.lines().filter(|l| l.contains("error"));
    errors
        .next_back()
        .unwrap_or_else(|| log.lines().next_back().unwrap_or_default())
        .to_owned()
}

/// Applies one normalisation to every component of a state, and names it in
/// `forgiven` when it changed something.
fn normalise(
    state: &mut State,
    forgiven: &mut Vec<&'static str>,
    name: &'static str,
    f: impl Fn(&str, &str) -> String,
) {
    let mut changed = false;
    for (k, text) in state.iter_mut() {
        let t = f(k, text);
        changed |= t != *text;
        *text = t;
    }
    if changed {
        forgiven.push(name);
    }
}

fn check(istio: &str, case: &Case) -> Outcome {
    let theirs = run_in_pod(istio, case);
    let mut ours = run_in_pod(bin(), case);
    let differs = |what: String| Outcome::Differs(format!("{}\n{what}", case.reproducer()));
    if !ours.out.status.success() {
        return differs(format!("istio-init failed: {}", stderr(&ours.out)));
    }
    if !theirs.out.status.success() {
        let err = log(&theirs.out);
        return match istio_failure_class(&err).filter(|_| case.nft) {
            Some(class) if ours.state["nft"].contains("table inet istio-proxy-nat") => {
                Outcome::IstioFailed(class)
            }
            Some(class) => differs(format!("Istio failed ({class}); istio-init left no tables")),
            None => differs(format!("Istio's tool failed: {}", last_error(&theirs.out))),
        };
    }
    if std::env::var_os("DIFF_INDEX").is_some() {
        eprintln!("Istio's state: {:#?}", theirs.state);
        eprintln!("istio-init's state: {:#?}", ours.state);
    }
    if case.ipv6_choices_differ() {
        ours = run_in_pod(bin(), &case.without_ipv6_address());
        if !ours.out.status.success() {
            let err = stderr(&ours.out);
            return differs(format!("istio-init, pod without IPv6: {err}"));
        }
    }
    match compare(case, theirs.state, ours.state) {
        Ok(forgiven) => Outcome::Equal(forgiven),
        Err(diff) => differs(diff),
    }
}

/// Compares the two states once every listed difference is normalised away. Returns the
/// names of the normalisations that changed something, or what still differs.
fn compare(case: &Case, theirs: State, ours: State) -> Result<Vec<&'static str>, String> {
    let (mut want, mut got, mut forgiven) = (theirs, ours, Vec::new());
    let ipv6 = |k: &str, t: &str| ipv6_on_any_global_address(case, k, t);
    normalise(&mut want, &mut forgiven, "ipv6_on_any_global_address", ipv6);
    let dns = |_: &str, t: &str| duplicate_nameserver_once(case, t);
    normalise(&mut want, &mut forgiven, "duplicate_nameserver_once", dns);
    let probe = |k: &str, t: &str| match k {
        "iptables" | "ip6tables" => no_probe_footprint(t),
        _ => t.to_owned(),
    };
    normalise(&mut want, &mut forgiven, "no_probe_footprint", probe);
    // Counted where ours carries `nodad` (wherever it adds `::6`).
    normalise(&mut want, &mut Vec::new(), "", passthrough_address_nodad);
    let nodad = "passthrough_address_nodad";
    normalise(&mut got, &mut forgiven, nodad, passthrough_address_nodad);
    let diffs: Vec<String> = (want.iter())
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}:\n{}", crate::golden::diff(v, &got[k])))
        .collect();
    if !diffs.is_empty() {
        return Err(diffs.join("\n"));
    }
    let captured = ["ISTIO_OUTPUT", "istio-output"];
    if !want
        .values()
        .any(|t| captured.iter().any(|c| t.contains(c)))
    {
        return Err("Istio's run left no rules".into());
    }
    Ok(forgiven)
}

// ---- The runs ----

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
    )
}

/// Tallies of one mode's run.
#[derive(Default)]
struct Tally {
    equal: usize,
    forgiven: BTreeMap<&'static str, usize>,
    istio_failed: BTreeMap<&'static str, usize>,
    differs: Vec<String>,
}

fn differential(nft: bool, default_seed: u64) {
    let test = if nft { "nftables" } else { "iptables" };
    if !crate::nft_mode::ready(&format!("differential ({test} mode)")) {
        return;
    }
    let Some(istio) = reference() else { return };
    let istio = istio.display().to_string();
    let seed = env_u64("DIFF_SEED").unwrap_or(default_seed);
    let indexes: Vec<u64> = match env_u64("DIFF_INDEX") {
        Some(i) => vec![i],
        None => (0..env_u64("DIFF_CONFIGS").unwrap_or(300)).collect(),
    };
    let threads = env_u64("DIFF_THREADS").unwrap_or(3);
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let tally = Mutex::new(Tally::default());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while let Some(&i) = indexes.get(next.fetch_add(1, Ordering::SeqCst) as usize) {
                    let c = case(seed, i, nft);
                    let outcome = check(&istio, &c);
                    record(&mut tally.lock().unwrap(), &c, outcome);
                }
            });
        }
    });
    let t = tally.into_inner().unwrap();
    eprintln!(
        "differential ({test} mode): seed {seed}, {} configurations in {:.0?}: {} equal \
         (forgiven: {:?}), Istio failed: {:?}, unexplained differences: {}",
        indexes.len(),
        started.elapsed(),
        t.equal,
        t.forgiven,
        t.istio_failed,
        t.differs.len()
    );
    assert!(
        t.differs.is_empty(),
        "{} unexplained differences:\n{}",
        t.differs.len(),
        t.differs.join("\n\n")
    );
}

fn record(t: &mut Tally, c: &Case, outcome: Outcome) {
    match outcome {
        Outcome::Equal(forgiven) => {
            t.equal += 1;
            for f in forgiven {
                *t.forgiven.entry(f).or_default() += 1;
            }
        }
        Outcome::IstioFailed(class) => {
            eprintln!(
                "Istio failed ({class}), istio-init applied: {}",
                c.reproducer()
            );
            *t.istio_failed.entry(class).or_default() += 1;
        }
        Outcome::Differs(d) => {
            eprintln!("DIFFERS: {}", d.lines().next().unwrap_or_default());
            t.differs.push(d);
        }
    }
}

#[test]
fn differential_iptables_mode() {
    differential(false, 1700);
}

#[test]
fn differential_nftables_mode() {
    differential(true, 1701);
}
