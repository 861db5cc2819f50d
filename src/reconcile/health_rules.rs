//! Health and revert, the pure part: when a VM is due for a check, what follows a check
//! (keep, revert, report), the hold-back of a reverted commit, and how each result is
//! recorded. No I/O; table-tested. The `[vm.health]` table itself is
//! `desired::health_spec`; the waiting, the command and the revert are in
//! `host::health_probe`; the stage that runs them after `apply` is `apply::health_stage`.
//!
//! Rules (docs/health.md):
//! - a VM is checked when this sync (re)defined it with a new definition (its
//!   fingerprint differs from the one recorded: not a self-heal of drift) and started or
//!   restarted it, or tried to and libvirt refused the start;
//! - healthy: the definition becomes the VM's last healthy one;
//! - unhealthy, with `revert` and a last healthy definition: put it back, start it,
//!   check again (`reverted`, or `revert-failed`); without `revert`, or with no healthy
//!   definition yet (the VM's first start): `unhealthy`, left as it is;
//! - a reverted (or revert-failed) definition is held back: the planner leaves the VM
//!   alone while the commit's definition of it is the same (same fingerprint), until a
//!   newer commit changes it or `--retry VM` asks for another try.

use crate::desired::health_spec::HealthSpec;
use crate::reconcile::outcome::{VmFailure, VmOutcome};
use crate::reconcile::plan_types::{Action, VmPlan};
use crate::record::{HealthResult, VmRecord};
use crate::util::commit_id::short;

/// How a VM came to be checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Started or restarted with a new definition.
    Started,
    /// libvirt refused to start the new definition (its message).
    StartFailed(String),
}

/// Whether the VM is due for a health check after `outcome` (see the module's rules).
/// `old`: its record before this sync.
pub fn due(
    spec: Option<&HealthSpec>,
    plan: &VmPlan,
    outcome: &VmOutcome,
    old: Option<&VmRecord>,
) -> Option<Due> {
    spec?;
    let new_definition = old.and_then(|r| r.fingerprint.as_deref()) != Some(&plan.fingerprint);
    if !outcome.defined || !new_definition {
        return None;
    }
    use crate::reconcile::plan_types::ActionKind;
    if outcome
        .kinds
        .iter()
        .any(|k| matches!(k, ActionKind::Start | ActionKind::Restart))
    {
        return Some(Due::Started);
    }
    // The actions run in order and stop at the first failure: the failed one is the
    // next after those done.
    match (
        outcome.error.as_ref()?,
        plan.actions.get(outcome.done.len()),
    ) {
        (VmFailure::Action(e), Some(Action::Start)) => Some(Due::StartFailed(e.clone())),
        (VmFailure::StartAfterStop(e), Some(Action::Restart { .. })) => {
            Some(Due::StartFailed(e.clone()))
        }
        _ => None,
    }
}

/// What follows a failed check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFailure {
    /// Put the last healthy definition back.
    Revert,
    /// Leave it; why not reverted.
    Keep(&'static str),
}

/// What follows a failed check, by the VM's `revert` and whether it has a last healthy
/// definition (one other than the failed one).
pub fn after_failure(spec: &HealthSpec, has_healthy: bool) -> AfterFailure {
    match (spec.revert, has_healthy) {
        (false, _) => AfterFailure::Keep("revert = false"),
        (true, false) => AfterFailure::Keep("no healthy definition to go back to yet"),
        (true, true) => AfterFailure::Revert,
    }
}

/// A revert's result: `Ok(passed)` when the healthy definition was put back and started
/// (`passed`: its check), `Err` when that failed.
pub fn revert_result(revert: &Result<bool, String>) -> HealthResult {
    match revert {
        Ok(true) => HealthResult::Reverted,
        Ok(false) | Err(_) => HealthResult::RevertFailed,
    }
}

/// The definition put back by a revert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutBack {
    pub commit: String,
    pub fingerprint: String,
    /// `domain_xml::definition_hash` of the definition read back (the drift baseline).
    pub definition_hash: Option<String>,
}

