//! One sync, stage after stage: lock → fetch → check trust → validate → observe →
//! plan → apply → health → record (`run`). Each stage is one call over one [`Env`]; the
//! record is written only through `reconcile::record_update` and saved here. Also the
//! read-only `plan` and `validate` runs.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use tracing::{debug, error, info, warn};

use crate::agent::report::Report;
use crate::agent::stage_clock::StageClock;
use crate::agent::{metrics, notify, suspend};
use crate::apply::{health_stage, vms};
use crate::config::{ConfigError, Settings};
use crate::desired::desired_state::{Desired, Policy};
use crate::desired::manifest::Problem;
use crate::desired::schema_check::{SchemaChecker, SchemaError};
use crate::desired::secret_port::Secrets;
use crate::desired::{resource_xml, schema_check, seed_spec, validate};
pub use crate::error::SyncError;
use crate::host::disk::DiskProvisioner;
pub use crate::host::hypervisor::Connection;
use crate::host::hypervisor::Hypervisor;
use crate::host::image_store::ImageStore;
use crate::host::schema_cache::CachedSchema;
use crate::host::secret_identity::AgeIdentity;
use crate::host::seed_file::SeenSeeds;
use crate::host::{
    disk, hypervisor, observe_domains, observe_networks_pools, schema_cache, schema_test_driver,
};
use crate::reconcile::outcome::Outcome;
use crate::reconcile::plan_types::Plan;
use crate::reconcile::{diff, plan, record_update, render, window_gate};
use crate::record::{Record, store};
use crate::repo::files::RepoFiles;
use crate::repo::trust::{self, Floor};
use crate::repo::{files, probe, source};
use crate::util::commit_id::short;
use crate::util::{clock, fsio};

/// Takes the state directory's lock: held by another vmsync is `Locked` (exit 75).
fn lock(settings: &Settings) -> Result<fsio::Lock, SyncError> {
    fsio::lock(&settings.state_dir).map_err(|e| match e {
        fsio::LockError::Held(held) => SyncError::Locked(held),
        io => SyncError::Other(io.into()),
    })
}

/// The disk seam of one sync: `qemu-img`, and the image directory with this host's
/// `[policy] image_*` settings (its downloads are shared for this sync only).
fn disk_provisioner(settings: &Settings) -> disk::QemuImg {
    let policy = &settings.host_policy;
    disk::QemuImg {
        images: ImageStore::new(policy.images.clone(), policy.allow_link_local_hosts),
        ..Default::default()
    }
}

/// What validation on this host checks against: its name, paths, policy, seed directory
/// and identity.
pub fn policy(settings: &Settings) -> Policy {
    Policy {
        host: Some(settings.host.clone()),
        disk_roots: settings.disk_roots.clone(),
        host_policy: settings.host_policy.clone(),
        render_host: None,
        seed_dir: Some(settings.seed_dir.clone()),
        secrets: Secrets::with(Arc::new(AgeIdentity::new(
            settings.secrets_identity.clone(),
        ))),
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
    pub events: Option<&'a notify::SyncEvents>,
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

/// What a sync works with besides the commit and the record: the agent's settings, the
/// host's seams and the flag that asks it to stop (one value, as a kube-rs controller
/// hands its `Context` to `reconcile`).
pub struct Env<'a> {
    pub settings: &'a Settings,
    pub hv: &'a dyn Hypervisor,
    pub disks: &'a dyn DiskProvisioner,
    pub cancel: &'a AtomicBool,
    /// This sync's events (`[[notify]]`), when the host has any.
    pub events: Option<&'a notify::SyncEvents>,
}

/// What validation handed on: the desired state, the schema cache, and the XML whose
/// libvirt check still runs (beside observation, see [`observe_and_check`]).
struct Validated {
    desired: Desired,
    schema: CachedSchema,
    unchecked: Vec<String>,
}

/// One sync: lock, fetch, validate, observe, plan, apply, health, record, then the
/// metrics file.
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
        metrics::render(&record(), result.as_ref().ok(), started.elapsed())
            + &metrics::agent_extras(&settings.state_dir)
    });
    if let (Some(path), Some(text)) = (&settings.metrics_file, &text)
        && let Err(e) = fsio::write_atomic(path, text.as_bytes())
    {
        warn!(error = %e, "failed to write the metrics file");
    }
    (result, text)
}

