//! A pod's annotations: the Downward API annotations file, a Pod manifest (JSON or YAML), and
//! their translation into the [`PodOverrides`] layer that `config.rs` puts over the flags and
//! env vars — annotation by annotation as Istio's sidecar injector renders them into the
//! init container's arguments and env (behaviour doc §1.3 and §1.5).
//!
//! Pure: every function takes text and returns data; `lib.rs` reads the files.

use std::collections::BTreeMap;
use std::fmt;

use yaml_rust2::{Yaml, YamlLoader};

use crate::settings::config::{ConfigError, Override, PodOverrides, Source, printable, quote};

/// Annotation keys the injector reads when it renders the init container.
pub mod key {
    pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
    pub const INJECT: &str = "sidecar.istio.io/inject";
    pub const AGENT_LOG_LEVEL: &str = "sidecar.istio.io/agentLogLevel";
    pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
    pub const STATUS_PORT: &str = "status.sidecar.istio.io/port";
    pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
    pub const TRAFFIC_PREFIX: &str = "traffic.sidecar.istio.io/";
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
    pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
    pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
}

/// Annotations that set one option each: (annotation, long option name). Listed in the order
/// of the injector's template (§1.3).
pub const OPTION_ANNOTATIONS: &[(&str, &str)] = &[
    (key::INCLUDE_OUTBOUND_IP_RANGES, "istio-service-cidr"),
    (
        key::EXCLUDE_OUTBOUND_IP_RANGES,
        "istio-service-exclude-cidr",
    ),
    (key::INCLUDE_INBOUND_PORTS, "istio-inbound-ports"),
    (key::EXCLUDE_INBOUND_PORTS, "istio-local-exclude-ports"),
    (key::STATUS_PORT, "status-port"),
    (key::INCLUDE_OUTBOUND_PORTS, "istio-outbound-ports"),
    (
        key::EXCLUDE_OUTBOUND_PORTS,
        "istio-local-outbound-ports-exclude",
    ),
    (key::KUBEVIRT_INTERFACES, "kube-virt-interfaces"),
    (key::EXCLUDE_INTERFACES, "istio-exclude-interfaces"),
    (key::AGENT_LOG_LEVEL, "log_output_level"),
];

/// Annotations by key (sorted, as the kubelet writes them).
pub type Annotations = BTreeMap<String, String>;

/// What a pod manifest tells about the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pod {
    /// `kind/name` (or `namespace/name`) for messages.
    pub name: String,
    pub annotations: Annotations,
    pub labels: Annotations,
    pub host_network: bool,
}

/// A pod's settings for istio-init.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSettings {
    /// Options and env vars the annotations set.
    pub overrides: PodOverrides,
    /// Set when the injector would not add the init container at all: there is nothing to do.
    pub nothing_to_do: Option<String>,
    /// Things to tell the user (unknown `traffic.sidecar.istio.io/*` keys).
    pub warnings: Vec<String>,
}

/// A malformed annotations file or manifest: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// `line 3`, `line 2 column 7` or a path such as `metadata.annotations["x"]`.
    pub at: String,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.reason)
    }
}

impl std::error::Error for ParseError {}

fn at_line(n: usize, reason: impl Into<String>) -> ParseError {
    ParseError {
        at: format!("line {n}"),
        reason: reason.into(),
    }
}

/// Parses a Downward API annotations file: one `key="value"` per line, the value quoted as Go's
/// `strconv.Quote` writes it. Empty lines are ignored; anything else that is not `key="value"`
/// is an error naming the line.
pub fn parse_downward(text: &str) -> Result<Annotations, ParseError> {
    let mut out = Annotations::new();
    for (i, line) in text.split('\n').enumerate() {
        let n = i + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(at_line(n, "expected key=\"value\""));
        };
        if k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(at_line(n, format!("invalid annotation key {}", quote(k))));
        }
        let value = go_unquote(v).map_err(|e| at_line(n, format!("value of {k}: {e}")))?;
        if out.insert(k.to_owned(), value).is_some() {
            return Err(at_line(n, format!("duplicate annotation {k}")));
        }
    }
    Ok(out)
}

/// Why a value is not a string Go's `strconv.Unquote` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnquoteError {
    /// The whole value, not in double quotes.
    NotQuoted(String),
    UnescapedQuote,
    LineBreak,
    TrailingBackslash,
    /// `\` and a character that starts no escape.
    UnknownEscape(char),
    /// Fewer digits than the escape needs.
    CutShort,
    /// `\` `escape` and `digits` that are not all digits of its radix.
    BadEscape {
        escape: char,
        digits: String,
    },
    /// An octal escape's digits (`\` and them) over 255.
    OctalOver255(String),
    /// A `\u` or `\U` (`escape`) escape's digits that name no character.
    NotAChar {
        escape: char,
        digits: String,
    },
    NotUtf8,
}

