//! Random *valid* configurations for the differential test (`differential.rs`), reproducible
//! from a seed and an index: case `i` of seed `s` draws from its own generator seeded with
//! `(s, i)`, so one case can be re-run alone (`DIFF_SEED=s DIFF_INDEX=i`).
//!
//! A case is what a pod's init container gets: the arguments after the `istio-iptables` word
//! (each option spelled as a long flag, `--flag=value`, a short flag or its env-var fallback),
//! the environment, and the pod itself (its addresses, and the nameservers of its
//! resolv.conf). Values are ones Istio's tool accepts: ports and `a:b` ranges, CIDRs of both
//! families with `*`, empty values, duplicates and trailing commas, owner uids/gids/groups,
//! interfaces, marks and route tables. Addresses stay in 198.18.0.0/15, 2001:db8::/32 and
//! loopback.

use std::fmt::Write as _;

/// SplitMix64: small, fast, and enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, index: u64) -> Rng {
        let mut r = Rng(seed ^ index.wrapping_mul(0xA076_1D64_78BD_642F));
        r.next();
        r
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// The pod a case runs in: its interface addresses (with prefix length) and nameservers.
#[derive(Debug, Clone)]
pub struct Pod {
    pub v4: Option<String>,
    pub v6: Option<String>,
    pub nameservers: Vec<String>,
}

impl Pod {
    pub fn resolv_conf(&self) -> String {
        let mut s = String::from("search ns.svc.cluster.local svc.cluster.local\n");
        for n in &self.nameservers {
            let _ = writeln!(s, "nameserver {n}");
        }
        s + "options ndots:5\n"
    }

    /// Nameservers listed more than once.
    pub fn duplicate_nameservers(&self) -> Vec<&str> {
        let mut dups: Vec<&str> = Vec::new();
        for (i, n) in self.nameservers.iter().enumerate() {
            if self.nameservers[..i].contains(n) && !dups.contains(&n.as_str()) {
                dups.push(n);
            }
        }
        dups
    }
}

/// One generated configuration.
#[derive(Debug, Clone)]
pub struct Case {
    pub seed: u64,
    pub index: u64,
    pub nft: bool,
    /// The arguments after the `istio-iptables` word.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub pod: Pod,
    /// Whether `--dual-stack` (or its env var) is on.
    pub dual_stack: bool,
}

impl Case {
    /// The one-line reproducer of a failure.
    pub fn reproducer(&self) -> String {
        format!(
            "DIFF_SEED={} DIFF_INDEX={} mode={} args={:?} env={:?} pod: v4={:?} v6={:?} nameservers={:?}",
            self.seed,
            self.index,
            if self.nft { "nftables" } else { "iptables" },
            self.args,
            self.env,
            self.pod.v4,
            self.pod.v6,
            self.pod.nameservers
        )
    }

    /// The same case in a pod without its IPv6 address.
    pub fn without_ipv6_address(&self) -> Case {
        let mut c = self.clone();
        c.pod.v6 = None;
        c
    }

    /// Whether Istio turns IPv6 off where istio-init (any global IPv6 address) turns it on.
    pub fn ipv6_choices_differ(&self) -> bool {
        self.pod.v6.is_some() && !self.istio_ipv6()
    }

    /// Istio's IPv6 choice: the first global address decides (the kernel lists IPv4 first),
    /// or with `--dual-stack` any IPv6 address.
    pub fn istio_ipv6(&self) -> bool {
        match (&self.pod.v4, &self.pod.v6) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(_), Some(_)) => self.dual_stack,
        }
    }
}

