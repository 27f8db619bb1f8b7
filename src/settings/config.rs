//! Resolves a parsed command line, the environment and pod annotations into one typed,
//! validated [`Config`], remembering where every setting came from.
//!
//! Precedence, highest first: pod annotations (as the sidecar injector applies them), the
//! command line, the secondary env var, the primary env var, the default. Flags and env vars
//! act as the mesh-wide defaults; `annotations.rs` turns a pod's annotations into a
//! [`PodOverrides`] layer on top of them.
//!
//! Pure: the environment and the passwd lookup are passed in as functions; nothing here reads
//! the process environment, a file or the clock.

use std::fmt;
use std::time::Duration;

use crate::net::{
    Cidr, Family, Group, Id, Iface, Mark, Port, PortItem, RouteTable, parse_go_bool,
    parse_go_duration, split_list,
};
use crate::settings::cli::{self, Defaults, Kind, Opt};
pub use crate::settings::source::{ConfigError, Source, quote};

/// Refuses an environment variable istio-init reads ([`cli::env_names`]) whose value is not
/// UTF-8, naming the variable and the first bad byte. `var_os` looks a variable up as raw
/// bytes; the check runs before anything else reads the environment, so a value is never
/// half-understood through a lossy conversion.
pub fn check_env_encoding(
    var_os: &dyn Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(), ConfigError> {
    for name in cli::env_names() {
        if let Some(raw) = var_os(name) {
            if let Err(reason) = crate::net::utf8(&raw) {
                return Err(ConfigError {
                    what: "value".into(),
                    value: raw.to_string_lossy().into_owned(),
                    source: Source::Env(name.to_owned()),
                    reason: reason.into(),
                });
            }
        }
    }
    Ok(())
}

/// Inbound interception mode (`-m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interception {
    Redirect,
    Tproxy,
    /// `NONE`: the pod wants no capture; there is nothing to do.
    None,
}

/// Inbound ports to capture (`-b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    /// `*`: every port except `--istio-local-exclude-ports`.
    All,
    /// Only these ports; an empty list captures nothing inbound.
    Only(Vec<PortItem>),
}

impl InboundPorts {
    pub fn is_empty(&self) -> bool {
        matches!(self, InboundPorts::Only(v) if v.is_empty())
    }
}

/// Outbound destinations to capture (`-i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundCidrs {
    All,
    Only(Vec<Cidr>),
}

impl OutboundCidrs {
    /// The include list for one family (empty for `All`).
    pub fn of(&self, family: Family) -> Vec<Cidr> {
        match self {
            OutboundCidrs::All => Vec::new(),
            OutboundCidrs::Only(v) => v.iter().copied().filter(|c| c.family() == family).collect(),
        }
    }
}

/// Which groups' outbound traffic is captured (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerGroups {
    /// Include is `*`: every group but these.
    AllExcept(Vec<Group>),
    /// Only these groups (an empty list: no group at all).
    Only(Vec<Group>),
}

/// Which iptables programs the iptables backend runs: `iptables-legacy` (x_tables) or
/// `iptables-nft` (nf_tables through the iptables compatibility layer); forced by
/// `FORCE_IPTABLES_BINARY`, detected otherwise. Not to be confused with the nftables backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesVariant {
    Legacy,
    Nft,
}

impl fmt::Display for IptablesVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IptablesVariant::Legacy => "legacy",
            IptablesVariant::Nft => "nft",
        })
    }
}

/// Whether to program IPv6 rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Mode {
    /// When the target namespace has any global IPv6 address.
    Auto,
    On,
    Off,
}

/// Log settings from Istio's logging flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    pub level: log::LevelFilter,
    pub json: bool,
}

/// One effective setting for the config dump and `explain`: its key, the value as text, and
/// where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    pub key: &'static str,
    pub value: String,
    pub source: Source,
}

/// The fully resolved and validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub proxy_port: Port,
    pub inbound_capture_port: Port,
    pub inbound_tunnel_port: Port,
    pub proxy_uids: Vec<Id>,
    pub proxy_gids: Vec<Id>,
    pub interception: Interception,
    pub inbound_ports: InboundPorts,
    pub inbound_exclude_ports: Vec<PortItem>,
    pub exclude_interfaces: Vec<Iface>,
    pub outbound_include: OutboundCidrs,
    pub outbound_exclude: Vec<Cidr>,
    pub outbound_ports_include: Vec<PortItem>,
    pub outbound_ports_exclude: Vec<PortItem>,
    pub virt_interfaces: Vec<Iface>,
    pub tproxy_mark: Mark,
    pub tproxy_route_table: RouteTable,
    pub dry_run: bool,
    pub probe_port: Port,
    pub probe_timeout: Duration,
    pub skip_rule_apply: bool,
    pub run_validation: bool,
    pub redirect_dns: bool,
    pub drop_invalid: bool,
    pub dual_stack: bool,
    pub capture_all_dns: bool,
    pub network_namespace: Option<String>,
    /// `--netns`: the namespace file to enter (a PID already turned into `/proc/PID/ns/net`).
    pub netns: Option<String>,
    /// `--xtables-wait`: seconds legacy writes wait for the xtables lock.
    pub xtables_wait: u32,
    /// `--restore-timeout`: how long one iptables program may run before it is killed.
    pub restore_timeout: Duration,
    /// `--handover`: exec the single restore of a fresh namespace instead of supervising it.
    pub handover: bool,
    pub reconcile: bool,
    pub cleanup_only: bool,
    /// `--native-nftables`: the nftables backend (one netlink transaction) instead of the
    /// iptables programs.
    pub native_nftables: bool,
    pub force_apply: bool,
    pub force_backend: Option<IptablesVariant>,
    pub owner_groups: OwnerGroups,
    pub loopback_cidr: Cidr,
    pub ipv6: Ipv6Mode,
    pub resolv_conf: String,
    pub log: LogSettings,
    /// Every setting with its value and source, in a fixed order.
    pub provenance: Vec<Provenance>,
}

/// One value set by a pod annotation: the value and the annotation key it came from (the key
/// is what error messages and `explain` name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub value: String,
    pub key: String,
}

/// The pod-annotation layer: option values by long option name (they win over flags and env
/// vars), and env vars from `proxy.istio.io/config` `proxyMetadata` (they act as env vars of
/// the container: they win over the process environment, and a flag still wins over them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodOverrides {
    pub opts: std::collections::BTreeMap<&'static str, Override>,
    pub env: std::collections::BTreeMap<String, Override>,
}

/// No pod annotations.
pub static NO_POD: PodOverrides = PodOverrides {
    opts: std::collections::BTreeMap::new(),
    env: std::collections::BTreeMap::new(),
};

/// The ports the injector always excludes inbound, ahead of the mesh's and the pod's own
/// (`-d 15090,15021,...`): Envoy's Prometheus port and the health-check port.
pub const ALWAYS_EXCLUDED_INBOUND: &str = "15090,15021";

/// The outside world as far as config resolution needs it.
pub struct Inputs<'a> {
    pub defaults: Defaults,
    /// Values given on the command line, by long option name.
    pub flags: &'a std::collections::BTreeMap<&'static str, String>,
    /// Environment lookup (`None` = unset; a set-but-empty variable is `Some("")`).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Looks a user name up in the passwd database (for `ENVOY_USER`).
    pub user_uid: &'a dyn Fn(&str) -> Option<u32>,
    /// Settings from the pod's annotations ([`NO_POD`] when there are none).
    pub pod: &'a PodOverrides,
}

impl fmt::Debug for Inputs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inputs")
            .field("defaults", &self.defaults)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

/// Istio's limit on the owner-group include list.
pub const MAX_OWNER_GROUPS: usize = 64;

/// The most items one list may hold. Far above any real pod (a rule per item is generated),
/// low enough that a hostile value cannot make the ruleset unbounded.
pub const MAX_LIST_ITEMS: usize = 5000;

struct Resolver<'a> {
    inputs: &'a Inputs<'a>,
    provenance: Vec<Provenance>,
}

