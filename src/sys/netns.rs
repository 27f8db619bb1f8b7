//! Running the effects inside a network namespace: the current one, or another one named by a
//! path (`/proc/PID/ns/net`, `/var/run/netns/NAME`) or a PID (`--netns`).
//!
//! Effects: opens the namespace file and calls `setns`. Entering runs the work on a dedicated
//! thread: on Linux the network namespace and the capability sets are per-thread attributes,
//! so that thread can enter the namespace and drop capabilities while the process's main
//! thread never changes namespace — leaving again is the thread ending, which cannot be
//! skipped by an early return or a panic. Programs spawned from that thread inherit its
//! namespace and capabilities. Without a namespace to enter the work runs on the calling
//! thread (one thread less on the init container's critical path).

use std::fs::File;
use std::os::fd::AsFd;

use anyhow::{Context, anyhow};
use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};

use crate::exit::UsageError;

/// An opened network namespace.
#[derive(Debug)]
pub struct Netns {
    path: String,
    file: File,
}

impl Netns {
    /// Opens a namespace file. A missing file is an input error (exit 2); a file the caller
    /// may not open is a privilege error.
    pub fn open(path: &str) -> anyhow::Result<Netns> {
        // Non-blocking, so that a FIFO given as the path fails at setns instead of hanging.
        let opened = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(path)
        };
        match opened {
            Ok(file) => Ok(Netns {
                path: path.to_owned(),
                file,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(UsageError(format!(
                "invalid network namespace {path:?} in --netns: no such file (give \
                 /proc/PID/ns/net, /var/run/netns/NAME or a PID)"
            ))
            .into()),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(anyhow!(
                "opening network namespace {path}: {e}; opening another process's namespace \
                 needs the same user or CAP_SYS_PTRACE"
            )),
            Err(e) => Err(anyhow!("opening network namespace {path}: {e}")),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn enter(&self) -> anyhow::Result<()> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| match e {
            Errno::EPERM => anyhow!(
                "entering network namespace {}: {e}; entering another namespace requires \
                 CAP_SYS_ADMIN, which this process lacks (run istio-init inside the target \
                 namespace instead, e.g. as an init container or with `kubectl debug \
                 --profile=netadmin`)",
                self.path
            ),
            Errno::EINVAL => UsageError(format!(
                "invalid network namespace {:?} in --netns: not a network namespace file",
                self.path
            ))
            .into(),
            e => anyhow!("entering network namespace {}: {e}", self.path),
        })
    }
}

/// Runs `f` inside `ns` and returns its result: on a fresh thread that enters `ns`, so the
/// calling thread's namespace never changes; without `ns`, on the calling thread.
pub fn run_in<T: Send>(
    ns: Option<&Netns>,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    if ns.is_none() {
        return f();
    }
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("istio-init-apply".into())
            .spawn_scoped(s, move || {
                if let Some(ns) = ns {
                    ns.enter()?;
                    log::info!("entered network namespace {}", ns.path());
                }
                f()
            })
            .context("starting the worker thread")?;
        worker
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the worker thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_an_input_error() {
        let e = Netns::open("/nonexistent/ns").unwrap_err();
        assert_eq!(crate::exit::code_for(&e), crate::exit::USAGE);
        assert!(format!("{e:#}").contains("/nonexistent/ns"));
    }

    #[test]
    fn without_a_namespace_runs_here_and_returns_its_value() {
        let main = std::thread::current().id();
        let v = run_in(None, || Ok(std::thread::current().id() == main)).unwrap();
        assert!(v);
    }
}