const PORTS: [&str; 10] = [
    "80", "443", "8080", "3306", "15020", "15021", "15090", "9000", "53", "7",
];
const CIDRS: [&str; 12] = [
    "198.18.0.0/15",
    "198.19.5.0/24",
    "198.18.7.7/32",
    "198.18.200.0/22",
    "127.1.2.3/32",
    "2001:db8::/32",
    "2001:db8:5::/48",
    "2001:db8::7/128",
    "2001:db8:a:b::/64",
    "::1/128",
    "198.19.0.1/16",
    "2001:db8:1::1/56",
];
const NAMESERVERS: [&str; 7] = [
    "198.18.0.53",
    "198.19.0.10",
    "127.0.0.53",
    "127.0.0.1",
    "2001:db8::53",
    "2001:db8:1::10",
    "::1",
];
const INTERFACES: [&str; 4] = ["eth0", "eth1", "net1", "lo"];

/// A comma list of 1–4 items drawn by `item`, with duplicates possible and sometimes a
/// trailing comma.
fn list(rng: &mut Rng, item: &mut dyn FnMut(&mut Rng) -> String) -> String {
    let n = 1 + rng.below(4);
    let mut items: Vec<String> = (0..n).map(|_| item(rng)).collect();
    if rng.chance(10) {
        let again = rng.pick(&items).clone();
        items.push(again);
    }
    let mut s = items.join(",");
    if rng.chance(8) {
        s.push(',');
    }
    s
}

fn port(rng: &mut Rng) -> String {
    // Rare enough that most nftables-mode cases stay comparable (Istio's fails on a range).
    if rng.chance(6) {
        let a = 1000 + rng.below(5000);
        return format!("{a}:{}", a + 1 + rng.below(200));
    }
    rng.pick(&PORTS).to_string()
}

fn ports(rng: &mut Rng) -> String {
    list(rng, &mut port)
}

/// `*` (sometimes), empty (sometimes) or a list: `-b` and `-i`.
fn wildcard_or(rng: &mut Rng, item: fn(&mut Rng) -> String) -> String {
    match rng.below(10) {
        0..=3 => "*".into(),
        4 => String::new(),
        _ => list(rng, &mut |r| item(r)),
    }
}

fn cidr(rng: &mut Rng) -> String {
    rng.pick(&CIDRS).to_string()
}

