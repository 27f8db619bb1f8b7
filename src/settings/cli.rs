//! The command line: every istio-iptables flag (long name, short letter, env vars, defaults) in
//! one table, turned into a clap command, plus this tool's own flags and sub-commands.
//!
//! Pure: parsing only. Values stay raw strings here, because Istio gives "not given", `""` and
//! `"*"` different meanings; `config.rs` resolves them (with env vars) into typed settings.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use clap::{Arg, ArgAction, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

/// How a value is given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `--flag VALUE`, `--flag=VALUE`, `-fVALUE`, `-f=VALUE`, `-f VALUE`.
    Value,
    /// pflag boolean: `--flag` (true) or `--flag=true|false`.
    Bool,
}

/// Where an option comes from, for the help text and the compatibility table of docs/cli.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An istio-iptables flag, accepted with the same meaning.
    Istio,
    /// One of Istio's logging flags (persistent flags of `pilot-agent`).
    Logging,
    /// An addition of this tool.
    Extension,
}

/// One command-line option and the environment variables that can set it.
#[derive(Debug)]
pub struct Opt {
    /// Long name without dashes; also the clap id and the key used by `config.rs`.
    pub long: &'static str,
    pub short: Option<char>,
    /// Env vars in increasing precedence: Istio reads the primary name first, then the
    /// secondary name overrides it (`REDIRECT_DNS` then `ISTIO_META_DNS_CAPTURE`).
    pub env: &'static [&'static str],
    pub kind: Kind,
    /// Default after the leading `istio-iptables` word (Istio's own defaults).
    pub istio_default: &'static str,
    /// Default without it (the injector's standard sidecar arguments).
    pub native_default: &'static str,
    pub origin: Origin,
    pub help: &'static str,
    /// Accepted but not implemented yet: fails with a clear message when set.
    pub unimplemented: bool,
}

const fn opt(
    long: &'static str,
    short: Option<char>,
    env: &'static [&'static str],
    kind: Kind,
    defaults: (&'static str, &'static str),
    help: &'static str,
) -> Opt {
    Opt {
        long,
        short,
        env,
        kind,
        istio_default: defaults.0,
        native_default: defaults.1,
        origin: Origin::Istio,
        help,
        unimplemented: false,
    }
}

const fn same(d: &'static str) -> (&'static str, &'static str) {
    (d, d)
}

const fn ext(mut o: Opt) -> Opt {
    o.origin = Origin::Extension;
    o
}

const fn logging(mut o: Opt) -> Opt {
    o.origin = Origin::Logging;
    o
}

const fn not_yet(mut o: Opt) -> Opt {
    o.unimplemented = true;
    o
}

use Kind::{Bool, Value};

/// The arguments Istio's sidecar injector renders by default (a conformance test keeps them
/// equal to the injector's own rendering, when the test data is present): the command line of
/// every standard pod start, used by the benchmarks and tests.
pub const INJECTOR_DEFAULT_ARGS: [&str; 18] = [
    "istio-iptables",
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
    "--log_output_level=default:info",
];

