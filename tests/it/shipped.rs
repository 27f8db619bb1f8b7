//! The binary that ships, as a user meets it when something goes wrong.
//!
//! Three ways a run fails — a usage error, a bad value, and a failure while applying (no
//! `CAP_NET_ADMIN`/`CAP_NET_RAW`, as on a cluster that does not grant them) — each run in
//! hostile environments: backtrace and log variables set, odd locales, bytes that are not
//! UTF-8, an environment near `ARG_MAX`, closed or broken standard descriptors, and a root
//! without `/etc/resolv.conf`, read-only, or with `/proc` missing or unreadable. Every case
//! checks the exit code, the error line on stderr (where there is a stderr to read), and that
//! the pod's namespace is exactly as it was.
//!
//! The binaries: the static one that the image holds (`image/build.sh` builds it with the
//! release profile, as `scripts/build-static.sh` does), the test build, and the image itself
//! under podman. An earlier link flag of the static build made every error abort silently
//! (exit 134, nothing on stderr) under `RUST_BACKTRACE=1`; only the test build was tested then.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use istio_init::settings::cli::INJECTOR_DEFAULT_ARGS;

use crate::faults::pod;
use crate::image::{Caps, Run, image};
use crate::nft_mode::{NftState, nft_state};
use crate::util::{Netns, TempDir, bin, error_line, stderr};

/// A way to fail: the arguments, the exit code and the start of the error line.
#[derive(Debug)]
struct Failure {
    name: &'static str,
    args: Vec<String>,
    code: i32,
    line: &'static str,
    /// Run with NET_ADMIN and NET_RAW (root's full set); otherwise with none of them.
    caps: bool,
}

/// Usage and validation run with every capability, so that a run that did not stop at its
/// error would change the namespace; the apply failure runs without them.
fn failures() -> Vec<Failure> {
    // The injector's default arguments, verbatim.
    let injected = INJECTOR_DEFAULT_ARGS.iter().map(|s| (*s).to_owned());
    vec![
        Failure {
            name: "usage",
            args: vec!["--no-such-flag".into()],
            code: 2,
            line: "error: unexpected argument '--no-such-flag' found",
            caps: true,
        },
        Failure {
            name: "validation",
            args: injected
                .clone()
                .chain(["-p".into(), "abc".into()])
                .collect(),
            code: 2,
            line: "error: invalid port \"abc\" in --envoy-port (-p): not a number",
            caps: true,
        },
        Failure {
            name: "apply",
            args: injected.collect(),
            code: 1,
            line: "error: missing capabilities CAP_NET_ADMIN and CAP_NET_RAW: programming \
                   iptables needs CAP_NET_ADMIN and CAP_NET_RAW",
            caps: false,
        },
    ]
}

/// The standard descriptors istio-init starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fds {
    Open,
    StdinClosed,
    StdoutClosed,
    StderrClosed,
    AllClosed,
    /// stderr is a pipe whose read end is already closed.
    StderrReaderGone,
}

impl Fds {
    /// Whether stderr can be read back.
    fn stderr_readable(self) -> bool {
        !matches!(
            self,
            Fds::StderrClosed | Fds::AllClosed | Fds::StderrReaderGone
        )
    }

    /// The shell redirections that close descriptors on istio-init's `exec`.
    fn closing(self) -> &'static str {
        match self {
            Fds::StdinClosed => "<&-",
            Fds::StdoutClosed => ">&-",
            Fds::StderrClosed => "2>&-",
            Fds::AllClosed => "<&- >&- 2>&-",
            Fds::Open | Fds::StderrReaderGone => "",
        }
    }
}

/// The root istio-init sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    /// The machine's own.
    Host,
    /// A directory holding only the binary: no /etc (so no resolv.conf), no /proc.
    Empty,
    /// Read-only, with /etc (no resolv.conf) and /proc mounted.
    ReadOnly,
    /// /proc is an empty tmpfs: every file istio-init reads there is missing.
    ProcMissing,
    /// /proc is a tmpfs whose files are directories: every read fails (EISDIR).
    ProcUnreadable,
}