/// Settings whose value is one of a few: the key (an option's long name, or an env-only
/// variable), the percentage of cases that give it, and its values.
type Picks = [(&'static str, u64, &'static [&'static str])];

const PICKS_FIRST: &Picks = &[
    ("envoy-port", 40, &["15001", "16001"]),
    ("inbound-capture-port", 40, &["15006", "16006"]),
    ("inbound-tunnel-port", 30, &["15008", "16008"]),
    ("proxy-uid", 85, &["1337", "3,4", "0", "1000"]),
    ("proxy-gid", 35, &["1337", "1,2", "1001"]),
    (
        "istio-inbound-interception-mode",
        80,
        &["REDIRECT", "TPROXY", "TPROXY"],
    ),
];

const PICKS_LAST: &Picks = &[
    ("istio-inbound-tproxy-mark", 20, &["1337", "4242", "77"]),
    (
        "istio-inbound-tproxy-route-table",
        20,
        &["133", "200", "42"],
    ),
    ("redirect-dns", 60, &["true", "true", "false"]),
    ("capture-all-dns", 25, &["true", "true", "false"]),
    ("drop-invalid", 25, &["true", "true", "false"]),
    ("dual-stack", 25, &["true", "true", "false"]),
    (
        "ISTIO_OUTBOUND_OWNER_GROUPS",
        20,
        &["*", "java,202", "1001", ""],
    ),
    (
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        20,
        &["888,ftp", "1002", ""],
    ),
    (
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        15,
        &["127.0.0.1/32", "127.0.0.1/8", "127.0.0.0/16"],
    ),
];

fn picks(rng: &mut Rng, table: &Picks, v: &mut Vec<(&'static str, String)>) {
    for (key, percent, values) in table {
        if rng.chance(*percent) {
            v.push((key, rng.pick(values).to_string()));
        }
    }
}

/// Draws one setting's value.
type ValueOf<'a> = &'a dyn Fn(&mut Rng) -> String;

/// The list-valued settings: ports, CIDRs and interfaces.
fn lists(rng: &mut Rng, v: &mut Vec<(&'static str, String)>) {
    let interfaces = |r: &mut Rng| list(r, &mut |r| r.pick(&INTERFACES).to_string());
    let excluded_cidrs = |r: &mut Rng| match r.chance(15) {
        true => String::new(),
        false => list(r, &mut cidr),
    };
    let table: [(&'static str, u64, ValueOf); 8] = [
        ("istio-inbound-ports", 90, &|r| wildcard_or(r, port)),
        ("istio-local-exclude-ports", 80, &ports),
        ("istio-service-cidr", 90, &|r| wildcard_or(r, cidr)),
        ("istio-service-exclude-cidr", 60, &excluded_cidrs),
        ("istio-outbound-ports", 30, &ports),
        ("istio-local-outbound-ports-exclude", 30, &ports),
        ("kube-virt-interfaces", 20, &interfaces),
        ("istio-exclude-interfaces", 20, &interfaces),
    ];
    for (key, percent, value) in table {
        if rng.chance(percent) {
            let value = value(rng);
            v.push((key, value));
        }
    }
}

/// Option values by long name (an env-only setting by its variable name).
fn settings(rng: &mut Rng) -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    picks(rng, PICKS_FIRST, &mut v);
    lists(rng, &mut v);
    picks(rng, PICKS_LAST, &mut v);
    v
}

/// Bool values as Go's `strconv.ParseBool` reads them.
const TRUES: [&str; 3] = ["true", "1", "True"];

/// Writes one setting into the case: a flag in one of its spellings, or an env var.
fn give(rng: &mut Rng, case: &mut Case, key: &'static str, value: &str) {
    let Some(o) = istio_init::settings::cli::find(key) else {
        case.env.push((key.to_owned(), value.to_owned()));
        return;
    };
    let boolean = matches!(o.kind, istio_init::settings::cli::Kind::Bool);
    if !o.env.is_empty() && rng.chance(35) {
        let name = *rng.pick(o.env);
        let v = if boolean && value == "true" {
            rng.pick(&TRUES).to_string()
        } else {
            value.to_owned()
        };
        case.env.push((name.to_owned(), v));
        return;
    }
    match (boolean, o.short, rng.below(3)) {
        (true, _, 0) if value == "true" => case.args.push(format!("--{}", o.long)),
        (false, Some(s), 0) => case.args.extend([format!("-{s}"), value.to_owned()]),
        (false, _, 1) => case
            .args
            .extend([format!("--{}", o.long), value.to_owned()]),
        _ => case.args.push(format!("--{}={value}", o.long)),
    }
}

fn pod(rng: &mut Rng) -> Pod {
    let v4 = format!("198.18.{}.{}/24", rng.below(250), 2 + rng.below(250));
    let v6 = format!(
        "2001:db8:{:x}::{:x}/64",
        rng.below(0xffff),
        2 + rng.below(0xfff)
    );
    let (v4, v6) = match rng.below(10) {
        0..=2 => (Some(v4), None),
        3..=5 => (None, Some(v6)),
        _ => (Some(v4), Some(v6)),
    };
    let n = rng.below(5);
    let nameservers = (0..n).map(|_| rng.pick(&NAMESERVERS).to_string()).collect();
    Pod {
        v4,
        v6,
        nameservers,
    }
}

/// Case `index` of `seed`, in nftables mode when `nft`.
pub fn case(seed: u64, index: u64, nft: bool) -> Case {
    let mut rng = Rng::new(seed, index);
    let pod = pod(&mut rng);
    let mut case = Case {
        seed,
        index,
        nft,
        args: Vec::new(),
        env: Vec::new(),
        pod,
        dual_stack: false,
    };
    let mut given = settings(&mut rng);
    if nft {
        given.push(("native-nftables", "true".into()));
    }
    // Flags in random order, as a template or a user may write them.
    for i in (1..given.len()).rev() {
        given.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for (key, value) in &given {
        if *key == "dual-stack" {
            case.dual_stack = value == "true";
        }
        give(&mut rng, &mut case, key, value);
    }
    case
}