/// Under the lock: fetch, refuse a commit given up on, converge; an attempt that ended
/// before anything was applied is recorded as such.
fn run_locked(
    settings: &Settings,
    conn: &mut Connection,
    options: &Options,
) -> Result<Report, SyncError> {
    let _lock = lock(settings)?;
    let mut record = store::load(&settings.state_dir)?;
    let mut clock = StageClock::start();
    let fetched = match fetch(settings) {
        Ok(fetched) => fetched,
        Err(e) => {
            save_failure(settings, &mut record, None, &e);
            return Err(e);
        }
    };
    clock.lap("fetch");
    let commit = fetched.id();
    refuse_given_up(&record, &commit, options.give_up_after)?;
    let retried = record_update::retry(&mut record, options.retry);
    let result = converge(settings, conn, options, &mut record, &fetched, clock);
    if let Err(e) = &result
        && !matches!(e, SyncError::ActionsFailed { .. })
    {
        record_update::restore(&mut record, retried);
        save_failure(settings, &mut record, Some(&commit), e);
    }
    // Still under the lock, with the clone closed.
    drop(fetched);
    source::tidy(&settings.state_dir);
    result
}

/// The commit to sync: the change probe's answer, or a fetch.
fn fetch(settings: &Settings) -> Result<source::FetchedCommit, SyncError> {
    let source = settings.source()?;
    Ok(probe::fetch(
        &source,
        settings.probe().as_ref(),
        &settings.state_dir,
    )?)
}

/// The daemon does not try a commit again that already failed `max` times in a row.
fn refuse_given_up(record: &Record, commit: &str, max: Option<u32>) -> Result<(), SyncError> {
    match max {
        Some(max) if record.gives_up_on(commit, max) => Err(SyncError::GaveUp {
            commit: commit.to_string(),
            attempts: record.failed_attempts,
        }),
        _ => Ok(()),
    }
}

/// Trust → validate → connect → observe, then [`apply_observed`].
fn converge(
    settings: &Settings,
    conn: &mut Connection,
    options: &Options,
    record: &mut Record,
    fetched: &source::FetchedCommit,
    mut clock: StageClock,
) -> Result<Report, SyncError> {
    let commit = fetched.id();
    check_commit(settings, record, fetched, options.allow_rewind)?;
    let validated = validate_deferring(settings, fetched, &commit)?;
    let seeds_from_cache = validated
        .desired
        .vms
        .iter()
        .filter(|vm| vm.seed.as_ref().is_some_and(|s| s.content.is_none()))
        .count();
    debug!(seeds_from_cache, "validated");
    clock.lap("validate");
    let hv = conn.get()?;
    clock.lap("connect");
    clock.count_calls_from(hv.call_count());
    let disks = disk_provisioner(settings);
    let env = Env {
        settings,
        hv,
        disks: &disks,
        cancel: options.cancel,
        events: options.events,
    };
    let observed = observe_and_check(&env, &commit, record, &validated)?;
    // The commits in the managed domains' tags: the ancestry floor that survives a
    // lost state file.
    check_floors(fetched, &observed_floors(&observed), options.allow_rewind)?;
    let rebuilt = build_seeds_to_write(settings, fetched, &commit, &validated.desired, &observed)?;
    clock.lap("observe");
    let desired = rebuilt.as_ref().unwrap_or(&validated.desired);
    apply_observed(&env, record, &commit, desired, &observed, clock)
}

/// A seed validation took from the seed cache has no content (`desired::seed_cache`).
/// When the host needs such a seed written (its image missing, or changed and not
/// `on_change = "never"`), the commit is validated again building every seed; `None`
/// when no seed to write lacks its content.
fn build_seeds_to_write(
    settings: &Settings,
    fetched: &source::FetchedCommit,
    commit: &str,
    desired: &Desired,
    observed: &observe_domains::Observed,
) -> Result<Option<Desired>, SyncError> {
    let unbuilt = desired
        .vms
        .iter()
        .filter_map(|vm| vm.seed.as_ref())
        .filter(|seed| seed.content.is_none() && seed.must_write(observed.seed_on_host(seed)))
        .count();
    if unbuilt == 0 {
        return Ok(None);
    }
    debug!(
        seeds = unbuilt,
        "seeds to write came from the seed cache; building them"
    );
    let policy = policy(settings);
    let schema =
        CachedSchema::load(Some(&settings.state_dir), &format!("{policy:?}")).building_seeds();
    let rebuilt = validate_commit(fetched, commit, &policy, &schema)?;
    schema.save();
    Ok(Some(rebuilt))
}

