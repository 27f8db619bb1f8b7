//! The small static test helper of the pod end-to-end test (`tests/it/pods.rs`): the test proxy,
//! the app and the peer are all this one binary, in a `FROM scratch` image (no shell, no libc).
//!
//! ```text
//! pod-helper serve NAME [PORT,...] [--transparent]   listen on every PORT (IPv4 and IPv6)
//! pod-helper connect ADDR:PORT...                    connect to each, print what answered
//! pod-helper wait ADDR                               wait until the namespace has ADDR
//! pod-helper udp-serve NAME PORT,...                 answer datagrams on 127.0.0.1:PORT
//! pod-helper udp-send ADDR:PORT...                   send one datagram to each, print the answer
//! ```
//!
//! `serve` answers every connection with one line and closes it:
//! `NAME port=<listening port> orig=<original destination> local=<local address> from=<client>`,
//! where the original destination is `SO_ORIGINAL_DST` (what NAT rewrote) when the kernel has it,
//! else the accepted socket's local address; REDIRECT shows in `local` as the proxy port, TPROXY
//! as the original destination itself. With no port it only stays alive.
//! `--transparent` sets `IP_TRANSPARENT` (TPROXY needs it; so does CAP_NET_ADMIN).
//! `wait` stands in for the kubelet's network setup (CNI ADD) before any container starts: it
//! returns once `ADDR` can be bound, which the test arranges after the pod's interface, its
//! other addresses and (Istio CNI mode) the rules are in place; it gives up after 60 s.
//! `connect` prints `ADDR -> <answer>` per address, or `ADDR -> error: <why>`.
//! `udp-serve` answers every datagram with `NAME port=<listening port> from=<sender>`, on
//! loopback like Istio's DNS agent (where REDIRECT sends a pod's own datagrams), and
//! `udp-send` prints `ADDR -> <answer> (from <who answered>)`: after a REDIRECT the answer comes
//! from the listener's port yet reaches the sender from ADDR (conntrack undoes the NAT). Used by
//! the microVM test (`tests/vm/`).
//!
//! Built by the test with `+crt-static` and an explicit `--target`; see tests/it/image.rs.

// A test tool: its output is its interface, and it exits 2 on bad usage.
#![allow(clippy::print_stdout, clippy::exit)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, getsockopt, listen,
    setsockopt, socket, sockopt,
};

fn listener(addr: SocketAddr, transparent: bool) -> nix::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    if transparent {
        setsockopt(&fd, sockopt::IpTransparent, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::new(64)?)?;
    Ok(TcpListener::from(fd))
}

/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6), when conntrack has the connection.
fn original_dst(s: &TcpStream) -> Option<SocketAddr> {
    let local = s.local_addr().ok()?;
    if local.is_ipv4() {
        let sin = getsockopt(s, sockopt::OriginalDst).ok()?;
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
    } else {
        let sin6 = getsockopt(s, sockopt::Ip6tOriginalDst).ok()?;
        let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        Some(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
    }
}

fn answer(name: &str, port: u16, mut s: TcpStream) {
    let local = s.local_addr().ok();
    let orig = original_dst(&s).or(local);
    let from = s.peer_addr().ok();
    let show = |a: Option<SocketAddr>| a.map_or("-".into(), |a| a.to_string());
    let line = format!(
        "{name} port={port} orig={} local={} from={}",
        show(orig),
        show(local),
        show(from)
    );
    let _ = writeln!(s, "{line}");
    println!("{line}");
}

fn serve(name: &str, ports: &[u16], transparent: bool) -> Result<(), String> {
    let mut threads = Vec::new();
    for &port in ports {
        let any4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let mut ls = vec![listener(any4, transparent).map_err(|e| format!("listen {any4}: {e}"))?];
        // A pod without IPv6 has no [::]: IPv4 alone then.
        match listener(any6, transparent) {
            Ok(l) => ls.push(l),
            Err(e) => eprintln!("{name}: no IPv6 listener on {port}: {e}"),
        }
        for l in ls {
            let name = name.to_owned();
            threads.push(std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    answer(&name, port, s);
                }
            }));
        }
    }
    run(format!("{name} listening on {ports:?}"), threads)
}

/// Says the servers listen, then serves until their threads end (forever without any).
fn run(announce: String, threads: Vec<std::thread::JoinHandle<()>>) -> Result<(), String> {
    println!("{announce}");
    let _ = std::io::stdout().flush();
    if threads.is_empty() {
        loop {
            std::thread::park();
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn connect(addr: &str) -> String {
    let target: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => return format!("error: {e}"),
    };
    let s = match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return format!("error: {e}"),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(0) => "error: closed without an answer".into(),
        Ok(_) => line.trim_end().to_owned(),
        Err(e) => format!("error: {e}"),
    }
}

fn udp_serve(name: &str, ports: &[u16]) -> Result<(), String> {
    let mut threads = Vec::new();
    for &port in ports {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, port))
            .map_err(|e| format!("udp bind {port}: {e}"))?;
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let line = format!("{name} port={port} from={from}");
                let _ = s.send_to(line.as_bytes(), from);
                println!("{line}");
            }
        }));
    }
    run(format!("{name} listening on udp {ports:?}"), threads)
}

fn udp_send(addr: &str) -> String {
    let exchange = || -> Result<String, Box<dyn std::error::Error>> {
        let target: SocketAddr = addr.parse()?;
        let any = if target.is_ipv4() {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
        };
        let s = UdpSocket::bind(any)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(b"probe", target)?;
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok(format!(
            "{} (from {from})",
            String::from_utf8_lossy(&buf[..n]).trim_end()
        ))
    };
    exchange().unwrap_or_else(|e| format!("error: {e}"))
}

fn wait(addr: &str) -> Result<(), String> {
    let ip: std::net::IpAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    for _ in 0..1200 {
        if std::net::TcpListener::bind((ip, 0)).is_ok() {
            println!("{addr} is up");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{addr} did not appear within 60 s"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") if args.len() >= 2 => {
            let transparent = args.iter().any(|a| a == "--transparent");
            let ports: Result<Vec<u16>, _> = args[2..]
                .iter()
                .filter(|a| !a.starts_with("--"))
                .flat_map(|a| a.split(','))
                .filter(|p| !p.is_empty())
                .map(str::parse)
                .collect();
            match ports {
                Ok(ports) => serve(&args[1], &ports, transparent),
                Err(e) => Err(format!("bad port: {e}")),
            }
        }
        Some("connect") => {
            for a in &args[1..] {
                println!("{a} -> {}", connect(a));
            }
            Ok(())
        }
        Some("wait") if args.len() >= 2 => wait(&args[1]),
        Some("udp-serve") if args.len() == 3 => {
            let ports: Result<Vec<u16>, _> = args[2].split(',').map(str::parse).collect();
            match ports {
                Ok(ports) => udp_serve(&args[1], &ports),
                Err(e) => Err(format!("bad port: {e}")),
            }
        }
        Some("udp-send") => {
            for a in &args[1..] {
                println!("{a} -> {}", udp_send(a));
            }
            Ok(())
        }
        _ => Err("usage: pod-helper serve NAME [PORT,...] [--transparent] | connect ADDR:PORT... | wait ADDR | udp-serve NAME PORT,... | udp-send ADDR:PORT...".into()),
    };
    if let Err(e) = result {
        eprintln!("pod-helper: {e}");
        std::process::exit(2);
    }
}
