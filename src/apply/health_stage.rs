//! The health stage of a sync, after `apply`: checks the VMs that this sync started with
//! a new definition (in parallel, bounded), keeps each healthy definition as the VM's
//! last healthy one (`healthy/NAME.xml` in the state directory), reverts the unhealthy
//! ones, and records the results. The rules are in `reconcile::health_rules`, the waiting and
//! the revert in `host::health_probe`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::desired::desired_state::{Desired, DesiredVm};
use crate::desired::domain_xml;
use crate::desired::health_spec::HealthSpec;
use crate::host::health_probe::{self as check, Verdict};
use crate::host::hypervisor::Hypervisor;
use crate::reconcile::diff;
use crate::reconcile::health_rules::{
    AfterFailure, Due, Found, PutBack, VmHealth, after_failure, due, revert_result,
};
use crate::reconcile::outcome::{Outcome, VmFailure, VmOutcome};
use crate::reconcile::plan_types::{Plan, VmPlan};
use crate::record::{HealthResult, Record, VmRecord, healthy_file, store};
use crate::util::{commit_id, fsio, par};

/// VMs checked at the same time (a check mostly waits).
pub const THREADS: usize = 8;

/// The health stage's settings.
pub struct Stage<'a> {
    pub state_dir: &'a Path,
    pub commit: &'a str,
    /// `policy.shutdown_timeout`, for a VM that does not set its own.
    pub shutdown_timeout: Duration,
    pub hv: &'a dyn Hypervisor,
    /// Set to stop: a wait ends, no revert starts.
    pub cancel: &'a AtomicBool,
}

/// Runs the checks due after `outcome` (see `reconcile::health_rules::due`) and the reverts
/// that follow. A VM that ends unhealthy gets the error in `outcome` (the sync fails);
/// `record` is the record before this sync.
pub fn run(
    stage: &Stage,
    plan: &Plan,
    desired: &Desired,
    outcome: &mut Outcome,
    record: &Record,
) -> Vec<Found> {
    let wanted: HashMap<&str, &DesiredVm> =
        desired.vms.iter().map(|v| (v.name.as_str(), v)).collect();
    let plans: HashMap<&str, &VmPlan> = plan.vms.iter().map(|v| (v.name.as_str(), v)).collect();
    let work: Vec<(&DesiredVm, &VmPlan, &VmOutcome)> = outcome
        .vms
        .iter()
        .filter_map(|o| {
            let vm = wanted.get(o.name.as_str())?;
            vm.health.as_ref()?;
            Some((*vm, *plans.get(o.name.as_str())?, o))
        })
        .collect();
    if work.is_empty() {
        return Vec::new();
    }
    let found: Vec<Found> = par::map(work, THREADS, |(vm, p, o)| {
        one(stage, vm, p, o, record.vms.get(&vm.name))
    })
    .into_iter()
    .flatten()
    .collect();
    for f in &found {
        if let Found::Checked(c) = f
            && let Some(o) = outcome.vms.iter_mut().find(|o| o.name == c.name)
        {
            if let Some(e) = c.error() {
                o.error = Some(VmFailure::Unhealthy(e));
            }
            if matches!(c.result, HealthResult::Healthy | HealthResult::Reverted) {
                o.up = true;
            }
        }
    }
    found
}

/// One VM: check if due, then keep, revert or report; or adopt a running definition
/// as the first healthy one.
fn one(
    stage: &Stage,
    vm: &DesiredVm,
    plan: &VmPlan,
    outcome: &VmOutcome,
    old: Option<&VmRecord>,
) -> Option<Found> {
    let spec = vm.health.as_ref()?;
    let name = &vm.name;
    let short = commit_id::short(stage.commit);
    let Some(how) = due(Some(spec), plan, outcome, old) else {
        return not_due(stage, name, outcome, old);
    };
    let bad_xml = stage.hv.xml(name, true).unwrap_or_default();
    let uuid = domain_xml::summarize(&bad_xml)
        .ok()
        .and_then(|s| s.uuid)
        .unwrap_or_default();
    let verdict = match how {
        Due::StartFailed(e) => {
            Verdict::Unhealthy(format!("libvirt refused to start the new definition: {e}"))
        }
        Due::Started => check::check(stage.hv, name, &uuid, spec, stage.cancel),
    };
    let result = VmHealth {
        name: name.clone(),
        result: HealthResult::Healthy,
        reason: String::new(),
        commit: stage.commit.to_string(),
        fingerprint: plan.fingerprint.clone(),
        put_back: None,
    };
    let reason = match verdict {
        Verdict::Interrupted => {
            warn!(vm = %name, commit = %short, "vmsync is stopping: health check not finished");
            return None;
        }
        Verdict::Healthy => {
            info!(vm = %name, commit = %short, "healthy: kept as the last healthy definition");
            if save_healthy(stage.state_dir, name, &bad_xml).is_none() {
                warn!(vm = %name, "the last healthy definition stays the older one");
                return None;
            }
            return Some(Found::Checked(result));
        }
        Verdict::Unhealthy(reason) => reason,
    };
    error!(vm = %name, commit = %short, reason = %reason, "health check failed");
    let failed = Failed {
        stage,
        vm,
        spec,
        short,
        bad_xml,
        uuid,
        result: VmHealth { reason, ..result },
    };
    Some(Found::Checked(failed.keep_or_revert(plan, old)))
}