/// A raw value and where it came from.
struct Raw {
    value: String,
    source: Source,
}

impl Raw {
    fn err(&self, what: &str, reason: impl Into<String>) -> ConfigError {
        self.err_item(what, &self.value, reason)
    }

    fn err_item(&self, what: &str, item: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            what: what.to_owned(),
            value: item.to_owned(),
            source: self.source.clone(),
            reason: reason.into(),
        }
    }

    /// Parses every list item; an error names the bad item.
    fn list<T: std::str::FromStr<Err = crate::net::Reason>>(
        &self,
        what: &str,
    ) -> Result<Vec<T>, ConfigError> {
        let items: Vec<&str> = split_list(&self.value).collect();
        if items.len() > MAX_LIST_ITEMS {
            return Err(self.err(
                &format!("{what} list"),
                format!(
                    "{} items; at most {MAX_LIST_ITEMS} are allowed",
                    items.len()
                ),
            ));
        }
        items
            .into_iter()
            .map(|item| item.parse().map_err(|e| self.err_item(what, item, e)))
            .collect()
    }

    fn one<T: std::str::FromStr<Err = crate::net::Reason>>(
        &self,
        what: &str,
    ) -> Result<T, ConfigError> {
        self.value.trim().parse().map_err(|e| self.err(what, e))
    }

    fn bool(&self) -> Result<bool, ConfigError> {
        parse_go_bool(self.value.trim()).map_err(|e| self.err("boolean", e))
    }
}

impl Resolver<'_> {
    /// An env var of the container: `proxyMetadata` from the pod's annotations first, then
    /// the process environment.
    fn env(&self, name: &str) -> Option<(String, Source)> {
        if let Some(o) = self
            .inputs
            .pod
            .env
            .get(name)
            .filter(|_| !cli::NOT_FROM_POD.contains(&name))
        {
            return Some((
                o.value.clone(),
                Source::Annotation(format!("{} (proxyMetadata.{name})", o.key)),
            ));
        }
        (self.inputs.env)(name).map(|v| (v, Source::Env(name.to_owned())))
    }

    /// The raw value of an option: a pod annotation, then [`Resolver::mesh_raw`].
    fn raw(&self, long: &'static str) -> Raw {
        match self.annotation(long) {
            Some(raw) => raw,
            None => self.mesh_raw(long),
        }
    }

    /// The value a pod annotation gives an option, if any.
    fn annotation(&self, long: &'static str) -> Option<Raw> {
        self.inputs.pod.opts.get(long).map(|o| Raw {
            value: o.value.clone(),
            source: Source::Annotation(o.key.clone()),
        })
    }

    /// The mesh-wide value of an option, ignoring annotations: command line, then the env vars
    /// from the last (highest precedence) to the first, then the mode's default.
    fn mesh_raw(&self, long: &'static str) -> Raw {
        let Some(o) = cli::find(long) else {
            unreachable!("option {long} is not in the table")
        };
        if let Some(v) = self.inputs.flags.get(long) {
            return Raw {
                value: v.clone(),
                source: Source::Flag {
                    long,
                    short: o.short,
                },
            };
        }
        for name in o.env.iter().rev() {
            if let Some((value, source)) = self.env(name) {
                // Istio ignores an empty boolean env var (it does not parse); keep that.
                if o.kind == Kind::Bool && value.trim().is_empty() {
                    continue;
                }
                return Raw { value, source };
            }
        }
        Raw {
            value: default_of(o, self.inputs.defaults).to_owned(),
            source: Source::Default,
        }
    }

    fn env_only(&self, name: &'static str) -> Raw {
        match self.env(name) {
            Some((value, source)) => Raw { value, source },
            None => Raw {
                value: cli::ENV_ONLY
                    .iter()
                    .find(|e| e.name == name)
                    .map(|e| e.default)
                    .unwrap_or_default()
                    .to_owned(),
                source: Source::Default,
            },
        }
    }

    fn record(&mut self, key: &'static str, value: impl fmt::Display, source: &Source) {
        self.provenance.push(Provenance {
            key,
            value: value.to_string(),
            source: source.clone(),
        });
    }

    fn port(&mut self, long: &'static str, key: &'static str) -> Result<Port, ConfigError> {
        let raw = self.raw(long);
        let p: Port = raw.one("port")?;
        self.record(key, p, &raw.source);
        Ok(p)
    }

    /// A Go duration longer than zero (`--restore-timeout`, `--probe-timeout`).
    fn duration(
        &mut self,
        long: &'static str,
        key: &'static str,
    ) -> Result<std::time::Duration, ConfigError> {
        let raw = self.raw(long);
        let d = parse_go_duration(raw.value.trim()).map_err(|e| raw.err("duration", e))?;
        if d.is_zero() {
            return Err(raw.err("duration", "must be longer than 0"));
        }
        self.record(key, format!("{d:?}"), &raw.source);
        Ok(d)
    }

    fn flag(&mut self, long: &'static str, key: &'static str) -> Result<bool, ConfigError> {
        let raw = self.raw(long);
        let b = raw.bool()?;
        self.record(key, b, &raw.source);
        Ok(b)
    }

    fn ports(
        &mut self,
        long: &'static str,
        key: &'static str,
    ) -> Result<Vec<PortItem>, ConfigError> {
        let raw = self.raw(long);
        let v = raw.list("port")?;
        self.record(key, join(&v), &raw.source);
        Ok(v)
    }

    /// An option that is either exactly `*` (`None`: everything) or a list, as Istio spells
    /// `-b` and `-i`. `"*,80"` is a list, and its `*` item is invalid.
    fn star_or_list<T: std::str::FromStr<Err = crate::net::Reason> + fmt::Display>(
        &mut self,
        long: &'static str,
        key: &'static str,
        what: &str,
    ) -> Result<Option<Vec<T>>, ConfigError> {
        let raw = self.raw(long);
        if raw.value.trim() == "*" {
            self.record(key, "*", &raw.source);
            return Ok(None);
        }
        let v: Vec<T> = raw.list(what)?;
        self.record(key, join(&v), &raw.source);
        Ok(Some(v))
    }

    fn ifaces(&mut self, long: &'static str, key: &'static str) -> Result<Vec<Iface>, ConfigError> {
        let raw = self.raw(long);
        let v = raw.list("interface name")?;
        self.record(key, join(&v), &raw.source);
        Ok(v)
    }
}

fn default_of(o: &Opt, d: Defaults) -> &'static str {
    match d {
        Defaults::Istio => o.istio_default,
        Defaults::Native => o.native_default,
    }
}

