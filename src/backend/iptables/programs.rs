//! The real programs behind [`super::Programs`]: `iptables-*-restore`/`*-save` found on
//! `PATH`, run with argv only (never a shell) and an environment scrubbed down to the xtables
//! variables, plus the legacy lock-file choice and the `/proc` view of legacy tables.
//!
//! Effects: spawns processes (see [`super::spawn`]), opens the lock file, reads
//! `/proc/thread-self/net`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::bail;

use crate::backend::iptables::state;
use crate::net::Family;
use crate::settings::config::IptablesVariant;

use super::spawn::{Ended, Gate, Job, NotRun, run_all, start_all};
use super::{Held, Programs, RestoreFailure, RestoreJob, tool_prefix};

/// The real programs.
#[derive(Debug)]
pub struct System {
    /// `PATH` to search.
    path: String,
    /// `XTABLES_LIBDIR`, passed through.
    libdir: Option<String>,
    /// The user's `XTABLES_LOCKFILE` (`None`: chosen for each legacy write).
    lockfile: Option<String>,
    /// Seconds legacy writes wait for the xtables lock.
    wait: u32,
    /// How long one program may run (legacy programs get `wait` on top).
    timeout: Duration,
}

/// Default `PATH` when the environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl System {
    /// `var` is the environment lookup; `wait` the lock wait in seconds; `timeout` how long
    /// one program may run before it is killed (`--restore-timeout`).
    pub fn new(var: &dyn Fn(&str) -> Option<String>, wait: u32, timeout: Duration) -> System {
        let path = var("PATH")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_PATH.to_owned());
        let libdir = var("XTABLES_LIBDIR").filter(|v| !v.is_empty());
        // Unset: chosen on each legacy write (`legacy_lockfile`).
        let lockfile = var("XTABLES_LOCKFILE").filter(|v| !v.is_empty());
        System {
            path,
            libdir,
            lockfile,
            wait,
            timeout,
        }
    }

    /// Finds `<prefix>-<backend>-<kind>` on PATH, else `<prefix>-<kind>` when it is a link to
    /// the right backend (a plain binary that is not a link is taken to be legacy, as iptables
    /// builds without nft are).
    pub fn tool(
        &self,
        family: Family,
        backend: IptablesVariant,
        kind: &str,
    ) -> anyhow::Result<PathBuf> {
        let prefix = tool_prefix(family);
        let specific = format!("{prefix}-{backend}-{kind}");
        let plain = format!("{prefix}-{kind}");
        if let Some(p) = find_on_path(&self.path, &specific) {
            return Ok(p);
        }
        if let Some(p) = find_on_path(&self.path, &plain) {
            let target = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            let name = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let is = if name.contains("nft") {
                IptablesVariant::Nft
            } else {
                IptablesVariant::Legacy
            };
            if is == backend {
                return Ok(p);
            }
            bail!(
                "no {specific} on PATH, and {} is the {is} backend ({}); PATH={}",
                p.display(),
                target.display(),
                self.path
            );
        }
        bail!(
            "no {kind} program for {family} in the {backend} backend: looked for {specific} and \
             {plain} on PATH={}",
            self.path
        )
    }

    /// The lock file for legacy writes: the user's `XTABLES_LOCKFILE`, else iptables' default
    /// `/run/xtables.lock` when it can be opened, else `/tmp` or `/dev/shm` (read-only root
    /// filesystems). The namespace's legacy writers are all in this container, so a private
    /// lock file serialises them as well as the default does.
    fn legacy_lockfile(&self) -> anyhow::Result<Option<String>> {
        if let Some(f) = &self.lockfile {
            return Ok(Some(f.clone()));
        }
        let open = |p: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map(|_| ())
        };
        let default = "/run/xtables.lock";
        let err = match open(default) {
            Ok(()) => return Ok(None),
            Err(e) => e,
        };
        for alt in ["/tmp/xtables.lock", "/dev/shm/xtables.lock"] {
            if open(alt).is_ok() {
                log::info!("{default} cannot be opened ({err}); using XTABLES_LOCKFILE={alt}");
                return Ok(Some(alt.to_owned()));
            }
        }
        bail!(
            "legacy iptables needs a writable lock file and none can be created ({default}: \
             {err}; /tmp and /dev/shm are not writable either): mount a writable emptyDir at \
             /run or /tmp, or set XTABLES_LOCKFILE"
        )
    }

    fn envs(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if let Some(d) = &self.libdir {
            v.push(("XTABLES_LIBDIR", d.clone()));
        }
        v
    }
}

