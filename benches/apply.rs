//! Apply benchmark: `istio-init` applying the standard sidecar configuration (the sidecar
//! injector's default arguments, verbatim) versus a bare
//! `iptables-nft-restore --noflush` of the same text, interleaved, each run on a fresh network
//! namespace.
//!
//! Run as root with `benches/apply.sh` (builds the static release binary, which is what ships,
//! then runs this file; `BENCH_ROUNDS=1000 benches/apply.sh` for more rounds). Plain
//! `cargo bench --bench apply` measures the dynamically linked build instead, whose start-up
//! is dominated by the dynamic loader. `ISTIO_INIT_BIN=/path` measures another binary,
//! `BENCH_ARGS="--handover=false"` another mode (appended to the injector's arguments).
//!
//! Each round creates two fresh namespaces with `unshare(CLONE_NEWNET)` on a new thread (no
//! `ip` process, nothing left behind: a namespace dies with its thread) and runs both commands
//! from there, alternating which goes first. Reported per command: median and p90 wall time
//! from spawn to exit (rules in place), median CPU time (user + sys of the process and its
//! children, from `getrusage(RUSAGE_CHILDREN)` deltas), and for istio-init its own peak RSS
//! (`VmHWM`, logged by istio-init at debug level) and CPU time, and the number of
//! iptables processes it started (through a logging shim on `PATH`). istio-init runs with its
//! default (info) logging into a pipe, as in a pod.
//!
//! `BENCH_MODE=ab BENCH_A=/path/a BENCH_B=/path/b` compares two istio-init binaries instead
//! (an old build against a new one, or a build with a trick against one without it): the
//! injector's default arguments (plus `BENCH_ARGS`, e.g. `--native-nftables`), interleaved,
//! fresh namespace each run; see [`ab`].
//!
//! `BENCH_MODE=nftables` measures `--native-nftables` instead (see [`nftables`]): istio-init
//! against a bare `iptables-nft-restore` of the equivalent iptables text, `nft -f` of the
//! equivalent nftables text, and Istio's native mode's three `nft` processes.

#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use istio_init::settings::cli::INJECTOR_DEFAULT_ARGS;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{UsageWho, getrusage};

fn istio_init_bin() -> String {
    std::env::var("ISTIO_INIT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_istio-init").to_owned())
}
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Default)]
struct Samples {
    wall: Vec<Duration>,
    cpu: Vec<Duration>,
}

fn children_cpu() -> Duration {
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let d = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().unsigned_abs())
            + Duration::from_micros(t.tv_usec().unsigned_abs())
    };
    d(u.user_time()) + d(u.system_time())
}

/// Runs `cmd` (stdin fed `input`) on a new thread inside a fresh network namespace; returns
/// (wall, cpu, stderr).
fn run_fresh(mut cmd: Command, input: Option<&str>) -> (Duration, Duration, String) {
    std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
            let cpu0 = children_cpu();
            let t0 = Instant::now();
            let mut child = cmd
                .stdin(if input.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            if let Some(text) = input {
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(text.as_bytes())
                    .expect("write");
            }
            let out = child.wait_with_output().expect("wait");
            let wall = t0.elapsed();
            let cpu = children_cpu() - cpu0;
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "{cmd:?} failed: {err}");
            (wall, cpu, err)
        })
        .join()
        .expect("bench thread")
    })
}

fn istio_init(path: &str, extra: &[&str]) -> Command {
    istio_init_at(&istio_init_bin(), path, extra)
}

fn istio_init_at(bin: &str, path: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.env_clear()
        .env("PATH", path)
        .args(INJECTOR_DEFAULT_ARGS)
        .args(extra);
    // BENCH_ARGS="--handover=false" etc.: measure another mode.
    if let Ok(more) = std::env::var("BENCH_ARGS") {
        c.args(more.split_whitespace());
    }
    c
}