/// Joins displayable values with commas (the form Istio's config dump uses).
pub fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl Config {
    /// Resolves and validates every setting. The first invalid value is returned as an error
    /// naming its source; nothing has been touched at that point.
    pub fn resolve(inputs: &Inputs<'_>) -> Result<Config, ConfigError> {
        let mut r = Resolver {
            inputs,
            provenance: Vec::new(),
        };
        // In this order: the first bad value is the one reported, and the provenance lists
        // the settings in the order they are resolved.
        refuse_unimplemented(&r)?;
        let proxy = resolve_proxy(&mut r)?;
        let inbound = resolve_inbound(&mut r)?;
        let owner_groups = resolve_owner_groups(&mut r)?;
        let outbound = resolve_outbound(&mut r)?;
        let families = resolve_families(&mut r, &outbound)?;
        let places = resolve_places(&mut r)?;
        let modes = resolve_modes(&mut r)?;
        let loopback_cidr = resolve_loopback_cidr(&mut r)?;
        let run = resolve_run(&mut r)?;
        let log = resolve_log(&r)?;

        Ok(Config {
            proxy_port: proxy.port,
            inbound_capture_port: proxy.inbound_capture_port,
            inbound_tunnel_port: proxy.inbound_tunnel_port,
            proxy_uids: proxy.uids,
            proxy_gids: proxy.gids,
            interception: inbound.interception,
            inbound_ports: inbound.ports,
            inbound_exclude_ports: inbound.exclude_ports,
            exclude_interfaces: outbound.exclude_interfaces,
            outbound_include: outbound.include,
            outbound_exclude: outbound.exclude,
            outbound_ports_include: outbound.ports_include,
            outbound_ports_exclude: outbound.ports_exclude,
            virt_interfaces: outbound.virt_interfaces,
            tproxy_mark: inbound.tproxy_mark,
            tproxy_route_table: inbound.tproxy_route_table,
            dry_run: run.dry_run,
            probe_port: run.probe_port,
            probe_timeout: run.probe_timeout,
            skip_rule_apply: run.skip_rule_apply,
            run_validation: run.run_validation,
            redirect_dns: families.redirect_dns,
            drop_invalid: families.drop_invalid,
            dual_stack: families.dual_stack,
            capture_all_dns: families.capture_all_dns,
            network_namespace: places.network_namespace,
            netns: places.netns,
            xtables_wait: places.xtables_wait,
            restore_timeout: places.restore_timeout,
            handover: modes.handover,
            reconcile: modes.reconcile,
            cleanup_only: modes.cleanup_only,
            native_nftables: modes.native_nftables,
            force_apply: modes.force_apply,
            force_backend: modes.force_backend,
            owner_groups,
            loopback_cidr,
            ipv6: families.ipv6,
            resolv_conf: places.resolv_conf,
            log,
            provenance: r.provenance,
        })
    }

    /// The destinations the rules treat as local, per family: the configurable IPv4 loopback
    /// range (`ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`), and `::1/128`.
    pub fn loopback_of(&self, family: Family) -> Cidr {
        match family {
            Family::V4 => self.loopback_cidr,
            Family::V6 => Cidr::host(family.loopback()),
        }
    }

    /// Whether resolv.conf must be read: DNS capture for the listed servers only.
    pub fn needs_dns_servers(&self) -> bool {
        self.redirect_dns && !self.capture_all_dns
    }

    /// The effective configuration as `KEY=value` lines (Istio's `Istio config:` dump).
    /// Values are written with control characters escaped, so that a path or a raw list
    /// holding a newline cannot forge log lines: always one line per setting.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for p in &self.provenance {
            out.push_str(p.key);
            out.push('=');
            push_escaped(&mut out, &p.value);
            if p.source != Source::Default {
                out.push_str("  # from ");
                push_escaped(&mut out, &p.source.to_string());
            }
            out.push('\n');
        }
        out
    }
}

/// `s` with its control characters escaped, for messages that show text from an input file
/// (one line per message, whatever the input holds).
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        let mut out = String::new();
        push_escaped(&mut out, s);
        std::borrow::Cow::Owned(out)
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Appends `s` with its control characters escaped (`\n`, `\u{1b}`, …).
fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
}

/// The status port: `0` or empty means none.
fn status_port(raw: &Raw) -> Result<Option<Port>, ConfigError> {
    match raw.value.trim() {
        "" | "0" => Ok(None),
        v => v.parse().map(Some).map_err(|e| raw.err("status port", e)),
    }
}

/// The injector's `excludeInboundPort` helper: appends the status port to a port list unless
/// it is already there (compared untrimmed, as the injector does) or there is none.
pub fn exclude_inbound_port(status: Option<Port>, excluded: &str) -> String {
    let Some(status) = status else {
        return excluded.to_owned();
    };
    let status = status.to_string();
    let mut out: Vec<&str> = Vec::new();
    for item in excluded.split(',') {
        if item == status {
            return excluded.to_owned();
        }
        let item = item.trim();
        if !item.is_empty() {
            out.push(item);
        }
    }
    out.push(&status);
    out.join(",")
}

/// `-d` as the injector renders it: the always-excluded ports, then the helper's list.
fn injector_exclude_value(status: Option<Port>, excluded: &str) -> String {
    let rest = exclude_inbound_port(status, excluded);
    if rest.is_empty() {
        ALWAYS_EXCLUDED_INBOUND.to_owned()
    } else {
        format!("{ALWAYS_EXCLUDED_INBOUND},{rest}")
    }
}

/// Recovers the mesh's `values.global.proxy.excludeInboundPorts` from a rendered `-d` value:
/// drops the always-excluded prefix and the status port the helper appended.
fn mesh_excluded_ports(rendered: &str, status: Option<Port>) -> String {
    let mut items: Vec<&str> = rendered
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let always: Vec<&str> = ALWAYS_EXCLUDED_INBOUND.split(',').collect();
    if items.starts_with(&always) {
        items.drain(..always.len());
    }
    if let Some(s) = status {
        let s = s.to_string();
        if items.last() == Some(&s.as_str()) && items.iter().filter(|i| **i == s).count() == 1 {
            items.pop();
        }
    }
    items.join(",")
}

/// The proxy's ports and users.
struct ProxyParts {
    port: Port,
    inbound_capture_port: Port,
    inbound_tunnel_port: Port,
    uids: Vec<Id>,
    gids: Vec<Id>,
}

fn resolve_proxy(r: &mut Resolver<'_>) -> Result<ProxyParts, ConfigError> {
    let port = r.port("envoy-port", "PROXY_PORT")?;
    let inbound_capture_port = r.port("inbound-capture-port", "PROXY_INBOUND_CAPTURE_PORT")?;
    let inbound_tunnel_port = r.port("inbound-tunnel-port", "PROXY_TUNNEL_PORT")?;
    let (uids, gids) = resolve_proxy_owners(r)?;
    Ok(ProxyParts {
        port,
        inbound_capture_port,
        inbound_tunnel_port,
        uids,
        gids,
    })
}

/// Inbound capture: the mode, TPROXY's mark and route table, the ports captured and not.
struct InboundParts {
    interception: Interception,
    tproxy_mark: Mark,
    tproxy_route_table: RouteTable,
    ports: InboundPorts,
    exclude_ports: Vec<PortItem>,
}

fn resolve_inbound(r: &mut Resolver<'_>) -> Result<InboundParts, ConfigError> {
    let interception = resolve_interception(r)?;
    let raw = r.raw("istio-inbound-tproxy-mark");
    let tproxy_mark: Mark = raw.one("mark")?;
    r.record("INBOUND_TPROXY_MARK", tproxy_mark, &raw.source);
    let raw = r.raw("istio-inbound-tproxy-route-table");
    let tproxy_route_table: RouteTable = raw.one("route table")?;
    r.record(
        "INBOUND_TPROXY_ROUTE_TABLE",
        tproxy_route_table,
        &raw.source,
    );
    let ports = match r.star_or_list("istio-inbound-ports", "INBOUND_PORTS_INCLUDE", "port")? {
        None => InboundPorts::All,
        Some(v) => InboundPorts::Only(v),
    };
    let exclude_ports = resolve_inbound_excludes(r)?;
    Ok(InboundParts {
        interception,
        tproxy_mark,
        tproxy_route_table,
        ports,
        exclude_ports,
    })
}

/// Outbound capture: the CIDRs (and where the included ones come from), ports and
/// interfaces captured and not.
struct OutboundParts {
    include: OutboundCidrs,
    include_source: Source,
    exclude: Vec<Cidr>,
    ports_include: Vec<PortItem>,
    ports_exclude: Vec<PortItem>,
    virt_interfaces: Vec<Iface>,
    exclude_interfaces: Vec<Iface>,
}

fn resolve_outbound(r: &mut Resolver<'_>) -> Result<OutboundParts, ConfigError> {
    let (include, include_source, exclude) = resolve_outbound_cidrs(r)?;
    let ports_include = r.ports("istio-outbound-ports", "OUTBOUND_PORTS_INCLUDE")?;
    let ports_exclude = r.ports(
        "istio-local-outbound-ports-exclude",
        "OUTBOUND_PORTS_EXCLUDE",
    )?;
    let virt_interfaces = r.ifaces("kube-virt-interfaces", "KUBE_VIRT_INTERFACES")?;
    let exclude_interfaces = r.ifaces("istio-exclude-interfaces", "EXCLUDE_INTERFACES")?;
    Ok(OutboundParts {
        include,
        include_source,
        exclude,
        ports_include,
        ports_exclude,
        virt_interfaces,
        exclude_interfaces,
    })
}

