//! `--run-validation` (Istio's `istio-validation` container): proves that the rules redirect
//! traffic, for every enabled IP family.
//!
//! As Istio does (behaviour doc §6.10): listen on the loopback address at the proxy's outbound
//! and inbound ports, connect from the loopback address to the passthrough address
//! (`127.0.0.6` / `::6`) at the probe port, and succeed when a listener accepts a connection
//! whose `SO_ORIGINAL_DST` port is the probe port. The rules redirect that connection only for
//! the proxy's uid/gid (§4 step 11a), so the check must run as the proxy user. Retries until
//! `--probe-timeout`. Unlike Istio, a failure says what was checked, what was observed
//! (refused, timed out, unreachable, wrong port, not redirected) and the likely cause.
//!
//! Effects: opens TCP sockets on loopback only; changes nothing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, connect, getsockopt, listen,
    setsockopt, socket, sockopt,
};

use crate::exit::ValidationFailed;
use crate::net::Family;
use crate::settings::config::{Config, join};

/// How long to wait between attempts (Istio waits a second; retrying faster costs nothing
/// on loopback and lets a late rule be seen sooner).
const RETRY: Duration = Duration::from_millis(200);

/// The proxy's inbound passthrough address, which the probe dials.
fn passthrough(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)),
    }
}

fn af(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

/// What one attempt saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Redirected to our listener with the probe's original destination: success.
    Redirected {
        listener: SocketAddr,
        original: SocketAddr,
    },
    /// Redirected to our listener, but the original destination is not the probe's.
    WrongPort {
        listener: SocketAddr,
        original: SocketAddr,
    },
    /// Our listener got it without NAT.
    NoNat {
        listener: SocketAddr,
    },
    /// Connected, but none of our listeners got the connection.
    Elsewhere,
    Refused,
    TimedOut,
    Unreachable(Errno),
    /// The client socket could not even be set up.
    Local(String),
}

/// The user the check runs as: the owner rules look at this.
#[derive(Debug, Clone, Copy)]
struct Me {
    uid: u32,
    gid: u32,
}

fn open_listener(addr: SocketAddr) -> Result<TcpListener, Errno> {
    let family = if addr.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    };
    let fd: OwnedFd = socket(af(family), SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    if family == Family::V6 {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::new(16)?)?;
    let l = TcpListener::from(fd);
    l.set_nonblocking(true).map_err(|_| Errno::EINVAL)?;
    Ok(l)
}

fn original_dst(s: &TcpStream, family: Family) -> Result<SocketAddr, Errno> {
    match family {
        Family::V4 => {
            let a = getsockopt(s, sockopt::OriginalDst)?;
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Ok(SocketAddr::new(IpAddr::V4(ip), u16::from_be(a.sin_port)))
        }
        Family::V6 => {
            let a = getsockopt(s, sockopt::Ip6tOriginalDst)?;
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Ok(SocketAddr::new(IpAddr::V6(ip), u16::from_be(a.sin6_port)))
        }
    }
}

fn millis(d: Duration) -> PollTimeout {
    PollTimeout::try_from(d.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::ZERO)
}

/// One probe connection, with at most `budget` to connect.
fn attempt(
    family: Family,
    probe: SocketAddr,
    listeners: &[(SocketAddr, TcpListener)],
    budget: Duration,
) -> Seen {
    let local = |what: &str, e: Errno| Seen::Local(format!("{what}: {}", e.desc()));
    let fd: OwnedFd = match socket(
        af(family),
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    ) {
        Ok(fd) => fd,
        Err(e) => return local("creating a socket", e),
    };
    let from = SocketAddr::new(family.loopback(), 0);
    if let Err(e) = bind(fd.as_raw_fd(), &SockaddrStorage::from(from)) {
        return match e {
            Errno::EADDRNOTAVAIL => Seen::Unreachable(e),
            e => local(&format!("binding to {}", from.ip()), e),
        };
    }
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(probe)) {
        Ok(()) => {}
        Err(Errno::EINPROGRESS) => {
            let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
            match poll(&mut pfd, millis(budget)) {
                Ok(0) => return Seen::TimedOut,
                Ok(_) => {}
                Err(e) => return local("waiting for the connection", e),
            }
            match getsockopt(&fd, sockopt::SocketError) {
                Ok(0) => {}
                Ok(code) => return seen_error(Errno::from_raw(code)),
                Err(e) => return local("reading the connection status", e),
            }
        }
        Err(e) => return seen_error(e),
    }
    let _client = TcpStream::from(fd);
    // The handshake is complete; the connection waits in one of our accept queues, if it was
    // redirected to us.
    let mut pfds: Vec<PollFd<'_>> = listeners
        .iter()
        .map(|(_, l)| PollFd::new(l.as_fd(), PollFlags::POLLIN))
        .collect();
    match poll(&mut pfds, millis(Duration::from_millis(500))) {
        Ok(0) | Err(_) => return Seen::Elsewhere,
        Ok(_) => {}
    }
    let ready: Vec<usize> = pfds
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
        .map(|(i, _)| i)
        .collect();
    drop(pfds);
    for i in ready {
        let (addr, l) = &listeners[i];
        let Ok((s, _)) = l.accept() else { continue };
        return match original_dst(&s, family) {
            Ok(original) if original.port() == probe.port() => Seen::Redirected {
                listener: *addr,
                original,
            },
            Ok(original) => Seen::WrongPort {
                listener: *addr,
                original,
            },
            Err(_) => Seen::NoNat { listener: *addr },
        };
    }
    Seen::Elsewhere
}

