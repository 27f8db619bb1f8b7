//! The real programs behind [`super::Netfilter`]: `iptables-*-restore`/`*-save` found on
//! `PATH`, run with argv only (never a shell) and an environment scrubbed down to the xtables
//! variables, plus the legacy lock-file choice and the `/proc` view of legacy tables.
//!
//! Effects: spawns processes, opens the lock file, reads `/proc/thread-self/net`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::config::Backend;
use crate::net::Family;
use crate::state;

use super::{Netfilter, RestoreFailure, tool_prefix};

/// The real programs.
#[derive(Debug)]
pub struct System {
    /// `PATH` to search.
    path: String,
    /// `XTABLES_LIBDIR`, passed through.
    libdir: Option<String>,
    /// The lock file for legacy writes (`None`: iptables' default `/run/xtables.lock` works).
    lockfile: Result<Option<String>, String>,
    /// Seconds legacy writes wait for the xtables lock.
    wait: u32,
}

/// Default `PATH` when the environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl System {
    /// `var` is the environment lookup; `wait` the lock wait in seconds.
    pub fn new(var: &dyn Fn(&str) -> Option<String>, wait: u32) -> System {
        let path = var("PATH")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_PATH.to_owned());
        let libdir = var("XTABLES_LIBDIR").filter(|v| !v.is_empty());
        let lockfile = match var("XTABLES_LOCKFILE").filter(|v| !v.is_empty()) {
            Some(f) => Ok(Some(f)),
            None => Err(String::new()), // resolved on first legacy write
        };
        System {
            path,
            libdir,
            lockfile,
            wait,
        }
    }

    /// Finds `<prefix>-<backend>-<kind>` on PATH, else `<prefix>-<kind>` when it is a link to
    /// the right backend (a plain binary that is not a link is taken to be legacy, as iptables
    /// builds without nft are).
    pub fn tool(&self, family: Family, backend: Backend, kind: &str) -> anyhow::Result<PathBuf> {
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
                Backend::Nft
            } else {
                Backend::Legacy
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
    fn legacy_lockfile(&self) -> Result<Option<String>, String> {
        if let Ok(Some(f)) = &self.lockfile {
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
        Err(format!(
            "legacy iptables needs a writable lock file and none can be created ({default}: \
             {err}; /tmp and /dev/shm are not writable either): mount a writable emptyDir at \
             /run or /tmp, or set XTABLES_LOCKFILE"
        ))
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

impl Netfilter for System {
    fn restore(&self, family: Family, backend: Backend, input: &str) -> Result<(), RestoreFailure> {
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
        let mut cmd = Command::new(&bin);
        cmd.arg("--noflush");
        cmd.env_clear().envs(self.envs());
        if backend == Backend::Legacy {
            cmd.arg(format!("--wait={}", self.wait));
            match self.legacy_lockfile() {
                Ok(Some(f)) => {
                    cmd.env("XTABLES_LOCKFILE", f);
                }
                Ok(None) => {}
                Err(e) => return Err(fail(program, e)),
            }
        }
        log::debug!("running {cmd:?}");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(program.clone(), format!("cannot run it: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A restore that fails early closes its stdin: its stderr says why.
            let _ = stdin.write_all(input.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|e| fail(program.clone(), format!("waiting for it: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let line = state::failed_line(&stderr);
        let stderr = if stderr.trim().is_empty() {
            format!("exited with {}", out.status)
        } else {
            stderr
        };
        Err(RestoreFailure {
            program,
            stderr,
            line,
        })
    }

    fn save(&self, family: Family, backend: Backend) -> anyhow::Result<String> {
        let bin = self.tool(family, backend, "save")?;
        let mut cmd = Command::new(&bin);
        cmd.env_clear().envs(self.envs());
        log::debug!("running {cmd:?}");
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn legacy_tables(&self, family: Family) -> Vec<String> {
        let file = match family {
            Family::V4 => "ip_tables_names",
            Family::V6 => "ip6_tables_names",
        };
        // thread-self: the namespace of this thread, which may have entered another one.
        std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
            .map(|t| t.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}
