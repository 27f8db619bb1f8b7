//! The handover: on a fresh namespace where a single `iptables-nft-restore --noflush` does all
//! the work, istio-init becomes that program (`exec`) instead of starting it and waiting.
//!
//! Effects: reads the run's dump of the nf_tables tables (handed over, never re-dumped) and
//! reads `/proc/thread-self/net/ip{,6}_tables_names`, a pipe (or, past a page, an anonymous
//! in-memory file) for the input, `alarm`, and `execve`.
//!
//! Design: `docs/design.md`, "The handover".

use std::io::{Seek, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::anyhow;
use nix::fcntl::OFlag;
use nix::sys::memfd::{MemFdCreateFlag, memfd_create};
use nix::unistd::pipe2;

use crate::capture::Ruleset;
use crate::net::Family;
use crate::netlink::tables;
use crate::settings::config::IptablesVariant;

use super::{Options, Programs, System};

/// Everything needed to hand over to the restore.
#[derive(Debug)]
pub struct Handover {
    family: Family,
    program: PathBuf,
    command: Command,
    text: String,
    rules: usize,
    chains: usize,
    timeout: Duration,
}

/// The restore's stdin holding `text` whole: a pipe when it fits in one page, which every
/// pipe holds even when the user's pipe-buffer quota is spent (the usual case: two system
/// calls), else an anonymous in-memory file.
fn input_for(text: &[u8]) -> std::io::Result<std::fs::File> {
    if text.len() <= ONE_PAGE {
        let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
        std::fs::File::from(write).write_all(text)?;
        return Ok(std::fs::File::from(read));
    }
    let mut f = std::fs::File::from(memfd_create(
        c"istio-init-rules",
        MemFdCreateFlag::MFD_CLOEXEC,
    )?);
    f.write_all(text)?;
    f.rewind()?;
    Ok(f)
}

const ONE_PAGE: usize = 4096;

/// Whether this run, which has nothing to do after the rules (the caller's part), can hand
/// over to its single restore (module doc), and if so, everything ready for
/// [`Handover::exec`]. `None` means the supervised path; the reason is logged at debug level.
pub fn handover(
    sys: &System,
    opts: &Options,
    rulesets: &[Ruleset],
    nf_tables: &[tables::Table],
    timeout: Duration,
) -> Option<Handover> {
    let why_not = |why: &str| {
        log::debug!("supervising the restores: {why}");
        None
    };
    if opts.reconcile || opts.force_apply {
        return why_not("the run has more to do than the rules");
    }
    if opts.force_backend == Some(IptablesVariant::Legacy) {
        return why_not("the legacy backend is forced");
    }
    if rulesets.iter().any(|rs| rs.family == Family::V6) {
        return why_not("IPv6 rules are on: the ::6 address goes in first");
    }
    let mut with_rules = rulesets.iter().filter(|rs| !rs.tables.is_empty());
    let (Some(rs), None) = (with_rules.next(), with_rules.next()) else {
        return why_not("not exactly one family has rules");
    };
    if rs.tables.len() != 1 {
        return why_not("the rules span more than one table");
    }
    let family = rs.family;
    if !sys.legacy_tables(family).is_empty() {
        return why_not("legacy tables exist");
    }
    let family_tables = nf_tables
        .iter()
        .filter(|t| t.family == tables::nfproto(family))
        .count();
    if family_tables > 0 {
        return why_not(&format!(
            "nf_tables already holds {family_tables} {family} tables"
        ));
    }
    let program = match sys.tool(family, IptablesVariant::Nft, "restore") {
        Ok(p) => p,
        Err(e) => return why_not(&format!("{e:#}")),
    };
    let text = crate::backend::iptables::render::ruleset_text(rs);
    let mut command = sys.restore_command(&program);
    match input_for(text.as_bytes()) {
        Ok(f) => command.stdin(Stdio::from(f)),
        Err(e) => return why_not(&format!("cannot prepare the input: {e}")),
    };
    log::info!(
        "{family}: using the nft backend: no legacy iptables tables and no nf_tables tables exist \
         in this network namespace"
    );
    Some(Handover {
        family,
        program,
        command,
        text,
        rules: rs.rule_count(),
        chains: rs.chain_count(),
        timeout,
    })
}

impl Handover {
    /// Logs what the restore writes: counts at info level, its input at debug level.
    pub fn log(&self) {
        log::info!(
            "{} ruleset: {} rules in {} new chains",
            self.family,
            self.rules,
            self.chains
        );
        log::debug!("{} restore input:\n{}", self.family, self.text);
    }

    /// Becomes the restore. Returns only when `execve` failed (nothing was applied).
    pub fn exec(mut self) -> anyhow::Error {
        let secs = u32::try_from(self.timeout.as_millis().div_ceil(1000))
            .unwrap_or(u32::MAX)
            .max(1);
        log::info!(
            "{}: applying {} rules in {} chains (nft backend, a fresh namespace) by handing over \
             to {} --noflush: its exit status is this run's, an error below is iptables' own \
             (line numbers count lines of the --dry-run {} text), SIGALRM means it ran past \
             --restore-timeout ({secs}s); --handover=false keeps istio-init in charge",
            self.family,
            self.rules,
            self.chains,
            self.program.display(),
            self.family
        );
        nix::unistd::alarm::set(secs);
        let e = self.command.exec();
        nix::unistd::alarm::cancel();
        anyhow!(
            "{}: cannot run {}: {e}; nothing was applied",
            self.family,
            self.program.display()
        )
    }
}