fn seen_error(e: Errno) -> Seen {
    match e {
        Errno::ECONNREFUSED => Seen::Refused,
        Errno::ETIMEDOUT => Seen::TimedOut,
        e => Seen::Unreachable(e),
    }
}

/// Why one family's check failed: what was checked, what was observed, the likely cause.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Explanation {
    checked: String,
    observed: String,
    cause: String,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "checked: {}\n    observed: {}\n    likely cause: {}",
            self.checked, self.observed, self.cause
        )
    }
}

impl std::error::Error for Explanation {}

/// The outcome of one family's check: `Ok(detail)` or why it failed.
fn check_family(cfg: &Config, family: Family, me: Me) -> Result<String, Explanation> {
    let mut ports = vec![cfg.proxy_port.get(), cfg.inbound_capture_port.get()];
    ports.dedup();
    let probe = SocketAddr::new(passthrough(family), cfg.probe_port.get());
    let (listeners, bind_errors) = open_listeners(family, &ports);
    let checked = what_is_checked(cfg, family, me, probe, &ports);
    if listeners.is_empty() {
        return Err(Explanation {
            checked,
            observed: format!("no listener could be opened: {}", bind_errors.join(", ")),
            cause: "another process holds the proxy's ports in this network namespace (is the proxy already running?), or the loopback interface is down".into(),
        });
    }
    let (last, attempts) = probe_until_redirected(cfg, family, probe, &listeners);
    if let Seen::Redirected { listener, original } = last {
        return Ok(format!(
            "{family}: the probe to {probe} was redirected to {listener} (SO_ORIGINAL_DST {original})"
        ));
    }
    log::debug!("{family} validation: {attempts} attempts, last: {last:?}");
    let (observed, cause) = diagnose(cfg, family, me, probe, last, attempts);
    Err(Explanation {
        checked,
        observed,
        cause,
    })
}

/// A listener on loopback for each port, and why each one that could not be opened failed.
fn open_listeners(family: Family, ports: &[u16]) -> (Vec<(SocketAddr, TcpListener)>, Vec<String>) {
    let mut listeners = Vec::new();
    let mut bind_errors = Vec::new();
    for p in ports {
        let addr = SocketAddr::new(family.loopback(), *p);
        match open_listener(addr) {
            Ok(l) => listeners.push((addr, l)),
            Err(e) => bind_errors.push(format!("{addr} ({})", e.desc())),
        }
    }
    (listeners, bind_errors)
}

/// The check, in words: the connection made and where the rules must send it.
fn what_is_checked(
    cfg: &Config,
    family: Family,
    me: Me,
    probe: SocketAddr,
    ports: &[u16],
) -> String {
    let targets = ports
        .iter()
        .map(|p| SocketAddr::new(family.loopback(), *p).to_string())
        .collect::<Vec<_>>()
        .join(" or ");
    format!(
        "a TCP connection from {} to {probe} as uid {} gid {}, which the rules must redirect to a listener on {targets} (for {:?})",
        family.loopback(),
        me.uid,
        me.gid,
        cfg.probe_timeout
    )
}

/// Probes until a probe is redirected or the timeout passes: the last outcome, and the
/// number of attempts.
fn probe_until_redirected(
    cfg: &Config,
    family: Family,
    probe: SocketAddr,
    listeners: &[(SocketAddr, TcpListener)],
) -> (Seen, u32) {
    let deadline = Instant::now() + cfg.probe_timeout;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(10));
        let seen = attempt(family, probe, listeners, budget);
        if let Seen::Redirected { .. } = seen {
            return (seen, attempts);
        }
        let now = Instant::now();
        if now >= deadline {
            return (seen, attempts);
        }
        std::thread::sleep(RETRY.min(deadline - now));
        if Instant::now() >= deadline {
            return (seen, attempts);
        }
    }
}