/// One hostile environment.
#[derive(Debug)]
struct Hostile {
    name: String,
    env: Vec<(OsString, OsString)>,
    fds: Fds,
    root: Root,
}

fn hostile(name: &str, env: &[(&[u8], &[u8])]) -> Hostile {
    let os = |b: &[u8]| OsStr::from_bytes(b).to_owned();
    Hostile {
        name: name.to_owned(),
        env: env.iter().map(|(k, v)| (os(k), os(v))).collect(),
        fds: Fds::Open,
        root: Root::Host,
    }
}

/// Variables that fill the environment to within 64 KiB of `ARG_MAX` (each under the
/// kernel's 128 KiB limit for one string, and podman's 64 KiB for a line of an env file).
fn near_arg_max() -> Vec<(OsString, OsString)> {
    let max = nix::unistd::sysconf(nix::unistd::SysconfVar::ARG_MAX)
        .ok()
        .flatten()
        .map_or(2 << 20, |m| usize::try_from(m).unwrap_or(2 << 20));
    let (one, mut left) = (60 * 1024, max.saturating_sub(64 * 1024));
    let mut v = Vec::new();
    while left > one {
        v.push((
            OsString::from(format!("FILL_{}", v.len())),
            OsString::from("x".repeat(one)),
        ));
        left -= one + 8;
    }
    v
}

/// Every hostile environment of the issue that asked for them.
fn environments() -> Vec<Hostile> {
    let mut v = vec![
        hostile("RUST_BACKTRACE=1", &[(b"RUST_BACKTRACE", b"1")]),
        hostile("RUST_BACKTRACE=full", &[(b"RUST_BACKTRACE", b"full")]),
        hostile("RUST_LIB_BACKTRACE=1", &[(b"RUST_LIB_BACKTRACE", b"1")]),
        hostile(
            "RUST_LOG garbage",
            &[(b"RUST_LOG", b"=,,::=x=y=z,[{]}\x7f,trace=nope,/regex(")],
        ),
        hostile(
            "LANG and LC_ALL odd",
            &[
                (b"LANG", b"xx_XX.NOPE@bogus"),
                (b"LC_ALL", b"tr_TR.ISO-8859-9"),
            ],
        ),
        hostile(
            "env not UTF-8",
            &[
                (b"JUNK", b"\xff\xfe\xc3"),
                (b"\xffNAME", b"1"),
                (b"LANG", b"\xff"),
            ],
        ),
    ];
    v.push(Hostile {
        env: near_arg_max(),
        ..hostile("environment near ARG_MAX", &[])
    });
    for fds in [
        Fds::StdinClosed,
        Fds::StdoutClosed,
        Fds::StderrClosed,
        Fds::AllClosed,
        Fds::StderrReaderGone,
    ] {
        v.push(Hostile {
            fds,
            ..hostile(&format!("{fds:?}"), &[(b"RUST_BACKTRACE", b"1")])
        });
    }
    for root in [
        Root::Empty,
        Root::ReadOnly,
        Root::ProcMissing,
        Root::ProcUnreadable,
    ] {
        v.push(Hostile {
            root,
            ..hostile(&format!("root {root:?}"), &[(b"RUST_BACKTRACE", b"1")])
        });
    }
    v
}

/// The shell script that runs istio-init (`$1`, then its arguments) inside the namespace:
/// capabilities dropped unless `caps`, the root prepared and entered, descriptors closed.
fn script(h: &Hostile, caps: bool, root: &Path) -> String {
    // A capability-less run keeps only CAP_SYS_CHROOT, for chroot itself; istio-init, started
    // by chroot as root, gets no more than the bounding set.
    let drop = if caps {
        ""
    } else {
        "setpriv --bounding-set=-all,+sys_chroot --inh-caps=-all -- "
    };
    let r = root.display();
    let prepare = match h.root {
        Root::Host => return format!("{drop}\"$@\" {}", h.fds.closing()),
        Root::Empty => String::new(),
        Root::ReadOnly => format!(
            "mkdir -p {r}/etc {r}/proc && mount --bind {r} {r} && \
             mount -o remount,bind,ro {r} && mount -t proc proc {r}/proc && "
        ),
        Root::ProcMissing => format!("mkdir -p {r}/proc && mount -t tmpfs none {r}/proc && "),
        Root::ProcUnreadable => format!(
            "mkdir -p {r}/proc && mount -t tmpfs none {r}/proc && \
             for f in self/status self/ns/net thread-self/status thread-self/net/if_inet6 \
             thread-self/net/ip_tables_names thread-self/net/ip6_tables_names sys/net; \
             do mkdir -p {r}/proc/$f; done && "
        ),
    };
    format!(
        "exec unshare --mount --propagation private -- sh -c '{prepare}\
         shift; \
         exec {drop}chroot {r} /istio-init \"$@\" {}' sh \"$@\"",
        h.fds.closing()
    )
}

