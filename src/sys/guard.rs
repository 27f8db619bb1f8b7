//! Keeping one run's changes whole: a per-namespace lock so two istio-init runs on the same
//! network namespace never interleave, and a critical section in which termination signals
//! wait until the namespace is consistent again.
//!
//! Effects: binds an abstract Unix socket in the current thread's network namespace; changes
//! the calling thread's signal mask (for the section, and around the spawns of held
//! restores); polls a `signalfd` and reads `/proc/thread-self/status`.
//!
//! Design: `docs/design.md`, "The namespace lock and deferred signals".

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};

/// The abstract Unix socket name that is the namespace lock (`ss -xa` shows it as
/// `@istio-init/netns-lock`).
pub const LOCK_NAME: &str = "istio-init/netns-lock";

/// An exclusive lock on the calling thread's network namespace: a bound abstract Unix socket,
/// released when the last process holding it (istio-init, or a restore that inherited it)
/// ends.
#[derive(Debug)]
pub struct NetnsLock {
    _sock: OwnedFd,
}

impl NetnsLock {
    /// Locks the calling thread's network namespace, waiting at most `limit` for another run
    /// to finish.
    pub fn acquire(limit: Duration) -> anyhow::Result<NetnsLock> {
        Self::acquire_named(LOCK_NAME, limit)
    }

    /// [`NetnsLock::acquire`] under another name (unit tests, which run in the host's
    /// namespace).
    pub fn acquire_named(name: &str, limit: Duration) -> anyhow::Result<NetnsLock> {
        let addr = UnixAddr::new_abstract(name.as_bytes())
            .with_context(|| format!("naming the namespace lock @{name}"))?;
        // Not close-on-exec: inherited by the iptables programs (module doc).
        let sock = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::empty(),
            None,
        )
        .context("creating the namespace lock socket")?;
        let deadline = Instant::now() + limit;
        let mut announced = false;
        let mut pause = Duration::from_millis(1);
        loop {
            match bind(sock.as_raw_fd(), &addr) {
                Ok(()) => {
                    log::debug!("locked this network namespace (abstract socket @{name})");
                    return Ok(NetnsLock { _sock: sock });
                }
                Err(Errno::EADDRINUSE) => {}
                Err(e) => bail!("binding the namespace lock socket @{name}: {e}"),
            }
            // Waiting inside the critical section: a termination signal ends the wait
            // (nothing has been changed yet).
            let pending = pending_deferred();
            if !pending.is_empty() {
                bail!(
                    "received {} while waiting for another istio-init run on this network \
                     namespace (lock @{name}); nothing was changed",
                    pending.join(" and ")
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "another istio-init run (or an iptables program it started) has held the \
                     lock on this network namespace, the abstract Unix socket @{name}, for \
                     {limit:?} (--restore-timeout plus --xtables-wait); `ss -xap | grep {name}` \
                     in the namespace shows the holder"
                );
            }
            if !announced {
                log::info!(
                    "another istio-init run is changing this network namespace; waiting for \
                     it to finish (lock @{name})"
                );
                announced = true;
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
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
        let old = change_mask(SigmaskHow::SIG_BLOCK, &DEFERRED)
            .context("blocking termination signals during the apply")?;
        Ok(CriticalSection {
            old,
            lock: Mutex::new(None),
            checked: AtomicBool::new(false),
        })
    }

    /// Keeps `lock` until the section ends. Taking the lock inside the section means no
    /// signal can end the process between binding the lock and holding it here.
    pub fn hold(&self, lock: NetnsLock) {
        let lock = Some(lock);
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
        // Released first, so that a waiting run goes on as soon as the namespace is
        // consistent.
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
///
/// Checked first with a `signalfd` for [`DEFERRED`], polled, not read: it is readable while
/// one of them is pending and polling takes nothing off the queue, so the signal still
/// takes effect when the section ends. Only then (or if no `signalfd` can be made) is
/// `/proc/thread-self/status` read for their names: three short system calls instead of a
/// `/proc` file on every run.
fn pending_deferred() -> Vec<&'static str> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::AsFd;
    let set = sigset(&DEFERRED);
    if let Ok(fd) = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::ZERO) == Ok(0) {
            return Vec::new();
        }
    }
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
    let Ok(text) = super::read_proc("/proc/thread-self/status") else {
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

/// Blocks or unblocks `signals` on the calling thread; returns the mask it replaced.
fn change_mask(how: SigmaskHow, signals: &[Signal]) -> nix::Result<SigSet> {
    let mut old = SigSet::empty();
    pthread_sigmask(how, Some(&sigset(signals)), Some(&mut old))?;
    Ok(old)
}

fn sigset(signals: &[Signal]) -> SigSet {
    signals.iter().copied().collect()
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
        let old = change_mask(SigmaskHow::SIG_UNBLOCK, &GATE)?;
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
    fn a_second_lock_on_the_same_namespace_waits_and_times_out_naming_the_socket() {
        // A name of this test's own: the real one belongs to real runs on this namespace.
        let name = format!("istio-init-unit-{}", std::process::id());
        let acquire = |limit| NetnsLock::acquire_named(&name, limit);
        let first = acquire(Duration::from_secs(1)).unwrap();
        let e = std::thread::scope(|s| {
            s.spawn(|| acquire(Duration::from_millis(30)))
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
        })
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains(&format!("@{name}")), "{msg}");
        assert!(msg.contains("--restore-timeout"), "{msg}");
        // Released with its socket; then free again.
        drop(first);
        drop(acquire(Duration::from_secs(1)).unwrap());
    }
}
