//! No injection through values: every flag and env var whose value can reach the restore text
//! (or the routing state) is fed hostile values — whitespace, a newline followed by a rule,
//! quotes, `-j`, `#`, shell syntax, control characters, non-UTF-8 bytes, NUL — through every
//! way it can be given: long flag, short flag, each env var, and from the pod — its annotation
//! in a Downward API file (`--annotations`), in a Pod manifest (`--pod`), and each env var as
//! `proxyMetadata` of the `proxy.istio.io/config` annotation. Each must exit 2 with one line
//! naming what was wrong, the value and where it came from, and print nothing on stdout.
//!
//! A positive control per field proves the field really reaches the dry-run text (so the
//! rejections are not vacuous), and a coverage check makes sure a new value option cannot be
//! added to the option table without being listed here.
//!
//! NUL cannot cross `execve` (argv and environ are C strings); it is fed to the in-process
//! pipeline (`cli::parse` + `istio_init::resolve`) instead, and the OS boundary is checked too.
//! Annotation files can carry it (`\x00`), so the file channels get NUL payloads as well.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::Output;

use istio_init::settings::annotations::{self, key};
use istio_init::settings::cli::{self, Kind};

use crate::util::{TempDir, istio_init, output, stderr, stdout};

/// A value that can reach the ruleset (or the routes), as the error messages name it.
#[derive(Debug)]
struct Field {
    /// Long option name, or the env var name for env-only settings.
    key: &'static str,
    /// The noun of the error message (`invalid <what> "…"`).
    what: &'static str,
    /// Lists name the bad item (trimmed); single values name the value as given.
    list: bool,
    /// A valid value, distinct from every default, that shows up in the dry-run text.
    base: &'static str,
    /// Extra arguments the positive control needs for the value to be rendered.
    context: &'static [&'static str],
    /// Whether `base` appears as a token of the restore text (route tables and the probe port
    /// do not: they configure routing and validation).
    rendered: bool,
}

const fn field(key: &'static str, what: &'static str, list: bool, base: &'static str) -> Field {
    Field {
        key,
        what,
        list,
        base,
        context: &[],
        rendered: true,
    }
}

const TPROXY: &[&str] = &["-m", "TPROXY"];

static FIELDS: &[Field] = &[
    field("envoy-port", "port", false, "15011"),
    field("inbound-capture-port", "port", false, "15007"),
    field("inbound-tunnel-port", "port", false, "15009"),
    field("proxy-uid", "uid", true, "1400"),
    field("proxy-gid", "gid", true, "1401"),
    field("istio-inbound-ports", "port", true, "8081"),
    Field {
        context: &["-b", "*"],
        ..field("istio-local-exclude-ports", "port", true, "8082")
    },
    field("istio-exclude-interfaces", "interface name", true, "eth7"),
    field("istio-service-cidr", "CIDR", true, "10.9.0.0/16"),
    field("istio-service-exclude-cidr", "CIDR", true, "10.8.0.0/16"),
    field("istio-outbound-ports", "port", true, "8083"),
    field("istio-local-outbound-ports-exclude", "port", true, "8084"),
    field("kube-virt-interfaces", "interface name", true, "veth7"),
    Field {
        context: TPROXY,
        ..field("istio-inbound-tproxy-mark", "mark", false, "1400")
    },
    Field {
        rendered: false,
        ..field(
            "istio-inbound-tproxy-route-table",
            "route table",
            false,
            "140",
        )
    },
    Field {
        rendered: false,
        ..field("iptables-probe-port", "port", false, "15012")
    },
    Field {
        rendered: false,
        ..field(
            "istio-inbound-interception-mode",
            "interception mode",
            false,
            "TPROXY",
        )
    },
    Field {
        rendered: false,
        ..field("probe-timeout", "duration", false, "7s")
    },
    field("status-port", "status port", false, "15030"),
    Field {
        rendered: false,
        ..field("xtables-wait", "wait", false, "31")
    },
    Field {
        rendered: false,
        ..field("restore-timeout", "duration", false, "45s")
    },
    Field {
        rendered: false,
        ..field("force-iptables-binary", "iptables backend", false, "nft")
    },
    Field {
        rendered: false,
        ..field("ipv6", "IPv6 mode", false, "false")
    },
    Field {
        rendered: false,
        ..field("log_output_level", "log level", true, "default:debug")
    },
    field("ISTIO_OUTBOUND_OWNER_GROUPS", "group", true, "javagrp"),
    field(
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        "group",
        true,
        "pythongrp",
    ),
    field(
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        "IPv4 loopback CIDR",
        false,
        "127.0.0.1/8",
    ),
];