/// The families programmed, and the DNS and conntrack extras.
struct FamilyParts {
    ipv6: Ipv6Mode,
    dual_stack: bool,
    redirect_dns: bool,
    drop_invalid: bool,
    capture_all_dns: bool,
}

fn resolve_families(
    r: &mut Resolver<'_>,
    outbound: &OutboundParts,
) -> Result<FamilyParts, ConfigError> {
    Ok(FamilyParts {
        ipv6: resolve_ipv6(r, &outbound.include, outbound.include_source.clone())?,
        dual_stack: r.flag("dual-stack", "DUAL_STACK")?,
        redirect_dns: r.flag("redirect-dns", "DNS_CAPTURE")?,
        drop_invalid: r.flag("drop-invalid", "DROP_INVALID")?,
        capture_all_dns: r.flag("capture-all-dns", "CAPTURE_ALL_DNS")?,
    })
}

/// Where to read and act, and how long to wait for the xtables lock and a restore.
struct PlaceParts {
    resolv_conf: String,
    network_namespace: Option<String>,
    netns: Option<String>,
    xtables_wait: u32,
    restore_timeout: Duration,
}

/// How the rules are applied: the modes and the backend.
struct ModeParts {
    handover: bool,
    reconcile: bool,
    cleanup_only: bool,
    native_nftables: bool,
    force_apply: bool,
    force_backend: Option<IptablesVariant>,
}

fn resolve_modes(r: &mut Resolver<'_>) -> Result<ModeParts, ConfigError> {
    Ok(ModeParts {
        handover: r.flag("handover", "HANDOVER")?,
        reconcile: r.flag("reconcile", "RECONCILE")?,
        cleanup_only: r.flag("cleanup-only", "CLEANUP_ONLY")?,
        native_nftables: r.flag("native-nftables", "NATIVE_NFTABLES")?,
        force_apply: r.flag("force-apply", "FORCE_APPLY")?,
        force_backend: resolve_force_backend(r)?,
    })
}

/// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR` (env only), recorded as `HOST_IPV4_LOOPBACK_CIDR`.
fn resolve_loopback_cidr(r: &mut Resolver<'_>) -> Result<Cidr, ConfigError> {
    let raw = r.env_only("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR");
    let loopback_cidr = resolve_loopback(&raw)?;
    r.record("HOST_IPV4_LOOPBACK_CIDR", loopback_cidr, &raw.source);
    Ok(loopback_cidr)
}

/// What the run does besides applying: a dry run, skipping the rules, the validation probe.
struct RunParts {
    dry_run: bool,
    skip_rule_apply: bool,
    run_validation: bool,
    probe_port: Port,
    probe_timeout: Duration,
}

fn resolve_run(r: &mut Resolver<'_>) -> Result<RunParts, ConfigError> {
    Ok(RunParts {
        dry_run: r.flag("dry-run", "DRY_RUN")?,
        skip_rule_apply: r.flag("skip-rule-apply", "SKIP_RULE_APPLY")?,
        run_validation: r.flag("run-validation", "RUN_VALIDATION")?,
        probe_port: r.port("iptables-probe-port", "IPTABLES_PROBE_PORT")?,
        probe_timeout: r.duration("probe-timeout", "PROBE_TIMEOUT")?,
    })
}

/// Options istio-init accepts but does not implement: given (and not `false`), an error.
fn refuse_unimplemented(r: &Resolver<'_>) -> Result<(), ConfigError> {
    for o in cli::OPTIONS.iter().filter(|o| o.unimplemented) {
        let raw = r.raw(o.long);
        if raw.source != Source::Default && raw.bool().unwrap_or(true) {
            return Err(raw.err(
                "option",
                format!(
                    "--{} is not implemented by istio-init yet; remove it",
                    o.long
                ),
            ));
        }
    }
    Ok(())
}

/// The proxy's uids and gids (`-u`, `-g`).
fn resolve_proxy_owners(r: &mut Resolver<'_>) -> Result<(Vec<Id>, Vec<Id>), ConfigError> {
    // Proxy UIDs: empty means "the uid of $ENVOY_USER, else 1337" (Istio's rule).
    let uid_raw = r.raw("proxy-uid");
    let mut proxy_uids: Vec<Id> = uid_raw.list("uid")?;
    let mut uid_source = uid_raw.source.clone();
    if proxy_uids.is_empty() {
        let user = r.env_only("ENVOY_USER");
        let uid = (r.inputs.user_uid)(&user.value).unwrap_or(1337);
        let id: Id = uid
            .to_string()
            .parse()
            .map_err(|e| user.err("user", format!("uid {uid}: {e}")))?;
        proxy_uids.push(id);
        uid_source = Source::Default;
    }
    r.record("PROXY_UID", join(&proxy_uids), &uid_source);

    // Proxy GIDs: empty means the same list as the UIDs.
    let gid_raw = r.raw("proxy-gid");
    let mut proxy_gids: Vec<Id> = gid_raw.list("gid")?;
    let mut gid_source = gid_raw.source.clone();
    if proxy_gids.is_empty() {
        proxy_gids = proxy_uids.clone();
        gid_source = uid_source;
    }
    r.record("PROXY_GID", join(&proxy_gids), &gid_source);
    Ok((proxy_uids, proxy_gids))
}

/// The inbound interception mode (`-m`).
fn resolve_interception(r: &mut Resolver<'_>) -> Result<Interception, ConfigError> {
    let mode_raw = r.raw("istio-inbound-interception-mode");
    let interception = match mode_raw.value.trim() {
        "" | "REDIRECT" => Interception::Redirect,
        "TPROXY" => Interception::Tproxy,
        "NONE" => Interception::None,
        _ => {
            return Err(mode_raw.err(
                "interception mode",
                "expected REDIRECT, TPROXY or NONE (upper case)",
            ));
        }
    };
    r.record(
        "INBOUND_INTERCEPTION_MODE",
        match interception {
            Interception::Redirect => "REDIRECT",
            Interception::Tproxy => "TPROXY",
            Interception::None => "NONE",
        },
        &mode_raw.source,
    );
    Ok(interception)
}

/// The outbound CIDRs to capture (`-i`, with its source) and to exclude (`-x`).
fn resolve_outbound_cidrs(
    r: &mut Resolver<'_>,
) -> Result<(OutboundCidrs, Source, Vec<Cidr>), ConfigError> {
    let outbound_include =
        match r.star_or_list("istio-service-cidr", "OUTBOUND_IP_RANGES_INCLUDE", "CIDR")? {
            None => OutboundCidrs::All,
            Some(v) => OutboundCidrs::Only(v),
        };
    let include_source = r.raw("istio-service-cidr").source;
    let raw = r.raw("istio-service-exclude-cidr");
    if raw.value.trim() == "*" {
        return Err(raw.err(
            "CIDR",
            "'*' cannot be excluded; to capture nothing outbound, set --istio-service-cidr (-i) to \"\"",
        ));
    }
    let outbound_exclude: Vec<Cidr> = raw.list("CIDR")?;
    r.record(
        "OUTBOUND_IP_RANGES_EXCLUDE",
        join(&outbound_exclude),
        &raw.source,
    );
    Ok((outbound_include, include_source, outbound_exclude))
}

