//! Applies rulesets to the current thread's network namespace: chooses the iptables backend,
//! runs one `*-restore --noflush` per family, and keeps the namespace from ever being left
//! half-applied.
//!
//! Effects: spawns `iptables-*-restore` / `*-save` (argv only, never a shell, with a scrubbed
//! environment) and reads `/proc/thread-self/net/ip{,6}_tables_names`. Everything it decides
//! from is in [`crate::backend::iptables::state`], which is pure.
//!
//! Design: `docs/design.md`, "The iptables backend: apply, roll back, re-run, clean up".

use anyhow::{Context, anyhow, bail};
use netlink_packet_netfilter::NetfilterProtoFamily;

use self::state::{Layout, Saved, Verdict};
use crate::backend::{Batched, Found, Snapshot};
use crate::capture::{Capture, Ruleset, Table};
use crate::net::Family;
use crate::netlink::tables;
use crate::settings::config::IptablesVariant;

mod handover;
mod messages;
mod nft_removal;
mod programs;
pub mod render;
mod spawn;
pub mod state;

pub use handover::{Handover, handover};
pub use messages::{describe, iptables_message};
pub use programs::{DEFAULT_PATH, System};

/// A failed `*-restore` run (or one that could not be started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreFailure {
    /// The program, as run (or as looked for).
    pub program: String,
    /// Exit status and iptables' stderr (or why it could not run).
    pub stderr: String,
    /// The input line iptables reported, if any.
    pub line: Option<usize>,
}

/// The seam between the apply logic and the programs it runs.
pub trait Programs {
    /// Runs `*-restore --noflush` of `family` in `backend` with `input` on stdin.
    fn restore(
        &self,
        family: Family,
        backend: IptablesVariant,
        input: &str,
    ) -> Result<(), RestoreFailure>;
    /// Starts one restore per job, each with its whole input and none acting on it before
    /// [`Held::release`]; dropped unreleased, none changes anything. The real programs are
    /// started at once and held back together (`spawn.rs`).
    fn start_restores(&self, jobs: Vec<RestoreJob>) -> anyhow::Result<Box<dyn Held + '_>>;
    /// Runs `*-save` and returns its output.
    fn save(&self, family: Family, backend: IptablesVariant) -> anyhow::Result<String>;
    /// The legacy tables instantiated in the namespace (`/proc/.../ip{,6}_tables_names`).
    fn legacy_tables(&self, family: Family) -> Vec<String>;
}

/// One restore to run: the family, the backend, and its input.
pub type RestoreJob = (Family, IptablesVariant, String);

/// Restores started by [`Programs::start_restores`], not yet acting on their inputs.
pub trait Held {
    /// Lets them act, and returns their results in job order.
    fn release(self: Box<Self>) -> Vec<Result<(), RestoreFailure>>;
}

/// What to do when the namespace is not fresh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub reconcile: bool,
    pub force_apply: bool,
    pub force_backend: Option<IptablesVariant>,
}

/// The iptables backend: one `*-restore` per family (see the module doc).
#[derive(Debug)]
pub struct Iptables {
    pub programs: System,
    pub options: Options,
    /// A fresh namespace's single restore may replace this process: `--handover`, and the
    /// run has nothing to do after the rules (no `--netns` to return from, no validation, no
    /// TPROXY routes).
    pub handover: bool,
    /// `--restore-timeout`, also the hand-over's alarm.
    pub timeout: std::time::Duration,
}

impl crate::backend::Firewall for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn capabilities(&self) -> &'static [caps::Capability] {
        &crate::sys::caps::NEEDED
    }

    fn render(&self, capture: &Capture) -> String {
        render::dry_run_text(&capture.rulesets())
    }

    fn prepare(
        &self,
        capture: &Capture,
        ns: &Snapshot,
        _replacing: &Batched,
    ) -> anyhow::Result<crate::backend::Plan<'_>> {
        let rulesets = capture.rulesets();
        let handover = self.handover.then(|| {
            handover(
                &self.programs,
                &self.options,
                &rulesets,
                &ns.tables,
                self.timeout,
            )
        });
        Ok(match handover.flatten() {
            Some(h) => crate::backend::Plan::Handover(h),
            None => {
                crate::backend::Plan::Iptables(prepare(&self.programs, &self.options, rulesets)?)
            }
        })
    }

    fn remove(&self, capture: &Capture) -> anyhow::Result<()> {
        cleanup(&self.programs, &capture.rulesets())
    }

    fn batched_removal(&self, capture: &Capture, ns: &Snapshot) -> anyhow::Result<Batched> {
        nft_removal::batched(&self.programs, &capture.rulesets(), &ns.tables)
    }

    fn inspect(&self, ns: &Snapshot) -> anyhow::Result<Found> {
        let mut found = Found::default();
        // iptables-nft: its ISTIO_* chains are read over netlink (no program runs).
        for t in &ns.tables {
            let word = match t.family {
                NetfilterProtoFamily::IPv4 => "ip",
                NetfilterProtoFamily::IPv6 => "ip6",
                _ => continue,
            };
            if !Table::ALL.iter().any(|x| x.name() == t.name) {
                continue;
            }
            let chains = tables::chains(t.family, &t.name)
                .with_context(|| format!("listing the chains of {word} {}", t.name))?;
            if chains.iter().any(|c| state::is_istio_chain(c)) {
                found.what.push(format!("{word} {} (iptables-nft)", t.name));
            }
        }
        // iptables-legacy: only its programs can read it, and only where its tables exist.
        for family in Family::ALL {
            if self.programs.legacy_tables(family).is_empty() {
                continue;
            }
            match istio_in(&self.programs, family, IptablesVariant::Legacy) {
                Ok(true) => found.what.push(format!("{family} (iptables-legacy)")),
                Ok(false) => {}
                Err(e) => log::warn!(
                    "{family}: legacy iptables tables exist in this network namespace, and \
                     whether they hold Istio rules cannot be read: {e:#}"
                ),
            }
        }
        Ok(found)
    }
}

/// What happened to one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied to a namespace without our rules.
    Applied,
    /// The same rules were already in place; nothing changed.
    AlreadyInPlace,
    /// Some tables were in place and the missing ones were applied.
    Completed(Vec<Table>),
    /// Replaced in place (`--reconcile`, or `--force-apply` on identical rules).
    Reconciled,
}

/// One family's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyReport {
    pub family: Family,
    pub backend: IptablesVariant,
    pub outcome: Outcome,
}

