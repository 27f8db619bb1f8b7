//! Running the iptables programs: several at once, each input delivered whole and only once
//! every program has started, several programs held back and released together, each program
//! bounded by a deadline after which it is killed.
//!
//! Effects: creates pipes and anonymous in-memory files, spawns processes, stops, continues
//! and kills them, waits for them on helper threads, changes the spawning thread's signal
//! mask around spawns and reads `/proc/thread-self/status`.
//!
//! * **Inputs after every start.** Each program's stdin is a pipe made large enough for its
//!   whole input (`F_SETPIPE_SZ`). All programs are spawned first, reading empty pipes; only
//!   then is each input written — one `write` that cannot block or stop halfway, since the
//!   pipe has room for all of it — and the pipe closed. So if istio-init is SIGKILLed before
//!   the writes, every restore reads an empty input and changes nothing; after a write, that
//!   restore has its complete input and commits every table on its own. Between two writes
//!   the families would be split: that is what holding them (next point) closes.
//! * **Held, then released together.** When two or more inputs go through pipes (the IPv4
//!   and IPv6 restores of a dual-stack run), those programs share one process group (the
//!   first spawned leads it, the others join it) and are held from their start until every
//!   one has its input:
//!   1. once all are spawned, one `killpg(SIGTSTP)` stops the group, and istio-init polls
//!      `waitid(WSTOPPED | WEXITED | WNOWAIT | WNOHANG)` (yielding, then sleeping a few
//!      microseconds) until each one has stopped, or exited;
//!   2. each input is written whole and its pipe closed, then `before_inputs` runs (the
//!      TPROXY routes, the log of what the rules do);
//!   3. one `killpg(SIGCONT)` releases them all: the single moment at which every family's
//!      input takes effect. When `before_inputs` failed, `killpg(SIGKILL)` instead: they die
//!      without acting on any input.
//!
//!   Why no SIGKILL of istio-init alone can split the families:
//!   - *Before step 1* the pipes are empty: istio-init's death closes them, every program
//!     reads EOF and changes nothing.
//!   - *Between `killpg(SIGTSTP)` and a program stopping*: no input has been written yet (the
//!     wait is what guarantees it: `kill` only makes SIGTSTP pending, and a program acts on it
//!     at its next return to user mode). If istio-init dies first, the program's group is
//!     orphaned by the time it handles SIGTSTP, and the kernel discards job-control stops in
//!     an orphaned group: it goes on, reads EOF and changes nothing. This is why SIGTSTP and
//!     not SIGSTOP, which would stop it for good with nobody left to continue it. (The kernel
//!     checks for orphaning and then stops the process without holding one lock across
//!     both; a death landing exactly in between, nanoseconds wide, leaves it stopped: see
//!     the hazard below for what that costs.)
//!   - *While they are stopped* (step 2, the hook included): a stopped process runs no user
//!     code, so none acts on its input. If istio-init dies now, its children are
//!     adopted by init or the container's first process, in another session, so their group
//!     becomes orphaned with stopped members, and the kernel sends it SIGHUP, then SIGCONT.
//!     SIGHUP is not blocked in them (they are spawned with it unblocked, see `guard.rs`) and
//!     its default action ends them before they return to user mode: netfilter untouched.
//!   - *After `killpg(SIGCONT)`*: SIGCONT's effect (clearing the stop, discarding pending
//!     stop signals) is applied by the sender to every member inside the one system call,
//!     and istio-init cannot die in the middle of a system call; once it returns, none is
//!     stopped, so orphaning sends nothing, and each has its whole input and completes.
//!
//!   Why wait for the stop rather than write right after `kill`: a program can consume its
//!   input only through `read`, whose return to user mode handles the pending stop first, so
//!   without the wait no input would be acted on before the release either — but istio-init
//!   dying while a stop is still only pending would be noticed by nobody: the kernel sends
//!   SIGHUP only to a group with members already stopped, so SIGTSTP would then be discarded
//!   (orphaned group) and the program would act on its input alone, or SIGSTOP would stop it
//!   for good. Waiting until every program has stopped closes both.
//!
//!   Before spawning them (one read of `/proc/thread-self/status`): a deferred signal
//!   already pending ends the run there, nothing started and nothing changed, as in the lock
//!   wait; and if istio-init ignores SIGHUP or SIGTSTP (inherited from its parent: an ignored
//!   disposition survives `exec`, so the programs would ignore it too), they cannot be held
//!   and are run as before, with a warning. Likewise when one has not stopped 100 ms after
//!   SIGTSTP: it blocks, ignores or handles SIGTSTP, or it is a script waiting in `vfork` for
//!   a child that SIGTSTP stopped before its `exec` (a parent cannot stop in that wait, and
//!   SIGSTOP would not help); iptables does none of these. The group is then continued at
//!   once, nothing having been written, and the inputs go out after the hook as for programs
//!   that are not held, with a warning. The cost: two `pthread_sigmask`, the `/proc` read,
//!   two `killpg` and one `waitid` per program (plus a yield or a short sleep when one has
//!   not stopped yet), and the programs load their libraries after the hook instead of
//!   during it. One program alone — a single-family run, every `*-save`, every rollback —
//!   pays none of it.
//!
//!   **Hazard: an adopter in istio-init's session.** The SIGHUP comes only if the group is
//!   orphaned, that is if the process that adopts the programs is in another session (or is
//!   the machine's init). When istio-init leads its session this always holds: a session
//!   holds only descendants of its leader, and the adopter is an ancestor. In Kubernetes
//!   istio-init is the first process of its container, which runc starts as a session leader
//!   (`setsid`), and without a shared PID namespace its death kills every process of the
//!   container anyway. Otherwise, an adopter in istio-init's session that outlives it — a
//!   shell running `istio-init …; other` as a container's PID 1, or a
//!   `PR_SET_CHILD_SUBREAPER` process — leaves the held programs stopped for good: netfilter
//!   untouched, but they keep the namespace lock's descriptor, so the next run waits for the
//!   lock and fails naming it (`fuser` finds them; `kill -CONT` or `kill` ends them). Nothing
//!   cheap tells in advance who the adopter will be (any ancestor may be a subreaper); a
//!   wrapper can start istio-init with `setsid` to rule it out.
//! * **Inputs too large for a pipe** (about 1 MiB: tens of thousands of rules) go into an
//!   anonymous in-memory file (`memfd_create`) before their program is spawned, complete, and
//!   such a program cannot be held (it may act on its input as soon as it runs). When any
//!   input is that large, nothing is held: `before_inputs` runs before the first spawn, and
//!   the moment that splits the families is between two spawns.
//! * **Output into files.** stdout and stderr are in-memory files, read after the program
//!   ended: nothing deadlocks on a full pipe however large the output, and a program killed
//!   at its deadline (or anything it started) cannot keep istio-init waiting for an EOF.
//!   Without `memfd_create` (an old kernel, a strict seccomp profile) an unlinked `O_TMPFILE`
//!   in `/dev/shm`, `/tmp` or `/run` does the same job.
//! * **Process groups.** Each program leads its own process group, or shares the one of the
//!   held programs — never istio-init's — so a signal sent to istio-init's group (a shell's
//!   Ctrl-C, `kill -- -PGID`) does not cut a transaction short, and a program istio-init dies
//!   without waiting for finishes its transaction. On a timeout the whole group is killed,
//!   including anything a wrapper script started — for held programs, every one of them still
//!   running: they are reported as killed with the program that reached its deadline, and the
//!   run fails and rolls back like any other failure.
//! * **Deadlines.** Each program is watched by a small helper thread blocked in
//!   `waitid(WNOWAIT)`, which reports the exit without reaping, so the process cannot be
//!   reaped and its PID reused before the deadline check decides whether to kill it. The
//!   caller waits on a channel with `recv_timeout` (woken the moment a program exits: no
//!   polling delay on the fast path) and kills a program at its deadline.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::bail;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sched::sched_yield;
use nix::sys::memfd::{MemFdCreateFlag, memfd_create};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::{Pid, pipe2};

