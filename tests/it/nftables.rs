//! The nf_tables layer (`istio_init::nft`, `istio_init::netlink::nftables`) against the real
//! kernel and nft's own encoding:
//! - each of Istio's 28 native-nftables goldens, read into the IR by a test-only parser, is
//!   applied as one netlink batch in one namespace, loaded with `nft -f` in another, and the
//!   IR's rendered text with `nft -f` in a third: `nft list ruleset` (counters aside) and
//!   `nft --debug=netlink list ruleset` (handles, counters and anonymous set numbers aside)
//!   must be identical, and so must the kernel's own description of every anonymous set
//!   (flags, key, size, nft's user data: a netlink dump);
//! - the same for port ranges, interval sets and address prefixes the goldens do not have;
//! - a batch the kernel refuses at its end names that op and leaves a populated namespace
//!   byte-identical and a fresh one empty;
//! - a process with CAP_NET_RAW but not CAP_NET_ADMIN gets EPERM, nothing applied.
//!
//! Needs root, `ip` and `nft`: skipped loudly without them, a failure under `CI=true`.

use std::collections::HashMap;

use istio_init::netlink::nftables::{self, ApplyError};
use istio_init::nft::{
    BaseChain, Chain, ChainType, CtStates, Dir, Family, Hook, L4, Op, PortRange, Rule, Stmt,
    Transaction, Verdict,
};

use crate::util::{Netns, in_ci, in_netns, shared_conformance, stderr, stdout, which};

/// Whether the nftables tests can run here (see the module doc).
fn ready(test: &str) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("not running as root")
    } else if which("ip").is_none() {
        Some("the `ip` command (iproute2) is missing")
    } else if which("nft").is_none() {
        Some("the `nft` command (nftables) is missing")
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) if in_ci() => panic!("{test}: privileged nftables test cannot run: {r}"),
        Some(r) => {
            eprintln!("skipped: {test}: privileged nftables test cannot run: {r}");
            false
        }
    }
}

// ---- A parser of the golden text: just the grammar Istio's goldens use. ----

/// `/etc/group` for the namespaces: the host's, with the groups the goldens name by name.
fn group_file() -> String {
    let host = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let mut s: String = host
        .lines()
        .filter(|l| !l.starts_with("java:") && !l.starts_with("ftp:"))
        .map(|l| format!("{l}\n"))
        .collect();
    s.push_str("java:x:4201:\nftp:x:4202:\n");
    s
}

fn gid_of(groups: &str, name: &str) -> u32 {
    if let Ok(n) = name.parse() {
        return n;
    }
    groups
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("group {name} not in the test's /etc/group"))
}

#[derive(Default)]
struct Builder {
    tables: Vec<String>,
    chains: Vec<Chain>,
    rules: HashMap<(String, String), Vec<Vec<Stmt>>>,
}

impl Builder {
    /// Tables, then their chains, then each chain's rules in their final order.
    fn transaction(self) -> Transaction {
        let mut ops: Vec<Op> = Vec::new();
        let mut rules = self.rules;
        for t in &self.tables {
            ops.push(Op::AddTable(t.clone()));
            let chains: Vec<&Chain> = self.chains.iter().filter(|c| &c.table == t).collect();
            ops.extend(chains.iter().map(|c| Op::AddChain((*c).clone())));
            for c in chains {
                for stmts in rules
                    .remove(&(t.clone(), c.name.clone()))
                    .unwrap_or_default()
                {
                    ops.push(Op::AddRule(Rule {
                        table: t.clone(),
                        chain: c.name.clone(),
                        stmts,
                    }));
                }
            }
        }
        assert!(rules.is_empty(), "rules for undeclared chains: {rules:?}");
        Transaction { ops }
    }
}