fn other(b: IptablesVariant) -> IptablesVariant {
    match b {
        IptablesVariant::Legacy => IptablesVariant::Nft,
        IptablesVariant::Nft => IptablesVariant::Legacy,
    }
}

fn tool_prefix(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

/// Tables this run created from scratch, for rollback.
struct Committed {
    rs: Ruleset,
    backend: IptablesVariant,
    tables: Vec<Table>,
}

/// What this run changed in one family and backend, for rollback.
enum Change {
    /// Tables created from scratch: undone by deleting what was added.
    Created(Committed),
    /// Istio rules replaced in place (`--reconcile`, `--force-apply`) or removed from the
    /// other backend (`--reconcile`): undone by the restore input that puts back exactly what
    /// was there ([`state::revert_text`], [`state::cleanup_revert_text`]), written from the
    /// state read just before the change.
    Replaced {
        family: Family,
        backend: IptablesVariant,
        revert: String,
    },
}

impl Change {
    /// Every table of `rs`, created in `backend`.
    fn created(rs: &Ruleset, backend: IptablesVariant) -> Change {
        Change::Created(Committed {
            rs: rs.clone(),
            backend,
            tables: rs.tables.iter().map(|t| t.table).collect(),
        })
    }

    fn family(&self) -> Family {
        match self {
            Change::Created(c) => c.rs.family,
            Change::Replaced { family, .. } => *family,
        }
    }
}

/// What a rollback of `done` undoes, for its message: `IPv4 rules applied`, `IPv4 and IPv6
/// rules applied`, `IPv4 rules reconciled and IPv6 rules applied`, ….
fn undone_rules(done: &[Change]) -> String {
    let mut families: Vec<(Family, &str)> = Vec::new();
    for c in done {
        let verb = match c {
            Change::Created(_) => "applied",
            Change::Replaced { .. } => "reconciled",
        };
        match families.iter_mut().find(|(f, _)| *f == c.family()) {
            Some(seen) if verb == "reconciled" => seen.1 = verb,
            Some(_) => {}
            None => families.push((c.family(), verb)),
        }
    }
    let mut groups: Vec<(Vec<String>, &str)> = Vec::new();
    for (family, verb) in families {
        match groups.last_mut() {
            Some((names, v)) if *v == verb => names.push(family.to_string()),
            _ => groups.push((vec![family.to_string()], verb)),
        }
    }
    groups
        .iter()
        .map(|(names, verb)| format!("{} rules {verb}", names.join(" and ")))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The backend decision for one family.
#[derive(Debug)]
struct Choice {
    backend: IptablesVariant,
    reason: String,
    /// The other backend holds Istio chains (only allowed with `--reconcile`, which then
    /// removes them).
    clean_other: bool,
}

fn istio_in(nf: &dyn Programs, family: Family, backend: IptablesVariant) -> anyhow::Result<bool> {
    if backend == IptablesVariant::Legacy && nf.legacy_tables(family).is_empty() {
        return Ok(false);
    }
    Ok(state::parse_save(&nf.save(family, backend)?).has_istio_chains())
}

fn choose(nf: &dyn Programs, opts: &Options, family: Family) -> anyhow::Result<Choice> {
    let (backend, reason) = match opts.force_backend {
        Some(b) => (b, "forced by FORCE_IPTABLES_BINARY".to_owned()),
        None => {
            let legacy = nf.legacy_tables(family);
            if legacy.is_empty() {
                (
                    IptablesVariant::Nft,
                    "no legacy iptables tables exist in this network namespace".to_owned(),
                )
            } else {
                let saved = state::parse_save(&nf.save(family, IptablesVariant::Legacy)?);
                if saved.has_istio_chains() {
                    (
                        IptablesVariant::Legacy,
                        "the legacy backend already holds Istio chains".to_owned(),
                    )
                } else if saved.rule_count() > 0 || !saved.non_empty_tables().is_empty() {
                    (
                        IptablesVariant::Legacy,
                        format!(
                            "the namespace already has legacy rules ({} rules in tables {})",
                            saved.rule_count(),
                            saved.non_empty_tables().join(", ")
                        ),
                    )
                } else {
                    (
                        IptablesVariant::Nft,
                        format!(
                            "the legacy tables present ({}) hold no rules",
                            legacy.join(", ")
                        ),
                    )
                }
            }
        }
    };
    // Rules must never end up in both backends. When nft was chosen because legacy is
    // empty or rule-less, legacy cannot hold Istio chains; every other case is checked.
    let unforced_nft = opts.force_backend.is_none() && backend == IptablesVariant::Nft;
    let clean_other = !unforced_nft && istio_in(nf, family, other(backend))?;
    if clean_other && !opts.reconcile {
        bail!(
            "{family}: Istio chains already exist in the {} iptables backend, and this run would \
             program the {backend} backend ({reason}), leaving two copies; run with \
             --cleanup-only first, or add --reconcile to move the rules to {backend}",
            other(backend)
        );
    }
    Ok(Choice {
        backend,
        reason,
        clean_other,
    })
}

/// The iptables mode's install, decided and ready: every family's backend chosen, the restore
/// inputs written out, and the first restore of every family started with its input but held
/// (see [`Programs::start_restores`]). Nothing has changed yet; dropped, nothing does.
pub struct Plan<'a> {
    nf: &'a dyn Programs,
    opts: Options,
    rulesets: Vec<Ruleset>,
    choices: Vec<Choice>,
    texts: Vec<String>,
    held: Box<dyn Held + 'a>,
}

impl std::fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("rulesets", &self.rulesets)
            .field("choices", &self.choices)
            .finish_non_exhaustive()
    }
}

/// Chooses every family's backend (reading state only, so a refusal here leaves nothing to
/// undo), writes the restore inputs and starts the first restores, held.
pub fn prepare<'a>(
    nf: &'a dyn Programs,
    opts: &Options,
    rulesets: Vec<Ruleset>,
) -> anyhow::Result<Plan<'a>> {
    let mut choices = Vec::new();
    for rs in &rulesets {
        let choice = choose(nf, opts, rs.family)?;
        log::info!(
            "{}: using the {} backend: {}",
            rs.family,
            choice.backend,
            choice.reason
        );
        choices.push(choice);
    }
    let texts: Vec<String> = rulesets.iter().map(render::ruleset_text).collect();
    let jobs: Vec<RestoreJob> = rulesets
        .iter()
        .zip(&choices)
        .zip(&texts)
        .filter(|((rs, _), _)| !rs.tables.is_empty())
        .map(|((rs, c), text)| (rs.family, c.backend, text.clone()))
        .collect();
    let held = nf.start_restores(jobs)?;
    Ok(Plan {
        nf,
        opts: *opts,
        rulesets,
        choices,
        texts,
        held,
    })
}