/// Value options that never reach the ruleset, and why they need no hostile-value rows.
const NOT_RENDERED: &[(&str, &str)] = &[
    (
        "resolv-conf",
        "a path, only opened (bad paths are rows of bad_input.rs)",
    ),
    ("network-namespace", "a path, only logged"),
    (
        "netns",
        "a path or PID, only opened for setns (bad values are rows of bad_input.rs)",
    ),
    (
        "annotations",
        "a path; the file's contents are the annotation channels here",
    ),
    (
        "pod",
        "a path; the manifest's contents are the annotation channels here",
    ),
    ("log_target", "accepted for compatibility and ignored"),
    ("log_caller", "accepted for compatibility and ignored"),
    (
        "log_stacktrace_level",
        "accepted for compatibility and ignored",
    ),
    ("log_rotate", "accepted for compatibility and ignored"),
    (
        "log_rotate_max_age",
        "accepted for compatibility and ignored",
    ),
    (
        "log_rotate_max_backups",
        "accepted for compatibility and ignored",
    ),
    (
        "log_rotate_max_size",
        "accepted for compatibility and ignored",
    ),
    ("vklog", "accepted for compatibility and ignored"),
];

/// Hostile text appended to a field's valid value. None contains a comma (so a list has
/// exactly one bad item) and none is valid once trimmed.
const SUFFIXES: &[&str] = &[
    " -j ACCEPT",
    "\n-A OUTPUT -j ACCEPT",
    "\r\n-A OUTPUT -j ACCEPT",
    "\n\nCOMMIT\n*filter\n-A INPUT -j DROP",
    "\t-j",
    "\u{b}-j",
    "\u{2028}-A OUTPUT -j ACCEPT",
    "\"",
    "'",
    "\" -j ACCEPT \"",
    " #",
    "#x",
    ";reboot",
    "$(id)",
    "`id`",
    "\u{1b}[2J",
    "\u{7f}",
    "\u{ff10}",
];

/// Hostile values given on their own.
const WHOLE: &[&str] = &[
    "-j",
    "-j ACCEPT",
    "--to-ports 1",
    "\"80\"",
    "'eth0'",
    "#",
    "\n-A OUTPUT -j ACCEPT",
    "* nat",
    "!",
];

fn payloads(f: &Field, via: &Via) -> Vec<String> {
    let mut v: Vec<String> = SUFFIXES
        .iter()
        .map(|s| format!("{}{s}", f.base))
        .chain(WHOLE.iter().map(|w| (*w).to_owned()))
        .collect();
    if via.is_file() {
        // Files can carry what execve cannot.
        v.push(format!("{}\0", f.base));
        v.push(format!("{}\0-j ACCEPT", f.base));
    }
    v
}

