//! Live netfilter state as `iptables-save` prints it, how it compares with a [`Ruleset`], and the
//! `iptables-restore` texts that change it: rollback, scratch canonicalisation, reconcile and
//! cleanup, and the texts that put back what a reconcile or a cleanup replaced.
//!
//! Pure: parsing and text generation only; `apply.rs` runs the programs.
//!
//! # Comparing "identical"
//!
//! `iptables-save` normalises rules: it adds `-m tcp`, reorders `-s`/`-o`, prints marks in hex,
//! widens `127.0.0.1/8` to `127.0.0.0/8`, writes `--to-ports` for `--to-port`, and the exact
//! spelling differs between versions and backends. Rather than re-implement that normalisation
//! (and chase it across iptables releases), istio-init lets iptables canonicalise the expected
//! rules itself: the expected ruleset is loaded into *scratch chains* named
//! `ii-<pid>.<chain>` ([`Scratch`]) in the same table (built-in chains included, as
//! unreferenced user chains, so they never see a packet), one `*-save` then prints live and
//! scratch chains in the same canonical form, and the scratch chains are deleted again. The
//! process id in the name keeps two concurrent runs from touching each other's scratch
//! chains. The comparison is then a plain
//! string comparison. This only happens on the re-run path (a fresh namespace never gets here),
//! and in `--cleanup-only`.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::render;
use crate::capture::{Ruleset, Table, chain};

/// Prefix of every scratch chain used for canonicalisation. Not `ISTIO_`, so a leftover scratch
/// chain is never mistaken for a live Istio chain; cleanup removes leftovers too.
pub const SCRATCH_PREFIX: &str = "ii-";

/// The scratch chain names of one process: `ii-<pid in base 36>.<chain>`, at most 26
/// characters for the longest chain name (iptables allows 28).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scratch {
    prefix: String,
}

impl Scratch {
    pub fn for_process(pid: u32) -> Scratch {
        const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut n = pid;
        let mut id = Vec::new();
        loop {
            id.push(DIGITS[(n % 36) as usize]);
            n /= 36;
            if n == 0 {
                break;
            }
        }
        id.reverse();
        Scratch {
            prefix: format!("{SCRATCH_PREFIX}{}.", String::from_utf8_lossy(&id)),
        }
    }

    fn name(&self, chain: &str) -> String {
        format!("{}{chain}", self.prefix)
    }

    /// Whether `chain` is one of this process's scratch chains.
    pub fn owns(&self, chain: &str) -> bool {
        chain.starts_with(&self.prefix)
    }
}

/// Whether a chain is one of Istio's (istio-init owns every `ISTIO_*` chain, as istio-iptables
/// does).
pub fn is_istio_chain(name: &str) -> bool {
    name.starts_with("ISTIO_")
}

/// Whether a chain is a scratch chain of any istio-init run.
pub fn is_scratch_chain(name: &str) -> bool {
    name.strip_prefix(SCRATCH_PREFIX)
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(id, _)| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// One chain as saved: its name, whether it is a built-in chain (it has a policy), and its
/// rules as the text after `-A CHAIN `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedChain {
    pub name: String,
    pub builtin: bool,
    pub rules: Vec<String>,
}

/// One table as saved, chains in save order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    pub chains: Vec<SavedChain>,
}

impl SavedTable {
    pub fn chain(&self, name: &str) -> Option<&SavedChain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// The Istio chains of this table.
    pub fn istio_chains(&self) -> impl Iterator<Item = &SavedChain> {
        self.chains.iter().filter(|c| is_istio_chain(&c.name))
    }

    /// Rules outside Istio and scratch chains that jump to an Istio chain, as
    /// `(chain, rule)`.
    pub fn jumps_to_istio(&self) -> Vec<(&str, &str)> {
        let mut out = Vec::new();
        for c in &self.chains {
            if is_istio_chain(&c.name) || is_scratch_chain(&c.name) {
                continue;
            }
            for r in &c.rules {
                if jump_target(r).is_some_and(is_istio_chain) {
                    out.push((c.name.as_str(), r.as_str()));
                }
            }
        }
        out
    }

    /// Whether the table holds anything of istio-init's: an Istio chain, a jump to one, or a
    /// scratch chain.
    pub fn has_ours(&self) -> bool {
        self.has_istio_rules() || self.chains.iter().any(|c| is_scratch_chain(&c.name))
    }

    /// Whether the table holds Istio rules: an Istio chain, a jump to one, or an Istio-shaped
    /// rule in a built-in chain (scratch chains do not count).
    pub fn has_istio_rules(&self) -> bool {
        self.chains.iter().any(|c| {
            is_istio_chain(&c.name)
                || (c.builtin
                    && c.rules
                        .iter()
                        .any(|r| is_istio_shaped(&self.name, &c.name, r)))
        }) || !self.jumps_to_istio().is_empty()
    }
}

/// The state of one family in one backend, as `iptables-save` printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    pub tables: Vec<SavedTable>,
}

impl Saved {
    pub fn table(&self, name: &str) -> Option<&SavedTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Whether any table holds an Istio chain.
    pub fn has_istio_chains(&self) -> bool {
        self.tables
            .iter()
            .any(|t| t.istio_chains().next().is_some())
    }

    /// Number of rules in all chains.
    pub fn rule_count(&self) -> usize {
        self.tables
            .iter()
            .flat_map(|t| &t.chains)
            .map(|c| c.rules.len())
            .sum()
    }

    /// Names of the tables that hold at least one rule or user chain.
    pub fn non_empty_tables(&self) -> Vec<&str> {
        self.tables
            .iter()
            .filter(|t| t.chains.iter().any(|c| !c.builtin || !c.rules.is_empty()))
            .map(|t| t.name.as_str())
            .collect()
    }
}

/// Parses `iptables-save` output. Unknown lines are ignored; rules of undeclared chains are
/// still recorded (as user chains).
pub fn parse_save(text: &str) -> Saved {
    let mut saved = Saved::default();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            saved.tables.push(SavedTable {
                name: name.trim().to_owned(),
                chains: Vec::new(),
            });
            continue;
        }
        let Some(table) = saved.tables.last_mut() else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            let mut words = decl.split_whitespace();
            let (Some(name), policy) = (words.next(), words.next()) else {
                continue;
            };
            if table.chain(name).is_none() {
                table.chains.push(SavedChain {
                    name: name.to_owned(),
                    builtin: policy.is_some_and(|p| p != "-"),
                    rules: Vec::new(),
                });
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (name, rule) = rest.split_once(' ').unwrap_or((rest, ""));
            let idx = match table.chains.iter().position(|c| c.name == name) {
                Some(i) => i,
                None => {
                    table.chains.push(SavedChain {
                        name: name.to_owned(),
                        builtin: chain::is_builtin(name),
                        rules: Vec::new(),
                    });
                    table.chains.len() - 1
                }
            };
            table.chains[idx].rules.push(rule.trim().to_owned());
        }
    }
    saved
}

/// The chain a saved rule jumps or goes to (`-j X` / `-g X`), if any.
pub fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" {
            return words.next();
        }
    }
    None
}