impl Plan<'_> {
    /// Logs what the restores write: counts at info level, the inputs at debug level.
    pub fn log(&self) {
        for (rs, text) in self.rulesets.iter().zip(&self.texts) {
            log::info!(
                "{} ruleset: {} rules in {} new chains",
                rs.family,
                rs.rule_count(),
                rs.chain_count()
            );
            log::debug!("{} restore input:\n{text}", rs.family);
        }
    }

    /// Releases the held restores; what follows a failure (a re-run, a fallback) is handled
    /// family by family, IPv4 first. On failure, every table this run created, in any family,
    /// is removed again and the error says what failed and that it was rolled back.
    pub fn commit(self) -> anyhow::Result<Vec<FamilyReport>> {
        let Plan {
            nf,
            opts,
            rulesets,
            choices,
            texts,
            held,
        } = self;
        let mut firsts = held.release().into_iter();
        // Successes are recorded before any failure is looked at, so that a failure in one
        // family rolls back the families that succeeded alongside it.
        let mut done: Vec<Change> = Vec::new();
        let mut outcomes = Vec::new();
        for (rs, choice) in rulesets.iter().zip(&choices) {
            if rs.tables.is_empty() {
                outcomes.push(None);
                continue;
            }
            let first = firsts
                .next()
                .unwrap_or_else(|| unreachable!("one result per job"));
            if first.is_ok() {
                done.push(Change::created(rs, choice.backend));
            }
            outcomes.push(Some(first));
        }
        let mut reports = Vec::new();
        for (((rs, choice), text), first) in rulesets.iter().zip(&choices).zip(&texts).zip(outcomes)
        {
            match finish_family(nf, &opts, rs, choice, text, first, &mut done) {
                Ok(r) => reports.push(r),
                Err(e) => return Err(roll_back_after(nf, &done, e)),
            }
        }
        Ok(reports)
    }
}

/// The error of a failed run, after undoing what it applied or replaced.
fn roll_back_after(nf: &dyn Programs, done: &[Change], e: anyhow::Error) -> anyhow::Error {
    if done.is_empty() {
        return e;
    }
    let what = undone_rules(done);
    match rollback(nf, done) {
        Ok(()) => e.context(format!(
            "{what} by this run were rolled back; the namespace is as it was"
        )),
        Err(re) => e.context(format!(
            "rolling back the {what} by this run also failed ({re:#}); \
             run istio-init --cleanup-only to remove partial rules"
        )),
    }
}

