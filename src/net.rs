//! Value types for everything that ends up as a token in the iptables-restore text: ports,
//! port ranges, CIDRs, interface names, user and group ids, marks and routing tables.
//!
//! Pure: no I/O. Every type is parsed from text with a reason on failure and displays as exactly
//! one whitespace-free token, so a value can never smuggle a second rule into the restore text.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Why a single value was rejected. The caller adds *what* it was and *where* it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reason(pub String);

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Reason {}

impl std::ops::Deref for Reason {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for Reason {
    fn from(s: String) -> Reason {
        Reason(s)
    }
}

impl From<Reason> for String {
    fn from(r: Reason) -> String {
        r.0
    }
}

impl From<&str> for Reason {
    fn from(s: &str) -> Reason {
        Reason(s.to_owned())
    }
}

/// Splits an Istio list value: items are separated by commas, trimmed, and empty items dropped
/// (`"6000,7000,"` and `" 80"` are accepted, as the injector's own helpers accept them).
pub fn split_list(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Checks that raw OS bytes (an argv word or an env var value) are UTF-8. On failure the
/// reason names the first bad byte and its offset, so the one-line error pinpoints it.
pub fn utf8(raw: &std::ffi::OsStr) -> Result<&str, Reason> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = raw.as_bytes();
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        format!(
            "not valid UTF-8 (byte 0x{:02x} at offset {at})",
            bytes.get(at).copied().unwrap_or_default()
        )
        .into()
    })
}

/// The IP family of a ruleset: IPv4 goes to `iptables-restore`, IPv6 to `ip6tables-restore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both families, in the order they are rendered and applied.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The loopback host address of the family (`127.0.0.1`, `::1`). The IPv4 loopback
    /// *range* the rules treat as local is configurable: see `Config::loopback_of`.
    pub fn loopback(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            Family::V6 => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        }
    }

    /// The source the proxy uses for inbound passthrough connections (`127.0.0.6`, `::6`):
    /// never captured by the rules, dialled by validation, and (IPv6) added to `lo`.
    pub fn passthrough(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 6)),
            Family::V6 => IpAddr::V6(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)),
        }
    }

    /// `IPv4` / `IPv6`, as used in logs and in the dry-run section headers.
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A TCP/UDP port, 1 to 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(u16);