use crate::sys::guard::{GateUnblocked, signal_state};

/// How long a killed program may take to disappear before it is given up on (a process in an
/// uninterruptible kernel wait cannot die at once).
const REAP_GRACE: Duration = Duration::from_secs(5);

/// How long programs get to stop on SIGTSTP before they are given up on holding (module doc).
/// A program stops within microseconds of running unless it blocks, ignores or handles
/// SIGTSTP, or waits in `vfork` for a child that stopped (iptables does none of these).
const STOP_PATIENCE: Duration = Duration::from_millis(100);

/// One program to run.
#[derive(Debug)]
pub struct Job {
    pub cmd: Command,
    /// The program as named in errors.
    pub program: String,
    /// Its stdin (`None`: `/dev/null`).
    pub input: Option<Vec<u8>>,
    /// Whether its stdout is kept (else `/dev/null`).
    pub stdout: bool,
    /// How long it may run.
    pub limit: Duration,
    /// The limit and what set it, for the error (e.g. `2s (--restore-timeout)`).
    pub limit_source: String,
}

/// How a program ended.
#[derive(Debug)]
pub struct Ended {
    /// `None` when it had to be given up on (killed, but never exited).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// Set when it was killed at its deadline: the limit and what set it (with `killed_with`:
    /// that program's limit).
    pub killed: Option<String>,
    /// Set when it was killed because another program of its process group reached its
    /// deadline: that program.
    pub killed_with: Option<String>,
}