/// One VM's check in a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmHealth {
    pub name: String,
    pub result: HealthResult,
    /// What failed (empty when healthy).
    pub reason: String,
    /// The commit and fingerprint of the definition checked.
    pub commit: String,
    pub fingerprint: String,
    /// The last healthy definition, when it was defined again by a revert.
    pub put_back: Option<PutBack>,
}

impl VmHealth {
    /// The VM's error in the sync's outcome (`None` when healthy).
    pub fn error(&self) -> Option<String> {
        let commit = short(&self.commit);
        match self.result {
            HealthResult::Healthy => None,
            HealthResult::Unhealthy => Some(format!("unhealthy: {}", self.reason)),
            HealthResult::Reverted => Some(format!(
                "reverted: commit {commit} was unhealthy ({}); the last healthy definition{} runs again",
                self.reason,
                self.put_back
                    .as_ref()
                    .map(|p| format!(" (commit {})", short(&p.commit)))
                    .unwrap_or_default()
            )),
            HealthResult::RevertFailed => Some(format!(
                "revert failed: commit {commit} was unhealthy ({})",
                self.reason
            )),
        }
    }
}

/// The planner's hold-back: a VM whose commit definition was reverted before (same
/// fingerprint) gets no action, and an error that says why.
pub fn hold_back(plan: &mut VmPlan, record: Option<&VmRecord>) {
    let Some(held) = record.and_then(|r| r.held_back.as_ref()) else {
        return;
    };
    if held.fingerprint != plan.fingerprint || plan.error.is_some() {
        return;
    }
    plan.actions.clear();
    plan.pending_restart = false;
    plan.error = Some(format!(
        "held back: its definition in commit {} was reverted ({}); a newer commit that changes this vm, or `vmsync --once --retry {}`, tries again",
        short(&held.commit),
        held.reason,
        plan.name
    ));
}