/// Validates the commit for this host with the schema cache, leaving libvirt's checks
/// of the XML the cache has not seen to [`observe_and_check`]. An invalid commit is
/// validated again with those checks, so that one run shows every mistake.
fn validate_deferring(
    settings: &Settings,
    fetched: &source::FetchedCommit,
    commit: &str,
) -> Result<Validated, SyncError> {
    let policy = policy(settings);
    let cache = || CachedSchema::load(Some(&settings.state_dir), &format!("{policy:?}"));
    let schema = cache().deferring();
    match validate_commit(fetched, commit, &policy, &schema) {
        Ok(desired) => {
            let unchecked = schema.take_deferred();
            Ok(Validated {
                desired,
                schema,
                unchecked,
            })
        }
        Err(e) => Err(validate_commit(fetched, commit, &policy, &cache())
            .err()
            .unwrap_or(e)),
    }
}

/// Observes the host while libvirt's schema checks of the unchecked XML run: compiling
/// the schema costs more than a define, and observing only reads. Their verdict is in
/// before anything is planned; a rejection makes the commit invalid, else the cache
/// learns the passes and is saved. (The checks stay on this thread and observing moves
/// to another: with the checks on another thread, the compiled schema went to a malloc
/// arena of its own and a daemon's peak RSS grew by 8 MiB.)
fn observe_and_check(
    env: &Env,
    commit: &str,
    record: &Record,
    validated: &Validated,
) -> Result<observe_domains::Observed, SyncError> {
    let Validated {
        desired,
        schema,
        unchecked,
    } = validated;
    let seen_seeds = schema.seen_seeds();
    let (observed, verdicts) = std::thread::scope(|scope| {
        let seen = &*seen_seeds;
        let observing = scope.spawn(|| observe_commit(record, desired, env.hv, env.disks, seen));
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
    drop(seen_seeds);
    let mut observed = observed;
    if let Ok(observed) = &mut observed {
        schema.saw_seeds(std::mem::take(&mut observed.seed_files));
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
                // A VM with a seed defines its XML with the seed's CD-ROM added.
                .filter(move |vm| {
                    &vm.xml == xml
                        || vm.seed.as_ref().is_some_and(|seed| {
                            seed_spec::with_device(xml, seed).is_ok_and(|x| x == vm.xml)
                        })
                })
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
    record_update::record_failure(
        record,
        commit,
        result,
        &e.to_string(),
        &clock::now_rfc3339(),
    );
    if let Err(e) = store::save(&settings.state_dir, record) {
        error!(error = %e, "failed to record the failed attempt");
    }
}

/// Observe → plan → apply → health → record, for a validated commit. Exposed for tests
/// that bring their own hypervisor and provisioner.
pub fn apply_commit(
    env: &Env,
    record: &mut Record,
    commit: &str,
    desired: &Desired,
) -> Result<Report, SyncError> {
    let mut clock = StageClock::start();
    clock.count_calls_from(env.hv.call_count());
    let observed = observe_commit(record, desired, env.hv, env.disks, &Default::default())?;
    clock.lap("observe");
    apply_observed(env, record, commit, desired, &observed, clock)
}

/// Plan → (suspensions) → apply → health → record, for what was observed.
fn apply_observed(
    env: &Env,
    record: &mut Record,
    commit: &str,
    desired: &Desired,
    observed: &observe_domains::Observed,
    mut clock: StageClock,
) -> Result<Report, SyncError> {
    check_references(commit, desired, observed)?;
    let mut plan = plan_to_apply(env.settings, record, commit, desired, observed)?;
    let held = suspend::held_back(&env.settings.state_dir, &mut plan, short(commit));
    if held.host.is_some() {
        // Nothing is applied nor recorded but the drift just seen (reported, not healed).
        if record_update::note_drift(record, &plan) {
            store::save(&env.settings.state_dir, record)?;
        }
        return Ok(Report {
            commit: commit.to_string(),
            plan,
            outcome: Outcome::default(),
            held,
        });
    }
    if let Some(events) = env.events {
        events.applying(commit, record.last_applied_commit.as_deref());
    }
    clock.lap("plan");
    let mut outcome = vms::apply(&plan, env.hv, env.disks, env.cancel);
    clock.lap("apply");
    // Health checks of the VMs started with a new definition, and reverts.
    let stage = health_stage::Stage {
        state_dir: &env.settings.state_dir,
        commit,
        shutdown_timeout: env.settings.changes.shutdown_timeout,
        hv: env.hv,
        cancel: env.cancel,
    };
    let found = health_stage::run(&stage, &plan, desired, &mut outcome, record);
    if found.is_empty() {
        clock.skip();
    } else {
        clock.lap("health");
    }
    if let Some(events) = env.events {
        events.applied(&outcome);
    }
    let before = record.vms.clone();
    record_update::after_apply(
        record,
        commit,
        &plan,
        &outcome,
        &found,
        &clock::now_rfc3339(),
    );
    record_update::restore_held(record, &before, held.vms.keys());
    store::save(&env.settings.state_dir, record)?;
    let calls = clock.calls_since(env.hv.call_count());
    finish(
        commit,
        Report {
            commit: commit.to_string(),
            plan,
            outcome,
            held,
        },
        calls,
        &clock,
    )
}

/// The plan of a sync that applies it; a refused plan (too many prunes) is an error and
/// nothing of the commit is applied (the caller records the refusal).
fn plan_to_apply(
    settings: &Settings,
    record: &Record,
    commit: &str,
    desired: &Desired,
    observed: &observe_domains::Observed,
) -> Result<Plan, SyncError> {
    let ctx = plan::Context {
        policy: &settings.changes,
        record,
    };
    let mut plan = plan::plan(desired, observed, commit, &ctx);
    hold_for_windows(settings, desired, &mut plan);
    if let Some(message) = &plan.refused {
        return Err(SyncError::Refused {
            commit: commit.to_string(),
            message: message.clone(),
        });
    }
    if plan.is_noop()
        && plan.vms.iter().all(|vm| vm.error.is_none())
        && plan.resources.pools.iter().all(|p| p.error.is_none())
        && plan.resources.networks.iter().all(|p| p.error.is_none())
    {
        info!(commit = %short(commit), vms = plan.vms.len(), "nothing to do: every vm is converged");
    }
    Ok(plan)
}

/// Outside the maintenance windows, the restarts, stops and prunes of `plan` wait
/// (`reconcile::window_gate`), unless `--ignore-windows`.
fn hold_for_windows(settings: &Settings, desired: &Desired, plan: &mut Plan) {
    if settings.ignore_windows {
        if !desired.windows.is_empty() {
            warn!("--ignore-windows: restarts, stops and prunes do not wait for a window");
        }
        return;
    }
    let now = chrono::Utc::now();
    if window_gate::gate(plan, &desired.windows, &settings.host, now) > 0 {
        for vm in plan.vms.iter().filter(|v| v.order.waiting.is_some()) {
            let what = vm.order.waiting.as_deref().unwrap_or_default();
            info!(vm = %vm.name, "restart or stop waiting for {what}");
        }
    }
}

/// The report of an applied commit, or `ActionsFailed` when something failed.
fn finish(
    commit: &str,
    report: Report,
    libvirt_calls: u64,
    clock: &StageClock,
) -> Result<Report, SyncError> {
    let outcome = &report.outcome;
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
        commit = %short(commit),
        vms = outcome.vms.len(),
        changes = outcome.changes(),
        libvirt_calls,
        stages_ms = %clock.summary(),
        "converged"
    );
    Ok(report)
}

/// `vmsync plan` and `vmsync --once --dry-run`: fetch, validate, observe and plan, with
/// a diff per definition; changes nothing on the host (nor the record).
pub fn plan_only(settings: &Settings) -> Result<Plan, SyncError> {
    let _lock = lock(settings)?;
    let record = store::load(&settings.state_dir)?;
    let fetched = source::fetch(&settings.source()?, &settings.state_dir)?;
    let commit = fetched.id();
    let desired = trusted_and_valid(settings, &record, &fetched, false)?;
    let hv = hypervisor::Libvirt::connect(&settings.libvirt_uri)?;
    let observed = observe_commit(
        &record,
        &desired,
        &hv,
        &disk_provisioner(settings),
        &Default::default(),
    )?;
    check_floors(&fetched, &observed_floors(&observed), false)?;
    check_references(&commit, &desired, &observed)?;
    let normalizer = schema_test_driver::TestDriverSchema::new()?;
    Ok(plan_observed(
        settings,
        &record,
        &commit,
        &desired,
        &observed,
        &normalizer,
    ))
}

/// Observes the host for `desired`, with this agent's record (prune candidates and
/// their drift baselines).
fn observe_commit(
    record: &Record,
    desired: &Desired,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
    seen_seeds: &SeenSeeds,
) -> Result<observe_domains::Observed, SyncError> {
    let applied = record
        .vms
        .iter()
        .map(|(name, vm)| (name.clone(), vm.definition_hash.clone()))
        .collect();
    let mut observed = observe_domains::observe(desired, &applied, hv, disks, seen_seeds)?;
    observed.resources =
        observe_networks_pools::observe(&desired.resources, &recorded_resources(record), hv)?;
    Ok(observed)
}

/// The networks and pools this agent's record says it applied.
fn recorded_resources(
    record: &Record,
) -> std::collections::BTreeSet<(resource_xml::ResourceKind, String)> {
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
    let problems = observe_networks_pools::missing(&desired.resources, &observed.resources);
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
    normalizer: &dyn schema_check::Normalizer,
) -> Plan {
    let ctx = plan::Context {
        policy: &settings.changes,
        record,
    };
    let mut plan = plan::plan(desired, observed, commit, &ctx);
    hold_for_windows(settings, desired, &mut plan);
    diff::annotate(&mut plan, normalizer);
    render::annotate_resources(&mut plan.resources);
    plan
}

/// `vmsync validate DIR`: validates a checkout on disk for every host, offline.
pub fn validate_dir(settings: &Settings, dir: &std::path::Path) -> Result<Desired, SyncError> {
    let files = files::DirFiles::new(dir);
    let policy = Policy {
        host: None,
        disk_roots: settings.disk_roots.clone(),
        host_policy: settings.host_policy.clone(),
        render_host: Some(settings.host.clone()),
        seed_dir: Some(settings.seed_dir.clone()),
        // Offline: the age format is checked, nothing is decrypted.
        secrets: Secrets::default(),
    };
    validate_cached(&files, &dir.display().to_string(), &policy, None)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::desired::domain_xml;
    use crate::desired::manifest::{OnChange, PowerState};
    use crate::record::{HealthResult, HeldBack, SyncResult, VmRecord};
    use crate::repo::source::test_git::git;
    use crate::testing::FakeHost;

    /// A repository with `manifest` committed, a state directory, and the settings of a
    /// sync of it (libvirt's test driver, which these branches never reach).
    struct Repo {
        repo: tempfile::TempDir,
        state: tempfile::TempDir,
    }

    impl Repo {
        fn new(manifest: &str) -> Repo {
            let repo = tempfile::tempdir().unwrap();
            git(repo.path(), &["init", "-q"]);
            std::fs::write(repo.path().join("vmsync.toml"), manifest).unwrap();
            git(repo.path(), &["add", "."]);
            git(
                repo.path(),
                &[
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@t",
                    "commit",
                    "-qm",
                    "c",
                ],
            );
            Repo {
                repo,
                state: tempfile::tempdir().unwrap(),
            }
        }

        fn settings(&self) -> Settings {
            crate::config::load(&crate::config::Overrides {
                config: Some("/dev/null".into()),
                url: Some(self.repo.path().display().to_string()),
                state_dir: Some(self.state.path().to_path_buf()),
                connect: Some("test:///default".into()),
                host: Some("h1".into()),
                ..Default::default()
            })
            .unwrap()
        }

        fn head(&self) -> String {
            git(self.repo.path(), &["rev-parse", "HEAD"])
                .trim()
                .to_string()
        }

        fn run(&self, give_up_after: Option<u32>, retry: &[String]) -> Result<Report, SyncError> {
            let cancel = AtomicBool::new(false);
            let options = Options {
                give_up_after,
                cancel: &cancel,
                allow_rewind: false,
                retry,
                events: None,
            };
            run(
                &self.settings(),
                &mut Connection::new("test:///default"),
                &options,
            )
        }

        fn record(&self) -> Record {
            store::load(self.state.path()).unwrap()
        }

        fn save(&self, record: &Record) {
            store::save(self.state.path(), record).unwrap();
        }
    }

    const INVALID: &str = "[[vm]]\nname = \"a\"\n";

    #[test]
    fn an_invalid_commit_is_recorded_and_counted_and_nothing_is_applied() {
        let repo = Repo::new(INVALID);
        let err = repo.run(None, &[]).unwrap_err();
        assert!(matches!(err, SyncError::Invalid { .. }), "{err}");
        let record = repo.record();
        assert_eq!(record.last_result, Some(SyncResult::Invalid));
        assert_eq!(record.last_attempted_commit, Some(repo.head()));
        assert_eq!(record.last_applied_commit, None);
        assert_eq!(record.failed_attempts, 1);
        repo.run(None, &[]).unwrap_err();
        assert_eq!(
            repo.record().failed_attempts,
            2,
            "the same commit counts up"
        );
    }

    #[test]
    fn a_commit_that_does_not_descend_from_the_applied_one_is_untrusted() {
        let repo = Repo::new("");
        let applied = "1111111111111111111111111111111111111111";
        repo.save(&Record {
            last_applied_commit: Some(applied.into()),
            ..Record::default()
        });
        let err = repo.run(None, &[]).unwrap_err();
        assert!(matches!(err, SyncError::Untrusted(_)), "{err}");
        let record = repo.record();
        assert_eq!(record.last_result, Some(SyncResult::Untrusted));
        assert_eq!(record.last_applied_commit.as_deref(), Some(applied));
    }

    #[test]
    fn a_held_lock_is_refused_and_nothing_is_recorded() {
        let repo = Repo::new(INVALID);
        let _held = fsio::lock(repo.state.path()).unwrap();
        let err = repo.run(None, &[]).unwrap_err();
        assert!(matches!(err, SyncError::Locked(_)), "{err}");
        assert_eq!(err.exit_code(), 75);
        assert_eq!(repo.record(), Record::default());
    }

    #[test]
    fn a_commit_given_up_on_is_not_tried_and_a_retry_is_put_back_when_it_fails() {
        let repo = Repo::new(INVALID);
        repo.run(None, &[]).unwrap_err();
        repo.run(None, &[]).unwrap_err();
        let err = repo.run(Some(2), &[]).unwrap_err();
        assert!(
            matches!(err, SyncError::GaveUp { attempts: 2, .. }),
            "{err}"
        );
        assert_eq!(repo.record().failed_attempts, 2, "a give-up is no attempt");

        // `--retry web` forgets web's hold-back for the sync; the commit is invalid, so
        // nothing was tried and the hold-back is back.
        let held = HeldBack {
            commit: "c0".into(),
            fingerprint: "fp".into(),
            reason: "unhealthy".into(),
        };
        let mut record = repo.record();
        record.vms.insert(
            "web".into(),
            VmRecord {
                held_back: Some(held.clone()),
                ..VmRecord::default()
            },
        );
        repo.save(&record);
        repo.run(None, &["web".to_string()]).unwrap_err();
        assert_eq!(repo.record().vms["web"].held_back, Some(held));
    }

    fn desired_vm(name: &str) -> Desired {
        desired_vm_with(name, 1024, None)
    }

    /// One VM `name` with `memory` KiB, restarted on a change, with `health`.
    fn desired_vm_with(
        name: &str,
        memory: u32,
        health: Option<crate::desired::health_spec::HealthSpec>,
    ) -> Desired {
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory>{memory}</memory><os><type>hvm</type></os></domain>"
        );
        let vm = crate::desired::desired_state::DesiredVm {
            name: name.into(),
            xml_file: format!("vms/{name}.xml"),
            summary: domain_xml::summarize(&xml).unwrap(),
            fingerprint: domain_xml::fingerprint(&xml),
            xml,
            autostart: true,
            disks: Vec::new(),
            on_change: OnChange::Restart,
            state: PowerState::Running,
            shutdown_timeout: None,
            self_heal: None,
            adopt: false,
            health,
            order: Default::default(),
            seed: None,
        };
        Desired {
            vms: vec![vm],
            ..Desired::default()
        }
    }

    fn apply(state_dir: &Path, host: &FakeHost, record: &mut Record) -> Result<Report, SyncError> {
        apply_desired(state_dir, host, record, "c1", &desired_vm("web"))
    }

    fn apply_desired(
        state_dir: &Path,
        host: &FakeHost,
        record: &mut Record,
        commit: &str,
        desired: &Desired,
    ) -> Result<Report, SyncError> {
        let settings = crate::config::load(&crate::config::Overrides {
            config: Some("/dev/null".into()),
            state_dir: Some(state_dir.to_path_buf()),
            host: Some("h1".into()),
            ..Default::default()
        })
        .unwrap();
        let env = Env {
            settings: &settings,
            hv: host,
            disks: host,
            cancel: &AtomicBool::new(false),
            events: None,
        };
        apply_commit(&env, record, commit, desired)
    }

    #[test]
    fn a_vm_that_fails_is_recorded_with_its_error_and_the_commit_is_not_applied() {
        let state = tempfile::tempdir().unwrap();
        let host = FakeHost::refusing_to_start(&["web"]);
        let mut record = Record::default();
        let err = apply(state.path(), &host, &mut record).unwrap_err();
        assert!(
            matches!(
                err,
                SyncError::ActionsFailed {
                    failed: 1,
                    total: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            host.calls(),
            ["define web", "autostart web true", "start web"]
        );
        assert_eq!(record.last_applied_commit, None);
        assert_eq!(record.last_result, Some(SyncResult::Failed));
        let web = &record.vms["web"];
        assert!(!web.ok);
        assert!(
            web.last_error.as_deref().unwrap().contains("no disk"),
            "{web:?}"
        );
        assert_eq!(store::load(state.path()).unwrap(), record, "saved");

        // The host lets it start now: the commit converges and becomes the applied one.
        let host = FakeHost::default();
        let report = apply(state.path(), &host, &mut record).unwrap();
        assert_eq!(report.commit, "c1");
        assert_eq!(record.last_applied_commit.as_deref(), Some("c1"));
        assert_eq!(record.failed_attempts, 0);
    }

    #[test]
    fn a_new_definition_that_fails_its_health_check_is_reverted_and_held_back() {
        let state = tempfile::tempdir().unwrap();
        let health = crate::desired::health_spec::HealthSpec {
            settle: std::time::Duration::ZERO,
            command: None,
            timeout: std::time::Duration::from_secs(5),
            revert: true,
            guest_agent: false,
        };
        let good = desired_vm_with("web", 1024, Some(health.clone()));
        let bad = desired_vm_with("web", 2048, Some(health));
        let c1 = "1".repeat(40);
        let c2 = "2".repeat(40);
        let mut host = FakeHost::default();
        host.crashing.insert(bad.vms[0].fingerprint.clone());
        let mut record = Record::default();

        // c1 starts web, which stays up: its definition is the last healthy one.
        apply_desired(state.path(), &host, &mut record, &c1, &good).unwrap();
        assert_eq!(record.vms["web"].health, Some(HealthResult::Healthy));
        assert_eq!(record.vms["web"].healthy_commit.as_deref(), Some(&*c1));
        assert_eq!(record.last_applied_commit.as_deref(), Some(&*c1));

        // c2 restarts web with a definition that crashes: c1's is put back in place.
        let err = apply_desired(state.path(), &host, &mut record, &c2, &bad).unwrap_err();
        assert!(
            matches!(err, SyncError::ActionsFailed { failed: 1, .. }),
            "{err}"
        );
        let web = &record.vms["web"];
        assert_eq!(web.health, Some(HealthResult::Reverted));
        let held = web.held_back.as_ref().expect("c2 is held back for web");
        assert_eq!(held.commit, c2);
        assert_eq!(held.fingerprint, bad.vms[0].fingerprint);
        assert!(held.reason.contains("crashed"), "{held:?}");
        assert_eq!(web.applied_commit.as_deref(), Some(&*c1), "{web:?}");
        assert_eq!(web.fingerprint.as_ref(), Some(&good.vms[0].fingerprint));
        assert_eq!(record.last_result, Some(SyncResult::Failed));
        assert_eq!(record.last_applied_commit.as_deref(), Some(&*c1));
        let now = domain_xml::read_tag(&host.xml("web", true).unwrap()).unwrap();
        assert_eq!(
            (now.commit, now.fingerprint),
            (c1, good.vms[0].fingerprint.clone())
        );
        assert!(
            host.is_active("web").unwrap(),
            "the healthy definition runs"
        );
        assert_eq!(store::load(state.path()).unwrap(), record, "saved");
    }
}
