//! istio-init: builds Istio's sidecar iptables ruleset in memory and applies it atomically.
//!
//! The pure core turns a command line (plus env vars) into a [`config::Config`], the
//! [`capture::Capture`] (the backend-neutral model of the rules) and each backend's rendering
//! of it. [`run`] is the only
//! place that sequences effects: read facts → build → print (dry run), or check capabilities →
//! enter the namespace → drop capabilities → routes → apply → validate.

pub mod backend;
pub mod capture;
pub mod exit;
pub mod explain;
pub mod host;
pub mod logging;
pub mod net;
pub mod netlink;
pub mod nft;
pub mod settings;
pub mod sys;
pub mod trace;
pub mod validation;

use std::io::Write;

use anyhow::Context;

use crate::backend::iptables as apply;
use crate::backend::iptables::Iptables;
use crate::backend::nftables::Nftables;
use crate::backend::{Batched, Firewall, Found, Snapshot};
use crate::capture::{Capture, Facts, Ruleset};
use crate::exit::UsageError;
use crate::settings::annotations::PodSettings;
use crate::settings::config::{Config, Inputs, Interception, PodOverrides};
use crate::settings::{annotations, cli, config};
use crate::sys::{caps, guard, netns};

/// Everything a run needs from the outside world, so tests can call [`run`] in-process.
pub struct Env<'a> {
    /// Environment lookup.
    pub var: &'a dyn Fn(&str) -> Option<String>,
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").finish_non_exhaustive()
    }
}

/// Resolves the configuration of an invocation (pure apart from the passwd lookup).
pub fn resolve(inv: &cli::Invocation, env: &Env<'_>) -> Result<Config, config::ConfigError> {
    resolve_for_pod(inv, env, &config::NO_POD)
}

/// [`resolve`], with a pod's annotations over the flags and env vars.
pub fn resolve_for_pod(
    inv: &cli::Invocation,
    env: &Env<'_>,
    pod: &PodOverrides,
) -> Result<Config, config::ConfigError> {
    Config::resolve(&Inputs {
        defaults: inv.defaults,
        flags: &inv.flags,
        env: env.var,
        user_uid: &host::passwd_uid,
        pod,
    })
}

/// The raw value of one of this tool's path options (flag, then env var); empty means unset.
fn path_option(inv: &cli::Invocation, env: &Env<'_>, long: &'static str) -> Option<String> {
    inv.flags
        .get(long)
        .cloned()
        .or_else(|| {
            cli::find(long)
                .into_iter()
                .flat_map(|o| o.env.iter().rev())
                .find_map(|name| (env.var)(name))
        })
        .filter(|v| !v.is_empty())
}

/// Reads and translates the pod's annotations from `--annotations` or `--pod`, if given.
/// A malformed file is a usage error naming the file and the line or path of the problem.
pub fn pod_settings(inv: &cli::Invocation, env: &Env<'_>) -> anyhow::Result<PodSettings> {
    let annotations = path_option(inv, env, "annotations");
    let pod = path_option(inv, env, "pod");
    // A regular file (or stdin) of bounded size: a FIFO or a device must not hang the pod.
    let read = |path: &str, what: &str| -> Result<String, UsageError> {
        let bytes = if path == "-" {
            host::read_stdin(host::MAX_POD_FILE)
        } else {
            host::read_config_file(path, host::MAX_POD_FILE)
        };
        bytes
            .map_err(|e| e.to_string())
            .and_then(|b| {
                use std::os::unix::ffi::OsStrExt;
                net::utf8(std::ffi::OsStr::from_bytes(&b))
                    .map(str::to_owned)
                    .map_err(String::from)
            })
            .map_err(|e| UsageError(format!("cannot read the {what} {path}: {e}")))
    };
    match (annotations, pod) {
        (None, None) => Ok(PodSettings::default()),
        (Some(_), Some(_)) => Err(UsageError(
            "--annotations and --pod both name the pod's annotations; give one of them".into(),
        )
        .into()),
        (Some(path), None) => {
            let text = read(&path, "annotations file")?;
            let ann = annotations::parse_downward(&text)
                .map_err(|e| UsageError(format!("annotations file {path}: {e}")))?;
            Ok(annotations::translate(&ann)?)
        }
        (None, Some(path)) => {
            let text = read(&path, "pod manifest")?;
            let pod = annotations::parse_manifest(&text)
                .map_err(|e| UsageError(format!("pod manifest {path}: {e}")))?;
            Ok(annotations::translate_pod(&pod)?)
        }
    }
}