/// Parses a golden into the IR. `insert rule … index N` puts the rule at position N of the
/// chain as built so far, as nft does.
fn parse(text: &str, groups: &str) -> Transaction {
    let mut b = Builder::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let toks: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(toks.get(2), Some(&"inet"), "{line}");
        let (table, rest) = (toks[3].to_owned(), &toks[4..]);
        match (toks[0], toks[1]) {
            ("add", "table") => b.tables.push(table),
            ("flush", "table") => {} // the namespaces are fresh
            ("add", "chain") => {
                let base = (rest.len() > 1).then(|| {
                    let d = &rest[1..];
                    assert_eq!(
                        (d[0], d[1], d[3], d[5], d[7], d[8]),
                        ("{", "type", "hook", "priority", ";", "}"),
                        "{line}"
                    );
                    BaseChain {
                        kind: match d[2] {
                            "nat" => ChainType::Nat,
                            "filter" => ChainType::Filter,
                            "route" => ChainType::Route,
                            k => panic!("chain type {k}"),
                        },
                        hook: match d[4] {
                            "prerouting" => Hook::Prerouting,
                            "output" => Hook::Output,
                            h => panic!("hook {h}"),
                        },
                        priority: d[6].parse().unwrap(),
                    }
                });
                b.chains.push(Chain {
                    table,
                    name: rest[0].to_owned(),
                    base,
                });
            }
            ("add", "rule") => {
                let stmts = parse_stmts(&rest[1..], groups);
                b.rules
                    .entry((table, rest[0].to_owned()))
                    .or_default()
                    .push(stmts);
            }
            ("insert", "rule") => {
                assert_eq!(rest[1], "index", "{line}");
                let index: usize = rest[2].parse().unwrap();
                let stmts = parse_stmts(&rest[3..], groups);
                let chain = b.rules.entry((table, rest[0].to_owned())).or_default();
                assert!(index < chain.len(), "{line}: index past the chain's end");
                chain.insert(index, stmts);
            }
            _ => panic!("unknown command: {line}"),
        }
    }
    b.transaction()
}

/// The tokens of a rule, read one at a time.
struct Tokens<'a> {
    toks: &'a [&'a str],
    at: usize,
}

impl<'a> Tokens<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.toks.get(self.at).copied()
    }
    fn next(&mut self) -> &'a str {
        let t = self
            .peek()
            .unwrap_or_else(|| panic!("truncated rule {:?}", self.toks));
        self.at += 1;
        t
    }
    fn expect(&mut self, word: &str) {
        let t = self.next();
        assert_eq!(t, word, "in {:?}", self.toks);
    }
    fn negated(&mut self) -> bool {
        let neg = self.peek() == Some("!=");
        if neg {
            self.at += 1;
        }
        neg
    }
}