/// A VM with a health spec and no check due: a running committed definition becomes the
/// first healthy one; a damaged healthy file is repaired.
fn not_due(
    stage: &Stage,
    name: &str,
    outcome: &VmOutcome,
    old: Option<&VmRecord>,
) -> Option<Found> {
    let has_healthy = old.is_some_and(|r| r.healthy_fingerprint.is_some());
    if !has_healthy && outcome.error.is_none() && outcome.up && !outcome.pending_restart {
        let xml = stage.hv.xml(name, true).ok()?;
        let tag = domain_xml::read_tag(&xml)?;
        save_healthy(stage.state_dir, name, &xml)?;
        info!(vm = %name, commit = %tag.commit, "runs its committed definition: kept as the last healthy one");
        return Some(Found::Adopted {
            name: name.to_string(),
            commit: tag.commit,
            fingerprint: tag.fingerprint,
        });
    }
    if let Some(fp) = old.and_then(|r| r.healthy_fingerprint.as_deref())
        && outcome.up
    {
        repair_healthy(stage.state_dir, name, fp, stage.hv);
    }
    None
}

/// A VM that failed its health check: what deciding and carrying out the revert needs.
struct Failed<'a> {
    stage: &'a Stage<'a>,
    vm: &'a DesiredVm,
    spec: &'a HealthSpec,
    short: &'a str,
    /// The definition that failed, as libvirt has it.
    bad_xml: String,
    uuid: String,
    /// The result so far: unhealthy, with the check's reason.
    result: VmHealth,
}

impl Failed<'_> {
    /// Keeps the failed definition (no revert wanted, nothing to go back to, or a damaged
    /// healthy file) or puts the last healthy one back.
    fn keep_or_revert(mut self, plan: &VmPlan, old: Option<&VmRecord>) -> VmHealth {
        let (name, short) = (&self.vm.name, self.short);
        let healthy = old
            .and_then(|r| r.healthy_commit.clone().zip(r.healthy_fingerprint.clone()))
            .filter(|(_, fp)| *fp != plan.fingerprint);
        let healthy_xml = match healthy
            .as_ref()
            .map(|(_, fp)| healthy_file::read(self.stage.state_dir, name, fp))
        {
            Some(Err(damaged)) if self.spec.revert => {
                error!(vm = %name, commit = %short, "not reverted: {damaged}");
                self.result.result = HealthResult::Unhealthy;
                self.result.reason = format!("{}; not reverted: {damaged}", self.result.reason);
                return self.result;
            }
            read => read.and_then(Result::ok),
        };
        match after_failure(self.spec, healthy_xml.is_some()) {
            AfterFailure::Keep(why) => {
                warn!(vm = %name, commit = %short, "not reverted: {why}");
                self.result.result = HealthResult::Unhealthy;
                self.result.reason = format!("{}; not reverted: {why}", self.result.reason);
                self.result
            }
            AfterFailure::Revert => {
                let (commit, fingerprint) = healthy.expect("a healthy definition to revert to");
                let xml = healthy_xml.expect("read above");
                self.revert(&commit, &fingerprint, &xml)
            }
        }
    }

    /// Puts the last healthy definition back (commit, fingerprint, XML) and checks it.
    fn revert(mut self, healthy_commit: &str, healthy_fp: &str, healthy_xml: &str) -> VmHealth {
        let (stage, spec, short) = (self.stage, self.spec, self.short);
        let name = &self.vm.name;
        let timeout = self.vm.shutdown_timeout.unwrap_or(stage.shutdown_timeout);
        info!(vm = %name, commit = %short, healthy_commit = %commit_id::short(healthy_commit), "putting the last healthy definition back");
        let put_back = |xml: &str| PutBack {
            commit: healthy_commit.to_string(),
            fingerprint: healthy_fp.to_string(),
            definition_hash: domain_xml::definition_hash(xml),
        };
        let reverted = match check::revert(stage.hv, name, healthy_xml, timeout, stage.cancel) {
            Ok(after) => {
                let diff = diff::unified(
                    &self.bad_xml,
                    &after,
                    &format!("{name} (unhealthy, commit {short})"),
                    &format!(
                        "{name} (put back, commit {})",
                        commit_id::short(healthy_commit)
                    ),
                );
                diff::log(name, short, &diff);
                self.result.put_back = Some(put_back(&after));
                match check::check(stage.hv, name, &self.uuid, spec, stage.cancel) {
                    Verdict::Healthy => Ok(true),
                    Verdict::Interrupted => Err("interrupted: vmsync is stopping".into()),
                    Verdict::Unhealthy(why) => {
                        self.result.reason = format!(
                            "{}; the last healthy definition failed its check too: {why}",
                            self.result.reason
                        );
                        Ok(false)
                    }
                }
            }
            Err(e) => {
                // The healthy definition may be in place although the start failed.
                if let Ok(now) = stage.hv.xml(name, true)
                    && domain_xml::read_tag(&now).is_some_and(|t| t.fingerprint == healthy_fp)
                {
                    self.result.put_back = Some(put_back(&now));
                }
                self.result.reason = format!("{}; the revert failed: {e}", self.result.reason);
                Err(e)
            }
        };
        self.result.result = revert_result(&reverted);
        match self.result.result {
            HealthResult::Reverted => {
                warn!(vm = %name, commit = %short, healthy_commit = %healthy_commit, "reverted: the last healthy definition runs again; this commit is held back for this vm")
            }
            _ => {
                error!(vm = %name, commit = %short, reason = %self.result.reason, "revert failed")
            }
        }
        self.result
    }
}