/// Every option, in the order `--help` lists them.
pub static OPTIONS: &[Opt] = &[
    opt(
        "envoy-port",
        Some('p'),
        &[],
        Value,
        same("15001"),
        "Port the proxy listens on for captured outbound TCP (ISTIO_REDIRECT target)",
    ),
    opt(
        "inbound-capture-port",
        Some('z'),
        &["INBOUND_CAPTURE_PORT"],
        Value,
        same("15006"),
        "Port the proxy listens on for captured inbound TCP",
    ),
    opt(
        "inbound-tunnel-port",
        Some('e'),
        &["INBOUND_TUNNEL_PORT"],
        Value,
        same("15008"),
        "HBONE tunnel port: never captured inbound",
    ),
    opt(
        "proxy-uid",
        Some('u'),
        &["PROXY_UID"],
        Value,
        ("", "1337"),
        "Comma-separated UIDs whose traffic is never redirected (empty: the uid of $ENVOY_USER, else 1337)",
    ),
    opt(
        "proxy-gid",
        Some('g'),
        &["PROXY_GID"],
        Value,
        same(""),
        "Comma-separated GIDs whose traffic is never redirected (empty: same as --proxy-uid)",
    ),
    opt(
        "istio-inbound-interception-mode",
        Some('m'),
        &["ISTIO_INBOUND_INTERCEPTION_MODE"],
        Value,
        ("", "REDIRECT"),
        "Inbound interception mode: REDIRECT, TPROXY, or NONE (nothing to do); empty means REDIRECT",
    ),
    opt(
        "istio-inbound-ports",
        Some('b'),
        &["ISTIO_INBOUND_PORTS"],
        Value,
        ("", "*"),
        "Comma-separated inbound ports to capture; '*' captures all; empty captures none",
    ),
    opt(
        "istio-local-exclude-ports",
        Some('d'),
        &["ISTIO_LOCAL_EXCLUDE_PORTS"],
        Value,
        ("", "15090,15021,15020"),
        "Comma-separated inbound ports never captured (used when --istio-inbound-ports is '*')",
    ),
    opt(
        "istio-exclude-interfaces",
        Some('c'),
        &["ISTIO_EXCLUDE_INTERFACES"],
        Value,
        same(""),
        "Comma-separated interfaces whose traffic is never captured",
    ),
    opt(
        "istio-service-cidr",
        Some('i'),
        &["ISTIO_SERVICE_CIDR"],
        Value,
        ("", "*"),
        "Comma-separated outbound CIDRs to capture (IPv4 and IPv6); '*' captures all; empty none",
    ),
    opt(
        "istio-service-exclude-cidr",
        Some('x'),
        &["ISTIO_SERVICE_EXCLUDE_CIDR"],
        Value,
        same(""),
        "Comma-separated outbound CIDRs never captured",
    ),
    opt(
        "istio-outbound-ports",
        Some('q'),
        &["ISTIO_OUTBOUND_PORTS"],
        Value,
        same(""),
        "Comma-separated outbound TCP ports always captured, whatever the destination",
    ),
    opt(
        "istio-local-outbound-ports-exclude",
        Some('o'),
        &["ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"],
        Value,
        same(""),
        "Comma-separated outbound ports (TCP and UDP) never captured",
    ),
    opt(
        "kube-virt-interfaces",
        Some('k'),
        &["KUBE_VIRT_INTERFACES"],
        Value,
        same(""),
        "Comma-separated virtual interfaces whose inbound traffic is treated as outbound",
    ),
    opt(
        "istio-inbound-tproxy-mark",
        Some('t'),
        &["ISTIO_INBOUND_TPROXY_MARK"],
        Value,
        same("1337"),
        "Decimal firewall mark for TPROXY inbound traffic",
    ),
    opt(
        "istio-inbound-tproxy-route-table",
        Some('r'),
        &["ISTIO_INBOUND_TPROXY_ROUTE_TABLE"],
        Value,
        same("133"),
        "Policy routing table for TPROXY inbound traffic",
    ),
    opt(
        "dry-run",
        Some('n'),
        &["DRY_RUN"],
        Bool,
        same("false"),
        "Print the ruleset on stdout and change nothing (needs no privilege)",
    ),
    opt(
        "iptables-probe-port",
        None,
        &["IPTABLES_PROBE_PORT"],
        Value,
        same("15002"),
        "Port the validation probe dials",
    ),
    opt(
        "probe-timeout",
        None,
        &["PROBE_TIMEOUT"],
        Value,
        same("5s"),
        "How long validation waits for the probe to be redirected (Go duration)",
    ),
    opt(
        "skip-rule-apply",
        None,
        &["SKIP_RULE_APPLY"],
        Bool,
        same("false"),
        "Do not program any rule or route",
    ),
    opt(
        "run-validation",
        None,
        &["RUN_VALIDATION"],
        Bool,
        same("false"),
        "Check that the rules redirect traffic (exit 126 when they do not)",
    ),
    opt(
        "redirect-dns",
        None,
        &["REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"],
        Bool,
        same("false"),
        "Capture DNS to the agent on port 15053",
    ),
    opt(
        "drop-invalid",
        None,
        &["DROP_INVALID", "INVALID_DROP"],
        Bool,
        same("false"),
        "Drop packets conntrack considers INVALID",
    ),
    opt(
        "dual-stack",
        None,
        &["DUAL_STACK", "ISTIO_DUAL_STACK"],
        Bool,
        same("false"),
        "Accepted for compatibility: IPv6 is enabled whenever the pod has a global IPv6 address",
    ),
    opt(
        "capture-all-dns",
        None,
        &["CAPTURE_ALL_DNS"],
        Bool,
        same("false"),
        "Capture all port-53 traffic, not only to the resolv.conf servers",
    ),
    opt(
        "network-namespace",
        None,
        &["NETWORK_NAMESPACE"],
        Value,
        same(""),
        "Network namespace path (Istio's meaning: used only to name the xtables lock)",
    ),
    not_yet(opt(
        "cni-mode",
        None,
        &["CNI_MODE"],
        Bool,
        same("false"),
        "Istio CNI plugin mode (not implemented: fails with exit 2)",
    )),
    opt(
        "reconcile",
        None,
        &["RECONCILE"],
        Bool,
        same("false"),
        "Replace drifted Istio rules instead of failing",
    ),
    opt(
        "cleanup-only",
        None,
        &["CLEANUP_ONLY"],
        Bool,
        same("false"),
        "Remove the rules this configuration creates, then exit",
    ),
    opt(
        "force-apply",
        None,
        &["FORCE_APPLY"],
        Bool,
        same("false"),
        "Apply even when the rules are already in place",
    ),
    opt(
        "native-nftables",
        None,
        &["NATIVE_NFTABLES"],
        Bool,
        same("false"),
        "Use the native nftables backend: the rules as inet tables, applied as one nf_tables \
         netlink transaction from this process (no program, CAP_NET_ADMIN only)",
    ),
    opt(
        "force-iptables-binary",
        None,
        &["FORCE_IPTABLES_BINARY"],
        Value,
        same(""),
        "Backend to use instead of detecting one: legacy or nft",
    ),
    ext(opt(
        "netns",
        None,
        &["ISTIO_INIT_NETNS"],
        Value,
        same(""),
        "Network namespace to program instead of the current one: a path (/proc/PID/ns/net, \
         /var/run/netns/NAME) or a PID; entered with setns, which needs CAP_SYS_ADMIN",
    )),
    ext(opt(
        "xtables-wait",
        None,
        &["ISTIO_INIT_XTABLES_WAIT"],
        Value,
        same("30"),
        "Seconds a legacy-backend iptables-restore waits for the xtables lock",
    )),
    ext(opt(
        "restore-timeout",
        None,
        &["ISTIO_INIT_RESTORE_TIMEOUT"],
        Value,
        same("1m"),
        "How long each iptables-restore/-save may run before it is killed and the run fails \
         (Go duration; legacy-backend programs get --xtables-wait on top)",
    )),
    ext(opt(
        "handover",
        None,
        &["ISTIO_INIT_HANDOVER"],
        Bool,
        same("true"),
        "On a fresh namespace where one iptables-restore does all the work, become it (exec) \
         instead of waiting for it: the least CPU per pod start; false: stay its parent, so its \
         failure is explained in istio-init's own error and a timeout is named",
    )),
    ext(opt(
        "ipv6",
        None,
        &["ISTIO_INIT_IPV6"],
        Value,
        same("auto"),
        "IPv6 rules: auto (when the namespace has a global IPv6 address), true, or false",
    )),
    ext(opt(
        "resolv-conf",
        None,
        &["ISTIO_INIT_RESOLV_CONF"],
        Value,
        same("/etc/resolv.conf"),
        "Where to read the DNS servers captured by --redirect-dns",
    )),
    ext(opt(
        "status-port",
        None,
        &["ISTIO_INIT_STATUS_PORT"],
        Value,
        same("15020"),
        "The sidecar's status port (Helm values.global.proxy.statusPort; 0 = none): excluded \
         inbound after 15090,15021 and the excluded ports, and what the pod annotation \
         status.sidecar.istio.io/port replaces",
    )),
    ext(opt(
        "annotations",
        None,
        &["ISTIO_INIT_ANNOTATIONS"],
        Value,
        same(""),
        "Pod annotations file (Downward API fieldRef metadata.annotations): apply the pod's \
         traffic annotations over the flags and env vars, as the sidecar injector does",
    )),
    ext(opt(
        "pod",
        None,
        &["ISTIO_INIT_POD"],
        Value,
        same(""),
        "Pod manifest, JSON or YAML ('kubectl get pod NAME -o yaml'), or '-' for stdin: apply its \
         annotations as --annotations does",
    )),
    logging(opt(
        "log_output_level",
        None,
        &[],
        Value,
        same("default:info"),
        "Log level: LEVEL or SCOPE:LEVEL,... (debug, info, warn, error, fatal, none)",
    )),
    logging(opt(
        "log_as_json",
        None,
        &[],
        Bool,
        same("false"),
        "Write log lines as JSON objects",
    )),
    logging(opt(
        "log_target",
        None,
        &[],
        Value,
        same("stderr"),
        "Accepted for compatibility; logs always go to stderr",
    )),
    logging(opt(
        "log_caller",
        None,
        &[],
        Value,
        same(""),
        "Accepted for compatibility; ignored",
    )),
    logging(opt(
        "log_stacktrace_level",
        None,
        &[],
        Value,
        same(""),
        "Accepted for compatibility; ignored",
    )),
    logging(opt(
        "log_rotate",
        None,
        &[],
        Value,
        same(""),
        "Accepted for compatibility; ignored",
    )),
    logging(opt(
        "log_rotate_max_age",
        None,
        &[],
        Value,
        same(""),
        "Accepted for compatibility; ignored",
    )),
    logging(opt(
        "log_rotate_max_backups",
        None,
        &[],
        Value,
        same(""),
        "Accepted for compatibility; ignored",
    )),
    logging(opt(
        "log_rotate_max_size",
        None,
        &[],
        Value,
        same(""),
        "Accepted for compatibility; ignored",
    )),
    logging(opt(
        "vklog",
        None,
        &[],
        Value,
        same(""),
        "Accepted for compatibility; ignored",
    )),
];

