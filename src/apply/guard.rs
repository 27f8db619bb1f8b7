//! Keeping one run's changes whole: a per-namespace lock so two istio-init runs on the same
//! network namespace never interleave, and a critical section in which termination signals
//! wait until the namespace is consistent again.
//!
//! Effects: creates, locks and unlinks a file in `/run` or `/tmp`; changes the calling
//! thread's signal mask (for the section, and around the spawns of held restores); reads
//! `/proc/thread-self/status`.
//!
//! # The namespace lock
//!
//! iptables-restore commits table by table, so a second run that starts while a first one is
//! between two tables sees half a configuration: it would report drift, or "complete" tables
//! the first run is about to commit. A bounded re-check loop could only guess when the first
//! run is done; an advisory lock knows. [`NetnsLock`] is an exclusive `flock` on
//! `istio-init-netns-<inode>.lock`, named after the inode of the target network namespace
//! (unique while the namespace exists), in the first of `/run` and `/tmp` where it can be
//! created — so it works with a read-only root filesystem where only those are writable
//! mounts, and needs no privilege beyond writing there. The file is unlinked when the run
//! ends; a waiter that then locks an unlinked file notices (its inode is no longer the one at
//! the path) and starts over, so removing the file never lets two runs in.
//!
//! The lock file descriptor is deliberately inherited by the iptables programs istio-init
//! starts: if istio-init is SIGKILLed while a restore is committing, the orphaned restore
//! still holds the lock, and the next run waits for that transaction to finish instead of
//! reading it half-done. The wait is bounded (`--restore-timeout` plus `--xtables-wait`, the
//! longest one program may run), a termination signal ends it at once (nothing has been
//! changed yet), and a timeout names the lock file.
//!
//! The lock serialises istio-init runs that share `/run` (or `/tmp`): runs in one container,
//! or on one host. Runs in different containers with private `/run` and `/tmp` against the
//! same namespace (an init container and a debug container at the same moment) are not
//! serialised; nor are other tools. When neither directory is writable the run goes on
//! without the lock and says so: the init container is normally the namespace's only writer,
//! and failing the pod over a missing lock would be worse.
//!
//! # The critical section
//!
//! SIGTERM, SIGINT and SIGHUP are blocked (`pthread_sigmask`) from before the namespace lock
//! is taken — so no signal can fall between creating the lock file and holding it — until
//! the rules are complete or rolled back (the section ends before `--run-validation`, which
//! changes nothing). The mask is set on the calling thread before the worker thread that
//! enters the namespace is spawned, so every thread of the process — the worker and the
//! threads that watch the iptables programs — blocks them, and a signal stays pending
//! instead of killing the process between two tables or two families. When the section ends
//! the lock is released first, then the pending signal takes effect with its default action
//! (the process dies by it, as was asked), after a log line saying so; an error the run
//! ended with is logged before that, since `main` will not get to print it. The iptables
//! programs started inside the section inherit the mask (a blocked mask survives `exec`):
//! a SIGTERM or SIGINT aimed at a restore, or at every process of the container, does not
//! cut its transaction short either, nor does SIGHUP, except for held restores (below); only
//! SIGKILL stops one, and that is what the timeout uses. The section lasts at most as long
//! as the programs it waits for, each bounded by `--restore-timeout`. SIGKILL cannot be
//! blocked: see `run.rs` and the module doc of `apply` for how the restores are held so that
//! it cannot split the families, and what the next run repairs.
//!
//! # The held restores and SIGHUP
//!
//! The restores of a dual-stack run are held (stopped) until every one has its input, then
//! released together (`run.rs`). If istio-init is SIGKILLed while they are held, the kernel
//! sends their orphaned group SIGHUP then SIGCONT, and SIGHUP must end them: so they are
//! spawned with SIGHUP (and SIGTSTP, which holds them) unblocked — [`GateUnblocked`] unblocks
//! [`GATE`] on the spawning thread for the spawns only — while SIGTERM and SIGINT stay
//! blocked in them.
//!
//! Just before, one read of `/proc/thread-self/status` ([`signal_state`]) checks that no
//! deferred signal is pending — if one is, the run ends there, "nothing was changed", like
//! the lock wait — and that neither SIGHUP nor SIGTSTP is ignored (an ignored disposition
//! survives `exec`: then nothing is held, with a warning). A SIGHUP that arrives during the
//! spawns themselves (a few hundred microseconds) goes to the one thread that does not block
//! it, and its default action kills istio-init at once, without the log line and leaving
//! the lock file (as a SIGKILL would; the next run reuses the file). That is safe because
//! nothing has been changed yet: no route is added and no input written before the spawns
//! end; the restores started so far are not stopped, so the kernel sends them nothing; and
//! when istio-init's ends of their pipes close they read EOF and change nothing. A SIGTSTP in
//! that window stops istio-init, as it would at any other moment (it is never deferred).
//!
//! The price: a SIGHUP aimed at a held restore itself, or at every process of the container,
//! can end that restore between two tables. istio-init sees it fail and rolls back the other
//! families (a SIGHUP meant for istio-init too is deferred until then, and ends it after);
//! tables that restore had already committed stay, as after a restore killed at its deadline,
//! until the next run completes them.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use nix::fcntl::{FcntlArg, FdFlag, Flock, FlockArg, fcntl};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

