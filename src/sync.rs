//! One sync, stage after stage: lock → fetch → validate → observe → plan → apply →
//! record. Also the read-only `plan` and `validate` runs, and the errors that decide the
//! exit status.

use std::collections::BTreeMap;

use tracing::{error, info};

use crate::apply::{self, Outcome};
use crate::config::{ConfigError, Settings};
use crate::disk::DiskProvisioner;
use crate::files::RepoFiles;
use crate::hypervisor::{Hypervisor, SchemaChecker, TestDriverSchema};
use crate::manifest::Problem;
use crate::observe;
use crate::plan::{self, Plan};
use crate::source::{self, FetchError};
use crate::state::{self, LockHeld, Record, SyncResult, VmRecord};
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
    #[error(
        "{failed} of {total} vms failed at commit {commit}; the last applied commit is unchanged"
    )]
    ActionsFailed {
        commit: String,
        failed: usize,
        total: usize,
    },
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
            SyncError::Locked(_) => 75,
            SyncError::ActionsFailed { .. } | SyncError::Other(_) => 1,
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
    }
}

fn schema() -> Result<TestDriverSchema, SyncError> {
    TestDriverSchema::new().map_err(|e| SyncError::Other(anyhow::anyhow!("{e}")))
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

/// `vmsync --once`: fetches, validates and applies with the real libvirt and qemu-img.
pub fn once(settings: &Settings) -> Result<Report, SyncError> {
    let _lock = lock(settings)?;
    let mut record = state::load(&settings.state_dir)?;
    let source = settings.source()?;
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
    let commit = fetched.id();
    let result = (|| {
        let desired = validate_commit(&fetched, &commit, &policy(settings), &schema()?)?;
        let hv = crate::hypervisor::Libvirt::connect(&settings.libvirt_uri)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        apply_commit(
            settings,
            &mut record,
            &commit,
            &desired,
            &hv,
            &crate::disk::QemuImg::default(),
        )
    })();
    if let Err(e) = &result
        && !matches!(e, SyncError::ActionsFailed { .. })
    {
        let kind = match e {
            SyncError::Invalid { .. } => SyncResult::Invalid,
            SyncError::Refused { .. } => SyncResult::Refused,
            _ => SyncResult::Failed,
        };
        record_failure(settings, &mut record, Some(&commit), kind, &e.to_string());
    }
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
) -> Result<Report, SyncError> {
    let short = &commit[..commit.len().min(12)];
    let observed = observe::observe(desired, hv, disks).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ctx = plan::Context {
        policy: &settings.changes,
        record,
    };
    let plan = plan::plan(desired, &observed, commit, &ctx);
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
    let outcome = apply::apply(&plan, hv, disks);

    let now = state::now_rfc3339();
    let mut vms = BTreeMap::new();
    for vm in &outcome.vms {
        let old = record.vms.get(&vm.name).cloned().unwrap_or_default();
        let entry = if vm.error.is_none() {
            VmRecord {
                applied_commit: Some(commit.to_string()),
                fingerprint: Some(vm.fingerprint.clone()),
                autostart: vm.autostart,
                ok: true,
                last_error: None,
                pending_restart: vm.pending_restart,
                // The new baseline; else the old one (kept while drift is only
                // reported); else, first seen converged, the definition as it is.
                definition_hash: vm
                    .definition_hash
                    .clone()
                    .or(old.definition_hash.clone())
                    .or(vm.previous_hash.clone()),
                state: Some(vm.state),
                drift: vm.drift.clone(),
            }
        } else {
            VmRecord {
                ok: false,
                last_error: vm.error.clone(),
                drift: vm.drift.clone(),
                ..old
            }
        };
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
        info!(commit = %short, changes = outcome.changes(), "converged");
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
    let schema = schema()?;
    let desired = validate_commit(&fetched, &commit, &policy(settings), &schema)?;
    let hv = crate::hypervisor::Libvirt::connect(&settings.libvirt_uri)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    plan_commit(settings, &record, &commit, &desired, &hv, &schema)
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
    let observed = observe::observe(desired, hv, &crate::disk::QemuImg::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ctx = plan::Context {
        policy: &settings.changes,
        record,
    };
    let mut plan = plan::plan(desired, &observed, commit, &ctx);
    crate::diff::annotate(&mut plan, normalizer);
    Ok(plan)
}

/// `vmsync validate DIR`: validates a checkout on disk for every host, offline.
pub fn validate_dir(settings: &Settings, dir: &std::path::Path) -> Result<Desired, SyncError> {
    let files = crate::files::DirFiles::new(dir);
    let policy = Policy {
        host: None,
        disk_roots: settings.disk_roots.clone(),
    };
    validate_commit(&files, &dir.display().to_string(), &policy, &schema()?)
}
