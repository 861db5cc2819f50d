//! One sync, stage after stage: lock → fetch → validate → observe → plan → apply →
//! record. Also the read-only `plan` and `validate` runs, and the errors that decide the
//! exit status.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::apply::{self, Outcome};
use crate::config::{ConfigError, Settings};
use crate::disk::DiskProvisioner;
use crate::files::RepoFiles;
use crate::hypervisor::{HvError, Hypervisor, Libvirt, SchemaChecker};
use crate::manifest::Problem;
use crate::observe;
use crate::packs;
use crate::plan::{self, Plan};
use crate::schema_cache::CachedSchema;
use crate::schema_check;
use crate::source::{self, FetchError};
use crate::state::{self, LockHeld, Record, SyncResult};
use crate::trust::{self, Floor, TrustError};
use crate::validate::{self, Desired, Policy};

/// Why a run did not converge; each kind has its exit status.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("commit {commit} is invalid; nothing was applied:\n{}", list(.problems))]
    Invalid {
        commit: String,
        problems: Vec<Problem>,
    },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Locked(#[from] LockHeld),
    /// The commit is not trusted: unsigned, badly signed, or not descending from what
    /// this host already applied. Nothing was applied.
    #[error("{0}; nothing was applied")]
    Untrusted(#[from] TrustError),
    #[error(
        "{failed} of {total} vms failed at commit {commit}; the last applied commit is unchanged"
    )]
    ActionsFailed {
        commit: String,
        failed: usize,
        total: usize,
    },
    #[error(
        "commit {commit} failed {attempts} times in a row; not retrying it until a newer commit arrives (`vmsync --once` retries it now)"
    )]
    GaveUp { commit: String, attempts: u32 },
    #[error(transparent)]
    Libvirt(#[from] HvError),
    #[error("commit {commit} is refused; nothing was applied: {message}")]
    Refused { commit: String, message: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl SyncError {
    /// The documented exit status (DESIGN.md).
    pub fn exit_code(&self) -> u8 {
        match self {
            SyncError::Config(_) => 2,
            SyncError::Invalid { .. } | SyncError::Refused { .. } => 3,
            SyncError::Fetch(_) => 4,
            SyncError::Untrusted(_) => 5,
            SyncError::Locked(_) => 75,
            SyncError::ActionsFailed { .. }
            | SyncError::GaveUp { .. }
            | SyncError::Libvirt(_)
            | SyncError::Other(_) => 1,
        }
    }
}

/// Maps an anyhow error from locking to `Locked` when it is one.
fn lock(settings: &Settings) -> Result<state::Lock, SyncError> {
    state::lock(&settings.state_dir).map_err(|e| match e.downcast::<LockHeld>() {
        Ok(held) => SyncError::Locked(held),
        Err(e) => SyncError::Other(e),
    })
}

fn policy(settings: &Settings) -> Policy {
    Policy {
        host: Some(settings.host.clone()),
        disk_roots: settings.disk_roots.clone(),
        host_policy: settings.host_policy.clone(),
    }
}

/// The schema cache of `state_dir` for `policy`: anything that changes what validation
/// accepts invalidates the cache.
fn load_cache(state_dir: Option<&std::path::Path>, policy: &Policy) -> CachedSchema {
    CachedSchema::load(state_dir, &format!("{policy:?}"))
}

/// Validates with the schema cache of `state_dir` and saves what it learned.
fn validate_cached(
    files: &dyn RepoFiles,
    commit: &str,
    policy: &Policy,
    state_dir: Option<&std::path::Path>,
) -> Result<Desired, SyncError> {
    let schema = load_cache(state_dir, policy);
    let result = validate_commit(files, commit, policy, &schema);
    debug!(schema_checks = schema.misses(), "validated");
    schema.save();
    debug!("schema cache saved");
    result
}

/// Validation for a sync whose libvirt schema checks run in a child ([`schema_check`])
/// while the host is observed; [`SchemaChecks::finish`] has the verdict before anything
/// is planned.
///
/// One XML alone to check (a commit that changes one file) is held back instead: when
/// the plan shows that nothing changes before that VM's define, nor at all if the define
/// fails ([`Plan::changes_wait_for_define_of`]), libvirt's validating define is its check
/// (the same schema, and libvirt's own parser), and the child is started only if the
/// define fails, to tell a schema rejection (exit 3) from a failed action. Otherwise it
/// is checked before anything is applied, as the others.
struct SchemaChecks<'a> {
    cache: CachedSchema,
    unchecked: Vec<validate::Unchecked>,
    running: Option<Verdicts>,
    exe: &'a std::path::Path,
    held: Held,
}

/// What happens to the one unchecked XML of a one-file commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Nothing held back: every unchecked XML goes to the child.
    No,
    /// Held back, waiting for the plan.
    Waiting,
    /// Left to its validating define.
    ToDefine,
}

