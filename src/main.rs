//! The `istio-init` binary: parse the command line, run, map the outcome to an exit code.
//!
//! Start-up is part of every pod start, so `main` is the C entry point glibc calls rather
//! than std's runtime start. That start reads `/proc/self/maps` to find the main thread's
//! stack and maps an alternate signal stack for a stack-overflow message (about 0.07 ms, a
//! fifteenth of a whole run in nftables mode; docs/performance.md); the two things it does
//! that matter here are done below: `SIGPIPE` is ignored (a write to a pipe whose reader is
//! gone, such as a restore's stdin or a closed log pipe, fails with `EPIPE` instead of ending
//! the run), and closed standard descriptors are pointed at `/dev/null`. Without the rest, a
//! stack overflow is a plain `SIGSEGV`. Programs istio-init starts get `SIGPIPE` back at its
//! default, as before: std's `Command` resets it in the child unless the runtime start was
//! told to keep it. `std::env::args` works as usual (std reads argv from glibc's init hook),
//! and stdout is flushed before returning (a failed write or flush exits 1, not 0).
#![no_main]

use std::ffi::{c_char, c_int};
use std::io::Write;
use std::os::fd::{AsFd, IntoRawFd};

use istio_init::settings::cli;
use istio_init::{Env, exit};

/// The C `main`. The arguments are read through `std::env::args_os`, not these pointers.
// `no_mangle` counts as unsafe code: it names this function `main` for glibc's start-up.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    ignore_sigpipe();
    standard_descriptors();
    report_panics();
    let mut code = istio_init_main();
    // Output that could not be written fails the run (never exit 0 with it lost).
    if let Err(e) = std::io::stdout().flush() {
        report(&format_args!("writing to stdout: {e}"));
        code = code.max(exit::FAILURE);
    }
    c_int::from(code)
}

/// The error line. `eprintln!` would panic when stderr is gone (a closed pipe: `EPIPE`), and
/// the panic would turn exit code 2 into an abort; the exit code is all that is left to say
/// it then, so a failed write is ignored.
fn report(error: &dyn std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "error: {error}");
}

/// A panic is a bug; it must still say what happened. The hook writes one line, `error:
/// istio-init panicked at FILE:LINE:COLUMN: MESSAGE`, to stderr (no backtrace: the binary is
/// stripped, so its frames have no names), and the process then aborts (`panic = "abort"`):
/// it ends on `SIGABRT`, which shells and Kubernetes report as exit code 134 (README, Exit
/// codes). An abort runs no more of istio-init, and every apply path leaves the namespace as it
/// was when the process dies at any point. `ISTIO_INIT_TEST_PANIC` set to a message panics
/// with it here, so that the tests can check the shipped binary's panic path.
fn report_panics() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        // A failed write has nowhere to be reported; the abort still ends the run.
        let _ = writeln!(
            std::io::stderr(),
            "error: istio-init panicked{at}: {message} (a bug: please report it with the \
             command line and this message)"
        );
    }));
    if let Some(message) = std::env::var_os("ISTIO_INIT_TEST_PANIC") {
        panic!("{}", message.to_string_lossy());
    }
}

/// `SIGPIPE` ignored, as std's runtime start does.
#[allow(unsafe_code)]
fn ignore_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: `SIG_IGN` installs no handler, so no code of ours can run in signal context
    // (what makes `signal` unsafe); nothing else in the process has installed one yet.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
}

/// A closed standard descriptor would be taken by the next file or socket opened (a log
/// line could then land in a netlink socket): each closed one is pointed at `/dev/null`, as
/// std's runtime start does. One `poll` when all three are open, which they are in a pod.
fn standard_descriptors() {
    use nix::fcntl::FdFlag;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let mut fds = [
        PollFd::new(stdin.as_fd(), PollFlags::empty()),
        PollFd::new(stdout.as_fd(), PollFlags::empty()),
        PollFd::new(stderr.as_fd(), PollFlags::empty()),
    ];
    if poll(&mut fds, PollTimeout::ZERO).is_err() {
        return;
    }
    for fd in &fds {
        if fd
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLNVAL))
        {
            // The lowest free descriptor is the closed one (they are checked in order).
            // Without close-on-exec (std opens with it), so that a program istio-init
            // starts or becomes inherits it as its own standard descriptor.
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                let fd = null.into_raw_fd();
                let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(FdFlag::empty()));
            }
        }
    }
}

fn istio_init_main() -> u8 {
    let inv = match cli::parse(std::env::args_os()) {
        Ok(inv) => inv,
        Err(e) => {
            // Help and version go to stdout with exit 0; usage errors to stderr with exit 2.
            let printed = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else if let Err(err) = printed {
                report(&format_args!("writing to stdout: {err}"));
                exit::FAILURE
            } else {
                exit::SUCCESS
            };
        }
    };
    if let Err(e) = istio_init::settings::config::check_env_encoding(&|name| std::env::var_os(name))
    {
        report(&e);
        return exit::USAGE;
    }
    let var = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    match istio_init::run(&inv, &Env { var: &var }) {
        Ok(()) => exit::SUCCESS,
        Err(err) => {
            report(&format_args!("{err:#}"));
            exit::code_for(&err)
        }
    }
}
