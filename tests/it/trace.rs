//! `trace` against the kernel: the ruleset is loaded into a real pod namespace (joined to a
//! peer namespace by a veth pair), real TCP and UDP connections are made from chosen uids and
//! gids, and where each one lands — a proxy listener (checked with `SO_ORIGINAL_DST`) or the
//! real destination — must be what the trace of the same connection says.
//!
//! Each check runs in both modes, each in fresh namespaces: the iptables mode's rules loaded
//! with `iptables-restore`, and the nftables mode's by istio-init `--native-nftables` itself
//! (one nf_tables batch, its own TPROXY routing); the trace (one capture model for both)
//! must match the kernel in each, and every connection must land the same way in both.
//!
//! Sockets are created inside the namespaces by short-lived threads that `setns` into them;
//! outbound client sockets are created with the thread's fsuid/fsgid set to the uid/gid under
//! test, which is what `-m owner` matches.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, getsockopt, listen,
    setsockopt, socket, sockopt,
};
use nix::unistd::{Gid, Uid, setfsgid, setfsuid};

use istio_init::backend::iptables::render;
use istio_init::capture::{Facts, Ruleset};
use istio_init::net::Family;
use istio_init::settings::cli;
use istio_init::settings::cli::TraceArgs;
use istio_init::trace::{self, Connection, Verdict};
use istio_init::{Env, build_all};

use crate::util::{
    Netns, TempDir, assert_ok, istio_init, output, privileged, stderr, stdout, veth,
};

/// How the rules get into the pod namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `iptables-restore --noflush` of each family's rendering (the TPROXY routing by hand).
    Iptables,
    /// istio-init `--native-nftables` with the same arguments, run in the namespace.
    Nftables,
}

/// Loads the rules of `argv` (istio-init's arguments after the program name, which resolved
/// to `rulesets`) into `pod` in `mode`. `dns` is the nameservers the rulesets were built for.
fn load(
    mode: Mode,
    pod: &Netns,
    argv: &[&str],
    env: &[(&str, &str)],
    dns: &[&str],
    rulesets: &[Ruleset],
) {
    match mode {
        Mode::Iptables => {
            for rs in rulesets {
                let prog = match rs.family {
                    Family::V4 => "iptables-restore",
                    Family::V6 => "ip6tables-restore",
                };
                let o = pod.run_with_input(
                    &[prog, "--noflush"],
                    &istio_init::backend::iptables::render::ruleset_text(rs),
                );
                assert!(o.status.success(), "{prog}: {}", stderr(&o));
            }
        }
        Mode::Nftables => {
            let tmp = TempDir::new("trace");
            let resolv: String = dns.iter().map(|s| format!("nameserver {s}\n")).collect();
            let resolv = format!(
                "--resolv-conf={}",
                tmp.file("resolv.conf", resolv).display()
            );
            let mut args = argv.to_vec();
            args.extend(["--native-nftables", &resolv]);
            assert_ok(&pod.istio_init(&args, env));
        }
    }
}

/// The two modes' observations (one line per connection) must be the same.
#[track_caller]
fn assert_same_in_both_modes(iptables: &[String], nftables: &[String]) {
    let differ: Vec<String> = iptables
        .iter()
        .zip(nftables)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("iptables: {a}\nnftables: {b}"))
        .collect();
    assert!(
        differ.is_empty() && iptables.len() == nftables.len(),
        "the modes disagree:\n{}",
        differ.join("\n")
    );
}

/// Runs `f` on a thread inside the namespace at `path` (sockets it creates belong there).
fn in_ns<T: Send + 'static>(path: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("opening the netns");
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread panicked")
}

fn af(a: &SocketAddr) -> AddressFamily {
    if a.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn bound(addr: SocketAddr, ty: SockType) -> OwnedFd {
    let fd = socket(af(&addr), ty, SockFlag::SOCK_CLOEXEC, None).expect("socket");
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    // Transparent, as Envoy's inbound listener is in TPROXY mode: TPROXY only hands
    // connections to transparent sockets.
    setsockopt(&fd, sockopt::IpTransparent, &true).expect("IP_TRANSPARENT");
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).expect("IPV6_V6ONLY");
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    fd
}

/// Where a connection can land.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Landing {
    /// `pod` or `peer`.
    ns: &'static str,
    port: u16,
    /// SO_ORIGINAL_DST, when the connection was NATed (TCP only).
    original: Option<SocketAddr>,
    /// The local address the connection reached.
    local: SocketAddr,
}