impl Port {
    /// A port known at compile time to be valid (the proxy's fixed ports).
    pub const fn fixed(n: u16) -> Port {
        assert!(n != 0);
        Port(n)
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl FromStr for Port {
    type Err = Reason;
    fn from_str(s: &str) -> Result<Self, Reason> {
        if s.is_empty() {
            return Err("empty".into());
        }
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err("not a number".into());
        }
        match s.parse::<u32>() {
            Ok(0) => Err("port 0 is not a valid port (1-65535)".into()),
            Ok(n) if n <= 65535 => Ok(Port(n as u16)),
            _ => Err("out of range (1-65535)".into()),
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One item of a port list: a single port or an inclusive range `a:b` (iptables syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortItem {
    One(Port),
    Range(Port, Port),
}

impl PortItem {
    pub fn contains(self, port: u16) -> bool {
        match self {
            PortItem::One(p) => p.get() == port,
            PortItem::Range(a, b) => (a.get()..=b.get()).contains(&port),
        }
    }
}

impl FromStr for PortItem {
    type Err = Reason;
    fn from_str(s: &str) -> Result<Self, Reason> {
        match s.split_once(':') {
            None => Ok(PortItem::One(s.parse()?)),
            Some((a, b)) => {
                let lo: Port = a.parse().map_err(|e| format!("range start: {e}"))?;
                let hi: Port = b.parse().map_err(|e| format!("range end: {e}"))?;
                if lo > hi {
                    return Err(format!("range {lo}:{hi} is reversed").into());
                }
                Ok(PortItem::Range(lo, hi))
            }
        }
    }
}

impl fmt::Display for PortItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortItem::One(p) => write!(f, "{p}"),
            PortItem::Range(a, b) => write!(f, "{a}:{b}"),
        }
    }
}

/// An IPv4 or IPv6 prefix. Host bits are allowed and kept (`127.0.0.1/24` renders as given),
/// matching Istio, whose rules carry the address exactly as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(IpNet);

impl Cidr {
    /// A full-length prefix for one address (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr(IpNet::from(addr))
    }

    pub fn family(self) -> Family {
        Family::of(&self.0.addr())
    }

    pub fn addr(self) -> IpAddr {
        self.0.addr()
    }

    pub fn prefix_len(self) -> u8 {
        self.0.prefix_len()
    }

    pub fn contains(self, addr: &IpAddr) -> bool {
        self.0.contains(addr)
    }

    /// The address is a loopback address (Istio's "has loopback" flag for include lists).
    pub fn is_loopback(self) -> bool {
        self.0.addr().is_loopback()
    }
}

impl FromStr for Cidr {
    type Err = Reason;
    fn from_str(s: &str) -> Result<Self, Reason> {
        let Some((addr, len)) = s.split_once('/') else {
            return Err("missing prefix length (expected ADDRESS/LENGTH, e.g. 10.0.0.0/8)".into());
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) || len.len() > 3 {
            return Err(format!("prefix length {len:?} is not a number").into());
        }
        let len: u8 = len
            .parse()
            .map_err(|_| format!("prefix length {len:?} is not a number"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!(
                "prefix length /{len} is longer than /{max} for an {} address",
                Family::of(&addr)
            )
            .into());
        }
        IpNet::new(addr, len)
            .map(Cidr)
            .map_err(|e| e.to_string().into())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A network interface name as the kernel accepts it (1 to 15 bytes, no `/`, `:` or
/// whitespace), further limited to `[A-Za-z0-9_.-]` with an optional trailing `+` (the
/// iptables wildcard) so that it is one safe token in the restore text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Iface(String);

impl Iface {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a concrete interface name matches this (possibly `+`-suffixed) pattern.
    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_suffix('+') {
            Some(prefix) => name.starts_with(prefix),
            None => self.0 == name,
        }
    }
}

impl FromStr for Iface {
    type Err = Reason;
    fn from_str(s: &str) -> Result<Self, Reason> {
        if s.is_empty() {
            return Err("empty interface name".into());
        }
        if s.len() > 15 {
            return Err(format!("{} bytes long; the kernel allows at most 15", s.len()).into());
        }
        if s == "." || s == ".." {
            return Err("not a valid interface name".into());
        }
        if s.starts_with('-') {
            return Err("must not start with '-'".into());
        }
        let body = s.strip_suffix('+').unwrap_or(s);
        if let Some(c) = body
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(format!(
                "contains {c:?}; allowed are letters, digits, '_', '.', '-' and a trailing '+'"
            )
            .into());
        }
        Ok(Iface(s.to_owned()))
    }
}

impl fmt::Display for Iface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A numeric user or group id. `4294967295` ((uid_t)-1) is rejected: the kernel uses it as
/// "no id".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Id(u32);

impl Id {
    pub fn get(self) -> u32 {
        self.0
    }
}

impl FromStr for Id {
    type Err = Reason;
    fn from_str(s: &str) -> Result<Self, Reason> {
        if s.is_empty() {
            return Err("empty".into());
        }
        if s.starts_with('-') {
            return Err("negative ids are not valid".into());
        }
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err("not a number (numeric ids only)".into());
        }
        match s.parse::<u32>() {
            Ok(u32::MAX) | Err(_) => Err("out of range (0-4294967294)".into()),
            Ok(n) => Ok(Id(n)),
        }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A group for the owner-group filters: a numeric gid or a group name that iptables resolves
/// (through `/etc/group`) when the rules are loaded, as Istio does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Group {
    Id(Id),
    Name(String),
}

impl FromStr for Group {
    type Err = Reason;
    fn from_str(s: &str) -> Result<Self, Reason> {
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().map(Group::Id);
        }
        if s.starts_with('-') && s[1..].bytes().all(|b| b.is_ascii_digit()) {
            return Err("negative ids are not valid".into());
        }
        if s.len() > 32 {
            return Err("group names are at most 32 characters".into());
        }
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let body = s.strip_suffix('$').unwrap_or(s);
        if !first_ok
            || !body
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(
                "not a number and not a valid group name ([A-Za-z_][A-Za-z0-9_.-]*)".into(),
            );
        }
        Ok(Group::Name(s.to_owned()))
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Group::Id(id) => write!(f, "{id}"),
            Group::Name(n) => f.write_str(n),
        }
    }
}