/// Where the lock file may go, in order.
pub const LOCK_DIRS: [&str; 2] = ["/run", "/tmp"];

/// An exclusive lock on the target network namespace, released (and its file removed) on drop.
#[derive(Debug)]
pub struct NetnsLock {
    path: PathBuf,
    lock: Flock<File>,
}

/// The lock file's name for the namespace with inode `ino`.
pub fn lock_name(ino: u64) -> String {
    format!("istio-init-netns-{ino}.lock")
}

impl NetnsLock {
    /// Locks the network namespace `ns` (a namespace file; `None`: this thread's own),
    /// waiting at most `limit` for another run to finish. `Ok(None)`: no lock file could be
    /// created anywhere, and the run goes on without one (logged as a warning).
    pub fn acquire(ns: Option<&str>, limit: Duration) -> anyhow::Result<Option<NetnsLock>> {
        Self::acquire_in(&LOCK_DIRS.map(Path::new), ns, limit)
    }

    /// [`NetnsLock::acquire`] with the lock file in the first usable directory of `dirs`.
    pub fn acquire_in(
        dirs: &[&Path],
        ns: Option<&str>,
        limit: Duration,
    ) -> anyhow::Result<Option<NetnsLock>> {
        let ns_file = ns.unwrap_or("/proc/thread-self/ns/net");
        let ino = std::fs::metadata(ns_file)
            .with_context(|| format!("reading the inode of network namespace {ns_file}"))?
            .ino();
        let name = lock_name(ino);
        let deadline = Instant::now() + limit;
        let mut refused = Vec::new();
        for dir in dirs {
            let path = dir.join(&name);
            match Self::lock_at(&path, deadline, limit)? {
                Ok(lock) => {
                    log::debug!(
                        "locked network namespace {ns_file} (inode {ino}) with {}",
                        path.display()
                    );
                    return Ok(Some(lock));
                }
                Err(e) => refused.push(format!("{}: {e}", path.display())),
            }
        }
        log::warn!(
            "cannot create a lock file for this network namespace ({}); going on without it: \
             concurrent istio-init runs on this namespace are not serialised (mount a writable \
             emptyDir at /run or /tmp)",
            refused.join("; ")
        );
        Ok(None)
    }

