//! The pure pipeline — command line → config → ruleset → restore text — for the standard
//! sidecar configuration and for a very large one (1,000 CIDRs, 1,000 ports, dual stack);
//! and the nftables mode's batch build: config → nf_tables transaction → netlink bytes.
//!
//! Run: `cargo bench --bench ruleset` (criterion; reports in target/criterion). The README
//! records the figures.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use istio_init::capture::{Facts, build};
use istio_init::settings::cli;
use istio_init::settings::config::{Config, Inputs};

/// The configuration of a parsed command line, with no environment.
fn config(inv: &cli::Invocation) -> Config {
    let env = |_: &str| None;
    Config::resolve(&Inputs {
        defaults: inv.defaults,
        flags: &inv.flags,
        env: &env,
        user_uid: &|_| None,
        pod: &istio_init::settings::config::NO_POD,
    })
    .expect("valid config")
}

/// Config → ruleset → text, from a parsed command line.
fn render(inv: &cli::Invocation, facts: &Facts) -> usize {
    let cfg = config(inv);
    facts
        .families()
        .into_iter()
        .map(|f| {
            istio_init::backend::iptables::render::ruleset_text(&build(&cfg, facts).family(f)).len()
        })
        .sum()
}

/// Config → nf_tables transaction → the netlink batch's bytes (`--native-nftables`).
fn nft_batch(inv: &cli::Invocation, facts: &Facts) -> usize {
    let cfg = config(inv);
    let tx = istio_init::backend::nftables::map::transaction(&build(&cfg, facts), &[], &|_| None)
        .expect("no owner groups");
    istio_init::netlink::nftables::encode(&tx)
        .expect("encodes")
        .bytes()
        .len()
}

/// The whole pure pipeline, from argv.
fn pipeline(argv: &[String], facts: &Facts) -> usize {
    render(&cli::parse(argv).expect("valid arguments"), facts)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn large_args() -> Vec<String> {
    let v4 = (0..500).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256));
    let v6 = (0..500).map(|i| format!("2001:db8:{i:x}::/48"));
    let cidrs: Vec<String> = v4.chain(v6).collect();
    let ports: Vec<String> = (0..1000).map(|i| (20000 + i).to_string()).collect();
    let mut a = args(&["istio-init", "-m", "REDIRECT", "-b"]);
    a.push(ports[..500].join(","));
    a.push("-o".into());
    a.push(ports[500..].join(","));
    a.push("-i".into());
    a.push(cidrs[..500].join(",") + "," + &cidrs[500..750].join(","));
    a.push("-x".into());
    a.push(cidrs[250..500].join(",") + "," + &cidrs[750..].join(","));
    a
}

fn benches(c: &mut Criterion) {
    let v4 = Facts::default();
    let dual = Facts {
        ipv6: true,
        dns_servers: vec![],
    };
    let standard = args(&["istio-init"]);
    let parsed = cli::parse(&standard).expect("valid arguments");
    c.bench_function("config to text: standard sidecar, IPv4", |b| {
        b.iter(|| render(black_box(&parsed), &v4))
    });
    c.bench_function("config to text: standard sidecar, dual stack", |b| {
        b.iter(|| render(black_box(&parsed), &dual))
    });
    c.bench_function("argv to text: standard sidecar, IPv4", |b| {
        b.iter(|| pipeline(black_box(&standard), &v4))
    });
    c.bench_function("config to nf_tables batch: standard sidecar, IPv4", |b| {
        b.iter(|| nft_batch(black_box(&parsed), &v4))
    });
    c.bench_function(
        "config to nf_tables batch: standard sidecar, dual stack",
        |b| b.iter(|| nft_batch(black_box(&parsed), &dual)),
    );
    let large = large_args();
    c.bench_function("argv to text: 1,000 CIDRs + 1,000 ports, dual stack", |b| {
        b.iter(|| pipeline(black_box(&large), &dual))
    });
}

criterion_group!(group, benches);
criterion_main!(group);