/// Options that only exist as environment variables (Istio reads them directly).
#[derive(Debug)]
pub struct EnvOpt {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

pub static ENV_ONLY: &[EnvOpt] = &[
    EnvOpt {
        name: "ISTIO_OUTBOUND_OWNER_GROUPS",
        default: "*",
        help: "Groups (names or GIDs) whose outbound traffic is captured; '*' means all",
    },
    EnvOpt {
        name: "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        default: "",
        help: "Groups never captured (only when ISTIO_OUTBOUND_OWNER_GROUPS is '*')",
    },
    EnvOpt {
        name: "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        default: "127.0.0.1/32",
        help: "IPv4 loopback destination that is never captured (mask /8 to /32)",
    },
    EnvOpt {
        name: "ENVOY_USER",
        default: "istio-proxy",
        help: "User whose uid is the proxy uid when --proxy-uid is empty",
    },
];

/// Env vars a pod's `proxyMetadata` must not set: they choose *where* istio-init acts or what
/// it reads (another network namespace, other files). A pod's annotations are written by
/// whoever deploys the pod; reading them from a privileged debug container must never let
/// them point istio-init at another namespace.
pub const NOT_FROM_POD: &[&str] = &[
    "ISTIO_INIT_NETNS",
    "ISTIO_INIT_RESOLV_CONF",
    "ISTIO_INIT_ANNOTATIONS",
    "ISTIO_INIT_POD",
];

pub fn find(long: &str) -> Option<&'static Opt> {
    OPTIONS.iter().find(|o| o.long == long)
}