fn parse_stmts(toks: &[&str], groups: &str) -> Vec<Stmt> {
    let mut t = Tokens { toks, at: 0 };
    let mut out = Vec::new();
    while t.peek().is_some() {
        let tok = t.next();
        let s = match tok {
            "meta" => match t.next() {
                "l4proto" => Stmt::L4Proto(l4(t.next())),
                "skuid" => owner(true, &mut t, groups),
                "skgid" => owner(false, &mut t, groups),
                "mark" => {
                    t.expect("set");
                    match t.next() {
                        "ct" => {
                            t.expect("mark");
                            Stmt::SetMarkFromCt
                        }
                        v => Stmt::SetMark(v.parse().unwrap()),
                    }
                }
                k => panic!("meta {k}"),
            },
            "tcp" | "udp" => {
                let dir = match t.next() {
                    "sport" => Dir::Src,
                    "dport" => Dir::Dst,
                    f => panic!("port field {f}"),
                };
                let negate = t.negated();
                let mut items = Vec::new();
                let first = t.next();
                if first == "{" {
                    loop {
                        let i = t.next();
                        if i == "}" {
                            break;
                        }
                        items.push(i.trim_end_matches(','));
                    }
                } else {
                    items.push(first);
                }
                let ports = items
                    .into_iter()
                    .map(|i| match i.split_once('-') {
                        Some((a, b)) => PortRange::range(a.parse().unwrap(), b.parse().unwrap()),
                        None => PortRange::port(i.parse().unwrap()),
                    })
                    .collect();
                Stmt::Port {
                    proto: l4(tok),
                    dir,
                    negate,
                    ports,
                }
            }
            "iifname" => Stmt::Iifname(t.next().to_owned()),
            "oifname" => Stmt::Oifname(t.next().to_owned()),
            "ip" | "ip6" => {
                let dir = match t.next() {
                    "saddr" => Dir::Src,
                    "daddr" => Dir::Dst,
                    f => panic!("address field {f}"),
                };
                let negate = t.negated();
                let net = t.next().parse().unwrap();
                Stmt::Addr { dir, negate, net }
            }
            "skuid" => owner(true, &mut t, groups),
            "skgid" => owner(false, &mut t, groups),
            "mark" => Stmt::Mark {
                negate: t.negated(),
                value: t.next().parse().unwrap(),
            },
            "ct" => match t.next() {
                "mark" => match t.next() {
                    "set" => {
                        t.expect("mark");
                        Stmt::SetCtMarkFromMark
                    }
                    v => Stmt::CtMark(v.parse().unwrap()),
                },
                "state" => {
                    let mut st = CtStates::default();
                    for s in t.next().split(',') {
                        match s {
                            "invalid" => st.invalid = true,
                            "established" => st.established = true,
                            "related" => st.related = true,
                            "new" => st.new = true,
                            s => panic!("ct state {s}"),
                        }
                    }
                    Stmt::CtState(st)
                }
                "zone" => {
                    t.expect("set");
                    Stmt::SetCtZone(t.next().parse().unwrap())
                }
                k => panic!("ct {k}"),
            },
            "counter" => Stmt::Counter,
            "redirect" => {
                t.expect("to");
                Stmt::Redirect(port_of(t.next()))
            }
            "tproxy" => {
                let family = match t.next() {
                    "ip" => Family::V4,
                    "ip6" => Family::V6,
                    f => panic!("tproxy {f}"),
                };
                t.expect("to");
                Stmt::Tproxy {
                    family,
                    port: port_of(t.next()),
                }
            }
            "accept" => Stmt::Verdict(Verdict::Accept),
            "drop" => Stmt::Verdict(Verdict::Drop),
            "return" => Stmt::Verdict(Verdict::Return),
            "jump" => Stmt::Verdict(Verdict::Jump(t.next().to_owned())),
            _ => panic!("unknown statement {tok} in {toks:?}"),
        };
        out.push(s);
    }
    out
}

fn l4(word: &str) -> L4 {
    match word {
        "tcp" => L4::Tcp,
        "udp" => L4::Udp,
        p => panic!("protocol {p}"),
    }
}

fn port_of(tok: &str) -> u16 {
    tok.strip_prefix(':').unwrap().parse().unwrap()
}

fn owner(uid: bool, t: &mut Tokens<'_>, groups: &str) -> Stmt {
    let negate = t.negated();
    let v = t.next();
    if uid {
        Stmt::SkUid {
            negate,
            id: v.parse().unwrap(),
        }
    } else {
        Stmt::SkGid {
            negate,
            id: gid_of(groups, v),
        }
    }
}

// ---- Listings ----

/// `nft list ruleset` with counter values zeroed.
pub fn listing(ns: &Netns) -> String {
    zero_counters(&ns.ok(&["nft", "list", "ruleset"]))
}

pub fn zero_counters(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let words: Vec<&str> = s.split(' ').collect();
    let mut i = 0;
    while i < words.len() {
        out.push_str(words[i]);
        if matches!(words[i], "packets" | "bytes" | "pkts") && i + 1 < words.len() {
            // "packets 12" / "bytes 3400" / "pkts 1": the number goes.
            let num = words[i + 1];
            let digits = num.trim_end_matches(|c: char| !c.is_ascii_digit());
            if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
                out.push_str(" N");
                out.push_str(&num[digits.len()..]);
                i += 2;
                if i < words.len() {
                    out.push(' ');
                }
                continue;
            }
        }
        i += 1;
        if i < words.len() {
            out.push(' ');
        }
    }
    out
}