fn find_on_path(path: &str, name: &str) -> Option<PathBuf> {
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

impl System {
    /// How long a program of `backend` may run, and what set that limit (for the error).
    fn limit(&self, backend: IptablesVariant) -> (Duration, String) {
        let t = self.timeout;
        match backend {
            IptablesVariant::Nft => (
                t,
                format!("{t:?} (--restore-timeout, env ISTIO_INIT_RESTORE_TIMEOUT)"),
            ),
            IptablesVariant::Legacy => {
                let wait = Duration::from_secs(u64::from(self.wait));
                (
                    t + wait,
                    format!(
                        "{:?} (--restore-timeout {t:?}, env ISTIO_INIT_RESTORE_TIMEOUT, plus \
                         --xtables-wait {wait:?})",
                        t + wait
                    ),
                )
            }
        }
    }

    /// `bin --noflush` with the environment iptables needs and nothing else.
    pub fn restore_command(&self, bin: &Path) -> Command {
        let mut cmd = Command::new(bin);
        cmd.arg("--noflush").env_clear().envs(self.envs());
        cmd
    }

    /// The restore command for one family, ready to run.
    fn restore_job(
        &self,
        family: Family,
        backend: IptablesVariant,
        input: &str,
    ) -> Result<Job, RestoreFailure> {
        let fail = |program: String, stderr: String| RestoreFailure {
            program,
            stderr,
            line: None,
        };
        let looked_for = format!("{}-{backend}-restore", tool_prefix(family));
        let bin = self
            .tool(family, backend, "restore")
            .map_err(|e| fail(looked_for, format!("{e:#}")))?;
        let program = bin.display().to_string();
        let mut cmd = self.restore_command(&bin);
        if backend == IptablesVariant::Legacy {
            cmd.arg(format!("--wait={}", self.wait));
            match self.legacy_lockfile() {
                Ok(Some(f)) => {
                    cmd.env("XTABLES_LOCKFILE", f);
                }
                Ok(None) => {}
                Err(e) => return Err(fail(program, format!("{e:#}"))),
            }
        }
        let (limit, limit_source) = self.limit(backend);
        Ok(Job {
            cmd,
            program,
            input: Some(input.as_bytes().to_vec()),
            stdout: false,
            limit,
            limit_source,
        })
    }
}

/// How a restore ended, as the apply logic sees it.
fn restore_result(program: String, ended: Result<Ended, NotRun>) -> Result<(), RestoreFailure> {
    let fail = |stderr: String| RestoreFailure {
        program: program.clone(),
        stderr,
        line: None,
    };
    let ended = ended.map_err(|NotRun(why)| fail(why))?;
    if let Some(why) = ended.abnormal() {
        return Err(fail(why));
    }
    if ended.success() {
        return Ok(());
    }
    let line = state::failed_line(&ended.stderr);
    let stderr = if ended.stderr.trim().is_empty() {
        format!("exited with {}", ended.status_text())
    } else {
        ended.stderr
    };
    Err(RestoreFailure {
        program,
        stderr,
        line,
    })
}

/// The restores [`System`] started, held until [`Held::release`]: `slots` has a result for
/// each job that could not be started (in job order), `None` for each program of `gate`.
#[derive(Debug)]
struct HeldRestores {
    gate: Gate,
    slots: Vec<Option<Result<(), RestoreFailure>>>,
    programs: Vec<String>,
}

impl Held for HeldRestores {
    fn release(self: Box<Self>) -> Vec<Result<(), RestoreFailure>> {
        let HeldRestores {
            gate,
            slots,
            programs,
        } = *self;
        let mut ended = gate.release().into_iter().zip(programs);
        slots
            .into_iter()
            .map(|slot| {
                slot.unwrap_or_else(|| match ended.next() {
                    Some((e, program)) => restore_result(program, e),
                    None => unreachable!("one result per job"),
                })
            })
            .collect()
    }
}

impl Programs for System {
    fn restore(
        &self,
        family: Family,
        backend: IptablesVariant,
        input: &str,
    ) -> Result<(), RestoreFailure> {
        let job = self.restore_job(family, backend, input)?;
        let program = job.program.clone();
        let ended = match run_all(vec![job]) {
            Ok(mut ended) => ended
                .pop()
                .unwrap_or_else(|| unreachable!("one result per job")),
            Err(e) => Err(NotRun(format!("{e:#}"))),
        };
        restore_result(program, ended)
    }

    /// Every restore is started before any receives its input, each then receives all of it
    /// at once, and they are held until the release, then continued together (see
    /// `spawn.rs`): the families commit concurrently, and once released a restore finishes
    /// even if istio-init dies (killed before the release, none acts on its input).
    fn start_restores(&self, jobs: Vec<RestoreJob>) -> anyhow::Result<Box<dyn Held + '_>> {
        let mut slots = Vec::new();
        let mut runnable = Vec::new();
        let mut programs = Vec::new();
        for (family, backend, input) in &jobs {
            match self.restore_job(*family, *backend, input) {
                Ok(job) => {
                    slots.push(None);
                    programs.push(job.program.clone());
                    runnable.push(job);
                }
                Err(f) => slots.push(Some(Err(f))),
            }
        }
        Ok(Box::new(HeldRestores {
            gate: start_all(runnable)?,
            slots,
            programs,
        }))
    }

    fn save(&self, family: Family, backend: IptablesVariant) -> anyhow::Result<String> {
        let bin = self.tool(family, backend, "save")?;
        let mut cmd = Command::new(&bin);
        cmd.env_clear().envs(self.envs());
        let (limit, limit_source) = self.limit(backend);
        let program = bin.display().to_string();
        let job = Job {
            cmd,
            program: program.clone(),
            input: None,
            stdout: true,
            limit,
            limit_source,
        };
        let ended = run_all(vec![job])?
            .pop()
            .unwrap_or_else(|| unreachable!("one result per job"))
            .map_err(|e| anyhow::anyhow!("running {program}: {e}"))?;
        if let Some(why) = ended.abnormal() {
            bail!("running {program}: {why}");
        }
        if !ended.success() {
            bail!(
                "{program} failed ({}): {}",
                ended.status_text(),
                ended.stderr.trim()
            );
        }
        Ok(ended.stdout)
    }

    fn legacy_tables(&self, family: Family) -> Vec<String> {
        let file = match family {
            Family::V4 => "ip_tables_names",
            Family::V6 => "ip6_tables_names",
        };
        // thread-self: the namespace of this thread, which may have entered another one.
        crate::sys::read_proc(&format!("/proc/thread-self/net/{file}"))
            .map(|t| t.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}