/// Whether a saved rule in a built-in chain has the shape of a rule istio-iptables puts there
/// without jumping to an Istio chain: interface exclusions (`-i X -j RETURN` in PREROUTING,
/// `-o X -j RETURN` in OUTPUT, nat and mangle) and the TPROXY mark plumbing in mangle
/// (`CONNMARK --save-mark`/`--restore-mark` on a mark, `MARK` of the proxy's own traffic, the
/// `-o lo … --mark … -j RETURN`). Such rules left by another configuration would silently
/// change what is captured, so reconcile and cleanup remove them and the comparison counts
/// them as drift. A foreign rule of exactly this shape cannot be told apart.
pub fn is_istio_shaped(table: &str, chain: &str, rule: &str) -> bool {
    let w: Vec<&str> = rule.split_whitespace().collect();
    let has = |s: &str| w.contains(&s);
    let nat_or_mangle = table == "nat" || table == "mangle";
    match chain {
        "PREROUTING" if nat_or_mangle && matches!(w[..], ["-i", _, "-j", "RETURN"]) => true,
        "OUTPUT" if nat_or_mangle && matches!(w[..], ["-o", _, "-j", "RETURN"]) => true,
        "PREROUTING" if table == "mangle" => {
            has("CONNMARK") && has("--save-mark") && has("mark") && has("tcp")
        }
        "OUTPUT" if table == "mangle" => {
            (has("CONNMARK") && has("--restore-mark") && has("connmark"))
                || (has("MARK") && has("owner") && has("lo"))
                || (w.starts_with(&["-o", "lo", "-p", "tcp", "-m", "mark", "--mark"])
                    && w.ends_with(&["-j", "RETURN"]))
        }
        _ => false,
    }
}

/// Loads the expected ruleset into scratch chains (create-or-flush, so a leftover from an
/// interrupted run is reused): every chain `C` it uses becomes `ii-t.C`, jumps renamed
/// accordingly, inserts applied to the (empty) scratch chain. Only tables in `only` are
/// included when it is given (to avoid instantiating tables that do not exist yet).
pub fn scratch_text(rs: &Ruleset, only: Option<&[&str]>, scratch: &Scratch) -> String {
    let scratch_name = |c: &str| scratch.name(c);
    let mut out = String::new();
    for t in &rs.tables {
        if only.is_some_and(|o| !o.contains(&t.table.name())) {
            continue;
        }
        let _ = writeln!(out, "*{}", t.table.name());
        for c in crate::capture::chains_used(&t.rules) {
            let _ = writeln!(out, ":{} - [0:0]", scratch_name(c));
        }
        for r in &t.rules {
            let _ = writeln!(out, "{}", render::rule_line_renamed(r, &scratch_name));
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The expected rules of one table in iptables' canonical form, read back from the scratch
/// chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CanonTable {
    /// The Istio chains the ruleset declares, with their rules in kernel order.
    pub chains: BTreeMap<String, Vec<String>>,
    /// The rules the ruleset puts into built-in chains, in kernel order (as if the chain was
    /// empty before).
    pub builtin: BTreeMap<String, Vec<String>>,
}

/// Canonical expected rules per table name.
pub type Canon = BTreeMap<String, CanonTable>;

/// Extracts the canonical expected rules from a save that includes the scratch chains loaded
/// by [`scratch_text`] for `rs`.
pub fn canon_from_scratch(saved: &Saved, rs: &Ruleset, scratch: &Scratch) -> Canon {
    let mut canon = Canon::new();
    for t in &rs.tables {
        let Some(st) = saved.table(t.table.name()) else {
            continue;
        };
        let mut ct = CanonTable::default();
        for c in crate::capture::chains_used(&t.rules) {
            let rules: Vec<String> = st
                .chain(&scratch.name(c))
                .map(|sc| sc.rules.iter().map(|r| unscratch(r, scratch)).collect())
                .unwrap_or_default();
            if chain::is_builtin(c) {
                ct.builtin.insert(c.to_owned(), rules);
            } else {
                ct.chains.insert(c.to_owned(), rules);
            }
        }
        canon.insert(t.table.name().to_owned(), ct);
    }
    canon
}

/// Renames scratch jump targets in a saved rule back to the real chain names.
fn unscratch(rule: &str, scratch: &Scratch) -> String {
    let words: Vec<&str> = rule.split(' ').collect();
    let mut out: Vec<&str> = Vec::with_capacity(words.len());
    let mut after_jump = false;
    for w in words {
        if after_jump {
            out.push(w.strip_prefix(scratch.prefix.as_str()).unwrap_or(w));
        } else {
            out.push(w);
        }
        after_jump = w == "-j" || w == "-g";
    }
    out.join(" ")
}

/// How one table's live state relates to the expected ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableState {
    /// None of our chains or jumps is there.
    Absent,
    /// Exactly the expected chains and rules (foreign rules in built-in chains are ignored).
    Identical,
    /// Something else: the reasons, one line each.
    Different(Vec<String>),
}

/// How a whole family's live state relates to the expected ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every table is already in place.
    Identical,
    /// Some tables are in place and the others absent (an interrupted apply of this same
    /// configuration): applying the absent ones completes it.
    Incomplete(Vec<Table>),
    /// Drift or a different configuration: the reasons.
    Different(Vec<String>),
}

fn quote_rule(chain: &str, rule: &str) -> String {
    format!("`-A {chain} {rule}`")
}