/// `nft --debug=netlink list ruleset` without rule handles and counter values, each anonymous
/// set's name in a lookup replaced by its elements (the kernel numbers anonymous sets in the
/// order they were created, which is not part of the state).
pub fn debug_listing(ns: &Netns) -> String {
    let text = zero_counters(&ns.ok(&["nft", "--debug=netlink", "list", "ruleset"]));
    let mut sets: HashMap<String, String> = HashMap::new();
    let mut current: Option<String> = None;
    let mut rest = Vec::new();
    for line in text.lines() {
        if let Some((table, name)) = line.strip_prefix("inet ").and_then(|l| l.split_once(" @")) {
            let key = format!("{table} {name}");
            sets.insert(key.clone(), String::new());
            current = Some(key);
        } else if let (Some(key), Some(elem)) = (&current, line.strip_prefix('\t')) {
            let s = sets.get_mut(key).unwrap();
            s.push_str(elem.trim());
            s.push(';');
        } else {
            current = None;
            rest.push(line);
        }
    }
    let mut out = String::new();
    let mut table = String::new();
    for line in rest {
        let words: Vec<&str> = line.split(' ').collect();
        if words.len() >= 3 && words[0] == "inet" && !line.contains('[') {
            // "inet TABLE CHAIN HANDLE [POSITION]"
            table = words[1].to_owned();
            out.push_str(&words[..3].join(" "));
        } else if let Some(i) = words.iter().position(|w| w.starts_with("__set")) {
            let elems = sets
                .get(&format!("{table} {}", words[i]))
                .unwrap_or_else(|| panic!("set {} of table {table} not listed", words[i]));
            let mut w: Vec<String> = words.iter().map(|s| (*s).to_owned()).collect();
            w[i] = format!("{{{elems}}}");
            out.push_str(&w.join(" "));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// What the kernel holds of every set (anonymous ones included), read with an
/// `NFT_MSG_GETSET` dump: its attributes but the name, handle and id, which depend on the
/// creation order. Listings do not show a set's user data or size; this does.
fn sets(ns: &Netns) -> Vec<String> {
    use netlink_packet_core::{
        NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_netfilter::nftables::{NfTablesMessage, SetAttribute, SetMessage};
    use netlink_packet_netfilter::{
        NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    };
    use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
    in_netns(ns, || {
        let mut s = Socket::new(NETLINK_NETFILTER).unwrap();
        s.bind_auto().unwrap();
        let get = NfTablesMessage::GetSet(SetMessage { attributes: vec![] });
        let nf = NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0), get);
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(nf));
        m.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        m.header.sequence_number = 1;
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        s.send(&buf, 0).unwrap();
        let mut found = Vec::new();
        loop {
            let (data, _) = s.recv_from_full().unwrap();
            let mut off = 0;
            while off < data.len() {
                let m = NetlinkMessage::<NetfilterMessage>::deserialize(&data[off..]).unwrap();
                off += (m.header.length as usize + 3) & !3;
                match m.payload {
                    NetlinkPayload::Done(_) => {
                        found.sort();
                        return found;
                    }
                    NetlinkPayload::Error(e) => panic!("set dump: {e:?}"),
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewSet(set)),
                        ..
                    }) => {
                        let attrs: Vec<String> = set
                            .attributes
                            .iter()
                            .filter(|a| {
                                !matches!(
                                    a,
                                    SetAttribute::Name(_)
                                        | SetAttribute::Handle(_)
                                        | SetAttribute::Id(_)
                                )
                            })
                            .map(|a| format!("{a:?}"))
                            .collect();
                        found.push(attrs.join(" "));
                    }
                    other => panic!("unexpected answer to a set dump: {other:?}"),
                }
            }
        }
    })
}

pub fn nft_f(ns: &Netns, text: &str) {
    let o = ns.run_with_input(&["nft", "-f", "-"], text);
    assert!(
        o.status.success(),
        "nft -f in {}: {}{}\ninput:\n{text}",
        ns.name,
        stdout(&o),
        stderr(&o)
    );
}

fn apply_in(ns: &Netns, tx: &Transaction) -> Result<(), ApplyError> {
    in_netns(ns, || nftables::apply(tx))
}

/// Three namespaces with the same `/etc/group`: ours, `nft -f` of the reference text, and
/// `nft -f` of the IR's rendering.
struct Trio {
    ours: Netns,
    reference: Netns,
    rendered: Netns,
}

impl Trio {
    fn new(groups: &str) -> Trio {
        let t = Trio {
            ours: Netns::new("nftours"),
            reference: Netns::new("nftref"),
            rendered: Netns::new("nftrender"),
        };
        for ns in [&t.ours, &t.reference, &t.rendered] {
            ns.etc_file("group", groups);
        }
        t
    }