/// The IPv6 mode (`--ipv6`), checked against the IPv6 ranges to capture.
fn resolve_ipv6(
    r: &mut Resolver<'_>,
    outbound_include: &OutboundCidrs,
    include_source: Source,
) -> Result<Ipv6Mode, ConfigError> {
    let raw = r.raw("ipv6");
    let ipv6 = match raw.value.trim() {
        "auto" | "" => Ipv6Mode::Auto,
        v => match parse_go_bool(v) {
            Ok(true) => Ipv6Mode::On,
            Ok(false) => Ipv6Mode::Off,
            Err(_) => return Err(raw.err("IPv6 mode", "expected auto, true or false")),
        },
    };
    r.record(
        "ENABLE_INBOUND_IPV6",
        match ipv6 {
            Ipv6Mode::Auto => "auto",
            Ipv6Mode::On => "true",
            Ipv6Mode::Off => "false",
        },
        &raw.source,
    );
    // IPv6 ranges while IPv6 rules are off. `Off` is always explicit (flag or env; the
    // default is auto). An IPv6 range to *capture* contradicts it: the pod would silently
    // get less capture than it asks for, so that is refused. IPv6 ranges to *exclude* agree
    // with it (no IPv6 traffic is captured at all) and are accepted, and in auto mode a pod
    // without IPv6 only gets a warning (`lib::gather_facts`): mesh-wide defaults written
    // for dual-stack pods must not stop IPv4-only pods from starting.
    if ipv6 == Ipv6Mode::Off {
        if let Some(c) = outbound_include.of(Family::V6).first() {
            return Err(ConfigError {
                what: "CIDR".into(),
                value: c.to_string(),
                source: include_source,
                reason: format!(
                    "an IPv6 range to capture, but IPv6 rules are disabled by {}; remove \
                     the IPv6 ranges or set --ipv6=auto",
                    raw.source
                ),
            });
        }
    }
    Ok(ipv6)
}

/// Where to read and act: the resolv.conf path, and the namespace (`--network-namespace`,
/// `--netns`); then the waits (`-w`, `--restore-timeout`).
fn resolve_places(r: &mut Resolver<'_>) -> Result<PlaceParts, ConfigError> {
    let raw = r.raw("resolv-conf");
    let resolv_conf = raw.value.clone();
    if resolv_conf.trim().is_empty() {
        return Err(raw.err("path", "empty"));
    }
    r.record("RESOLV_CONF", &resolv_conf, &raw.source);

    let raw = r.raw("network-namespace");
    let network_namespace = Some(raw.value.clone()).filter(|v| !v.is_empty());
    r.record("NETWORK_NAMESPACE", &raw.value, &raw.source);

    let raw = r.raw("netns");
    let netns = match raw.value.trim() {
        "" => None,
        v if v.bytes().all(|b| b.is_ascii_digit()) => Some(format!("/proc/{v}/ns/net")),
        v if v.starts_with('/') => Some(v.to_owned()),
        _ => {
            return Err(raw.err(
                "network namespace",
                "expected an absolute path (/proc/PID/ns/net, /var/run/netns/NAME) or a PID",
            ));
        }
    };
    r.record("NETNS", netns.as_deref().unwrap_or(""), &raw.source);
    Ok(PlaceParts {
        resolv_conf,
        network_namespace,
        netns,
        xtables_wait: resolve_xtables_wait(r)?,
        restore_timeout: r.duration("restore-timeout", "RESTORE_TIMEOUT")?,
    })
}

/// How long the iptables programs wait for the xtables lock (`-w`).
fn resolve_xtables_wait(r: &mut Resolver<'_>) -> Result<u32, ConfigError> {
    let raw = r.raw("xtables-wait");
    let xtables_wait: u32 = match raw.value.trim().parse() {
        Ok(n) if n <= 3600 => n,
        _ => return Err(raw.err("wait", "expected whole seconds from 0 to 3600")),
    };
    r.record("XTABLES_WAIT", xtables_wait, &raw.source);
    Ok(xtables_wait)
}

/// The iptables backend forced by `FORCE_IPTABLES_BINARY`, if any.
fn resolve_force_backend(r: &mut Resolver<'_>) -> Result<Option<IptablesVariant>, ConfigError> {
    let raw = r.raw("force-iptables-binary");
    let force_backend = match raw.value.trim() {
        "" => None,
        "legacy" => Some(IptablesVariant::Legacy),
        "nft" => Some(IptablesVariant::Nft),
        _ => return Err(raw.err("iptables backend", "expected legacy or nft")),
    };
    r.record("FORCE_IPTABLES_BINARY", &raw.value, &raw.source);
    Ok(force_backend)
}

/// `-d`, with the injector's rule when annotations are involved: the pod's
/// `traffic.sidecar.istio.io/excludeInboundPorts` and `status.sidecar.istio.io/port` replace
/// the mesh's excluded ports and status port, and the list is rebuilt as the injector builds
/// it (`15090,15021`, the excluded ports, then the status port unless already listed or 0).
fn resolve_inbound_excludes(r: &mut Resolver<'_>) -> Result<Vec<PortItem>, ConfigError> {
    const LONG: &str = "istio-local-exclude-ports";
    let mesh_status_raw = r.mesh_raw("status-port");
    let mesh_status = status_port(&mesh_status_raw)?;
    let ann_status = r.annotation("status-port");
    let ann_excluded = r.annotation(LONG);
    let status_source;
    let raw = match (&ann_excluded, &ann_status) {
        (None, None) => {
            status_source = mesh_status_raw.source.clone();
            let mesh = r.mesh_raw(LONG);
            if mesh.source == Source::Default
                && r.inputs.defaults == Defaults::Native
                && mesh_status_raw.source != Source::Default
            {
                // The standard sidecar's -d, for this mesh's status port.
                Raw {
                    value: injector_exclude_value(mesh_status, ""),
                    source: mesh_status_raw.source.clone(),
                }
            } else {
                mesh
            }
        }
        _ => {
            let status = match &ann_status {
                Some(a) => {
                    status_source = a.source.clone();
                    status_port(a)?
                }
                None => {
                    status_source = mesh_status_raw.source.clone();
                    mesh_status
                }
            };
            let (excluded, source) = match &ann_excluded {
                Some(a) => {
                    let _: Vec<PortItem> = a.list("port")?;
                    (a.value.clone(), a.source.clone())
                }
                None => {
                    let mesh = r.mesh_raw(LONG);
                    let _: Vec<PortItem> = mesh.list("port")?;
                    let source = ann_status
                        .as_ref()
                        .map_or(Source::Default, |a| a.source.clone());
                    (mesh_excluded_ports(&mesh.value, mesh_status), source)
                }
            };
            Raw {
                value: injector_exclude_value(status, &excluded),
                source,
            }
        }
    };
    let status_value = r.raw("status-port").value.trim().to_owned();
    r.record(
        "STATUS_PORT",
        if status_value.is_empty() {
            "0"
        } else {
            &status_value
        },
        &status_source,
    );
    let v = raw.list("port")?;
    r.record("INBOUND_PORTS_EXCLUDE", join(&v), &raw.source);
    Ok(v)
}

fn resolve_owner_groups(r: &mut Resolver<'_>) -> Result<OwnerGroups, ConfigError> {
    let include = r.env_only("ISTIO_OUTBOUND_OWNER_GROUPS");
    let exclude = r.env_only("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE");
    let groups = if include.value.trim() == "*" {
        let ex: Vec<Group> = exclude.list("group")?;
        r.record("OUTBOUND_OWNER_GROUPS_INCLUDE", "*", &include.source);
        r.record("OUTBOUND_OWNER_GROUPS_EXCLUDE", join(&ex), &exclude.source);
        OwnerGroups::AllExcept(ex)
    } else {
        let inc: Vec<Group> = include.list("group")?;
        if inc.len() > MAX_OWNER_GROUPS {
            return Err(include.err(
                "owner group list",
                format!(
                    "{} groups; at most {MAX_OWNER_GROUPS} can be captured (use '*' with \
                     ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE instead)",
                    inc.len()
                ),
            ));
        }
        // The exclude list is ignored unless include is '*', as in Istio; still validate it.
        let _: Vec<Group> = exclude.list("group")?;
        r.record("OUTBOUND_OWNER_GROUPS_INCLUDE", join(&inc), &include.source);
        r.record(
            "OUTBOUND_OWNER_GROUPS_EXCLUDE",
            &exclude.value,
            &exclude.source,
        );
        OwnerGroups::Only(inc)
    };
    Ok(groups)
}