enum Sock {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

struct Listener {
    ns: &'static str,
    port: u16,
    sock: Sock,
}

fn listeners(ns: &'static str, path: PathBuf, tcp: &[u16], udp: &[u16]) -> Vec<Listener> {
    let (tcp, udp) = (tcp.to_vec(), udp.to_vec());
    in_ns(path, move || {
        let mut out = Vec::new();
        for ip in ["0.0.0.0", "::"] {
            let ip: IpAddr = ip.parse().expect("ip");
            for p in &tcp {
                let fd = bound(SocketAddr::new(ip, *p), SockType::Stream);
                listen(&fd, Backlog::new(16).expect("backlog")).expect("listen");
                let l = TcpListener::from(fd);
                l.set_nonblocking(true).expect("nonblocking");
                out.push(Listener {
                    ns,
                    port: *p,
                    sock: Sock::Tcp(l),
                });
            }
            for p in &udp {
                let s = UdpSocket::from(bound(SocketAddr::new(ip, *p), SockType::Datagram));
                s.set_nonblocking(true).expect("nonblocking");
                out.push(Listener {
                    ns,
                    port: *p,
                    sock: Sock::Udp(s),
                });
            }
        }
        out
    })
}

fn original_dst(s: &TcpStream, v4: bool) -> Option<SocketAddr> {
    if v4 {
        let a = getsockopt(s, sockopt::OriginalDst).ok()?;
        let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(a.sin_port)))
    } else {
        let a = getsockopt(s, sockopt::Ip6tOriginalDst).ok()?;
        let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
        Some(SocketAddr::new(IpAddr::V6(ip), u16::from_be(a.sin6_port)))
    }
}

/// Waits for the one listener that got something, and reads where it landed.
fn landing(ls: &[Listener]) -> Vec<Landing> {
    let mut pfds: Vec<PollFd<'_>> = ls
        .iter()
        .map(|l| {
            let fd = match &l.sock {
                Sock::Tcp(t) => t.as_fd(),
                Sock::Udp(u) => u.as_fd(),
            };
            PollFd::new(fd, PollFlags::POLLIN)
        })
        .collect();
    let n = poll(&mut pfds, PollTimeout::from(3000u16)).expect("poll");
    if n == 0 {
        return Vec::new();
    }
    // Let a second (unexpected) arrival show up too.
    std::thread::sleep(Duration::from_millis(20));
    let _ = poll(&mut pfds, PollTimeout::ZERO);
    let ready: Vec<usize> = pfds
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
        .map(|(i, _)| i)
        .collect();
    drop(pfds);
    let mut out = Vec::new();
    for i in ready {
        let l = &ls[i];
        match &l.sock {
            Sock::Tcp(t) => {
                while let Ok((s, _)) = t.accept() {
                    let local = s.local_addr().expect("local addr");
                    out.push(Landing {
                        ns: l.ns,
                        port: l.port,
                        original: original_dst(&s, local.is_ipv4()),
                        local,
                    });
                }
            }
            Sock::Udp(u) => {
                let mut buf = [0u8; 64];
                while let Ok((_, _)) = u.recv_from(&mut buf) {
                    out.push(Landing {
                        ns: l.ns,
                        port: l.port,
                        original: None,
                        local: u.local_addr().expect("local addr"),
                    });
                }
            }
        }
    }
    out
}

/// Opens the connection from the right namespace as the right user. The TCP stream (if any)
/// is returned so that it stays open until the landing is read.
fn connect(c: &Connection, pod: PathBuf, peer: PathBuf) -> Option<TcpStream> {
    let c = c.clone();
    let outbound = c.direction == trace::Direction::Out;
    let path = if outbound { pod } else { peer };
    in_ns(path, move || {
        if outbound {
            setfsgid(Gid::from_raw(c.gid));
            setfsuid(Uid::from_raw(c.uid));
        }
        match c.proto {
            istio_init::capture::Proto::Tcp => Some(
                TcpStream::connect_timeout(&c.dst, Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("connecting to {}: {e}", c.dst)),
            ),
            istio_init::capture::Proto::Udp => {
                let any: SocketAddr = if c.dst.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                }
                .parse()
                .expect("addr");
                let s = UdpSocket::bind(any).expect("udp bind");
                s.send_to(b"probe", c.dst).expect("udp send");
                None
            }
        }
    })
}