    /// Applies `tx` three ways and returns the differences found (empty when equal).
    fn compare(&self, name: &str, reference_text: &str, tx: &Transaction) -> Vec<String> {
        let mut diffs = Vec::new();
        if let Err(e) = apply_in(&self.ours, tx) {
            return vec![format!("{name}: our batch failed: {e}")];
        }
        nft_f(&self.reference, reference_text);
        nft_f(&self.rendered, &istio_init::nft::render(tx));
        let want = listing(&self.reference);
        assert!(want.contains("table inet"), "{name}: nft -f left no table");
        let want_debug = debug_listing(&self.reference);
        for (what, ns) in [("batch", &self.ours), ("rendered text", &self.rendered)] {
            let got = listing(ns);
            if got != want {
                diffs.push(format!(
                    "{name}: nft list ruleset after our {what} differs:\n{}",
                    crate::golden::diff(&want, &got)
                ));
            }
            let got = debug_listing(ns);
            if got != want_debug {
                diffs.push(format!(
                    "{name}: nft --debug=netlink list ruleset after our {what} differs:\n{}",
                    crate::golden::diff(&want_debug, &got)
                ));
            }
        }
        let want_sets = sets(&self.reference);
        for (what, ns) in [("batch", &self.ours), ("rendered text", &self.rendered)] {
            let got = sets(ns);
            if got != want_sets {
                diffs.push(format!(
                    "{name}: the sets after our {what} differ:\n  nft:  {want_sets:?}\n  ours: {got:?}"
                ));
            }
        }
        for ns in [&self.ours, &self.reference, &self.rendered] {
            ns.ok(&["nft", "flush", "ruleset"]);
        }
        diffs
    }
}

