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

/// Asserts a successful exit, showing stderr otherwise.
#[track_caller]
pub fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "istio-init failed ({}):\n{}",
        o.status,
        stderr(o)
    );
}

/// Asserts an exit code, showing stderr otherwise.
#[track_caller]
pub fn assert_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "unexpected exit status; stderr:\n{}",
        stderr(o)
    );
}

/// The last `error: ` line of stderr: the error `main` prints.
pub fn error_line(o: &Output) -> String {
    stderr(o)
        .lines()
        .rev()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default()
        .to_owned()
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
        normalized_save(&self.ok(&[program]))
    }
}

/// `iptables-save` output without comments and counters (`:CHAIN POLICY [p:b]` → `:CHAIN POLICY`).
pub fn normalized_save(out: &str) -> String {
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.starts_with(':') {
                l.rsplit_once(' ').map_or(l, |(a, _)| a).to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
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

// ---- Helpers for the apply tests: threads inside a namespace, sockets, state snapshots. ----

/// Runs `f` on a fresh thread that has entered the namespace (`setns`), and returns its
/// result. Sockets created there stay in that namespace wherever they are used later.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsFd;
    let file = std::fs::File::open(ns.path()).expect("opening the netns file");
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the test namespace");
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// A TCP listener bound in a namespace (IPv6 listeners are IPv6-only, so both families can
/// listen on one port). `transparent` sets IP_TRANSPARENT, which TPROXY needs.
pub fn listen(ns: &Netns, addr: std::net::SocketAddr, transparent: bool) -> std::net::TcpListener {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen as nlisten,
        setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    in_netns(ns, || {
        let family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
        setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
        if addr.is_ipv6() {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true).expect("IPV6_V6ONLY");
        }
        if transparent {
            setsockopt(&fd, sockopt::IpTransparent, &true).expect("IP_TRANSPARENT");
        }
        bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        nlisten(&fd, Backlog::new(16).expect("backlog")).expect("listen");
        std::net::TcpListener::from(fd)
    })
}

/// Connects from inside a namespace, with the socket owned by `uid`/`gid` as the owner
/// match sees it (fsuid/fsgid at socket creation), like an app or proxy process would.
pub fn connect_as(
    ns: &Netns,
    owner: Option<(u32, u32)>,
    dst: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, connect, setsockopt, socket, sockopt,
    };
    use nix::sys::time::TimeVal;
    use nix::unistd::{Gid, Uid, setfsgid, setfsuid};
    use std::os::fd::AsRawFd;
    in_netns(ns, || {
        let family = if dst.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        if let Some((u, g)) = owner {
            setfsgid(Gid::from_raw(g));
            setfsuid(Uid::from_raw(u));
        }
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None);
        if owner.is_some() {
            setfsuid(Uid::from_raw(0));
            setfsgid(Gid::from_raw(0));
        }
        let fd = fd.map_err(std::io::Error::from)?;
        setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(3, 0)).map_err(std::io::Error::from)?;
        connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)).map_err(std::io::Error::from)?;
        Ok(std::net::TcpStream::from(fd))
    })
}

/// Waits up to `ms` for a connection on the listener.
pub fn accept_within(l: &std::net::TcpListener, ms: u16) -> Option<std::net::TcpStream> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(n) if n > 0 => l.accept().ok().map(|(s, _)| s),
        _ => None,
    }
}

/// The destination a connection had before NAT redirected it (`SO_ORIGINAL_DST`).
pub fn original_dst(s: &std::net::TcpStream) -> Option<std::net::SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = s.local_addr().ok()?;
    if local.is_ipv4() {
        let sin = getsockopt(s, sockopt::OriginalDst).ok()?;
        let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        Some(std::net::SocketAddr::from((ip, u16::from_be(sin.sin_port))))
    } else {
        let sin6 = getsockopt(s, sockopt::Ip6tOriginalDst).ok()?;
        let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        Some(std::net::SocketAddr::from((
            ip,
            u16::from_be(sin6.sin6_port),
        )))
    }
}

/// A UDP socket bound in a namespace.
pub fn udp_bind(ns: &Netns, addr: std::net::SocketAddr) -> std::net::UdpSocket {
    in_netns(ns, || {
        let s = std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        s.set_read_timeout(Some(std::time::Duration::from_millis(1500)))
            .expect("read timeout");
        s
    })
}

