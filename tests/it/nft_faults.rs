//! `--native-nftables` killed at random moments (issue 11). istio-init is SIGKILLed at a random
//! delay into a dual-stack TPROXY + DNS apply (three tables: nat, mangle and raw; both
//! families). Its rules are one nf_tables batch, handled by the kernel inside one system call,
//! so every outcome must be no `istio-proxy` table at all or the whole ruleset, equal (counters
//! aside) to a clean run's `nft list ruleset`. The TPROXY routing (policy rules, table 133,
//! `::6` on lo) is one rtnetlink batch sent just before the rules: it may be there without the
//! rules (inert: nothing sets the mark it matches; see docs/design.md), never in part, and the
//! rules are never there without it. The next run completes every state (checked after each
//! kill that left the routing without the rules, and after every tenth other one).
//!
//! Half the kills land anywhere in a run (a random delay after the start, up to 1.3× a clean
//! run); the other half around the routes and the batch (a random delay after istio-init logs
//! what the rules do, which it does just before them, up to 1.3× the rest of a clean run), where
//! a run that is not atomic would tear. Clean runs are timed three at a time, as the trials run.
//!
//! No program is started in this mode, so killing istio-init is killing the whole container.
//! Prints its tally (run with `--nocapture`); `FAULTS_ITERATIONS=N` (default 200) and
//! `FAULTS_SEED=N` as in `faults.rs`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::faults::{
    WORKERS, istio_init_cmd, kill_iterations, kill_trials, pod, resolv_dir, run_istio_init,
};
use crate::nft_mode::{NftState, nft_state, ready, reference, sidecar};
use crate::util::{Netns, stderr};

/// What istio-init logs just before the TPROXY routes and the batch (`at_commit`).
const AT_COMMIT: &str = "what the rules do:";

/// Spawns istio-init on `ns`; when `at_commit`, waits until its log reaches [`AT_COMMIT`] (or
/// it ends). Then, after `delay`, SIGKILLs it. Returns how it ended, its stderr, and how long
/// after the spawn and after the wait it ended.
fn run_and_kill(
    ns: &Netns,
    args: &[String],
    at_commit: bool,
    delay: Option<Duration>,
) -> (ExitStatus, String, Duration, Duration) {
    let start = Instant::now();
    let mut child = istio_init_cmd(ns, args, &[]).spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut text = String::new();
    while at_commit && !text.contains(AT_COMMIT) {
        if err.read_line(&mut text).unwrap() == 0 {
            break;
        }
    }
    let waited = Instant::now();
    if let Some(delay) = delay {
        std::thread::sleep(delay);
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    }
    err.read_to_string(&mut text).unwrap();
    let status = child.wait().unwrap();
    (status, text, start.elapsed(), waited.elapsed())
}