/// Compares one table. `live` is `None` when the table does not exist at all.
pub fn compare_table(expected: &CanonTable, live: Option<&SavedTable>, table: &str) -> TableState {
    let Some(live) = live else {
        return TableState::Absent;
    };
    if !live.has_istio_rules() {
        return TableState::Absent;
    }
    let mut why = Vec::new();
    for (name, want) in &expected.chains {
        match live.chain(name) {
            None => why.push(format!("{table}: chain {name} is missing")),
            Some(c) if &c.rules != want => {
                why.push(describe_chain_diff(table, name, &c.rules, want))
            }
            Some(_) => {}
        }
    }
    for c in live.istio_chains() {
        if !expected.chains.contains_key(&c.name) {
            why.push(format!(
                "{table}: chain {} is not part of this configuration ({} rules)",
                c.name,
                c.rules.len()
            ));
        }
    }
    let mut builtin: Vec<&str> = expected.builtin.keys().map(String::as_str).collect();
    for c in live.chains.iter().filter(|c| c.builtin) {
        if !builtin.contains(&c.name.as_str()) {
            builtin.push(&c.name);
        }
    }
    let empty = Vec::new();
    for name in builtin {
        let want = expected.builtin.get(name).unwrap_or(&empty);
        let got = ours_in_builtin(live.chain(name).map_or(&[][..], |c| &c.rules), want, |r| {
            is_istio_shaped(table, name, r)
        });
        if !got.iter().copied().eq(want.iter()) {
            why.push(format!(
                "{table}: built-in chain {name} holds the Istio rules [{}], expected [{}]",
                got.iter()
                    .map(|r| quote_rule(name, r))
                    .collect::<Vec<_>>()
                    .join(", "),
                want.iter()
                    .map(|r| quote_rule(name, r))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if why.is_empty() {
        TableState::Identical
    } else {
        TableState::Different(why)
    }
}

/// The rules of a live built-in chain that are ours: every jump to an Istio chain, rules
/// equal to an expected one (each expected rule claims at most as many live rules as it
/// occurs in `want`), and Istio-shaped rules. Order preserved.
fn ours_in_builtin<'a>(
    live: &'a [String],
    want: &[String],
    shaped: impl Fn(&str) -> bool,
) -> Vec<&'a String> {
    let mut budget: BTreeMap<&str, usize> = BTreeMap::new();
    for w in want {
        *budget.entry(w.as_str()).or_default() += 1;
    }
    let mut out = Vec::new();
    for r in live {
        if let Some(n) = budget.get_mut(r.as_str()).filter(|n| **n > 0) {
            *n -= 1;
            out.push(r);
        } else if jump_target(r).is_some_and(is_istio_chain) || shaped(r) {
            out.push(r);
        }
    }
    out
}

fn describe_chain_diff(table: &str, name: &str, got: &[String], want: &[String]) -> String {
    let first = got.iter().zip(want).position(|(g, w)| g != w);
    match first {
        Some(i) => format!(
            "{table}: chain {name} rule {} is {}, expected {}",
            i + 1,
            quote_rule(name, &got[i]),
            quote_rule(name, &want[i])
        ),
        None => format!(
            "{table}: chain {name} has {} rules, expected {}",
            got.len(),
            want.len()
        ),
    }
}

/// Compares a family's live state with the canonical expected rules.
pub fn compare(rs: &Ruleset, canon: &Canon, live: &Saved) -> Verdict {
    let mut absent = Vec::new();
    let mut identical = 0;
    let mut why = Vec::new();
    let empty = CanonTable::default();
    for t in &rs.tables {
        let name = t.table.name();
        let expected = canon.get(name).unwrap_or(&empty);
        match compare_table(expected, live.table(name), name) {
            TableState::Absent => absent.push(t.table),
            TableState::Identical => identical += 1,
            TableState::Different(w) => why.extend(w),
        }
    }
    for lt in &live.tables {
        let expected = rs.tables.iter().any(|t| t.table.name() == lt.name);
        if !expected && lt.has_istio_rules() {
            let chains: Vec<&str> = lt.istio_chains().map(|c| c.name.as_str()).collect();
            why.push(format!(
                "{}: holds Istio rules (chains [{}]) that this configuration does not use",
                lt.name,
                chains.join(", ")
            ));
        }
    }
    if !why.is_empty() {
        Verdict::Different(why)
    } else if absent.is_empty() {
        let _ = identical;
        Verdict::Identical
    } else {
        Verdict::Incomplete(absent)
    }
}

/// The tables of a ruleset that are in `tables`, as a ruleset of their own.
pub fn subset(rs: &Ruleset, tables: &[Table]) -> Ruleset {
    Ruleset {
        family: rs.family,
        tables: rs
            .tables
            .iter()
            .filter(|t| tables.contains(&t.table))
            .cloned()
            .collect(),
    }
}

/// Undoes a fresh, fully committed apply of the given tables of `rs`: deletes the rules it
/// added to built-in chains (newest first), then flushes and deletes the chains it created.
/// Each table is one transaction; if the table had not been committed its `-F` of a missing
/// chain fails and the table is left untouched.
pub fn undo_text(rs: &Ruleset, tables: &[Table]) -> String {
    let mut out = String::new();
    for t in rs.tables.iter().filter(|t| tables.contains(&t.table)) {
        let _ = writeln!(out, "*{}", t.table.name());
        for r in t.rules.iter().rev().filter(|r| chain::is_builtin(r.chain)) {
            let _ = writeln!(out, "-D {} {}", r.chain, render::spec(r));
        }
        for c in &t.new_chains {
            let _ = writeln!(out, "-F {c}");
        }
        for c in &t.new_chains {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Deletes this process's scratch chains found in `live`.
pub fn scratch_delete_text(live: &Saved, scratch: &Scratch) -> String {
    let mut out = String::new();
    for t in &live.tables {
        let mine: Vec<&str> = t
            .chains
            .iter()
            .filter(|c| scratch.owns(&c.name))
            .map(|c| c.name.as_str())
            .collect();
        if mine.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{}", t.name);
        flush_and_delete(&mut out, &mine);
        out.push_str("COMMIT\n");
    }
    out
}

fn flush_and_delete(out: &mut String, chains: &[&str]) {
    for c in chains {
        let _ = writeln!(out, "-F {c}");
    }
    for c in chains {
        let _ = writeln!(out, "-X {c}");
    }
}

/// Deletes our rules from built-in chains, except jumps to Istio chains (handled
/// separately): see [`ours_in_builtin_positions`].
fn delete_ours_builtin(out: &mut String, live: &SavedTable, expected: Option<&CanonTable>) {
    for (chain, i) in ours_in_builtin_positions(live, expected) {
        if let Some(r) = live.chain(chain).and_then(|c| c.rules.get(i)) {
            let _ = writeln!(out, "-D {chain} {r}");
        }
    }
}

/// Our rules in built-in chains other than jumps to Istio chains, as `(chain, index)`: live
/// rules equal to an expected (canonical) one, at most as many as expected (the first ones,
/// which are those `-D CHAIN RULE` deletes), and every Istio-shaped rule (see
/// [`is_istio_shaped`]).
fn ours_in_builtin_positions<'a>(
    live: &'a SavedTable,
    expected: Option<&CanonTable>,
) -> Vec<(&'a str, usize)> {
    let mut out = Vec::new();
    for lc in live.chains.iter().filter(|c| c.builtin) {
        let mut budget: BTreeMap<&str, usize> = BTreeMap::new();
        if let Some(want) = expected.and_then(|e| e.builtin.get(&lc.name)) {
            for w in want {
                *budget.entry(w.as_str()).or_default() += 1;
            }
        }
        for (i, r) in lc.rules.iter().enumerate() {
            if jump_target(r).is_some_and(is_istio_chain) {
                continue;
            }
            let expected = budget
                .get_mut(r.as_str())
                .filter(|n| **n > 0)
                .map(|n| *n -= 1);
            if expected.is_some() || is_istio_shaped(&live.name, &lc.name, r) {
                out.push((lc.name.as_str(), i));
            }
        }
    }
    out
}

/// Converges the live state of one family to `rs` in one `iptables-restore --noflush` run,
/// one transaction per table, so that no packet ever sees a state without the proxy's rules:
/// expected chains are created or flushed in place with `:CHAIN - [0:0]` (jumps to them stay
/// valid), our old rules in built-in chains are deleted and the expected ones added in the
/// same transaction, chains of another configuration are flushed and deleted, scratch chains
/// removed.
pub fn converge_text(rs: &Ruleset, canon: &Canon, live: &Saved, scratch: &Scratch) -> String {
    let mut out = String::new();
    for name in converged_tables(rs, live) {
        let want = rs.tables.iter().find(|t| t.table.name() == name);
        let lt = live.table(name);
        let _ = writeln!(out, "*{name}");
        if let Some(t) = want {
            for c in &t.new_chains {
                let _ = writeln!(out, ":{c} - [0:0]");
            }
        }
        if let Some(lt) = lt {
            let keep = |c: &str| want.is_some_and(|t| t.new_chains.contains(&c));
            for (chain, rule) in lt.jumps_to_istio() {
                let target = jump_target(rule).unwrap_or_default();
                // Built-in chains: every jump goes and the expected ones come back below.
                // Foreign user chains: only jumps to chains that are going away.
                let builtin = lt.chain(chain).is_some_and(|c| c.builtin);
                if builtin || !keep(target) {
                    let _ = writeln!(out, "-D {chain} {rule}");
                }
            }
            delete_ours_builtin(&mut out, lt, canon.get(name));
            let stale: Vec<&str> = lt
                .chains
                .iter()
                .filter(|c| (is_istio_chain(&c.name) && !keep(&c.name)) || scratch.owns(&c.name))
                .map(|c| c.name.as_str())
                .collect();
            flush_and_delete(&mut out, &stale);
        }
        if let Some(t) = want {
            for r in &t.rules {
                let _ = writeln!(out, "{}", render::rule_line(r));
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The tables [`converge_text`] changes: those of `rs`, then the others holding Istio rules.
fn converged_tables<'a>(rs: &Ruleset, live: &'a Saved) -> Vec<&'a str> {
    let mut names: Vec<&str> = rs.tables.iter().map(|t| t.table.name()).collect();
    for lt in &live.tables {
        if lt.has_istio_rules() && !names.contains(&lt.name.as_str()) {
            names.push(&lt.name);
        }
    }
    names
}

/// What putting one table back as it was involves: the change being undone removed some
/// rules of `before` (by position) and some chains, and may have added rules to built-in
/// chains and created chains.
struct PutBack<'a> {
    table: &'a str,
    before: Option<&'a SavedTable>,
    /// `(chain, index in before)` of the rules the change deleted from chains it kept (built-in
    /// and foreign chains).
    removed: Vec<(&'a str, usize)>,
    /// The chains of `before` the change flushed or deleted: created again (or flushed) and
    /// refilled with their rules as saved.
    chains: Vec<&'a str>,
    /// `(chain, index now)` of the rules the change added to built-in chains.
    added: Vec<(&'a str, usize)>,
    /// The chains the change created.
    created: Vec<&'a str>,
}

impl PutBack<'_> {
    /// One transaction: declare (create or flush) the chains to refill, delete the added
    /// rules by number (highest first, so the numbers stay valid), flush and delete the
    /// created chains (nothing references them once the added rules and the refilled chains
    /// are empty), insert the removed rules at their old numbers (lowest first: the chain then
    /// holds exactly the rules it kept, in order, so each insert lands where the rule was),
    /// and refill the chains. Empty when there is nothing to do.
    fn write(&self, out: &mut String) {
        if self.removed.is_empty()
            && self.chains.is_empty()
            && self.added.is_empty()
            && self.created.is_empty()
        {
            return;
        }
        let rule = |chain: &str, i: usize| {
            self.before
                .and_then(|t| t.chain(chain))
                .and_then(|c| c.rules.get(i))
        };
        let _ = writeln!(out, "*{}", self.table);
        for c in &self.chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        let mut added = self.added.clone();
        added.sort_by(|a, b| a.0.cmp(b.0).then(b.1.cmp(&a.1)));
        for (chain, i) in added {
            let _ = writeln!(out, "-D {chain} {}", i + 1);
        }
        flush_and_delete(out, &self.created);
        let mut removed = self.removed.clone();
        removed.sort_unstable();
        removed.dedup();
        for (chain, i) in removed {
            if let Some(r) = rule(chain, i) {
                let _ = writeln!(out, "-I {chain} {} {r}", i + 1);
            }
        }
        for c in &self.chains {
            let saved = self.before.and_then(|t| t.chain(c));
            for r in saved.map_or(&[][..], |c| &c.rules) {
                let _ = writeln!(out, "-A {c} {r}");
            }
        }
        out.push_str("COMMIT\n");
    }
}

/// Puts back what [`converge_text`] with the same arguments changes, so that the namespace
/// holds exactly the rules of `live` again, without this process's scratch chains (they were
/// only loaded to canonicalise the expected rules, and the converge deleted them): no scratch
/// chain is declared or refilled here, and another run's leftovers, which the converge does
/// not touch, stay as they are.
///
/// Surgical rather than flush-and-re-add: foreign rules in built-in chains are never touched
/// (they keep their counters, and a rule `*-restore` could not read back is no obstacle).
/// The converge's edits are known exactly: in each built-in chain it deleted our old rules
/// (every jump to an Istio chain and [`ours_in_builtin_positions`], by text, which deletes
/// the first equal rule, i.e. exactly those positions) and then appended or inserted `rs`'s
/// rules; replaying those appends and inserts on the kept rules gives the position of each
/// rule it added, which are deleted by number, and the old ones are inserted again at their
/// old numbers. Foreign user chains lose only jumps to Istio chains that went away: inserted
/// again where they were. Every Istio chain `live` held is declared (created or flushed) and
/// refilled with its saved rules; the chains the converge created are flushed and deleted.
pub fn revert_text(rs: &Ruleset, canon: &Canon, live: &Saved) -> String {
    let mut out = String::new();
    for name in converged_tables(rs, live) {
        let want = rs.tables.iter().find(|t| t.table.name() == name);
        let before = live.table(name);
        let keep = |c: &str| want.is_some_and(|t| t.new_chains.contains(&c));
        let mut removed: Vec<(&str, usize)> = Vec::new();
        let mut chains = Vec::new();
        if let Some(lt) = before {
            for c in &lt.chains {
                if is_istio_chain(&c.name) {
                    chains.push(c.name.as_str());
                    continue;
                }
                if is_scratch_chain(&c.name) {
                    continue;
                }
                for (i, r) in c.rules.iter().enumerate() {
                    if jump_target(r).is_some_and(|t| is_istio_chain(t) && (c.builtin || !keep(t)))
                    {
                        removed.push((&c.name, i));
                    }
                }
            }
            removed.extend(ours_in_builtin_positions(lt, canon.get(name)));
        }
        let mut added = Vec::new();
        let mut created = Vec::new();
        if let Some(t) = want {
            created = (t.new_chains.iter().copied())
                .filter(|c| before.and_then(|lt| lt.chain(c)).is_none())
                .collect();
            // Replays the converge on each built-in chain: `true` marks a rule it added.
            let mut builtin: Vec<(&str, Vec<bool>)> = Vec::new();
            for r in t.rules.iter().filter(|r| chain::is_builtin(r.chain)) {
                let at = match builtin.iter().position(|(c, _)| *c == r.chain) {
                    Some(at) => at,
                    None => {
                        let kept = before.and_then(|lt| lt.chain(r.chain)).map_or(0, |c| {
                            let gone = removed.iter().filter(|(rc, _)| *rc == r.chain).count();
                            c.rules.len() - gone
                        });
                        builtin.push((r.chain, vec![false; kept]));
                        builtin.len() - 1
                    }
                };
                let rules = &mut builtin[at].1;
                match r.insert_at {
                    Some(n) => {
                        let i = (n as usize).saturating_sub(1).min(rules.len());
                        rules.insert(i, true);
                    }
                    None => rules.push(true),
                }
            }
            for (chain, rules) in builtin {
                added.extend(
                    (rules.iter().enumerate())
                        .filter(|(_, ours)| **ours)
                        .map(|(i, _)| (chain, i)),
                );
            }
        }
        PutBack {
            table: name,
            before,
            removed,
            chains,
            added,
            created,
        }
        .write(&mut out);
    }
    out
}

/// Puts back what [`cleanup_text`] with the same arguments removes: the rules it deleted, at
/// their old positions, and the chains it deleted with their rules, except this process's
/// scratch chains (loaded by the run itself to canonicalise its rules). Another run's
/// leftover scratch chains come back too: the namespace is exactly as it was.
pub fn cleanup_revert_text(live: &Saved, canon: &Canon, scratch: &Scratch) -> String {
    let mut out = String::new();
    for plan in cleanup_plan(live, canon) {
        let Some(lt) = live.table(&plan.table) else {
            continue;
        };
        PutBack {
            table: &lt.name,
            before: Some(lt),
            removed: (plan.rules.iter())
                .filter_map(|(c, i)| lt.chain(c).map(|c| (c.name.as_str(), *i)))
                .collect(),
            chains: (lt.chains.iter())
                .filter(|c| plan.chains.contains(&c.name) && !scratch.owns(&c.name))
                .map(|c| c.name.as_str())
                .collect(),
            added: Vec::new(),
            created: Vec::new(),
        }
        .write(&mut out);
    }
    out
}

/// The tables of a restore input named in `names`, in their order: a failed restore
/// committed the tables before the failing line ([`Layout::committed_before`]), and only
/// those are put back.
pub fn tables_only(text: &str, names: &[&str]) -> String {
    let mut out = String::new();
    let mut keep = false;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            keep = names.contains(&name.trim());
        }
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// What a cleanup removes from one table: rules by position, then chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCleanup {
    pub table: String,
    /// `(chain, index of the rule in the chain as saved)`, in the order a cleanup deletes
    /// them: every jump to an Istio chain, then our other rules in built-in chains.
    pub rules: Vec<(String, usize)>,
    /// The Istio and scratch chains, flushed (all of them) and then deleted.
    pub chains: Vec<String>,
}

/// Everything of istio-init's in one family's live state: every jump to an Istio chain, the
/// expected configuration's own rules in built-in chains (when known), every Istio chain and
/// every scratch chain. Foreign rules and chains are not in it. The one decision behind
/// [`cleanup_text`] and the nftables mode's `--reconcile`, which deletes the same rules by
/// their nf_tables handles.
pub fn cleanup_plan(live: &Saved, canon: &Canon) -> Vec<TableCleanup> {
    let mut out = Vec::new();
    for lt in live.tables.iter().filter(|t| t.has_ours()) {
        let mut rules = Vec::new();
        for c in &lt.chains {
            if is_istio_chain(&c.name) || is_scratch_chain(&c.name) {
                continue;
            }
            for (i, r) in c.rules.iter().enumerate() {
                if jump_target(r).is_some_and(is_istio_chain) {
                    rules.push((c.name.clone(), i));
                }
            }
        }
        for (chain, i) in ours_in_builtin_positions(lt, canon.get(&lt.name)) {
            rules.push((chain.to_owned(), i));
        }
        let chains = lt
            .chains
            .iter()
            .filter(|c| is_istio_chain(&c.name) || is_scratch_chain(&c.name))
            .map(|c| c.name.clone())
            .collect();
        out.push(TableCleanup {
            table: lt.name.clone(),
            rules,
            chains,
        });
    }
    out
}

/// Removes everything of istio-init's from one family's live state ([`cleanup_plan`]) in one
/// `iptables-restore --noflush` input. Foreign rules and chains are left alone. Empty when
/// there is nothing to remove.
pub fn cleanup_text(live: &Saved, canon: &Canon) -> String {
    let mut out = String::new();
    for plan in cleanup_plan(live, canon) {
        let Some(lt) = live.table(&plan.table) else {
            continue;
        };
        let _ = writeln!(out, "*{}", plan.table);
        for (chain, i) in &plan.rules {
            if let Some(rule) = lt.chain(chain).and_then(|c| c.rules.get(*i)) {
                let _ = writeln!(out, "-D {chain} {rule}");
            }
        }
        let chains: Vec<&str> = plan.chains.iter().map(String::as_str).collect();
        flush_and_delete(&mut out, &chains);
        out.push_str(
            "COMMIT
",
        );
    }
    out
}

/// Where each line of a restore text belongs: used to map iptables' `line N` back to the
/// table it was in and whether the tables before it were committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// For each table in order: its name and the 1-based line numbers of its header and its
    /// `COMMIT`.
    pub tables: Vec<(String, usize, usize)>,
}

impl Layout {
    pub fn of(text: &str) -> Layout {
        let mut tables = Vec::new();
        let mut open: Option<(String, usize)> = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if let Some(name) = line.strip_prefix('*') {
                open = Some((name.trim().to_owned(), n));
            } else if line.trim() == "COMMIT" {
                if let Some((name, start)) = open.take() {
                    tables.push((name, start, n));
                }
            }
        }
        Layout { tables }
    }

    /// The tables whose `COMMIT` comes before line `n`: iptables-restore committed them
    /// before it failed at line `n`.
    pub fn committed_before(&self, n: usize) -> Vec<&str> {
        self.tables
            .iter()
            .filter(|(_, _, commit)| *commit < n)
            .map(|(name, _, _)| name.as_str())
            .collect()
    }
}

/// The 1-based line number iptables-restore reports in its error output, in any of the forms
/// 1.8 uses: `line N failed`, `Error occurred at line: N`, `line N: RULE_APPEND failed`.
pub fn failed_line(stderr: &str) -> Option<usize> {
    for marker in ["line: ", "line "] {
        let mut rest = stderr;
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

/// Table by name.
pub fn table_named(name: &str) -> Option<Table> {
    Table::ALL.into_iter().find(|t| t.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::TableRules;
    use crate::capture::{Facts, build};
    use crate::net::Family;
    use crate::settings::cli::Defaults;
    use crate::settings::config::tests::resolve;

    fn sc() -> Scratch {
        Scratch {
            prefix: "ii-t.".into(),
        }
    }

    const LIVE: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Sun Nov 22 01:14:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FOREIGN - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
:ii-t.OUTPUT - [0:0]
:ii-t.ISTIO_OUTPUT - [0:0]
:ii-t.ISTIO_REDIRECT - [0:0]
-A OUTPUT -d 198.18.9.9/32 -j RETURN
-A OUTPUT -j ISTIO_OUTPUT
-A FOREIGN -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ii-t.OUTPUT -j ii-t.ISTIO_OUTPUT
-A ii-t.ISTIO_OUTPUT -j ii-t.ISTIO_REDIRECT
-A ii-t.ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

    fn tiny() -> Ruleset {
        use crate::capture::{Match, Proto, Rule, Target};
        let rule = |chain, matches, target| Rule {
            family: None,
            table: Table::Nat,
            chain,
            insert_at: None,
            matches,
            target,
        };
        Ruleset {
            family: Family::V4,
            tables: vec![TableRules {
                table: Table::Nat,
                new_chains: vec!["ISTIO_OUTPUT", "ISTIO_REDIRECT"],
                rules: vec![
                    rule("OUTPUT", vec![], Target::Jump("ISTIO_OUTPUT")),
                    rule("ISTIO_OUTPUT", vec![], Target::Jump("ISTIO_REDIRECT")),
                    rule(
                        "ISTIO_REDIRECT",
                        vec![Match::Proto(Proto::Tcp)],
                        Target::Redirect {
                            port: crate::net::Port::fixed(15001),
                            singular: false,
                        },
                    ),
                ],
            }],
        }
    }

    #[test]
    fn parses_save_output() {
        let s = parse_save(LIVE);
        let nat = s.table("nat").unwrap();
        assert!(nat.chain("OUTPUT").unwrap().builtin);
        assert!(!nat.chain("FOREIGN").unwrap().builtin);
        assert_eq!(
            nat.chain("OUTPUT").unwrap().rules,
            ["-d 198.18.9.9/32 -j RETURN", "-j ISTIO_OUTPUT"]
        );
        assert_eq!(
            nat.jumps_to_istio(),
            [
                ("OUTPUT", "-j ISTIO_OUTPUT"),
                ("FOREIGN", "-j ISTIO_OUTPUT")
            ]
        );
        assert!(s.has_istio_chains());
        assert_eq!(s.rule_count(), 8);
    }

    #[test]
    fn scratch_round_trip_gives_identical() {
        let rs = tiny();
        let text = scratch_text(&rs, None, &sc());
        assert_eq!(
            text,
            "*nat\n:ii-t.OUTPUT - [0:0]\n:ii-t.ISTIO_OUTPUT - [0:0]\n:ii-t.ISTIO_REDIRECT - [0:0]\n\
             -A ii-t.OUTPUT -j ii-t.ISTIO_OUTPUT\n-A ii-t.ISTIO_OUTPUT -j ii-t.ISTIO_REDIRECT\n\
             -A ii-t.ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"
        );
        let live = parse_save(LIVE);
        let canon = canon_from_scratch(&live, &rs, &sc());
        assert_eq!(canon["nat"].builtin["OUTPUT"], ["-j ISTIO_OUTPUT"]);
        assert_eq!(compare(&rs, &canon, &live), Verdict::Identical);
    }

    #[test]
    fn drift_is_described() {
        let rs = tiny();
        let live = parse_save(LIVE);
        let canon = canon_from_scratch(&live, &rs, &sc());
        let drifted = parse_save(&LIVE.replace(
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15009",
        ));
        let Verdict::Different(why) = compare(&rs, &canon, &drifted) else {
            panic!("not different");
        };
        assert_eq!(
            why,
            [
                "nat: chain ISTIO_REDIRECT rule 1 is `-A ISTIO_REDIRECT -p tcp -j REDIRECT \
              --to-ports 15009`, expected `-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001`"
            ]
        );
        // A duplicated jump is drift too.
        let dup = parse_save(&LIVE.replace(
            "-A OUTPUT -j ISTIO_OUTPUT\n",
            "-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j ISTIO_OUTPUT\n",
        ));
        assert!(matches!(compare(&rs, &canon, &dup), Verdict::Different(_)));
        // An extra Istio chain is drift.
        let extra = parse_save(&LIVE.replace(
            ":FOREIGN - [0:0]\n",
            ":FOREIGN - [0:0]\n:ISTIO_DROP - [0:0]\n",
        ));
        let Verdict::Different(why) = compare(&rs, &canon, &extra) else {
            panic!("not different");
        };
        assert!(why[0].contains("ISTIO_DROP is not part"), "{why:?}");
    }

    #[test]
    fn absent_tables_make_an_incomplete_state() {
        let cfg = resolve(Defaults::Native, &["-m", "TPROXY"], &[]).unwrap();
        let rs = build(&cfg, &Facts::default()).family(Family::V4);
        assert_eq!(rs.tables.len(), 2);
        let live = parse_save("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j RETURN\nCOMMIT\n");
        assert_eq!(
            compare(&rs, &Canon::new(), &live),
            Verdict::Incomplete(vec![Table::Mangle, Table::Nat])
        );
    }

    #[test]
    fn undo_deletes_builtin_rules_then_chains() {
        let rs = tiny();
        assert_eq!(
            undo_text(&rs, &[Table::Nat]),
            "*nat\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n-F ISTIO_REDIRECT\n\
             -X ISTIO_OUTPUT\n-X ISTIO_REDIRECT\nCOMMIT\n"
        );
        assert_eq!(undo_text(&rs, &[Table::Mangle]), "");
    }

    #[test]
    fn converge_flushes_in_place_and_keeps_foreign_rules() {
        let rs = tiny();
        let live = parse_save(&LIVE.replace(
            ":FOREIGN - [0:0]\n",
            ":FOREIGN - [0:0]\n:ISTIO_DROP - [0:0]\n",
        ));
        let canon = canon_from_scratch(&live, &rs, &sc());
        let text = converge_text(&rs, &canon, &live, &sc());
        assert_eq!(
            text,
            "*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n-D OUTPUT -j ISTIO_OUTPUT\n\
             -F ISTIO_DROP\n-F ii-t.OUTPUT\n-F ii-t.ISTIO_OUTPUT\n-F ii-t.ISTIO_REDIRECT\n\
             -X ISTIO_DROP\n-X ii-t.OUTPUT\n-X ii-t.ISTIO_OUTPUT\n-X ii-t.ISTIO_REDIRECT\n\
             -A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n\
             -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"
        );
    }

    /// `iptables-restore --noflush` of `text` on `state`, as the kernel does it for the
    /// commands the converge, cleanup and revert texts use; panics where iptables would fail.
    fn restore(state: &Saved, text: &str) -> Saved {
        let mut s = state.clone();
        let mut table = 0;
        let refs = |t: &SavedTable, name: &str| {
            t.chains
                .iter()
                .flat_map(|c| &c.rules)
                .any(|r| jump_target(r) == Some(name))
        };
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('*') {
                table = s
                    .tables
                    .iter()
                    .position(|t| t.name == name)
                    .unwrap_or_else(|| {
                        s.tables.push(SavedTable {
                            name: name.to_owned(),
                            chains: Vec::new(),
                        });
                        s.tables.len() - 1
                    });
                continue;
            }
            if line == "COMMIT" {
                continue;
            }
            let t = &mut s.tables[table];
            let chain_mut = |t: &mut SavedTable, name: &str| -> usize {
                t.chains
                    .iter()
                    .position(|c| c.name == name)
                    .unwrap_or_else(|| {
                        assert!(chain::is_builtin(name), "{line}: no chain {name}");
                        t.chains.push(SavedChain {
                            name: name.to_owned(),
                            builtin: true,
                            rules: Vec::new(),
                        });
                        t.chains.len() - 1
                    })
            };
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split(' ').next().unwrap();
                match t.chains.iter_mut().find(|c| c.name == name) {
                    Some(c) => c.rules.clear(),
                    None => t.chains.push(SavedChain {
                        name: name.to_owned(),
                        builtin: false,
                        rules: Vec::new(),
                    }),
                }
                continue;
            }
            let (cmd, rest) = line.split_at(3);
            let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            let c = chain_mut(t, name);
            let number = |a: &str| a.split(' ').next().unwrap().parse::<usize>().ok();
            match cmd {
                "-A " => t.chains[c].rules.push(arg.to_owned()),
                "-I " => {
                    let n = number(arg).unwrap();
                    let rule = arg.split_once(' ').unwrap().1;
                    assert!(n >= 1 && n <= t.chains[c].rules.len() + 1, "{line}");
                    t.chains[c].rules.insert(n - 1, rule.to_owned());
                }
                "-D " => {
                    let i = match number(arg).filter(|_| !arg.contains(' ')) {
                        Some(n) => n - 1,
                        None => t.chains[c].rules.iter().position(|r| r == arg).unwrap(),
                    };
                    assert!(i < t.chains[c].rules.len(), "{line}");
                    t.chains[c].rules.remove(i);
                }
                "-F " => t.chains[c].rules.clear(),
                "-X " => {
                    assert!(t.chains[c].rules.is_empty() && !refs(t, name), "{line}");
                    t.chains.remove(c);
                }
                _ => panic!("{line}"),
            }
        }
        s
    }

    /// `state` less chain order (user chains come back in another order), the given
    /// process's scratch chains and tables without rules or user chains (nf_tables keeps a
    /// table once it has been created).
    fn normal(state: &Saved, without: &Scratch) -> Saved {
        let mut s = state.clone();
        for t in &mut s.tables {
            t.chains.retain(|c| !without.owns(&c.name));
            t.chains.sort_by(|a, b| a.name.cmp(&b.name));
        }
        s.tables
            .retain(|t| t.chains.iter().any(|c| !c.builtin || !c.rules.is_empty()));
        s
    }

    /// Istio rules of another configuration among foreign ones: foreign rules before, between
    /// and after ours in built-in chains (where the new configuration inserts and appends), an
    /// Istio-shaped leftover, an Istio chain the new configuration does not use, a foreign
    /// chain jumping to it and to a kept one, this process's scratch chains and another run's.
    const BEFORE: &str = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FOREIGN - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_OLD - [0:0]
:ii-t.OUTPUT - [0:0]
:ii-t.ISTIO_OUTPUT - [0:0]
:ii-zz.ISTIO_OUTPUT - [0:0]
-A PREROUTING -s 198.18.1.1/32 -j RETURN
-A PREROUTING -i veth3 -j RETURN
-A PREROUTING -p udp -j ACCEPT
-A OUTPUT -d 198.18.9.9/32 -j RETURN
-A OUTPUT -j ISTIO_OUTPUT
-A OUTPUT -p udp -j ACCEPT
-A OUTPUT -o eth9 -j RETURN
-A OUTPUT -d 198.18.9.8/32 -j RETURN
-A FOREIGN -j ISTIO_OLD
-A FOREIGN -p udp -j ACCEPT
-A FOREIGN -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -j ISTIO_OLD
-A ISTIO_OLD -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15009
-A ii-t.OUTPUT -j ii-t.ISTIO_OUTPUT
-A ii-t.ISTIO_OUTPUT -j RETURN
-A ii-zz.ISTIO_OUTPUT -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
";

    #[test]
    fn revert_puts_back_exactly_what_the_converge_replaced() {
        // The new configuration inserts at PREROUTING 1 (`-k`), appends to OUTPUT and
        // PREROUTING, and adds mangle, which did not exist.
        let cfg = resolve(
            Defaults::Native,
            &["-m", "TPROXY", "-k", "veth7", "-c", "eth8"],
            &[],
        )
        .unwrap();
        let rs = build(&cfg, &Facts::default()).family(Family::V4);
        let live = parse_save(BEFORE);
        // The canonical form of `-p udp -j ACCEPT`, as if the configuration had it in OUTPUT:
        // the converge deletes the first live copy as ours, and the revert puts it back.
        let mut canon = canon_from_scratch(&live, &rs, &sc());
        canon
            .entry("nat".into())
            .or_default()
            .builtin
            .insert("OUTPUT".into(), vec!["-p udp -j ACCEPT".into()]);
        let converged = restore(&live, &converge_text(&rs, &canon, &live, &sc()));
        assert_ne!(normal(&converged, &sc()), normal(&live, &sc()));
        let reverted = restore(&converged, &revert_text(&rs, &canon, &live));
        assert_eq!(normal(&reverted, &sc()), normal(&live, &sc()));
        // Foreign rules were never deleted and added again.
        let text = revert_text(&rs, &canon, &live);
        for foreign in ["198.18.9.9", "198.18.9.8", "198.18.1.1", "dport 22"] {
            assert!(!text.contains(foreign), "{foreign} in\n{text}");
        }
        // Nor are scratch chains restored.
        assert!(!text.contains("ii-"), "{text}");
        // mangle did not exist: the revert empties it (nf_tables keeps the empty table).
        let mangle = reverted.table("mangle").unwrap();
        assert!(
            mangle
                .chains
                .iter()
                .all(|c| c.builtin && c.rules.is_empty())
        );
    }

    #[test]
    fn the_revert_of_a_converge_on_identical_rules_is_a_rewrite_in_place() {
        // --force-apply on identical rules: the converge and its revert both leave the rules
        // as they were.
        let rs = tiny();
        let live = parse_save(LIVE);
        let canon = canon_from_scratch(&live, &rs, &sc());
        let converged = restore(&live, &converge_text(&rs, &canon, &live, &sc()));
        let text = revert_text(&rs, &canon, &live);
        assert_eq!(
            text,
            "*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n-D OUTPUT 2\n\
             -I OUTPUT 2 -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n\
             -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"
        );
        assert_eq!(
            normal(&restore(&converged, &text), &sc()),
            normal(&live, &sc())
        );
    }

    #[test]
    fn the_revert_of_a_cleanup_puts_every_rule_and_chain_back_in_place() {
        let live = parse_save(BEFORE);
        let mut canon = Canon::new();
        canon
            .entry("nat".into())
            .or_default()
            .builtin
            .insert("OUTPUT".into(), vec!["-p udp -j ACCEPT".into()]);
        let cleaned = restore(&live, &cleanup_text(&live, &canon));
        assert!(cleaned.tables.iter().all(|t| !t.has_ours()));
        let text = cleanup_revert_text(&live, &canon, &sc());
        assert!(!text.contains("ii-t."), "{text}");
        let reverted = restore(&cleaned, &text);
        assert_eq!(normal(&reverted, &sc()), normal(&live, &sc()));
        assert_eq!(cleanup_revert_text(&Saved::default(), &canon, &sc()), "");
    }

    #[test]
    fn only_the_named_tables_of_a_restore_input() {
        let text = "*mangle\n-A X\nCOMMIT\n*nat\n-A Y\nCOMMIT\n*raw\n-A Z\nCOMMIT\n";
        assert_eq!(
            tables_only(text, &["raw", "mangle"]),
            "*mangle\n-A X\nCOMMIT\n*raw\n-A Z\nCOMMIT\n"
        );
        assert_eq!(tables_only(text, &[]), "");
    }

    #[test]
    fn cleanup_removes_only_ours() {
        let live = parse_save(LIVE);
        let text = cleanup_text(&live, &Canon::new());
        assert_eq!(
            text,
            "*nat\n-D OUTPUT -j ISTIO_OUTPUT\n-D FOREIGN -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n\
             -F ISTIO_REDIRECT\n-F ii-t.OUTPUT\n-F ii-t.ISTIO_OUTPUT\n-F ii-t.ISTIO_REDIRECT\n\
             -X ISTIO_OUTPUT\n-X ISTIO_REDIRECT\n-X ii-t.OUTPUT\n-X ii-t.ISTIO_OUTPUT\n\
             -X ii-t.ISTIO_REDIRECT\nCOMMIT\n"
        );
        assert_eq!(
            cleanup_text(
                &parse_save("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"),
                &Canon::new()
            ),
            ""
        );
    }

    #[test]
    fn the_cleanup_plan_names_rules_by_position_as_the_cleanup_text_deletes_them() {
        let live = parse_save(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n\
             :FOREIGN - [0:0]\n\
             -A PREROUTING -i eth9 -j RETURN\n\
             -A OUTPUT -d 198.18.7.7/32 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n\
             -A OUTPUT -p udp -j ACCEPT\n-A OUTPUT -d 198.18.7.7/32 -j RETURN\n\
             -A OUTPUT -p udp -j ACCEPT\n-A FOREIGN -j ISTIO_OUTPUT\n\
             -A ISTIO_OUTPUT -j RETURN\nCOMMIT\n\
             *filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n",
        );
        // The configuration's own `-p udp -j ACCEPT` in OUTPUT, once: the first of the two.
        let mut canon = Canon::new();
        canon
            .entry("nat".into())
            .or_default()
            .builtin
            .insert("OUTPUT".into(), vec!["-p udp -j ACCEPT".into()]);
        let plan = cleanup_plan(&live, &canon);
        let at = |c: &str, i| (c.to_owned(), i);
        assert_eq!(
            plan,
            [TableCleanup {
                table: "nat".into(),
                rules: vec![
                    at("OUTPUT", 1),
                    at("FOREIGN", 0),
                    at("PREROUTING", 0),
                    at("OUTPUT", 2)
                ],
                chains: vec!["ISTIO_OUTPUT".into()],
            }]
        );
        assert_eq!(
            cleanup_text(&live, &canon),
            "*nat\n-D OUTPUT -j ISTIO_OUTPUT\n-D FOREIGN -j ISTIO_OUTPUT\n\
             -D PREROUTING -i eth9 -j RETURN\n-D OUTPUT -p udp -j ACCEPT\n-F ISTIO_OUTPUT\n\
             -X ISTIO_OUTPUT\nCOMMIT\n"
        );
    }

    #[test]
    fn scratch_names_fit_and_are_recognised() {
        let s = Scratch::for_process(4_194_304);
        assert_eq!(s.name("ISTIO_IN_REDIRECT"), "ii-2hwcg.ISTIO_IN_REDIRECT");
        assert!(s.name("ISTIO_IN_REDIRECT").len() <= 28);
        assert!(is_scratch_chain(&s.name("OUTPUT")));
        assert!(is_scratch_chain("ii-t.OUTPUT"));
        assert!(!is_scratch_chain("ii-OUTPUT"));
        assert!(!is_scratch_chain("ISTIO_OUTPUT"));
        assert!(s.owns(&s.name("OUTPUT")) && !s.owns("ii-t.OUTPUT"));
    }

    #[test]
    fn istio_shaped_rules() {
        for (table, chain, rule, want) in [
            ("nat", "PREROUTING", "-i eth9 -j RETURN", true),
            ("mangle", "OUTPUT", "-o eth9 -j RETURN", true),
            ("nat", "OUTPUT", "-d 198.18.9.9/32 -j RETURN", false),
            ("filter", "INPUT", "-i eth9 -j RETURN", false),
            ("nat", "PREROUTING", "-i eth9 -p tcp -j RETURN", false),
            (
                "mangle",
                "PREROUTING",
                "-p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff",
                true,
            ),
            (
                "mangle",
                "OUTPUT",
                "-p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
                true,
            ),
            (
                "mangle",
                "OUTPUT",
                "! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j MARK --set-xmark 0x53a/0xffffffff",
                true,
            ),
            (
                "mangle",
                "OUTPUT",
                "-o lo -p tcp -m mark --mark 0x539 -j RETURN",
                true,
            ),
            (
                "mangle",
                "OUTPUT",
                "-p udp -j MARK --set-xmark 0x1/0xffffffff",
                false,
            ),
        ] {
            assert_eq!(
                is_istio_shaped(table, chain, rule),
                want,
                "{table} {chain} {rule}"
            );
        }
    }

    #[test]
    fn leftovers_of_another_configuration_are_drift_and_get_removed() {
        let rs = tiny();
        let with_leftover = LIVE.replace(
            "-A OUTPUT -j ISTIO_OUTPUT\n",
            "-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -o eth9 -j RETURN\n",
        );
        let live = parse_save(&with_leftover);
        let canon = canon_from_scratch(&live, &rs, &sc());
        assert!(matches!(compare(&rs, &canon, &live), Verdict::Different(_)));
        let text = converge_text(&rs, &canon, &live, &sc());
        assert!(text.contains("-D OUTPUT -o eth9 -j RETURN\n"), "{text}");
        assert!(!text.contains("198.18.9.9"), "{text}");
        let text = cleanup_text(&live, &Canon::new());
        assert!(text.contains("-D OUTPUT -o eth9 -j RETURN\n"), "{text}");
    }

    #[test]
    fn error_line_numbers_in_every_form() {
        for (stderr, want) in [
            (
                "iptables-nft-restore: line 2 failed: Chain already exists.\n",
                Some(2),
            ),
            ("iptables-restore: line 10 failed\n", Some(10)),
            (
                "iptables-restore v1.8.9 (legacy): Port `99999' not valid\nError occurred at line: 8\nTry `iptables-restore -h'\n",
                Some(8),
            ),
            (
                "iptables-nft-restore v1.8.9 (nf_tables): \nline 8: RULE_APPEND failed (Invalid argument): rule in chain ISTIO_B\n",
                Some(8),
            ),
            ("Another app is currently holding the xtables lock.\n", None),
        ] {
            assert_eq!(failed_line(stderr), want, "{stderr}");
        }
    }

    #[test]
    fn layout_knows_what_was_committed() {
        let l = Layout::of("*mangle\n-N A\nCOMMIT\n*nat\n-N B\nCOMMIT\n");
        assert_eq!(l.committed_before(5), ["mangle"]);
        assert!(l.committed_before(3).is_empty());
        assert_eq!(l.committed_before(7), ["mangle", "nat"]);
    }
}