impl Ended {
    /// Why the program did not end by itself, if it did not.
    pub fn abnormal(&self) -> Option<String> {
        let limit = self.killed.as_ref()?;
        let mut why = match &self.killed_with {
            None => format!("did not finish within {limit}; it was killed"),
            Some(other) => format!(
                "was killed with {other}, which shares its process group and did not finish \
                 within {limit}"
            ),
        };
        if self.status.is_none() {
            why.push_str(", but had not exited after a further ");
            why.push_str(&format!("{REAP_GRACE:?}"));
        }
        let said = self.stderr.trim();
        if !said.is_empty() {
            why.push_str(&format!("; its output so far: {}", said.replace('\n', " ")));
        }
        Some(why)
    }

    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn status_text(&self) -> String {
        self.status
            .map_or_else(|| "no exit status".to_owned(), |s| s.to_string())
    }
}

/// An anonymous file: `memfd_create`, else an unlinked `O_TMPFILE` in a writable tmpfs.
fn scratch_file(name: &CStr) -> std::io::Result<File> {
    match memfd_create(name, MemFdCreateFlag::MFD_CLOEXEC) {
        Ok(fd) => Ok(File::from(fd)),
        Err(e) => {
            for dir in ["/dev/shm", "/tmp", "/run"] {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_TMPFILE | nix::libc::O_CLOEXEC)
                    .open(dir);
                if let Ok(f) = f {
                    return Ok(f);
                }
            }
            Err(std::io::Error::other(format!(
                "memfd_create failed ({e}) and no unlinked temporary file could be created in \
                 /dev/shm, /tmp or /run"
            )))
        }
    }
}

fn read_all(mut f: File) -> String {
    let len = f.metadata().map_or(0, |m| m.len());
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    let _ = f
        .seek(SeekFrom::Start(0))
        .and_then(|_| f.read_to_end(&mut buf));
    String::from_utf8_lossy(&buf).into_owned()
}

/// A program's stdin before it is spawned.
enum Input {
    None,
    /// A pipe with room for all of `data`, written after every program started.
    Pipe {
        read: OwnedFd,
        write: File,
        data: Vec<u8>,
    },
    /// The whole input, already in an in-memory file.
    File(File),
}

/// The largest input sent through a pipe: the default `fs.pipe-max-size`, which a process
/// without `CAP_SYS_RESOURCE` (istio-init after dropping capabilities) cannot exceed.
pub const MAX_PIPE_INPUT: usize = 1 << 20;

/// A pipe that can take `len` bytes without blocking, if the kernel allows one.
fn roomy_pipe(len: usize) -> Option<(OwnedFd, OwnedFd)> {
    if len > MAX_PIPE_INPUT {
        return None;
    }
    let (read, write) = pipe2(OFlag::O_CLOEXEC).ok()?;
    let room = |fd: &OwnedFd| {
        fcntl(fd.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
    };
    if room(&write)? < len {
        let want = i32::try_from(len.next_power_of_two()).ok()?;
        fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(want)).ok()?;
        if room(&write)? < len {
            return None;
        }
    }
    Some((read, write))
}

fn prepare_input(input: Option<Vec<u8>>) -> Result<Input, String> {
    let Some(data) = input else {
        return Ok(Input::None);
    };
    if let Some((read, write)) = roomy_pipe(data.len()) {
        return Ok(Input::Pipe {
            read,
            write: File::from(write),
            data,
        });
    }
    let mut f = scratch_file(c"istio-init-stdin").map_err(|e| format!("cannot run it: {e}"))?;
    f.write_all(&data)
        .and_then(|()| f.seek(SeekFrom::Start(0)).map(|_| ()))
        .map_err(|e| format!("cannot run it: writing its input: {e}"))?;
    Ok(Input::File(f))
}

