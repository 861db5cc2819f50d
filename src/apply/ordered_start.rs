//! Ordered starts (`depends_on`): the VMs of a plan are applied in waves over their
//! dependency graph (parallel within a wave, on the bounded parallel map), and a VM
//! whose actions start its guest (a start, a restart) does so only when each of its
//! dependencies is up: healthy by the dependency's own `[vm.health]` check when it has
//! one, else running. A dependency that is not up in time fails the VMs that wait on
//! it ("waiting for db: not healthy after 5m"): their actions before the start (a new
//! definition, a disk) are done, the start is not; other VMs go on.
//!
//! How long a dependency may take: with `[vm.health]`, its `settle` plus its `timeout`
//! (default 5m), counted from the moment a dependent starts waiting, the check tried
//! again every few seconds until it passes; without, it must be running when its
//! dependents' wave comes (its own start, in an earlier wave, has finished by then).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::desired::domain_xml;
use crate::desired::health_spec::HealthSpec;
use crate::desired::start_order::Graph;
use crate::host::health_probe::{self, Verdict};
use crate::host::hypervisor::Hypervisor;
use crate::reconcile::outcome::{VmFailure, VmOutcome};
use crate::reconcile::plan_types::{Plan, VmPlan};
use crate::util::par;

/// How long between two tries of a dependency's health check.
const RETRY: Duration = Duration::from_secs(2);

/// Whether `name` is up: running, and healthy by `check` when it has one (tried again
/// until it passes, within the check's settle plus timeout). `Err`: why not, for the
/// message "waiting for NAME: …".
pub fn wait_up(
    hv: &dyn Hypervisor,
    name: &str,
    check: Option<&HealthSpec>,
    cancel: &AtomicBool,
) -> Result<(), String> {
    let running = |hv: &dyn Hypervisor| hv.run_state(name).is_ok_and(|s| s.is_running());
    let Some(spec) = check else {
        return if running(hv) {
            Ok(())
        } else {
            Err("not running".into())
        };
    };
    let limit = spec.settle + spec.timeout;
    let started = Instant::now();
    let uuid = hv
        .xml(name, true)
        .ok()
        .and_then(|x| domain_xml::summarize(&x).ok())
        .and_then(|s| s.uuid)
        .unwrap_or_default();
    let mut attempt = spec.clone();
    let mut last;
    loop {
        if !running(hv) {
            return Err("not running".into());
        }
        attempt.timeout = limit.saturating_sub(started.elapsed());
        match health_probe::check(hv, name, &uuid, &attempt, cancel) {
            Verdict::Healthy => {
                info!(vm = %name, waited_ms = started.elapsed().as_millis() as u64, "dependency is up (healthy)");
                return Ok(());
            }
            Verdict::Interrupted => return Err("vmsync is stopping".into()),
            Verdict::Unhealthy(why) => last = why,
        }
        // Settled once: the next tries only run the check.
        attempt.settle = Duration::ZERO;
        if started.elapsed() + RETRY >= limit || cancel.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(RETRY);
    }
    Err(format!(
        "not healthy after {} (last check: {last})",
        humantime::format_duration(limit)
    ))
}

/// Applies the VMs of `plan` wave by wave with `apply_one` (at most `threads` at a
/// time); a VM whose start waits on a dependency that is not up gets only the actions
/// before its start. The outcomes come back in plan order.
pub fn apply_in_order(
    plan: &Plan,
    hv: &dyn Hypervisor,
    cancel: &AtomicBool,
    threads: usize,
    apply_one: &(dyn Fn(&VmPlan) -> VmOutcome + Sync),
) -> Vec<VmOutcome> {
    let by_name: BTreeMap<&str, &VmPlan> = plan.vms.iter().map(|v| (v.name.as_str(), v)).collect();
    let graph = Graph::new(
        plan.vms
            .iter()
            .map(|v| (v.name.as_str(), v.order.after.as_slice())),
    );
    let mut done: BTreeMap<String, VmOutcome> = BTreeMap::new();
    for wave in graph.waves() {
        let vms: Vec<&VmPlan> = wave
            .iter()
            .filter_map(|n| by_name.get(n.as_str()).copied())
            .collect();
        let up = dependencies_up(&vms, &by_name, hv, cancel, threads);
        let outcomes = par::map(vms, threads, |vm| match blocked_by(vm, &up) {
            Some(why) => held_before_start(vm, why, apply_one),
            None => apply_one(vm),
        });
        done.extend(outcomes.into_iter().map(|o| (o.name.clone(), o)));
    }
    plan.vms
        .iter()
        .filter_map(|v| done.remove(&v.name))
        .collect()
}

/// Whether a VM's actions start its guest (so it waits for its dependencies).
fn starts(vm: &VmPlan) -> bool {
    vm.error.is_none() && vm.actions.iter().any(|a| a.starts_guest())
}

