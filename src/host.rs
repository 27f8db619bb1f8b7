//! Read-only facts about the host and the current network namespace: the proxy user's uid,
//! whether the namespace has a global IPv6 address, and the resolv.conf nameservers.
//!
//! Effects: reads files only (`/etc/passwd`, `/proc/thread-self/net/if_inet6`, resolv.conf).
//! The parsers are pure functions over the file contents, tested with literals.

use std::net::IpAddr;

use anyhow::Context;

use crate::exit::UsageError;
use crate::net::{Family, Group};
use crate::settings::config::{Config, ConfigError, Ipv6Mode, OwnerGroups, Source};

/// Looks a user up in `/etc/passwd` (no NSS: the init image has no name service).
pub fn passwd_uid(user: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    parse_passwd_uid(&text, user)
}

/// Finds `user`'s uid in passwd-format text.
pub fn parse_passwd_uid(text: &str, user: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == user)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}

/// Looks a group up in `/etc/group` (for owner-group rules in `trace`).
pub fn group_gid(group: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    parse_passwd_uid(&text, group)
}

/// The IPv6 decision and the reason, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Decision {
    pub enabled: bool,
    pub reason: String,
}

/// A global IPv6 address as listed by `/proc/net/if_inet6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inet6Addr {
    pub addr: std::net::Ipv6Addr,
    pub iface: String,
}

/// Parses `/proc/net/if_inet6` and returns the global-scope addresses that are not on `lo`.
pub fn parse_if_inet6(text: &str) -> Vec<Inet6Addr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [hex, _idx, _plen, scope, _flags, iface] = f[..] else {
            continue;
        };
        if scope != "00" || iface == "lo" || hex.len() != 32 {
            continue;
        }
        let Ok(bits) = u128::from_str_radix(hex, 16) else {
            continue;
        };
        out.push(Inet6Addr {
            addr: std::net::Ipv6Addr::from(bits),
            iface: iface.to_owned(),
        });
    }
    out
}

/// Decides whether to program IPv6 from the configuration and, in `auto` mode, from the
/// current network namespace's addresses. Unlike istio-iptables, which looks at the first
/// address only, any global IPv6 address on any interface but `lo` enables IPv6.
pub fn decide_ipv6(cfg: &Config) -> Ipv6Decision {
    let source = cfg
        .provenance
        .iter()
        .find(|p| p.key == "ENABLE_INBOUND_IPV6")
        .map(|p| p.source.clone())
        .unwrap_or(Source::Default);
    match cfg.ipv6 {
        Ipv6Mode::On => Ipv6Decision {
            enabled: true,
            reason: format!("enabled by {source}"),
        },
        Ipv6Mode::Off => Ipv6Decision {
            enabled: false,
            reason: format!("disabled by {source}"),
        },
        Ipv6Mode::Auto => match crate::sys::read_proc("/proc/thread-self/net/if_inet6") {
            Err(_) => Ipv6Decision {
                enabled: false,
                reason: "IPv6 is disabled in this kernel or namespace (no /proc/net/if_inet6)"
                    .into(),
            },
            Ok(text) => decide_from_addresses(&parse_if_inet6(&text)),
        },
    }
}

fn decide_from_addresses(addrs: &[Inet6Addr]) -> Ipv6Decision {
    match addrs.first() {
        Some(a) => Ipv6Decision {
            enabled: true,
            reason: format!(
                "the namespace has the global IPv6 address {} on {}{}",
                a.addr,
                a.iface,
                match addrs.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                }
            ),
        },
        None => Ipv6Decision {
            enabled: false,
            reason: "the namespace has no global IPv6 address".into(),
        },
    }
}

/// Nameservers from resolv.conf text. Zoned link-local servers (`fe80::1%eth0`) cannot be
/// written as a rule destination and are skipped, as are unparsable entries.
pub fn parse_resolv_conf(text: &str) -> (Vec<IpAddr>, Vec<String>) {
    let mut servers = Vec::new();
    let mut skipped = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(value) = words.next() else { continue };
        match value.parse::<IpAddr>() {
            Ok(ip) if !servers.contains(&ip) => servers.push(ip),
            Ok(_) => {}
            Err(_) => skipped.push(value.to_owned()),
        }
    }
    (servers, skipped)
}

/// resolv.conf is a few hundred bytes; anything above this is not a resolv.conf.
pub const MAX_RESOLV_CONF: u64 = 1 << 20;

/// Annotations files and pod manifests: Kubernetes caps a pod's annotations at 256 KiB; a
/// manifest with managed fields stays far below this.
pub const MAX_POD_FILE: u64 = 4 << 20;