/// Where the verdicts come from.
enum Verdicts {
    Child(schema_check::Running),
    /// Checked in this process: the child could not be started (no `/proc`, say).
    Here(Vec<Option<String>>),
}

impl SchemaChecks<'_> {
    /// Starts the child on the unchecked XML of `desired`, if there is any (and holds
    /// back a single one, with `hold_one`). If the child cannot even be started, the
    /// checks run here instead (same verdicts, more memory); a child that started and
    /// then failed is an error, never a reason to parse here.
    fn start(&mut self, desired: &Desired, hold_one: bool) -> Result<(), SyncError> {
        self.held = if hold_one && self.unchecked.len() == 1 {
            Held::Waiting
        } else {
            Held::No
        };
        if self.unchecked.is_empty() || self.held == Held::Waiting {
            return Ok(());
        }
        let exe = self.exe;
        let xmls: Vec<&str> = self
            .unchecked
            .iter()
            .map(|u| u.of(desired).xml.as_str())
            .collect();
        let verdicts = match schema_check::spawn(exe, &xmls) {
            Ok(running) => Verdicts::Child(running),
            Err(e) => {
                warn!(error = %e, "checking the schema in this process instead");
                let schema = crate::hypervisor::TestDriverSchema::new()?;
                Verdicts::Here(schema_check::check_here(&schema, &xmls))
            }
        };
        debug!(xmls = xmls.len(), "schema checks started");
        self.running = Some(verdicts);
        Ok(())
    }

    /// Waits for the child, remembers what passed, returns libvirt's rejections.
    fn finish(&mut self, desired: &Desired) -> Result<Vec<Problem>, SyncError> {
        let verdicts = match self.running.take() {
            None => return Ok(Vec::new()),
            Some(Verdicts::Here(verdicts)) => verdicts,
            Some(Verdicts::Child(running)) => running.wait().map_err(|e| anyhow::anyhow!(e))?,
        };
        let mut problems = Vec::new();
        for (unchecked, verdict) in self.unchecked.iter().zip(verdicts) {
            let vm = unchecked.of(desired);
            match verdict {
                Some(message) => problems.push(unchecked.rejected(desired, &message)),
                None => {
                    self.cache
                        .record_pass(&vm.xml, unchecked.content_id.as_deref(), &vm.summary)
                }
            }
        }
        self.cache.save();
        debug!(rejected = problems.len(), "schema checks done");
        Ok(problems)
    }

    /// Checks what is held back now.
    fn check_held(&mut self, desired: &Desired) -> Result<Vec<Problem>, SyncError> {
        self.start(desired, false)?;
        self.finish(desired)
    }

    /// Before anything is applied: leaves the held XML to its define if `plan` allows
    /// it, else checks it now.
    fn planned(&mut self, desired: &Desired, plan: &Plan) -> Result<Vec<Problem>, SyncError> {
        if self.held != Held::Waiting {
            return Ok(Vec::new());
        }
        let vm = self.unchecked[0].of(desired);
        if plan.changes_wait_for_define_of(&vm.name) {
            debug!(vm = %vm.name, "schema check left to libvirt's validating define");
            self.held = Held::ToDefine;
            return Ok(Vec::new());
        }
        self.check_held(desired)
    }

    /// After applying: a define that passed libvirt's validation is remembered; one that
    /// did not happen (it failed, or the sync stopped before it) has its XML checked now,
    /// so that a schema rejection is reported as one (nothing was changed).
    fn applied(&mut self, desired: &Desired, outcome: &Outcome) -> Result<Vec<Problem>, SyncError> {
        if self.held != Held::ToDefine {
            return Ok(Vec::new());
        }
        let unchecked = &self.unchecked[0];
        let vm = unchecked.of(desired);
        let defined = outcome.vms.iter().any(|o| {
            o.name == vm.name && o.kinds.iter().any(|k| matches!(*k, "define" | "redefine"))
        });
        if !defined {
            return self.check_held(desired);
        }
        self.cache
            .record_pass(&vm.xml, unchecked.content_id.as_deref(), &vm.summary);
        self.cache.save();
        self.held = Held::No;
        Ok(Vec::new())
    }
}