/// The dependencies the starting VMs of a wave wait on, each checked once (in
/// parallel): name -> up, or why not.
fn dependencies_up(
    wave: &[&VmPlan],
    by_name: &BTreeMap<&str, &VmPlan>,
    hv: &dyn Hypervisor,
    cancel: &AtomicBool,
    threads: usize,
) -> BTreeMap<String, Result<(), String>> {
    let needed: BTreeSet<&str> = wave
        .iter()
        .filter(|vm| starts(vm))
        .flat_map(|vm| vm.order.after.iter().map(String::as_str))
        .collect();
    let checks: Vec<(&str, Option<&HealthSpec>)> = needed
        .into_iter()
        .map(|d| (d, by_name.get(d).and_then(|p| p.order.up_check.as_ref())))
        .collect();
    par::map(checks, threads, |(dep, check)| {
        (dep.to_string(), wait_up(hv, dep, check, cancel))
    })
    .into_iter()
    .collect()
}

/// The first dependency of `vm` that is not up, as "waiting for db: …".
fn blocked_by(vm: &VmPlan, up: &BTreeMap<String, Result<(), String>>) -> Option<String> {
    if !starts(vm) {
        return None;
    }
    vm.order.after.iter().find_map(|dep| match up.get(dep) {
        Some(Err(why)) => Some(format!("waiting for {dep}: {why}")),
        _ => None,
    })
}

/// Applies the actions of `vm` before its first start, then fails it with `why`.
fn held_before_start(
    vm: &VmPlan,
    why: String,
    apply_one: &(dyn Fn(&VmPlan) -> VmOutcome + Sync),
) -> VmOutcome {
    warn!(vm = %vm.name, "not started: {why}");
    let mut before = vm.clone();
    let first = before
        .actions
        .iter()
        .position(|a| a.starts_guest())
        .unwrap_or(before.actions.len());
    before.actions.truncate(first);
    let mut outcome = apply_one(&before);
    if outcome.error.is_none() {
        outcome.error = Some(VmFailure::Waiting(why));
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::manifest::PowerState;
    use crate::reconcile::plan_types::Action;
    use crate::testing::FakeHost;
    use std::sync::Mutex;

    fn vm(name: &str, after: &[&str], actions: Vec<Action>) -> VmPlan {
        VmPlan {
            actions,
            order: crate::reconcile::plan_types::OrderView {
                after: after.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            ..VmPlan::new(name, "fp", true, PowerState::Running)
        }
    }

    fn plan(vms: Vec<VmPlan>) -> Plan {
        Plan {
            commit: "c".into(),
            create_directories: Vec::new(),
            vms,
            prune: Vec::new(),
            refused: None,
            foreign_tagged: 0,
            resources: Default::default(),
            next_window: None,
        }
    }

    fn outcome(vm: &VmPlan) -> VmOutcome {
        VmOutcome {
            name: vm.name.clone(),
            fingerprint: vm.fingerprint.clone(),
            autostart: vm.autostart,
            state: vm.state,
            done: vm.actions.iter().map(Action::describe).collect(),
            error: None,
            pending_restart: false,
            drift: Vec::new(),
            drift_reported_only: false,
            definition_hash: None,
            previous_hash: None,
            up: false,
            kinds: vm.actions.iter().map(Action::kind).collect(),
            defined: false,
            autostart_set: false,
            power_unsettled: false,
        }
    }

    #[test]
    fn dependencies_start_first_and_a_dependency_that_is_down_holds_only_its_dependents() {
        let define = || Action::Define {
            xml: "<domain/>".into(),
            redefine: false,
        };
        let p = plan(vec![
            vm("app", &["db"], vec![define(), Action::Start]),
            vm("db", &["router"], vec![Action::Start]),
            vm("router", &[], vec![Action::Start]),
            vm("other", &[], vec![Action::Start]),
        ]);
        // The host: router and other come up; db's start "fails" (it stays off).
        let listing = |name: &str, active| crate::host::hypervisor::Listing {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            active,
            autostart: false,
            persistent: true,
        };
        let host = FakeHost::with_domains(
            [("router", true), ("other", true), ("db", false)]
                .map(|(n, a)| (listing(n, a), String::new()))
                .into(),
        );
        let order = Mutex::new(Vec::new());
        let outcomes = apply_in_order(&p, &host, &AtomicBool::new(false), 4, &|vm| {
            order.lock().unwrap().push(vm.name.clone());
            outcome(vm)
        });
        let order = order.into_inner().unwrap();
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
        assert!(
            pos("router") < pos("db") && pos("db") < pos("app"),
            "{order:?}"
        );
        let names: Vec<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["app", "db", "router", "other"], "plan order");
        assert_eq!(
            outcomes[0].error,
            Some(VmFailure::Waiting("waiting for db: not running".into()))
        );
        assert_eq!(
            outcomes[0].done,
            ["define"],
            "the definition, not the start"
        );
        assert!(outcomes[1..].iter().all(|o| o.error.is_none()));
    }
}