/// A started program.
struct Started {
    child: Child,
    pid: Pid,
    /// Its process group: its own, or the one the held programs share (module doc).
    pgid: Pid,
    /// As named in errors.
    program: String,
    /// Its input, still to be written.
    feed: Option<(File, Vec<u8>)>,
    stdout: Option<File>,
    stderr: File,
    deadline: Instant,
    limit_source: String,
    /// Reported exited by its watcher (not reaped yet).
    exited: bool,
    killed: bool,
    /// Killed with the group of this program, which reached its deadline.
    killed_with: Option<String>,
    /// Its watcher could not be started: waited for without a deadline.
    unwatched: bool,
}

/// A program ready to be spawned: its stdin and output files exist.
struct Prepared {
    job: Job,
    /// The input is already complete in a file (too large for a pipe).
    whole_file: bool,
    stdin: Stdio,
    feed: Option<(File, Vec<u8>)>,
    stdout: Option<File>,
    stderr: File,
}

fn prepare(mut job: Job) -> Result<Prepared, String> {
    let file = |what: &CStr| scratch_file(what).map_err(|e| format!("cannot run it: {e}"));
    let stdout = if job.stdout {
        Some(file(c"istio-init-stdout")?)
    } else {
        None
    };
    let input = prepare_input(job.input.take())?;
    let whole_file = matches!(input, Input::File(_));
    let (stdin, feed) = match input {
        Input::None => (Stdio::null(), None),
        Input::Pipe { read, write, data } => (Stdio::from(read), Some((write, data))),
        Input::File(f) => (Stdio::from(f), None),
    };
    Ok(Prepared {
        job,
        whole_file,
        stdin,
        feed,
        stdout,
        stderr: file(c"istio-init-stderr")?,
    })
}

/// Spawns a prepared program into process group `group` (0: a new group it leads).
fn start(p: Prepared, group: i32) -> Result<Started, String> {
    let Prepared {
        mut job,
        whole_file: _,
        stdin,
        feed,
        stdout,
        stderr,
    } = p;
    let clone = |f: &File| {
        f.try_clone()
            .map(Stdio::from)
            .map_err(|e| format!("cannot run it: {e}"))
    };
    log::debug!("running {:?}", job.cmd);
    let child = job
        .cmd
        .stdin(stdin)
        .stdout(match &stdout {
            Some(f) => clone(f)?,
            None => Stdio::null(),
        })
        .stderr(clone(&stderr)?)
        .process_group(group)
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(|e| e.to_string())?);
    Ok(Started {
        child,
        pid,
        pgid: if group == 0 {
            pid
        } else {
            Pid::from_raw(group)
        },
        program: std::mem::take(&mut job.program),
        feed,
        stdout,
        stderr,
        deadline: Instant::now() + job.limit,
        limit_source: std::mem::take(&mut job.limit_source),
        exited: false,
        killed: false,
        killed_with: None,
        unwatched: false,
    })
}

/// Writes every program's input (when `deliver`) and closes its pipe: the program reads its
/// whole input, or nothing, then EOF.
fn feed(started: &mut [Result<Started, String>], deliver: bool) {
    for s in started.iter_mut().flatten() {
        if let Some((mut pipe, data)) = s.feed.take() {
            if deliver {
                // A program that exits without reading closes its end: its error explains.
                let _ = pipe.write_all(&data);
            }
        }
    }
}

/// Whether the programs about to be spawned may be held back together (module doc). `Err`
/// when a deferred signal is already pending: then nothing is started, nothing was changed,
/// and the run ends with the signal as the lock wait does.
fn may_hold() -> anyhow::Result<bool> {
    let state = signal_state();
    if !state.pending.is_empty() {
        bail!(
            "received {} before the iptables programs were started; nothing was changed",
            state.pending.join(" and ")
        );
    }
    if !state.ignored.is_empty() {
        log::warn!(
            "{} {} ignored by this process (inherited from its parent, and so by the programs it \
             starts): the iptables programs cannot be held until every one has its input, so a \
             SIGKILL between two inputs can leave one family applied without the other (the next \
             run completes it)",
            state.ignored.join(" and "),
            if state.ignored.len() == 1 {
                "is"
            } else {
                "are"
            }
        );
        return Ok(false);
    }
    Ok(true)
}