/// How a value is given.
#[derive(Debug, Clone)]
enum Via {
    /// `--long VALUE` (two words) or `--long=VALUE`.
    Long {
        eq: bool,
    },
    /// `-s VALUE`.
    Short,
    Env(&'static str),
    /// The pod annotation, in a Downward API annotations file (`--annotations`).
    Annotation(&'static str),
    /// The pod annotation, in a Pod manifest (`--pod`, JSON).
    Manifest(&'static str),
    /// The env var as `proxyMetadata` in the pod's `proxy.istio.io/config` annotation.
    Metadata(&'static str),
}

impl Via {
    /// The source as error messages name it.
    fn source(&self, f: &Field) -> String {
        match self {
            Via::Env(name) => format!("env {name}"),
            Via::Annotation(k) | Via::Manifest(k) => format!("annotation {k}"),
            Via::Metadata(name) => {
                format!("annotation {} (proxyMetadata.{name})", key::PROXY_CONFIG)
            }
            Via::Long { .. } | Via::Short => match cli::find(f.key).and_then(|o| o.short) {
                Some(s) => format!("--{} (-{s})", f.key),
                None => format!("--{}", f.key),
            },
        }
    }

    fn is_file(&self) -> bool {
        matches!(
            self,
            Via::Annotation(_) | Via::Manifest(_) | Via::Metadata(_)
        )
    }

    fn is_argv_or_env(&self) -> bool {
        !self.is_file()
    }
}

/// The pod annotations that set an option, as the injector reads them.
fn annotation_keys(long: &str) -> Vec<&'static str> {
    let mut keys: Vec<&'static str> = annotations::OPTION_ANNOTATIONS
        .iter()
        .filter(|(_, l)| *l == long)
        .map(|(k, _)| *k)
        .collect();
    match long {
        "kube-virt-interfaces" => keys.push(key::REROUTE_VIRTUAL_INTERFACES),
        "istio-inbound-interception-mode" => keys.push(key::INTERCEPTION_MODE),
        _ => {}
    }
    keys
}

/// Every way a field can be given.
fn vias(f: &Field) -> Vec<Via> {
    let Some(o) = cli::find(f.key) else {
        return vec![Via::Env(f.key), Via::Metadata(f.key)];
    };
    let mut v = vec![Via::Long { eq: false }, Via::Long { eq: true }];
    if o.short.is_some() {
        v.push(Via::Short);
    }
    v.extend(o.env.iter().map(|e| Via::Env(e)));
    v.extend(o.env.iter().map(|e| Via::Metadata(e)));
    let keys = annotation_keys(f.key);
    v.extend(keys.iter().map(|k| Via::Annotation(k)));
    v.extend(keys.first().map(|k| Via::Manifest(k)));
    v
}

/// A double-quoted string that both Go's `strconv.Unquote` (the Downward API file) and YAML
/// read back exactly: printable ASCII as is, everything else escaped.
fn dq(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            ' '..='~' => out.push(c),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// Runs `istio-init --dry-run --ipv6=false <context> <field=value>`; file channels write their
/// file into `tmp`.
fn run(f: &Field, via: &Via, value: &OsStr, tmp: &TempDir) -> Output {
    let mut cmd = istio_init();
    cmd.args(["--dry-run"]);
    if f.key != "ipv6" {
        cmd.arg("--ipv6=false");
    }
    cmd.args(f.context);
    match via {
        Via::Long { eq: false } => {
            cmd.arg(format!("--{}", f.key)).arg(value);
        }
        Via::Long { eq: true } => {
            let mut a = OsString::from(format!("--{}=", f.key));
            a.push(value);
            cmd.arg(a);
        }
        Via::Short => {
            let s = cli::find(f.key).and_then(|o| o.short).unwrap();
            cmd.arg(format!("-{s}")).arg(value);
        }
        Via::Env(name) => {
            cmd.env(name, value);
        }
        Via::Annotation(k) => {
            let v = value.to_str().unwrap();
            let file = tmp.file("annotations", format!("{k}={}\n", dq(v)));
            cmd.arg("--annotations").arg(file);
        }
        Via::Metadata(name) => {
            let v = value.to_str().unwrap();
            let config = format!("proxyMetadata:\n  {name}: {}\n", dq(v));
            let file = tmp.file(
                "annotations",
                format!("{}={}\n", key::PROXY_CONFIG, dq(&config)),
            );
            cmd.arg("--annotations").arg(file);
        }
        Via::Manifest(k) => {
            let v = value.to_str().unwrap();
            let pod = serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "hostile", "annotations": {*k: v}},
            });
            let file = tmp.file("pod.json", pod.to_string());
            cmd.arg("--pod").arg(file);
        }
    }
    output(&mut cmd)
}

/// The exact start of the error line for a bad value, up to the reason.
fn expected_head(f: &Field, via: &Via, value: &str) -> String {
    let shown = if f.list { value.trim() } else { value };
    format!("error: invalid {} {shown:?} in {}: ", f.what, via.source(f))
}

/// Exit 2, nothing on stdout, exactly one line on stderr.
fn assert_refused(o: &Output, context: &str) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{context}: {err}");
    assert!(o.stdout.is_empty(), "{context}: stdout: {}", stdout(o));
    assert!(
        err.ends_with('\n') && err.matches('\n').count() == 1,
        "{context}: not one line: {err:?}"
    );
    err
}

