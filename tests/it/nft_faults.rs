//! `--native-nftables` killed at random moments (issue 11). istio-init is SIGKILLed at a random
//! delay into a dual-stack TPROXY + DNS apply (three tables: nat, mangle and raw; both
//! families). Its rules are one nf_tables batch, handled by the kernel inside one system call,
//! so every outcome must be no `istio-proxy` table at all or the whole ruleset, equal (counters
//! aside) to a clean run's `nft list ruleset`. The TPROXY routing (policy rules, table 133,
//! `::6` on lo) is one rtnetlink batch sent just before the rules: it may be there without the
//! rules (inert: nothing sets the mark it matches; see docs/design.md), never in part, and the
//! rules are never there without it. The next run completes every state (checked after each
//! kill that left routing alone, and after every tenth of the others).
//!
//! No program is started in this mode, so killing istio-init is killing the whole container.
//! Prints its tally (run with `--nocapture`); `FAULTS_ITERATIONS=N` (default 200) and
//! `FAULTS_SEED=N` as in `faults.rs`.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::faults::{
    WORKERS, istio_init_cmd, kill_iterations, kill_trials, normal_run, pod, resolv_dir,
    run_istio_init,
};
use crate::nft_mode::{NftState, nft_state, ready, reference, sidecar};
use crate::util::stderr;

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

/// Where the kill landed, from how far the log got (each line is written before the step it
/// announces, or after the one it reports).
fn phase(err: &str, status: std::process::ExitStatus) -> &'static str {
    if status.success() {
        "after the run (it had exited)"
    } else if !err.contains("what the rules do:") {
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
    phases: BTreeMap<&'static str, usize>,
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
    let normal = normal_run(&args);
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

    // Delays from 0 to 1.3× a clean run: before, around and after the routes and the batch.
    let max_delay = normal.mul_f64(1.3);
    let tally = Mutex::new(Tally::default());
    let started = Instant::now();
    let seed = kill_trials(iterations, max_delay, |i, delay| {
        one_kill(i, delay, &args, &untouched, &full, &tally);
    });

    let t = tally.into_inner().unwrap();
    let n = |k| t.outcomes.get(k).copied().unwrap_or(0);
    eprintln!(
        "nft kill test: {iterations} SIGKILLs in {:.1?} ({WORKERS} at a time), seed {seed}, \
         delays 0..{max_delay:.1?} (a clean run took {normal:.1?})",
        started.elapsed()
    );
    for (ph, k) in &t.phases {
        eprintln!("  {k} landed {ph}");
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

/// One trial: a fresh pod, istio-init SIGKILLed after `delay`, the state classified, and a
/// follow-up run where the brief says.
fn one_kill(
    i: usize,
    delay: Duration,
    args: &[String],
    untouched: &NftState,
    full: &NftState,
    tally: &Mutex<Tally>,
) {
    let ns = pod(&format!("nftkill{i}"));
    let child = istio_init_cmd(&ns, args, &[]).spawn().unwrap();
    std::thread::sleep(delay);
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    let state = nft_state(&ns);
    let rules = part(&state.rules, &untouched.rules, &full.rules);
    let routing = part(&state.routing, &untouched.routing, &full.routing);
    let ph = phase(&err, o.status);
    let mut problems = Vec::new();
    if !(o.status.success() || o.status.signal() == Some(Signal::SIGKILL as i32)) {
        problems.push(format!("istio-init ended with {}", o.status));
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

    // The next run completes the namespace: after every kill that left the routing alone, and
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
    *t.phases.entry(ph).or_default() += 1;
    t.routes_only += usize::from(routes_only);
    if !problems.is_empty() {
        t.failures.push(format!(
            "trial {i}: SIGKILL after {delay:?} ({ph}): {}\nstderr:\n{err}",
            problems.join("\n")
        ));
    }
}