/// What the stage found for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Checked (healthy, or not and what followed).
    Checked(VmHealth),
    /// Not started by this sync, but running its committed definition with no healthy
    /// one recorded yet: taken as the last healthy one (commit, fingerprint).
    Adopted {
        name: String,
        commit: String,
        fingerprint: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::health_spec::DEFAULT_SETTLE;
    use crate::desired::health_spec::DEFAULT_TIMEOUT;
    use crate::desired::health_spec::RawHealth;
    use crate::desired::manifest::PowerState;
    use crate::reconcile::plan_types::ActionKind;
    use crate::reconcile::plan_types::HealthView;
    use crate::reconcile::record_update::forget_stale_hold_back;
    use crate::reconcile::record_update::record_check;
    use crate::record::HeldBack;
    use std::time::Duration;

    fn spec(revert: bool) -> HealthSpec {
        HealthSpec {
            settle: Duration::from_secs(1),
            command: None,
            timeout: Duration::from_secs(60),
            revert,
            guest_agent: false,
        }
    }

    fn vm_plan(fingerprint: &str, actions: Vec<Action>) -> VmPlan {
        VmPlan {
            actions,
            ..VmPlan::new("web", fingerprint, true, PowerState::Running)
        }
    }

    fn outcome(done: &[Action], error: Option<VmFailure>) -> VmOutcome {
        VmOutcome {
            name: "web".into(),
            fingerprint: "new".into(),
            autostart: true,
            state: PowerState::Running,
            done: done.iter().map(Action::describe).collect(),
            error,
            pending_restart: false,
            drift: vec![],
            drift_reported_only: false,
            definition_hash: None,
            previous_hash: None,
            up: false,
            kinds: done.iter().map(Action::kind).collect(),
            defined: done.iter().any(|a| a.kind() == ActionKind::Redefine),
            autostart_set: false,
            power_unsettled: false,
        }
    }

    fn record(fingerprint: &str) -> VmRecord {
        VmRecord {
            fingerprint: Some(fingerprint.into()),
            ok: true,
            ..Default::default()
        }
    }

    #[test]
    fn which_vms_are_due_for_a_check() {
        let define = Action::Define {
            xml: String::new(),
            redefine: true,
        };
        let restart = Action::Restart {
            timeout: Duration::from_secs(3),
        };
        let s = spec(true);
        let old = record("old");
        let same = record("new");
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            &str,
            Option<&HealthSpec>,
            Vec<Action>,
            usize,
            Option<VmFailure>,
            Option<&VmRecord>,
            Option<Due>,
        )> = vec![
            (
                "new definition started",
                Some(&s),
                vec![define.clone(), Action::Start],
                2,
                None,
                Some(&old),
                Some(Due::Started),
            ),
            (
                "new definition restarted",
                Some(&s),
                vec![define.clone(), restart.clone()],
                2,
                None,
                Some(&old),
                Some(Due::Started),
            ),
            (
                "first define and start",
                Some(&s),
                vec![define.clone(), Action::Start],
                2,
                None,
                None,
                Some(Due::Started),
            ),
            (
                "no [vm.health]",
                None,
                vec![define.clone(), Action::Start],
                2,
                None,
                Some(&old),
                None,
            ),
            (
                "new definition, kept running (defer)",
                Some(&s),
                vec![define.clone()],
                1,
                None,
                Some(&old),
                None,
            ),
            (
                "self-heal redefine of the same definition",
                Some(&s),
                vec![define.clone(), Action::Start],
                2,
                None,
                Some(&same),
                None,
            ),
            (
                "started, definition unchanged",
                Some(&s),
                vec![Action::Start],
                1,
                None,
                Some(&same),
                None,
            ),
            (
                "start refused by libvirt",
                Some(&s),
                vec![define.clone(), Action::Start],
                1,
                Some(VmFailure::Action(
                    "failed to start domain 'web': no disk".into(),
                )),
                Some(&old),
                Some(Due::StartFailed(
                    "failed to start domain 'web': no disk".into(),
                )),
            ),
            (
                "restart: start refused",
                Some(&s),
                vec![define.clone(), restart.clone()],
                1,
                Some(VmFailure::StartAfterStop("no disk".into())),
                Some(&old),
                Some(Due::StartFailed("no disk".into())),
            ),
            (
                "restart: shutdown failed, old one runs",
                Some(&s),
                vec![define.clone(), restart.clone()],
                1,
                Some(VmFailure::Action("failed to shut down".into())),
                Some(&old),
                None,
            ),
            (
                "interrupted before the start",
                Some(&s),
                vec![define.clone(), Action::Start],
                1,
                Some(VmFailure::Interrupted),
                Some(&old),
                None,
            ),
            (
                "define refused",
                Some(&s),
                vec![define.clone(), Action::Start],
                0,
                Some(VmFailure::Action("failed to define".into())),
                Some(&old),
                None,
            ),
        ];
        for (what, spec, actions, done, error, old, want) in cases {
            let plan = vm_plan("new", actions.clone());
            let out = outcome(&actions[..done], error);
            assert_eq!(due(spec, &plan, &out, old), want, "{what}");
        }
    }

    #[test]
    fn what_follows_a_check() {
        assert_eq!(after_failure(&spec(true), true), AfterFailure::Revert);
        assert_eq!(
            after_failure(&spec(true), false),
            AfterFailure::Keep("no healthy definition to go back to yet")
        );
        assert_eq!(
            after_failure(&spec(false), true),
            AfterFailure::Keep("revert = false")
        );
        assert_eq!(revert_result(&Ok(true)), HealthResult::Reverted);
        assert_eq!(revert_result(&Ok(false)), HealthResult::RevertFailed);
        assert_eq!(
            revert_result(&Err("define failed".into())),
            HealthResult::RevertFailed
        );
        assert!(!HealthResult::Healthy.failed());
        assert!(HealthResult::Reverted.failed() && HealthResult::Unhealthy.failed());
        assert_eq!(HealthResult::RevertFailed.as_str(), "revert-failed");
    }

    fn check(result: HealthResult, put_back: bool) -> VmHealth {
        VmHealth {
            name: "web".into(),
            result,
            reason: if result == HealthResult::Healthy {
                String::new()
            } else {
                "command exited with status 1".into()
            },
            commit: "c2c2c2c2c2c2c2c2".into(),
            fingerprint: "new".into(),
            put_back: put_back.then(|| PutBack {
                commit: "c1c1c1c1c1c1c1c1".into(),
                fingerprint: "old".into(),
                definition_hash: Some("hash-old".into()),
            }),
        }
    }

    #[test]
    fn each_result_is_recorded() {
        // Healthy: the new baseline; a hold-back of an older commit goes.
        let mut entry = VmRecord {
            applied_commit: Some("c2c2c2c2c2c2c2c2".into()),
            fingerprint: Some("new".into()),
            ok: true,
            held_back: Some(HeldBack {
                commit: "c0".into(),
                fingerprint: "older".into(),
                reason: "x".into(),
            }),
            ..Default::default()
        };
        record_check(&mut entry, &check(HealthResult::Healthy, false));
        assert_eq!(entry.health, Some(HealthResult::Healthy));
        assert_eq!(entry.healthy_commit.as_deref(), Some("c2c2c2c2c2c2c2c2"));
        assert_eq!(entry.healthy_fingerprint.as_deref(), Some("new"));
        assert_eq!(entry.held_back, None);
        assert!(entry.ok && entry.last_error.is_none());

        // Reverted: the host runs the old definition, as recorded; the commit is held back.
        let mut entry = VmRecord {
            applied_commit: Some("c1c1c1c1c1c1c1c1".into()),
            fingerprint: Some("new".into()),
            definition_hash: Some("hash-new".into()),
            healthy_commit: Some("c1c1c1c1c1c1c1c1".into()),
            healthy_fingerprint: Some("old".into()),
            ..Default::default()
        };
        record_check(&mut entry, &check(HealthResult::Reverted, true));
        assert_eq!(entry.health, Some(HealthResult::Reverted));
        assert_eq!(entry.fingerprint.as_deref(), Some("old"));
        assert_eq!(entry.definition_hash.as_deref(), Some("hash-old"));
        assert_eq!(entry.applied_commit.as_deref(), Some("c1c1c1c1c1c1c1c1"));
        assert_eq!(
            entry.held_back.as_ref().map(|h| h.fingerprint.as_str()),
            Some("new")
        );
        assert!(!entry.ok);
        let error = entry.last_error.clone().unwrap();
        assert!(
            error.starts_with(
                "reverted: commit c2c2c2c2c2c2 was unhealthy (command exited with status 1)"
            ) && error.contains("(commit c1c1c1c1c1c1) runs again"),
            "{error}"
        );
        assert_eq!(entry.healthy_fingerprint.as_deref(), Some("old"));

        // Revert failed: held back too (the daemon must not try it again).
        let mut failed = VmRecord::default();
        record_check(&mut failed, &check(HealthResult::RevertFailed, false));
        assert!(failed.held_back.is_some());
        assert!(failed.last_error.unwrap().starts_with("revert failed"));

        // Unhealthy (not reverted): no hold-back, the VM runs the commit.
        let mut unhealthy = VmRecord::default();
        record_check(&mut unhealthy, &check(HealthResult::Unhealthy, false));
        assert_eq!(unhealthy.held_back, None);
        assert_eq!(unhealthy.health, Some(HealthResult::Unhealthy));
        assert!(!unhealthy.ok);

        // A hold-back lasts while the commit's definition of the vm stays the same.
        forget_stale_hold_back(&mut entry, "new");
        assert!(entry.held_back.is_some());
        forget_stale_hold_back(&mut entry, "newer");
        assert!(entry.held_back.is_none());
    }

    #[test]
    fn the_planner_holds_back_a_reverted_definition() {
        let define = Action::Define {
            xml: String::new(),
            redefine: true,
        };
        let mut rec = record("old");
        rec.held_back = Some(HeldBack {
            commit: "c2c2c2c2c2c2c2c2".into(),
            fingerprint: "new".into(),
            reason: "command exited with status 1".into(),
        });
        // The same definition (any commit): nothing done, said why.
        let mut p = vm_plan("new", vec![define.clone(), Action::Start]);
        hold_back(&mut p, Some(&rec));
        assert!(p.actions.is_empty());
        let e = p.error.unwrap();
        assert!(
            e.starts_with("held back: its definition in commit c2c2c2c2c2c2 was reverted")
                && e.contains("vmsync --once --retry web"),
            "{e}"
        );
        // A newer definition: planned as usual.
        let mut p = vm_plan("newer", vec![define.clone(), Action::Start]);
        hold_back(&mut p, Some(&rec));
        assert_eq!(p.actions.len(), 2);
        assert_eq!(p.error, None);
        // No hold-back, or no record: as usual.
        let mut p = vm_plan("new", vec![define]);
        hold_back(&mut p, Some(&record("old")));
        hold_back(&mut p, None);
        assert_eq!(p.actions.len(), 1);
    }

    #[test]
    fn health_table_parses_with_defaults_and_checks() {
        let parse = |text: &str| {
            let raw: RawHealth = toml::from_str(text).map_err(|e| e.message().to_string())?;
            let mut problems = Vec::new();
            let spec = HealthSpec::parse(&raw, |_, field, msg| {
                problems.push(format!("{field}: {msg}"))
            });
            spec.ok_or(problems.join("; "))
        };
        let s = parse("").unwrap();
        assert_eq!(
            s,
            HealthSpec {
                settle: DEFAULT_SETTLE,
                command: None,
                timeout: DEFAULT_TIMEOUT,
                revert: true,
                guest_agent: false,
            }
        );
        let s = parse(
            "settle = \"2s\"\ncommand = [\"/bin/check\", \"-v\"]\ntimeout = \"1m\"\nrevert = false\nguest_agent = true",
        )
        .unwrap();
        assert_eq!(s.settle, Duration::from_secs(2));
        assert_eq!(s.timeout, Duration::from_secs(60));
        assert_eq!(s.command.unwrap(), vec!["/bin/check", "-v"]);
        assert!(!s.revert && s.guest_agent);
        assert!(parse("settle = \"10m\"").unwrap_err().contains(
            "health.settle: settle (10m) must be shorter than the whole check's timeout (5m)"
        ));
        assert!(
            parse("settle = \"soon\"")
                .unwrap_err()
                .starts_with("health.settle: ")
        );
        assert!(
            parse("command = []")
                .unwrap_err()
                .contains("must name a program")
        );
        assert!(
            parse("setle = \"1s\"")
                .unwrap_err()
                .contains("unknown field `setle`")
        );
    }

    #[test]
    fn short_commit_ids_never_split_a_character() {
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short("ééééééééééééé"), "éééééééééééé");
    }

    #[test]
    fn views_for_plan_and_status() {
        assert_eq!(HealthView::of(&VmRecord::default()), None);
        let rec = VmRecord {
            health: Some(HealthResult::Reverted),
            healthy_commit: Some("c1c1c1c1c1c1c1c1".into()),
            held_back: Some(HeldBack {
                commit: "c2c2c2c2c2c2c2c2".into(),
                fingerprint: "f".into(),
                reason: "r".into(),
            }),
            ..Default::default()
        };
        let view = HealthView::of(&rec).unwrap();
        assert_eq!(
            view.line(),
            "health: reverted; last healthy commit c1c1c1c1c1c1; held back: commit c2c2c2c2c2c2"
        );
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["result"], "reverted");
        assert_eq!(json["held_back"], "c2c2c2c2c2c2c2c2");
    }
}