/// Runs `binary` with `f`'s arguments in `ns` under `h`.
fn run(ns: &Netns, binary: &Path, h: &Hostile, f: &Failure) -> Output {
    let root = TempDir::new("root");
    if h.root != Root::Host {
        std::fs::copy(binary, root.path().join("istio-init")).expect("copying the binary");
    }
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg(script(h, f.caps, root.path()))
        .arg("sh")
        .arg(binary)
        .args(&f.args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(h.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if h.fds == Fds::StderrReaderGone {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        drop(read);
        c.stderr(Stdio::from(write));
    }
    c.output().expect("running istio-init")
}

/// What istio-init could change: the nf_tables ruleset with the routing state, and the
/// legacy tables.
fn state(ns: &Netns) -> (NftState, Vec<String>) {
    (nft_state(ns), ns.istio_anywhere())
}

/// Runs every failure of every environment with `binary` (those with a root of their own
/// only if `roots`: a dynamic binary cannot run in them); returns one line per mismatch.
fn check_binary(label: &str, binary: &Path, roots: bool) -> Vec<String> {
    let mut bad = Vec::new();
    for h in environments()
        .into_iter()
        .filter(|h| roots || h.root == Root::Host)
    {
        let ns = pod("hostile");
        let before = state(&ns);
        for f in failures() {
            let o = run(&ns, binary, &h, &f);
            let case = format!("{label}, {}, {}", h.name, f.name);
            // The record of what was tried (`--nocapture` shows it).
            eprintln!("{case}: exit {:?}, {:?}", o.status.code(), error_line(&o));
            if o.status.code() != Some(f.code) {
                bad.push(format!(
                    "{case}: exit {:?}, want {}; stderr: {}",
                    o.status,
                    f.code,
                    stderr(&o)
                ));
            } else if h.fds.stderr_readable() && !error_line(&o).starts_with(f.line) {
                bad.push(format!(
                    "{case}: stderr {:?}, want {:?}",
                    stderr(&o),
                    f.line
                ));
            }
            if state(&ns) != before {
                bad.push(format!("{case}: the namespace changed"));
            }
        }
    }
    bad
}

fn shipped_binary(test: &str) -> Option<PathBuf> {
    Some(image(test)?.binary.clone())
}

#[test]
fn errors_survive_hostile_environments_in_the_shipped_static_binary() {
    let Some(binary) = shipped_binary("errors_survive_hostile_environments_in_the_shipped") else {
        return;
    };
    let bad = check_binary("static", &binary, true);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn errors_survive_hostile_environments_in_the_test_build() {
    if !crate::util::privileged("errors_survive_hostile_environments_in_the_test_build") {
        return;
    }
    let bad = check_binary("test build", Path::new(bin()), false);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The image under podman (read-only root, as in the tests of `image.rs`), with the
/// environments a pod spec can set: each as an `--env-file` (the one near `ARG_MAX` would not
/// fit on podman's own command line), and once more without a resolv.conf (`--dns=none`).
#[test]
fn errors_survive_hostile_environments_in_the_image() {
    let Some(img) = image("errors_survive_hostile_environments_in_the_image") else {
        return;
    };
    let tmp = TempDir::new("envfile");
    let podman_can_carry = |h: &Hostile| {
        h.fds == Fds::Open
            && h.root == Root::Host
            && h.env
                .iter()
                .all(|(k, v)| k.to_str().is_some() && v.to_str().is_some())
    };
    let mut bad = Vec::new();
    for h in environments().into_iter().filter(podman_can_carry) {
        let mut env_file = String::new();
        for (k, v) in &h.env {
            env_file.push_str(&format!(
                "{}={}\n",
                k.to_string_lossy(),
                v.to_string_lossy()
            ));
        }
        let env_file = tmp.file("env", env_file);
        for dns in [None, Some("--dns=none")] {
            let ns = pod("hostimg");
            let before = state(&ns);
            for f in failures() {
                let caps = if f.caps {
                    Caps::NetAdminRaw
                } else {
                    Caps::None
                };
                // The image's entrypoint is istio-init: the arguments follow the image name.
                let args: Vec<&str> = f.args.iter().map(String::as_str).collect();
                let mut r = Run::new(caps, Some(&ns), &args);
                r.opts = vec![format!("--env-file={}", env_file.display())];
                r.opts.extend(dns.map(str::to_owned));
                let o = img.run(&r);
                let case = format!("image, {}, {dns:?}, {}", h.name, f.name);
                if o.status.code() != Some(f.code) || !error_line(&o).starts_with(f.line) {
                    bad.push(format!(
                        "{case}: exit {:?} (want {}), stderr {:?} (want {:?})",
                        o.status,
                        f.code,
                        stderr(&o),
                        f.line
                    ));
                }
                if state(&ns) != before {
                    bad.push(format!("{case}: the namespace changed"));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// A panic is a bug, but it still says where it happened: `ISTIO_INIT_TEST_PANIC` makes
/// `main` panic with its value; the hook prints one line with the location and the message,
/// then the process aborts (SIGABRT, which shells and Kubernetes show as 134).
#[test]
fn a_panic_prints_its_location_and_message_then_aborts() {
    use std::os::unix::process::ExitStatusExt;
    let Some(shipped) = shipped_binary("a_panic_prints_its_location_and_message_then_aborts")
    else {
        return;
    };
    for binary in [shipped.as_path(), Path::new(bin())] {
        for backtrace in ["0", "1", "full"] {
            let o = Command::new(binary)
                .arg("--dry-run")
                .env_clear()
                .env("RUST_BACKTRACE", backtrace)
                .env("ISTIO_INIT_TEST_PANIC", "provoked by the test")
                .output()
                .expect("running istio-init");
            let case = format!("{}, RUST_BACKTRACE={backtrace}", binary.display());
            assert_eq!(o.status.signal(), Some(6), "{case}: {:?}", o.status);
            let first = stderr(&o).lines().next().unwrap_or_default().to_owned();
            assert!(
                first.starts_with("error: istio-init panicked at src/main.rs:")
                    && first.contains(": provoked by the test (a bug: please report it"),
                "{case}: {first:?}"
            );
        }
    }
}

/// Bytes that are not UTF-8 in an argument or in one of istio-init's own variables are input
/// errors that name the flag or the variable (exit 2), in the shipped binary and the test build.
#[test]
fn arguments_and_variables_that_are_not_utf8_are_named() {
    let Some(shipped) = shipped_binary("arguments_and_variables_that_are_not_utf8_are_named")
    else {
        return;
    };
    let bad = OsStr::from_bytes(b"15\xff01");
    for binary in [shipped.as_path(), Path::new(bin())] {
        let o = Command::new(binary)
            .args(["istio-iptables", "--dry-run", "-p"])
            .arg(bad)
            .env_clear()
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("running istio-init");
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert_eq!(
            error_line(&o),
            "error: invalid value \"15\u{fffd}01\" in --envoy-port (-p): not valid UTF-8 \
             (byte 0xff at offset 2)"
        );
        let o = Command::new(binary)
            .args(["istio-iptables", "--dry-run"])
            .env_clear()
            .env("RUST_BACKTRACE", "1")
            .env("ISTIO_LOCAL_EXCLUDE_PORTS", bad)
            .output()
            .expect("running istio-init");
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert_eq!(
            error_line(&o),
            "error: invalid value \"15\u{fffd}01\" in env ISTIO_LOCAL_EXCLUDE_PORTS: not valid \
             UTF-8 (byte 0xff at offset 2)"
        );
    }
}