/// What a sync checks around planning and applying ([`apply_commit_checked`]); the
/// default checks nothing.
pub trait Gate {
    /// What was observed, before anything is planned.
    fn observed(&self, _observed: &observe::Observed) -> Result<(), SyncError> {
        Ok(())
    }
    /// The plan, before anything is applied.
    fn planned(&self, _plan: &Plan) -> Result<(), SyncError> {
        Ok(())
    }
    /// What applying did, before it is recorded: an error here records nothing of it.
    fn applied(&self, _outcome: &Outcome) -> Result<(), SyncError> {
        Ok(())
    }
}

/// Stage durations as the `converged` line shows them: `fetch 0.5, observe 107.2` (ms).
fn stages_ms(stages: &[(&'static str, Duration)]) -> String {
    stages
        .iter()
        .map(|(stage, took)| format!("{stage} {:.1}", took.as_secs_f64() * 1000.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// No checks.
struct Open;
impl Gate for Open {}

/// The checks of [`run`]: libvirt's schema verdicts (from the child, or from the
/// validating define) and the ancestry floors in the managed domains' tags.
struct RunGate<'a> {
    checks: std::cell::RefCell<Option<SchemaChecks<'a>>>,
    desired: &'a Desired,
    commit: &'a str,
    fetched: &'a source::FetchedCommit,
    allow_rewind: bool,
}

impl RunGate<'_> {
    /// Runs one step of the schema checks; their rejections make the commit invalid.
    fn verdict(
        &self,
        step: impl FnOnce(&mut SchemaChecks) -> Result<Vec<Problem>, SyncError>,
    ) -> Result<(), SyncError> {
        let problems = match self.checks.borrow_mut().as_mut() {
            Some(checks) => step(checks)?,
            None => return Ok(()),
        };
        if problems.is_empty() {
            return Ok(());
        }
        Err(SyncError::Invalid {
            commit: self.commit.to_string(),
            problems,
        })
    }
}

impl Gate for RunGate<'_> {
    fn observed(&self, observed: &observe::Observed) -> Result<(), SyncError> {
        // Observation changed nothing; the schema's verdict comes before any plan.
        self.verdict(|checks| checks.finish(self.desired))?;
        check_floors(self.fetched, &observed_floors(observed), self.allow_rewind)
    }
    fn planned(&self, plan: &Plan) -> Result<(), SyncError> {
        self.verdict(|checks| checks.planned(self.desired, plan))
    }
    fn applied(&self, outcome: &Outcome) -> Result<(), SyncError> {
        self.verdict(|checks| checks.applied(self.desired, outcome))
    }
}

/// Validates the files of one revision for this host, and starts libvirt's schema checks
/// of the XML not seen before in a child (`exe schema-check`). (Started after the
/// validation, not before it: on two cores the child's start slowed the validation by
/// more than it saved.)
fn validate_started<'a>(
    files: &dyn RepoFiles,
    commit: &str,
    policy: &Policy,
    state_dir: &std::path::Path,
    exe: &'a std::path::Path,
) -> Result<(Desired, SchemaChecks<'a>), SyncError> {
    let invalid = |problems| SyncError::Invalid {
        commit: commit.to_string(),
        problems,
    };
    let cache = load_cache(Some(state_dir), policy);
    let outcome = validate::validate_deferred(files, policy, &cache).map_err(invalid)?;
    let mut checks = SchemaChecks {
        cache,
        unchecked: outcome.unchecked,
        running: None,
        exe,
        held: Held::No,
    };
    // A commit invalid anyway has every XML checked now, so one run shows every mistake.
    checks.start(&outcome.desired, outcome.problems.is_empty())?;
    debug!(unchecked = checks.unchecked.len(), "validated");
    if checks.running.is_none() {
        // Nothing left to check: what this validation learned is saved now (else by
        // `finish`).
        checks.cache.save();
    }
    if !outcome.problems.is_empty() {
        // Invalid anyway; the schema's verdict on the rest too, so one run shows every
        // mistake.
        let mut problems = outcome.problems;
        problems.extend(checks.finish(&outcome.desired)?);
        return Err(invalid(problems));
    }
    Ok((outcome.desired, checks))
}

/// Validates the files of one revision for this host.
pub fn validate_commit(
    files: &dyn RepoFiles,
    commit: &str,
    policy: &Policy,
    schema: &dyn SchemaChecker,
) -> Result<Desired, SyncError> {
    validate::validate(files, policy, schema).map_err(|problems| SyncError::Invalid {
        commit: commit.to_string(),
        problems,
    })
}

/// What a finished sync did.
#[derive(Debug)]
pub struct Report {
    pub commit: String,
    pub plan: Plan,
    pub outcome: Outcome,
}

/// A libvirt connection kept across syncs (by the daemon), reopened when it died.
pub struct Connection {
    uri: String,
    conn: Option<Libvirt>,
}

impl Connection {
    pub fn new(uri: &str) -> Self {
        Self {
            uri: uri.to_string(),
            conn: None,
        }
    }

    /// Switches to `uri` (after a config reload), dropping the old connection if it differs.
    pub fn set_uri(&mut self, uri: &str) {
        if self.uri != uri {
            self.uri = uri.to_string();
            self.conn = None;
        }
    }

    /// The open connection, (re)connecting if there is none or it is dead.
    pub fn get(&mut self) -> Result<&Libvirt, HvError> {
        if !self.conn.as_ref().is_some_and(Libvirt::alive) {
            self.conn = Some(Libvirt::connect(&self.uri)?);
        }
        Ok(self.conn.as_ref().expect("just connected"))
    }
}

/// How a sync runs.
pub struct Options<'a> {
    /// Refuse a commit that already failed this many times in a row (the daemon).
    pub give_up_after: Option<u32>,
    /// Set to stop after the action in flight.
    pub cancel: &'a AtomicBool,
    /// Accept a commit that does not descend from what this host applied
    /// (`vmsync --once --allow-rewind`); the signature is still checked.
    pub allow_rewind: bool,
    /// This program ([`schema_check::SELF_EXE`]), for the children a sync starts:
    /// libvirt's schema checks, in parallel with observing the host, and the packing of
    /// the local clone ([`packs`]); `None`: both in this process (the checks before
    /// observing).
    pub child_exe: Option<&'a std::path::Path>,
}