/// Reads the facts the ruleset depends on: IPv6 enablement and, when DNS capture needs them,
/// the resolv.conf nameservers.
pub fn gather_facts(cfg: &Config) -> anyhow::Result<Facts> {
    let v6 = host::decide_ipv6(cfg);
    log::info!(
        "IPv6 rules {}: {}",
        if v6.enabled { "enabled" } else { "disabled" },
        v6.reason
    );
    // Auto mode in a namespace without IPv6: IPv6 ranges to capture (typically mesh-wide
    // defaults written for dual-stack pods) cannot apply. A warning, not an error: see the
    // `Ipv6Mode::Off` check in `Config::resolve` for the explicit case, which is refused.
    let v6_ranges = cfg.outbound_include.of(net::Family::V6);
    if !v6.enabled && !v6_ranges.is_empty() {
        log::warn!(
            "ignoring the IPv6 ranges to capture ({}): IPv6 rules are disabled",
            config::join(&v6_ranges)
        );
    }
    let dns_servers = if cfg.needs_dns_servers() {
        host::dns_servers(cfg, v6.enabled)?
    } else {
        Vec::new()
    };
    let facts = Facts {
        ipv6: v6.enabled,
        dns_servers,
    };
    if cfg.redirect_dns && !capture::dns_capture(cfg, &facts) {
        log::warn!(
            "DNS capture was requested, but capture-all-dns is off and {} lists no usable \
             nameserver: DNS capture disabled",
            cfg.resolv_conf
        );
    }
    Ok(facts)
}

/// [`gather_facts`] in the namespace the rules are for: with `--netns`, the facts (IPv6
/// addresses) are read inside that namespace, so a dry run, `explain` or `trace` from a debug
/// pod describes the target pod, not the debug container.
pub fn target_facts(cfg: &Config) -> anyhow::Result<Facts> {
    match cfg.netns.as_deref() {
        None => gather_facts(cfg),
        Some(path) => {
            let ns = netns::Netns::open(path)?;
            netns::run_in(Some(&ns), || gather_facts(cfg))
        }
    }
}

/// Builds the ruleset of every enabled family.
pub fn build_all(cfg: &Config, facts: &Facts) -> Vec<Ruleset> {
    capture::build(cfg, facts).rulesets()
}

/// Writes a document to stdout (the only other writer is the dry run).
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Runs one invocation. Returns the error for `main` to report; see [`exit::code_for`].
pub fn run(inv: &cli::Invocation, env: &Env<'_>) -> anyhow::Result<()> {
    let pod = pod_settings(inv, env)?;
    let cfg = resolve_for_pod(inv, env, &pod.overrides)?;
    logging::init(cfg.log);
    for w in &pod.warnings {
        log::warn!("{w}");
    }
    match &inv.action {
        cli::Action::Run => {}
        cli::Action::Explain => return explain_cmd(&cfg, &pod),
        cli::Action::Trace(args) => return trace_cmd(&cfg, &pod, args),
    }
    if let Some(why) = &pod.nothing_to_do {
        log::info!("nothing to do: {why}");
        return Ok(());
    }
    log::info!("istio-init {}", env!("CARGO_PKG_VERSION"));
    if let Some(ignored) = [
        "log_target",
        "log_caller",
        "log_stacktrace_level",
        "log_rotate",
    ]
    .into_iter()
    .find(|k| inv.flags.contains_key(k))
    {
        log::debug!("--{ignored} is accepted for compatibility and ignored; logs go to stderr");
    }
    log::info!("Istio config:\n{}", cfg.dump().trim_end());

    if cfg.interception == Interception::None && !cfg.cleanup_only {
        log::info!("interception mode NONE: no traffic is captured, nothing to do");
        return Ok(());
    }

    if cfg.dry_run {
        return dry_run(&cfg, env);
    }

    let result = program(&cfg, env);
    log_resource_use();
    result
}