/// Stops every program of group `pgid` (one `killpg`) and waits until each of `programs`
/// has stopped or exited (module doc: why waiting matters). `Err`: why they cannot be held.
fn hold<'a>(pgid: Pid, programs: impl Iterator<Item = (Pid, &'a str)>) -> Result<(), String> {
    killpg(pgid, Signal::SIGTSTP).map_err(|e| format!("SIGTSTP to group {pgid} failed: {e}"))?;
    let give_up = Instant::now() + STOP_PATIENCE;
    let mut pause = Duration::ZERO;
    let flags =
        WaitPidFlag::WSTOPPED | WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
    for (pid, program) in programs {
        loop {
            match waitid(Id::Pid(pid), flags) {
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
                // Stopped; or exited, and then it needs no holding.
                Ok(_) => break,
                Err(e) => return Err(format!("waiting for {program} to stop failed: {e}")),
            }
            if Instant::now() >= give_up {
                return Err(format!(
                    "{program} did not stop on SIGTSTP within {STOP_PATIENCE:?} (it blocks, \
                     ignores or handles it, or waits for a child that stopped)"
                ));
            }
            if pause.is_zero() {
                let _ = sched_yield();
            } else {
                std::thread::sleep(pause);
            }
            pause = (pause * 2).clamp(Duration::from_micros(20), Duration::from_millis(1));
        }
    }
    Ok(())
}

/// The gate (module doc): holds the programs of group `pgid`, hands each its whole input,
/// runs `before_inputs`, then releases them all with one `killpg(SIGCONT)` — or, when the
/// hook failed, kills them before any could act on its input. When they cannot be held,
/// they are continued at once and run like programs that are not held.
fn hold_and_release(
    pgid: Pid,
    started: &mut [Result<Started, String>],
    before_inputs: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let members = started
        .iter()
        .flatten()
        .filter(|s| s.pgid == pgid)
        .map(|s| (s.pid, s.program.as_str()));
    if let Err(why) = hold(pgid, members) {
        let _ = killpg(pgid, Signal::SIGCONT);
        log::warn!(
            "the iptables programs cannot be held until every one has its input: {why}; they \
             get their inputs one after the other, so a SIGKILL between two can leave one \
             family applied without the other (the next run completes it)"
        );
        let hook = before_inputs();
        feed(started, hook.is_ok());
        return hook;
    }
    feed(started, true);
    let hook = before_inputs();
    let release = if hook.is_ok() {
        Signal::SIGCONT
    } else {
        Signal::SIGKILL
    };
    if let Err(e) = killpg(pgid, release) {
        // Cannot happen to our own children; they would then be killed at their deadline.
        log::warn!("sending {release} to the iptables programs (group {pgid}) failed: {e}");
    }
    hook
}