/// Env vars read outside the option table: by `lib::run` (the dry-run file) and by the apply
/// path (where the iptables programs and their modules are, the legacy lock file).
pub const OTHER_ENV: &[&str] = &[
    "DRY_RUN_FILE_PATH",
    "PATH",
    "XTABLES_LIBDIR",
    "XTABLES_LOCKFILE",
];

/// Every environment variable istio-init reads: the options' env vars, the env-only settings
/// and [`OTHER_ENV`]. `main` checks that each one that is set is valid UTF-8.
pub fn env_names() -> impl Iterator<Item = &'static str> {
    OPTIONS
        .iter()
        .flat_map(|o| o.env.iter().copied())
        .chain(ENV_ONLY.iter().map(|e| e.name))
        .chain(OTHER_ENV.iter().copied())
}

/// Which defaults apply: Istio's (after a leading `istio-iptables`) or the standard sidecar's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defaults {
    Istio,
    Native,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Program (or with `--dry-run`, print) the ruleset: the init container's job.
    Run,
    /// Print every effective setting with its source and a plain-language summary.
    Explain,
    /// Follow one connection through the ruleset.
    Trace(TraceArgs),
}

/// One connection to trace, as given on the command line (raw; `trace.rs` validates it).
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct TraceArgs {
    /// `in` (arriving at the pod) or `out` (sent by a process in the pod)
    #[arg(value_name = "in|out")]
    pub direction: String,
    /// The destination address and port.
    #[arg(
        value_name = "DESTINATION",
        help = "Destination ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)"
    )]
    pub destination: String,
    /// Protocol: tcp or udp
    #[arg(long, value_name = "PROTO", default_value = "tcp")]
    pub proto: String,
    /// Outbound: the uid of the sending process [default: 0]
    #[arg(long, value_name = "UID")]
    pub uid: Option<String>,
    /// Outbound: the (primary) gid of the sending process [default: the uid]
    #[arg(long, value_name = "GID")]
    pub gid: Option<String>,
    /// The interface the packet leaves by (out) or arrives on (in) [default: lo for loopback
    /// destinations, else eth0]
    #[arg(long, value_name = "NAME")]
    pub iface: Option<String>,
    /// Source address [default: out to loopback: 127.0.0.1 or ::1; otherwise unspecified]
    #[arg(long, value_name = "ADDRESS")]
    pub src: Option<String>,
}