/// `vmsync --once`: one sync with a fresh connection.
pub fn once(settings: &Settings) -> Result<Report, SyncError> {
    once_with(settings, false)
}

/// `vmsync --once [--allow-rewind]`.
pub fn once_with(settings: &Settings, allow_rewind: bool) -> Result<Report, SyncError> {
    let cancel = AtomicBool::new(false);
    run(
        settings,
        &mut Connection::new(&settings.libvirt_uri),
        &Options {
            give_up_after: None,
            cancel: &cancel,
            allow_rewind,
            child_exe: Some(std::path::Path::new(schema_check::SELF_EXE)),
        },
    )
}

/// Refuses an untrusted commit before anything else looks at it: the signature (when
/// `[trust] allowed_signers` is set) and ancestry from the last applied commit.
fn check_commit(
    settings: &Settings,
    record: &Record,
    fetched: &source::FetchedCommit,
    allow_rewind: bool,
) -> Result<(), SyncError> {
    if let Some(path) = &settings.allowed_signers {
        let signers = trust::AllowedSigners::load(path)
            .map_err(|e| SyncError::Config(ConfigError(e.to_string())))?;
        let signer = trust::verify_commit(fetched.repository(), fetched.oid(), &signers)?;
        info!(commit = %fetched.short(), principals = %signer.principals, key = %signer.fingerprint, "signature verified");
    }
    let floors: Vec<Floor> = record
        .last_applied_commit
        .iter()
        .map(|commit| Floor {
            commit: commit.clone(),
            source: "the last applied commit in state.json".into(),
        })
        .collect();
    check_floors(fetched, &floors, allow_rewind)
}

/// The commits the managed domains were defined from (their ownership tags, as
/// observation read them): the ancestry floor that survives the loss of state.json.
fn observed_floors(observed: &observe::Observed) -> Vec<Floor> {
    let mut floors: Vec<Floor> = Vec::new();
    for (name, seen) in &observed.domains {
        if let Some(tag) = seen.inactive.as_ref().and_then(|s| s.tag.as_ref())
            && !tag.commit.is_empty()
            && !floors.iter().any(|f| f.commit == tag.commit)
        {
            floors.push(Floor {
                commit: tag.commit.clone(),
                source: format!("the commit domain '{name}' was defined from"),
            });
        }
    }
    floors
}