impl fmt::Display for UnquoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnquoteError::NotQuoted(s) => write!(f, "{} is not a double-quoted string", quote(s)),
            UnquoteError::UnescapedQuote => f.write_str("unescaped '\"' inside the quoted value"),
            UnquoteError::LineBreak => f.write_str("line break inside the quoted value"),
            UnquoteError::TrailingBackslash => f.write_str("'\\' at the end of the value"),
            UnquoteError::UnknownEscape(e) => write!(f, "unknown escape '\\{}'", e.escape_debug()),
            UnquoteError::CutShort => f.write_str("escape cut short"),
            UnquoteError::BadEscape { escape, digits } => {
                write!(f, "bad escape '\\{escape}{}'", printable(digits))
            }
            UnquoteError::OctalOver255(text) => write!(f, "octal escape \\{text} is over 255"),
            UnquoteError::NotAChar { escape, digits } => {
                write!(f, "\\{escape}{digits} is not a character")
            }
            UnquoteError::NotUtf8 => f.write_str("the value is not valid UTF-8"),
        }
    }
}

impl std::error::Error for UnquoteError {}

/// Go's `strconv.Unquote` for a double-quoted string.
pub fn go_unquote(s: &str) -> Result<String, UnquoteError> {
    let inner = s
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .filter(|_| s.len() >= 2)
        .ok_or_else(|| UnquoteError::NotQuoted(s.to_owned()))?;
    let mut bytes: Vec<u8> = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Err(UnquoteError::UnescapedQuote),
            '\n' => return Err(UnquoteError::LineBreak),
            '\\' => {
                let e = chars.next().ok_or(UnquoteError::TrailingBackslash)?;
                unescape(e, &mut chars, &mut bytes)?;
            }
            c => {
                let mut buf = [0; 4];
                bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    String::from_utf8(bytes).map_err(|_| UnquoteError::NotUtf8)
}

/// Appends to `bytes` what the escape `\e` stands for, taking its digits from `chars`.
fn unescape(
    e: char,
    chars: &mut std::str::Chars<'_>,
    bytes: &mut Vec<u8>,
) -> Result<(), UnquoteError> {
    let simple = match e {
        'a' => Some(0x07),
        'b' => Some(0x08),
        'f' => Some(0x0c),
        'n' => Some(b'\n'),
        'r' => Some(b'\r'),
        't' => Some(b'\t'),
        'v' => Some(0x0b),
        '\\' => Some(b'\\'),
        '"' => Some(b'"'),
        _ => None,
    };
    if let Some(b) = simple {
        bytes.push(b);
        return Ok(());
    }
    let (digits, radix, is_byte) = match e {
        'x' => (2, 16, true),
        'u' => (4, 16, false),
        'U' => (8, 16, false),
        '0'..='7' => (3, 8, true),
        _ => return Err(UnquoteError::UnknownEscape(e)),
    };
    let mut text = String::new();
    if radix == 8 {
        text.push(e);
    }
    while text.len() < digits {
        text.push(chars.next().ok_or(UnquoteError::CutShort)?);
    }
    let n = u32::from_str_radix(&text, radix).map_err(|_| UnquoteError::BadEscape {
        escape: e,
        digits: text[usize::from(radix == 8)..].to_owned(),
    })?;
    if is_byte {
        let b = u8::try_from(n).map_err(|_| UnquoteError::OctalOver255(text.clone()))?;
        bytes.push(b);
    } else {
        let ch = char::from_u32(n).ok_or(UnquoteError::NotAChar {
            escape: e,
            digits: text,
        })?;
        let mut buf = [0; 4];
        bytes.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
    }
    Ok(())
}

/// The deepest nesting of sequences and mappings accepted in YAML input. A pod manifest is
/// about ten levels deep; the limit keeps the recursive `Yaml` tree (its drop, clone and
/// formatting recurse) far from the stack's end.
pub const MAX_YAML_DEPTH: usize = 64;

/// `YamlLoader::load_from_str`, after a pass over the parser's events (an iterative state
/// machine) that refuses nesting deeper than [`MAX_YAML_DEPTH`]. Without it, a few MiB of
/// `- - - - …` (a pod author can put that in `proxy.istio.io/config`) built a tree a million
/// levels deep and the process died of a stack overflow instead of exiting 2.
fn load_yaml(text: &str) -> Result<Vec<Yaml>, yaml_rust2::ScanError> {
    use yaml_rust2::Event;
    let mut parser = yaml_rust2::parser::Parser::new_from_str(text);
    let mut depth = 0usize;
    loop {
        let (event, mark) = parser.next_token()?;
        match event {
            Event::StreamEnd => break,
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                depth += 1;
                if depth > MAX_YAML_DEPTH {
                    return Err(yaml_rust2::ScanError::new_string(
                        mark,
                        format!("nested deeper than {MAX_YAML_DEPTH} levels"),
                    ));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    YamlLoader::load_from_str(text)
}

/// Workload kinds whose pod template sits at `spec.template`.
const TEMPLATE_KINDS: &[&str] = &[
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "ReplicationController",
    "Job",
];

/// Parses a Pod manifest as `kubectl get pod -o json|yaml` prints it (JSON is read as YAML).
/// A `List` holding exactly one item, a workload's pod template (Deployment, Job, CronJob, …)
/// and a bare pod object without `kind` are accepted too.
pub fn parse_manifest(text: &str) -> Result<Pod, ParseError> {
    let docs = load_yaml(text).map_err(|e| {
        let m = e.marker();
        ParseError {
            at: format!("line {} column {}", m.line(), m.col() + 1),
            reason: e.info().to_owned(),
        }
    })?;
    let docs: Vec<&Yaml> = docs.iter().filter(|d| !matches!(d, Yaml::Null)).collect();
    let doc = match docs[..] {
        [] => {
            return Err(ParseError {
                at: "the manifest".into(),
                reason: "is empty".into(),
            });
        }
        [d] => d,
        _ => {
            return Err(ParseError {
                at: "the manifest".into(),
                reason: format!("holds {} documents; give one pod", docs.len()),
            });
        }
    };
    pod_of(doc, String::new())
}

fn field<'a>(y: &'a Yaml, name: &str) -> &'a Yaml {
    match y {
        Yaml::Hash(h) => h
            .get(&Yaml::String(name.to_owned()))
            .unwrap_or(&Yaml::BadValue),
        _ => &Yaml::BadValue,
    }
}

fn join_path(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn type_name(y: &Yaml) -> &'static str {
    match y {
        Yaml::Real(_) => "a number",
        Yaml::Integer(_) => "an integer",
        Yaml::String(_) => "a string",
        Yaml::Boolean(_) => "a boolean",
        Yaml::Array(_) => "a list",
        Yaml::Hash(_) => "a mapping",
        Yaml::Alias(_) => "an alias",
        Yaml::Null => "null",
        Yaml::BadValue => "nothing",
    }
}

fn expect_mapping(y: &Yaml, path: &str) -> Result<(), ParseError> {
    match y {
        Yaml::Hash(_) => Ok(()),
        other => Err(ParseError {
            at: if path.is_empty() {
                "the manifest".into()
            } else {
                path.to_owned()
            },
            reason: format!("expected a mapping, found {}", type_name(other)),
        }),
    }
}

fn pod_of(doc: &Yaml, path: String) -> Result<Pod, ParseError> {
    expect_mapping(doc, &path)?;
    match kind_of(doc, &path)? {
        None | Some("Pod") => bare_pod(doc, &path),
        Some(kind) => pod_inside(doc, path, kind),
    }
}

/// The document's `kind`, if it has one.
fn kind_of<'a>(doc: &'a Yaml, path: &str) -> Result<Option<&'a str>, ParseError> {
    match field(doc, "kind") {
        Yaml::String(k) => Ok(Some(k.as_str())),
        Yaml::BadValue | Yaml::Null => Ok(None),
        other => Err(ParseError {
            at: join_path(path, "kind"),
            reason: format!("expected a string, found {}", type_name(other)),
        }),
    }
}