/// A parsed command line: which defaults, what to do, and the option values given on it.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub defaults: Defaults,
    pub action: Action,
    /// Values given on the command line, by long name (last occurrence wins, as in pflag).
    pub flags: BTreeMap<&'static str, String>,
}

/// The clap skeleton: sub-commands only. The option table is added by [`command`].
#[derive(Debug, Parser)]
#[command(
    name = "istio-init",
    version,
    about = "Programs the iptables rules of an Istio sidecar pod: a drop-in replacement for \
             `pilot-agent istio-iptables` that applies one atomic iptables-restore per IP family.",
    after_help = "Env-only settings: ISTIO_OUTBOUND_OWNER_GROUPS [default: *], \
                  ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE, ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR \
                  [default: 127.0.0.1/32], ENVOY_USER [default: istio-proxy].\n\
                  Precedence: command line > secondary env var > primary env var > default.\n\
                  Exit codes: 0 success, 1 runtime failure, 2 invalid input or usage, \
                  126 validation failed."
)]
struct Skeleton {
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Istio's sub-command name, as the sidecar injector passes it: selects Istio's defaults.
    #[command(name = "istio-iptables")]
    IstioIptables(NoArgs),
    /// Print every effective setting with its source (default, env var, flag, annotation), then
    /// what is captured and what bypasses the proxy
    Explain(NoArgs),
    /// Follow one connection through the ruleset: the rules it passes, the rule that decides,
    /// and the verdict (redirected to 15001/15006/15053, TPROXY, bypass, dropped)
    Trace(TraceArgs),
}

#[derive(Debug, Args)]
struct NoArgs {}

fn to_arg(o: &'static Opt, with_help: bool) -> Arg {
    let mut arg = Arg::new(o.long).long(o.long).global(true);
    if with_help {
        arg = arg.help(help_text(o));
    }
    if let Some(s) = o.short {
        arg = arg.short(s);
    }
    match o.kind {
        Kind::Value => arg
            .value_name("VALUE")
            .num_args(1)
            .allow_hyphen_values(true)
            .action(ArgAction::Set),
        Kind::Bool => arg
            .value_name("BOOL")
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true")
            .action(ArgAction::Set),
    }
}

/// The help line of an option: its text, env vars and defaults.
fn help_text(o: &Opt) -> String {
    let mut help = o.help.to_owned();
    match o.env {
        [] => {}
        names => help.push_str(&format!(" [env: {}]", names.join(", then "))),
    }
    if o.istio_default == o.native_default {
        if !o.istio_default.is_empty() {
            help.push_str(&format!(" [default: {}]", o.istio_default));
        }
    } else {
        help.push_str(&format!(
            " [default: {:?}; after istio-iptables: {:?}]",
            o.native_default, o.istio_default
        ));
    }
    help
}

/// The full clap command: the skeleton plus every option of [`OPTIONS`], with help texts.
pub fn command() -> clap::Command {
    command_with(true)
}

fn command_with(help: bool) -> clap::Command {
    Skeleton::command()
        .args(OPTIONS.iter().map(|o| to_arg(o, help)))
        .args_override_self(true)
}

