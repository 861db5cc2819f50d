//! One sync, stage after stage: lock → fetch → check trust → validate → observe →
//! plan → apply → record. Also the read-only `plan` and `validate` runs.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::agent::report::Report;
use crate::apply::vms;
use crate::config::{ConfigError, Settings};
use crate::desired::desired_state::{Desired, Policy};
use crate::desired::manifest::Problem;
use crate::desired::schema_check::{SchemaChecker, SchemaError};
use crate::desired::validate;
pub use crate::error::SyncError;
use crate::host::disk::DiskProvisioner;
pub use crate::host::hypervisor::Connection;
use crate::host::hypervisor::Hypervisor;
use crate::host::schema_cache::CachedSchema;
use crate::host::{observe_domains, schema_cache};
use crate::reconcile::plan_types::Plan;
use crate::reconcile::{plan, record_update};
use crate::record::{Record, store};
use crate::repo::files::RepoFiles;
use crate::repo::source;
use crate::repo::trust::{self, Floor};
use crate::util::{clock, fsio};

/// Takes the state directory's lock: held by another vmsync is `Locked` (exit 75).
fn lock(settings: &Settings) -> Result<fsio::Lock, SyncError> {
    fsio::lock(&settings.state_dir).map_err(|e| match e {
        fsio::LockError::Held(held) => SyncError::Locked(held),
        io => SyncError::Other(io.into()),
    })
}

fn policy(settings: &Settings) -> Policy {
    Policy {
        host: Some(settings.host.clone()),
        disk_roots: settings.disk_roots.clone(),
        host_policy: settings.host_policy.clone(),
        render_host: None,
    }
}