/// The pod a document of another kind holds: a list of one pod, or a workload's template.
fn pod_inside(doc: &Yaml, path: String, kind: &str) -> Result<Pod, ParseError> {
    match kind {
        "List" | "PodList" => {
            let items = field(doc, "items");
            let p = join_path(&path, "items");
            match items {
                Yaml::Array(v) if v.len() == 1 => pod_of(&v[0], format!("{p}[0]")),
                Yaml::Array(v) => Err(ParseError {
                    at: p,
                    reason: format!("holds {} items; give exactly one pod", v.len()),
                }),
                other => Err(ParseError {
                    at: p,
                    reason: format!("expected a list, found {}", type_name(other)),
                }),
            }
        }
        "CronJob" => {
            let p = join_path(&path, "spec.jobTemplate.spec.template");
            let t = field(
                field(field(field(doc, "spec"), "jobTemplate"), "spec"),
                "template",
            );
            template(doc, t, p)
        }
        k if TEMPLATE_KINDS.contains(&k) => {
            let p = join_path(&path, "spec.template");
            template(doc, field(field(doc, "spec"), "template"), p)
        }
        k => Err(ParseError {
            at: join_path(&path, "kind"),
            reason: format!(
                "{} is not a Pod (nor a workload with a pod template)",
                printable(k)
            ),
        }),
    }
}