/// Parses a command line (`argv[0]` included).
pub fn parse<I, T>(args: I) -> Result<Invocation, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    check_utf8(&args)?;
    // Help texts are only built when help is asked for: parsing runs on every pod start.
    let wants_help = args
        .iter()
        .skip(1)
        .any(|a| a == "-h" || a == "--help" || a == "help");
    if !wants_help && args.get(1).is_some_and(|a| a == "istio-iptables") {
        if let Some(inv) = parse_plain_options(&args[2..]) {
            return Ok(inv);
        }
        return parse_istio_iptables(args);
    }
    let matches = command_with(wants_help).try_get_matches_from(args)?;
    let skeleton = Skeleton::from_arg_matches(&matches)?;
    let (defaults, action, sub_matches) = match (&skeleton.command, matches.subcommand()) {
        (Some(Sub::IstioIptables(_)), Some((_, m))) => (Defaults::Istio, Action::Run, Some(m)),
        (Some(Sub::Explain(_)), Some((_, m))) => (Defaults::Native, Action::Explain, Some(m)),
        (Some(Sub::Trace(t)), Some((_, m))) => {
            (Defaults::Native, Action::Trace(t.clone()), Some(m))
        }
        _ => (Defaults::Native, Action::Run, None),
    };
    let mut flags = BTreeMap::new();
    for o in OPTIONS {
        // Global options are propagated into the sub-command's matches; read the deepest.
        let value = sub_matches
            .and_then(|m| given(m, o.long))
            .or_else(|| given(&matches, o.long));
        if let Some(v) = value {
            flags.insert(o.long, v);
        }
    }
    Ok(Invocation {
        defaults,
        action,
        flags,
    })
}

/// Refuses a command line with a word that is not UTF-8, naming the option the bytes belong to
/// (clap's own message names neither the option nor the value). argv\[0\] is not checked.
fn check_utf8(args: &[OsString]) -> Result<(), clap::Error> {
    for (i, arg) in args.iter().enumerate().skip(1) {
        if crate::net::utf8(arg).is_ok() {
            continue;
        }
        let bytes = arg.as_bytes();
        let (opt, value): (Option<&'static Opt>, &[u8]) =
            if let Some(rest) = bytes.strip_prefix(b"--") {
                let (name, value) = match rest.iter().position(|&c| c == b'=') {
                    Some(at) => (&rest[..at], &rest[at + 1..]),
                    None => (rest, &rest[rest.len()..]),
                };
                let opt = std::str::from_utf8(name).ok().and_then(find);
                (opt, if opt.is_some() { value } else { bytes })
            } else if bytes.len() >= 2 && bytes[0] == b'-' {
                let opt = OPTIONS
                    .iter()
                    .find(|o| o.short.is_some_and(|s| s as u32 == u32::from(bytes[1])));
                let value = bytes[2..].strip_prefix(b"=").unwrap_or(&bytes[2..]);
                (opt, if opt.is_some() { value } else { bytes })
            } else {
                let prev = args[i - 1].to_str().unwrap_or_default();
                let opt = OPTIONS.iter().find(|o| {
                    o.kind == Kind::Value
                        && (prev.strip_prefix("--") == Some(o.long)
                            || o.short.is_some_and(|s| prev == format!("-{s}")))
                });
                (opt, bytes)
            };
        let value = OsStr::from_bytes(value);
        let (value, reason) = match crate::net::utf8(value) {
            Err(reason) => (value, reason),
            // The bad byte is in the option name, not in its value: show the whole word.
            Ok(_) => (
                arg.as_os_str(),
                crate::net::utf8(arg).err().unwrap_or_default(),
            ),
        };
        let source = match opt {
            Some(o) => crate::settings::source::Source::Flag {
                long: o.long,
                short: o.short,
            }
            .to_string(),
            None => format!("argument {i}"),
        };
        let msg = format!(
            "invalid value {} in {source}: {reason}\n",
            crate::settings::source::quote(&value.to_string_lossy())
        );
        return Err(clap::Error::raw(clap::error::ErrorKind::InvalidUtf8, msg));
    }
    Ok(())
}

/// The sidecar injector's arguments after `istio-iptables` when they are nothing but options
/// of [`OPTIONS`] in the plain forms (`--long VALUE`, `--long=VALUE`, `-s VALUE`, a boolean's
/// `--long`, `--long=VALUE` or `-s`), read without building the clap command (a pod start
/// spends most of its own CPU there otherwise). Anything else — an unknown or malformed
/// option, a missing value, a positional, `--` — returns `None`, and clap parses (and
/// reports) it. Where it answers, it answers as clap does: `tests::
/// plain_options_parse_as_clap_does` compares the two on the injector's lists and on
/// generated command lines.
fn parse_plain_options(args: &[OsString]) -> Option<Invocation> {
    let mut flags = BTreeMap::new();
    let mut rest = args.iter().map(|a| a.to_str());
    while let Some(arg) = rest.next() {
        let arg = arg?;
        let (o, inline) = if let Some(long) = arg.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            (OPTIONS.iter().find(|o| o.long == name)?, value)
        } else {
            let mut chars = arg.strip_prefix('-')?.chars();
            let (Some(c), None) = (chars.next(), chars.next()) else {
                return None;
            };
            (OPTIONS.iter().find(|o| o.short == Some(c))?, None)
        };
        let value = match (o.kind, inline) {
            (_, Some(v)) => v,
            (Kind::Bool, None) => "true",
            (Kind::Value, None) => rest.next()??,
        };
        flags.insert(o.long, value.to_owned());
    }
    Some(Invocation {
        defaults: Defaults::Istio,
        action: Action::Run,
        flags,
    })
}