fn check_floors(
    fetched: &source::FetchedCommit,
    floors: &[Floor],
    allow_rewind: bool,
) -> Result<(), SyncError> {
    match trust::check_ancestry(fetched.repository(), fetched.oid(), floors) {
        Ok(()) => Ok(()),
        Err(e) if allow_rewind => {
            warn!(commit = %fetched.short(), reason = %e, "accepting a commit that does not descend from what was applied (--allow-rewind)");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// One sync: lock, fetch, validate, observe, plan, apply, record, then the metrics file.
pub fn run(
    settings: &Settings,
    conn: &mut Connection,
    options: &Options,
) -> Result<Report, SyncError> {
    let started = Instant::now();
    let result = run_locked(settings, conn, options);
    if let Some(path) = &settings.metrics_file
        && !matches!(result, Err(SyncError::Locked(_)))
    {
        let record = state::load(&settings.state_dir).unwrap_or_default();
        let text = crate::metrics::render(&record, result.as_ref().ok(), started.elapsed());
        if let Err(e) = state::write_atomic(path, text.as_bytes()) {
            warn!(error = %e, "failed to write the metrics file");
        }
    }
    result
}

fn run_locked(
    settings: &Settings,
    conn: &mut Connection,
    options: &Options,
) -> Result<Report, SyncError> {
    let _lock = lock(settings)?;
    let mut record = state::load(&settings.state_dir)?;
    let source = settings.source()?;
    let fetch_started = Instant::now();
    let fetched = match source::fetch(&source, &settings.state_dir) {
        Ok(fetched) => fetched,
        Err(e) => {
            record_failure(
                settings,
                &mut record,
                None,
                SyncResult::FetchFailed,
                &e.to_string(),
            );
            return Err(e.into());
        }
    };
    let fetch_took = fetch_started.elapsed();
    let commit = fetched.id();
    if let Some(max) = options.give_up_after
        && record.last_attempted_commit.as_deref() == Some(commit.as_str())
        && record.last_result != Some(SyncResult::Converged)
        && record.failed_attempts >= max
    {
        return Err(SyncError::GaveUp {
            commit,
            attempts: record.failed_attempts,
        });
    }
    let result = (|| {
        let validate_started_at = Instant::now();
        check_commit(settings, &record, &fetched, options.allow_rewind)?;
        let policy = policy(settings);
        let (desired, checks) = match options.child_exe {
            Some(exe) => {
                let (desired, checks) =
                    validate_started(&fetched, &commit, &policy, &settings.state_dir, exe)?;
                (desired, Some(checks))
            }
            None => (
                validate_cached(&fetched, &commit, &policy, Some(&settings.state_dir))?,
                None,
            ),
        };
        let validate_took = validate_started_at.elapsed();
        let connect_started = Instant::now();
        let hv = conn.get()?;
        let gate = RunGate {
            checks: std::cell::RefCell::new(checks),
            desired: &desired,
            commit: &commit,
            fetched: &fetched,
            allow_rewind: options.allow_rewind,
        };
        let stages_before = [
            ("fetch", fetch_took),
            ("validate", validate_took),
            ("connect", connect_started.elapsed()),
        ];
        apply_commit_checked(
            settings,
            &mut record,
            &commit,
            &desired,
            hv,
            &crate::disk::QemuImg::default(),
            options.cancel,
            &gate,
            &stages_before,
        )
    })();
    if let Err(e) = &result
        && !matches!(e, SyncError::ActionsFailed { .. })
    {
        let kind = match e {
            SyncError::Invalid { .. } => SyncResult::Invalid,
            SyncError::Refused { .. } => SyncResult::Refused,
            SyncError::Untrusted(_) => SyncResult::Untrusted,
            _ => SyncResult::Failed,
        };
        record_failure(settings, &mut record, Some(&commit), kind, &e.to_string());
    }
    // Still under the lock, with the clone closed: one pack instead of many, now and then.
    drop(fetched);
    packs::tidy(&settings.state_dir, options.child_exe);
    result
}

/// Records a failed attempt; the last applied commit and the VMs' records stay.
fn record_failure(
    settings: &Settings,
    record: &mut Record,
    commit: Option<&str>,
    result: SyncResult,
    message: &str,
) {
    if let Some(commit) = commit {
        record.count_failure(commit);
        record.last_attempted_commit = Some(commit.to_string());
    }
    record.last_attempt_at = Some(state::now_rfc3339());
    record.last_result = Some(result);
    record.last_error = Some(message.to_string());
    if let Err(e) = state::save(&settings.state_dir, record) {
        error!(error = %e, "failed to record the failed attempt");
    }
}

/// Observe → plan → apply → record, for a validated commit. Exposed for tests that
/// bring their own hypervisor and provisioner.
pub fn apply_commit(
    settings: &Settings,
    record: &mut Record,
    commit: &str,
    desired: &Desired,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
    cancel: &AtomicBool,
) -> Result<Report, SyncError> {
    apply_commit_checked(
        settings,
        record,
        commit,
        desired,
        hv,
        disks,
        cancel,
        &Open,
        &[],
    )
}

/// [`apply_commit`] with the checks of `gate`: of what was observed before anything is
/// planned (the sync checks the commits in the managed domains' tags there: the ancestry
/// floor that survives a lost state file, without reading any domain twice), of the plan
/// before anything is applied, and of the outcome before it is recorded. `stages_before`:
/// how long the caller's stages took (fetch, validate, connect), for the `converged` line.
#[allow(clippy::too_many_arguments)]
pub fn apply_commit_checked(
    settings: &Settings,
    record: &mut Record,
    commit: &str,
    desired: &Desired,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
    cancel: &AtomicBool,
    gate: &dyn Gate,
    stages_before: &[(&'static str, Duration)],
) -> Result<Report, SyncError> {
    let short = &commit[..commit.len().min(12)];
    let calls_before = hv.call_count();
    let mut stages = stages_before.to_vec();
    let mut stage_started = Instant::now();
    let mut stage_done = |stage: &'static str| {
        stages.push((stage, stage_started.elapsed()));
        stage_started = Instant::now();
    };
    let observed = observe_commit(record, desired, hv, disks)?;
    debug!(domains = observed.domains.len(), "observed");
    gate.observed(&observed)?;
    stage_done("observe");
    let ctx = plan::Context {
        policy: &settings.changes,
        record,
    };
    let plan = plan::plan(desired, &observed, commit, &ctx);
    gate.planned(&plan)?;
    if let Some(message) = &plan.refused {
        // Nothing of the commit is applied; `once` records the refusal.
        return Err(SyncError::Refused {
            commit: commit.to_string(),
            message: message.clone(),
        });
    }
    if plan.is_noop() && plan.vms.iter().all(|vm| vm.error.is_none()) {
        info!(commit = %short, vms = plan.vms.len(), "nothing to do: every vm is converged");
    }
    debug!("planned");
    stage_done("plan");
    let outcome = apply::apply(&plan, hv, disks, cancel);
    debug!("applied");
    gate.applied(&outcome)?;
    stage_done("apply");

    let now = state::now_rfc3339();
    let mut vms = BTreeMap::new();
    for vm in &outcome.vms {
        let old = record.vms.get(&vm.name).cloned().unwrap_or_default();
        let entry = vm.record(commit, old);
        vms.insert(vm.name.clone(), entry);
    }
    // Managed domains left in place (pruning off, or failed) stay in the record: they
    // are still this agent's, and may be pruned later.
    for p in &plan.prune {
        let pruned = outcome
            .pruned
            .iter()
            .any(|o| o.name == p.name && o.error.is_none());
        if !pruned && let Some(old) = record.vms.get(&p.name) {
            vms.insert(p.name.clone(), old.clone());
        }
    }
    record.vms = vms;
    if !outcome.all_ok() {
        record.count_failure(commit);
    } else {
        record.failed_attempts = 0;
    }
    for p in &outcome.pruned {
        for disk in &p.orphaned_disks {
            record
                .orphaned_disks
                .insert(disk.display().to_string(), p.name.clone());
        }
    }
    record
        .orphaned_disks
        .retain(|path, _| std::path::Path::new(path).exists());
    record.last_attempted_commit = Some(commit.to_string());
    record.last_attempt_at = Some(now.clone());
    let failed = outcome.vms.iter().filter(|vm| vm.error.is_some()).count()
        + outcome.pruned.iter().filter(|p| p.error.is_some()).count();
    let result = if outcome.all_ok() {
        record.last_applied_commit = Some(commit.to_string());
        record.last_applied_at = Some(now);
        record.last_result = Some(SyncResult::Converged);
        record.last_error = None;
        info!(
            commit = %short,
            vms = outcome.vms.len(),
            changes = outcome.changes(),
            libvirt_calls = hv.call_count() - calls_before,
            stages_ms = %stages_ms(&stages),
            "converged"
        );
        Ok(())
    } else {
        record.last_result = Some(SyncResult::Failed);
        let mut errors = outcome.directory_errors.clone();
        errors.extend(
            outcome
                .vms
                .iter()
                .filter_map(|vm| vm.error.as_ref().map(|e| format!("vm '{}': {e}", vm.name))),
        );
        errors.extend(
            outcome
                .pruned
                .iter()
                .filter_map(|p| p.error.as_ref().map(|e| format!("prune '{}': {e}", p.name))),
        );
        record.last_error = Some(errors.join("; "));
        Err(SyncError::ActionsFailed {
            commit: commit.to_string(),
            failed: failed.max(1),
            total: outcome.vms.len(),
        })
    };
    state::save(&settings.state_dir, record)?;
    result.map(|()| Report {
        commit: commit.to_string(),
        plan,
        outcome,
    })
}

/// `vmsync plan` and `vmsync --once --dry-run`: fetch, validate, observe and plan, with
/// a diff per definition; changes nothing on the host (nor the record).
pub fn plan_only(settings: &Settings) -> Result<Plan, SyncError> {
    let _lock = lock(settings)?;
    let record = state::load(&settings.state_dir)?;
    let fetched = source::fetch(&settings.source()?, &settings.state_dir)?;
    let commit = fetched.id();
    check_commit(settings, &record, &fetched, false)?;
    let desired = validate_cached(
        &fetched,
        &commit,
        &policy(settings),
        Some(&settings.state_dir),
    )?;
    let hv = crate::hypervisor::Libvirt::connect(&settings.libvirt_uri)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let observed = observe_commit(&record, &desired, &hv, &crate::disk::QemuImg::default())?;
    check_floors(&fetched, &observed_floors(&observed), false)?;
    let normalizer = crate::hypervisor::TestDriverSchema::new()?;
    Ok(plan_observed(
        settings,
        &record,
        &commit,
        &desired,
        &observed,
        &normalizer,
    ))
}

/// Observe → plan → diffs, for a validated commit; changes nothing. Exposed for tests.
pub fn plan_commit(
    settings: &Settings,
    record: &Record,
    commit: &str,
    desired: &Desired,
    hv: &dyn Hypervisor,
    normalizer: &dyn crate::hypervisor::Normalizer,
) -> Result<Plan, SyncError> {
    let observed = observe_commit(record, desired, hv, &crate::disk::QemuImg::default())?;
    Ok(plan_observed(
        settings, record, commit, desired, &observed, normalizer,
    ))
}

/// Observes the host for `desired`, with this agent's record (prune candidates and
/// their drift baselines).
fn observe_commit(
    record: &Record,
    desired: &Desired,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
) -> Result<observe::Observed, SyncError> {
    let applied = record
        .vms
        .iter()
        .map(|(name, vm)| (name.clone(), vm.definition_hash.clone()))
        .collect();
    observe::observe(desired, &applied, hv, disks).map_err(|e| anyhow::anyhow!("{e}").into())
}

/// Plan → diffs for what was observed; changes nothing.
fn plan_observed(
    settings: &Settings,
    record: &Record,
    commit: &str,
    desired: &Desired,
    observed: &observe::Observed,
    normalizer: &dyn crate::hypervisor::Normalizer,
) -> Plan {
    let ctx = plan::Context {
        policy: &settings.changes,
        record,
    };
    let mut plan = plan::plan(desired, observed, commit, &ctx);
    crate::diff::annotate(&mut plan, normalizer);
    plan
}

/// `vmsync validate DIR`: validates a checkout on disk for every host, offline.
pub fn validate_dir(settings: &Settings, dir: &std::path::Path) -> Result<Desired, SyncError> {
    let files = crate::files::DirFiles::new(dir);
    let policy = Policy {
        host: None,
        disk_roots: settings.disk_roots.clone(),
        host_policy: settings.host_policy.clone(),
    };
    validate_cached(&files, &dir.display().to_string(), &policy, None)
}
