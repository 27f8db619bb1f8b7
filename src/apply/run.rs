//! Running the iptables programs: several at once, each input delivered whole and only once
//! every program has started, each program bounded by a deadline after which it is killed.
//!
//! Effects: creates pipes and anonymous in-memory files, spawns processes, waits for them on
//! helper threads, kills them.
//!
//! * **Inputs after every start.** Each program's stdin is a pipe made large enough for its
//!   whole input (`F_SETPIPE_SZ`). All programs are spawned first, reading empty pipes; only
//!   then is each input written — one `write` that cannot block or stop halfway, since the
//!   pipe has room for all of it — and the pipe closed. So if istio-init is SIGKILLed before
//!   the writes, every restore reads an empty input and changes nothing; after a write, that
//!   restore has its complete input and commits every table on its own. The only moment
//!   that splits the families is between the IPv4 write and the IPv6 write: two system calls.
//!   An input larger than a pipe can hold (about 1 MiB: tens of thousands of rules) goes into
//!   an anonymous in-memory file (`memfd_create`) before its program is spawned instead:
//!   still complete, but then the split moment is one program spawn.
//! * **Output into files.** stdout and stderr are in-memory files, read after the program
//!   ended: nothing deadlocks on a full pipe however large the output, and a program killed
//!   at its deadline (or anything it started) cannot keep istio-init waiting for an EOF.
//!   Without `memfd_create` (an old kernel, a strict seccomp profile) an unlinked `O_TMPFILE`
//!   in `/dev/shm`, `/tmp` or `/run` does the same job.
//! * **Own process group.** Each program leads its own process group, so a signal sent to
//!   istio-init's group (a shell's Ctrl-C, `kill -- -PGID`) does not cut a transaction short,
//!   and a program istio-init dies without waiting for finishes its transaction; on a timeout
//!   the whole group is killed, including anything a wrapper script started.
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

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::memfd::{MemFdCreateFlag, memfd_create};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::{Pid, pipe2};

/// How long a killed program may take to disappear before it is given up on (a process in an
/// uninterruptible kernel wait cannot die at once).
const REAP_GRACE: Duration = Duration::from_secs(5);

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
    /// Set when it was killed at its deadline: the limit and what set it.
    pub killed: Option<String>,
}

impl Ended {
    /// Why the program did not end by itself, if it did not.
    pub fn abnormal(&self) -> Option<String> {
        let limit = self.killed.as_ref()?;
        let mut why = format!("did not finish within {limit}; it was killed");
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
    pgid: Pid,
    /// Its input, still to be written.
    feed: Option<(File, Vec<u8>)>,
    stdout: Option<File>,
    stderr: File,
    deadline: Instant,
    limit_source: String,
    /// Reported exited by its watcher (not reaped yet).
    exited: bool,
    killed: bool,
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

fn start(p: Prepared) -> Result<Started, String> {
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
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let pgid = Pid::from_raw(i32::try_from(child.id()).map_err(|e| e.to_string())?);
    Ok(Started {
        child,
        pgid,
        feed,
        stdout,
        stderr,
        deadline: Instant::now() + job.limit,
        limit_source: std::mem::take(&mut job.limit_source),
        exited: false,
        killed: false,
        unwatched: false,
    })
}

/// Runs every job at once and returns how each ended, in order; a job that cannot be started
/// is an `Err` with the reason. `before_inputs` runs once every program has started and
/// before any receives its input (or, when an input is too large for a pipe, before any is
/// started): if it fails, no program receives any input, so none changes anything, and its
/// error is returned once they have all ended.
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
    let mut started: Vec<Result<Started, String>> =
        prepared.into_iter().map(|p| p.and_then(start)).collect();
    let hook = if piped { before_inputs() } else { Ok(()) };
    for s in started.iter_mut().flatten() {
        if let Some((mut pipe, data)) = s.feed.take() {
            if hook.is_ok() {
                // A program that exits without reading closes its end: its error explains.
                let _ = pipe.write_all(&data);
            }
            // Closed here: the program reads its whole input, or nothing, then EOF.
        }
    }
    let (tx, rx) = mpsc::channel::<usize>();
    for (i, s) in started.iter_mut().enumerate() {
        let Ok(s) = s else { continue };
        let tx = tx.clone();
        let pid = s.pgid;
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
        let waiting = started
            .iter_mut()
            .filter_map(|s| s.as_mut().ok())
            .filter(|s| !s.exited && !s.unwatched);
        let mut next: Option<Instant> = None;
        for s in waiting {
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
            }
            next = Some(next.map_or(s.deadline, |n| n.min(s.deadline)));
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
