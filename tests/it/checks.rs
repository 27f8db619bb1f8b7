//! Invariants of rendered rulesets and values, shared by the property tests
//! (`properties.rs`) and the fuzz targets (`fuzz/src/lib.rs` includes this file), so that both
//! check against one independent grammar of the iptables options Istio uses.
//!
//! Pure. Depends only on the `istio_init` library.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::{Debug, Display};
use std::str::FromStr;

use istio_init::capture::{Ruleset, Table, chain};
use istio_init::net::{Cidr, Family, Group, Id, Iface, PortItem};

/// The built-in chains of each table.
pub fn builtin(table: Table, name: &str) -> bool {
    let chains: &[&str] = match table {
        Table::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        Table::Mangle => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
        Table::Raw => &["PREROUTING", "OUTPUT"],
    };
    chains.contains(&name)
}

/// A value token: non-empty, never an option, only characters that are inert in the restore
/// format.
pub fn check_token(tok: &str) -> Result<(), String> {
    let ok = !tok.is_empty()
        && !tok.starts_with('-')
        && tok
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:/+$,-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("unsafe value token {tok:?}"))
    }
}

/// Re-parses one rendered rule under an independent grammar of the options Istio uses:
/// every option takes exactly its arguments, values parse back into their types, and the
/// target is last; addresses must be of the ruleset's family.
pub fn parse_rule(line: &str, family: Family) -> Result<(), String> {
    let mut toks = line.split(' ');
    let mut next = |what: &str| toks.next().ok_or_else(|| format!("missing {what}"));
    let verb = next("verb")?;
    let chain = next("chain")?;
    if !chain.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
        return Err(format!("bad chain {chain:?}"));
    }
    match verb {
        "-A" => {}
        "-I" => {
            next("position")?
                .parse::<u32>()
                .map_err(|e| format!("position: {e}"))?;
        }
        v => return Err(format!("bad verb {v:?}")),
    }
    let addr = |tok: &str| -> Result<(), String> {
        check_token(tok)?;
        let c: Cidr = tok.parse()?;
        if c.family() != family {
            return Err(format!("{tok} in {family} rules"));
        }
        Ok(())
    };
    let mut negated = false;
    loop {
        let opt = next("option")?;
        if opt == "!" {
            if negated {
                return Err("double negation".into());
            }
            negated = true;
            continue;
        }
        let neg = std::mem::take(&mut negated);
        match opt {
            "-p" => {
                let p = next("protocol")?;
                if p != "tcp" && p != "udp" {
                    return Err(format!("protocol {p:?}"));
                }
            }
            "-i" | "-o" => {
                let i = next("interface")?;
                check_token(i)?;
                i.parse::<Iface>()?;
            }
            "-s" | "-d" => addr(next("address")?)?,
            "--dport" | "--sport" => {
                let p = next("port")?;
                check_token(p)?;
                p.parse::<PortItem>()?;
            }
            "-m" => {
                let m = next("match")?;
                if !["multiport", "owner", "conntrack", "mark", "connmark"].contains(&m) {
                    return Err(format!("match {m:?}"));
                }
            }
            "--dports" => {
                let ps = next("ports")?;
                check_token(ps)?;
                let items: Vec<PortItem> =
                    ps.split(',').map(str::parse).collect::<Result<_, _>>()?;
                let weight: usize = items
                    .iter()
                    .map(|p| {
                        if matches!(p, PortItem::Range(..)) {
                            2
                        } else {
                            1
                        }
                    })
                    .sum();
                if weight > 15 {
                    return Err(format!("multiport list {ps} over the 15-port cap"));
                }
            }
            "--uid-owner" => {
                let u = next("uid")?;
                check_token(u)?;
                u.parse::<Id>()?;
            }
            "--gid-owner" => {
                let g = next("gid")?;
                check_token(g)?;
                g.parse::<Group>()?;
            }
            "--ctstate" => {
                let s = next("states")?;
                if !s
                    .split(',')
                    .all(|s| ["INVALID", "NEW", "RELATED", "ESTABLISHED"].contains(&s))
                {
                    return Err(format!("ctstate {s:?}"));
                }
            }
            "--mark" => {
                next("mark")?
                    .parse::<u32>()
                    .map_err(|e| format!("mark: {e}"))?;
            }
            "-j" => {
                if neg {
                    return Err("negated target".into());
                }
                let target = next("target")?;
                let rest: Vec<&str> = toks.by_ref().collect();
                let num = |t: &str| t.parse::<u32>().is_ok();
                let ok = match (target, rest.as_slice()) {
                    ("RETURN" | "ACCEPT" | "DROP", []) => true,
                    ("REDIRECT", ["--to-ports" | "--to-port", p]) => p.parse::<PortItem>().is_ok(),
                    ("TPROXY", ["--tproxy-mark", m, "--on-port", p]) => {
                        m.strip_suffix("/0xffffffff").is_some_and(num)
                            && p.parse::<PortItem>().is_ok()
                    }
                    ("MARK", ["--set-mark", m]) => num(m),
                    ("CONNMARK", ["--save-mark" | "--restore-mark"]) => true,
                    ("CT", ["--zone", z]) => z.parse::<u16>().is_ok(),
                    (c, []) => c.starts_with("ISTIO_") && chain::ISTIO_CHAINS.contains(&c),
                    _ => false,
                };
                return if ok {
                    Ok(())
                } else {
                    Err(format!("bad target {target} {rest:?}"))
                };
            }
            o => return Err(format!("unknown option {o:?}")),
        }
        if neg
            && ![
                "-d",
                "--dport",
                "--dports",
                "--uid-owner",
                "--gid-owner",
                "--mark",
            ]
            .contains(&opt)
        {
            return Err(format!("{opt} cannot be negated here"));
        }
    }
}

