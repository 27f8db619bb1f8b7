//! The bad-input corpus: one table of invalid inputs across flags, env vars, pod annotations
//! (Downward API files, Pod manifests, proxyMetadata) and the other files the
//! tool is pointed at. Every row must exit 2 with its own exact message and print nothing on
//! stdout (`--dry-run`), and — run for real inside a fresh network namespace, without
//! `--dry-run` — leave the namespace's netfilter (nft and legacy, IPv4 and IPv6) and policy
//! routing exactly as they were.
//!
//! The expected messages are written from the rules of each value type (see `src/net.rs` and
//! `src/settings/config.rs`), not recorded from the program's output.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::util::{Netns, istio_init, output, privileged, stderr, stdout};

/// Which part of stderr the expected message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// The whole of stderr: the value is refused before logging even starts.
    Only,
    /// The last line: the configuration was valid and logged, a file it names was not.
    Last,
    /// The first line of a command-line usage error (clap adds a usage hint below it).
    First,
}

#[derive(Debug)]
struct Row {
    name: String,
    args: Vec<OsString>,
    env: Vec<(String, OsString)>,
    /// The expected line, without the trailing newline.
    want: String,
    shape: Shape,
    /// Bytes fed to stdin (`--pod -`); stdin is closed when `None`.
    stdin: Option<Vec<u8>>,
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

fn row(name: &str, args: &[&str], env: &[(&str, &str)], want: &str) -> Row {
    Row {
        name: name.to_owned(),
        args: os(args),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect(),
        want: want.to_owned(),
        shape: Shape::Only,
        stdin: None,
    }
}

/// How error messages show a value: Rust string quoting, and values over 120 bytes cut
/// there with their full length appended (so a huge value still gives one short line).
fn shown(value: &str) -> String {
    if value.len() <= 120 {
        format!("{value:?}")
    } else {
        format!("{:?}… ({} bytes)", &value[..120], value.len())
    }
}

fn list(n: usize, item: impl Fn(usize) -> String) -> String {
    (1..=n).map(item).collect::<Vec<_>>().join(",")
}

/// Scratch files for the file rows, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("istio-init-bad-input-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let o = output(Command::new("mkfifo").arg(&fifo));
        assert!(o.status.success(), "mkfifo: {}", stderr(&o));
        let big = "nameserver 198.18.0.53\n".repeat((1 << 20) / 23 + 1);
        std::fs::write(dir.join("big"), big).unwrap();
        // 4 MiB + 1 of a valid annotations file.
        let line = format!("x.example.com/pad=\"{}\"\n", "p".repeat(1000));
        let mut huge = line.repeat((4 << 20) / line.len() + 1);
        huge.truncate((4 << 20) + 1);
        std::fs::write(dir.join("huge-annotations"), huge).unwrap();
        // Nesting a million levels deep (it used to overflow the stack).
        let deep = format!("{}a", "- ".repeat(1_000_000));
        std::fs::write(dir.join("pod-deep"), deep).unwrap();
        let deep_config = "{a: ".repeat(100);
        std::fs::write(
            dir.join("ann-deep-config"),
            format!("proxy.istio.io/config=\"{deep_config}\"\n"),
        )
        .unwrap();
        for (name, contents) in ANNOTATION_FILES {
            std::fs::write(dir.join(name), contents).unwrap();
        }
        Scratch(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }

    fn file(&self, name: &str, contents: &str) -> String {
        std::fs::write(self.0.join(name), contents).unwrap();
        self.path(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Annotations files (Downward API format) and pod manifests for the rows below.
const ANNOTATION_FILES: &[(&str, &[u8])] = &[
    ("ann-no-equals", b"traffic.sidecar.istio.io/excludeInboundPorts\n"),
    ("ann-unquoted", b"traffic.sidecar.istio.io/excludeInboundPorts=80\n"),
    ("ann-unterminated", b"traffic.sidecar.istio.io/excludeInboundPorts=\"80\n"),
    (
        "ann-duplicate",
        b"traffic.sidecar.istio.io/excludeInboundPorts=\"80\"\ntraffic.sidecar.istio.io/excludeInboundPorts=\"81\"\n",
    ),
    ("ann-raw-non-utf8", b"sidecar.istio.io/x=\"\xff\"\n"),
    ("ann-escaped-non-utf8", b"sidecar.istio.io/x=\"\\xff\"\n"),
    ("ann-unknown-escape", b"sidecar.istio.io/x=\"\\q\"\n"),
    ("ann-key-with-space", b"sidecar istio=\"x\"\n"),
    ("ann-proxy-config-yaml", b"proxy.istio.io/config=\"{\"\n"),
    ("ann-proxy-metadata-scalar", b"proxy.istio.io/config=\"proxyMetadata: 5\"\n"),
    (
        "ann-proxy-metadata-group",
        b"proxy.istio.io/config=\"proxyMetadata:\\n  ISTIO_OUTBOUND_OWNER_GROUPS: java app\\n\"\n",
    ),
    (
        "ann-hostile-interface",
        b"traffic.sidecar.istio.io/excludeInterfaces=\"eth0 -j ACCEPT\"\n",
    ),
    (
        "ann-newline-rule",
        b"traffic.sidecar.istio.io/excludeInboundPorts=\"80\\n-A OUTPUT -j ACCEPT\"\n",
    ),
    ("ann-nul", b"traffic.sidecar.istio.io/kubevirtInterfaces=\"veth\\x00\"\n"),
    ("ann-mode", b"sidecar.istio.io/interceptionMode=\"tproxy\"\n"),
    ("ann-cidr-33", b"traffic.sidecar.istio.io/excludeOutboundIPRanges=\"10.0.0.0/33\"\n"),
    ("ann-ipv6-capture", b"traffic.sidecar.istio.io/includeOutboundIPRanges=\"2001:db8::/32\"\n"),
    ("ann-status-port", b"status.sidecar.istio.io/port=\"65536\"\n"),
    ("pod-duplicate-json", b"{\"metadata\":{\"annotations\":{\"a\":\"1\",\"a\":\"2\"}}}"),
    ("pod-duplicate-yaml", b"metadata:\n  annotations:\n    a: \"1\"\n    a: \"2\"\n"),
    ("pod-truncated", b"{\"metadata\":"),
    ("pod-annotations-list", b"{\"metadata\":{\"annotations\":[\"a\"]}}"),
    (
        "pod-number-value",
        b"{\"metadata\":{\"annotations\":{\"traffic.sidecar.istio.io/excludeInboundPorts\":80}}}",
    ),
    ("pod-two-items", b"{\"kind\":\"List\",\"items\":[{\"metadata\":{}},{\"metadata\":{}}]}"),
    ("pod-empty", b""),
    ("pod-non-utf8", b"metadata:\n  name: \"\xc3\"\n"),
    (
        "pod-hostile-interface",
        b"{\"metadata\":{\"annotations\":{\"traffic.sidecar.istio.io/excludeInterfaces\":\"eth0\\n-A OUTPUT -j ACCEPT\"}}}",
    ),
];

const USAGE_HINT: &str = "; set --resolv-conf or --capture-all-dns";

fn rows(scratch: &Scratch) -> Vec<Row> {
    let mut rows = vec![
        // Ports: 0, 65536, empty, signs, other bases, ranges.
        row(
            "port 0",
            &["-p", "0"],
            &[],
            r#"invalid port "0" in --envoy-port (-p): port 0 is not a valid port (1-65535)"#,
        ),
        row(
            "port 65536",
            &["-p", "65536"],
            &[],
            r#"invalid port "65536" in --envoy-port (-p): out of range (1-65535)"#,
        ),
        row(
            "port empty",
            &["-z", ""],
            &[],
            r#"invalid port "" in --inbound-capture-port (-z): empty"#,
        ),
        row(
            "port blank",
            &["-e", " "],
            &[],
            r#"invalid port " " in --inbound-tunnel-port (-e): empty"#,
        ),
        row(
            "port negative",
            &["-p", "-1"],
            &[],
            r#"invalid port "-1" in --envoy-port (-p): not a number"#,
        ),
        row(
            "port overflowing u64",
            &["-p", "99999999999999999999999"],
            &[],
            r#"invalid port "99999999999999999999999" in --envoy-port (-p): out of range (1-65535)"#,
        ),
        row(
            "port hex",
            &["-p", "0x50"],
            &[],
            r#"invalid port "0x50" in --envoy-port (-p): not a number"#,
        ),
        row(
            "port exponent",
            &["-p", "1e3"],
            &[],
            r#"invalid port "1e3" in --envoy-port (-p): not a number"#,
        ),
        row(
            "port plus sign",
            &["-p", "+80"],
            &[],
            r#"invalid port "+80" in --envoy-port (-p): not a number"#,
        ),
        row(
            "port 0 in a list",
            &["-b", "80,0"],
            &[],
            r#"invalid port "0" in --istio-inbound-ports (-b): port 0 is not a valid port (1-65535)"#,
        ),
        row(
            "reversed range",
            &["-b", "9000:8000"],
            &[],
            r#"invalid port "9000:8000" in --istio-inbound-ports (-b): range 9000:8000 is reversed"#,
        ),
        row(
            "range end 65536",
            &["-d", "1:65536"],
            &[],
            r#"invalid port "1:65536" in --istio-local-exclude-ports (-d): range end: out of range (1-65535)"#,
        ),
        row(
            "range without end",
            &["-q", "80:"],
            &[],
            r#"invalid port "80:" in --istio-outbound-ports (-q): range end: empty"#,
        ),
        row(
            "range without start",
            &["-o", ":80"],
            &[],
            r#"invalid port ":80" in --istio-local-outbound-ports-exclude (-o): range start: empty"#,
        ),
        row(
            "dash range",
            &["-b", "80-90"],
            &[],
            r#"invalid port "80-90" in --istio-inbound-ports (-b): not a number"#,
        ),
        row(
            "three-part range",
            &["-b", "1:2:3"],
            &[],
            r#"invalid port "1:2:3" in --istio-inbound-ports (-b): range end: not a number"#,
        ),
        row(
            "wildcard inside a list",
            &["-b", "*,80"],
            &[],
            r#"invalid port "*" in --istio-inbound-ports (-b): not a number"#,
        ),
        row(
            "port 65536 from env",
            &[],
            &[("ISTIO_INBOUND_PORTS", "65536")],
            r#"invalid port "65536" in env ISTIO_INBOUND_PORTS: out of range (1-65535)"#,
        ),
        row(
            "port word from env",
            &[],
            &[("INBOUND_CAPTURE_PORT", "abc")],
            r#"invalid port "abc" in env INBOUND_CAPTURE_PORT: not a number"#,
        ),
        row(
            "probe port 0",
            &["--iptables-probe-port=0"],
            &[],
            r#"invalid port "0" in --iptables-probe-port: port 0 is not a valid port (1-65535)"#,
        ),
        // CIDRs.
        row(
            "/33",
            &["-i", "10.0.0.0/33"],
            &[],
            r#"invalid CIDR "10.0.0.0/33" in --istio-service-cidr (-i): prefix length /33 is longer than /32 for an IPv4 address"#,
        ),
        row(
            "/129",
            &["-x", "2001:db8::/129"],
            &[],
            r#"invalid CIDR "2001:db8::/129" in --istio-service-exclude-cidr (-x): prefix length /129 is longer than /128 for an IPv6 address"#,
        ),
        row(
            "/129 from env",
            &[],
            &[("ISTIO_SERVICE_CIDR", "2001:db8::/129")],
            r#"invalid CIDR "2001:db8::/129" in env ISTIO_SERVICE_CIDR: prefix length /129 is longer than /128 for an IPv6 address"#,
        ),
        row(
            "address without prefix",
            &["-i", "10.0.0.0"],
            &[],
            r#"invalid CIDR "10.0.0.0" in --istio-service-cidr (-i): missing prefix length (expected ADDRESS/LENGTH, e.g. 10.0.0.0/8)"#,
        ),
        row(
            "octet 256",
            &["-i", "10.0.0.256/8"],
            &[],
            r#"invalid CIDR "10.0.0.256/8" in --istio-service-cidr (-i): "10.0.0.256" is not an IP address"#,
        ),
        row(
            "negative prefix",
            &["-i", "10.0.0.0/-1"],
            &[],
            r#"invalid CIDR "10.0.0.0/-1" in --istio-service-cidr (-i): prefix length "-1" is not a number"#,
        ),
        row(
            "long prefix digits",
            &["-i", "10.0.0.0/0008"],
            &[],
            r#"invalid CIDR "10.0.0.0/0008" in --istio-service-cidr (-i): prefix length "0008" is not a number"#,
        ),
        row(
            "two prefixes",
            &["-x", "10.0.0.0/8/8"],
            &[],
            r#"invalid CIDR "10.0.0.0/8/8" in --istio-service-exclude-cidr (-x): prefix length "8/8" is not a number"#,
        ),
        row(
            "zoned address",
            &["-i", "fe80::1%eth0/64"],
            &[],
            r#"invalid CIDR "fe80::1%eth0/64" in --istio-service-cidr (-i): "fe80::1%eth0" is not an IP address"#,
        ),
        row(
            "exclude everything",
            &["-x", "*"],
            &[],
            r#"invalid CIDR "*" in --istio-service-exclude-cidr (-x): '*' cannot be excluded; to capture nothing outbound, set --istio-service-cidr (-i) to """#,
        ),
        // IPv6 ranges with IPv6 off (see Config::resolve for why only captures are refused).
        row(
            "IPv6 capture with --ipv6=false",
            &["--ipv6=false", "-i", "10.0.0.0/8,2001:db8::/32"],
            &[],
            r#"invalid CIDR "2001:db8::/32" in --istio-service-cidr (-i): an IPv6 range to capture, but IPv6 rules are disabled by --ipv6; remove the IPv6 ranges or set --ipv6=auto"#,
        ),
        row(
            "IPv6 capture with ISTIO_INIT_IPV6=false",
            &[],
            &[
                ("ISTIO_INIT_IPV6", "false"),
                ("ISTIO_SERVICE_CIDR", "fd00::/8"),
            ],
            r#"invalid CIDR "fd00::/8" in env ISTIO_SERVICE_CIDR: an IPv6 range to capture, but IPv6 rules are disabled by env ISTIO_INIT_IPV6; remove the IPv6 ranges or set --ipv6=auto"#,
        ),
        row(
            "IPv6 mode word",
            &["--ipv6=maybe"],
            &[],
            r#"invalid IPv6 mode "maybe" in --ipv6: expected auto, true or false"#,
        ),
        // UIDs, GIDs and owner groups.
        row(
            "negative uid",
            &["-u", "-1"],
            &[],
            r#"invalid uid "-1" in --proxy-uid (-u): negative ids are not valid"#,
        ),
        row(
            "uid (uid_t)-1",
            &["-u", "4294967295"],
            &[],
            r#"invalid uid "4294967295" in --proxy-uid (-u): out of range (0-4294967294)"#,
        ),
        row(
            "gid 2^32",
            &["-g", "4294967296"],
            &[],
            r#"invalid gid "4294967296" in --proxy-gid (-g): out of range (0-4294967294)"#,
        ),
        row(
            "gid overflowing u64",
            &["-g", "99999999999999999999"],
            &[],
            r#"invalid gid "99999999999999999999" in --proxy-gid (-g): out of range (0-4294967294)"#,
        ),
        row(
            "uid name",
            &["-u", "root"],
            &[],
            r#"invalid uid "root" in --proxy-uid (-u): not a number (numeric ids only)"#,
        ),
        row(
            "negative uid after an empty item",
            &["-u", "1337,,-5"],
            &[],
            r#"invalid uid "-5" in --proxy-uid (-u): negative ids are not valid"#,
        ),
        row(
            "fractional gid from env",
            &[],
            &[("PROXY_GID", "1.5")],
            r#"invalid gid "1.5" in env PROXY_GID: not a number (numeric ids only)"#,
        ),
        row(
            "negative group",
            &[],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS", "-1")],
            r#"invalid group "-1" in env ISTIO_OUTBOUND_OWNER_GROUPS: negative ids are not valid"#,
        ),
        row(
            "group name starting with a digit",
            &[],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS", "1java")],
            r#"invalid group "1java" in env ISTIO_OUTBOUND_OWNER_GROUPS: not a number and not a valid group name ([A-Za-z_][A-Za-z0-9_.-]*)"#,
        ),
        row(
            "group name 33 characters",
            &[],
            &[(
                "ISTIO_OUTBOUND_OWNER_GROUPS",
                "abcdefghijklmnopqrstuvwxyz0123456",
            )],
            r#"invalid group "abcdefghijklmnopqrstuvwxyz0123456" in env ISTIO_OUTBOUND_OWNER_GROUPS: group names are at most 32 characters"#,
        ),
        row(
            "group gid (gid_t)-1",
            &[],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "4294967295")],
            r#"invalid group "4294967295" in env ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE: out of range (0-4294967294)"#,
        ),
        row(
            "group name with a space",
            &[],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "java app")],
            r#"invalid group "java app" in env ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE: not a number and not a valid group name ([A-Za-z_][A-Za-z0-9_.-]*)"#,
        ),
        // Interface names.
        row(
            "16-character interface",
            &["-c", "abcdefghijklmnop"],
            &[],
            r#"invalid interface name "abcdefghijklmnop" in --istio-exclude-interfaces (-c): 16 bytes long; the kernel allows at most 15"#,
        ),
        row(
            "slash in interface",
            &["-k", "a/b"],
            &[],
            r#"invalid interface name "a/b" in --kube-virt-interfaces (-k): contains '/'; allowed are letters, digits, '_', '.', '-' and a trailing '+'"#,
        ),
        row(
            "colon in interface",
            &["-c", "eth0:1"],
            &[],
            r#"invalid interface name "eth0:1" in --istio-exclude-interfaces (-c): contains ':'; allowed are letters, digits, '_', '.', '-' and a trailing '+'"#,
        ),
        row(
            "interface '.'",
            &["-c", "."],
            &[],
            r#"invalid interface name "." in --istio-exclude-interfaces (-c): not a valid interface name"#,
        ),
        row(
            "interface starting with '-'",
            &["-c", "-eth0"],
            &[],
            r#"invalid interface name "-eth0" in --istio-exclude-interfaces (-c): must not start with '-'"#,
        ),
        row(
            "'+' inside an interface",
            &["-c", "eth+0"],
            &[],
            r#"invalid interface name "eth+0" in --istio-exclude-interfaces (-c): contains '+'; allowed are letters, digits, '_', '.', '-' and a trailing '+'"#,
        ),
        row(
            "non-ASCII interface from env",
            &[],
            &[("KUBE_VIRT_INTERFACES", "ethé")],
            r#"invalid interface name "ethé" in env KUBE_VIRT_INTERFACES: contains 'é'; allowed are letters, digits, '_', '.', '-' and a trailing '+'"#,
        ),
        // Marks and route tables.
        row(
            "mark 0",
            &["-t", "0"],
            &[],
            r#"invalid mark "0" in --istio-inbound-tproxy-mark (-t): mark 0 would match every unmarked packet"#,
        ),
        row(
            "mark 1338",
            &["-t", "1338"],
            &[],
            r#"invalid mark "1338" in --istio-inbound-tproxy-mark (-t): 1338 is reserved for the proxy's outbound loopback traffic"#,
        ),
        row(
            "mark 2^32",
            &["-t", "4294967296"],
            &[],
            r#"invalid mark "4294967296" in --istio-inbound-tproxy-mark (-t): out of range (0-4294967295)"#,
        ),
        row(
            "hex mark from env",
            &[],
            &[("ISTIO_INBOUND_TPROXY_MARK", "0x539")],
            r#"invalid mark "0x539" in env ISTIO_INBOUND_TPROXY_MARK: not a decimal number"#,
        ),
        row(
            "main route table",
            &["-r", "254"],
            &[],
            r#"invalid route table "254" in --istio-inbound-tproxy-route-table (-r): 0, 253, 254 and 255 are the kernel's reserved tables"#,
        ),
        row(
            "route table 0",
            &["-r", "0"],
            &[],
            r#"invalid route table "0" in --istio-inbound-tproxy-route-table (-r): 0, 253, 254 and 255 are the kernel's reserved tables"#,
        ),
        row(
            "empty route table",
            &["-r", ""],
            &[],
            r#"invalid route table "" in --istio-inbound-tproxy-route-table (-r): empty"#,
        ),
        // Modes, booleans, durations, backends, loopback.
        row(
            "lower-case mode",
            &["-m", "redirect"],
            &[],
            r#"invalid interception mode "redirect" in --istio-inbound-interception-mode (-m): expected REDIRECT, TPROXY or NONE (upper case)"#,
        ),
        row(
            "boolean 'on' from env",
            &[],
            &[("DROP_INVALID", "on")],
            r#"invalid boolean "on" in env DROP_INVALID: not a boolean (expected true or false)"#,
        ),
        row(
            "boolean flag word",
            &["--redirect-dns=maybe"],
            &[],
            r#"invalid boolean "maybe" in --redirect-dns: not a boolean (expected true or false)"#,
        ),
        row(
            "secondary env wins and is bad",
            &[],
            &[("REDIRECT_DNS", "true"), ("ISTIO_META_DNS_CAPTURE", "yes")],
            r#"invalid boolean "yes" in env ISTIO_META_DNS_CAPTURE: not a boolean (expected true or false)"#,
        ),
        row(
            "zero duration",
            &["--probe-timeout=0s"],
            &[],
            r#"invalid duration "0s" in --probe-timeout: must be longer than 0"#,
        ),
        row(
            "negative duration",
            &["--probe-timeout=-5s"],
            &[],
            r#"invalid duration "-5s" in --probe-timeout: not a duration (expected e.g. 5s, 500ms, 1m30s)"#,
        ),
        row(
            "huge duration",
            &["--probe-timeout=100000000h"],
            &[],
            r#"invalid duration "100000000h" in --probe-timeout: duration too large"#,
        ),
        row(
            "unknown backend",
            &["--force-iptables-binary=iptables-legacy"],
            &[],
            r#"invalid iptables backend "iptables-legacy" in --force-iptables-binary: expected legacy or nft"#,
        ),
        row(
            "unimplemented CNI mode from env",
            &[],
            &[("CNI_MODE", "true")],
            r#"invalid option "true" in env CNI_MODE: --cni-mode is not implemented by istio-init yet; remove it"#,
        ),
        row(
            "loopback /7",
            &[],
            &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/7")],
            r#"invalid IPv4 loopback CIDR "127.0.0.1/7" in env ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: mask must be between /8 and /32"#,
        ),
        row(
            "IPv6 loopback",
            &[],
            &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "::1/128")],
            r#"invalid IPv4 loopback CIDR "::1/128" in env ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: must be an IPv4 loopback prefix inside 127.0.0.0/8"#,
        ),
        row(
            "bad log level",
            &["--log_output_level=default:trace"],
            &[],
            r#"invalid log level "default:trace" in --log_output_level: expected debug, info, warn, error, fatal or none"#,
        ),
        // Quotes as a shell would have left them (unterminated, or kept literally).
        row(
            "unterminated double quote",
            &["-b", "\"80"],
            &[],
            r#"invalid port "\"80" in --istio-inbound-ports (-b): not a number"#,
        ),
        row(
            "unterminated single quote",
            &["-i", "'10.0.0.0/8"],
            &[],
            r#"invalid CIDR "'10.0.0.0/8" in --istio-service-cidr (-i): "'10.0.0.0" is not an IP address"#,
        ),
        row(
            "quoted item in an env list",
            &[],
            &[("ISTIO_LOCAL_EXCLUDE_PORTS", "15090,\"15021")],
            r#"invalid port "\"15021" in env ISTIO_LOCAL_EXCLUDE_PORTS: not a number"#,
        ),
        row(
            "literal quotes around a value",
            &["-c", "\"eth0\""],
            &[],
            r#"invalid interface name "\"eth0\"" in --istio-exclude-interfaces (-c): contains '"'; allowed are letters, digits, '_', '.', '-' and a trailing '+'"#,
        ),
        // Duplicate keys on the command line: the last one wins (pflag), and is validated.
        row(
            "duplicate flag, last bad",
            &["-p", "15001", "-p", "0"],
            &[],
            r#"invalid port "0" in --envoy-port (-p): port 0 is not a valid port (1-65535)"#,
        ),
        row(
            "duplicate flag, long then short",
            &["--envoy-port=0", "-p", "x"],
            &[],
            r#"invalid port "x" in --envoy-port (-p): not a number"#,
        ),
        row(
            "duplicate boolean, last bad",
            &["--redirect-dns", "--redirect-dns=maybe"],
            &[],
            r#"invalid boolean "maybe" in --redirect-dns: not a boolean (expected true or false)"#,
        ),
        row(
            "flag beats a bad env var, then is bad itself",
            &["-z", "0"],
            &[("INBOUND_CAPTURE_PORT", "abc")],
            r#"invalid port "0" in --inbound-capture-port (-z): port 0 is not a valid port (1-65535)"#,
        ),
        // The files the tool is pointed at (DNS capture reads resolv.conf).
        row(
            "empty resolv.conf path",
            &["--resolv-conf="],
            &[],
            r#"invalid path "" in --resolv-conf: empty"#,
        ),
    ];

    // The namespace to program and the legacy lock wait.
    let fifo = scratch.path("fifo");
    rows.extend([
        row("relative netns path", &["--netns", "netns/pod"], &[], r#"invalid network namespace "netns/pod" in --netns: expected an absolute path (/proc/PID/ns/net, /var/run/netns/NAME) or a PID"#),
        row("rule in a netns value", &["--netns", "1 -j ACCEPT"], &[], r#"invalid network namespace "1 -j ACCEPT" in --netns: expected an absolute path (/proc/PID/ns/net, /var/run/netns/NAME) or a PID"#),
        Row { shape: Shape::Last, ..row("missing netns file", &["--netns", "/nonexistent/netns"], &[], r#"invalid network namespace "/nonexistent/netns" in --netns: no such file (give /proc/PID/ns/net, /var/run/netns/NAME or a PID)"#) },
        Row { shape: Shape::Last, ..row("netns PID that does not exist", &[], &[("ISTIO_INIT_NETNS", "4294967295")], r#"invalid network namespace "/proc/4294967295/ns/net" in --netns: no such file (give /proc/PID/ns/net, /var/run/netns/NAME or a PID)"#) },
        Row { shape: Shape::Last, ..row("netns file that is not a namespace", &["--netns", "/etc/hostname"], &[], r#"invalid network namespace "/etc/hostname" in --netns: not a network namespace file"#) },
        row("negative xtables wait", &["--xtables-wait=-1"], &[], r#"invalid wait "-1" in --xtables-wait: expected whole seconds from 0 to 3600"#),
        row("restore timeout without a unit", &["--restore-timeout=5"], &[], r#"invalid duration "5" in --restore-timeout: not a duration (expected e.g. 5s, 500ms, 1m30s): missing unit"#),
        row("zero restore timeout", &[], &[("ISTIO_INIT_RESTORE_TIMEOUT", "0s")], r#"invalid duration "0s" in env ISTIO_INIT_RESTORE_TIMEOUT: must be longer than 0"#),
        row("xtables wait over an hour", &[], &[("ISTIO_INIT_XTABLES_WAIT", "3601")], r#"invalid wait "3601" in env ISTIO_INIT_XTABLES_WAIT: expected whole seconds from 0 to 3600"#),
    ]);
    rows.push(Row {
        shape: Shape::Last,
        ..row(
            "netns is a FIFO (would block)",
            &["--netns", &fifo],
            &[],
            &format!("invalid network namespace {fifo:?} in --netns: not a network namespace file"),
        )
    });

    // Usage errors: clap's first line (a usage hint follows).
    for (name, args, want) in [
        (
            "flag without its value",
            &["-p"][..],
            "error: a value is required for '--envoy-port <VALUE>' but none was supplied",
        ),
        (
            "unknown flag",
            &["--no-such-flag"],
            "error: unexpected argument '--no-such-flag' found",
        ),
        (
            "stray words",
            &["my", "custom", "args"],
            "error: unrecognized subcommand 'my'",
        ),
    ] {
        rows.push(Row {
            shape: Shape::First,
            ..row(name, args, &[], want.strip_prefix("error: ").unwrap())
        });
    }

    // Huge values and 10,000-item lists: one short line, the value cut at 120 bytes.
    let ports = list(10_000, |n| n.to_string());
    // Execve limits one argv/env string to 128 KiB: the 10,000-item lists stay below it.
    let cidrs = list(10_000, |n| format!("{n:x}::/16"));
    let ifaces = list(10_000, |n| format!("e{n}"));
    let uids = list(10_000, |n| n.to_string());
    for (name, flag, src, what, value) in [
        (
            "10,000 ports",
            "-b",
            "--istio-inbound-ports (-b)",
            "port list",
            &ports,
        ),
        (
            "10,000 CIDRs",
            "-i",
            "--istio-service-cidr (-i)",
            "CIDR list",
            &cidrs,
        ),
        (
            "10,000 interfaces",
            "-c",
            "--istio-exclude-interfaces (-c)",
            "interface name list",
            &ifaces,
        ),
        ("10,000 uids", "-u", "--proxy-uid (-u)", "uid list", &uids),
    ] {
        let want = format!(
            "invalid {what} {} in {src}: 10000 items; at most 5000 are allowed",
            shown(value)
        );
        rows.push(row(name, &[flag, value], &[], &want));
    }
    let cidrs_env = list(10_000, |n| format!("::{n:x}/128"));
    rows.push(row(
        "10,000 CIDRs from env",
        &[],
        &[("ISTIO_SERVICE_EXCLUDE_CIDR", &cidrs_env)],
        &format!(
            "invalid CIDR list {} in env ISTIO_SERVICE_EXCLUDE_CIDR: 10000 items; at most 5000 are allowed",
            shown(&cidrs_env)
        ),
    ));
    for v in [&ports, &cidrs, &ifaces, &uids, &cidrs_env] {
        assert!(
            v.len() < 128 * 1024,
            "{} bytes: over execve's limit",
            v.len()
        );
    }
    let groups = list(65, |n| format!("g{n}"));
    rows.push(row(
        "65 owner groups",
        &[],
        &[("ISTIO_OUTBOUND_OWNER_GROUPS", &groups)],
        &format!(
            "invalid owner group list {} in env ISTIO_OUTBOUND_OWNER_GROUPS: 65 groups; at most 64 can be captured (use '*' with ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE instead)",
            shown(&groups)
        ),
    ));
    // Execve limits a single argv/env string to 128 KiB; stay below it.
    let huge_port = "1".repeat(100_000);
    rows.push(row(
        "100 kB port",
        &["-p", &huge_port],
        &[],
        &format!(
            "invalid port {} in --envoy-port (-p): out of range (1-65535)",
            shown(&huge_port)
        ),
    ));
    let huge_iface = "a".repeat(1000);
    rows.push(row(
        "1000-byte interface",
        &["-k", &huge_iface],
        &[],
        &format!(
            "invalid interface name {} in --kube-virt-interfaces (-k): 1000 bytes long; the kernel allows at most 15",
            shown(&huge_iface)
        ),
    ));
    let huge_cidr = "x".repeat(100_000);
    rows.push(row(
        "100 kB CIDR from env",
        &[],
        &[("ISTIO_SERVICE_CIDR", &huge_cidr)],
        &format!(
            "invalid CIDR {} in env ISTIO_SERVICE_CIDR: missing prefix length (expected ADDRESS/LENGTH, e.g. 10.0.0.0/8)",
            shown(&huge_cidr)
        ),
    ));

    // Non-UTF-8 bytes in argv and env.
    rows.push(Row {
        args: vec!["-d".into(), OsStr::from_bytes(b"15090,\xff").into()],
        ..row("non-UTF-8 flag value", &[], &[], "invalid value \"15090,\u{fffd}\" in --istio-local-exclude-ports (-d): not valid UTF-8 (byte 0xff at offset 6)")
    });
    rows.push(Row {
        env: vec![("XTABLES_LOCKFILE".into(), OsStr::from_bytes(b"/run/x\xff").into())],
        ..row("non-UTF-8 lock file path", &[], &[], "invalid value \"/run/x\u{fffd}\" in env XTABLES_LOCKFILE: not valid UTF-8 (byte 0xff at offset 6)")
    });
    rows.push(Row {
        env: vec![("ISTIO_EXCLUDE_INTERFACES".into(), OsStr::from_bytes(b"eth\xc3").into())],
        ..row("non-UTF-8 env value", &[], &[], "invalid value \"eth\u{fffd}\" in env ISTIO_EXCLUDE_INTERFACES: not valid UTF-8 (byte 0xc3 at offset 3)")
    });

    // resolv.conf that cannot be read, with DNS capture for the listed servers.
    for (name, path, reason) in [
        (
            "missing resolv.conf",
            "/nonexistent/istio-init/resolv.conf".to_owned(),
            "No such file or directory (os error 2)",
        ),
        (
            "resolv.conf is a directory",
            scratch.path(""),
            "not a regular file",
        ),
        (
            "resolv.conf is a FIFO (would block)",
            scratch.path("fifo"),
            "not a regular file",
        ),
        (
            "resolv.conf is a device (never ends)",
            "/dev/zero".to_owned(),
            "not a regular file",
        ),
        (
            "resolv.conf over 1 MiB",
            scratch.path("big"),
            "larger than 1048576 bytes",
        ),
    ] {
        let flag = format!("--resolv-conf={path}");
        rows.push(Row {
            shape: Shape::Last,
            ..row(
                name,
                &["--redirect-dns", &flag],
                &[],
                &format!(
                    "reading the DNS servers: cannot read {path} for --redirect-dns: {reason}{USAGE_HINT}"
                ),
            )
        });
    }
    rows.push(Row {
        shape: Shape::Last,
        ..row(
            "resolv.conf from env, missing",
            &[],
            &[("ISTIO_META_DNS_CAPTURE", "true"), ("ISTIO_INIT_RESOLV_CONF", "/nonexistent/r.conf")],
            &format!("reading the DNS servers: cannot read /nonexistent/r.conf for --redirect-dns: No such file or directory (os error 2){USAGE_HINT}"),
        )
    });

    // The pod's annotations: a Downward API file (--annotations) or a manifest (--pod).
    let ann = |name: &str, file: &str, want: String| {
        let path = scratch.path(file);
        Row {
            want: want.replace("{p}", &path),
            ..row(name, &["--annotations", &path], &[], "")
        }
    };
    let pod = |name: &str, file: &str, want: String| {
        let path = scratch.path(file);
        Row {
            want: want.replace("{p}", &path),
            ..row(name, &["--pod", &path], &[], "")
        }
    };
    let w = str::to_owned;
    rows.extend([
        ann("annotations file missing", "no-such-file", w("cannot read the annotations file {p}: No such file or directory (os error 2)")),
        ann("annotations file is a directory", "", w("cannot read the annotations file {p}: not a regular file")),
        ann("annotations file is a FIFO (would block)", "fifo", w("cannot read the annotations file {p}: not a regular file")),
        ann("annotations file over 4 MiB", "huge-annotations", w("cannot read the annotations file {p}: larger than 4194304 bytes")),
        ann("annotations file with raw non-UTF-8", "ann-raw-non-utf8", w("cannot read the annotations file {p}: not valid UTF-8 (byte 0xff at offset 20)")),
        ann("annotation line without '='", "ann-no-equals", w(r#"annotations file {p}: line 1: expected key="value""#)),
        ann("annotation value unquoted", "ann-unquoted", w(r#"annotations file {p}: line 1: value of traffic.sidecar.istio.io/excludeInboundPorts: "80" is not a double-quoted string"#)),
        ann("annotation value with unterminated quote", "ann-unterminated", w(r#"annotations file {p}: line 1: value of traffic.sidecar.istio.io/excludeInboundPorts: "\"80" is not a double-quoted string"#)),
        ann("duplicate annotation key", "ann-duplicate", w("annotations file {p}: line 2: duplicate annotation traffic.sidecar.istio.io/excludeInboundPorts")),
        ann("escaped non-UTF-8 annotation value", "ann-escaped-non-utf8", w("annotations file {p}: line 1: value of sidecar.istio.io/x: the value is not valid UTF-8")),
        ann("unknown escape in annotation value", "ann-unknown-escape", w(r"annotations file {p}: line 1: value of sidecar.istio.io/x: unknown escape '\q'")),
        ann("annotation key with a space", "ann-key-with-space", w(r#"annotations file {p}: line 1: invalid annotation key "sidecar istio""#)),
        ann("ProxyConfig not YAML", "ann-proxy-config-yaml", w(r#"invalid ProxyConfig "{" in annotation proxy.istio.io/config: line 2 column 1: while parsing a node, did not find expected node content"#)),
        ann("proxyMetadata not a mapping", "ann-proxy-metadata-scalar", w(r#"invalid ProxyConfig "proxyMetadata: 5" in annotation proxy.istio.io/config: proxyMetadata: expected a mapping, found an integer"#)),
        ann("bad group in proxyMetadata", "ann-proxy-metadata-group", w(r#"invalid group "java app" in annotation proxy.istio.io/config (proxyMetadata.ISTIO_OUTBOUND_OWNER_GROUPS): not a number and not a valid group name ([A-Za-z_][A-Za-z0-9_.-]*)"#)),
        ann("rule smuggled in an interface annotation", "ann-hostile-interface", w(r#"invalid interface name "eth0 -j ACCEPT" in annotation traffic.sidecar.istio.io/excludeInterfaces: contains ' '; allowed are letters, digits, '_', '.', '-' and a trailing '+'"#)),
        ann("newline and rule in a port annotation", "ann-newline-rule", w(r#"invalid port "80\n-A OUTPUT -j ACCEPT" in annotation traffic.sidecar.istio.io/excludeInboundPorts: not a number"#)),
        ann("NUL in an interface annotation", "ann-nul", w(r#"invalid interface name "veth\0" in annotation traffic.sidecar.istio.io/kubevirtInterfaces: contains '\0'; allowed are letters, digits, '_', '.', '-' and a trailing '+'"#)),
        ann("lower-case interception mode annotation", "ann-mode", w(r#"invalid interception mode "tproxy" in annotation sidecar.istio.io/interceptionMode: expected REDIRECT, TPROXY or NONE (upper case)"#)),
        ann("/33 in an annotation", "ann-cidr-33", w(r#"invalid CIDR "10.0.0.0/33" in annotation traffic.sidecar.istio.io/excludeOutboundIPRanges: prefix length /33 is longer than /32 for an IPv4 address"#)),
        ann("status port annotation 65536", "ann-status-port", w(r#"invalid status port "65536" in annotation status.sidecar.istio.io/port: out of range (1-65535)"#)),
        pod("manifest missing", "no-such-file", w("cannot read the pod manifest {p}: No such file or directory (os error 2)")),
        pod("manifest is a FIFO (would block)", "fifo", w("cannot read the pod manifest {p}: not a regular file")),
        pod("manifest with non-UTF-8", "pod-non-utf8", w("cannot read the pod manifest {p}: not valid UTF-8 (byte 0xc3 at offset 19)")),
        // The parser reports the position of the duplicated key's value.
        pod("duplicate annotation key in JSON", "pod-duplicate-json", w(r#"pod manifest {p}: line 1 column 41: String("a"): duplicated key in mapping"#)),
        pod("duplicate annotation key in YAML", "pod-duplicate-yaml", w(r#"pod manifest {p}: line 4 column 8: String("a"): duplicated key in mapping"#)),
        pod("truncated manifest", "pod-truncated", w("pod manifest {p}: line 2 column 1: while parsing a node, did not find expected node content")),
        pod("annotations not a mapping", "pod-annotations-list", w("pod manifest {p}: metadata.annotations: expected a mapping, found a list")),
        pod("annotation value not a string", "pod-number-value", w(r#"pod manifest {p}: metadata.annotations["traffic.sidecar.istio.io/excludeInboundPorts"]: expected a string, found an integer (quote the value)"#)),
        pod("List of two pods", "pod-two-items", w("pod manifest {p}: items: holds 2 items; give exactly one pod")),
        pod("empty manifest", "pod-empty", w("pod manifest {p}: the manifest: is empty")),
        pod("rule smuggled in a manifest annotation", "pod-hostile-interface", w(r#"invalid interface name "eth0\n-A OUTPUT -j ACCEPT" in annotation traffic.sidecar.istio.io/excludeInterfaces: 24 bytes long; the kernel allows at most 15"#)),
    ]);
    rows.push(Row {
        env: vec![("ISTIO_INIT_IPV6".into(), "false".into())],
        ..ann(
            "IPv6 capture annotation with ISTIO_INIT_IPV6=false",
            "ann-ipv6-capture",
            w(r#"invalid CIDR "2001:db8::/32" in annotation traffic.sidecar.istio.io/includeOutboundIPRanges: an IPv6 range to capture, but IPv6 rules are disabled by env ISTIO_INIT_IPV6; remove the IPv6 ranges or set --ipv6=auto"#),
        )
    });
    rows.push(pod(
        "manifest nested a million levels deep",
        "pod-deep",
        w("pod manifest {p}: line 1 column 129: nested deeper than 64 levels"),
    ));
    let deep_config = "{a: ".repeat(100);
    rows.push(ann(
        "ProxyConfig nested 100 levels deep",
        "ann-deep-config",
        format!(
            "invalid ProxyConfig {} in annotation proxy.istio.io/config: line 1 column 257: nested deeper than 64 levels",
            shown(&deep_config)
        ),
    ));
    let many = list(10_000, |n| n.to_string());
    let many_path = scratch.file(
        "ann-10000-ports",
        &format!("traffic.sidecar.istio.io/includeInboundPorts=\"{many}\"\n"),
    );
    rows.push(row(
        "10,000 ports in an annotation",
        &["--annotations", &many_path],
        &[],
        &format!("invalid port list {} in annotation traffic.sidecar.istio.io/includeInboundPorts: 10000 items; at most 5000 are allowed", shown(&many)),
    ));
    rows.push(row(
        "annotations file from env, missing",
        &[],
        &[("ISTIO_INIT_ANNOTATIONS", "/nonexistent/istio-init/annotations")],
        "cannot read the annotations file /nonexistent/istio-init/annotations: No such file or directory (os error 2)",
    ));
    let both = scratch.path("pod-empty");
    rows.push(row(
        "both --annotations and --pod",
        &["--annotations", &both, "--pod", &both],
        &[],
        "--annotations and --pod both name the pod's annotations; give one of them",
    ));
    rows.push(Row {
        stdin: Some(b"{".to_vec()),
        ..row("bad manifest on stdin", &["--pod", "-"], &[], "pod manifest -: line 2 column 1: while parsing a node, did not find expected node content")
    });
    rows.push(Row {
        stdin: Some(vec![b' '; (4 << 20) + 1]),
        ..row(
            "manifest on stdin over 4 MiB",
            &["--pod", "-"],
            &[],
            "cannot read the pod manifest -: larger than 4194304 bytes",
        )
    });

    for r in &mut rows {
        r.want.insert_str(0, "error: ");
    }
    rows
}

/// Runs a row's command, feeding its stdin if it has one.
fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Output {
    let Some(input) = stdin else {
        return output(cmd);
    };
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    // The program may stop reading early (size limit): a broken pipe is fine.
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn check(row: &Row, o: &Output) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{}: {err}", row.name);
    assert!(o.stdout.is_empty(), "{}: stdout: {}", row.name, stdout(o));
    let got = match row.shape {
        Shape::Only => {
            assert_eq!(
                err.matches('\n').count(),
                1,
                "{}: not one line: {err}",
                row.name
            );
            err.trim_end_matches('\n')
        }
        Shape::Last => err.lines().last().unwrap_or_default(),
        Shape::First => err.lines().next().unwrap_or_default(),
    };
    assert_eq!(got, row.want, "{}", row.name);
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{}: {err}",
        row.name
    );
}

#[test]
fn corpus_has_at_least_sixty_distinct_rows() {
    let scratch = Scratch::new();
    let rows = rows(&scratch);
    eprintln!("bad-input corpus: {} rows", rows.len());
    assert!(rows.len() >= 60, "{} rows", rows.len());
    let mut names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), rows.len(), "duplicate row names");
}

#[test]
fn every_bad_input_exits_2_with_its_message_and_no_output() {
    let scratch = Scratch::new();
    for r in rows(&scratch) {
        let mut cmd = istio_init();
        cmd.arg("--dry-run").args(&r.args);
        for (k, v) in &r.env {
            cmd.env(k, v);
        }
        check(&r, &run(&mut cmd, r.stdin.as_deref()));
    }
}

/// Everything a run could change in a namespace: netfilter in both backends and both families,
/// and policy routing with every routing table.
fn snapshot(ns: &Netns) -> String {
    let mut out = String::new();
    for argv in [
        &["iptables-nft-save"][..],
        &["ip6tables-nft-save"],
        &["iptables-legacy-save"],
        &["ip6tables-legacy-save"],
        &["ip", "-4", "rule", "list"],
        &["ip", "-6", "rule", "list"],
        &["ip", "-4", "route", "show", "table", "all"],
        &["ip", "-6", "route", "show", "table", "all"],
    ] {
        let text = ns.ok(argv);
        out.push_str(&format!("## {}\n", argv.join(" ")));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            // Drop counters: ":CHAIN POLICY [pkts:bytes]".
            let line = match line.split_once(" [") {
                Some((head, _)) if line.starts_with(':') => head,
                _ => line,
            };
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The snapshot sees what an apply would leave: rules in either backend and policy routes.
#[test]
fn snapshot_detects_rules_and_routes() {
    if !privileged("snapshot_detects_rules_and_routes") {
        return;
    }
    let ns = Netns::new("badsnap");
    let clean = snapshot(&ns);
    for (restore, text) in [
        (
            "iptables-nft-restore",
            "*nat\n-N ISTIO_X\n-A OUTPUT -j ISTIO_X\nCOMMIT\n",
        ),
        ("ip6tables-legacy-restore", "*mangle\n-N ISTIO_X\nCOMMIT\n"),
    ] {
        let o = ns.run_with_input(&[restore, "--noflush"], text);
        assert!(o.status.success(), "{restore}: {}", stderr(&o));
        let dirty = snapshot(&ns);
        assert_ne!(dirty, clean, "{restore} left no trace in the snapshot");
        assert!(dirty.contains("ISTIO_X"), "{dirty}");
    }
    ns.ok(&["ip", "rule", "add", "fwmark", "1337", "lookup", "133"]);
    assert!(snapshot(&ns).contains("lookup 133"));

    // And it sees what istio-init itself writes: a valid TPROXY run changes netfilter and
    // policy routing, so the "nothing changed" check below can fail.
    let ns = Netns::new("badsnapii");
    let clean = snapshot(&ns);
    let o = output(
        ns.cmd(&[crate::util::bin(), "-m", "TPROXY", "--ipv6=false"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default()),
    );
    assert!(o.status.success(), "valid run failed: {}", stderr(&o));
    let after = snapshot(&ns);
    assert_ne!(after, clean);
    assert!(
        after.contains("-A PREROUTING -p tcp -j ISTIO_INBOUND"),
        "{after}"
    );
    assert!(after.contains("lookup 133"), "{after}");
}

/// Run for real (no `--dry-run`) inside a fresh namespace: every bad input is refused before
/// anything is touched (the apply path runs only after every input has been validated).
#[test]
fn bad_input_leaves_no_rule_behind() {
    if !privileged("bad_input_leaves_no_rule_behind") {
        return;
    }
    let scratch = Scratch::new();
    let ns = Netns::new("badinput");
    let clean = snapshot(&ns);
    for r in rows(&scratch) {
        let mut cmd = ns.cmd(&[]);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .arg(crate::util::bin())
            .args(&r.args);
        for (k, v) in &r.env {
            cmd.env(k, v);
        }
        check(&r, &run(&mut cmd, r.stdin.as_deref()));
        let now = snapshot(&ns);
        assert_eq!(now, clean, "{}: the namespace changed", r.name);
    }
}