/// A decimal firewall mark. 0 is rejected (it would match every unmarked packet) and so is
/// 1338, the mark Istio reserves for the proxy's outbound loopback traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mark(u32);

impl Mark {
    /// The mark Istio sets on the proxy's own loopback traffic in TPROXY mode.
    pub const OUTBOUND: Mark = Mark(1338);

    pub fn get(self) -> u32 {
        self.0
    }
}

impl FromStr for Mark {
    type Err = Reason;
    fn from_str(s: &str) -> Result<Self, Reason> {
        let n = parse_decimal_u32(s)?;
        if n == 0 {
            return Err("mark 0 would match every unmarked packet".into());
        }
        if n == Mark::OUTBOUND.0 {
            return Err("1338 is reserved for the proxy's outbound loopback traffic".into());
        }
        Ok(Mark(n))
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A policy-routing table number. The kernel's reserved tables (0 unspec, 253 default,
/// 254 main, 255 local) are rejected: writing a default route into them would break the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteTable(u32);

impl RouteTable {
    pub fn get(self) -> u32 {
        self.0
    }
}

impl FromStr for RouteTable {
    type Err = Reason;
    fn from_str(s: &str) -> Result<Self, Reason> {
        match parse_decimal_u32(s)? {
            0 | 253..=255 => Err("0, 253, 254 and 255 are the kernel's reserved tables".into()),
            n => Ok(RouteTable(n)),
        }
    }
}

impl fmt::Display for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

fn parse_decimal_u32(s: &str) -> Result<u32, Reason> {
    if s.is_empty() {
        return Err("empty".into());
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a decimal number".into());
    }
    s.parse::<u32>()
        .map_err(|_| "out of range (0-4294967295)".into())
}

/// Go's `strconv.ParseBool`, which istio-iptables uses for every boolean flag and env var.
pub fn parse_go_bool(s: &str) -> Result<bool, Reason> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err("not a boolean (expected true or false)".into()),
    }
}

