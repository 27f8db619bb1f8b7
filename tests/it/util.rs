//! Shared helpers for the integration tests: running the binary, and throw-away network
//! namespaces that are always deleted (RAII), even when a test fails.
//!
//! Privileged tests call [`privileged`] first: when namespaces cannot be created it prints
//! `skipped: <reason>` and returns `None`, except under `CI=true` (or
//! `REQUIRE_PRIVILEGED_TESTS=1`) where it panics, so a CI run can never skip them silently.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_istio-init")
}

/// The binary with a clean environment (only PATH kept), ready for args.
pub fn istio_init() -> Command {
    let mut c = Command::new(bin());
    c.env_clear();
    c.env("PATH", std::env::var_os("PATH").unwrap_or_default());
    c
}

/// Runs a command and returns its output (stdin closed).
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The shared conformance directory (`../shared/conformance` beside the repo), if present.
/// Under `CI=true` its absence is a failure.
pub fn shared_conformance() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance");
    if dir.join("cases.json").is_file() {
        return Some(dir);
    }
    let msg = format!("{} not found", dir.display());
    if in_ci() {
        panic!("{msg}: CI requires the shared conformance data");
    }
    eprintln!("skipped: {msg}");
    None
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("REQUIRE_PRIVILEGED_TESTS").is_ok_and(|v| v == "1")
}

/// Whether privileged (namespace) tests can run here. Prints `skipped: …` and returns false
/// when they cannot; panics instead under CI.
pub fn privileged(test: &str) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("not running as root".to_owned())
    } else if which("ip").is_none() {
        Some("the `ip` command (iproute2) is missing".to_owned())
    } else if which("iptables-restore").is_none() {
        Some("iptables is not installed".to_owned())
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) if in_ci() => panic!("{test}: privileged test cannot run: {r}"),
        Some(r) => {
            eprintln!("skipped: {test}: privileged test cannot run: {r}");
            false
        }
    }
}

/// Finds a program on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace created with `ip netns add` and deleted on drop. Its loopback is up.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a fresh namespace named `ii-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let mut tag: String = tag.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        tag.truncate(12);
        let name = format!("ii-{tag}-{}-{n}", std::process::id());
        let o = output(Command::new("ip").args(["netns", "add", &name]));
        assert!(o.status.success(), "ip netns add {name}: {}", stderr(&o));
        let ns = Netns { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `/var/run/netns/<name>`: a path istio-init can enter.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// A command that runs inside the namespace (`ip netns exec`, which also bind-mounts
    /// `/etc/netns/<name>/*` over `/etc`).
    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    /// Runs a command in the namespace and returns its output.
    pub fn run(&self, argv: &[&str]) -> Output {
        output(&mut self.cmd(argv))
    }

    /// Runs a command in the namespace, panicking with its stderr on failure; returns stdout.
    pub fn ok(&self, argv: &[&str]) -> String {
        let o = self.run(argv);
        assert!(
            o.status.success(),
            "{argv:?} in {}: {}{}",
            self.name,
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }

    /// Feeds `input` to a command's stdin inside the namespace.
    pub fn run_with_input(&self, argv: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {argv:?}: {e}"));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing stdin");
        child.wait_with_output().expect("waiting")
    }

    /// A file under `/etc/netns/<name>/` that `ip netns exec` shows as `/etc/<file>`.
    pub fn etc_file(&self, file: &str, contents: &str) {
        let dir = PathBuf::from("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).expect("creating /etc/netns dir");
        std::fs::write(dir.join(file), contents).expect("writing netns etc file");
    }

    /// `iptables-save` (or `ip6tables-save`) output of one backend without comments and
    /// counters: `*table`, `:CHAIN` declarations and rules.
    pub fn save(&self, program: &str) -> String {
        let out = self.ok(&[program]);
        out.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                // ":CHAIN POLICY [pkts:bytes]" -> ":CHAIN POLICY"
                if l.starts_with(':') {
                    l.rsplit_once(' ').map_or(l, |(a, _)| a).to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.name));
    }
}

/// A veth pair between two namespaces with addresses on both ends (prefix lengths included,
/// e.g. `198.18.0.1/24`). Both links are up. Deleted with the namespaces.
pub fn veth(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str]) {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let (ia, ib) = (format!("va{n}"), format!("vb{n}"));
    let o = output(Command::new("ip").args([
        "link", "add", &ia, "netns", &a.name, "type", "veth", "peer", "name", &ib, "netns", &b.name,
    ]));
    assert!(o.status.success(), "creating veth: {}", stderr(&o));
    for (ns, dev, addrs) in [(a, &ia, a_addrs), (b, &ib, b_addrs)] {
        for addr in addrs {
            let mut argv = vec!["ip", "addr", "add", addr, "dev", dev.as_str()];
            if addr.contains(':') {
                argv.push("nodad");
            }
            ns.ok(&argv);
        }
        ns.ok(&["ip", "link", "set", dev, "up"]);
    }
}

/// A scratch directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("istio-init-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes a file in the directory and returns its path.
    pub fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("writing a temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
