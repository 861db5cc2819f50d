//! Every write to the record, in one place: an attempt that failed before anything was
//! applied, what applying a commit did to each VM, prune, network and pool, what the
//! health stage found, `--retry`'s forgetting (and restoring) of hold-backs, and under
//! `vmsync suspend` the drift seen and the entries of the VMs held back. Pure: the sync
//! saves the record with `record::store`.

use std::collections::BTreeMap;

use tracing::{info, warn};

use crate::desired::resource_xml::ResourceKind;
use crate::reconcile::health_rules::{Found, VmHealth};
use crate::reconcile::outcome::{Outcome, ResourceOutcome};
use crate::reconcile::plan_networks_pools::recorded;
use crate::reconcile::plan_types::{Plan, ResourcePlan};
use crate::record::{HealthResult, HeldBack, Record, ResourceRecord, SyncResult, VmRecord};

/// Records what applying `commit` did: the VMs and prunes ([`record_outcome`]), the
/// networks and pools ([`record_resources`]), then what the health stage found
/// ([`record_health`]).
pub fn after_apply(
    record: &mut Record,
    commit: &str,
    plan: &Plan,
    outcome: &Outcome,
    found: &[Found],
    now: &str,
) {
    let left_in_place = plan.prune.iter().map(|p| p.name.as_str());
    record_outcome(record, commit, left_in_place, outcome, now);
    record_resources(record, commit, &plan.resources, &outcome.resources);
    record_health(record, plan, found);
    record_order(record, plan);
}

/// What each VM waits for, and its dependencies and shutdown timeout for `vmsync
/// shutdown`; a prune that waits for a window says so in the record it keeps.
fn record_order(record: &mut Record, plan: &Plan) {
    for vm in &plan.vms {
        if let Some(entry) = record.vms.get_mut(&vm.name) {
            entry.waiting_for = vm.order.waiting.clone();
            entry.depends_on = vm.order.after.clone();
            entry.shutdown_timeout_seconds = vm.order.shutdown_timeout.map(|t| t.as_secs());
        }
    }
    for p in &plan.prune {
        if let Some(entry) = record.vms.get_mut(&p.name) {
            entry.waiting_for = p
                .skipped
                .as_deref()
                .and_then(|s| s.strip_prefix("waiting for "))
                .map(str::to_string);
        }
    }
}