/// `--dry-run`: the chosen backend's document on stdout (and appended to
/// `DRY_RUN_FILE_PATH`); nothing is changed.
fn dry_run(cfg: &Config, env: &Env<'_>) -> anyhow::Result<()> {
    let facts = target_facts(cfg)?;
    log_summary(cfg, &facts);
    let capture = capture::build(cfg, &facts);
    let fw = firewall(cfg, env);
    log::info!("dry run: printing the ruleset, no rule changes will be made");
    let text = fw.render(&capture);
    if let Some(path) = (env.var)("DRY_RUN_FILE_PATH").filter(|p| !p.is_empty()) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("writing the dry-run output to {path} (DRY_RUN_FILE_PATH)"))?;
    }
    print(&text).context("writing the ruleset")?;
    if cfg.run_validation {
        log::info!("dry run: skipping --run-validation");
    }
    Ok(())
}

fn log_summary(cfg: &Config, facts: &Facts) {
    log::info!(
        "what the rules do:\n{}",
        explain::summary(cfg, facts).trim_end()
    );
}

/// The backend this configuration selects (`--native-nftables`), and the other one.
pub fn firewalls(cfg: &Config, env: &Env<'_>) -> (Box<dyn Firewall>, Box<dyn Firewall>) {
    let nft: Box<dyn Firewall> = Box::new(Nftables {
        group: host::group_gid,
    });
    let ipt: Box<dyn Firewall> = Box::new(iptables(cfg, env));
    if cfg.native_nftables {
        (nft, ipt)
    } else {
        (ipt, nft)
    }
}

/// The backend this configuration selects.
pub fn firewall(cfg: &Config, env: &Env<'_>) -> Box<dyn Firewall> {
    firewalls(cfg, env).0
}

fn iptables(cfg: &Config, env: &Env<'_>) -> Iptables {
    Iptables {
        programs: apply::System::new(env.var, cfg.xtables_wait, cfg.restore_timeout),
        options: apply::Options {
            reconcile: cfg.reconcile,
            force_apply: cfg.force_apply,
            force_backend: cfg.force_backend,
        },
        // Nothing after the rules: no namespace to return from, no validation, no TPROXY routes
        // (nor the `::6` address: it comes with IPv6 rules, which never hand over).
        handover: cfg.handover
            && cfg.netns.is_none()
            && !cfg.run_validation
            && cfg.interception != Interception::Tproxy,
        timeout: cfg.restore_timeout,
    }
}

/// The real run: every input checked, capabilities checked, then — on a worker thread that
/// enters the target namespace and keeps only NET_ADMIN and NET_RAW — routes and rules, and
/// finally validation (which needs no capability: the `istio-validation` container runs as the
/// proxy user with `--skip-rule-apply`).
fn program(cfg: &Config, env: &Env<'_>) -> anyhow::Result<()> {
    let programs = !cfg.skip_rule_apply;
    let (fw, other) = firewalls(cfg, env);
    if programs {
        host::check_group_names(cfg)?;
        caps::preflight(fw.capabilities(), &format!("programming {}", fw.name()))?;
    }
    let ns = cfg.netns.as_deref().map(netns::Netns::open).transpose()?;
    // No termination signal between the first change and a consistent namespace, and one
    // run at a time per namespace (see sys/guard.rs; a signal still ends a lock wait).
    let section = programs.then(guard::CriticalSection::enter).transpose()?;
    let result = netns::run_in(ns.as_ref(), || {
        if let Some(s) = &section {
            // In the target namespace: the lock belongs to it (sys/guard.rs).
            let limit =
                cfg.restore_timeout + std::time::Duration::from_secs(cfg.xtables_wait.into());
            s.hold(guard::NetnsLock::acquire(limit)?);
            caps::restrict(fw.capabilities(), !cfg.native_nftables)?;
        }
        let facts = gather_facts(cfg)?;
        if !programs {
            log::info!("--skip-rule-apply: no rule or route is touched");
        } else if cfg.cleanup_only {
            return cleanup(cfg, fw.as_ref(), other.as_ref(), &facts);
        } else {
            install(cfg, fw.as_ref(), other.as_ref(), &facts)?;
        }
        // The namespace is consistent: a deferred SIGTERM may end the run from here on.
        if let Some(s) = &section {
            s.leave();
        }
        if cfg.run_validation {
            validation::validate(cfg, &facts.families())?;
        }
        Ok(())
    });
    match (result, &section) {
        (Err(e), Some(s)) => Err(s.before_leaving(e)),
        (result, _) => result,
    }
}

