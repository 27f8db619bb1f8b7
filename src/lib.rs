//! istio-init: builds Istio's sidecar iptables ruleset in memory and applies it atomically.
//!
//! The pure core turns a command line (plus env vars) into a [`config::Config`], the
//! [`ruleset::Ruleset`] of each IP family and its `iptables-restore` text. [`run`] is the only
//! place that sequences effects: read facts → build → print (dry run) or apply.

pub mod cli;
pub mod config;
pub mod exit;
pub mod host;
pub mod logging;
pub mod net;
pub mod restore;
pub mod ruleset;

use std::io::Write;

use anyhow::Context;

use crate::config::{Config, Inputs, Interception};
use crate::ruleset::{Facts, Ruleset};

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
    Config::resolve(&Inputs {
        defaults: inv.defaults,
        flags: &inv.flags,
        env: env.var,
        user_uid: &host::passwd_uid,
    })
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
    if cfg.redirect_dns && !ruleset::dns_capture(cfg, &facts) {
        log::warn!(
            "DNS capture was requested, but capture-all-dns is off and {} lists no usable \
             nameserver: DNS capture disabled",
            cfg.resolv_conf
        );
    }
    Ok(facts)
}

/// Builds the ruleset of every enabled family.
pub fn build_all(cfg: &Config, facts: &Facts) -> Vec<Ruleset> {
    facts
        .families()
        .into_iter()
        .map(|f| ruleset::build(cfg, facts, f))
        .collect()
}

/// Runs one invocation. Returns the error for `main` to report; see [`exit::code_for`].
pub fn run(inv: &cli::Invocation, env: &Env<'_>) -> anyhow::Result<()> {
    let cfg = resolve(inv, env)?;
    logging::init(cfg.log);
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

    if cfg.interception == Interception::None {
        log::info!("interception mode NONE: no traffic is captured, nothing to do");
        return Ok(());
    }

    let facts = gather_facts(&cfg)?;
    let rulesets = build_all(&cfg, &facts);
    for rs in &rulesets {
        log::info!(
            "{} ruleset: {} rules in {} new chains",
            rs.family,
            rs.rule_count(),
            rs.chain_count()
        );
        log::debug!("{} restore input:\n{rs}", rs.family);
    }

    if cfg.dry_run {
        log::info!("dry run: printing the ruleset, no rule changes will be made");
        let text = restore::dry_run_text(&rulesets);
        if let Some(path) = (env.var)("DRY_RUN_FILE_PATH").filter(|p| !p.is_empty()) {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .with_context(|| {
                    format!("writing the dry-run output to {path} (DRY_RUN_FILE_PATH)")
                })?;
        }
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .context("writing the ruleset to stdout")?;
        return Ok(());
    }

    anyhow::bail!("applying rules is not implemented yet; use --dry-run")
}