fn args(
    dir: &str,
    proto: &str,
    dst: &str,
    uid: u32,
    gid: u32,
    iface: &str,
    src: &str,
) -> TraceArgs {
    TraceArgs {
        direction: dir.into(),
        destination: dst.into(),
        proto: proto.into(),
        uid: Some(uid.to_string()),
        gid: Some(gid.to_string()),
        iface: Some(iface.into()),
        src: Some(src.into()),
    }
}

fn link_name(ns: &Netns) -> String {
    let out = ns.ok(&["ip", "-o", "link", "show"]);
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .find(|n| n != "lo")
        .expect("the veth in the pod namespace")
}

#[test]
fn trace_verdicts_match_where_real_connections_land() {
    if !privileged("trace_verdicts_match_where_real_connections_land") {
        return;
    }
    let iptables = sidecar_connections(Mode::Iptables);
    let nftables = sidecar_connections(Mode::Nftables);
    assert_same_in_both_modes(&iptables, &nftables);
}

/// The REDIRECT sidecar matrix in `mode`: each connection's trace checked against where it
/// lands; returns what each connection did.
fn sidecar_connections(mode: Mode) -> Vec<String> {
    let pod = Netns::new("trpod");
    let peer = Netns::new("trpeer");
    veth(
        &pod,
        &["198.18.0.1/24", "2001:db8::1/64"],
        &peer,
        &[
            "198.18.0.2/24",
            "198.18.0.200/24",
            "2001:db8::2/64",
            "2001:db8::200/64",
        ],
    );
    let eth = link_name(&pod);

    // A sidecar with DNS capture (the peer is the nameserver), an excluded CIDR per family, an
    // excluded outbound port and an excluded owner group.
    let argv = [
        "--redirect-dns",
        "-x",
        "198.18.0.200/32,2001:db8::200/128",
        "-o",
        "5432",
        "--ipv6=true",
    ];
    let inv = cli::parse(std::iter::once("istio-init").chain(argv)).expect("args");
    let env_vars = [("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888")];
    let env = |k: &str| {
        env_vars
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| (*v).to_owned())
    };
    let cfg = istio_init::resolve(&inv, &Env { var: &env }).expect("config");
    let dns = ["198.18.0.2", "2001:db8::2"];
    let facts = Facts {
        ipv6: true,
        dns_servers: dns.iter().map(|s| s.parse().expect("ip")).collect(),
    };
    let rulesets: Vec<Ruleset> = build_all(&cfg, &facts);
    load(mode, &pod, &argv, &env_vars, &dns, &rulesets);

    let mut all = listeners(
        "pod",
        pod.path(),
        &[15001, 15006, 15053, 8080, 15021, 15008],
        &[15053, 8080],
    );
    all.extend(listeners("peer", peer.path(), &[80, 5432, 53], &[53]));

    let mut matrix: Vec<TraceArgs> = Vec::new();
    for (me, peer_ip, excluded, local_src) in [
        ("198.18.0.1", "198.18.0.2", "198.18.0.200", "127.0.0.1"),
        ("2001:db8::1", "2001:db8::2", "2001:db8::200", "::1"),
    ] {
        let at = |ip: &str, port: u16| SocketAddr::new(ip.parse().expect("ip"), port).to_string();
        let (lo, loopback) = ("lo", if me.contains(':') { "::1" } else { "127.0.0.1" });
        for (proto, dst, uid, gid) in [
            ("tcp", at(peer_ip, 80), 1000, 1000),   // app → captured
            ("tcp", at(peer_ip, 80), 1337, 1337),   // the proxy itself
            ("tcp", at(peer_ip, 80), 1000, 1337),   // the proxy's group
            ("tcp", at(peer_ip, 80), 1000, 888),    // excluded owner group
            ("tcp", at(peer_ip, 5432), 1000, 1000), // excluded port
            ("tcp", at(excluded, 80), 1000, 1000),  // excluded CIDR
            ("tcp", at(peer_ip, 53), 1000, 1000),   // TCP DNS → agent
            ("udp", at(peer_ip, 53), 1000, 1000),   // UDP DNS → agent
            ("udp", at(peer_ip, 53), 1337, 1337),   // the proxy's own DNS
        ] {
            matrix.push(args("out", proto, &dst, uid, gid, &eth, me));
        }
        for (dst, uid) in [
            (at(me, 8080), 1000),  // app → app over lo
            (at(me, 8080), 1337),  // proxy → own address: inbound capture
            (at(me, 15008), 1337), // proxy → tunnel port
        ] {
            matrix.push(args("out", "tcp", &dst, uid, uid, lo, me));
        }
        matrix.push(args(
            "out",
            "tcp",
            &at(loopback, 8080),
            1000,
            1000,
            lo,
            local_src,
        ));
        for (proto, port) in [("tcp", 8080), ("tcp", 15021), ("tcp", 15008), ("udp", 8080)] {
            matrix.push(args("in", proto, &at(me, port), 0, 0, &eth, peer_ip));
        }
    }

    let mut seen_verdicts = BTreeMap::new();
    let mut observed = Vec::new();
    for a in &matrix {
        let c = Connection::parse(a).expect("connection");
        let t = trace::trace(&cfg, &rulesets, &c, &|_| None, &render::Layout);
        *seen_verdicts.entry(format!("{:?}", t.verdict)).or_insert(0) += 1;
        let _stream = connect(&c, pod.path(), peer.path());
        let got = landing(&all);
        let want_ns_port = match t.verdict {
            Verdict::Redirect { port } => ("pod", port),
            Verdict::Bypass => (
                if c.direction == trace::Direction::In || c.iface == "lo" {
                    "pod"
                } else {
                    "peer"
                },
                c.dst.port(),
            ),
            other => panic!("unexpected verdict {other:?} in this matrix:\n{t}"),
        };
        assert_eq!(
            got.len(),
            1,
            "{c}: expected one landing, got {got:?}\ntrace:\n{t}"
        );
        let l = &got[0];
        assert_eq!(
            (l.ns, l.port),
            want_ns_port,
            "{c}: landed at {l:?}\ntrace:\n{t}"
        );
        match t.verdict {
            Verdict::Redirect { .. } if c.proto == istio_init::capture::Proto::Tcp => {
                assert_eq!(l.original, Some(c.dst), "{c}: SO_ORIGINAL_DST\ntrace:\n{t}");
            }
            Verdict::Bypass if c.proto == istio_init::capture::Proto::Tcp => {
                assert_eq!(l.local, c.dst, "{c}: reached {l:?}\ntrace:\n{t}");
            }
            _ => {}
        }
        observed.push(format!("{c}: {:?} → {l:?}", t.verdict).replace(&eth, "<veth>"));
    }
    // The matrix really covers the verdicts it is meant to.
    for v in [
        "Redirect { port: 15001 }",
        "Redirect { port: 15006 }",
        "Redirect { port: 15053 }",
        "Bypass",
    ] {
        assert!(
            seen_verdicts.get(v).copied().unwrap_or(0) >= 2,
            "{mode:?}: {v} not covered: {seen_verdicts:?}"
        );
    }
    observed
}