fn resolve_loopback(raw: &Raw) -> Result<Cidr, ConfigError> {
    const WHAT: &str = "IPv4 loopback CIDR";
    let cidr: Cidr = raw.value.trim().parse().map_err(|e| raw.err(WHAT, e))?;
    if cidr.family() != Family::V4 || !cidr.is_loopback() {
        return Err(raw.err(WHAT, "must be an IPv4 loopback prefix inside 127.0.0.0/8"));
    }
    if cidr.prefix_len() < 8 {
        return Err(raw.err(WHAT, "mask must be between /8 and /32"));
    }
    Ok(cidr)
}

fn resolve_log(r: &Resolver<'_>) -> Result<LogSettings, ConfigError> {
    let raw = r.raw("log_output_level");
    let mut level = log::LevelFilter::Info;
    for item in split_list(&raw.value) {
        let (scope, lvl) = match item.split_once(':') {
            Some((s, l)) => (s, l),
            None => ("default", item),
        };
        // Scopes other than `default` are ignored, but still must look like scope names:
        // a NUL or a newline in one would otherwise pass unnoticed.
        if scope.is_empty()
            || !scope
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(raw.err_item(
                "log level",
                item,
                "the scope name must be letters, digits, '_', '.' or '-'",
            ));
        }
        let parsed = match lvl {
            "debug" => log::LevelFilter::Debug,
            "info" => log::LevelFilter::Info,
            "warn" => log::LevelFilter::Warn,
            "error" | "fatal" => log::LevelFilter::Error,
            "none" => log::LevelFilter::Off,
            _ => {
                return Err(raw.err_item(
                    "log level",
                    item,
                    "expected debug, info, warn, error, fatal or none",
                ));
            }
        };
        if scope == "default" {
            level = parsed;
        }
    }
    let json = r.raw("log_as_json").bool()?;
    Ok(LogSettings { level, json })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    /// Where the resolved setting `key` came from.
    fn source_of(c: &Config, key: &str) -> Source {
        c.provenance
            .iter()
            .find(|p| p.key == key)
            .unwrap()
            .source
            .clone()
    }

    use super::*;

    pub(crate) fn resolve(
        defaults: Defaults,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Config, ConfigError> {
        let mut argv = vec!["istio-init"];
        if defaults == Defaults::Istio {
            argv.push("istio-iptables");
        }
        argv.extend_from_slice(args);
        resolve_argv(argv, env, &NO_POD)
    }

    /// Parses `argv` and resolves it with `env` (a map, not the process env) and `pod`.
    fn resolve_argv(
        argv: Vec<&str>,
        env: &[(&str, &str)],
        pod: &PodOverrides,
    ) -> Result<Config, ConfigError> {
        let inv = cli::parse(argv).unwrap();
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |k: &str| env.get(k).cloned();
        Config::resolve(&Inputs {
            defaults: inv.defaults,
            flags: &inv.flags,
            env: &lookup,
            user_uid: &|_| None,
            pod,
        })
    }

    #[test]
    fn native_nftables_from_flag_or_env_in_both_invocation_styles() {
        for d in [Defaults::Native, Defaults::Istio] {
            assert!(!resolve(d, &[], &[]).unwrap().native_nftables);
            assert!(
                resolve(d, &["--native-nftables"], &[])
                    .unwrap()
                    .native_nftables
            );
            assert!(
                resolve(d, &[], &[("NATIVE_NFTABLES", "true")])
                    .unwrap()
                    .native_nftables
            );
            // The command line wins over the env var, as for every option.
            assert!(
                !resolve(
                    d,
                    &["--native-nftables=false"],
                    &[("NATIVE_NFTABLES", "true")]
                )
                .unwrap()
                .native_nftables
            );
        }
    }

    #[test]
    fn native_defaults_are_the_standard_sidecar() {
        let c = resolve(Defaults::Native, &[], &[]).unwrap();
        assert_eq!(c.inbound_ports, InboundPorts::All);
        assert_eq!(c.outbound_include, OutboundCidrs::All);
        assert_eq!(join(&c.inbound_exclude_ports), "15090,15021,15020");
        assert_eq!(join(&c.proxy_uids), "1337");
        assert_eq!(join(&c.proxy_gids), "1337");
        assert_eq!(c.interception, Interception::Redirect);
    }

    #[test]
    fn istio_defaults_capture_nothing_by_default() {
        let c = resolve(Defaults::Istio, &[], &[]).unwrap();
        assert_eq!(c.inbound_ports, InboundPorts::Only(vec![]));
        assert_eq!(c.outbound_include, OutboundCidrs::Only(vec![]));
        assert!(c.inbound_exclude_ports.is_empty());
    }

    #[test]
    fn envoy_user_lookup_sets_uid() {
        let inv = cli::parse(["istio-init", "istio-iptables"]).unwrap();
        let env = |k: &str| (k == "ENVOY_USER").then(|| "proxy".to_owned());
        let c = Config::resolve(&Inputs {
            defaults: inv.defaults,
            flags: &inv.flags,
            env: &env,
            user_uid: &|u| (u == "proxy").then_some(4242),
            pod: &NO_POD,
        })
        .unwrap();
        assert_eq!(join(&c.proxy_uids), "4242");
        assert_eq!(join(&c.proxy_gids), "4242");
    }

    #[test]
    fn precedence_cli_then_secondary_env_then_primary_env_then_default() {
        let d = Defaults::Native;
        assert!(!resolve(d, &[], &[]).unwrap().redirect_dns);
        assert!(
            resolve(d, &[], &[("REDIRECT_DNS", "true")])
                .unwrap()
                .redirect_dns
        );
        let both = [
            ("REDIRECT_DNS", "true"),
            ("ISTIO_META_DNS_CAPTURE", "false"),
        ];
        assert!(!resolve(d, &[], &both).unwrap().redirect_dns);
        assert!(resolve(d, &["--redirect-dns"], &both).unwrap().redirect_dns);
        let c = resolve(
            d,
            &[],
            &[("DROP_INVALID", "false"), ("INVALID_DROP", "true")],
        )
        .unwrap();
        assert!(c.drop_invalid);
        let c = resolve(d, &["--dual-stack=false"], &[("ISTIO_DUAL_STACK", "true")]).unwrap();
        assert!(!c.dual_stack);
        let c = resolve(d, &[], &[("INBOUND_CAPTURE_PORT", "16006")]).unwrap();
        assert_eq!(c.inbound_capture_port.get(), 16006);
        let c = resolve(d, &["-z", "17006"], &[("INBOUND_CAPTURE_PORT", "16006")]).unwrap();
        assert_eq!(c.inbound_capture_port.get(), 17006);
        // ENVOY_PORT is documented by Istio but never read.
        let c = resolve(d, &[], &[("ENVOY_PORT", "1")]).unwrap();
        assert_eq!(c.proxy_port.get(), 15001);
    }

    #[test]
    fn provenance_names_the_source() {
        let c = resolve(
            Defaults::Native,
            &["-p", "15001"],
            &[("ISTIO_META_DNS_CAPTURE", "true")],
        )
        .unwrap();
        let src = |k: &str| source_of(&c, k);
        assert_eq!(
            src("PROXY_PORT"),
            Source::Flag {
                long: "envoy-port",
                short: Some('p')
            }
        );
        assert_eq!(
            src("DNS_CAPTURE"),
            Source::Env("ISTIO_META_DNS_CAPTURE".into())
        );
        assert_eq!(src("PROXY_TUNNEL_PORT"), Source::Default);
        assert!(
            c.dump()
                .contains("DNS_CAPTURE=true  # from env ISTIO_META_DNS_CAPTURE\n")
        );
    }

    #[test]
    fn error_messages_name_flag_value_and_reason() {
        let d = Defaults::Native;
        for (args, env, want) in [
            (
                &["-d", "80x"][..],
                &[][..],
                r#"invalid port "80x" in --istio-local-exclude-ports (-d): not a number"#,
            ),
            (
                &[],
                &[("ISTIO_LOCAL_EXCLUDE_PORTS", "0")],
                r#"invalid port "0" in env ISTIO_LOCAL_EXCLUDE_PORTS: port 0 is not a valid port (1-65535)"#,
            ),
            (
                &["-i", "10.0.0.0/33"],
                &[],
                r#"invalid CIDR "10.0.0.0/33" in --istio-service-cidr (-i): prefix length /33 is longer than /32 for an IPv4 address"#,
            ),
            (
                &["-x", "*"],
                &[],
                r#"invalid CIDR "*" in --istio-service-exclude-cidr (-x): '*' cannot be excluded; to capture nothing outbound, set --istio-service-cidr (-i) to """#,
            ),
            (
                &["-m", "tproxy"],
                &[],
                r#"invalid interception mode "tproxy" in --istio-inbound-interception-mode (-m): expected REDIRECT, TPROXY or NONE (upper case)"#,
            ),
            (
                &["-c", "eth0 -j ACCEPT"],
                &[],
                r#"invalid interface name "eth0 -j ACCEPT" in --istio-exclude-interfaces (-c): contains ' '; allowed are letters, digits, '_', '.', '-' and a trailing '+'"#,
            ),
            (
                &[],
                &[("REDIRECT_DNS", "yes")],
                r#"invalid boolean "yes" in env REDIRECT_DNS: not a boolean (expected true or false)"#,
            ),
            (
                &["-u", "1337,-1"],
                &[],
                r#"invalid uid "-1" in --proxy-uid (-u): negative ids are not valid"#,
            ),
            (
                &[],
                &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/8")],
                r#"invalid IPv4 loopback CIDR "10.0.0.1/8" in env ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: must be an IPv4 loopback prefix inside 127.0.0.0/8"#,
            ),
            (
                &[],
                &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "")],
                r#"invalid IPv4 loopback CIDR "" in env ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: missing prefix length (expected ADDRESS/LENGTH, e.g. 10.0.0.0/8)"#,
            ),
            (
                &["--force-iptables-binary=iptables"],
                &[],
                r#"invalid iptables backend "iptables" in --force-iptables-binary: expected legacy or nft"#,
            ),
            (
                &["--cni-mode"],
                &[],
                r#"invalid option "true" in --cni-mode: --cni-mode is not implemented by istio-init yet; remove it"#,
            ),
            (
                &["--probe-timeout=5"],
                &[],
                r#"invalid duration "5" in --probe-timeout: not a duration (expected e.g. 5s, 500ms, 1m30s): missing unit"#,
            ),
            (
                &[],
                &[("ISTIO_INIT_RESTORE_TIMEOUT", "30")],
                r#"invalid duration "30" in env ISTIO_INIT_RESTORE_TIMEOUT: not a duration (expected e.g. 5s, 500ms, 1m30s): missing unit"#,
            ),
            (
                &["--restore-timeout=0s"],
                &[],
                r#"invalid duration "0s" in --restore-timeout: must be longer than 0"#,
            ),
            (
                &["-t", "0x10"],
                &[],
                r#"invalid mark "0x10" in --istio-inbound-tproxy-mark (-t): not a decimal number"#,
            ),
            (
                &["--log_output_level=ads:debug,a\0b:info"],
                &[],
                r#"invalid log level "a\0b:info" in --log_output_level: the scope name must be letters, digits, '_', '.' or '-'"#,
            ),
            (
                &["--log_output_level=:debug"],
                &[],
                r#"invalid log level ":debug" in --log_output_level: the scope name must be letters, digits, '_', '.' or '-'"#,
            ),
            (
                &["--log_output_level=default:verbose"],
                &[],
                r#"invalid log level "default:verbose" in --log_output_level: expected debug, info, warn, error, fatal or none"#,
            ),
        ] {
            let err = resolve(d, args, env).unwrap_err();
            assert_eq!(err.to_string(), want, "{args:?} {env:?}");
        }
    }

    #[test]
    fn proxy_metadata_cannot_choose_the_namespace_or_files() {
        let c = resolve_pod(
            &[],
            &[],
            &[],
            &[
                ("ISTIO_INIT_NETNS", "/proc/1/ns/net"),
                ("ISTIO_INIT_RESOLV_CONF", "/etc/shadow"),
                ("ISTIO_META_DNS_CAPTURE", "true"),
            ],
        )
        .unwrap();
        assert_eq!(c.netns, None);
        assert_eq!(c.resolv_conf, "/etc/resolv.conf");
        assert!(c.redirect_dns, "other proxyMetadata still applies");
        for name in cli::NOT_FROM_POD {
            assert!(
                cli::OPTIONS.iter().any(|o| o.env.contains(name)),
                "{name} is not an env var of any option"
            );
        }
    }

    /// Resolves with annotations (as `annotations::translate` would produce them).
    fn resolve_pod(
        args: &[&str],
        env: &[(&str, &str)],
        opts: &[(&'static str, &str, &str)],
        pod_env: &[(&str, &str)],
    ) -> Result<Config, ConfigError> {
        let mut pod = PodOverrides::default();
        for (long, value, key) in opts {
            pod.opts.insert(
                long,
                Override {
                    value: (*value).into(),
                    key: (*key).into(),
                },
            );
        }
        for (name, value) in pod_env {
            pod.env.insert(
                (*name).into(),
                Override {
                    value: (*value).into(),
                    key: "proxy.istio.io/config".into(),
                },
            );
        }
        let mut argv = vec!["istio-init"];
        argv.extend_from_slice(args);
        resolve_argv(argv, env, &pod)
    }

    const EX: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    const SP: &str = "status.sidecar.istio.io/port";

    #[test]
    fn inbound_excludes_follow_the_injector() {
        let d = |args: &[&str], opts: &[(&'static str, &str, &str)]| {
            join(
                &resolve_pod(args, &[], opts, &[])
                    .unwrap()
                    .inbound_exclude_ports,
            )
        };
        let ex = "istio-local-exclude-ports";
        let sp = "status-port";
        // Mesh defaults only.
        assert_eq!(d(&[], &[]), "15090,15021,15020");
        assert_eq!(d(&["--status-port", "123"], &[]), "15090,15021,123");
        assert_eq!(d(&["--status-port", "0"], &[]), "15090,15021");
        // The pod's excluded ports, with the mesh's status port.
        assert_eq!(d(&[], &[(ex, "4,5,6", EX)]), "15090,15021,4,5,6,15020");
        assert_eq!(
            d(&["--status-port=123"], &[(ex, "4,5,6", EX)]),
            "15090,15021,4,5,6,123"
        );
        assert_eq!(d(&[], &[(ex, "4,15020", EX)]), "15090,15021,4,15020");
        assert_eq!(d(&[], &[(ex, "", EX)]), "15090,15021,15020");
        // The pod's status port, with the mesh's excluded ports recovered from -d.
        assert_eq!(d(&[], &[(sp, "123", SP)]), "15090,15021,123");
        assert_eq!(d(&[], &[(sp, "0", SP)]), "15090,15021");
        assert_eq!(
            d(
                &["-d", "15090,15021,4,5,6", "--status-port", "0"],
                &[(sp, "123", SP)]
            ),
            "15090,15021,4,5,6,123"
        );
        assert_eq!(
            d(&["-d", "15090,15021,4,5,6,15020"], &[(sp, "7", SP)]),
            "15090,15021,4,5,6,7"
        );
        // Both.
        assert_eq!(d(&[], &[(sp, "9", SP), (ex, "1", EX)]), "15090,15021,1,9");
        // The annotation is named as the source.
        let c = resolve_pod(&[], &[], &[(sp, "9", SP)], &[]).unwrap();
        let src = |k: &str| source_of(&c, k);
        assert_eq!(src("INBOUND_PORTS_EXCLUDE"), Source::Annotation(SP.into()));
        assert_eq!(src("STATUS_PORT"), Source::Annotation(SP.into()));
    }

    #[test]
    fn annotations_win_over_flags_and_env() {
        let c = resolve_pod(
            &["-b", "1,2", "-i", "10.0.0.0/8"],
            &[
                ("ISTIO_META_DNS_CAPTURE", "false"),
                ("ISTIO_INBOUND_PORTS", "9"),
            ],
            &[(
                "istio-inbound-ports",
                "80",
                "traffic.sidecar.istio.io/includeInboundPorts",
            )],
            &[("ISTIO_META_DNS_CAPTURE", "true")],
        )
        .unwrap();
        assert_eq!(
            c.inbound_ports,
            InboundPorts::Only(vec!["80".parse().unwrap()])
        );
        assert!(c.redirect_dns, "proxyMetadata wins over the process env");
        assert_eq!(
            c.outbound_include,
            OutboundCidrs::Only(vec!["10.0.0.0/8".parse().unwrap()])
        );
        // proxyMetadata acts as env: a flag still wins over it.
        let c = resolve_pod(
            &["--redirect-dns=false"],
            &[],
            &[],
            &[("ISTIO_META_DNS_CAPTURE", "true")],
        )
        .unwrap();
        assert!(!c.redirect_dns);
        // Env-only settings come from proxyMetadata too.
        let c = resolve_pod(
            &[],
            &[],
            &[],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888")],
        )
        .unwrap();
        assert_eq!(
            c.owner_groups,
            OwnerGroups::AllExcept(vec!["888".parse().unwrap()])
        );
    }

    #[test]
    fn annotation_errors_name_the_annotation() {
        for (opts, pod_env, want) in [
            (
                &[("istio-local-exclude-ports", "80x", EX)][..],
                &[][..],
                r#"invalid port "80x" in annotation traffic.sidecar.istio.io/excludeInboundPorts: not a number"#,
            ),
            (
                &[("status-port", "http", SP)],
                &[],
                r#"invalid status port "http" in annotation status.sidecar.istio.io/port: not a number"#,
            ),
            (
                &[(
                    "istio-service-cidr",
                    "10.0.0.0/33",
                    "traffic.sidecar.istio.io/includeOutboundIPRanges",
                )],
                &[],
                r#"invalid CIDR "10.0.0.0/33" in annotation traffic.sidecar.istio.io/includeOutboundIPRanges: prefix length /33 is longer than /32 for an IPv4 address"#,
            ),
            (
                &[(
                    "istio-inbound-interception-mode",
                    "tproxy",
                    "sidecar.istio.io/interceptionMode",
                )],
                &[],
                r#"invalid interception mode "tproxy" in annotation sidecar.istio.io/interceptionMode: expected REDIRECT, TPROXY or NONE (upper case)"#,
            ),
            (
                &[],
                &[("ISTIO_META_DNS_CAPTURE", "yes")],
                r#"invalid boolean "yes" in annotation proxy.istio.io/config (proxyMetadata.ISTIO_META_DNS_CAPTURE): not a boolean (expected true or false)"#,
            ),
        ] {
            let err = resolve_pod(&[], &[], opts, pod_env).unwrap_err();
            assert_eq!(err.to_string(), want);
        }
        // A bad mesh -d is blamed on -d, not on the status-port annotation.
        let err = resolve_pod(&["-d", "x"], &[], &[("status-port", "1", SP)], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid port "x" in --istio-local-exclude-ports (-d): not a number"#
        );
    }

    #[test]
    fn exclude_inbound_port_helper() {
        let p = |n: u16| Some(Port::fixed(n));
        assert_eq!(exclude_inbound_port(p(15020), ""), "15020");
        assert_eq!(exclude_inbound_port(p(15020), " 4, ,5 "), "4,5,15020");
        assert_eq!(exclude_inbound_port(p(5), "4, 5"), "4,5,5");
        assert_eq!(exclude_inbound_port(p(5), "4,5, "), "4,5, ");
        assert_eq!(exclude_inbound_port(None, "4"), "4");
    }

    #[test]
    fn ipv6_ranges_with_ipv6_off() {
        let d = Defaults::Native;
        let err = resolve(d, &["--ipv6=false", "-i", "10.0.0.0/8,2001:db8::/32"], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid CIDR "2001:db8::/32" in --istio-service-cidr (-i): an IPv6 range to capture, but IPv6 rules are disabled by --ipv6; remove the IPv6 ranges or set --ipv6=auto"#
        );
        let err = resolve(
            d,
            &[],
            &[
                ("ISTIO_INIT_IPV6", "0"),
                ("ISTIO_SERVICE_CIDR", "2001:db8::/32"),
            ],
        )
        .unwrap_err();
        assert!(
            err.reason.contains("disabled by env ISTIO_INIT_IPV6"),
            "{err}"
        );
        // Excluding IPv6 ranges agrees with IPv6 off; auto mode and '*' are never refused.
        assert!(resolve(d, &["--ipv6=false", "-x", "2001:db8::/32"], &[]).is_ok());
        assert!(resolve(d, &["--ipv6=false", "-i", "*"], &[]).is_ok());
        assert!(resolve(d, &["-i", "2001:db8::/32"], &[]).is_ok());
    }

    #[test]
    fn owner_groups() {
        let d = Defaults::Native;
        let c = resolve(d, &[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")]).unwrap();
        assert_eq!(
            c.owner_groups,
            OwnerGroups::Only(vec!["java".parse().unwrap(), "202".parse().unwrap()])
        );
        let c = resolve(d, &[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "")]).unwrap();
        assert_eq!(c.owner_groups, OwnerGroups::Only(vec![]));
        let many = (1..=65)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let err = resolve(d, &[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", &many)]).unwrap_err();
        assert!(err.reason.starts_with("65 groups; at most 64"), "{err}");
    }

    #[test]
    fn huge_lists_are_rejected_with_a_short_message() {
        let many = (1..=10_000)
            .map(|n| (n % 60000 + 1).to_string())
            .collect::<Vec<_>>()
            .join(",");
        let err = resolve(Defaults::Native, &["-o", &many], &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("10000 items; at most 5000"), "{msg}");
        assert!(msg.len() < 400, "{msg}");
    }

    /// Fuzzing regression (fuzz/corpus/resolve/regression-dump-newline): a newline in a
    /// path or a raw list value made the config dump forge extra log lines.
    #[test]
    fn dump_is_one_line_per_setting() {
        let c = resolve(
            Defaults::Native,
            &["--resolv-conf=/etc/resolv.conf\n-A OUTPUT -j ACCEPT"],
            &[
                ("NETWORK_NAMESPACE", "/var/run/netns/x\nforged"),
                ("ISTIO_OUTBOUND_OWNER_GROUPS", "java"),
                ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "a,\r\nb"),
            ],
        )
        .unwrap();
        let dump = c.dump();
        assert_eq!(dump.lines().count(), c.provenance.len(), "{dump}");
        assert!(
            dump.contains(
                "RESOLV_CONF=/etc/resolv.conf\\n-A OUTPUT -j ACCEPT  # from --resolv-conf\n"
            ),
            "{dump}"
        );
        assert!(
            dump.contains("OUTBOUND_OWNER_GROUPS_EXCLUDE=a,\\r\\nb  # from env"),
            "{dump}"
        );
    }

    #[test]
    fn empty_bool_env_is_ignored() {
        let c = resolve(Defaults::Native, &[], &[("REDIRECT_DNS", "")]).unwrap();
        assert!(!c.redirect_dns);
    }

    #[test]
    fn log_level_mapping() {
        let c = resolve(Defaults::Native, &["--log_output_level=default:debug"], &[]).unwrap();
        assert_eq!(c.log.level, log::LevelFilter::Debug);
        let c = resolve(
            Defaults::Native,
            &["--log_output_level=none", "--log_as_json"],
            &[],
        )
        .unwrap();
        assert_eq!(c.log.level, log::LevelFilter::Off);
        assert!(c.log.json);
    }
}