/// A clean run's length, and the length of its part from [`AT_COMMIT`] on: the longest of
/// [`WORKERS`] runs at once in fresh pods.
fn timings(args: &[String]) -> (Duration, Duration) {
    let runs: Vec<(Duration, Duration)> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..WORKERS)
            .map(|_| {
                s.spawn(|| {
                    let ns = pod("nftkillcal");
                    let (status, err, whole, tail) = run_and_kill(&ns, args, true, None);
                    assert!(status.success(), "{err}");
                    (whole, tail)
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let whole = runs.iter().map(|r| r.0).max().unwrap();
    let tail = runs.iter().map(|r| r.1).max().unwrap();
    (whole, tail)
}

/// How one part of the namespace (rules or routing) relates to a fresh and a clean-run one.
fn part(have: &str, untouched: &str, full: &str) -> &'static str {
    if have == untouched {
        "untouched"
    } else if have == full {
        "complete"
    } else {
        "other"
    }
}

const AFTER_THE_RUN: &str = "after the run (it had exited)";

/// Where the kill landed, from how far the log got (each line is written before the step it
/// announces, or after the one it reports).
fn phase(err: &str, status: std::process::ExitStatus) -> &'static str {
    if status.success() {
        AFTER_THE_RUN
    } else if !err.contains(AT_COMMIT) {
        "before the routes and the batch"
    } else if !err.contains("nftables: applied") {
        "around the routes and the batch"
    } else {
        "after the batch"
    }
}

#[derive(Default)]
struct Tally {
    /// "untouched", "complete" or "other" (rules) → count.
    outcomes: BTreeMap<&'static str, usize>,
    /// Routing added, rules not: inert, completed by the next run.
    routes_only: usize,
    /// (where the kill was aimed, where it landed) → count.
    phases: BTreeMap<(&'static str, &'static str), usize>,
    /// What went wrong, per failed trial.
    failures: Vec<String>,
    reruns: usize,
}

#[test]
fn native_nftables_killed_at_random_moments_leaves_no_table_or_the_whole_ruleset() {
    if !ready("native_nftables_killed_at_random_moments") {
        return;
    }
    let iterations = kill_iterations(200);
    let (_dir, resolv) = resolv_dir("nftkill");
    let args = sidecar(&resolv, true);

    // References: a fresh pod, and one configured by a clean run.
    let (untouched, full) = reference("nftkillref", &args);
    let (normal, tail) = timings(&args);
    assert!(
        full.routing.contains("fwmark 0x539 lookup 133"),
        "{}",
        full.routing
    );
    assert_ne!(untouched.routing, full.routing);
    assert!(
        !untouched.rules.contains("istio-proxy"),
        "{}",
        untouched.rules
    );

    let max_delay = normal.mul_f64(1.3);
    let tally = Mutex::new(Tally::default());
    let started = Instant::now();
    // The window after the log line that aimed kills are spread over: it shrinks when one
    // lands after the run and grows otherwise, so that about half land before the run ends,
    // whatever the load on the machine.
    let window = AtomicU64::new(tail.as_micros() as u64);
    let seed = kill_trials(iterations, max_delay, |i, delay| {
        let at_commit = i % 2 == 1;
        if !at_commit {
            one_kill(i, false, delay, &args, &untouched, &full, &tally);
            return;
        }
        let w = window.load(Ordering::Relaxed);
        let delay = Duration::from_micros(
            (delay.as_secs_f64() / max_delay.as_secs_f64() * w as f64) as u64,
        );
        let ph = one_kill(i, true, delay, &args, &untouched, &full, &tally);
        let w = if ph == AFTER_THE_RUN {
            w * 9 / 10
        } else {
            w * 11 / 10
        };
        window.store(w.clamp(100, 2 * tail.as_micros() as u64), Ordering::Relaxed);
    });

    let t = tally.into_inner().unwrap();
    let n = |k| t.outcomes.get(k).copied().unwrap_or(0);
    eprintln!(
        "nft kill test: {iterations} SIGKILLs in {:.1?} ({WORKERS} at a time), seed {seed}; a \
         clean run took {normal:.1?}, {tail:.1?} of it from its log of what the rules do on; \
         aimed kills at last within {:.1?} of that log",
        started.elapsed(),
        Duration::from_micros(window.load(Ordering::Relaxed))
    );
    for ((when, ph), k) in &t.phases {
        eprintln!("  {when}: {k} landed {ph}");
    }
    eprintln!(
        "  tally: untouched {} (of which {} with the TPROXY routing only) / complete {} / other \
         {}; {} follow-up runs, all exit 0 and complete",
        n("untouched"),
        t.routes_only,
        n("complete"),
        n("other"),
        t.reruns
    );
    assert_eq!(
        n("untouched") + n("complete") + n("other"),
        iterations,
        "every trial counted"
    );
    assert!(
        t.failures.is_empty(),
        "{} of {iterations} trials failed:\n{}",
        t.failures.len(),
        t.failures.join("\n\n")
    );
    assert_eq!(n("other"), 0);
}

/// One trial: a fresh pod, istio-init SIGKILLed `delay` after its start (or after its log
/// reached [`AT_COMMIT`]), the state classified, and a follow-up run where the module doc says.
fn one_kill(
    i: usize,
    at_commit: bool,
    delay: Duration,
    args: &[String],
    untouched: &NftState,
    full: &NftState,
    tally: &Mutex<Tally>,
) -> &'static str {
    let ns = pod(&format!("nftkill{i}"));
    let (status, err, _, _) = run_and_kill(&ns, args, at_commit, Some(delay));
    let state = nft_state(&ns);
    let rules = part(&state.rules, &untouched.rules, &full.rules);
    let routing = part(&state.routing, &untouched.routing, &full.routing);
    let ph = phase(&err, status);
    let when = if at_commit {
        "aimed at the routes and the batch"
    } else {
        "aimed anywhere"
    };
    let mut problems = Vec::new();
    if !(status.success() || status.signal() == Some(Signal::SIGKILL as i32)) {
        problems.push(format!("istio-init ended with {status}"));
    }
    if rules == "other" {
        problems.push(format!("a partial ruleset:\n{}", state.rules));
    }
    if routing == "other" {
        problems.push(format!("partial routing:\n{}", state.routing));
    }
    if rules == "complete" && routing != "complete" {
        problems.push(format!("the rules without the routing:\n{}", state.routing));
    }
    let routes_only = rules == "untouched" && routing == "complete";

    // The next run completes the namespace: after every kill that left the routing without the rules, and
    // every tenth of the others.
    if problems.is_empty() && (routes_only || i % 10 == 0) {
        let o = run_istio_init(&ns, args, &[]);
        let after = nft_state(&ns);
        if !o.status.success() {
            problems.push(format!("the next run failed:\n{}", stderr(&o)));
        } else if after != *full {
            problems.push(format!(
                "the next run left:\n{after:#?}\nits stderr:\n{}",
                stderr(&o)
            ));
        }
        tally.lock().unwrap().reruns += 1;
    }

    let mut t = tally.lock().unwrap();
    *t.outcomes.entry(rules).or_default() += 1;
    *t.phases.entry((when, ph)).or_default() += 1;
    t.routes_only += usize::from(routes_only);
    if !problems.is_empty() {
        t.failures.push(format!(
            "trial {i}: SIGKILL {when}, after {delay:?} ({ph}): {}\nstderr:\n{err}",
            problems.join("\n")
        ));
    }
    ph
}