    /// Locks `path`. The outer error ends the run (the wait timed out); the inner one means
    /// this directory cannot hold the file.
    fn lock_at(
        path: &Path,
        deadline: Instant,
        limit: Duration,
    ) -> anyhow::Result<Result<NetnsLock, std::io::Error>> {
        let mut announced = false;
        let mut pause = Duration::from_millis(1);
        loop {
            let file = match open_lock_file(path) {
                Ok(f) => f,
                Err(e) => return Ok(Err(e)),
            };
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    // Waiting inside the critical section: a termination signal ends the
                    // wait (nothing has been changed yet).
                    let pending = pending_deferred();
                    if !pending.is_empty() {
                        bail!(
                            "received {} while waiting for another istio-init run on this \
                             network namespace (lock {}); nothing was changed",
                            pending.join(" and "),
                            path.display()
                        );
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "another istio-init run (or an iptables program it started) has \
                             held the lock on this network namespace, {}, for {limit:?} \
                             (--restore-timeout plus --xtables-wait); find it with `fuser {}`",
                            path.display(),
                            path.display()
                        );
                    }
                    if !announced {
                        log::info!(
                            "another istio-init run is changing this network namespace; \
                             waiting for it to finish (lock {})",
                            path.display()
                        );
                        announced = true;
                    }
                    std::thread::sleep(pause.min(deadline - Instant::now()));
                    pause = (pause * 2).min(Duration::from_millis(20));
                    continue;
                }
                Err((_, e)) => return Ok(Err(e.into())),
            };
            // The holder we waited for may have unlinked the file: then this lock guards
            // nothing, and the path must be opened again.
            let same = match (lock.metadata(), std::fs::metadata(path)) {
                (Ok(held), Ok(now)) => held.ino() == now.ino() && held.dev() == now.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            // Inherited by the iptables programs: a transaction that outlives a killed
            // istio-init keeps the namespace locked until it is committed.
            fcntl(lock.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
                .map_err(|e| anyhow!("clearing close-on-exec on {}: {e}", path.display()))?;
            return Ok(Ok(NetnsLock {
                path: path.to_owned(),
                lock,
            }));
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open_lock_file(path: &Path) -> std::io::Result<File> {
    let created = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path);
    match created {
        // An existing file of another user in sticky /tmp cannot be opened for writing
        // (fs.protected_regular); a read-only descriptor can be locked just the same.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            File::open(path).map_err(|_| e)
        }
        r => r,
    }
}

impl Drop for NetnsLock {
    fn drop(&mut self) {
        // Unlinked while still locked; the lock itself is released when `lock` drops.
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.lock;
    }
}

/// The signals deferred by a [`CriticalSection`].
pub const DEFERRED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// While alive, [`DEFERRED`] signals are blocked on the thread that created it and on every
/// thread it spawns afterwards. It holds the namespace lock, if any, until it ends.
#[derive(Debug)]
pub struct CriticalSection {
    old: SigSet,
    lock: Mutex<Option<NetnsLock>>,
    checked: AtomicBool,
}

impl CriticalSection {
    /// Blocks the deferred signals on this thread (and so on threads spawned from now on).
    pub fn enter() -> anyhow::Result<CriticalSection> {
        let mut set = SigSet::empty();
        for s in DEFERRED {
            set.add(s);
        }
        let mut old = SigSet::empty();
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))
            .context("blocking termination signals during the apply")?;
        Ok(CriticalSection {
            old,
            lock: Mutex::new(None),
            checked: AtomicBool::new(false),
        })
    }

    /// Keeps `lock` until the section ends. Taking the lock inside the section means no
    /// signal can end the process between creating the lock file and holding it here.
    pub fn hold(&self, lock: Option<NetnsLock>) {
        match self.lock.lock() {
            Ok(mut l) => *l = lock,
            Err(poisoned) => *poisoned.into_inner() = lock,
        }
    }

    /// Passes an error through; when a deferred signal will end the process as soon as the
    /// section ends (before `main` could print the error), logs it first.
    pub fn before_leaving(&self, e: anyhow::Error) -> anyhow::Error {
        if self.signal_pending() {
            log::error!("{e:#}");
        }
        e
    }

    /// Ends the section on the calling thread: releases the namespace lock, then lets a
    /// deferred signal take effect. Call it on the thread that did the work once the
    /// namespace is consistent again; dropping the section does the same on the thread that
    /// entered it.
    pub fn leave(&self) {
        // Released first, so that a signal about to kill the process leaves no lock file.
        let lock = match self.lock.lock() {
            Ok(mut l) => l.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(lock);
        // Checked once (by the first thread to leave): a pending signal kills the process
        // right after, so a later check can only find nothing new worth a line.
        if self.checked.swap(true, Ordering::SeqCst) {
            let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None);
            return;
        }
        let pending = pending_deferred();
        if !pending.is_empty() {
            log::warn!(
                "received {} while changing the network namespace; it was held until the \
                 namespace was consistent, and takes effect now",
                pending.join(" and ")
            );
        }
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None);
    }

    /// Whether a deferred signal is waiting (so the process will die when the section ends).
    pub fn signal_pending(&self) -> bool {
        !pending_deferred().is_empty()
    }
}