#[test]
fn trace_cli_report_and_errors() {
    let o = output(istio_init().args([
        "trace",
        "out",
        "203.0.113.7:443",
        "--uid",
        "1337",
        "--ipv6=false",
        "-u",
        "1337",
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("Connection: outbound tcp to 203.0.113.7:443 from the pod's address (uid 1337, gid 1337), leaving by eth0\n"), "{out}");
    assert!(
        out.contains("Decided by: nat ISTIO_OUTPUT rule 4: -m owner --uid-owner 1337 -j RETURN\n"),
        "{out}"
    );
    assert!(
        out.ends_with("Verdict: bypass: not captured, delivered to 203.0.113.7:443 as addressed\n"),
        "{out}"
    );

    let o = output(istio_init().args([
        "trace",
        "in",
        "198.18.0.1:8080",
        "--ipv6=false",
        "-b",
        "8080",
        "-m",
        "TPROXY",
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).ends_with("Verdict: delivered by TPROXY to port 15006 (the proxy's inbound listener); the local address there is 198.18.0.1:8080\n"),
        "{}",
        stdout(&o)
    );

    let o = output(istio_init().args(["trace", "out", "nowhere"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).starts_with("error: invalid destination \"nowhere\" for trace"),
        "{}",
        stderr(&o)
    );
    assert!(o.stdout.is_empty());

    let o = output(istio_init().args(["trace", "out", "10.0.0.1:80", "-d", "80x"]));
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn tproxy_trace_verdicts_match_the_kernel() {
    if !privileged("tproxy_trace_verdicts_match_the_kernel") {
        return;
    }
    let iptables = tproxy_connections(Mode::Iptables);
    let nftables = tproxy_connections(Mode::Nftables);
    assert_same_in_both_modes(&iptables, &nftables);
}

/// The TPROXY matrix in `mode`, as [`sidecar_connections`].
fn tproxy_connections(mode: Mode) -> Vec<String> {
    let pod = Netns::new("tppod");
    let peer = Netns::new("tppeer");
    veth(
        &pod,
        &["198.18.0.1/24", "2001:db8::1/64"],
        &peer,
        &["198.18.0.2/24", "2001:db8::2/64"],
    );
    let eth = link_name(&pod);
    let argv = ["-m", "TPROXY", "--ipv6=true"];
    let inv = cli::parse(std::iter::once("istio-init").chain(argv)).expect("args");
    let cfg = istio_init::resolve(&inv, &Env { var: &|_| None }).expect("config");
    let facts = Facts {
        ipv6: true,
        dns_servers: Vec::new(),
    };
    let rulesets: Vec<Ruleset> = build_all(&cfg, &facts);
    load(mode, &pod, &argv, &[], &[], &rulesets);
    // The policy routing istio-init sets up for TPROXY (behaviour doc §6.7); in nftables mode
    // istio-init itself added it.
    for v in ["-4", "-6"] {
        let all = if v == "-4" { "0.0.0.0/0" } else { "::/0" };
        if mode == Mode::Iptables {
            pod.ok(&["ip", v, "rule", "add", "fwmark", "1337", "lookup", "133"]);
            pod.ok(&[
                "ip", v, "route", "add", "local", all, "dev", "lo", "table", "133",
            ]);
        }
        let routes = pod.ok(&["ip", v, "route", "show", "table", "133"]);
        assert!(
            routes.starts_with("local default dev lo"),
            "{mode:?}: {routes}"
        );
    }
    let mut all = listeners("pod", pod.path(), &[15001, 15006, 8080, 15021, 15008], &[]);
    all.extend(listeners("peer", peer.path(), &[80], &[]));

    let mut matrix = Vec::new();
    for (me, peer_ip) in [("198.18.0.1", "198.18.0.2"), ("2001:db8::1", "2001:db8::2")] {
        let at = |ip: &str, port: u16| SocketAddr::new(ip.parse().expect("ip"), port).to_string();
        for port in [8080, 15021, 15008] {
            matrix.push(args("in", "tcp", &at(me, port), 0, 0, &eth, peer_ip));
        }
        for (port, uid) in [(8080, 1000), (8080, 1337), (15008, 1337)] {
            matrix.push(args("out", "tcp", &at(me, port), uid, uid, "lo", me));
        }
        matrix.push(args("out", "tcp", &at(peer_ip, 80), 1000, 1000, &eth, me));
    }
    let mut seen = BTreeMap::new();
    let mut observed = Vec::new();
    for a in &matrix {
        let c = Connection::parse(a).expect("connection");
        let t = trace::trace(&cfg, &rulesets, &c, &|_| None, &render::Layout);
        *seen.entry(format!("{:?}", t.verdict)).or_insert(0) += 1;
        let _stream = connect(&c, pod.path(), peer.path());
        let got = landing(&all);
        assert_eq!(
            got.len(),
            1,
            "{c}: expected one landing, got {got:?}\ntrace:\n{t}"
        );
        let l = &got[0];
        match t.verdict {
            Verdict::Tproxy { port } => {
                // TPROXY keeps the destination: the listener sees it as its local address.
                assert_eq!(
                    (l.ns, l.port, l.local),
                    ("pod", port, c.dst),
                    "{c}: {l:?}\ntrace:\n{t}"
                );
            }
            Verdict::Redirect { port } => {
                assert_eq!(
                    (l.ns, l.port, l.original),
                    ("pod", port, Some(c.dst)),
                    "{c}: {l:?}\ntrace:\n{t}"
                );
            }
            Verdict::Bypass => {
                let ns = if c.iface == "lo" || c.direction == trace::Direction::In {
                    "pod"
                } else {
                    "peer"
                };
                assert_eq!(
                    (l.ns, l.port, l.local),
                    (ns, c.dst.port(), c.dst),
                    "{c}: {l:?}\ntrace:\n{t}"
                );
            }
            Verdict::Dropped => panic!("unexpected drop:\n{t}"),
        }
        observed.push(format!("{c}: {:?} → {l:?}", t.verdict).replace(&eth, "<veth>"));
    }
    for v in [
        "Tproxy { port: 15006 }",
        "Redirect { port: 15006 }",
        "Redirect { port: 15001 }",
        "Bypass",
    ] {
        assert!(seen.contains_key(v), "{mode:?}: {v} not covered: {seen:?}");
    }
    observed
}

/// `trace` names what the chosen backend lays out in the kernel: every table, chain and rule
/// it prints is one the same configuration's dry run writes (`add rule inet TABLE CHAIN …` in
/// nftables mode, `-A CHAIN …` under `*TABLE` in iptables mode), which the conformance tests
/// load and compare in the kernel.
#[test]
fn trace_prints_the_chains_and_rules_of_the_chosen_backend() {
    let config = [
        "-m",
        "TPROXY",
        "--redirect-dns",
        "--ipv6=true",
        "-b",
        "*",
        "-x",
        "198.19.0.0/16",
    ];
    let resolv = crate::util::TempDir::new("traceresolv");
    let resolv = resolv.file(
        "resolv.conf",
        "nameserver 198.18.0.53\nnameserver 2001:db8::53\n",
    );
    let resolv = resolv.display().to_string();
    let connections: [&[&str]; 5] = [
        &["out", "198.18.0.9:80"],
        &["out", "[2001:db8::9]:443", "--uid", "1337"],
        &["out", "198.18.0.53:53", "--proto", "udp"],
        &["in", "198.18.0.5:9080"],
        &["out", "198.19.1.1:80"],
    ];
    for nft in [false, true] {
        let mode: &[&str] = if nft { &["--native-nftables"] } else { &[] };
        let with = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = config.iter().map(|s| (*s).to_owned()).collect();
            v.extend(["--resolv-conf".to_owned(), resolv.clone()]);
            v.extend(mode.iter().chain(extra).map(|s| (*s).to_owned()));
            v
        };
        let o = output(istio_init().args(with(&["--dry-run"])));
        assert!(o.status.success(), "{}", stderr(&o));
        let dry = stdout(&o);
        // What the dry run writes: nft lines as they are; iptables rules as `TABLE: -A …`
        // (an insert `-I CHAIN N …` as the `-A CHAIN …` it ends up as).
        let mut written = std::collections::BTreeSet::new();
        let mut section = String::new();
        for l in dry.lines() {
            if let Some(t) = l.strip_prefix('*') {
                section = t.trim().to_owned();
            } else if let Some(rest) = l.strip_prefix("-I ") {
                let (chain, rest) = rest.split_once(' ').unwrap();
                let (_, spec) = rest.split_once(' ').unwrap();
                written.insert(format!("{section}: -A {chain} {spec}"));
            } else if l.starts_with("-A ") {
                written.insert(format!("{section}: {l}"));
            } else {
                written.insert(l.to_owned());
            }
        }
        let mut table = String::new();
        let mut seen = 0;
        for c in connections {
            let mut args = vec!["trace".to_owned()];
            args.extend(c.iter().map(|s| (*s).to_owned()));
            args.extend(with(&[]));
            let o = output(istio_init().args(&args));
            assert!(o.status.success(), "{args:?}: {}", stderr(&o));
            let t = stdout(&o);
            for line in t.lines().map(str::trim) {
                let is_header = line.starts_with("inet istio-proxy-")
                    || ["nat ", "mangle ", "raw "]
                        .iter()
                        .any(|p| line.starts_with(p));
                if is_header {
                    table = line.to_owned();
                    continue;
                }
                let Some((_, rest)) = line.split_once(". ") else {
                    continue;
                };
                let Some(rule) = rest.split("  -").next().filter(|_| !table.is_empty()) else {
                    continue;
                };
                let want = if nft {
                    format!("add rule {table} {rule}")
                } else {
                    let (t, chain) = table.split_once(' ').unwrap();
                    format!("{t}: -A {chain} {rule}")
                };
                assert!(written.contains(&want), "{args:?}: {want:?} not in:\n{dry}");
                seen += 1;
            }
        }
        assert!(seen > 20, "only {seen} rules checked");
        if nft {
            assert!(!dry.contains("ISTIO_"));
        }
    }
}