/// What the last failed attempt observed, and its likely cause.
fn diagnose(
    cfg: &Config,
    family: Family,
    me: Me,
    probe: SocketAddr,
    last: Seen,
    attempts: u32,
) -> (String, String) {
    let is_proxy = cfg.proxy_uids.iter().any(|u| u.get() == me.uid)
        || cfg.proxy_gids.iter().any(|g| g.get() == me.gid);
    let rules_missing = rules_missing(cfg, family);
    let not_redirected = if is_proxy {
        rules_missing.clone()
    } else {
        not_proxy(cfg, family, me)
    };
    let after = format!("after {attempts} attempts");
    match last {
        Seen::Refused => (
            format!("connection refused ({after}): nothing redirected it, and nothing listens at {probe}"),
            not_redirected,
        ),
        Seen::TimedOut => (
            format!("no answer: the connection attempt timed out ({after})"),
            "packets to the probe address are dropped (a DROP rule, or a policy in the pod's network namespace)".into(),
        ),
        Seen::Unreachable(e) => (
            format!("{} ({after})", e.desc()),
            match family {
                Family::V6 => format!(
                    "{probe} is not reachable: IPv6 needs ::6/128 on lo, which istio-init adds when it programs IPv6 rules (or IPv6 is disabled on lo)"
                ),
                Family::V4 => "the loopback interface is down or has no 127.0.0.0/8 route".into(),
            },
        ),
        Seen::WrongPort { listener, original } => (
            format!("redirected to {listener}, but its original destination was {original}, not {probe}"),
            "another rule rewrites the probe's destination before Istio's rules, or the probe port is wrong (--iptables-probe-port)".into(),
        ),
        Seen::NoNat { listener } => (
            format!("{listener} got the connection without NAT (no SO_ORIGINAL_DST)"),
            format!("{probe} is routed to the listener directly instead of being redirected; {rules_missing}"),
        ),
        Seen::Elsewhere => (
            format!("the connection to {probe} was accepted, but not by the proxy's ports: it was not redirected"),
            format!("a process listens on port {} itself; {not_redirected}", probe.port()),
        ),
        Seen::Local(e) => (e, "the validation could not open its probe socket".into()),
        Seen::Redirected { .. } => unreachable!("success returns early"),
    }
}

/// The cause when the check does not run as the proxy's user.
fn not_proxy(cfg: &Config, family: Family, me: Me) -> String {
    format!(
        "this check runs as uid {} gid {}, but the rules only redirect the proxy's own traffic (uid {}, gid {}) to {}: run the validation as the proxy user (runAsUser: {})",
        me.uid,
        me.gid,
        join(&cfg.proxy_uids),
        join(&cfg.proxy_gids),
        passthrough(family),
        cfg.proxy_uids.first().map_or(1337, |u| u.get())
    )
}

/// The cause when the proxy's own traffic is not redirected.
fn rules_missing(cfg: &Config, family: Family) -> String {
    format!(
        "the {family} redirect rules are not in place (nat OUTPUT has no rule sending the proxy's traffic to {} to port {}): with istio-cni, the CNI plugin has not programmed this pod yet or failed (see the istio-cni node agent's log; istio-cni's repair deletes pods whose istio-validation exits 126); with istio-init, it did not run or its rules were removed",
        passthrough(family),
        cfg.inbound_capture_port
    )
}

/// Checks every family; logs each success and returns a [`ValidationFailed`] naming every
/// family that failed.
pub fn validate(cfg: &Config, families: &[Family]) -> Result<(), ValidationFailed> {
    let me = Me {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    };
    let mut failures = Vec::new();
    for f in families {
        log::info!(
            "validating {f} interception: dialing {}:{} (timeout {:?})",
            passthrough(*f),
            cfg.probe_port,
            cfg.probe_timeout
        );
        match check_family(cfg, *f, me) {
            Ok(detail) => log::info!("validation passed: {detail}"),
            Err(why) => failures.push(format!("  {f}: {why}")),
        }
    }
    if failures.is_empty() {
        log::info!(
            "iptables validation passed for {}",
            families
                .iter()
                .map(|f| f.label())
                .collect::<Vec<_>>()
                .join(" and ")
        );
        return Ok(());
    }
    Err(ValidationFailed(format!(
        "iptables validation failed; workload is not ready for Istio.\n{}",
        failures.join("\n")
    )))
}