/// `istio-init istio-iptables ARGS`, the sidecar injector's form, parsed on every pod start:
/// the same options without the sub-command tree, whose global options clap would first copy
/// into every sub-command (most of the parse's cost). What it accepts and how it reads it are
/// the same as [`parse`]'s sub-command path (`tests::the_injector_form_parses_as_the_full_tree_does`).
fn parse_istio_iptables(mut args: Vec<OsString>) -> Result<Invocation, clap::Error> {
    args.remove(1);
    let matches = clap::Command::new("istio-init istio-iptables")
        .args(OPTIONS.iter().map(|o| to_arg(o, false)))
        .args_override_self(true)
        .try_get_matches_from(args)?;
    let flags = OPTIONS
        .iter()
        .filter_map(|o| Some((o.long, given(&matches, o.long)?)))
        .collect();
    Ok(Invocation {
        defaults: Defaults::Istio,
        action: Action::Run,
        flags,
    })
}

fn given(m: &ArgMatches, id: &str) -> Option<String> {
    match m.value_source(id) {
        Some(clap::parser::ValueSource::CommandLine) => m.get_one::<String>(id).cloned(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    /// The light parser and clap agree wherever the light one answers.
    fn agrees(args: &[&str]) -> bool {
        let Some(plain) = parse_plain_options(&os(args)) else {
            return false;
        };
        let mut argv = vec!["istio-init", "istio-iptables"];
        argv.extend_from_slice(args);
        match parse_istio_iptables(os(&argv)) {
            Ok(full) => assert_eq!(plain.flags, full.flags, "{args:?}"),
            Err(e) => panic!("{args:?}: the light parser accepted what clap rejects: {e}"),
        }
        true
    }

    #[test]
    fn plain_options_parse_as_clap_does() {
        // The injector's default list and typical variants all take the light path.
        for args in [
            &INJECTOR_DEFAULT_ARGS[1..],
            &[
                "-p",
                "15001",
                "-u",
                "1337",
                "-m",
                "TPROXY",
                "-i",
                "10.0.0.0/8",
                "-n",
            ],
            &[
                "--redirect-dns",
                "--capture-all-dns=false",
                "-q",
                "-b",
                "-d",
                "-x",
            ],
            &["--envoy-port=1", "--envoy-port", "2", "-p", "3"],
        ] {
            assert!(agrees(args), "{args:?} did not take the light path");
        }
        // Forms left to clap.
        for args in [
            &["--help"][..],
            &["positional"],
            &["--"],
            &["-p"],
            &["-p15001"],
            &["--nope"],
            &["-Z", "1"],
            &["--dry-run", "false"],
        ] {
            assert!(parse_plain_options(&os(args)).is_none(), "{args:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        #[test]
        fn generated_command_lines_parse_as_clap_does(
            picks in proptest::collection::vec((0..OPTIONS.len(), 0usize..4, 0usize..9), 0..8)
        ) {
            const VALUES: [&str; 9] = ["", "x", "-b", "15001", "true", "false", "a=b", "*", "--p"];
            let mut args: Vec<String> = Vec::new();
            for (i, form, v) in picks {
                let o = &OPTIONS[i];
                let value = VALUES[v];
                match (form, o.short) {
                    (0, _) => args.push(format!("--{}", o.long)),
                    (1, _) => args.push(format!("--{}={value}", o.long)),
                    (2, Some(c)) => args.push(format!("-{c}")),
                    _ => {
                        args.push(format!("--{}", o.long));
                        args.push(value.to_owned());
                    }
                }
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            agrees(&args);
        }
    }

    fn flags(args: &[&str]) -> BTreeMap<&'static str, String> {
        let mut argv = vec!["istio-init"];
        argv.extend_from_slice(args);
        parse(argv).unwrap().flags
    }

    #[test]
    fn every_pflag_spelling() {
        for args in [
            &["-p", "15001"][..],
            &["-p15001"],
            &["-p=15001"],
            &["--envoy-port", "15001"],
            &["--envoy-port=15001"],
            &["istio-iptables", "-p", "15001"],
            &["-p", "1", "-p", "15001"],
        ] {
            assert_eq!(flags(args)["envoy-port"], "15001", "{args:?}");
        }
    }

    #[test]
    fn booleans_bare_or_with_equals() {
        assert_eq!(flags(&["--redirect-dns"])["redirect-dns"], "true");
        assert_eq!(flags(&["--redirect-dns=false"])["redirect-dns"], "false");
        assert_eq!(flags(&["-n"])["dry-run"], "true");
        assert!(!flags(&[]).contains_key("redirect-dns"));
    }

    #[test]
    fn empty_and_hyphen_values() {
        let f = flags(&["-x", "", "-i", "*", "-b", ""]);
        assert_eq!(f["istio-service-exclude-cidr"], "");
        assert_eq!(f["istio-service-cidr"], "*");
        assert_eq!(f["istio-inbound-ports"], "");
    }

    #[test]
    fn leading_istio_iptables_selects_istio_defaults() {
        let inv = parse(["istio-init", "istio-iptables", "-p", "1"]).unwrap();
        assert_eq!(inv.defaults, Defaults::Istio);
        let inv = parse(["istio-init", "-p", "1"]).unwrap();
        assert_eq!(inv.defaults, Defaults::Native);
        // Flags before the sub-command word count too.
        let inv = parse(["istio-init", "-p", "7", "istio-iptables"]).unwrap();
        assert_eq!(inv.defaults, Defaults::Istio);
        assert_eq!(inv.flags["envoy-port"], "7");
    }

    #[test]
    fn stray_words_and_unknown_flags_are_usage_errors() {
        for argv in [
            &["istio-init", "my", "custom", "args"][..],
            &["istio-init", "--no-such-flag"],
            &["istio-init", "istio-iptables", "extra"],
            &["istio-init", "-p"],
        ] {
            let err = parse(argv).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn sub_commands_take_the_global_options() {
        let inv = parse(["istio-init", "explain", "-b", "80", "--annotations=/a"]).unwrap();
        assert_eq!(inv.action, Action::Explain);
        assert_eq!(inv.defaults, Defaults::Native);
        assert_eq!(inv.flags["istio-inbound-ports"], "80");
        assert_eq!(inv.flags["annotations"], "/a");
        let inv = parse([
            "istio-init",
            "-m",
            "TPROXY",
            "trace",
            "out",
            "10.0.0.1:80",
            "--uid",
            "1337",
            "--proto=udp",
            "-p",
            "16001",
        ])
        .unwrap();
        let Action::Trace(t) = inv.action else {
            panic!("not a trace")
        };
        assert_eq!(
            (t.direction.as_str(), t.destination.as_str()),
            ("out", "10.0.0.1:80")
        );
        assert_eq!((t.uid.as_deref(), t.proto.as_str()), (Some("1337"), "udp"));
        assert_eq!(inv.flags["envoy-port"], "16001");
        assert_eq!(inv.flags["istio-inbound-interception-mode"], "TPROXY");
        assert_eq!(
            parse(["istio-init", "trace", "out"])
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    #[test]
    fn logging_flags_accepted() {
        let f = flags(&[
            "--log_output_level=default:info",
            "--log_as_json",
            "--log_target=stdout",
            "--log_caller=default",
        ]);
        assert_eq!(f["log_output_level"], "default:info");
        assert_eq!(f["log_as_json"], "true");
    }

    #[test]
    fn table_is_consistent() {
        let mut longs = std::collections::BTreeSet::new();
        let mut shorts = std::collections::BTreeSet::new();
        for o in OPTIONS {
            assert!(longs.insert(o.long), "duplicate {}", o.long);
            if let Some(s) = o.short {
                assert!(shorts.insert(s), "duplicate -{s}");
            }
            for e in o.env {
                assert!(
                    e.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                );
            }
        }
        command().debug_assert();
    }
}