/// The peak RSS istio-init logs at debug level ("peak RSS N KiB").
fn peak_rss(log: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.split("peak RSS ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / `cargo test --benches`
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the apply benchmark needs root (network namespaces, iptables)");
        return;
    }
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    match std::env::var("BENCH_MODE").as_deref() {
        Ok("nftables") => return nftables(rounds, &path),
        Ok("ab") => return ab(rounds, &path),
        _ => {}
    }
    let restore = path
        .split(':')
        .map(|d| std::path::Path::new(d).join("iptables-nft-restore"))
        .find(|p| p.is_file())
        .expect("iptables-nft-restore on PATH");

    let bin = istio_init_bin();
    let linkage = std::fs::read(&bin)
        .map(|b| {
            if b.windows(b"/ld-linux".len()).any(|w| w == b"/ld-linux") {
                "dynamically linked"
            } else {
                "static"
            }
        })
        .unwrap_or("?");
    println!("istio-init binary: {bin} ({linkage})");
    let dry = Command::new(&bin)
        .env_clear()
        .args(INJECTOR_DEFAULT_ARGS)
        // Run here, in the host's namespace: IPv6 off as in a fresh pod namespace (auto).
        .args(["--dry-run", "--ipv6=false"])
        .output()
        .expect("dry run");
    let text = String::from_utf8(dry.stdout).expect("utf-8");

    // Warm-up (page cache, xtables extensions).
    for _ in 0..5 {
        run_fresh(istio_init(&path, &[]), None);
        let mut cmd = Command::new(&restore);
        cmd.arg("--noflush");
        run_fresh(cmd, Some(&text));
    }

    let mut ii = Samples::default();
    let mut bare = Samples::default();
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            if which == 0 {
                let (w, c, _) = run_fresh(istio_init(&path, &[]), None);
                ii.wall.push(w);
                ii.cpu.push(c);
            } else {
                let mut cmd = Command::new(&restore);
                cmd.arg("--noflush").env_clear();
                let (w, c, _) = run_fresh(cmd, Some(&text));
                bare.wall.push(w);
                bare.cpu.push(c);
            }
        }
    }

    // Peak RSS of istio-init itself, as it reports at debug level.
    let mut rss: Vec<u64> = Vec::new();
    let mut own_cpu: Vec<u64> = Vec::new();
    for _ in 0..rounds.clamp(20, 200) {
        let (_, _, err) = run_fresh(
            istio_init(&path, &["--log_output_level=default:debug"]),
            None,
        );
        if let Some(kib) = peak_rss(&err) {
            rss.push(kib);
        }
        // "user N us, sys M us"
        let field = |name: &str| -> Option<u64> {
            err.lines()
                .find_map(|l| l.split(&format!("{name} ")).nth(1))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        };
        if let (Some(u), Some(s)) = (field("user"), field("sys")) {
            own_cpu.push(u + s);
        }
    }
    rss.sort_unstable();
    own_cpu.sort_unstable();

    // Processes istio-init starts on a fresh namespace, counted by a logging shim.
    let shim = std::env::temp_dir().join(format!("ii-bench-shim-{}", std::process::id()));
    std::fs::create_dir_all(&shim).expect("shim dir");
    let log = shim.join("calls");
    for name in [
        "iptables-nft-restore",
        "iptables-nft-save",
        "iptables-legacy-restore",
        "iptables-legacy-save",
        "iptables-restore",
        "iptables-save",
        "iptables",
        "ip",
    ] {
        if let Some(real) = path
            .split(':')
            .map(|d| std::path::Path::new(d).join(name))
            .find(|p| p.is_file())
        {
            use std::os::unix::fs::PermissionsExt;
            let p = shim.join(name);
            std::fs::write(
                &p,
                format!(
                    "#!/bin/sh\necho {name} >> {}\nexec {} \"$@\"\n",
                    log.display(),
                    real.display()
                ),
            )
            .expect("shim");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
    }
    run_fresh(istio_init(&format!("{}:{path}", shim.display()), &[]), None);
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&shim);

    let (ii_med, bare_med) = (pct(&mut ii.wall, 50), pct(&mut bare.wall, 50));
    let (ii_p90, bare_p90) = (pct(&mut ii.wall, 90), pct(&mut bare.wall, 90));
    let (ii_cpu, bare_cpu) = (pct(&mut ii.cpu, 50), pct(&mut bare.cpu, 50));
    println!(
        "apply benchmark: the injector's default arguments (IPv4 REDIRECT), {rounds} interleaved rounds, fresh namespace each run"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>14}",
        "", "median wall", "p90 wall", "median CPU"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>14}",
        "istio-init",
        ms(ii_med),
        ms(ii_p90),
        ms(ii_cpu)
    );
    println!(
        "{:<34} {:>12} {:>12} {:>14}",
        "iptables-nft-restore --noflush",
        ms(bare_med),
        ms(bare_p90),
        ms(bare_cpu)
    );
    println!(
        "ratio istio-init / bare: wall {:.2}x (target <= 1.3x), CPU {:.2}x (target <= 1.5x)",
        ii_med.as_secs_f64() / bare_med.as_secs_f64(),
        ii_cpu.as_secs_f64() / bare_cpu.as_secs_f64()
    );
    if let (Some(min), Some(max)) = (rss.first(), rss.last()) {
        println!(
            "istio-init peak RSS (own, children excluded): median {} KiB, range {min}..{max} KiB (target <= 3072 KiB)",
            rss[rss.len() / 2]
        );
    }
    if !own_cpu.is_empty() {
        println!(
            "istio-init own CPU (user + sys, children excluded, debug logging on): median {} us",
            own_cpu[own_cpu.len() / 2]
        );
    }
    println!(
        "processes started by istio-init on a fresh namespace: {} ({})",
        calls.lines().count(),
        calls.lines().collect::<Vec<_>>().join(", ")
    );
}