/// Records what applying `commit` did. `left_in_place`: managed domains the plan
/// would prune; those not pruned (pruning off, or failed) keep their records: they
/// are still this agent's, and may be pruned later. The commit becomes the last
/// applied one only if everything succeeded.
pub fn record_outcome<'a>(
    record: &mut Record,
    commit: &str,
    left_in_place: impl IntoIterator<Item = &'a str>,
    outcome: &Outcome,
    now: &str,
) {
    let mut vms = BTreeMap::new();
    for vm in &outcome.vms {
        let old = record.vms.get(&vm.name).cloned().unwrap_or_default();
        vms.insert(vm.name.clone(), vm.record(commit, old));
    }
    for name in left_in_place {
        let pruned = outcome
            .pruned
            .iter()
            .any(|o| o.name == name && o.error.is_none());
        if !pruned && let Some(old) = record.vms.get(name) {
            vms.insert(name.to_string(), old.clone());
        }
    }
    record.vms = vms;
    if outcome.all_ok() {
        record.failed_attempts = 0;
    } else {
        count_failure(record, commit);
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
    record.last_attempt_at = Some(now.to_string());
    let mut errors = outcome.directory_errors.clone();
    errors.extend(outcome.resources.errors());
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
    if errors.is_empty() {
        record.last_applied_commit = Some(commit.to_string());
        record.last_applied_at = Some(now.to_string());
        record.last_result = Some(SyncResult::Converged);
        record.last_error = None;
    } else {
        record.last_result = Some(SyncResult::Failed);
        record.last_error = Some(errors.join("; "));
    }
}

/// The record's networks and pools after a sync: converged ones with the commit, failed
/// ones with their error (and what was done: a pool vmsync defined is recorded with its
/// UUID even when a later step failed), pruned ones gone, skipped ones kept.
pub fn record_resources(
    record: &mut Record,
    commit: &str,
    plan: &ResourcePlan,
    outcome: &ResourceOutcome,
) {
    for kind in [ResourceKind::Network, ResourceKind::Pool] {
        let old = recorded(record, kind).clone();
        let mut new = BTreeMap::new();
        let outcomes = match kind {
            ResourceKind::Network => &outcome.networks,
            ResourceKind::Pool => &outcome.pools,
        };
        for o in outcomes {
            let before = old.get(&o.name).cloned();
            let uuid = o.uuid.clone().or(o.previous_uuid.clone());
            let entry = if o.error.is_none() {
                ResourceRecord {
                    uuid,
                    applied_commit: Some(commit.to_string()),
                    fingerprint: Some(o.fingerprint.clone()),
                    autostart: o.autostart,
                    ok: true,
                    last_error: None,
                    pending_restart: o.pending_restart,
                    definition_hash: o
                        .definition_hash
                        .clone()
                        .or(before.as_ref().and_then(|b| b.definition_hash.clone()))
                        .or(o.previous_hash.clone()),
                    drift: o.drift.clone(),
                }
            } else if o.defined {
                ResourceRecord {
                    uuid,
                    fingerprint: Some(o.fingerprint.clone()),
                    definition_hash: o.definition_hash.clone(),
                    ok: false,
                    last_error: o.error.clone(),
                    drift: o.drift.clone(),
                    ..before.unwrap_or_default()
                }
            } else if let Some(before) = before {
                ResourceRecord {
                    ok: false,
                    last_error: o.error.clone(),
                    drift: o.drift.clone(),
                    ..before
                }
            } else {
                // Never vmsync's (not adopted): nothing to remember.
                continue;
            };
            new.insert(o.name.clone(), entry);
        }
        // Prune candidates not pruned stay this agent's.
        for p in plan.prune.iter().filter(|p| p.kind() == kind) {
            let pruned = outcome
                .pruned
                .iter()
                .any(|o| o.kind == Some(kind) && o.name == p.name && o.pruned);
            if !pruned && let Some(rec) = old.get(&p.name) {
                new.insert(p.name.clone(), rec.clone());
            }
        }
        match kind {
            ResourceKind::Network => record.networks = new,
            ResourceKind::Pool => record.pools = new,
        }
    }
}

/// `vmsync --once --retry VM`: forgets the hold-back of each named VM, so that this sync
/// tries its definition again. Returns what it forgot, for [`restore`].
pub fn retry(record: &mut Record, names: &[String]) -> Vec<(String, HeldBack)> {
    let mut forgotten = Vec::new();
    for name in names {
        match record.vms.get_mut(name).and_then(|r| r.held_back.take()) {
            Some(held) => {
                info!(vm = %name, commit = %held.commit, "--retry: trying the held back definition again");
                forgotten.push((name.clone(), held));
            }
            None => warn!(vm = %name, "--retry: this vm is not held back; nothing to retry"),
        }
    }
    forgotten
}

/// Puts back the hold-backs [`retry`] forgot, when the sync ended before applying.
pub fn restore(record: &mut Record, forgotten: Vec<(String, HeldBack)>) {
    for (name, held) in forgotten {
        if let Some(entry) = record.vms.get_mut(&name) {
            entry.held_back = Some(held);
        }
    }
}

/// With the host suspended: the drift the plan saw goes into the records of the VMs,
/// networks and pools (nothing else changes), so that `vmsync status` and the metrics
/// report it. Whether anything changed.
pub fn note_drift(record: &mut Record, plan: &Plan) -> bool {
    let mut changed = false;
    for vm in &plan.vms {
        if let Some(entry) = record.vms.get_mut(&vm.name)
            && entry.drift != vm.drift
        {
            entry.drift = vm.drift.clone();
            changed = true;
        }
    }
    let resources = [
        (&mut record.networks, &plan.resources.networks),
        (&mut record.pools, &plan.resources.pools),
    ];
    for (records, plans) in resources {
        for p in plans {
            if let Some(entry) = records.get_mut(&p.name)
                && entry.drift != p.drift
            {
                entry.drift = p.drift.clone();
                changed = true;
            }
        }
    }
    changed
}

/// After recording a sync that held the VMs `held` back (suspended): their entries go
/// back to what they were `before` (they did not get the commit), keeping the drift just
/// seen; a VM new in the commit gets no entry.
pub fn restore_held<'a>(
    record: &mut Record,
    before: &BTreeMap<String, VmRecord>,
    held: impl IntoIterator<Item = &'a String>,
) {
    for name in held {
        match before.get(name) {
            Some(old) => {
                let drift = record
                    .vms
                    .get(name)
                    .map(|n| n.drift.clone())
                    .unwrap_or_default();
                record.vms.insert(
                    name.clone(),
                    VmRecord {
                        drift,
                        ..old.clone()
                    },
                );
            }
            None => {
                record.vms.remove(name);
            }
        }
    }
}

