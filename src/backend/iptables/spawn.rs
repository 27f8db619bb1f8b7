//! Running the iptables programs: several at once, each input delivered whole and only once
//! every program has started, several programs held back and released together, each program
//! bounded by a deadline after which it is killed.
//!
//! Effects: creates pipes and anonymous in-memory files, spawns processes, stops, continues
//! and kills them, waits for them on helper threads, changes the spawning thread's signal
//! mask around spawns and reads `/proc/thread-self/status`.
//!
//! Design: `docs/design.md`, "Running the iptables programs: held restores and SIGKILL".

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

/// Why a program could not be run, or waited for (`cannot run it: …`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotRun(pub String);

impl std::fmt::Display for NotRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotRun {}

/// Why programs could not be held (they then run unheld, with a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
struct NotHeld(String);

impl std::fmt::Display for NotHeld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

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

fn prepare_input(input: Option<Vec<u8>>) -> Result<Input, NotRun> {
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
    let mut f =
        scratch_file(c"istio-init-stdin").map_err(|e| NotRun(format!("cannot run it: {e}")))?;
    f.write_all(&data)
        .and_then(|()| f.seek(SeekFrom::Start(0)).map(|_| ()))
        .map_err(|e| NotRun(format!("cannot run it: writing its input: {e}")))?;
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

fn prepare(mut job: Job) -> Result<Prepared, NotRun> {
    let file = |what: &CStr| scratch_file(what).map_err(|e| NotRun(format!("cannot run it: {e}")));
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
fn start(p: Prepared, group: i32) -> Result<Started, NotRun> {
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
            .map_err(|e| NotRun(format!("cannot run it: {e}")))
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
        .map_err(|e| NotRun(format!("cannot run it: {e}")))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(|e| NotRun(e.to_string()))?);
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
fn feed(started: &mut [Result<Started, NotRun>], deliver: bool) {
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
fn hold<'a>(pgid: Pid, programs: impl Iterator<Item = (Pid, &'a str)>) -> Result<(), NotHeld> {
    killpg(pgid, Signal::SIGTSTP)
        .map_err(|e| NotHeld(format!("SIGTSTP to group {pgid} failed: {e}")))?;
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
                Err(e) => {
                    return Err(NotHeld(format!(
                        "waiting for {program} to stop failed: {e}"
                    )));
                }
            }
            if Instant::now() >= give_up {
                return Err(NotHeld(format!(
                    "{program} did not stop on SIGTSTP within {STOP_PATIENCE:?} (it blocks, \
                     ignores or handles it, or waits for a child that stopped)"
                )));
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

/// Programs started by [`start_all`], none of them acting on its input yet (module doc: the
/// gate). [`Gate::release`] lets them act and waits for them; dropped unreleased, they act on
/// nothing: held ones are killed, the others read an empty input, and all are waited for.
pub struct Gate {
    stage: Option<Stage>,
}

enum Stage {
    /// An input too large for a pipe: nothing is started before the release.
    Prepared(Vec<Result<Prepared, NotRun>>),
    /// Started; `held` is the group of the programs held back with their inputs written.
    Started {
        started: Vec<Result<Started, NotRun>>,
        held: Option<Pid>,
    },
}

/// Starts every job (each with its input ready, none acting on it): see [`Gate`]. A job that
/// cannot be started is an `Err` with the reason in the results of [`Gate::release`]. A
/// deferred signal already pending when programs are about to be held is an `Err` before
/// anything is started.
pub fn start_all(jobs: Vec<Job>) -> anyhow::Result<Gate> {
    let prepared: Vec<Result<Prepared, NotRun>> = jobs.into_iter().map(prepare).collect();
    if prepared.iter().flatten().any(|p| p.whole_file) {
        return Ok(Gate {
            stage: Some(Stage::Prepared(prepared)),
        });
    }
    // Two or more inputs through pipes: those programs are held back together (module doc).
    // One program alone (the fast path) costs no system call for it.
    let pipes = prepared
        .iter()
        .flatten()
        .filter(|p| p.feed.is_some())
        .count();
    let unblocked = if pipes >= 2 && may_hold()? {
        GateUnblocked::enter()
            .map_err(|e| log::warn!("cannot unblock SIGHUP to start the iptables programs: {e}"))
            .ok()
    } else {
        None
    };
    let mut group: Option<Pid> = None;
    let mut started: Vec<Result<Started, NotRun>> = Vec::with_capacity(prepared.len());
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
    let held = group.filter(|&pgid| hold_all(pgid, &mut started));
    Ok(Gate {
        stage: Some(Stage::Started { started, held }),
    })
}

/// Runs every job at once and returns how each ended, in order ([`start_all`], then
/// [`Gate::release`]).
pub fn run_all(jobs: Vec<Job>) -> anyhow::Result<Vec<Result<Ended, NotRun>>> {
    Ok(start_all(jobs)?.release())
}

/// Holds the programs of group `pgid` and hands each its whole input. Returns whether they
/// are held; when they cannot be, they are continued at once, still without their inputs.
fn hold_all(pgid: Pid, started: &mut [Result<Started, NotRun>]) -> bool {
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
        return false;
    }
    feed(started, true);
    true
}

impl Gate {
    /// Lets every program act on its input (held ones are continued together with one
    /// `killpg(SIGCONT)`, the others get their inputs now) and returns how each ended.
    pub fn release(mut self) -> Vec<Result<Ended, NotRun>> {
        self.finish(true)
    }

    /// Releases the programs (`deliver`), or makes sure none acts on its input; then waits.
    fn finish(&mut self, deliver: bool) -> Vec<Result<Ended, NotRun>> {
        let (mut started, held) = match self.stage.take() {
            None => return Vec::new(),
            Some(Stage::Prepared(_)) if !deliver => return Vec::new(),
            Some(Stage::Prepared(prepared)) => {
                let started = prepared.into_iter().map(|p| start(p?, 0)).collect();
                (started, None)
            }
            Some(Stage::Started { started, held }) => (started, held),
        };
        if let Some(pgid) = held {
            let signal = if deliver {
                Signal::SIGCONT
            } else {
                Signal::SIGKILL
            };
            if let Err(e) = killpg(pgid, signal) {
                // Cannot happen to our own children; they would then be killed at their deadline.
                log::warn!("sending {signal} to the iptables programs (group {pgid}) failed: {e}");
            }
        }
        feed(&mut started, deliver);
        wait_all(started)
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// Waits for every started program, killing each (with its group) at its deadline, and
/// reaps them.
fn wait_all(mut started: Vec<Result<Started, NotRun>>) -> Vec<Result<Ended, NotRun>> {
    let exits = watch(&mut started);
    enforce_deadlines(&mut started, &exits);
    reap(started)
}

/// Starts a thread per program that reports its index once it has exited (without reaping
/// it). A program whose watcher cannot start is marked unwatched: waited for without a
/// deadline.
fn watch(started: &mut [Result<Started, NotRun>]) -> mpsc::Receiver<usize> {
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
    rx
}

/// Until every program has exited: kills each program's group at its deadline (the held
/// programs share one, so those still running die with it and are told so), and gives up on
/// a killed program still there after [`REAP_GRACE`].
fn enforce_deadlines(started: &mut [Result<Started, NotRun>], exits: &mpsc::Receiver<usize>) {
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
        match exits.recv_timeout(next.saturating_duration_since(now)) {
            Ok(i) => {
                if let Some(Ok(s)) = started.get_mut(i) {
                    s.exited = true;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
}

/// Reaps every program (one given up on after SIGKILL is left alone) and collects how each
/// ended.
fn reap(started: Vec<Result<Started, NotRun>>) -> Vec<Result<Ended, NotRun>> {
    started
        .into_iter()
        .map(|s| {
            let mut s = s?;
            // Reaps it: it has exited (or, unwatched, is waited for here). A program given
            // up on after SIGKILL is left alone.
            let gave_up = s.killed && s.exited && s.child.try_wait().ok().flatten().is_none();
            let status = if gave_up {
                None
            } else {
                Some(
                    s.child
                        .wait()
                        .map_err(|e| NotRun(format!("waiting for it: {e}")))?,
                )
            };
            Ok(Ended {
                status,
                stdout: s.stdout.map(read_all).unwrap_or_default(),
                stderr: read_all(s.stderr),
                killed: s.killed.then_some(s.limit_source),
                killed_with: s.killed_with,
            })
        })
        .collect()
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
        let ended = run_all(vec![
            job(&["cat"], Some(small.clone()), LONG),
            job(&["cat"], Some(large.clone()), LONG),
            job(&["sh", "-c", "echo oops >&2; exit 3"], None, LONG),
            job(&["/nonexistent/program"], None, LONG),
        ])
        .unwrap();
        let ok = |i: usize| ended[i].as_ref().unwrap();
        assert!(ok(0).success() && ok(0).stdout.as_bytes() == small.as_slice());
        assert!(ok(1).success() && ok(1).stdout.len() == large.len());
        assert!(ok(1).stdout.as_bytes() == large.as_slice());
        assert_eq!(ok(2).status.and_then(|s| s.code()), Some(3));
        assert_eq!(ok(2).stderr, "oops\n");
        assert!(ok(2).abnormal().is_none());
        let e = ended[3].as_ref().unwrap_err();
        assert!(e.0.starts_with("cannot run it: "), "{e}");
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
        let ended = run_all(vec![
            job(
                &["sh", "-c", "sleep 100 & echo $!; echo started >&2; wait"],
                None,
                Duration::from_millis(300),
            ),
            job(&["true"], None, Duration::from_millis(300)),
        ])
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
    fn held_programs_never_released_are_killed_before_acting_on_their_input() {
        let dir = std::env::temp_dir().join(format!("ii-run-held-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = |i: usize| dir.join(format!("received{i}"));
        let jobs = (0..2)
            .map(|i| {
                let script = format!("exec cat > {}", out(i).display());
                job(&["sh", "-c", &script], Some(b"-A X\n".to_vec()), LONG)
            })
            .collect();
        // Dropped unreleased (the routes before the release failed, say).
        drop(start_all(jobs).unwrap());
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
        let ended = run_all(vec![
            job(
                &["sh", "-c", script],
                Some(b"a\n".to_vec()),
                Duration::from_millis(300),
            ),
            job(&["sh", "-c", script], Some(b"b\n".to_vec()), LONG),
        ])
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
            e.to_string(),
            "sh did not stop on SIGTSTP within 100ms (it blocks, ignores or handles it, or \
             waits for a child that stopped)"
        );
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn programs_that_cannot_be_held_are_continued_and_get_their_inputs_at_the_release() {
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
        let t = Instant::now();
        let held = hold_all(started[0].as_ref().unwrap().pgid, &mut started);
        assert!(t.elapsed() >= STOP_PATIENCE);
        assert!(!held);
        feed(&mut started, true);
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
    fn a_gate_dropped_unreleased_hands_no_program_any_input() {
        let dir = std::env::temp_dir().join(format!("ii-run-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("received");
        let script = format!("cat > {}", out.display());
        let gate = start_all(vec![job(
            &["sh", "-c", &script],
            Some(b"-A X\n".to_vec()),
            LONG,
        )])
        .unwrap();
        drop(gate);
        // The program ran, read an empty input and ended before the drop returned.
        assert_eq!(std::fs::read(&out).unwrap(), b"");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