/// Reads standard input up to `max` bytes (`--pod -`).
pub fn read_stdin(max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// Reads a small configuration file the tool is pointed at. It must be a regular file (a FIFO
/// or a device would block or never end: the open is non-blocking and the type is checked on
/// the open handle, so there is no race) of at most `max` bytes.
pub fn read_config_file(path: &str, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// Reads the DNS servers to capture. A missing or unreadable file is an input error: DNS
/// capture was asked for and cannot be configured.
pub fn dns_servers(cfg: &Config, ipv6: bool) -> anyhow::Result<Vec<IpAddr>> {
    let path = &cfg.resolv_conf;
    let bytes = read_config_file(path, MAX_RESOLV_CONF)
        .map_err(|e| {
            UsageError(format!(
                "cannot read {path} for --redirect-dns: {e}; set --resolv-conf or --capture-all-dns"
            ))
        })
        .with_context(|| "reading the DNS servers")?;
    // Nameservers are ASCII; a stray non-UTF-8 byte elsewhere (a comment, a search domain)
    // must not fail the pod, and one inside a nameserver value makes it unparsable (skipped).
    let text = String::from_utf8_lossy(&bytes);
    let (servers, skipped) = parse_resolv_conf(&text);
    for s in skipped {
        log::warn!("ignoring nameserver {s:?} in {path}: not a plain IP address");
    }
    // All of them are kept: a nameserver of a disabled family still turns DNS capture on
    // (as in Istio), though no rule names it.
    for s in servers
        .iter()
        .filter(|a| !ipv6 && Family::of(a) == Family::V6)
    {
        log::info!("not capturing DNS to {s}: IPv6 rules are disabled");
    }
    Ok(servers)
}

/// Whether `name` is a group in group(5)-format text.
pub fn group_exists(text: &str, name: &str) -> bool {
    text.lines().any(|l| l.split(':').next() == Some(name))
}

/// Checks that every owner group given by name exists in `/etc/group`: iptables resolves the
/// names there when it applies the rules (this process and iptables see the same root
/// filesystem), and a missing one would fail the restore half-way. An input error (exit 2)
/// before anything is touched.
pub fn check_group_names(cfg: &Config) -> anyhow::Result<()> {
    let (groups, key) = match &cfg.owner_groups {
        OwnerGroups::AllExcept(g) => (g, "OUTBOUND_OWNER_GROUPS_EXCLUDE"),
        OwnerGroups::Only(g) => (g, "OUTBOUND_OWNER_GROUPS_INCLUDE"),
    };
    let names: Vec<&str> = groups
        .iter()
        .filter_map(|g| match g {
            Group::Name(n) => Some(n.as_str()),
            Group::Id(_) => None,
        })
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let path = "/etc/group";
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let source = cfg
        .provenance
        .iter()
        .find(|p| p.key == key)
        .map(|p| p.source.clone())
        .unwrap_or(Source::Default);
    match names.into_iter().find(|n| !group_exists(&text, n)) {
        None => Ok(()),
        Some(missing) => Err(ConfigError {
            what: "group".into(),
            value: missing.to_owned(),
            source,
            reason: format!(
                "no such group in {path}, where iptables looks group names up; use the numeric GID"
            ),
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup() {
        let text = "root:x:0:0:root:/root:/bin/sh\nistio-proxy:x:1337:1337::/:/sbin/nologin\n";
        assert_eq!(parse_passwd_uid(text, "istio-proxy"), Some(1337));
        assert_eq!(parse_passwd_uid(text, "nobody"), None);
    }

    #[test]
    fn if_inet6_global_addresses() {
        let text = "\
00000000000000000000000000000001 01 80 10 80       lo
20010db8000000000000000000000002 02 40 00 80     eth0
fe80000000000000a8bbccfffedd0011 02 40 20 80     eth0
00000000000000000000000000000006 01 80 00 80       lo
";
        let addrs = parse_if_inet6(text);
        assert_eq!(addrs.len(), 1);
        assert_eq!(addrs[0].addr.to_string(), "2001:db8::2");
        assert_eq!(addrs[0].iface, "eth0");
        assert!(decide_from_addresses(&addrs).enabled);
        assert!(!decide_from_addresses(&[]).enabled);
    }

    #[test]
    fn group_lookup() {
        let text = "root:x:0:\njava:x:1001:app\n";
        assert!(group_exists(text, "java"));
        assert!(!group_exists(text, "jav"));
        assert!(!group_exists(text, "x"));
    }

    #[test]
    fn resolv_conf() {
        let text = "search svc.cluster.local\nnameserver 10.96.0.10\n nameserver ::127.0.0.53\nnameserver fe80::1%eth0\nnameserver 10.96.0.10\noptions ndots:5\n";
        let (servers, skipped) = parse_resolv_conf(text);
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[1].to_string(), "::7f00:35");
        assert_eq!(skipped, ["fe80::1%eth0"]);
    }
}