/// A pod (or a pod template): its name, annotations, labels and `spec.hostNetwork`.
fn bare_pod(doc: &Yaml, path: &str) -> Result<Pod, ParseError> {
    let meta_path = join_path(path, "metadata");
    let meta = field(doc, "metadata");
    if !matches!(meta, Yaml::BadValue | Yaml::Null) {
        expect_mapping(meta, &meta_path)?;
    }
    let name = match (field(meta, "namespace"), field(meta, "name")) {
        (Yaml::String(ns), Yaml::String(n)) => format!("{}/{}", printable(ns), printable(n)),
        (_, Yaml::String(n)) => printable(n).into_owned(),
        _ => "pod".to_owned(),
    };
    let host_network = match field(field(doc, "spec"), "hostNetwork") {
        Yaml::Boolean(b) => *b,
        Yaml::BadValue | Yaml::Null => false,
        other => {
            return Err(ParseError {
                at: join_path(path, "spec.hostNetwork"),
                reason: format!("expected a boolean, found {}", type_name(other)),
            });
        }
    };
    Ok(Pod {
        name,
        annotations: string_map(
            field(meta, "annotations"),
            &join_path(&meta_path, "annotations"),
        )?,
        labels: string_map(field(meta, "labels"), &join_path(&meta_path, "labels"))?,
        host_network,
    })
}

fn template(doc: &Yaml, t: &Yaml, path: String) -> Result<Pod, ParseError> {
    if matches!(t, Yaml::BadValue | Yaml::Null) {
        return Err(ParseError {
            at: path,
            reason: "missing".into(),
        });
    }
    let mut pod = pod_of(t, path)?;
    if let (Yaml::String(k), Yaml::String(n)) =
        (field(doc, "kind"), field(field(doc, "metadata"), "name"))
    {
        pod.name = format!("{}/{}", printable(k), printable(n));
    }
    Ok(pod)
}

/// A `map[string]string` (annotations, labels): every value must be a string, as the
/// Kubernetes API requires.
fn string_map(y: &Yaml, path: &str) -> Result<Annotations, ParseError> {
    let h = match y {
        Yaml::BadValue | Yaml::Null => return Ok(Annotations::new()),
        Yaml::Hash(h) => h,
        other => {
            return Err(ParseError {
                at: path.to_owned(),
                reason: format!("expected a mapping, found {}", type_name(other)),
            });
        }
    };
    let mut out = Annotations::new();
    for (k, v) in h {
        let Yaml::String(k) = k else {
            return Err(ParseError {
                at: path.to_owned(),
                reason: format!("keys must be strings, found {}", type_name(k)),
            });
        };
        match v {
            Yaml::String(v) => {
                out.insert(k.clone(), v.clone());
            }
            other => {
                return Err(ParseError {
                    at: format!("{path}[{k:?}]"),
                    reason: format!(
                        "expected a string, found {} (quote the value)",
                        type_name(other)
                    ),
                });
            }
        }
    }
    Ok(out)
}

/// What the `proxy.istio.io/config` annotation sets for istio-init.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ProxyConfig {
    interception_mode: Option<String>,
    proxy_metadata: BTreeMap<String, String>,
}