/// Updates the record (after `record_outcome`) with what the stage found.
pub fn record_health(record: &mut Record, plan: &Plan, found: &[Found]) {
    for f in found {
        match f {
            Found::Checked(c) => {
                if let Some(entry) = record.vms.get_mut(&c.name) {
                    record_check(entry, c);
                }
            }
            Found::Adopted {
                name,
                commit,
                fingerprint,
            } => {
                if let Some(entry) = record.vms.get_mut(name) {
                    entry.healthy_commit = Some(commit.clone());
                    entry.healthy_fingerprint = Some(fingerprint.clone());
                }
            }
        }
    }
    for vm in &plan.vms {
        if let Some(entry) = record.vms.get_mut(&vm.name) {
            forget_stale_hold_back(entry, &vm.fingerprint);
        }
    }
}

/// Updates a VM's record entry (already updated from the sync's outcome) with its check.
pub fn record_check(entry: &mut VmRecord, check: &VmHealth) {
    entry.health = Some(check.result);
    match check.result {
        HealthResult::Healthy => {
            entry.healthy_commit = Some(check.commit.clone());
            entry.healthy_fingerprint = Some(check.fingerprint.clone());
            entry.held_back = None;
        }
        HealthResult::Unhealthy => {
            entry.held_back = None;
        }
        HealthResult::Reverted | HealthResult::RevertFailed => {
            entry.held_back = Some(HeldBack {
                commit: check.commit.clone(),
                fingerprint: check.fingerprint.clone(),
                reason: check.reason.clone(),
            });
            if let Some(p) = &check.put_back {
                // What the host has now: the last healthy definition, as applied then.
                entry.applied_commit = Some(p.commit.clone());
                entry.fingerprint = Some(p.fingerprint.clone());
                if p.definition_hash.is_some() {
                    entry.definition_hash = p.definition_hash.clone();
                }
                entry.pending_restart = false;
            }
        }
    }
    // Healthy: the outcome's own result stands.
    if let Some(error) = check.error() {
        entry.ok = false;
        entry.last_error = Some(error);
    }
}

/// A hold-back that no longer applies (the commit's definition of the VM changed) is
/// dropped; `fingerprint`: the commit's definition now.
pub fn forget_stale_hold_back(entry: &mut VmRecord, fingerprint: &str) {
    if entry
        .held_back
        .as_ref()
        .is_some_and(|h| h.fingerprint != fingerprint)
    {
        entry.held_back = None;
    }
}

/// Records an attempt that ended before anything was applied (`commit` is `None`
/// when nothing was fetched): the last applied commit and the VMs' records stay.
pub fn record_failure(
    record: &mut Record,
    commit: Option<&str>,
    result: SyncResult,
    message: &str,
    now: &str,
) {
    if let Some(commit) = commit {
        count_failure(record, commit);
        record.last_attempted_commit = Some(commit.to_string());
    }
    record.last_attempt_at = Some(now.to_string());
    record.last_result = Some(result);
    record.last_error = Some(message.to_string());
}