/// Sends one datagram from inside a namespace as `owner` (fsuid/fsgid at socket creation).
pub fn udp_send_as(ns: &Netns, owner: Option<(u32, u32)>, dst: std::net::SocketAddr, msg: &[u8]) {
    use nix::unistd::{Gid, Uid, setfsgid, setfsuid};
    in_netns(ns, || {
        if let Some((u, g)) = owner {
            setfsgid(Gid::from_raw(g));
            setfsuid(Uid::from_raw(u));
        }
        let any: std::net::SocketAddr = if dst.is_ipv4() {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        let s = std::net::UdpSocket::bind(any);
        setfsuid(Uid::from_raw(0));
        setfsgid(Gid::from_raw(0));
        s.expect("udp socket").send_to(msg, dst).expect("send_to");
    })
}

/// Receives one datagram (within the socket's read timeout).
pub fn udp_recv(s: &std::net::UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 512];
    s.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

impl Netns {
    /// The rules and user chains of one backend and family (`iptables-nft-save`, …), one
    /// `table: line` each, without counters, comments and empty built-in chains: what
    /// decides traffic. Empty tables that nf_tables keeps after their rules are gone do not
    /// show.
    pub fn rules(&self, save_program: &str) -> Vec<String> {
        let out = self.ok(&[save_program]);
        let mut table = String::new();
        let mut v = Vec::new();
        for l in out.lines() {
            if let Some(t) = l.strip_prefix('*') {
                table = t.to_owned();
            } else if l.starts_with("-A ") || (l.starts_with(':') && l.contains(" - [")) {
                let l = l.split(" [").next().unwrap_or(l);
                v.push(format!("{table}: {l}"));
            }
        }
        v
    }

    /// Whether any backend or family holds an Istio (or istio-init scratch) chain or rule.
    pub fn istio_anywhere(&self) -> Vec<String> {
        let mut v = Vec::new();
        for p in [
            "iptables-nft-save",
            "ip6tables-nft-save",
            "iptables-legacy-save",
            "ip6tables-legacy-save",
        ] {
            for l in self.rules(p) {
                if l.contains("ISTIO") || l.contains(" ii-") || l.contains(":ii-") {
                    v.push(format!("{p}: {l}"));
                }
            }
        }
        v
    }

    /// Runs named shell commands in one `ip netns exec` (one shell, one process per program)
    /// and returns each one's output by name: stdout, plus stderr when `with_stderr`.
    pub fn outputs(
        &self,
        cmds: &[(&'static str, &str)],
        with_stderr: bool,
    ) -> std::collections::BTreeMap<&'static str, String> {
        let redirect = if with_stderr { "2>&1" } else { "2>/dev/null" };
        let script: String = (cmds.iter())
            .map(|(name, cmd)| format!("echo '@@ {name}'; {{ {cmd}; }} {redirect}; "))
            .collect();
        let out = self.ok(&["sh", "-c", &script]);
        let mut parts = std::collections::BTreeMap::new();
        let mut current: Option<&'static str> = None;
        for line in out.lines() {
            if let Some(name) = line.strip_prefix("@@ ") {
                current = cmds.iter().map(|c| c.0).find(|c| *c == name);
                parts.insert(current.expect("a command's marker"), String::new());
            } else if let Some(text) = current.and_then(|c| parts.get_mut(c)) {
                text.push_str(line);
                text.push('\n');
            }
        }
        parts
    }

    /// Runs istio-init inside the namespace with a clean environment plus `env`.
    pub fn istio_init(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut argv: Vec<String> = vec!["env".into(), "-i".into()];
        argv.push(format!(
            "PATH={}",
            std::env::var("PATH").unwrap_or_default()
        ));
        for (k, v) in env {
            argv.push(format!("{k}={v}"));
        }
        argv.push(bin().into());
        argv.extend(args.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.run(&refs)
    }
}

/// A directory of executable shims, deleted on drop.
#[derive(Debug)]
pub struct ShimDir {
    pub path: PathBuf,
}

impl ShimDir {
    pub fn new(tag: &str) -> ShimDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("ii-shim-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("creating shim dir");
        ShimDir { path }
    }

    /// Writes an executable `sh` script named `name`.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("writing shim");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod shim");
        p
    }

    /// `PATH` with this directory first.
    pub fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.path.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }
}

impl Drop for ShimDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The signals a process blocks (`SigBlk` of `/proc/PID/status`).
pub fn blocked_signals(pid: &str) -> u64 {
    status_mask(pid, "SigBlk:")
}

/// The signals process `pid` ignores (`SigIgn` of its status).
pub fn ignored_signals(pid: &str) -> u64 {
    status_mask(pid, "SigIgn:")
}

fn status_mask(pid: &str, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
}

/// `signals` as a kernel signal mask.
pub fn mask(signals: &[nix::sys::signal::Signal]) -> u64 {
    signals.iter().fold(0u64, |m, s| m | 1 << (*s as i32 - 1))
}