fn parse_proxy_config(value: &str) -> Result<ProxyConfig, ConfigError> {
    let err = |reason: String| ConfigError {
        what: "ProxyConfig".into(),
        value: value.to_owned(),
        source: Source::Annotation(key::PROXY_CONFIG.into()),
        reason,
    };
    let docs = load_yaml(value).map_err(|e| {
        let m = e.marker();
        err(format!(
            "line {} column {}: {}",
            m.line(),
            m.col() + 1,
            e.info()
        ))
    })?;
    let mut out = ProxyConfig::default();
    let doc = match docs.first() {
        None | Some(Yaml::Null) => return Ok(out),
        Some(d @ Yaml::Hash(_)) => d,
        Some(other) => {
            return Err(err(format!(
                "expected a mapping of ProxyConfig fields, found {}",
                type_name(other)
            )));
        }
    };
    match field(doc, "interceptionMode") {
        Yaml::BadValue | Yaml::Null => {}
        Yaml::String(m) => out.interception_mode = Some(m.clone()),
        other => {
            return Err(err(format!(
                "interceptionMode: expected REDIRECT, TPROXY or NONE, found {}",
                type_name(other)
            )));
        }
    }
    match field(doc, "proxyMetadata") {
        Yaml::BadValue | Yaml::Null => {}
        Yaml::Hash(h) => {
            for (k, v) in h {
                let Yaml::String(k) = k else {
                    return Err(err(format!(
                        "proxyMetadata: keys must be strings, found {}",
                        type_name(k)
                    )));
                };
                let v = match v {
                    Yaml::String(s) | Yaml::Real(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    Yaml::Null => String::new(),
                    other => {
                        return Err(err(format!(
                            "proxyMetadata.{}: expected a string, found {}",
                            printable(k),
                            type_name(other)
                        )));
                    }
                };
                out.proxy_metadata.insert(k.clone(), v);
            }
        }
        other => {
            return Err(err(format!(
                "proxyMetadata: expected a mapping, found {}",
                type_name(other)
            )));
        }
    }
    Ok(out)
}

/// The injector's reading of `sidecar.istio.io/inject`: `y`, `yes`, `true`, `on` (any case)
/// or empty inject; any other value does not.
fn inject_disabled(value: &str) -> bool {
    !matches!(
        value.to_ascii_lowercase().as_str(),
        "" | "y" | "yes" | "true" | "on"
    )
}

/// The pod-level settings of a pod manifest: its annotations, plus the two reasons the
/// injector skips a pod that only the manifest shows (`hostNetwork`, the inject label).
pub fn translate_pod(pod: &Pod) -> Result<PodSettings, ConfigError> {
    let mut s = translate_inner(&pod.annotations, pod.labels.get(key::INJECT))?;
    if pod.host_network {
        s.nothing_to_do = Some(format!(
            "{} uses hostNetwork: the injector adds no sidecar to it",
            pod.name
        ));
    }
    Ok(s)
}

/// Translates annotations into option and env overrides, exactly as the injector's template
/// uses them. Values are validated later, by `Config::resolve`, which names the annotation in
/// its errors; only `proxy.istio.io/config` is parsed here.
pub fn translate(ann: &Annotations) -> Result<PodSettings, ConfigError> {
    translate_inner(ann, None)
}

/// [`translate`], with the pod's `sidecar.istio.io/inject` label when known (the label wins
/// over the annotation in the injector).
fn translate_inner(
    ann: &Annotations,
    inject_label: Option<&String>,
) -> Result<PodSettings, ConfigError> {
    let mut out = PodSettings {
        nothing_to_do: injection_disabled(ann, inject_label),
        ..PodSettings::default()
    };
    for (k, long) in OPTION_ANNOTATIONS {
        if let Some(v) = ann.get(*k) {
            set_option(&mut out, long, v, k);
        }
    }
    // istio.io/reroute-virtual-interfaces wins over the older kubevirtInterfaces.
    if let Some(v) = ann.get(key::REROUTE_VIRTUAL_INTERFACES) {
        set_option(
            &mut out,
            "kube-virt-interfaces",
            v,
            key::REROUTE_VIRTUAL_INTERFACES,
        );
    }
    interception_mode(ann, &mut out)?;
    out.warnings = unknown_traffic_annotations(ann);
    Ok(out)
}

/// Overrides option `--long` with an annotation's value.
fn set_option(out: &mut PodSettings, long: &'static str, value: &str, key: &str) {
    out.overrides.opts.insert(
        long,
        Override {
            value: value.to_owned(),
            key: key.to_owned(),
        },
    );
}

/// Why there is nothing to do when the inject label (which wins) or annotation disables
/// injection.
fn injection_disabled(ann: &Annotations, inject_label: Option<&String>) -> Option<String> {
    let inject = match inject_label {
        Some(v) => Some(("label", v)),
        None => ann.get(key::INJECT).map(|v| ("annotation", v)),
    };
    let (what, v) = inject.filter(|(_, v)| inject_disabled(v))?;
    Some(format!(
        "{what} {}={} disables sidecar injection",
        key::INJECT,
        quote(v)
    ))
}

/// The interception mode: the annotation, else the pod's ProxyConfig, else the mesh's (-m);
/// and the ProxyConfig's proxy metadata as env overrides.
fn interception_mode(ann: &Annotations, out: &mut PodSettings) -> Result<(), ConfigError> {
    let mut mode: Option<(String, String)> = None;
    if let Some(pc) = ann.get(key::PROXY_CONFIG) {
        let pc = parse_proxy_config(pc)?;
        if let Some(m) = pc.interception_mode {
            mode = Some((m, format!("{} (interceptionMode)", key::PROXY_CONFIG)));
        }
        for (name, value) in pc.proxy_metadata {
            out.overrides.env.insert(
                name,
                Override {
                    value,
                    key: key::PROXY_CONFIG.to_owned(),
                },
            );
        }
    }
    if let Some(m) = ann.get(key::INTERCEPTION_MODE) {
        mode = Some((m.clone(), key::INTERCEPTION_MODE.to_owned()));
    }
    if let Some((m, k)) = mode {
        // The template pins -u to 1337 in TPROXY mode (the proxy then runs as root).
        if m == "TPROXY" {
            set_option(out, "proxy-uid", "1337", &k);
        }
        if m == "NONE" && out.nothing_to_do.is_none() {
            out.nothing_to_do = Some(format!(
                "{k} is NONE: the injector adds no init container and nothing is captured"
            ));
        }
        set_option(out, "istio-inbound-interception-mode", &m, &k);
    }
    Ok(())
}

/// A warning for each `traffic.sidecar.istio.io/*` annotation the injector does not read.
fn unknown_traffic_annotations(ann: &Annotations) -> Vec<String> {
    let mut warnings = Vec::new();
    for k in ann.keys().filter(|k| k.starts_with(key::TRAFFIC_PREFIX)) {
        if OPTION_ANNOTATIONS.iter().any(|(known, _)| known == k) {
            continue;
        }
        let hint = OPTION_ANNOTATIONS
            .iter()
            .map(|(known, _)| *known)
            .find(|known| known.eq_ignore_ascii_case(k))
            .map(|known| format!(" (did you mean {known}?)"))
            .unwrap_or_default();
        warnings.push(format!(
            "ignoring unknown annotation {}{hint}: the sidecar injector does not read it",
            printable(k)
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hardening regression: deep block nesting (`- - - …`, a few MiB) crashed with a stack
    /// overflow instead of a one-line error.
    #[test]
    fn deep_yaml_is_refused() {
        let deep = format!("{}a", "- ".repeat(1_000_000));
        let e = parse_manifest(&deep).unwrap_err().to_string();
        assert_eq!(e, "line 1 column 129: nested deeper than 64 levels");
        let pc = format!("{}a", "- ".repeat(100_000));
        let e = translate(&ann(&[(key::PROXY_CONFIG, &pc)])).unwrap_err();
        assert!(
            e.reason
                .ends_with("line 1 column 129: nested deeper than 64 levels"),
            "{e}"
        );
        let ok = format!("{}a", "- ".repeat(MAX_YAML_DEPTH));
        assert!(load_yaml(&ok).is_ok());
    }

    /// Fuzzing regressions (fuzz/corpus/annotations/regression-escape-nul and
    /// fuzz/corpus/pod_manifest/regression-kind-control): messages and warnings showed control
    /// characters from the input raw, so one error could span several log lines.
    #[test]
    fn messages_never_carry_control_characters() {
        let e = parse_downward("k=\"\\\u{0}\"").unwrap_err().to_string();
        assert_eq!(e, r"line 1: value of k: unknown escape '\\0'");
        let e = parse_manifest("kind: \"Lis\\u0001t\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            r"kind: Lis\u{1}t is not a Pod (nor a workload with a pod template)"
        );
        let pod = parse_manifest(
            "metadata:\n  name: \"a\\nb\"\n  annotations:\n    \"traffic.sidecar.istio.io/x\\ny\": \"1\"\nspec:\n  hostNetwork: true\n",
        )
        .unwrap();
        let s = translate_pod(&pod).unwrap();
        let texts = s.warnings.iter().chain(s.nothing_to_do.iter());
        for t in texts {
            assert!(!t.chars().any(char::is_control), "{t:?}");
        }
        assert_eq!(s.warnings.len(), 1);
        assert!(
            s.nothing_to_do
                .unwrap()
                .starts_with(r"a\nb uses hostNetwork")
        );
    }

    fn ann(pairs: &[(&str, &str)]) -> Annotations {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn downward_api_file() {
        let text = "kubectl.kubernetes.io/default-container=\"app\"\n\
                    proxy.istio.io/config=\"proxyMetadata:\\n  ISTIO_META_DNS_CAPTURE: \\\"true\\\"\\n\"\n\
                    traffic.sidecar.istio.io/excludeInboundPorts=\"4,5,6\"";
        let a = parse_downward(text).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a["traffic.sidecar.istio.io/excludeInboundPorts"], "4,5,6");
        assert_eq!(
            a["proxy.istio.io/config"],
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"
        );
        assert_eq!(parse_downward("").unwrap(), Annotations::new());
        assert_eq!(parse_downward("a=\"\"\n").unwrap()["a"], "");
    }

    #[test]
    fn go_quote_escapes() {
        for (input, want) in [
            (r#""plain""#, Ok("plain")),
            (r#""tab\there""#, Ok("tab\there")),
            (r#""q\"b\\""#, Ok("q\"b\\")),
            (r#""\x41\101\u00e9\U0001F600""#, Ok("AAé😀")),
            (r#""é""#, Ok("é")),
            (r#""\a\b\f\v\r""#, Ok("\x07\x08\x0c\x0b\r")),
            (
                "unquoted",
                Err("\"unquoted\" is not a double-quoted string"),
            ),
            ("\"", Err("\"\\\"\" is not a double-quoted string")),
            (r#""a"b""#, Err("unescaped '\"' inside the quoted value")),
            (r#""\q""#, Err("unknown escape '\\q'")),
            (r#""\xZZ""#, Err("bad escape '\\xZZ'")),
            (r#""\xff""#, Err("the value is not valid UTF-8")),
            (r#""\777""#, Err("octal escape \\777 is over 255")),
            (r#""ab\""#, Err("'\\' at the end of the value")),
        ] {
            assert_eq!(
                go_unquote(input).map_err(|e| e.to_string()),
                want.map(str::to_owned).map_err(str::to_owned),
                "{input}"
            );
        }
    }

    #[test]
    fn downward_errors_name_the_line() {
        for (text, want) in [
            ("a=\"1\"\nbroken", "line 2: expected key=\"value\""),
            (
                "a=\"1\"\n\nb=1",
                "line 3: value of b: \"1\" is not a double-quoted string",
            ),
            ("a=\"1\"\na=\"2\"", "line 2: duplicate annotation a"),
            ("=\"1\"", "line 1: invalid annotation key \"\""),
            ("a=\"x\\qy\"", "line 1: value of a: unknown escape '\\q'"),
        ] {
            assert_eq!(
                parse_downward(text).unwrap_err().to_string(),
                want,
                "{text:?}"
            );
        }
    }

    #[test]
    fn manifests_json_yaml_and_templates() {
        let json = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web","namespace":"shop",
            "annotations":{"traffic.sidecar.istio.io/excludeInboundPorts":"4,5","x":"a\u00e9\/"},
            "labels":{"app":"web"}},"spec":{"containers":[]}}"#;
        let p = parse_manifest(json).unwrap();
        assert_eq!(p.name, "shop/web");
        assert_eq!(
            p.annotations["traffic.sidecar.istio.io/excludeInboundPorts"],
            "4,5"
        );
        assert_eq!(p.annotations["x"], "aé/");
        assert_eq!(p.labels["app"], "web");
        assert!(!p.host_network);

        let yaml = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: hello\nspec:\n  template:\n    metadata:\n      annotations:\n        sidecar.istio.io/interceptionMode: TPROXY\n    spec:\n      hostNetwork: true\n";
        let p = parse_manifest(yaml).unwrap();
        assert_eq!(p.name, "Deployment/hello");
        assert_eq!(p.annotations["sidecar.istio.io/interceptionMode"], "TPROXY");
        assert!(p.host_network);

        let list = "kind: List\nitems:\n- kind: Pod\n  metadata:\n    name: a\n";
        assert_eq!(parse_manifest(list).unwrap().name, "a");
        let cron = "kind: CronJob\nmetadata: {name: c}\nspec:\n  jobTemplate:\n    spec:\n      template:\n        metadata:\n          annotations: {k: v}\n";
        assert_eq!(parse_manifest(cron).unwrap().annotations["k"], "v");
    }

    #[test]
    fn manifest_errors_name_line_or_path() {
        for (text, want) in [
            (
                "kind: Pod\nmetadata:\n  annotations:\n    a: \"x\n",
                "line 4 column 8: while scanning a quoted scalar",
            ),
            ("{\"kind\": \"Pod\",, }", "line 1 column"),
            (
                "kind: Pod\nmetadata:\n  annotations:\n    status.sidecar.istio.io/port: 123\n",
                "metadata.annotations[\"status.sidecar.istio.io/port\"]: expected a string, found an integer (quote the value)",
            ),
            (
                "kind: Service\n",
                "kind: Service is not a Pod (nor a workload with a pod template)",
            ),
            (
                "kind: List\nitems: []\n",
                "items: holds 0 items; give exactly one pod",
            ),
            ("- a\n", "the manifest: expected a mapping, found a list"),
            ("", "the manifest: is empty"),
            (
                "kind: Pod\nmetadata: 3\n",
                "metadata: expected a mapping, found an integer",
            ),
            ("kind: Deployment\nspec: {}\n", "spec.template: missing"),
            (
                "kind: Pod\nspec:\n  hostNetwork: yes please\n",
                "spec.hostNetwork: expected a boolean, found a string",
            ),
        ] {
            let got = parse_manifest(text).unwrap_err().to_string();
            assert!(got.starts_with(want), "{text:?}: {got}");
        }
    }

    fn opt(s: &PodSettings, long: &str) -> Option<(String, String)> {
        s.overrides
            .opts
            .get(long)
            .map(|o| (o.value.clone(), o.key.clone()))
    }

    #[test]
    fn translation_follows_the_template() {
        let s = translate(&ann(&[
            (key::INCLUDE_INBOUND_PORTS, "1,2,3"),
            (key::EXCLUDE_OUTBOUND_IP_RANGES, ""),
            (key::KUBEVIRT_INTERFACES, "net1"),
            (key::REROUTE_VIRTUAL_INTERFACES, "net0ps2"),
            ("sidecar.istio.io/proxyCPU", "4000m"),
        ]))
        .unwrap();
        assert_eq!(
            opt(&s, "istio-inbound-ports"),
            Some(("1,2,3".into(), key::INCLUDE_INBOUND_PORTS.into()))
        );
        assert_eq!(
            opt(&s, "istio-service-exclude-cidr"),
            Some(("".into(), key::EXCLUDE_OUTBOUND_IP_RANGES.into()))
        );
        assert_eq!(
            opt(&s, "kube-virt-interfaces"),
            Some(("net0ps2".into(), key::REROUTE_VIRTUAL_INTERFACES.into()))
        );
        assert_eq!(s.overrides.opts.len(), 3);
        assert!(s.warnings.is_empty() && s.nothing_to_do.is_none());
    }

    #[test]
    fn interception_mode_and_proxy_config() {
        let pc = "interceptionMode: TPROXY\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n  N: 5\n";
        let s = translate(&ann(&[(key::PROXY_CONFIG, pc)])).unwrap();
        let k = "proxy.istio.io/config (interceptionMode)".to_owned();
        assert_eq!(
            opt(&s, "istio-inbound-interception-mode"),
            Some(("TPROXY".into(), k.clone()))
        );
        assert_eq!(opt(&s, "proxy-uid"), Some(("1337".into(), k)));
        assert_eq!(s.overrides.env["ISTIO_META_DNS_CAPTURE"].value, "true");
        assert_eq!(s.overrides.env["N"].value, "5");

        // The annotation wins over the ProxyConfig field.
        let s = translate(&ann(&[
            (key::PROXY_CONFIG, "{ \"interceptionMode\": \"TPROXY\" }"),
            (key::INTERCEPTION_MODE, "REDIRECT"),
        ]))
        .unwrap();
        assert_eq!(
            opt(&s, "istio-inbound-interception-mode"),
            Some(("REDIRECT".into(), key::INTERCEPTION_MODE.into()))
        );
        assert_eq!(opt(&s, "proxy-uid"), None);

        let s = translate(&ann(&[(key::INTERCEPTION_MODE, "NONE")])).unwrap();
        assert!(s.nothing_to_do.unwrap().contains("NONE"));
    }

    #[test]
    fn bad_proxy_config_names_the_annotation() {
        let err = translate(&ann(&[(key::PROXY_CONFIG, "proxyMetadata: [1]")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid ProxyConfig \"proxyMetadata: [1]\" in annotation proxy.istio.io/config: proxyMetadata: expected a mapping, found a list"
        );
        let err = translate(&ann(&[(key::PROXY_CONFIG, "a: [")])).unwrap_err();
        assert!(err.reason.starts_with("line "), "{err}");
    }

    #[test]
    fn inject_false_and_unknown_keys() {
        let s = translate(&ann(&[(key::INJECT, "false")])).unwrap();
        assert!(s.nothing_to_do.is_some());
        let s = translate(&ann(&[(key::INJECT, "true")])).unwrap();
        assert!(s.nothing_to_do.is_none());
        let s = translate(&ann(&[(
            "traffic.sidecar.istio.io/excludeoutboundports",
            "1",
        )]))
        .unwrap();
        assert_eq!(
            s.warnings,
            [
                "ignoring unknown annotation traffic.sidecar.istio.io/excludeoutboundports (did you mean traffic.sidecar.istio.io/excludeOutboundPorts?): the sidecar injector does not read it"
            ]
        );

        let mut pod = Pod {
            name: "p".into(),
            ..Pod::default()
        };
        pod.labels.insert(key::INJECT.into(), "false".into());
        assert!(translate_pod(&pod).unwrap().nothing_to_do.is_some());
        pod.annotations.insert(key::INJECT.into(), "false".into());
        pod.labels.insert(key::INJECT.into(), "true".into());
        assert!(translate_pod(&pod).unwrap().nothing_to_do.is_none());
        pod.host_network = true;
        assert!(translate_pod(&pod).unwrap().nothing_to_do.is_some());
    }
}