/// Validates with the schema cache of `state_dir` (anything that changes what
/// validation accepts, the policy, invalidates it) and saves what it learned.
fn validate_cached(
    files: &dyn RepoFiles,
    commit: &str,
    policy: &Policy,
    state_dir: Option<&std::path::Path>,
) -> Result<Desired, SyncError> {
    let schema = CachedSchema::load(state_dir, &format!("{policy:?}"));
    let result = validate_commit(files, commit, policy, &schema);
    debug!(schema_checks = schema.misses(), "validated");
    schema.save();
    result
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

/// Stage durations as the `converged` line shows them: `fetch 0.5, observe 107.2` (ms).
fn stages_ms(stages: &[(&'static str, Duration)]) -> String {
    stages
        .iter()
        .map(|(stage, took)| format!("{stage} {:.1}", took.as_secs_f64() * 1000.0))
        .collect::<Vec<_>>()
        .join(", ")
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
    /// VMs whose held back definition is tried again (`vmsync --once --retry VM`).
    pub retry: &'a [String],
    /// This sync's events (`[[notify]]`), when the host has any.
    pub events: Option<&'a crate::agent::notify::SyncEvents>,
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

/// The fetched commit, refused unless trusted ([`check_commit`]), then validated for
/// this host with the schema cache of the state directory.
fn trusted_and_valid(
    settings: &Settings,
    record: &Record,
    fetched: &source::FetchedCommit,
    allow_rewind: bool,
) -> Result<Desired, SyncError> {
    check_commit(settings, record, fetched, allow_rewind)?;
    validate_cached(
        fetched,
        &fetched.id(),
        &policy(settings),
        Some(&settings.state_dir),
    )
}

/// The commits the managed domains were defined from (their ownership tags, as
/// observation read them): the ancestry floor that survives the loss of state.json.
fn observed_floors(observed: &observe_domains::Observed) -> Vec<Floor> {
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
    run_with_metrics(settings, conn, options, false).0
}

/// [`run`], also returning the metrics text it rendered: always when `render` is set
/// (the daemon's `/metrics`), else only for `[agent] metrics_file`; never when another
/// vmsync held the lock (nothing was attempted).
pub fn run_with_metrics(
    settings: &Settings,
    conn: &mut Connection,
    options: &Options,
    render: bool,
) -> (Result<Report, SyncError>, Option<String>) {
    let started = Instant::now();
    let result = run_locked(settings, conn, options);
    let record = || store::load(&settings.state_dir).unwrap_or_default();
    if let Some(events) = options.events {
        events.finish(&result, &record());
    }
    let text = ((render || settings.metrics_file.is_some())
        && !matches!(result, Err(SyncError::Locked(_))))
    .then(|| {
        crate::agent::metrics::render(&record(), result.as_ref().ok(), started.elapsed())
            + &crate::agent::metrics::agent_extras(&settings.state_dir)
    });
    if let (Some(path), Some(text)) = (&settings.metrics_file, &text)
        && let Err(e) = fsio::write_atomic(path, text.as_bytes())
    {
        warn!(error = %e, "failed to write the metrics file");
    }
    (result, text)
}

fn run_locked(
    settings: &Settings,
    conn: &mut Connection,
    options: &Options,
) -> Result<Report, SyncError> {
    let _lock = lock(settings)?;
    let mut record = store::load(&settings.state_dir)?;
    let source = settings.source()?;
    let fetch_started = Instant::now();
    let fetched =
        match crate::repo::probe::fetch(&source, settings.probe().as_ref(), &settings.state_dir) {
            Ok(fetched) => fetched,
            Err(e) => {
                let e = SyncError::from(e);
                save_failure(settings, &mut record, None, &e);
                return Err(e);
            }
        };
    let fetch_took = fetch_started.elapsed();
    let commit = fetched.id();
    if let Some(max) = options.give_up_after
        && record.gives_up_on(&commit, max)
    {
        return Err(SyncError::GaveUp {
            commit,
            attempts: record.failed_attempts,
        });
    }
    let retried = crate::apply::health_stage::retry(&mut record, options.retry);
    let result = (|| {
        let validate_started = Instant::now();
        check_commit(settings, &record, &fetched, options.allow_rewind)?;
        let (desired, schema, unchecked) = validate_deferring(settings, &fetched, &commit)?;
        let validate_took = validate_started.elapsed();
        let connect_started = Instant::now();
        let hv = conn.get()?;
        let calls_before = hv.call_count();
        let mut stages = vec![
            ("fetch", fetch_took),
            ("validate", validate_took),
            ("connect", connect_started.elapsed()),
        ];
        let observe_started = Instant::now();
        let disks = crate::host::disk::QemuImg::default();
        let observed =
            observe_and_check(&commit, &record, &desired, hv, &disks, &schema, &unchecked)?;
        // The commits in the managed domains' tags: the ancestry floor that survives a
        // lost state file.
        check_floors(&fetched, &observed_floors(&observed), options.allow_rewind)?;
        stages.push(("observe", observe_started.elapsed()));
        apply_observed(
            settings,
            &mut record,
            &commit,
            &desired,
            &observed,
            hv,
            &disks,
            options.cancel,
            (calls_before, stages),
            options.events,
        )
    })();
    if let Err(e) = &result
        && !matches!(e, SyncError::ActionsFailed { .. })
    {
        crate::apply::health_stage::restore(&mut record, retried);
        save_failure(settings, &mut record, Some(&commit), e);
    }
    // Still under the lock, with the clone closed.
    drop(fetched);
    source::tidy(&settings.state_dir);
    result
}

/// Validates the commit for this host with the schema cache, leaving libvirt's checks
/// of the XML the cache has not seen to [`observe_and_check`]: the desired state, the
/// cache, and that XML. An invalid commit is validated again with those checks, so that
/// one run shows every mistake.
fn validate_deferring(
    settings: &Settings,
    fetched: &source::FetchedCommit,
    commit: &str,
) -> Result<(Desired, CachedSchema, Vec<String>), SyncError> {
    let policy = policy(settings);
    let cache = || CachedSchema::load(Some(&settings.state_dir), &format!("{policy:?}"));
    let schema = cache().deferring();
    match validate_commit(fetched, commit, &policy, &schema) {
        Ok(desired) => {
            let unchecked = schema.take_deferred();
            Ok((desired, schema, unchecked))
        }
        Err(e) => Err(validate_commit(fetched, commit, &policy, &cache())
            .err()
            .unwrap_or(e)),
    }
}

/// Observes the host while libvirt's schema checks of `unchecked` run: compiling the
/// schema costs more than a define, and observing only reads. Their verdict is in before
/// anything is planned; a rejection makes the commit invalid, else the cache learns the
/// passes and is saved. (The checks stay on this thread and observing moves to another:
/// with the checks on another thread, the compiled schema went to a malloc arena of its
/// own and a daemon's peak RSS grew by 8 MiB.)
fn observe_and_check(
    commit: &str,
    record: &Record,
    desired: &Desired,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
    schema: &CachedSchema,
    unchecked: &[String],
) -> Result<observe_domains::Observed, SyncError> {
    let (observed, verdicts) = std::thread::scope(|scope| {
        let observing = scope.spawn(|| observe_commit(record, desired, hv, disks));
        let verdicts = schema_cache::check_all(unchecked);
        let observed = observing.join().expect("observing does not panic");
        (observed, verdicts)
    });
    let verdicts = verdicts.map_err(|e| anyhow::anyhow!("{e}"))?;
    let problems = rejections(desired, unchecked, &verdicts);
    if !problems.is_empty() {
        return Err(SyncError::Invalid {
            commit: commit.to_string(),
            problems,
        });
    }
    for xml in unchecked {
        schema.passed(xml);
    }
    schema.save();
    observed
}

/// The problems of the XML libvirt rejected: `verdicts[i]` is libvirt's verdict on
/// `xmls[i]`, the XML of one of `desired`'s VMs.
fn rejections(
    desired: &Desired,
    xmls: &[String],
    verdicts: &[Result<(), SchemaError>],
) -> Vec<Problem> {
    xmls.iter()
        .zip(verdicts)
        .filter_map(|(xml, verdict)| verdict.as_ref().err().map(|e| (xml, e)))
        .flat_map(|(xml, e)| {
            desired
                .vms
                .iter()
                .filter(move |vm| &vm.xml == xml)
                .map(move |vm| Problem {
                    file: vm.xml_file.clone(),
                    line: None,
                    vm: Some(vm.name.clone()),
                    field: Some("xml".into()),
                    message: e.to_string(),
                })
        })
        .collect()
}

/// Records an attempt that failed before anything was applied, if the error is one the
/// record keeps.
fn save_failure(settings: &Settings, record: &mut Record, commit: Option<&str>, e: &SyncError) {
    let Some(result) = e.result() else {
        return;
    };
    record.record_failure(commit, result, &e.to_string(), &clock::now_rfc3339());
    if let Err(e) = store::save(&settings.state_dir, record) {
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
    let (calls_before, started) = (hv.call_count(), Instant::now());
    let observed = observe_commit(record, desired, hv, disks)?;
    let stages = vec![("observe", started.elapsed())];
    apply_observed(
        settings,
        record,
        commit,
        desired,
        &observed,
        hv,
        disks,
        cancel,
        (calls_before, stages),
        None,
    )
}

/// Plan → apply → record, for what was observed. `calls_before` and `stages`: the
/// libvirt call count before observing and how long the stages before took, for the
/// `converged` line.
#[allow(clippy::too_many_arguments)]
fn apply_observed(
    settings: &Settings,
    record: &mut Record,
    commit: &str,
    desired: &Desired,
    observed: &observe_domains::Observed,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
    cancel: &AtomicBool,
    (calls_before, mut stages): (u64, Vec<(&'static str, Duration)>),
    events: Option<&crate::agent::notify::SyncEvents>,
) -> Result<Report, SyncError> {
    let short = &commit[..commit.len().min(12)];
    check_references(commit, desired, observed)?;
    let started = Instant::now();
    let ctx = plan::Context {
        policy: &settings.changes,
        record,
    };
    let mut plan = plan::plan(desired, observed, commit, &ctx);
    if let Some(message) = &plan.refused {
        // Nothing of the commit is applied; the caller records the refusal.
        return Err(SyncError::Refused {
            commit: commit.to_string(),
            message: message.clone(),
        });
    }
    let held = crate::agent::suspend::held_back(&settings.state_dir, &mut plan, short);
    if held.host.is_some() {
        // Nothing is applied nor recorded but the drift just seen (reported, not healed).
        if crate::agent::suspend::note_drift(record, &plan) {
            store::save(&settings.state_dir, record)?;
        }
        return Ok(Report {
            commit: commit.to_string(),
            plan,
            outcome: crate::reconcile::outcome::Outcome::default(),
            held,
        });
    }
    if let Some(events) = events {
        events.applying(commit, record.last_applied_commit.as_deref());
    }
    if plan.is_noop()
        && plan.vms.iter().all(|vm| vm.error.is_none())
        && plan.resources.pools.iter().all(|p| p.error.is_none())
        && plan.resources.networks.iter().all(|p| p.error.is_none())
    {
        info!(commit = %short, vms = plan.vms.len(), "nothing to do: every vm is converged");
    }
    stages.push(("plan", started.elapsed()));
    let started = Instant::now();
    let mut outcome = vms::apply(&plan, hv, disks, cancel);
    stages.push(("apply", started.elapsed()));
    // Health checks of the VMs started with a new definition, and reverts.
    let started = Instant::now();
    let health = crate::apply::health_stage::Stage {
        state_dir: &settings.state_dir,
        commit,
        shutdown_timeout: settings.changes.shutdown_timeout,
    };
    let found =
        crate::apply::health_stage::run(&health, &plan, desired, &mut outcome, record, hv, cancel);
    if !found.is_empty() {
        stages.push(("health", started.elapsed()));
    }
    if let Some(events) = events {
        events.applied(&outcome);
    }
    let before = record.vms.clone();
    record_update::record_outcome(
        record,
        commit,
        plan.prune.iter().map(|p| p.name.as_str()),
        &outcome,
        &clock::now_rfc3339(),
    );
    record_update::record_resources(record, commit, &plan.resources, &outcome.resources);
    crate::apply::health_stage::record(record, &plan, &found);
    crate::agent::suspend::restore_records(record, &before, &held);
    store::save(&settings.state_dir, record)?;
    if !outcome.all_ok() {
        let failed = outcome.vms.iter().filter(|vm| vm.error.is_some()).count()
            + outcome.pruned.iter().filter(|p| p.error.is_some()).count();
        let resources = outcome.resources.failed_names();
        return Err(SyncError::ActionsFailed {
            commit: commit.to_string(),
            failed: if resources.is_empty() {
                failed.max(1)
            } else {
                failed
            },
            total: outcome.vms.len(),
            resources,
        });
    }
    info!(
        commit = %short,
        vms = outcome.vms.len(),
        changes = outcome.changes(),
        libvirt_calls = hv.call_count() - calls_before,
        stages_ms = %stages_ms(&stages),
        "converged"
    );
    Ok(Report {
        commit: commit.to_string(),
        plan,
        outcome,
        held,
    })
}

/// `vmsync plan` and `vmsync --once --dry-run`: fetch, validate, observe and plan, with
/// a diff per definition; changes nothing on the host (nor the record).
pub fn plan_only(settings: &Settings) -> Result<Plan, SyncError> {
    let _lock = lock(settings)?;
    let record = store::load(&settings.state_dir)?;
    let fetched = source::fetch(&settings.source()?, &settings.state_dir)?;
    let commit = fetched.id();
    let desired = trusted_and_valid(settings, &record, &fetched, false)?;
    let hv = crate::host::hypervisor::Libvirt::connect(&settings.libvirt_uri)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let observed = observe_commit(
        &record,
        &desired,
        &hv,
        &crate::host::disk::QemuImg::default(),
    )?;
    check_floors(&fetched, &observed_floors(&observed), false)?;
    check_references(&commit, &desired, &observed)?;
    let normalizer = crate::host::schema_test_driver::TestDriverSchema::new()?;
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
    normalizer: &dyn crate::desired::schema_check::Normalizer,
) -> Result<Plan, SyncError> {
    let observed = observe_commit(record, desired, hv, &crate::host::disk::QemuImg::default())?;
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
) -> Result<observe_domains::Observed, SyncError> {
    let applied = record
        .vms
        .iter()
        .map(|(name, vm)| (name.clone(), vm.definition_hash.clone()))
        .collect();
    let mut observed = observe_domains::observe(desired, &applied, hv, disks)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    observed.resources = crate::host::observe_networks_pools::observe(
        &desired.resources,
        &recorded_resources(record),
        hv,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(observed)
}

/// The networks and pools this agent's record says it applied.
fn recorded_resources(
    record: &Record,
) -> std::collections::BTreeSet<(crate::desired::resource_xml::ResourceKind, String)> {
    use crate::desired::resource_xml::ResourceKind;
    let networks = record
        .networks
        .keys()
        .map(|n| (ResourceKind::Network, n.clone()));
    let pools = record.pools.keys().map(|n| (ResourceKind::Pool, n.clone()));
    networks.chain(pools).collect()
}

/// The networks, pools and volumes the commit's domains name that neither the commit
/// nor the host has: the commit is invalid (exit 3), nothing is applied.
fn check_references(
    commit: &str,
    desired: &Desired,
    observed: &observe_domains::Observed,
) -> Result<(), SyncError> {
    let problems =
        crate::host::observe_networks_pools::missing(&desired.resources, &observed.resources);
    if problems.is_empty() {
        return Ok(());
    }
    Err(SyncError::Invalid {
        commit: commit.to_string(),
        problems,
    })
}

/// Plan → diffs for what was observed; changes nothing.
fn plan_observed(
    settings: &Settings,
    record: &Record,
    commit: &str,
    desired: &Desired,
    observed: &observe_domains::Observed,
    normalizer: &dyn crate::desired::schema_check::Normalizer,
) -> Plan {
    let ctx = plan::Context {
        policy: &settings.changes,
        record,
    };
    let mut plan = plan::plan(desired, observed, commit, &ctx);
    crate::reconcile::diff::annotate(&mut plan, normalizer);
    crate::reconcile::render::annotate_resources(&mut plan.resources);
    plan
}

/// `vmsync validate DIR`: validates a checkout on disk for every host, offline.
pub fn validate_dir(settings: &Settings, dir: &std::path::Path) -> Result<Desired, SyncError> {
    let files = crate::repo::files::DirFiles::new(dir);
    let policy = Policy {
        host: None,
        disk_roots: settings.disk_roots.clone(),
        host_policy: settings.host_policy.clone(),
        render_host: Some(settings.host.clone()),
    };
    validate_cached(&files, &dir.display().to_string(), &policy, None)
}