/// `--cleanup-only`: both modes' removals, whatever the other did; both failures reported.
fn cleanup(
    cfg: &Config,
    fw: &dyn Firewall,
    other: &dyn Firewall,
    facts: &Facts,
) -> anyhow::Result<()> {
    // Both families, whatever IPv6 detection says now: the rules may predate it.
    let capture = if cfg.interception == Interception::None {
        Capture::default()
    } else {
        let both = Facts {
            ipv6: true,
            ..facts.clone()
        };
        capture::build(cfg, &both)
    };
    log::info!(
        "--cleanup-only: removing the Istio rules of both modes (TPROXY routes are left alone)"
    );
    both_removed([
        (fw.name(), fw.remove(&capture)),
        (other.name(), other.remove(&capture)),
    ])
}

/// The outcome of `--cleanup-only`'s two removals: each runs whatever the other did, and
/// when both fail the error names both (the first one's kind decides the exit code).
fn both_removed(removed: [(&str, anyhow::Result<()>); 2]) -> anyhow::Result<()> {
    let [(first, a), (second, b)] = removed;
    match (a, b) {
        (Err(a), Err(b)) => Err(a.context(format!(
            "removing the {first} mode's rules failed, and removing the {second} mode's rules \
             failed too: {b:#}; the {first} mode's error"
        ))),
        (a, b) => a.and(b),
    }
}

/// Routes and rules, as one straight line: read the namespace, check for the other mode's
/// rules, prepare the routes and the backend's plan (nothing changes until here), log the
/// plan, add the routes, commit the plan (a failed commit removes the routes this run added),
/// then remove what is left of the other mode's rules. The routes go in at the last moment
/// before the rules.
fn install(
    cfg: &Config,
    fw: &dyn Firewall,
    other: &dyn Firewall,
    facts: &Facts,
) -> anyhow::Result<()> {
    let ns = Snapshot::read()?;
    let found = other.inspect(&ns)?;
    let capture = capture::build(cfg, facts);
    let replacing = other_mode_in_transaction(cfg, fw, other, &found, &capture, &ns)?;
    let routes = netlink::route::prepare(&netlink::route::RoutePlan::new(cfg, facts))
        .context("configuring TPROXY routing")?;
    let plan = fw.prepare(&capture, &ns, &replacing)?;

    log_summary(cfg, facts);
    plan.log();
    if plan.hands_over() {
        log_resource_use();
    }
    let added = routes.commit().context("configuring TPROXY routing")?;
    let committed = plan.commit();
    added.report();
    if committed.is_err() {
        added.undo();
    }
    committed?;
    remove_other_mode(fw, other, &capture, &found, &replacing)
}

/// The other mode's rules `found` would capture traffic too: they stop the run, or with
/// `--reconcile` the part of them that can go in the new rules' own nf_tables transaction is
/// returned (the iptables mode's iptables-nft rules, for the nftables mode), decided before
/// anything changes.
fn other_mode_in_transaction(
    cfg: &Config,
    fw: &dyn Firewall,
    other: &dyn Firewall,
    found: &Found,
    capture: &Capture,
    ns: &Snapshot,
) -> anyhow::Result<Batched> {
    if found.what.is_empty() {
        return Ok(Batched::default());
    }
    if !cfg.reconcile {
        anyhow::bail!(
            "this network namespace holds the {} mode's Istio rules ({}): with the {} rules both \
             would capture traffic; remove them first (istio-init --cleanup-only, which removes \
             both modes' rules) or run with --reconcile to replace them",
            other.name(),
            found.what.join(", "),
            fw.name()
        );
    }
    other.batched_removal(capture, ns).with_context(|| {
        format!(
            "preparing the removal of the {} mode's rules (--reconcile)",
            other.name()
        )
    })
}

