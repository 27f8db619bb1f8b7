//! The parsers of the files istio-init reads: resolv.conf, /proc/net/if_inet6 and passwd.
//! Never a panic; every nameserver becomes a safe address token, listed once; skipped
//! entries are single words; addresses on `lo` never count for IPv6.
#![no_main]

use fuzz_checks::assert_safe_token;
use istio_init::host::{parse_if_inet6, parse_passwd_uid, parse_resolv_conf};
use istio_init::net::Cidr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (servers, skipped) = parse_resolv_conf(&text);
    for (i, s) in servers.iter().enumerate() {
        assert!(!servers[..i].contains(s), "{s} listed twice");
        assert_safe_token(&Cidr::host(*s).to_string());
    }
    for s in skipped {
        assert!(!s.is_empty() && !s.chars().any(char::is_whitespace), "{s:?}");
    }
    for a in parse_if_inet6(&text) {
        assert_ne!(a.iface, "lo");
    }
    let _ = parse_passwd_uid(&text, "istio-proxy");
});