impl Drop for CriticalSection {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Deferred signals pending for the process or this thread, by name.
fn pending_deferred() -> Vec<&'static str> {
    signal_state().pending
}

/// The signals that hold the restores of a run back together and end them if istio-init dies
/// meanwhile (see "The held restores" in the module doc and `run.rs`): unblocked while those
/// restores are spawned, so that they inherit them unblocked.
pub const GATE: [Signal; 2] = [Signal::SIGHUP, Signal::SIGTSTP];

/// What `run.rs` checks before it spawns restores that are held back together.
#[derive(Debug, Default)]
pub struct SignalState {
    /// [`DEFERRED`] signals pending for the process or this thread.
    pub pending: Vec<&'static str>,
    /// [`GATE`] signals this process ignores (inherited from its parent: an ignored
    /// disposition survives `exec`, so the restores would ignore them too).
    pub ignored: Vec<&'static str>,
}

/// One read of `/proc/thread-self/status` (nix has no `sigpending`): the pending masks
/// (`ShdPnd`, `SigPnd`) and the ignored one (`SigIgn`).
pub fn signal_state() -> SignalState {
    let Ok(text) = std::fs::read_to_string("/proc/thread-self/status") else {
        return SignalState::default();
    };
    let mask = |keys: &[&str]| {
        keys.iter()
            .map(|key| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                    .unwrap_or(0)
            })
            .fold(0, |a, b| a | b)
    };
    let names = |signals: &[Signal], mask: u64| {
        signals
            .iter()
            .filter(|s| {
                let n = **s as i32;
                (1..=64).contains(&n) && mask & (1u64 << (n - 1)) != 0
            })
            .map(|s| s.as_str())
            .collect()
    };
    SignalState {
        pending: names(&DEFERRED, mask(&["ShdPnd:", "SigPnd:"])),
        ignored: names(&GATE, mask(&["SigIgn:"])),
    }
}

/// While alive, the [`GATE`] signals are unblocked on the calling thread (the rest of the
/// critical section's mask stays); dropping it restores the mask. Programs spawned meanwhile
/// inherit SIGTERM and SIGINT blocked and SIGHUP and SIGTSTP not.
#[derive(Debug)]
pub struct GateUnblocked {
    old: SigSet,
}

impl GateUnblocked {
    pub fn enter() -> nix::Result<GateUnblocked> {
        let mut set = SigSet::empty();
        for s in GATE {
            set.add(s);
        }
        let mut old = SigSet::empty();
        pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), Some(&mut old))?;
        Ok(GateUnblocked { old })
    }
}

impl Drop for GateUnblocked {
    fn drop(&mut self) {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_follow_the_namespace_inode() {
        assert_eq!(lock_name(4026532281), "istio-init-netns-4026532281.lock");
    }

    #[test]
    fn a_second_lock_on_the_same_namespace_waits_and_times_out_naming_the_file() {
        // A short wait shows the exclusion without depending on timing for the result.
        let dir = std::env::temp_dir().join(format!("ii-lock-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing");
        // The first directory does not exist: the lock goes to the next one.
        let dirs = [missing.as_path(), dir.as_path()];
        let acquire = |limit| NetnsLock::acquire_in(&dirs, None, limit);
        let first = acquire(Duration::from_secs(1)).unwrap().unwrap();
        assert!(first.path().starts_with(&dir), "{:?}", first.path());
        let e = std::thread::scope(|s| {
            s.spawn(|| acquire(Duration::from_millis(30)))
                .join()
                .unwrap_or_else(|_| Err(anyhow!("panicked")))
        })
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains(&first.path().display().to_string()), "{msg}");
        assert!(msg.contains("--restore-timeout"), "{msg}");
        let path = first.path().to_owned();
        drop(first);
        assert!(!path.exists(), "the lock file was not removed");
        let again = acquire(Duration::from_secs(1)).unwrap();
        assert!(again.is_some());
        drop(again);
        // Nowhere to put it: no lock, and no error.
        let none = NetnsLock::acquire_in(&[missing.as_path()], None, Duration::from_secs(1));
        assert!(none.unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