/// The text istio-init prints with `--dry-run` for the injector's default arguments.
fn dry_run(extra: &[&str]) -> String {
    let dry = Command::new(istio_init_bin())
        .env_clear()
        .args(INJECTOR_DEFAULT_ARGS)
        // Run here, in the host's namespace: IPv6 off as in a fresh pod namespace (auto).
        .args(["--dry-run", "--ipv6=false"])
        .args(extra)
        .output()
        .expect("dry run");
    String::from_utf8(dry.stdout).expect("utf-8")
}

fn find(path: &str, name: &str) -> std::path::PathBuf {
    path.split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} on PATH"))
}

/// `--native-nftables` on fresh namespaces, interleaved with: a bare `iptables-nft-restore` of
/// the same rules as iptables text; `nft -f` of the same transaction (what Istio's native mode
/// finally runs, without the table replacement istio-init's dry run prints first); and Istio's
/// native mode's three `nft` processes (`nft --version`, `nft --check` of a test table, then
/// `nft -f`), run one after the other in one namespace as its library does.
fn nftables(rounds: usize, path: &str) {
    let restore = find(path, "iptables-nft-restore");
    let nft = find(path, "nft");
    let ipt_text = dry_run(&[]);
    let nft_text: String = dry_run(&["--native-nftables"])
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("delete table"))
        .map(|l| format!("{l}\n"))
        .collect();
    let check = "add table inet istio-init-bench-check\n";
    let mut cases: Vec<(&str, Samples)> = [
        "istio-init --native-nftables",
        "iptables-nft-restore --noflush",
        "nft -f (the same transaction)",
        "Istio's native mode (3 nft runs)",
    ]
    .into_iter()
    .map(|n| (n, Samples::default()))
    .collect();
    let run = |which: usize| -> (Duration, Duration) {
        match which {
            0 => {
                let (w, c, _) = run_fresh(istio_init(path, &["--native-nftables"]), None);
                (w, c)
            }
            1 => {
                let mut cmd = Command::new(&restore);
                cmd.arg("--noflush").env_clear();
                let (w, c, _) = run_fresh(cmd, Some(&ipt_text));
                (w, c)
            }
            2 => {
                let mut cmd = Command::new(&nft);
                cmd.args(["-f", "-"]).env_clear();
                let (w, c, _) = run_fresh(cmd, Some(&nft_text));
                (w, c)
            }
            _ => {
                // One namespace for the three: a shell would add a process of its own, so
                // the three run from a small driver thread instead.
                std::thread::scope(|s| {
                    s.spawn(|| {
                        unshare(CloneFlags::CLONE_NEWNET).expect("unshare");
                        let cpu0 = children_cpu();
                        let t0 = Instant::now();
                        let steps: [(&[&str], Option<&str>); 3] = [
                            (&["--version"], None),
                            (&["--check", "-f", "-"], Some(check)),
                            (&["-f", "-"], Some(&nft_text)),
                        ];
                        for (args, input) in steps {
                            let mut child = Command::new(&nft)
                                .args(args)
                                .env_clear()
                                .stdin(Stdio::piped())
                                .stdout(Stdio::null())
                                .stderr(Stdio::piped())
                                .spawn()
                                .expect("spawn nft");
                            let mut stdin = child.stdin.take().expect("stdin");
                            if let Some(t) = input {
                                stdin.write_all(t.as_bytes()).expect("write");
                            }
                            drop(stdin);
                            let out = child.wait_with_output().expect("wait");
                            assert!(out.status.success(), "nft {args:?}: {out:?}");
                        }
                        (t0.elapsed(), children_cpu() - cpu0)
                    })
                    .join()
                    .expect("bench thread")
                })
            }
        }
    };
    for _ in 0..5 {
        for which in 0..cases.len() {
            run(which);
        }
    }
    for round in 0..rounds {
        for k in 0..cases.len() {
            let which = (round + k) % cases.len();
            let (w, c) = run(which);
            cases[which].1.wall.push(w);
            cases[which].1.cpu.push(c);
        }
    }
    let mut rss: Vec<u64> = Vec::new();
    for _ in 0..rounds.clamp(20, 100) {
        let (_, _, err) = run_fresh(
            istio_init(
                path,
                &["--native-nftables", "--log_output_level=default:debug"],
            ),
            None,
        );
        if let Some(kib) = peak_rss(&err) {
            rss.push(kib);
        }
    }
    rss.sort_unstable();
    println!(
        "nftables benchmark: the injector's default arguments + --native-nftables (IPv4 REDIRECT), \
         {rounds} interleaved rounds, fresh namespace each run"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>14}",
        "", "median wall", "p90 wall", "median CPU"
    );
    let mut medians = Vec::new();
    for (name, s) in &mut cases {
        let (w, p, c) = (
            pct(&mut s.wall, 50),
            pct(&mut s.wall, 90),
            pct(&mut s.cpu, 50),
        );
        println!("{name:<34} {:>12} {:>12} {:>14}", ms(w), ms(p), ms(c));
        medians.push((w, c));
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let (ii, restore, nft_f, istio) = (medians[0], medians[1], medians[2], medians[3]);
    println!(
        "istio-init / iptables-nft-restore: wall {:.2}x, CPU {:.2}x (target <= 0.5x)",
        ratio(ii.0, restore.0),
        ratio(ii.1, restore.1)
    );
    println!(
        "istio-init / nft -f: wall {:.2}x, CPU {:.2}x (target <= 0.3x)",
        ratio(ii.0, nft_f.0),
        ratio(ii.1, nft_f.1)
    );
    println!(
        "Istio's native mode / istio-init: wall {:.1}x, CPU {:.1}x (target >= 15x)",
        ratio(istio.0, ii.0),
        ratio(istio.1, ii.1)
    );
    if let (Some(min), Some(max)) = (rss.first(), rss.last()) {
        println!(
            "istio-init peak RSS: median {} KiB, range {min}..{max} KiB (target <= 1536 KiB)",
            rss[rss.len() / 2]
        );
    }
}