#[test]
fn goldens_apply_as_nft_applies_them() {
    if !ready("goldens_apply_as_nft_applies_them") {
        return;
    }
    let Some(dir) = shared_conformance() else {
        return;
    };
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("nft-cases.json")).unwrap())
            .unwrap();
    let names: Vec<&str> = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 28);
    let groups = group_file();
    let trio = Trio::new(&groups);
    let mut diffs = Vec::new();
    for name in names {
        let path = dir.join("istio-nft-goldens").join(format!("{name}.golden"));
        let text = std::fs::read_to_string(&path).unwrap();
        let tx = parse(&text, &groups);
        diffs.extend(trio.compare(name, &text, &tx));
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

fn rule(chain: &str, stmts: Vec<Stmt>) -> Op {
    Op::AddRule(Rule {
        table: "t".into(),
        chain: chain.into(),
        stmts,
    })
}

fn ports(proto: L4, dir: Dir, negate: bool, p: &[(u16, u16)]) -> Stmt {
    Stmt::Port {
        proto,
        dir,
        negate,
        ports: p.iter().map(|&(a, b)| PortRange::range(a, b)).collect(),
    }
}

fn addr(dir: Dir, negate: bool, net: &str) -> Stmt {
    Stmt::Addr {
        dir,
        negate,
        net: net.parse().unwrap(),
    }
}

fn ranges_tx() -> Transaction {
    use Dir::{Dst, Src};
    use L4::{Tcp, Udp};
    let r = Stmt::Verdict(Verdict::Return);
    let rules: Vec<Vec<Stmt>> = vec![
        vec![
            ports(Tcp, Dst, false, &[(3505, 3559)]),
            Stmt::Counter,
            r.clone(),
        ],
        vec![ports(Tcp, Dst, true, &[(3505, 3559)]), r.clone()],
        vec![
            Stmt::L4Proto(Tcp),
            ports(Tcp, Dst, true, &[(53, 53), (1000, 2000)]),
            Stmt::Counter,
            r.clone(),
        ],
        vec![
            ports(Udp, Src, false, &[(53, 53), (1000, 2000), (65535, 65535)]),
            r.clone(),
        ],
        vec![ports(Tcp, Src, false, &[(0, 10), (53, 53)]), r.clone()],
        vec![
            ports(Tcp, Dst, false, &[(21, 30), (10, 20), (25, 25), (40, 40)]),
            r.clone(),
        ],
        vec![
            ports(Udp, Dst, false, &[(40, 40), (10, 10), (20, 20)]),
            r.clone(),
        ],
        vec![ports(Tcp, Dst, false, &[(10, 10), (10, 10)]), r.clone()],
        vec![addr(Dst, false, "10.96.0.0/12"), r.clone()],
        vec![
            addr(Dst, true, "10.96.0.0/12"),
            ports(Udp, Dst, false, &[(53, 53)]),
            r.clone(),
        ],
        vec![
            addr(Src, false, "192.168.0.0/16"),
            addr(Dst, true, "198.18.0.0/15"),
            r.clone(),
        ],
        vec![addr(Dst, false, "0.0.0.0/0"), r.clone()],
        vec![addr(Dst, false, "2001:db8::/33"), r.clone()],
        vec![addr(Src, true, "2001:db8::/32"), r.clone()],
        vec![addr(Dst, false, "::/0"), Stmt::Verdict(Verdict::Accept)],
        vec![
            Stmt::Iifname("eth0.100".into()),
            Stmt::Mark {
                negate: true,
                value: 7,
            },
            Stmt::Verdict(Verdict::Drop),
        ],
    ];
    let mut ops = vec![
        Op::AddTable("t".into()),
        Op::AddChain(Chain {
            table: "t".into(),
            name: "c".into(),
            base: Some(BaseChain {
                kind: ChainType::Filter,
                hook: Hook::Prerouting,
                priority: -150,
            }),
        }),
    ];
    ops.extend(rules.into_iter().map(|s| rule("c", s)));
    Transaction { ops }
}

/// Port ranges (which Istio's nft mode cannot write), interval sets and prefixes of every
/// kind, checked as the goldens are; the reference is the IR's own rendering.
#[test]
fn ranges_sets_and_prefixes_apply_as_nft_applies_them() {
    if !ready("ranges_sets_and_prefixes_apply_as_nft_applies_them") {
        return;
    }
    let tx = ranges_tx();
    let text = istio_init::nft::render(&tx);
    let trio = Trio::new(&group_file());
    let diffs = trio.compare("ranges", &text, &tx);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

fn golden_tx(name: &str, groups: &str) -> Option<(String, Transaction)> {
    let dir = shared_conformance()?;
    let text =
        std::fs::read_to_string(dir.join("istio-nft-goldens").join(format!("{name}.golden")))
            .unwrap();
    let tx = parse(&text, groups);
    Some((text, tx))
}

/// A re-run that replaces every table and ends with a rule the kernel refuses (a jump to a
/// chain that does not exist, in the last table): the error names that rule and the old
/// ruleset is left byte for byte; on a fresh namespace nothing is left.
#[test]
fn refused_batch_changes_nothing() {
    if !ready("refused_batch_changes_nothing") {
        return;
    }
    let groups = group_file();
    let Some((old_text, _)) = golden_tx("tproxy", &groups) else {
        return;
    };
    let Some((_, new)) = golden_tx("dns-uid-gid", &groups) else {
        return;
    };
    let mut ops: Vec<Op> = ["istio-proxy-nat", "istio-proxy-mangle", "istio-proxy-raw"]
        .into_iter()
        .map(|t| Op::DeleteTable(t.into()))
        .collect();
    ops.extend(new.ops);
    ops.push(Op::AddRule(Rule {
        table: "istio-proxy-raw".into(),
        chain: "istio-inbound".into(),
        stmts: vec![
            Stmt::Counter,
            Stmt::Verdict(Verdict::Jump("no-such-chain".into())),
        ],
    }));
    let tx = Transaction { ops };
    let last = tx.ops.len() - 1;

    let populated = Netns::new("nftfail");
    populated.etc_file("group", &groups);
    nft_f(&populated, &old_text);
    let before = populated.ok(&["nft", "-a", "--debug=netlink", "list", "ruleset"]);
    assert!(before.contains("istio-proxy-mangle"));
    let fresh = Netns::new("nftfailfresh");
    for ns in [&populated, &fresh] {
        match apply_in(ns, &tx) {
            Err(ApplyError::Refused(r)) => {
                assert_eq!(r.op, Some(last), "{r:?}");
                assert_eq!(r.errno, nix::errno::Errno::ENOENT, "{r:?}");
                let text = r.text.clone().unwrap_or_default();
                assert_eq!(
                    text,
                    "add rule inet istio-proxy-raw istio-inbound counter jump no-such-chain"
                );
                let msg = ApplyError::Refused(r).to_string();
                assert!(
                    msg.contains(&text) && msg.contains("nothing was applied"),
                    "{msg}"
                );
            }
            other => panic!("expected a refusal of the last rule, got {other:?}"),
        }
    }
    let after = populated.ok(&["nft", "-a", "--debug=netlink", "list", "ruleset"]);
    assert_eq!(before, after, "the refused batch changed the ruleset");
    assert_eq!(
        fresh.ok(&["nft", "list", "ruleset"]),
        "",
        "the refused batch left rules"
    );

    // The same batch without the bad rule replaces the old ruleset in one go.
    let mut good = tx.clone();
    good.ops.pop();
    apply_in(&populated, &good).expect("the replacing batch");
    let replaced = listing(&populated);
    assert!(!replaced.contains("istio-proxy-mangle"), "{replaced}");
    assert!(replaced.contains("ct zone set 1"), "{replaced}");
}

/// CAP_NET_RAW without CAP_NET_ADMIN: the kernel refuses the batch as a whole.
#[test]
fn net_raw_alone_is_refused() {
    if !ready("net_raw_alone_is_refused") {
        return;
    }
    use caps::{CapSet, Capability};
    let ns = Netns::new("nftcaps");
    let tx = Transaction {
        ops: vec![Op::AddTable("istio-proxy-nat".into())],
    };
    let result = in_netns(&ns, || {
        let only_raw = std::iter::once(Capability::CAP_NET_RAW).collect();
        // Capabilities are per thread: this one ends with the closure.
        caps::set(None, CapSet::Effective, &only_raw).expect("dropping capabilities");
        nftables::apply(&tx)
    });
    match result {
        Err(ApplyError::Refused(r)) => {
            assert_eq!(r.op, None, "{r:?}");
            assert_eq!(r.errno, nix::errno::Errno::EPERM, "{r:?}");
            let msg = ApplyError::Refused(r).to_string();
            assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
        }
        other => panic!("expected EPERM, got {other:?}"),
    }
    assert_eq!(ns.ok(&["nft", "list", "ruleset"]), "");
}

/// A batch far beyond the socket's default send buffer still goes in one `send`.
#[test]
fn large_batch_is_applied() {
    if !ready("large_batch_is_applied") {
        return;
    }
    let mut ops = vec![
        Op::AddTable("t".into()),
        Op::AddChain(Chain {
            table: "t".into(),
            name: "c".into(),
            base: None,
        }),
    ];
    ops.extend((1..=3000u16).map(|p| {
        rule(
            "c",
            vec![
                ports(L4::Tcp, Dir::Dst, false, &[(p, p)]),
                Stmt::Counter,
                Stmt::Verdict(Verdict::Return),
            ],
        )
    }));
    let tx = Transaction { ops };
    let size = nftables::encode(&tx).unwrap().bytes().len();
    assert!(size > 256 * 1024, "only {size} bytes");
    let ns = Netns::new("nftlarge");
    apply_in(&ns, &tx).expect("a large batch");
    let listed = listing(&ns);
    assert_eq!(
        listed.matches("counter packets N bytes N return").count(),
        3000
    );
    assert!(listed.contains("tcp dport 3000 counter"), "{listed}");

    // Without its chain every rule is refused: the first refusal is reported, nothing applied.
    let mut orphans = tx.clone();
    orphans.ops[0] = Op::AddTable("u".into());
    orphans.ops.remove(1);
    for op in &mut orphans.ops[1..] {
        if let Op::AddRule(r) = op {
            r.table = "u".into();
        }
    }
    let fresh = Netns::new("nftlarge2");
    match apply_in(&fresh, &orphans) {
        Err(ApplyError::Refused(r)) => {
            assert_eq!(
                (r.op, r.errno),
                (Some(1), nix::errno::Errno::ENOENT),
                "{r:?}"
            );
            assert!(r.others > 0, "{r:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(fresh.ok(&["nft", "list", "ruleset"]), "");
}