/// A damaged last healthy definition (see [`crate::record::healthy_file`]) is written
/// again when the VM runs that very definition (the same fingerprint); otherwise it is
/// reported, and stays unused.
fn repair_healthy(state_dir: &Path, name: &str, fingerprint: &str, hv: &dyn Hypervisor) {
    let Err(damaged) = healthy_file::read(state_dir, name, fingerprint) else {
        return;
    };
    let running = hv
        .xml(name, true)
        .ok()
        .filter(|xml| domain_xml::read_tag(xml).is_some_and(|t| t.fingerprint == fingerprint));
    match running {
        Some(xml) if save_healthy(state_dir, name, &xml).is_some() => {
            warn!(vm = %name, "{damaged}; written again from the domain, which runs that definition");
        }
        _ => error!(vm = %name, "{damaged}"),
    }
}

/// Writes `xml` as `name`'s last healthy definition; `None` (logged) when it failed.
fn save_healthy(state_dir: &Path, name: &str, xml: &str) -> Option<()> {
    let path = store::healthy_file(state_dir, name);
    let written = path
        .parent()
        .map(std::fs::create_dir_all)
        .transpose()
        .map_err(anyhow::Error::from)
        .and_then(|_| fsio::write_atomic(&path, xml.as_bytes()));
    match written {
        Ok(()) => Some(()),
        Err(e) => {
            error!(vm = %name, file = %path.display(), error = %e, "failed to keep the last healthy definition");
            None
        }
    }
}

/// Adds to `plan` a warning for each VM whose last healthy definition the record names
/// but which is missing or damaged (`vmsync plan` shows it with what to do).
pub fn warn_in_plan(plan: &mut Plan, state_dir: &Path) {
    let Ok(record) = store::load(state_dir) else {
        return;
    };
    for vm in &mut plan.vms {
        let Some(fingerprint) = record
            .vms
            .get(&vm.name)
            .and_then(|r| r.healthy_fingerprint.as_deref())
        else {
            continue;
        };
        if let Err(why) = healthy_file::read(state_dir, &vm.name, fingerprint) {
            vm.warnings.push(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::record_update::restore;
    use crate::reconcile::record_update::retry;
    use crate::record::HeldBack;

    #[test]
    fn retry_forgets_a_hold_back_and_restore_puts_it_back() {
        let held = HeldBack {
            commit: "c2".into(),
            fingerprint: "f2".into(),
            reason: "r".into(),
        };
        let mut record = Record::default();
        record.vms.insert(
            "web".into(),
            VmRecord {
                held_back: Some(held.clone()),
                ..Default::default()
            },
        );
        record.vms.insert("db".into(), VmRecord::default());
        let forgotten = retry(&mut record, &["web".into(), "db".into(), "nope".into()]);
        assert_eq!(forgotten, vec![("web".to_string(), held.clone())]);
        assert_eq!(record.vms["web"].held_back, None);
        // The sync ended before applying: the hold-back stays.
        restore(&mut record, forgotten);
        assert_eq!(record.vms["web"].held_back, Some(held));
        assert_eq!(record.vms["db"].held_back, None);
    }
}