/// Two istio-init binaries (`BENCH_A`, `BENCH_B`) on the same arguments, interleaved (the
/// order alternates each round), each run on a fresh namespace: median wall and CPU of each,
/// and B's over A's.
fn ab(rounds: usize, path: &str) {
    let bins: Vec<String> = ["BENCH_A", "BENCH_B"]
        .iter()
        .map(|v| std::env::var(v).unwrap_or_else(|_| panic!("BENCH_MODE=ab needs {v}")))
        .collect();
    let mut samples = [Samples::default(), Samples::default()];
    for round in 0..rounds + 5 {
        for k in 0..2 {
            let which = (round + k) % 2;
            let (w, c, _) = run_fresh(istio_init_at(&bins[which], path, &[]), None);
            // The first rounds warm the page cache and are not counted.
            if round >= 5 {
                samples[which].wall.push(w);
                samples[which].cpu.push(c);
            }
        }
    }
    let extra = std::env::var("BENCH_ARGS").unwrap_or_default();
    println!(
        "A/B: the injector's default arguments {extra}, {rounds} interleaved rounds, fresh namespace each run"
    );
    let mut medians = Vec::new();
    for (bin, s) in bins.iter().zip(samples.iter_mut()) {
        let (wall, cpu) = (pct(&mut s.wall, 50), pct(&mut s.cpu, 50));
        println!("{bin}: median wall {}, median CPU {}", ms(wall), ms(cpu));
        medians.push((wall.as_secs_f64(), cpu.as_secs_f64()));
    }
    println!(
        "B / A: wall {:.3}, CPU {:.3}",
        medians[1].0 / medians[0].0,
        medians[1].1 / medians[0].1
    );
}