/// Every pure property of one ruleset.
pub fn check_ruleset(rs: &Ruleset, text: &str) -> Result<(), String> {
    let mut tables = Vec::new();
    for t in &rs.tables {
        if tables.contains(&t.table) {
            return Err(format!("table {} twice", t.table.name()));
        }
        tables.push(t.table);
        let mut declared: Vec<&str> = Vec::new();
        for c in &t.new_chains {
            if declared.contains(c) {
                return Err(format!("{c} declared twice in {}", t.table.name()));
            }
            if builtin(t.table, c) {
                return Err(format!("built-in {c} declared"));
            }
            declared.push(c);
        }
        let exists = |c: &str| builtin(t.table, c) || declared.contains(&c);
        // Inserts: positions within 1..=len+1 of the chain at that moment.
        let mut lens: BTreeMap<&str, u32> = BTreeMap::new();
        for r in &t.rules {
            if r.table != t.table {
                return Err(format!("rule of {} in {}", r.table.name(), t.table.name()));
            }
            if !exists(r.chain) {
                return Err(format!(
                    "rule in undeclared {} ({})",
                    r.chain,
                    t.table.name()
                ));
            }
            if let Some(to) = r.target.jump_chain() {
                if !exists(to) {
                    return Err(format!("jump to missing {to} in {}", t.table.name()));
                }
            }
            let len = lens.entry(r.chain).or_default();
            if let Some(n) = r.insert_at {
                if n == 0 || n > *len + 1 {
                    return Err(format!("-I {} {n} with {} rules", r.chain, len));
                }
            }
            *len += 1;
            parse_rule(
                &istio_init::backend::iptables::render::rule_line(r),
                rs.family,
            )
            .map_err(|e| {
                format!(
                    "{e} in: {}",
                    istio_init::backend::iptables::render::rule_line(r)
                )
            })?;
        }
    }
    // The text is exactly the headers, declarations and rules (nothing smuggled in between).
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        let ok = line == "COMMIT"
            || line.starts_with("* ")
            || line.starts_with("-N ISTIO_")
            || line.starts_with("-A ")
            || line.starts_with("-I ");
        if !ok || line.chars().any(|c| c.is_control()) {
            return Err(format!("unexpected line {line:?}"));
        }
    }
    let want = rs.rule_count() + rs.chain_count() + 2 * rs.tables.len();
    if lines != want {
        return Err(format!("{lines} lines, expected {want}"));
    }
    Ok(())
}

/// An error message is one non-empty line without control characters.
pub fn check_one_line(msg: &str) -> Result<(), String> {
    if msg.is_empty() || msg.chars().any(char::is_control) {
        return Err(format!("not one clean line: {msg:?}"));
    }
    Ok(())
}

/// Parses `s` as `T`. Accepted: renders as a safe token that parses back to the same value.
/// Refused: the reason is one line.
pub fn check_value<T>(s: &str) -> Result<(), String>
where
    T: FromStr<Err = istio_init::net::Reason> + Display + PartialEq + Debug,
{
    match s.parse::<T>() {
        Ok(v) => {
            let shown = v.to_string();
            check_token(&shown)?;
            match shown.parse::<T>() {
                Ok(back) if back == v => Ok(()),
                other => Err(format!(
                    "{s:?} renders as {shown:?}, which parses as {other:?}"
                )),
            }
        }
        Err(reason) => check_one_line(&reason),
    }
}