/// Runs every job at once and returns how each ended, in order; a job that cannot be started
/// is an `Err` with the reason. `before_inputs` runs once every program has started and
/// before any can act on its input: held programs (module doc) have their inputs written and
/// are released after it, a lone piped program gets its input after it, and when an input
/// is too large for a pipe it runs before any program is started. If it fails, no program
/// acts on any input (held ones are killed, the others read nothing), so none changes
/// anything, and its error is returned once they have all ended. A deferred signal already
/// pending when programs are about to be held is an `Err` before anything is started.
pub fn run_all(
    jobs: Vec<Job>,
    before_inputs: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Result<Ended, String>>> {
    // Prepare and start everything, then hand every program its whole input (module doc).
    let prepared: Vec<Result<Prepared, String>> = jobs.into_iter().map(prepare).collect();
    let piped = !prepared.iter().flatten().any(|p| p.whole_file);
    if !piped {
        before_inputs()?;
    }
    // Two or more inputs through pipes: those programs are held back together (module doc).
    // One program alone (the fast path) costs no system call for it.
    let pipes = prepared
        .iter()
        .flatten()
        .filter(|p| p.feed.is_some())
        .count();
    let unblocked = if piped && pipes >= 2 && may_hold()? {
        GateUnblocked::enter()
            .map_err(|e| log::warn!("cannot unblock SIGHUP to start the iptables programs: {e}"))
            .ok()
    } else {
        None
    };
    let mut group: Option<Pid> = None;
    let mut started: Vec<Result<Started, String>> = Vec::with_capacity(prepared.len());
    for p in prepared {
        started.push(p.and_then(|p| {
            let held = unblocked.is_some() && p.feed.is_some();
            let s = start(
                p,
                if held {
                    group.map_or(0, Pid::as_raw)
                } else {
                    0
                },
            )?;
            if held && group.is_none() {
                group = Some(s.pgid);
            }
            Ok(s)
        }));
    }
    drop(unblocked);
    let hook = match group {
        Some(pgid) => hold_and_release(pgid, &mut started, before_inputs),
        None => {
            let hook = if piped { before_inputs() } else { Ok(()) };
            feed(&mut started, hook.is_ok());
            hook
        }
    };
    let (tx, rx) = mpsc::channel::<usize>();
    for (i, s) in started.iter_mut().enumerate() {
        let Ok(s) = s else { continue };
        let tx = tx.clone();
        let pid = s.pid;
        let watcher = std::thread::Builder::new()
            .name("istio-init-wait".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                while waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
                    == Err(nix::errno::Errno::EINTR)
                {}
                let _ = tx.send(i);
            });
        if watcher.is_err() {
            log::warn!("cannot start a thread to watch {pid}: waiting without a deadline");
            s.unwatched = true;
        }
    }
    drop(tx);

    loop {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for i in 0..started.len() {
            let Some(Ok(s)) = started.get_mut(i) else {
                continue;
            };
            if s.exited || s.unwatched {
                continue;
            }
            if s.deadline <= now {
                if s.killed {
                    // Killed and still there after the grace period: give up on it.
                    s.exited = true;
                    continue;
                }
                log::debug!("killing process group {} at its deadline", s.pgid);
                let _ = killpg(s.pgid, Signal::SIGKILL);
                s.killed = true;
                s.deadline = now + REAP_GRACE;
                let (pgid, program, limit) = (s.pgid, s.program.clone(), s.limit_source.clone());
                // The held programs share a group: the others still running died with it.
                for o in started.iter_mut().flatten() {
                    if o.pgid == pgid && !o.killed && !o.exited {
                        o.killed = true;
                        o.killed_with = Some(program.clone());
                        o.limit_source.clone_from(&limit);
                        o.deadline = now + REAP_GRACE;
                    }
                }
            }
            if let Some(Ok(s)) = started.get(i) {
                next = Some(next.map_or(s.deadline, |n| n.min(s.deadline)));
            }
        }
        let Some(next) = next else { break };
        match rx.recv_timeout(next.saturating_duration_since(now)) {
            Ok(i) => {
                if let Some(Ok(s)) = started.get_mut(i) {
                    s.exited = true;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }

    let ended = started
        .into_iter()
        .map(|s| {
            let mut s = s?;
            // Reaps it: it has exited (or, unwatched, is waited for here). A program given
            // up on after SIGKILL is left alone.
            let gave_up = s.killed && s.exited && s.child.try_wait().ok().flatten().is_none();
            let status = if gave_up {
                None
            } else {
                Some(s.child.wait().map_err(|e| format!("waiting for it: {e}"))?)
            };
            Ok(Ended {
                status,
                stdout: s.stdout.map(read_all).unwrap_or_default(),
                stderr: read_all(s.stderr),
                killed: s.killed.then_some(s.limit_source),
                killed_with: s.killed_with,
            })
        })
        .collect();
    hook.map(|()| ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn job(argv: &[&str], input: Option<Vec<u8>>, limit: Duration) -> Job {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]);
        Job {
            cmd,
            program: argv[0].to_owned(),
            input,
            stdout: true,
            limit,
            limit_source: format!("{limit:?} (test)"),
        }
    }

    const LONG: Duration = Duration::from_secs(30);

    #[test]
    fn inputs_of_any_size_arrive_whole_and_outputs_are_kept() {
        let small = b"hello\n".to_vec();
        // Larger than any pipe: goes through an in-memory file.
        let large: Vec<u8> = (0..3 * MAX_PIPE_INPUT)
            .map(|i| b"abcdefgh\n"[i % 9])
            .collect();
        let ended = run_all(
            vec![
                job(&["cat"], Some(small.clone()), LONG),
                job(&["cat"], Some(large.clone()), LONG),
                job(&["sh", "-c", "echo oops >&2; exit 3"], None, LONG),
                job(&["/nonexistent/program"], None, LONG),
            ],
            &mut || Ok(()),
        )
        .unwrap();
        let ok = |i: usize| ended[i].as_ref().unwrap();
        assert!(ok(0).success() && ok(0).stdout.as_bytes() == small.as_slice());
        assert!(ok(1).success() && ok(1).stdout.len() == large.len());
        assert!(ok(1).stdout.as_bytes() == large.as_slice());
        assert_eq!(ok(2).status.and_then(|s| s.code()), Some(3));
        assert_eq!(ok(2).stderr, "oops\n");
        assert!(ok(2).abnormal().is_none());
        let e = ended[3].as_ref().unwrap_err();
        assert!(e.starts_with("cannot run it: "), "{e}");
    }

    fn gone(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with(['Z', 'X'])),
        }
    }

    #[test]
    fn a_program_past_its_deadline_is_killed_with_everything_it_started() {
        let ended = run_all(
            vec![
                job(
                    &["sh", "-c", "sleep 100 & echo $!; echo started >&2; wait"],
                    None,
                    Duration::from_millis(300),
                ),
                job(&["true"], None, Duration::from_millis(300)),
            ],
            &mut || Ok(()),
        )
        .unwrap();
        let slow = ended[0].as_ref().unwrap();
        assert_eq!(slow.killed.as_deref(), Some("300ms (test)"));
        assert_eq!(slow.status.and_then(|s| s.signal()), Some(9));
        assert_eq!(
            slow.abnormal().as_deref(),
            Some("did not finish within 300ms (test); it was killed; its output so far: started")
        );
        // SIGKILL is delivered asynchronously: give the kernel a moment to finish the exit.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !gone(&slow.stdout) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(gone(&slow.stdout), "the sleep it started survived");
        let quick = ended[1].as_ref().unwrap();
        assert!(quick.success() && quick.killed.is_none());
    }

    /// Whether this test process was started with SIGHUP or SIGTSTP ignored: then its
    /// programs cannot be held (and are not).
    fn cannot_hold() -> bool {
        let ignored = signal_state().ignored;
        if !ignored.is_empty() {
            eprintln!("skipped: {ignored:?} ignored by the test process: nothing is held");
        }
        !ignored.is_empty()
    }

    #[test]
    fn piped_programs_share_one_process_group_and_each_gets_its_whole_input() {
        // Each prints its process group (field 5 of /proc/PID/stat) on stderr, then its input,
        // without starting another process.
        let script = "read -r _ _ _ _ group _ < /proc/$$/stat; echo $group >&2; exec cat";
        let inputs = [b"first\n".to_vec(), b"second\n".to_vec()];
        let ended = run_all(
            inputs
                .iter()
                .map(|i| job(&["sh", "-c", script], Some(i.clone()), LONG))
                .collect(),
            &mut || Ok(()),
        )
        .unwrap();
        let ended: Vec<&Ended> = ended.iter().map(|e| e.as_ref().unwrap()).collect();
        for (e, input) in ended.iter().zip(&inputs) {
            assert!(e.success(), "{e:?}");
            assert_eq!(e.stdout.as_bytes(), input.as_slice());
        }
        let ours = nix::unistd::getpgrp().to_string();
        let groups: Vec<&str> = ended.iter().map(|e| e.stderr.trim()).collect();
        assert!(
            groups.iter().all(|g| *g != ours),
            "{groups:?} vs ours {ours}"
        );
        if !cannot_hold() {
            assert_eq!(groups[0], groups[1], "not one group");
        }
    }

    #[test]
    fn held_programs_whose_hook_fails_are_killed_before_acting_on_their_input() {
        let dir = std::env::temp_dir().join(format!("ii-run-held-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = |i: usize| dir.join(format!("received{i}"));
        let jobs = (0..2)
            .map(|i| {
                let script = format!("exec cat > {}", out(i).display());
                job(&["sh", "-c", &script], Some(b"-A X\n".to_vec()), LONG)
            })
            .collect();
        let r = run_all(jobs, &mut || anyhow::bail!("no routes"));
        assert_eq!(format!("{:#}", r.unwrap_err()), "no routes");
        // Held, they had their input in their pipe; killed, they never wrote it out (the
        // shell may have created the file before it was stopped). Unheld, they read nothing.
        for i in 0..2 {
            let got = std::fs::read(out(i)).unwrap_or_default();
            assert_eq!(got, b"", "program {i} acted on its input");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_held_program_past_its_deadline_takes_its_group_with_it_and_says_so() {
        if cannot_hold() {
            return;
        }
        let script = "cat >/dev/null; exec sleep 100";
        let ended = run_all(
            vec![
                job(
                    &["sh", "-c", script],
                    Some(b"a\n".to_vec()),
                    Duration::from_millis(300),
                ),
                job(&["sh", "-c", script], Some(b"b\n".to_vec()), LONG),
            ],
            &mut || Ok(()),
        )
        .unwrap();
        let first = ended[0].as_ref().unwrap();
        assert_eq!(first.killed.as_deref(), Some("300ms (test)"));
        assert_eq!(
            first.abnormal().as_deref(),
            Some("did not finish within 300ms (test); it was killed")
        );
        let second = ended[1].as_ref().unwrap();
        assert_eq!(second.status.and_then(|s| s.signal()), Some(9));
        assert_eq!(
            second.abnormal().as_deref(),
            Some(
                "was killed with sh, which shares its process group and did not finish within \
                 300ms (test)"
            )
        );
    }

    #[test]
    fn scripts_that_fork_while_being_held_still_get_their_inputs_promptly() {
        // dash runs `cut` with vfork: stopped by SIGTSTP before it execs, it keeps its parent
        // from stopping; then the programs are not held, but they run at once all the same.
        let script = "cut -d' ' -f1 /proc/$$/stat >/dev/null; exec cat";
        let t = Instant::now();
        let ended = run_all(
            (0..2)
                .map(|i| job(&["sh", "-c", script], Some(vec![b'a' + i; 3]), LONG))
                .collect(),
            &mut || Ok(()),
        )
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        for (i, e) in ended.iter().enumerate() {
            let e = e.as_ref().unwrap();
            assert!(e.success(), "{e:?}");
            assert_eq!(e.stdout.as_bytes(), [b'a' + i as u8; 3]);
        }
    }

    #[test]
    fn a_program_that_does_not_stop_is_not_held_and_still_gets_its_input() {
        // A shell that ignores SIGTSTP once it is ready (a shell in `vfork` waiting for a
        // stopped child cannot stop either): holding it gives up after STOP_PATIENCE, and
        // the group is continued.
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TSTP; echo ready; exec cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut ready = [0u8; 6];
        out.read_exact(&mut ready).unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        let t = Instant::now();
        let e = hold(pid, [(pid, "sh")].into_iter()).unwrap_err();
        assert!(t.elapsed() >= STOP_PATIENCE);
        assert_eq!(
            e,
            "sh did not stop on SIGTSTP within 100ms (it blocks, ignores or handles it, or \
             waits for a child that stopped)"
        );
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn programs_that_cannot_be_held_are_continued_and_get_their_inputs_after_the_hook() {
        if cannot_hold() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("ii-run-nohold-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ready = dir.join("ready");
        // The first ignores SIGTSTP before the second is even spawned: it cannot be held.
        let first = format!("trap '' TSTP; touch {}; exec cat", ready.display());
        let p = prepare(job(&["sh", "-c", &first], Some(b"one".to_vec()), LONG)).unwrap();
        let a = start(p, 0).unwrap();
        let t = Instant::now();
        while !ready.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the first never got ready"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let p = prepare(job(&["cat"], Some(b"two".to_vec()), LONG)).unwrap();
        let b = start(p, a.pgid.as_raw()).unwrap();
        assert_eq!(b.pgid, a.pgid);
        let mut started = vec![Ok(a), Ok(b)];
        let mut calls = 0;
        let t = Instant::now();
        hold_and_release(started[0].as_ref().unwrap().pgid, &mut started, &mut || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert!(t.elapsed() >= STOP_PATIENCE);
        assert_eq!(calls, 1);
        // Continued (the second had stopped) and fed: both end with their input echoed.
        let outputs: Vec<String> = started
            .into_iter()
            .map(|s| {
                let mut s = s.unwrap();
                assert!(s.child.wait().unwrap().success());
                read_all(s.stdout.take().unwrap())
            })
            .collect();
        assert_eq!(outputs, ["one", "two"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failing_hook_hands_no_program_any_input() {
        let dir = std::env::temp_dir().join(format!("ii-run-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("received");
        let script = format!("cat > {}", out.display());
        let mut calls = 0;
        let r = run_all(
            vec![job(&["sh", "-c", &script], Some(b"-A X\n".to_vec()), LONG)],
            &mut || {
                calls += 1;
                anyhow::bail!("no routes")
            },
        );
        assert_eq!(format!("{:#}", r.unwrap_err()), "no routes");
        assert_eq!(calls, 1);
        // The program ran, read an empty input and ended before run_all returned.
        assert_eq!(std::fs::read(&out).unwrap(), b"");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