#[test]
fn every_value_option_is_covered() {
    for o in cli::OPTIONS.iter().filter(|o| o.kind == Kind::Value) {
        let covered = FIELDS.iter().any(|f| f.key == o.long);
        let exempt = NOT_RENDERED.iter().any(|(k, _)| *k == o.long);
        assert!(
            covered != exempt,
            "--{}: list it in FIELDS (hostile values) or NOT_RENDERED (with the reason), once",
            o.long
        );
    }
    for e in cli::ENV_ONLY.iter().filter(|e| e.name != "ENVOY_USER") {
        assert!(
            FIELDS.iter().any(|f| f.key == e.name),
            "{} not covered",
            e.name
        );
    }
}

#[test]
fn positive_control_every_field_reaches_the_ruleset() {
    let tmp = TempDir::new("inj-control");
    for f in FIELDS {
        for via in vias(f) {
            let o = run(f, &via, OsStr::new(f.base), &tmp);
            assert!(o.status.success(), "{f:?} {via:?}: {}", stderr(&o));
            if f.rendered {
                let text = stdout(&o);
                let found = text
                    .lines()
                    .filter(|l| l.starts_with("-A ") || l.starts_with("-I "))
                    .any(|l| l.split(' ').any(|tok| tok == f.base));
                assert!(
                    found,
                    "{f:?} {via:?}: {} is not a token of:\n{text}",
                    f.base
                );
            }
        }
    }
}