/// Notes an attempt of `commit` that did not converge.
fn count_failure(record: &mut Record, commit: &str) {
    if record.last_attempted_commit.as_deref() == Some(commit) {
        record.failed_attempts = record.failed_attempts.saturating_add(1);
    } else {
        record.failed_attempts = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::VmRecord;

    fn vm_outcome(name: &str, error: Option<&str>) -> crate::reconcile::outcome::VmOutcome {
        crate::reconcile::outcome::VmOutcome {
            name: name.into(),
            fingerprint: format!("fp-{name}"),
            autostart: true,
            state: crate::desired::manifest::PowerState::Running,
            done: vec!["define".into()],
            error: error.map(|e| crate::reconcile::outcome::VmFailure::Action(e.into())),
            pending_restart: false,
            drift: vec![],
            drift_reported_only: false,
            definition_hash: Some(format!("hash-{name}")),
            previous_hash: None,
            up: true,
            kinds: vec![],
            defined: error.is_none(),
            autostart_set: error.is_none(),
            power_unsettled: false,
        }
    }

    fn applied(commit: &str, vms: &[&str]) -> Record {
        let mut record = Record {
            last_applied_commit: Some(commit.into()),
            last_attempted_commit: Some(commit.into()),
            last_result: Some(SyncResult::Converged),
            ..Default::default()
        };
        for vm in vms {
            record.vms.insert(
                vm.to_string(),
                VmRecord {
                    applied_commit: Some(commit.into()),
                    ok: true,
                    definition_hash: Some(format!("old-{vm}")),
                    ..Default::default()
                },
            );
        }
        record
    }

    /// A failure before anything was applied: per result, what the record says after.
    #[test]
    fn a_failed_attempt_keeps_the_last_applied_commit_and_the_vms() {
        for (commit, result, attempts) in [
            (Some("b"), SyncResult::Invalid, 1),
            (Some("b"), SyncResult::Untrusted, 1),
            (Some("b"), SyncResult::Refused, 1),
            (Some("b"), SyncResult::Failed, 1),
            (None, SyncResult::FetchFailed, 0),
        ] {
            let mut record = applied("a", &["web"]);
            let before = record.vms.clone();
            record_failure(&mut record, commit, result, "why", "2026-11-27T12:00:00Z");
            assert_eq!(
                record.last_applied_commit.as_deref(),
                Some("a"),
                "{result:?}"
            );
            assert_eq!(record.vms, before, "{result:?}");
            assert_eq!(record.last_result, Some(result));
            assert_eq!(record.last_error.as_deref(), Some("why"));
            assert_eq!(record.failed_attempts, attempts, "{result:?}");
            assert_eq!(
                record.last_attempted_commit.as_deref(),
                Some(commit.unwrap_or("a")),
                "{result:?}"
            );
        }
    }

    #[test]
    fn the_same_commit_failing_again_counts_up_and_the_daemon_gives_up_at_the_limit() {
        let mut record = applied("a", &[]);
        for attempt in 1..=3 {
            assert!(!record.gives_up_on("b", 3), "attempt {attempt}");
            record_failure(&mut record, Some("b"), SyncResult::Invalid, "x", "t");
            assert_eq!(record.failed_attempts, attempt);
        }
        assert!(record.gives_up_on("b", 3));
        assert!(!record.gives_up_on("c", 3), "a newer commit is tried");
        record_failure(&mut record, Some("c"), SyncResult::Invalid, "x", "t");
        assert_eq!(
            record.failed_attempts, 1,
            "a new commit starts again at one"
        );
    }

    /// What applying did: per case, the last applied commit, the result and each VM.
    #[test]
    fn an_outcome_is_recorded_per_vm_and_converges_only_when_all_succeeded() {
        // All succeeded: the commit is the last applied one; a VM no longer desired and
        // not pruned keeps its record, one pruned is gone.
        let mut record = applied("a", &["web", "db", "old", "gone"]);
        let outcome = crate::reconcile::outcome::Outcome {
            vms: vec![vm_outcome("web", None), vm_outcome("db", None)],
            pruned: vec![crate::reconcile::outcome::PruneOutcome {
                name: "gone".into(),
                done: vec!["undefine".into()],
                kinds: vec![crate::reconcile::plan_types::ActionKind::Undefine],
                error: None,
                orphaned_disks: vec![],
            }],
            ..Default::default()
        };
        record_outcome(&mut record, "b", ["old", "gone"], &outcome, "now");
        assert_eq!(record.last_applied_commit.as_deref(), Some("b"));
        assert_eq!(record.last_result, Some(SyncResult::Converged));
        assert_eq!(record.last_error, None);
        assert_eq!(record.failed_attempts, 0);
        assert_eq!(
            record.vms.keys().collect::<Vec<_>>(),
            ["db", "old", "web"],
            "kept: not pruned; gone: pruned"
        );
        assert_eq!(record.vms["web"].applied_commit.as_deref(), Some("b"));
        assert_eq!(
            record.vms["web"].definition_hash.as_deref(),
            Some("hash-web")
        );
        assert_eq!(record.vms["old"].applied_commit.as_deref(), Some("a"));

        // One VM failed: the commit is attempted, not applied; the failed VM keeps what
        // was applied before, with the error; the other one moves on.
        let mut record = applied("a", &["web", "db"]);
        let outcome = crate::reconcile::outcome::Outcome {
            vms: vec![vm_outcome("web", Some("boom")), vm_outcome("db", None)],
            ..Default::default()
        };
        record_outcome(&mut record, "b", [], &outcome, "now");
        assert_eq!(record.last_applied_commit.as_deref(), Some("a"));
        assert_eq!(record.last_attempted_commit.as_deref(), Some("b"));
        assert_eq!(record.last_result, Some(SyncResult::Failed));
        assert_eq!(record.last_error.as_deref(), Some("vm 'web': boom"));
        assert_eq!(record.failed_attempts, 1);
        let web = &record.vms["web"];
        assert!(!web.ok);
        assert_eq!(web.applied_commit.as_deref(), Some("a"));
        assert_eq!(web.definition_hash.as_deref(), Some("old-web"));
        assert_eq!(record.vms["db"].applied_commit.as_deref(), Some("b"));

        // A directory that could not be made fails the sync too.
        let mut record = applied("a", &[]);
        let outcome = crate::reconcile::outcome::Outcome {
            directory_errors: vec!["directory '/x': denied".into()],
            ..Default::default()
        };
        record_outcome(&mut record, "b", [], &outcome, "now");
        assert_eq!(record.last_result, Some(SyncResult::Failed));
        assert_eq!(record.last_applied_commit.as_deref(), Some("a"));
    }

    /// A plan of "b" in which vm "web" and network "lan" show `drift`.
    fn drifted_plan(drift: &[&str]) -> Plan {
        let drift: Vec<String> = drift.iter().map(|d| d.to_string()).collect();
        let vm = crate::reconcile::plan_types::VmPlan {
            active: true,
            drift: drift.clone(),
            drift_reported_only: true,
            ..crate::reconcile::plan_types::VmPlan::new(
                "web",
                "fp-web",
                true,
                crate::desired::manifest::PowerState::Running,
            )
        };
        Plan {
            commit: "b".into(),
            create_directories: vec![],
            vms: vec![vm],
            prune: vec![],
            refused: None,
            foreign_tagged: 0,
            resources: crate::reconcile::plan_types::ResourcePlan {
                networks: vec![crate::reconcile::plan_types::ResPlan {
                    name: "lan".into(),
                    drift,
                    ..Default::default()
                }],
                ..Default::default()
            },
            next_window: None,
        }
    }

    /// A suspended host: only the drift goes into the record, and only when it changed.
    #[test]
    fn drift_seen_while_suspended_is_noted_and_nothing_else() {
        let mut record = applied("a", &["web"]);
        record
            .networks
            .insert("lan".into(), ResourceRecord::default());
        let plan = drifted_plan(&["autostart changed"]);
        assert!(note_drift(&mut record, &plan));
        assert_eq!(record.vms["web"].drift, ["autostart changed"]);
        assert_eq!(record.networks["lan"].drift, ["autostart changed"]);
        assert_eq!(record.last_applied_commit.as_deref(), Some("a"));
        assert_eq!(record.vms["web"].applied_commit.as_deref(), Some("a"));
        assert!(!note_drift(&mut record, &plan), "the same drift again");
        assert!(note_drift(&mut record, &drifted_plan(&[])), "drift gone");
        assert!(record.vms["web"].drift.is_empty());
    }

    /// VMs held back by a suspension get their entry from before the sync (with the
    /// drift just seen); a held VM new in the commit gets none; others keep the new one.
    #[test]
    fn held_vms_get_their_old_entry_back_with_the_new_drift() {
        let mut record = applied("a", &["web", "db"]);
        let before = record.vms.clone();
        for vm in record.vms.values_mut() {
            vm.applied_commit = Some("b".into());
            vm.drift = vec!["memory changed".into()];
        }
        record.vms.insert("new".into(), VmRecord::default());
        let held = ["web".to_string(), "new".to_string()];
        restore_held(&mut record, &before, &held);
        assert_eq!(record.vms["web"].applied_commit.as_deref(), Some("a"));
        assert_eq!(record.vms["web"].drift, ["memory changed"]);
        assert!(!record.vms.contains_key("new"));
        assert_eq!(record.vms["db"].applied_commit.as_deref(), Some("b"));
    }
}