/// A subset of Go's `time.ParseDuration`: a sequence of decimal numbers with units
/// `ns`, `us`, `µs`, `ms`, `s`, `m`, `h` (for example `5s`, `1m30s`, `1.5s`).
pub fn parse_go_duration(s: &str) -> Result<std::time::Duration, Reason> {
    const BAD: &str = "not a duration (expected e.g. 5s, 500ms, 1m30s)";
    if s.is_empty() {
        return Err(BAD.into());
    }
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{BAD}: missing unit"))?;
        if num_len == 0 {
            return Err(BAD.into());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| BAD.to_string())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            unit => return Err(format!("{BAD}: unknown unit {unit:?}").into()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > 86_400.0 * 365.0 {
        return Err("duration too large".into());
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        for (input, want) in [
            ("1", Ok(1)),
            ("65535", Ok(65535)),
            ("0", Err("port 0 is not a valid port (1-65535)")),
            ("65536", Err("out of range (1-65535)")),
            ("80x", Err("not a number")),
            ("-1", Err("not a number")),
            ("", Err("empty")),
            ("99999999999999999999", Err("out of range (1-65535)")),
        ] {
            let got = input.parse::<Port>().map(Port::get);
            assert_eq!(got, want.map_err(Reason::from), "{input:?}");
        }
    }

    #[test]
    fn port_items() {
        assert_eq!(
            "8000:9000".parse::<PortItem>().unwrap().to_string(),
            "8000:9000"
        );
        assert!(
            "9000:8000"
                .parse::<PortItem>()
                .unwrap_err()
                .contains("reversed")
        );
        assert!(
            "0:10"
                .parse::<PortItem>()
                .unwrap_err()
                .starts_with("range start")
        );
        assert!("8000:9000".parse::<PortItem>().unwrap().contains(8500));
        assert!(!"8000:9000".parse::<PortItem>().unwrap().contains(9001));
    }

    #[test]
    fn split_trims_and_drops_empty() {
        let items: Vec<_> = split_list(" 80, ,443,,").collect();
        assert_eq!(items, ["80", "443"]);
        assert_eq!(split_list("").count(), 0);
    }

    #[test]
    fn cidrs_keep_host_bits() {
        assert_eq!(
            "127.0.0.1/24".parse::<Cidr>().unwrap().to_string(),
            "127.0.0.1/24"
        );
        assert_eq!(
            "2001:db8::/32".parse::<Cidr>().unwrap().family(),
            Family::V6
        );
        for (bad, reason) in [
            ("10.0.0.0/33", "longer than /32"),
            ("2001:db8::/129", "longer than /128"),
            ("10.0.0.0", "missing prefix length"),
            ("foo/8", "not an IP address"),
            ("10.0.0.0/x", "not a number"),
            ("10.0.0.0/", "not a number"),
        ] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(err.contains(reason), "{bad}: {err}");
        }
    }

    #[test]
    fn interface_names() {
        for ok in [
            "eth0",
            "net1ps5",
            "veth.1",
            "a-b_c",
            "eth+",
            "abcdefghijklmno",
        ] {
            assert!(ok.parse::<Iface>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "abcdefghijklmnop",
            "eth0 -j ACCEPT",
            "a/b",
            "a:b",
            "-i",
            ".",
            "eth\n0",
            "e#",
            "e\"",
        ] {
            assert!(bad.parse::<Iface>().is_err(), "{bad:?}");
        }
        let wild: Iface = "veth+".parse().unwrap();
        assert!(wild.matches("veth123"));
        assert!(!wild.matches("eth0"));
    }

    #[test]
    fn ids_groups_marks_tables() {
        assert_eq!("1337".parse::<Id>().unwrap().get(), 1337);
        assert!("-1".parse::<Id>().unwrap_err().contains("negative"));
        assert!("4294967295".parse::<Id>().is_err());
        assert!("4294967296".parse::<Id>().is_err());
        assert!("root".parse::<Id>().is_err());
        assert_eq!("java".parse::<Group>().unwrap(), Group::Name("java".into()));
        assert_eq!("202".parse::<Group>().unwrap(), Group::Id(Id(202)));
        assert!("ja va".parse::<Group>().is_err());
        assert!("-5".parse::<Group>().is_err());
        assert!("1337".parse::<Mark>().is_ok());
        assert!("0".parse::<Mark>().is_err());
        assert!("1338".parse::<Mark>().is_err());
        assert!("0x539".parse::<Mark>().is_err());
        assert!("133".parse::<RouteTable>().is_ok());
        assert!("254".parse::<RouteTable>().is_err());
    }

    #[test]
    fn utf8_names_the_bad_byte() {
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(utf8(std::ffi::OsStr::new("80")), Ok("80"));
        assert_eq!(
            utf8(std::ffi::OsStr::from_bytes(b"8\xff0")),
            Err("not valid UTF-8 (byte 0xff at offset 1)".into())
        );
        assert_eq!(
            utf8(std::ffi::OsStr::from_bytes(b"\xc3")),
            Err("not valid UTF-8 (byte 0xc3 at offset 0)".into())
        );
    }

    #[test]
    fn go_bools_and_durations() {
        assert_eq!(parse_go_bool("True"), Ok(true));
        assert_eq!(parse_go_bool("0"), Ok(false));
        assert!(parse_go_bool("yes").is_err());
        assert_eq!(parse_go_duration("5s").unwrap().as_millis(), 5000);
        assert_eq!(parse_go_duration("1m30s").unwrap().as_secs(), 90);
        assert_eq!(parse_go_duration("1.5s").unwrap().as_millis(), 1500);
        assert_eq!(parse_go_duration("250ms").unwrap().as_millis(), 250);
        assert!(parse_go_duration("5").is_err());
        assert!(parse_go_duration("5x").is_err());
        assert!(parse_go_duration("").is_err());
    }
}