fn hostile_values_are_refused(select: impl Fn(&Via) -> bool) {
    let tmp = TempDir::new("inj-hostile");
    let mut checked = 0;
    for f in FIELDS {
        for via in vias(f).into_iter().filter(|v| select(v)) {
            for value in payloads(f, &via) {
                let o = run(f, &via, OsStr::new(&value), &tmp);
                let ctx = format!("{} via {via:?} = {value:?}", f.key);
                let err = assert_refused(&o, &ctx);
                let head = expected_head(f, &via, &value);
                assert!(err.starts_with(&head), "{ctx}:\n want {head}…\n  got {err}");
                assert!(err.len() > head.len() + 1, "{ctx}: no reason: {err}");
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "only {checked} cases");
}

#[test]
fn hostile_values_in_long_flags_are_refused() {
    hostile_values_are_refused(|v| matches!(v, Via::Long { .. }));
}

#[test]
fn hostile_values_in_short_flags_are_refused() {
    hostile_values_are_refused(|v| matches!(v, Via::Short));
}

#[test]
fn hostile_values_in_env_vars_are_refused() {
    hostile_values_are_refused(|v| matches!(v, Via::Env(_)));
}

#[test]
fn hostile_values_in_annotation_files_are_refused() {
    hostile_values_are_refused(|v| matches!(v, Via::Annotation(_)));
}

#[test]
fn hostile_values_in_pod_manifests_are_refused() {
    hostile_values_are_refused(|v| matches!(v, Via::Manifest(_)));
}

#[test]
fn hostile_values_in_proxy_metadata_are_refused() {
    hostile_values_are_refused(|v| matches!(v, Via::Metadata(_)));
}

#[test]
fn non_utf8_bytes_are_refused_naming_the_byte() {
    let tmp = TempDir::new("inj-utf8");
    for f in FIELDS {
        // Annotation files are text: their non-UTF-8 rows are in bad_input.rs.
        for via in vias(f).into_iter().filter(Via::is_argv_or_env) {
            for raw in [
                [f.base.as_bytes(), b"\xff"].concat(),
                [b"\xc3(".as_slice(), f.base.as_bytes()].concat(),
                [f.base.as_bytes(), b"\xe2\x80 -j ACCEPT"].concat(),
            ] {
                let value = OsStr::from_bytes(&raw);
                let o = run(f, &via, value, &tmp);
                let ctx = format!("{} via {via:?} = {value:?}", f.key);
                let err = assert_refused(&o, &ctx);
                let at = std::str::from_utf8(&raw).unwrap_err().valid_up_to();
                let want = format!(
                    "error: invalid value {:?} in {}: not valid UTF-8 (byte 0x{:02x} at offset {at})\n",
                    String::from_utf8_lossy(&raw),
                    via.source(f),
                    raw[at]
                );
                assert_eq!(err, want, "{ctx}");
            }
        }
    }
}

#[test]
fn nul_cannot_cross_exec() {
    let err = istio_init().arg("80\0-j").output().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    let err = istio_init().env("PROXY_UID", "1\0").output().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
}

/// Resolves a command line and env in-process, as `main` would after parsing.
fn resolve_in_process(
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<istio_init::settings::config::Config, String> {
    let mut argv = vec!["istio-init"];
    argv.extend_from_slice(args);
    let inv = cli::parse(argv).map_err(|e| e.to_string())?;
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let var = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    istio_init::resolve(&inv, &istio_init::Env { var: &var }).map_err(|e| e.to_string())
}

#[test]
fn nul_bytes_are_refused_in_process() {
    for f in FIELDS {
        for via in vias(f).into_iter().filter(Via::is_argv_or_env) {
            for value in [
                format!("{}\0", f.base),
                format!("{}\0-j ACCEPT", f.base),
                format!("\0{}", f.base),
            ] {
                // --ipv6=false keeps IPv6 detection out of it, except for the ipv6 option itself.
                let ipv6_off: &[&str] = if f.key == "ipv6" {
                    &[]
                } else {
                    &["--ipv6=false"]
                };
                let got = match &via {
                    Via::Env(name) => resolve_in_process(ipv6_off, &[(name, &value)]),
                    Via::Annotation(_) | Via::Manifest(_) | Via::Metadata(_) => unreachable!(),
                    Via::Long { .. } | Via::Short => {
                        let flag = format!("--{}={value}", f.key);
                        resolve_in_process(&[ipv6_off, &[flag.as_str()]].concat(), &[])
                    }
                };
                let ctx = format!("{} via {via:?} = {value:?}", f.key);
                let err = got.expect_err(&ctx);
                let head = expected_head(f, &via, &value);
                let head = head.strip_prefix("error: ").unwrap();
                assert!(err.starts_with(head), "{ctx}:\n want {head}…\n  got {err}");
                assert!(!err.contains('\n') && !err.contains('\0'), "{ctx}: {err:?}");
            }
        }
    }
}

/// resolv.conf is the one file whose values reach the rules: only the first word after
/// `nameserver` is read, and only when it is a plain IP address. Hostile lines give either a
/// clean address token or nothing, and every rendered rule still parses under the grammar.
#[test]
fn resolv_conf_yields_address_tokens_only() {
    let tmp = TempDir::new("inj-resolv");
    let mut text = b"nameserver 198.18.0.53 -j ACCEPT\n\
        nameserver 198.18.0.54\n\
        -A OUTPUT -j ACCEPT\n\
        nameserver \"198.18.0.55\"\n\
        nameserver 198.18.0.56#x\n\
        nameserver 198.18.0.57;reboot\n\
        nameserver fe80::1%eth0\n\
        nameserver 198.18.0.58\x00\n\
        nameserver 198.18.0.59\xff\n\
        nameserver 198.18.0.53\n\
        nameserver\n"
        .to_vec();
    text.extend_from_slice(b"search a.svc.cluster.local\noptions ndots:5 -j ACCEPT\n");
    let path = tmp.file("resolv.conf", &text);
    let o = output(
        istio_init()
            .args(["--dry-run", "--redirect-dns", "--ipv6=false"])
            .arg("--resolv-conf")
            .arg(&path),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let mut servers = std::collections::BTreeSet::new();
    for line in out
        .lines()
        .filter(|l| l.starts_with("-A ") || l.starts_with("-I "))
    {
        crate::checks::parse_rule(line, istio_init::net::Family::V4)
            .unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(!line.ends_with("-j ACCEPT"), "{line}");
        let toks: Vec<&str> = line.split(' ').collect();
        for w in toks.windows(2) {
            if (w[0] == "-d" || w[0] == "-s") && w[1].starts_with("198.18.") {
                servers.insert(w[1].to_owned());
            }
        }
    }
    assert_eq!(
        servers.into_iter().collect::<Vec<_>>(),
        ["198.18.0.53/32", "198.18.0.54/32"],
        "{out}"
    );
    let err = stderr(&o);
    for skipped in ["\\\"198.18.0.55\\\"", "198.18.0.56#x", "fe80::1%eth0"] {
        assert!(err.contains(skipped), "{skipped} not reported:\n{err}");
    }
}
