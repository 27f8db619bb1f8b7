//! The whole configuration pipeline from an arbitrary command line and environment:
//! `cli::parse` → `check_env_encoding` → `Config::resolve` → `ruleset::build` (both families)
//! → rendering. Never a panic; every refusal is one line; every accepted configuration gives
//! a sound ruleset whose text holds nothing but option words and safe value tokens, and a
//! config dump of exactly one line per setting.
//!
//! Input format (so that seeds are readable and mutations stay meaningful): lines; `ENV N=V`
//! sets env var N, `DNS <ip>` adds a resolv.conf nameserver, `IPV6` enables IPv6 rules, any
//! other line is one argv word (bytes as given, so non-UTF-8 reaches the parser). In words and
//! values `\n` stands for a newline and `\0` for NUL, which the line format cannot carry.
#![no_main]

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use fuzz_checks::{assert_one_line, check_ruleset};
use istio_init::settings::cli;
use istio_init::settings::config::{Config, Inputs, check_env_encoding};
use istio_init::capture::{Facts, build};
use libfuzzer_sys::fuzz_target;

fn unescape(raw: &[u8]) -> OsString {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match (raw[i], raw.get(i + 1)) {
            (b'\\', Some(b'n')) => {
                out.push(b'\n');
                i += 2;
            }
            (b'\\', Some(b'0')) => {
                out.push(0);
                i += 2;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    OsStr::from_bytes(&out).to_owned()
}

fuzz_target!(|data: &[u8]| {
    let mut argv: Vec<OsString> = vec!["istio-init".into()];
    let mut env: BTreeMap<String, OsString> = BTreeMap::new();
    let mut facts = Facts::default();
    for line in data.split(|&b| b == b'\n') {
        if let Some(kv) = line.strip_prefix(b"ENV ") {
            let at = kv.iter().position(|&b| b == b'=').unwrap_or(kv.len());
            let value = kv.get(at + 1..).unwrap_or_default();
            env.insert(
                String::from_utf8_lossy(&kv[..at]).into_owned(),
                unescape(value),
            );
        } else if let Some(ip) = line.strip_prefix(b"DNS ") {
            if let Some(ip) = std::str::from_utf8(ip).ok().and_then(|s| s.parse().ok()) {
                facts.dns_servers.push(ip);
            }
        } else if line == b"IPV6" {
            facts.ipv6 = true;
        } else {
            argv.push(unescape(line));
        }
    }
    if argv.len() > 64 {
        return;
    }

    if let Err(e) = check_env_encoding(&|name| env.get(name).cloned()) {
        assert_one_line(&e.to_string());
        return;
    }
    let inv = match cli::parse(&argv) {
        Ok(inv) => inv,
        Err(e) => {
            if e.kind() == clap::error::ErrorKind::InvalidUtf8 {
                assert_one_line(e.to_string().trim_end());
            }
            return;
        }
    };
    let lookup = |name: &str| {
        env.get(name)
            .map(|v| v.to_str().expect("checked by check_env_encoding").to_owned())
    };
    let cfg = match Config::resolve(&Inputs {
        defaults: inv.defaults,
        flags: &inv.flags,
        env: &lookup,
        user_uid: &|_| None,
        pod: &istio_init::settings::config::NO_POD,
    }) {
        Ok(cfg) => cfg,
        Err(e) => {
            assert_one_line(&e.to_string());
            return;
        }
    };
    let dump = cfg.dump();
    assert_eq!(
        dump.lines().count(),
        cfg.provenance.len(),
        "the config dump is not one line per setting:\n{dump}"
    );
    for family in facts.families() {
        check_ruleset(&build(&cfg, &facts).family(family));
    }
});