fn rollback(nf: &dyn Programs, done: &[Change]) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for c in done.iter().rev() {
        let undone = match c {
            Change::Created(c) => undo(nf, &c.rs, c.backend, &c.tables),
            Change::Replaced {
                family,
                backend,
                revert,
            } => put_back(nf, *family, *backend, revert),
        };
        if let Err(e) = undone {
            errors.push(format!("{e:#}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(errors.join("; ")))
    }
}

/// Runs a restore input that puts back the Istio rules a change replaced or removed.
fn put_back(
    nf: &dyn Programs,
    family: Family,
    backend: IptablesVariant,
    revert: &str,
) -> anyhow::Result<()> {
    if revert.is_empty() {
        return Ok(());
    }
    log::info!("{family}: putting back the Istio rules this run replaced ({backend})");
    log::debug!("{family} put-back input:\n{revert}");
    nf.restore(family, backend, revert)
        .map_err(|f| anyhow!(describe(family, backend, revert, &f)))
}

/// Runs `text`, a change in place whose undoing is `revert` (one table each, in the same
/// order). When it fails after committing some tables, those are put back and the failure
/// returned.
fn replace_in_place(
    nf: &dyn Programs,
    family: Family,
    backend: IptablesVariant,
    text: &str,
    revert: &str,
) -> anyhow::Result<()> {
    let Err(fail) = nf.restore(family, backend, text) else {
        return Ok(());
    };
    let layout = Layout::of(text);
    let committed = fail
        .line
        .map(|n| layout.committed_before(n))
        .unwrap_or_default();
    put_back(nf, family, backend, &state::tables_only(revert, &committed)).with_context(|| {
        format!(
            "{}; putting back the tables changed before the failure also failed; run \
             istio-init --cleanup-only to remove partial rules",
            describe(family, backend, text, &fail)
        )
    })?;
    bail!(describe(family, backend, text, &fail))
}

fn undo(
    nf: &dyn Programs,
    rs: &Ruleset,
    backend: IptablesVariant,
    tables: &[Table],
) -> anyhow::Result<()> {
    let text = state::undo_text(rs, tables);
    if text.is_empty() {
        return Ok(());
    }
    log::info!(
        "{}: rolling back tables {} in the {backend} backend",
        rs.family,
        tables
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    nf.restore(rs.family, backend, &text)
        .map_err(|f| anyhow!(describe(rs.family, backend, &text, &f)))
}

/// One family after its first restore: `first` is `None` when it has no rules, `Ok` when the
/// first restore applied them (already in `done`).
fn finish_family(
    nf: &dyn Programs,
    opts: &Options,
    rs: &Ruleset,
    choice: &Choice,
    text: &str,
    first: Option<Result<(), RestoreFailure>>,
    done: &mut Vec<Change>,
) -> anyhow::Result<FamilyReport> {
    let family = rs.family;
    let mut backend = choice.backend;
    let Some(mut first) = first else {
        return Ok(FamilyReport {
            family,
            backend,
            outcome: Outcome::AlreadyInPlace,
        });
    };
    let mut fell_back = false;
    if let Err(f) = &first {
        if backend == IptablesVariant::Nft && opts.force_backend.is_none() && nft_unavailable(f) {
            log::warn!(
                "{family}: nf_tables is not usable here ({}); falling back to the legacy backend",
                iptables_message(&f.stderr)
            );
            backend = IptablesVariant::Legacy;
            first = nf.restore(family, backend, text);
            fell_back = true;
        }
    }
    let outcome = match first {
        Ok(()) => {
            if fell_back {
                done.push(Change::created(rs, backend));
            }
            log::info!(
                "{family}: applied {} rules in {} chains ({backend})",
                rs.rule_count(),
                rs.chain_count()
            );
            Outcome::Applied
        }
        Err(fail) => {
            undo_committed(nf, rs, backend, text, &fail)?;
            if !is_existing_chain(text, &fail) {
                bail!(describe(family, backend, text, &fail));
            }
            log::info!(
                "{family}: Istio chains already exist ({}); comparing them with this configuration",
                first_line(&fail.stderr)
            );
            existing(nf, opts, rs, backend, done)?
        }
    };
    if choice.clean_other {
        let o = other(backend);
        log::info!("{family}: removing the Istio rules from the {o} backend (--reconcile)");
        if let Some((live, canon)) = read_ours(nf, family, o, Some(rs))? {
            let text = state::cleanup_text(&live, &canon);
            let revert = state::cleanup_revert_text(&live, &canon, &scratch_names());
            log::debug!("{family} cleanup input ({o}):\n{text}");
            replace_in_place(nf, family, o, &text, &revert)?;
            done.push(Change::Replaced {
                family,
                backend: o,
                revert,
            });
        }
    }
    Ok(FamilyReport {
        family,
        backend,
        outcome,
    })
}

/// Whether an nft restore failed because this kernel has no usable nf_tables (it fails before
/// reading any input line), in which case the legacy backend is tried, as istio-iptables'
/// probe would have chosen it.
fn nft_unavailable(f: &RestoreFailure) -> bool {
    let m = f.stderr.to_ascii_lowercase();
    f.line.is_none()
        && (m.contains("generation id")
            || m.contains("protocol not supported")
            || m.contains("address family not supported"))
}

/// After a failed restore, undoes the tables it committed before failing.
fn undo_committed(
    nf: &dyn Programs,
    rs: &Ruleset,
    backend: IptablesVariant,
    text: &str,
    fail: &RestoreFailure,
) -> anyhow::Result<()> {
    let Some(n) = fail.line else { return Ok(()) };
    let tables: Vec<Table> = Layout::of(text)
        .committed_before(n)
        .into_iter()
        .filter_map(state::table_named)
        .collect();
    if tables.is_empty() {
        return Ok(());
    }
    undo(nf, rs, backend, &tables).with_context(|| {
        format!(
            "{}; undoing the tables committed before the failure also failed; run istio-init \
             --cleanup-only to remove partial rules",
            describe(rs.family, backend, text, fail)
        )
    })
}

/// Whether a restore failed because one of the chains it declares already exists (legacy
/// iptables prints no reason for it, nft says `Chain already exists`).
fn is_existing_chain(text: &str, fail: &RestoreFailure) -> bool {
    let Some(line) = fail.line.and_then(|n| text.lines().nth(n.wrapping_sub(1))) else {
        return false;
    };
    let reason = iptables_message(&fail.stderr);
    line.starts_with("-N ") && (reason.is_empty() || reason.contains("exists"))
}

/// Reads the live state with the expected rules canonicalised by iptables itself (see
/// [`crate::backend::iptables::state`]). Scratch chains are only loaded into tables that exist and hold Istio
/// rules, so inspecting never creates a table.
fn inspect(
    nf: &dyn Programs,
    rs: &Ruleset,
    backend: IptablesVariant,
) -> anyhow::Result<(Saved, state::Canon)> {
    let family = rs.family;
    let live = state::parse_save(&nf.save(family, backend)?);
    let present: Vec<&str> = rs
        .tables
        .iter()
        .map(|t| t.table.name())
        .filter(|name| {
            live.table(name)
                .is_some_and(state::SavedTable::has_istio_rules)
        })
        .collect();
    if present.is_empty() {
        return Ok((live, state::Canon::new()));
    }
    let scratch = state::scratch_text(rs, Some(&present), &scratch_names());
    nf.restore(family, backend, &scratch).map_err(|f| {
        anyhow!(
            "loading the expected rules into scratch chains to compare them: {}",
            describe(family, backend, &scratch, &f)
        )
    })?;
    let live = state::parse_save(&nf.save(family, backend)?);
    let canon = state::canon_from_scratch(&live, rs, &scratch_names());
    Ok((live, canon))
}

fn delete_scratch(
    nf: &dyn Programs,
    family: Family,
    backend: IptablesVariant,
    live: &Saved,
) -> anyhow::Result<()> {
    let text = state::scratch_delete_text(live, &scratch_names());
    if text.is_empty() {
        return Ok(());
    }
    nf.restore(family, backend, &text).map_err(|f| {
        anyhow!(
            "deleting the scratch chains: {}",
            describe(family, backend, &text, &f)
        )
    })
}

fn existing(
    nf: &dyn Programs,
    opts: &Options,
    rs: &Ruleset,
    backend: IptablesVariant,
    done: &mut Vec<Change>,
) -> anyhow::Result<Outcome> {
    let family = rs.family;
    let (live, canon) = inspect(nf, rs, backend)?;
    let verdict = state::compare(rs, &canon, &live);
    let converge = |what: &str, done: &mut Vec<Change>| -> anyhow::Result<Outcome> {
        let text = state::converge_text(rs, &canon, &live, &scratch_names());
        let revert = state::revert_text(rs, &canon, &live);
        log::info!("{family}: {what}: replacing the Istio rules in place ({backend})");
        log::debug!("{family} converge input:\n{text}");
        replace_in_place(nf, family, backend, &text, &revert)?;
        done.push(Change::Replaced {
            family,
            backend,
            revert,
        });
        Ok(Outcome::Reconciled)
    };
    match verdict {
        Verdict::Identical if opts.force_apply => converge("--force-apply", done),
        Verdict::Identical => {
            delete_scratch(nf, family, backend, &live)?;
            log::info!("{family}: the same Istio rules are already in place; nothing to do");
            Ok(Outcome::AlreadyInPlace)
        }
        Verdict::Different(why) if opts.reconcile => {
            for w in &why {
                log::info!("{family}: drift: {w}");
            }
            converge("--reconcile", done)
        }
        Verdict::Different(why) => {
            delete_scratch(nf, family, backend, &live)?;
            for w in &why {
                log::error!("{family}: drift: {w}");
            }
            let shown: Vec<&str> = why.iter().take(3).map(String::as_str).collect();
            let more = match why.len() {
                0..=3 => String::new(),
                n => format!(" (and {} more)", n - 3),
            };
            bail!(
                "{family}: the namespace already holds different Istio rules ({backend} backend): \
                 {}{more}; they may come from istio-cni or an earlier run with other settings: \
                 add --reconcile to replace them, or run --cleanup-only to remove them",
                shown.join("; ")
            )
        }
        Verdict::Incomplete(tables) => {
            delete_scratch(nf, family, backend, &live)?;
            let part = state::subset(rs, &tables);
            let names: Vec<&str> = tables.iter().map(|t| t.name()).collect();
            log::info!(
                "{family}: completing an interrupted apply: adding tables {}",
                names.join(", ")
            );
            let text = render::ruleset_text(&part);
            if let Err(fail) = nf.restore(family, backend, &text) {
                undo_committed(nf, &part, backend, &text, &fail)?;
                bail!(describe(family, backend, &text, &fail));
            }
            done.push(Change::Created(Committed {
                rs: part,
                backend,
                tables: tables.clone(),
            }));
            Ok(Outcome::Completed(tables))
        }
    }
}

/// Removes istio-init's chains and the jumps to them from both families and both backends
/// (legacy only where legacy tables exist), plus the built-in-chain rules `expected` (the
/// current configuration's rulesets) would add. Foreign rules stay. Every family and backend
/// is attempted; the errors are reported together.
pub fn cleanup(nf: &dyn Programs, expected: &[Ruleset]) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for family in Family::ALL {
        let rs = expected.iter().find(|r| r.family == family);
        for backend in [IptablesVariant::Nft, IptablesVariant::Legacy] {
            if backend == IptablesVariant::Legacy && nf.legacy_tables(family).is_empty() {
                log::debug!("{family}: no legacy tables, nothing to clean in legacy");
                continue;
            }
            match cleanup_backend(nf, family, backend, rs) {
                Ok(true) => {
                    log::info!("{family}: removed the Istio rules from the {backend} backend")
                }
                Ok(false) => log::info!("{family}: no Istio rules in the {backend} backend"),
                Err(e) if is_unavailable(&e) => {
                    log::warn!("{family}: skipping the {backend} backend: {e:#}");
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("cleanup failed: {}", errors.join("; ")))
    }
}

/// A backend that cannot even be read (binary missing, family disabled in the kernel) has
/// nothing to clean.
#[derive(Debug)]
struct Unavailable(String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unavailable>())
}

/// Cleans one family in one backend. Returns whether anything was removed.
fn cleanup_backend(
    nf: &dyn Programs,
    family: Family,
    backend: IptablesVariant,
    rs: Option<&Ruleset>,
) -> anyhow::Result<bool> {
    let Some((live, canon)) = read_ours(nf, family, backend, rs)? else {
        return Ok(false);
    };
    let text = state::cleanup_text(&live, &canon);
    log::debug!("{family} cleanup input ({backend}):\n{text}");
    nf.restore(family, backend, &text)
        .map_err(|f| anyhow!(describe(family, backend, &text, &f)))?;
    Ok(true)
}

/// The live state of one family in one backend and the canonical form of `rs`'s rules in
/// it, when it holds anything of istio-init's (`None` otherwise). The live state includes
/// this process's scratch chains when `rs` has rules in a table that holds ours: the
/// caller deletes them (a cleanup with the rest). A `*-save` that cannot run is
/// [`Unavailable`].
fn read_ours(
    nf: &dyn Programs,
    family: Family,
    backend: IptablesVariant,
    rs: Option<&Ruleset>,
) -> anyhow::Result<Option<(Saved, state::Canon)>> {
    let saved = nf
        .save(family, backend)
        .map_err(|e| anyhow::Error::new(Unavailable(format!("{e:#}"))))?;
    let mut live = state::parse_save(&saved);
    if !live.tables.iter().any(state::SavedTable::has_ours) {
        return Ok(None);
    }
    let mut canon = state::Canon::new();
    if let Some(rs) = rs {
        // The configuration's own rules in built-in chains can only be told apart from
        // foreign ones in canonical form; load them into scratch chains of the tables that
        // hold our rules (never creating a table).
        let present: Vec<&str> = rs
            .tables
            .iter()
            .map(|t| t.table.name())
            .filter(|n| live.table(n).is_some_and(|t| t.has_ours()))
            .collect();
        if !present.is_empty() {
            let scratch = state::scratch_text(rs, Some(&present), &scratch_names());
            nf.restore(family, backend, &scratch)
                .map_err(|f| anyhow!(describe(family, backend, &scratch, &f)))?;
            live = state::parse_save(&nf.save(family, backend)?);
            canon = state::canon_from_scratch(&live, rs, &scratch_names());
        }
    }
    Ok(Some((live, canon)))
}

/// This process's scratch chain names.
fn scratch_names() -> state::Scratch {
    state::Scratch::for_process(std::process::id())
}

fn first_line(s: &str) -> &str {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn iptables_reasons() {
        for (stderr, want) in [
            (
                "iptables-nft-restore: line 2 failed: Chain already exists.\n",
                "Chain already exists.",
            ),
            ("iptables-restore: line 10 failed\n", ""),
            (
                "iptables-restore v1.8.9 (legacy): Port `99999' not valid\nError occurred at line: 8\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.\n",
                "Port `99999' not valid",
            ),
            (
                "iptables-nft-restore v1.8.9 (nf_tables): \nline 8: RULE_APPEND failed (Invalid argument): rule in chain ISTIO_B\n",
                "line 8: RULE_APPEND failed (Invalid argument): rule in chain ISTIO_B",
            ),
        ] {
            assert_eq!(iptables_message(stderr), want, "{stderr}");
        }
    }

    #[test]
    fn failure_description_names_everything() {
        let text =
            "* nat\n-N ISTIO_X\n-A ISTIO_X -p tcp -j TPROXY --on-port 1 --tproxy-mark 1\nCOMMIT\n";
        let f = RestoreFailure {
            program: "/usr/sbin/ip6tables-nft-restore".into(),
            stderr: "ip6tables-nft-restore v1.8.9 (nf_tables): \nline 3: RULE_APPEND failed (Invalid argument): rule in chain ISTIO_X\n".into(),
            line: Some(3),
        };
        let d = describe(Family::V6, IptablesVariant::Nft, text, &f);
        assert_eq!(
            d,
            "IPv6 (nft backend): /usr/sbin/ip6tables-nft-restore failed at line 3 \
             `-A ISTIO_X -p tcp -j TPROXY --on-port 1 --tproxy-mark 1`: line 3: RULE_APPEND \
             failed (Invalid argument): rule in chain ISTIO_X; hint: the kernel or the iptables \
             extensions may lack support for this rule; make sure the node has these modules \
             loaded: nf_tables, nft_compat, nft_chain_nat, nf_tproxy_ipv6, xt_TPROXY"
        );
    }

    /// What the microVM test (tests/vm/cases.sh) sees on Debian's 6.1 kernel: the legacy
    /// backend reports a missing extension at the table's COMMIT, and a module it could not
    /// load with the container's capabilities; both hints name the module.
    #[test]
    fn missing_kernel_modules_are_named() {
        let text = "* mangle\n-N ISTIO_TPROXY\n-A ISTIO_TPROXY -p tcp -j TPROXY --on-port 15006 \
                    --tproxy-mark 1337\nCOMMIT\n";
        let fail = |stderr: &str, line| RestoreFailure {
            program: "/usr/sbin/iptables-legacy-restore".into(),
            stderr: stderr.into(),
            line: Some(line),
        };
        let f = fail(
            "Warning: Extension TPROXY revision 0 not supported, missing kernel module?\n\
             iptables-restore: line 4 failed\n",
            4,
        );
        assert_eq!(
            describe(Family::V4, IptablesVariant::Legacy, text, &f),
            "IPv4 (legacy backend): /usr/sbin/iptables-legacy-restore failed at line 4 `COMMIT`: \
             Warning: Extension TPROXY revision 0 not supported, missing kernel module?; hint: \
             the kernel or the iptables extensions may lack support for this rule; make sure \
             the node has these modules loaded: iptable_mangle, nf_tproxy_ipv4, xt_TPROXY"
        );
        let f = fail(
            "modprobe: can't load module x_tables (kernel/net/netfilter/x_tables.ko): Operation \
             not permitted\niptables-restore: unable to initialize table 'mangle'\n\
             Error occurred at line: 1\n",
            1,
        );
        assert_eq!(
            describe(Family::V4, IptablesVariant::Legacy, text, &f),
            "IPv4 (legacy backend): /usr/sbin/iptables-legacy-restore failed at line 1 \
             `* mangle`: modprobe: can't load module x_tables (kernel/net/netfilter/x_tables.ko): \
             Operation not permitted iptables-restore: unable to initialize table 'mangle'; \
             hint: the kernel module x_tables is not loaded and the container cannot load it \
             (that needs CAP_SYS_MODULE): load it on the node (modprobe x_tables), or use the \
             nft backend"
        );
        // No modprobe in the image: iptables' own words.
        let f = fail(
            "ip6tables-restore: can't initialize ip6tables table `mangle': Table does not exist \
             (do you need to insmod?)\nError occurred at line: 1\n",
            1,
        );
        let d = describe(Family::V6, IptablesVariant::Legacy, text, &f);
        assert!(
            d.ends_with(
                "hint: the kernel modules x_tables, ip6_tables, ip6table_mangle are not loaded \
                 and the container cannot load them (that needs CAP_SYS_MODULE): load them on \
                 the node (modprobe x_tables ip6_tables ip6table_mangle), or use the nft backend"
            ),
            "{d}"
        );
    }

    type FailWhen = Box<dyn Fn(Family, &str) -> Option<RestoreFailure>>;

    /// Records every call; a restore fails when `fail` returns a failure for its input.
    struct Fake {
        calls: RefCell<Vec<String>>,
        fail: FailWhen,
        /// What `*-save` prints: nft, then legacy.
        saves: [String; 2],
        legacy: Vec<String>,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                calls: RefCell::default(),
                fail: Box::new(|_, _| None),
                saves: [String::new(), String::new()],
                legacy: Vec::new(),
            }
        }
    }

    /// The fake's restores, run at the release.
    struct OneByOne<'a> {
        fake: &'a Fake,
        jobs: Vec<RestoreJob>,
    }

    impl Held for OneByOne<'_> {
        fn release(self: Box<Self>) -> Vec<Result<(), RestoreFailure>> {
            (self.jobs.iter())
                .map(|(family, backend, input)| self.fake.restore(*family, *backend, input))
                .collect()
        }
    }

    impl Programs for Fake {
        fn restore(
            &self,
            family: Family,
            backend: IptablesVariant,
            input: &str,
        ) -> Result<(), RestoreFailure> {
            self.calls
                .borrow_mut()
                .push(format!("restore {family} {backend}\n{input}"));
            match (self.fail)(family, input) {
                Some(f) => Err(f),
                None => Ok(()),
            }
        }
        /// The restores run one after the other at the release.
        fn start_restores(&self, jobs: Vec<RestoreJob>) -> anyhow::Result<Box<dyn Held + '_>> {
            Ok(Box::new(OneByOne { fake: self, jobs }))
        }
        fn save(&self, family: Family, backend: IptablesVariant) -> anyhow::Result<String> {
            self.calls
                .borrow_mut()
                .push(format!("save {family} {backend}"));
            Ok(self.saves[usize::from(backend == IptablesVariant::Legacy)].clone())
        }
        fn legacy_tables(&self, _: Family) -> Vec<String> {
            self.legacy.clone()
        }
    }

    /// Prepares and commits `rulesets` with the default options.
    fn apply(fake: &Fake, rulesets: Vec<Ruleset>) -> anyhow::Result<Vec<FamilyReport>> {
        prepare(fake, &Options::default(), rulesets)?.commit()
    }

    fn rulesets(args: &[&str]) -> Vec<Ruleset> {
        use crate::capture::{Facts, build};
        use crate::settings::cli::Defaults;
        use crate::settings::config::tests::resolve;
        let cfg = resolve(Defaults::Native, args, &[]).unwrap();
        let facts = Facts {
            ipv6: true,
            dns_servers: vec![],
        };
        build(&cfg, &facts).rulesets()
    }

    #[test]
    fn fresh_namespace_runs_one_restore_per_family_and_nothing_else() {
        let fake = Fake {
            calls: RefCell::default(),
            fail: Box::new(|_, _| None),
            ..Fake::new()
        };
        let rs = rulesets(&[]);
        let reports = apply(&fake, rs.clone()).unwrap();
        let calls = fake.calls.borrow();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[0],
            format!("restore IPv4 nft\n{}", render::ruleset_text(&rs[0]))
        );
        assert_eq!(
            calls[1],
            format!("restore IPv6 nft\n{}", render::ruleset_text(&rs[1]))
        );
        assert!(reports.iter().all(|r| r.outcome == Outcome::Applied));
    }

    #[test]
    fn ipv6_failure_rolls_back_every_ipv4_table() {
        let fake = Fake {
            calls: RefCell::default(),
            fail: Box::new(|family, input| {
                (family == Family::V6 && input.contains("-N ")).then(|| RestoreFailure {
                    program: "ip6tables-nft-restore".into(),
                    stderr: "ip6tables-nft-restore: line 3 failed: boom\n".into(),
                    line: Some(3),
                })
            }),
            ..Fake::new()
        };
        let rs = rulesets(&["-m", "TPROXY"]);
        let err = apply(&fake, rs.clone()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("IPv4 rules applied by this run were rolled back"),
            "{msg}"
        );
        assert!(
            msg.contains("IPv6 (nft backend): ip6tables-nft-restore failed at line 3"),
            "{msg}"
        );
        assert!(msg.contains(": boom"), "{msg}");
        let calls = fake.calls.borrow();
        assert_eq!(calls.len(), 3, "{calls:#?}");
        assert_eq!(
            calls[2],
            format!(
                "restore IPv4 nft\n{}",
                state::undo_text(&rs[0], &[Table::Mangle, Table::Nat])
            )
        );
    }

    #[test]
    fn an_ipv4_failure_rolls_back_the_ipv6_rules_applied_alongside() {
        // Both families start together, so IPv6 may succeed while IPv4 fails: undone too.
        let fake = Fake {
            calls: RefCell::default(),
            fail: Box::new(|family, input| {
                (family == Family::V4 && input.contains("-N ")).then(|| RestoreFailure {
                    program: "iptables-nft-restore".into(),
                    stderr: "iptables-nft-restore: line 2 failed: boom\n".into(),
                    line: Some(2),
                })
            }),
            ..Fake::new()
        };
        let rs = rulesets(&["-m", "TPROXY"]);
        let err = apply(&fake, rs.clone()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("IPv6 rules applied by this run were rolled back"),
            "{msg}"
        );
        assert!(msg.contains("IPv4 (nft backend): iptables-nft-restore failed at line 2"));
        let calls = fake.calls.borrow();
        assert_eq!(calls.len(), 3, "{calls:#?}");
        assert_eq!(
            calls[2],
            format!(
                "restore IPv6 nft\n{}",
                state::undo_text(&rs[1], &[Table::Mangle, Table::Nat])
            )
        );
    }

    /// What `*-save` prints after another configuration's run, with a foreign rule before
    /// the jump and one after it.
    const OTHER_CONFIG: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
        :ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n\
        -A OUTPUT -d 198.18.9.9/32 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n\
        -A OUTPUT -p udp -j ACCEPT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n\
        -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15009\nCOMMIT\n";

    /// A first restore (the only input with `-N`) fails: IPv4's because its chains exist,
    /// IPv6's for another reason.
    fn chains_exist_in_ipv4_and_ipv6_fails(family: Family, input: &str) -> Option<RestoreFailure> {
        let n = input.lines().position(|l| l.starts_with("-N "))? + 1;
        Some(match family {
            Family::V4 => RestoreFailure {
                program: "iptables-nft-restore".into(),
                stderr: format!("iptables-nft-restore: line {n} failed: Chain already exists.\n"),
                line: Some(n),
            },
            Family::V6 => RestoreFailure {
                program: "ip6tables-nft-restore".into(),
                stderr: format!("ip6tables-nft-restore: line {n} failed: boom\n"),
                line: Some(n),
            },
        })
    }

    /// Prepares and commits `rulesets` with --reconcile (and `force_backend`), which must fail:
    /// its error, and [`OTHER_CONFIG`] parsed with the canonical form of the IPv4 rules.
    fn failed_reconcile(
        fake: &Fake,
        rulesets: &[Ruleset],
        force_backend: Option<IptablesVariant>,
    ) -> (String, Saved, state::Canon) {
        let opts = Options {
            reconcile: true,
            force_backend,
            ..Options::default()
        };
        let err = prepare(fake, &opts, rulesets.to_vec())
            .unwrap()
            .commit()
            .unwrap_err();
        let live = state::parse_save(OTHER_CONFIG);
        let canon = state::canon_from_scratch(&live, &rulesets[0], &scratch_names());
        (format!("{err:#}"), live, canon)
    }

    #[test]
    fn ipv6_failure_puts_back_the_ipv4_rules_reconcile_replaced() {
        let fake = Fake {
            fail: Box::new(chains_exist_in_ipv4_and_ipv6_fails),
            saves: [OTHER_CONFIG.into(), String::new()],
            ..Fake::new()
        };
        let rs = rulesets(&[]);
        let (msg, live, canon) = failed_reconcile(&fake, &rs, None);
        assert!(
            msg.starts_with(
                "IPv4 rules reconciled by this run were rolled back; the namespace is as it \
                 was: IPv6 (nft backend): ip6tables-nft-restore failed at line"
            ),
            "{msg}"
        );
        let calls = fake.calls.borrow();
        let converge = state::converge_text(&rs[0], &canon, &live, &scratch_names());
        let revert = state::revert_text(&rs[0], &canon, &live);
        let n = calls.len();
        assert_eq!(
            calls[n - 2],
            format!("restore IPv4 nft\n{converge}"),
            "{calls:#?}"
        );
        assert_eq!(
            calls[n - 1],
            format!("restore IPv4 nft\n{revert}"),
            "{calls:#?}"
        );
        // The old rules come back: the old REDIRECT port, the jump where it was.
        assert!(revert.contains("-I OUTPUT 2 -j ISTIO_OUTPUT\n"), "{revert}");
        assert!(
            revert.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15009\n"),
            "{revert}"
        );
    }

    #[test]
    fn a_converge_failing_in_its_second_table_puts_the_first_back() {
        let fake = Fake {
            fail: Box::new(|family, input| {
                if let Some(f) = chains_exist_in_ipv4_and_ipv6_fails(family, input) {
                    return Some(f);
                }
                // The converge: mangle commits, nat fails.
                let n = input.lines().position(|l| l.contains("--to-ports 15001"))? + 1;
                (input.starts_with("*mangle") && input.contains(":ISTIO_")).then(|| {
                    RestoreFailure {
                        program: "iptables-nft-restore".into(),
                        stderr: format!("iptables-nft-restore: line {n} failed: nope\n"),
                        line: Some(n),
                    }
                })
            }),
            saves: [OTHER_CONFIG.into(), String::new()],
            ..Fake::new()
        };
        let rs = rulesets(&["-m", "TPROXY", "--ipv6=false"]);
        let (msg, live, canon) = failed_reconcile(&fake, &rs, None);
        assert!(msg.contains(": nope"), "{msg}");
        let revert = state::revert_text(&rs[0], &canon, &live);
        let calls = fake.calls.borrow();
        assert_eq!(
            calls.last().unwrap(),
            &format!(
                "restore IPv4 nft\n{}",
                state::tables_only(&revert, &["mangle"])
            )
        );
    }

    #[test]
    fn the_other_backend_s_rules_removed_by_reconcile_come_back_on_a_failure() {
        // IPv4's rules move from legacy to nft (forced); IPv6 fails: the nft tables go, the
        // legacy rules come back.
        let fake = Fake {
            fail: Box::new(|family, input| {
                (family == Family::V6 && input.contains("-N ")).then(|| RestoreFailure {
                    program: "ip6tables-nft-restore".into(),
                    stderr: "ip6tables-nft-restore: line 2 failed: boom\n".into(),
                    line: Some(2),
                })
            }),
            saves: [String::new(), OTHER_CONFIG.into()],
            legacy: vec!["nat".into()],
            ..Fake::new()
        };
        let rs = rulesets(&[]);
        let (msg, live, canon) = failed_reconcile(&fake, &rs, Some(IptablesVariant::Nft));
        assert!(
            msg.starts_with("IPv4 rules reconciled by this run were rolled back"),
            "{msg}"
        );
        let calls = fake.calls.borrow();
        let n = calls.len();
        assert_eq!(
            calls[n - 2],
            format!(
                "restore IPv4 legacy\n{}",
                state::cleanup_revert_text(&live, &canon, &scratch_names())
            )
        );
        assert_eq!(
            calls[n - 1],
            format!(
                "restore IPv4 nft\n{}",
                state::undo_text(&rs[0], &[Table::Nat])
            )
        );
    }

    #[test]
    fn a_plan_dropped_before_its_commit_applies_no_rule() {
        // The routes failed between the plan and its commit (lib.rs), say.
        let fake = Fake::new();
        let rs = rulesets(&["-m", "TPROXY"]);
        let plan = prepare(&fake, &Options::default(), rs).unwrap();
        drop(plan);
        assert!(fake.calls.borrow().is_empty(), "{:#?}", fake.calls.borrow());
    }

    #[test]
    fn a_table_committed_before_the_failure_is_undone() {
        let fake = Fake {
            calls: RefCell::default(),
            // Fails in the nat table (after mangle's COMMIT), with a non-"exists" reason.
            fail: Box::new(|_, input| {
                input.starts_with("* mangle").then(|| {
                    let n = input
                        .lines()
                        .position(|l| l.contains("REDIRECT --to-ports 15001"))
                        .unwrap()
                        + 1;
                    RestoreFailure {
                        program: "iptables-nft-restore".into(),
                        stderr: format!("iptables-nft-restore: line {n} failed: nope\n"),
                        line: Some(n),
                    }
                })
            }),
            ..Fake::new()
        };
        let rs = rulesets(&["-m", "TPROXY", "--ipv6=false"]);
        let err = apply(&fake, rs[..1].to_vec()).unwrap_err();
        assert!(format!("{err:#}").contains("nope"));
        let calls = fake.calls.borrow();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[1],
            format!(
                "restore IPv4 nft\n{}",
                state::undo_text(&rs[0], &[Table::Mangle])
            )
        );
    }

    const ISTIO_NAT: &str =
        "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";
    const EMPTY_NAT: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    const FOREIGN_FILTER: &str =
        "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n";

    fn choice(fake: &Fake, opts: Options) -> anyhow::Result<(IptablesVariant, Vec<String>)> {
        let c = choose(fake, &opts, Family::V4)?;
        Ok((c.backend, fake.calls.borrow().clone()))
    }

    #[test]
    fn backend_choice_without_footprints() {
        // Fresh namespace: nft, and not a single process.
        let (b, calls) = choice(&Fake::new(), Options::default()).unwrap();
        assert_eq!((b, calls.len()), (IptablesVariant::Nft, 0));

        // An empty legacy table (Istio's probe footprint) does not count.
        let fake = Fake {
            legacy: vec!["nat".into()],
            saves: [String::new(), EMPTY_NAT.into()],
            ..Fake::new()
        };
        let (b, calls) = choice(&fake, Options::default()).unwrap();
        assert_eq!(
            (b, calls),
            (IptablesVariant::Nft, vec!["save IPv4 legacy".to_owned()])
        );

        // Foreign legacy rules: legacy, after checking nft holds no Istio chains.
        let fake = Fake {
            legacy: vec!["filter".into()],
            saves: [String::new(), FOREIGN_FILTER.into()],
            ..Fake::new()
        };
        let (b, calls) = choice(&fake, Options::default()).unwrap();
        assert_eq!(b, IptablesVariant::Legacy);
        assert_eq!(calls, ["save IPv4 legacy", "save IPv4 nft"]);

        // Foreign legacy rules but Istio chains in nft: an error (two copies), or with
        // --reconcile the legacy choice plus a cleanup of nft.
        let fake = Fake {
            legacy: vec!["filter".into()],
            saves: [ISTIO_NAT.into(), FOREIGN_FILTER.into()],
            ..Fake::new()
        };
        let e = choice(&fake, Options::default()).unwrap_err();
        assert!(
            format!("{e}").contains("already exist in the nft iptables backend"),
            "{e}"
        );
        let c = choose(
            &fake,
            &Options {
                reconcile: true,
                ..Options::default()
            },
            Family::V4,
        )
        .unwrap();
        assert!(c.clean_other && c.backend == IptablesVariant::Legacy);

        // Istio chains in legacy win.
        let fake = Fake {
            legacy: vec!["nat".into()],
            saves: [String::new(), ISTIO_NAT.into()],
            ..Fake::new()
        };
        assert_eq!(
            choice(&fake, Options::default()).unwrap().0,
            IptablesVariant::Legacy
        );
    }

    #[test]
    fn forced_backends_refuse_a_second_copy() {
        let fake = Fake {
            legacy: vec!["nat".into()],
            saves: [String::new(), ISTIO_NAT.into()],
            ..Fake::new()
        };
        let opts = Options {
            force_backend: Some(IptablesVariant::Nft),
            ..Options::default()
        };
        let e = choice(&fake, opts).unwrap_err();
        assert!(format!("{e}").contains("legacy iptables backend"), "{e}");

        // Forcing nft on a namespace without legacy tables costs no process.
        let (b, calls) = choice(&Fake::new(), opts).unwrap();
        assert_eq!((b, calls.len()), (IptablesVariant::Nft, 0));
    }
}