/// `--reconcile`, once the new rules are in place: removes what of the other mode's rules
/// `found` was not removed in their transaction (`replacing`).
fn remove_other_mode(
    fw: &dyn Firewall,
    other: &dyn Firewall,
    capture: &Capture,
    found: &Found,
    replacing: &Batched,
) -> anyhow::Result<()> {
    if found.what.is_empty() {
        return Ok(());
    }
    let how = if replacing.complete {
        format!(" in the {} transaction", fw.name())
    } else {
        other
            .remove(capture)
            .with_context(|| format!("removing the {} mode's rules (--reconcile)", other.name()))?;
        String::new()
    };
    log::info!(
        "--reconcile: removed the {} mode's rules ({}){how}",
        other.name(),
        found.what.join(", ")
    );
    Ok(())
}

/// `explain`: the settings with their sources, then the summary, on stdout.
fn explain_cmd(cfg: &Config, pod: &PodSettings) -> anyhow::Result<()> {
    if let Some(why) = &pod.nothing_to_do {
        return print(&format!("Nothing to do: {why}.\n"));
    }
    let facts = target_facts(cfg)?;
    print(&explain::explain(cfg, &facts))
}

/// `trace`: one connection through the rules this configuration builds, on stdout.
fn trace_cmd(cfg: &Config, pod: &PodSettings, args: &cli::TraceArgs) -> anyhow::Result<()> {
    let conn = trace::Connection::parse(args).map_err(|e| UsageError(e.to_string()))?;
    if let Some(why) = &pod.nothing_to_do {
        return print(&format!(
            "Connection: {conn}\nNo rules: {why}.\nVerdict: bypass: not captured, delivered to {} as addressed\n",
            conn.dst
        ));
    }
    let rulesets = if cfg.interception == Interception::None {
        Vec::new()
    } else {
        build_all(cfg, &target_facts(cfg)?)
    };
    // The path as the chosen backend lays it out in the kernel.
    let nftables = backend::nftables::map::Layout {
        group: &host::group_gid,
    };
    let layout: &dyn trace::Layout = if cfg.native_nftables {
        &nftables
    } else {
        &backend::iptables::render::Layout
    };
    let t = trace::trace(cfg, &rulesets, &conn, &host::group_gid, layout);
    print(&t.to_string())
}

/// Logs this process's own peak RSS and CPU time at debug level (children excluded): the
/// numbers the benchmark reports. The peak is `VmHWM` of this address space; `ru_maxrss` is not
/// used because across `exec` it keeps the high-water mark of the replaced address space, which
/// after a `vfork`-style spawn is the parent's.
fn log_resource_use() {
    use nix::sys::resource::{UsageWho, getrusage};
    if !log::log_enabled!(log::Level::Debug) {
        return;
    }
    let peak = sys::read_proc("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    if let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) {
        let us = |t: nix::sys::time::TimeVal| t.tv_sec() * 1_000_000 + t.tv_usec();
        log::debug!(
            "resource use: peak RSS {peak} KiB, user {} us, sys {} us",
            us(u.user_time()),
            us(u.system_time())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::both_removed;

    #[test]
    fn a_cleanup_whose_two_removals_fail_reports_both() {
        let err = both_removed([
            (
                "iptables",
                Err(anyhow::anyhow!("iptables-nft-restore: exit 4")),
            ),
            (
                "nftables",
                Err(anyhow::anyhow!("netlink: Operation not permitted")),
            ),
        ])
        .unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "removing the iptables mode's rules failed, and removing the nftables mode's rules \
             failed too: netlink: Operation not permitted; the iptables mode's error: \
             iptables-nft-restore: exit 4"
        );
        let one = both_removed([
            ("iptables", Ok(())),
            ("nftables", Err(anyhow::anyhow!("x"))),
        ]);
        assert_eq!(format!("{:#}", one.unwrap_err()), "x");
        assert!(both_removed([("iptables", Ok(())), ("nftables", Ok(()))]).is_ok());
    }
}
