//! The maintenance-window gate on a plan (`[[window]]`): outside every window that
//! applies to a VM, the actions that interrupt its running guest ([`Action::interrupts_guest`]:
//! a restart, a stop, and with them a rename or a prune that needs the guest shut down)
//! wait, and so does everything after them in that VM's list; what comes before (a new
//! definition for the next boot, a disk, the autostart flag) is applied at once. A
//! waiting VM says what it waits for ("window <next start>"), and the plan holds the
//! earliest start for the daemon to wake at. Pure: `now` is a value.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::desired::manifest::PowerState;
use crate::desired::window_spec::{self, Window};
use crate::reconcile::plan_types::{Action, Plan};

/// What waits: "window 2026-12-06T02:00:00Z" (the next start, UTC).
pub fn waiting_text(next: Option<DateTime<Utc>>) -> String {
    match next {
        Some(t) => format!("window {}", t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        None => "window (none of its windows opens again)".into(),
    }
}

/// The window start in a [`waiting_text`].
pub fn start_of(waiting: &str) -> Option<DateTime<Utc>> {
    let at = waiting.strip_prefix("window ")?;
    DateTime::parse_from_rfc3339(at)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Holds back the interrupting actions of `plan` that no window open at `now` allows on
/// `host`. Returns how many VMs (and prunes) wait.
pub fn gate(plan: &mut Plan, windows: &[Window], host: &str, now: DateTime<Utc>) -> usize {
    if windows.is_empty() {
        return 0;
    }
    let mut waiting = 0;
    let mut next: Option<DateTime<Utc>> = None;
    let mut note = |start: Option<DateTime<Utc>>| {
        waiting += 1;
        if let Some(s) = start {
            next = Some(next.map_or(s, |n: DateTime<Utc>| n.min(s)));
        }
        waiting_text(start)
    };
    for vm in plan.vms.iter_mut().filter(|v| v.error.is_none()) {
        let Some(first) = vm.actions.iter().position(Action::interrupts_guest) else {
            continue;
        };
        let Err(start) = window_spec::allowed(windows, host, &vm.name, now) else {
            continue;
        };
        let held = vm.actions.split_off(first);
        if held.iter().any(|a| matches!(a, Action::Restart { .. })) {
            vm.pending_restart = vm.active;
        }
        if held.iter().any(|a| matches!(a, Action::Stop { .. })) {
            // Still running: no power state is claimed until the stop is done.
            vm.state = PowerState::Defined;
        }
        vm.order.waiting = Some(note(start));
    }
    for p in plan.prune.iter_mut().filter(|p| p.skipped.is_none()) {
        if !p.actions.iter().any(Action::interrupts_guest) {
            continue;
        }
        let Err(start) = window_spec::allowed(windows, host, &p.name, now) else {
            continue;
        };
        p.actions.clear();
        p.skipped = Some(format!("waiting for {}", note(start)));
    }
    plan.next_window = next;
    waiting
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::plan_types::{PrunePlan, VmPlan};
    use std::time::Duration;

    fn windows() -> Vec<Window> {
        let text = "[[window]]\nschedule = \"0 0 2 * * *\"\nduration = \"1h\"\ntimezone = \"UTC\"\nvms = [\"web*\"]\n";
        #[derive(serde::Deserialize)]
        struct Doc {
            window: Vec<window_spec::RawWindow>,
        }
        let doc: Doc = toml::from_str(text).unwrap();
        window_spec::parse_all(doc.window, &|_| 1, &mut |_, f, m| panic!("{f}: {m}"))
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn vm(name: &str, actions: Vec<Action>) -> VmPlan {
        VmPlan {
            actions,
            active: true,
            ..VmPlan::new(name, "fp", true, PowerState::Running)
        }
    }

    fn plan() -> Plan {
        let t = Duration::from_secs(60);
        let define = Action::Define {
            xml: "<domain/>".into(),
            redefine: true,
        };
        Plan {
            commit: "c".into(),
            create_directories: Vec::new(),
            vms: vec![
                vm("web", vec![define.clone(), Action::Restart { timeout: t }]),
                vm("web-db", vec![define.clone(), Action::Stop { timeout: t }]),
                vm("web-new", vec![define.clone(), Action::Start]),
                // No window applies to it: always allowed.
                vm("app", vec![define, Action::Restart { timeout: t }]),
            ],
            prune: vec![PrunePlan {
                name: "web-old".into(),
                active: true,
                actions: vec![Action::Stop { timeout: t }, Action::Undefine],
                disks: Vec::new(),
                skipped: None,
            }],
            refused: None,
            foreign_tagged: 0,
            resources: Default::default(),
            next_window: None,
        }
    }

    #[test]
    fn outside_a_window_interrupting_actions_wait_and_the_rest_is_applied() {
        let mut p = plan();
        assert_eq!(
            gate(&mut p, &windows(), "hv1", at("2026-12-06T05:00:00Z")),
            3
        );
        let kinds = |i: usize| {
            p.vms[i]
                .actions
                .iter()
                .map(|a| a.kind().as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(0),
            ["redefine"],
            "the definition for the next boot at once"
        );
        assert!(p.vms[0].pending_restart);
        assert_eq!(
            p.vms[0].order.waiting.as_deref(),
            Some("window 2026-12-07T02:00:00Z")
        );
        assert_eq!(kinds(1), ["redefine"]);
        assert_eq!(
            p.vms[1].state,
            PowerState::Defined,
            "no power claim while it waits"
        );
        assert_eq!(
            kinds(2),
            ["redefine", "start"],
            "a start interrupts nothing"
        );
        assert_eq!(p.vms[2].order.waiting, None);
        assert_eq!(kinds(3), ["redefine", "restart"]);
        assert!(p.prune[0].actions.is_empty());
        assert_eq!(
            p.prune[0].skipped.as_deref(),
            Some("waiting for window 2026-12-07T02:00:00Z")
        );
        assert_eq!(p.next_window, Some(at("2026-12-07T02:00:00Z")));
        assert_eq!(
            p.vms[0].order.waiting.as_deref().and_then(start_of),
            p.next_window
        );
    }

    #[test]
    fn inside_a_window_or_without_windows_nothing_waits() {
        let mut p = plan();
        assert_eq!(
            gate(&mut p, &windows(), "hv1", at("2026-12-06T02:30:00Z")),
            0
        );
        assert_eq!(p, plan());
        let mut p = plan();
        assert_eq!(gate(&mut p, &[], "hv1", at("2026-12-06T05:00:00Z")), 0);
        assert_eq!(p, plan());
    }
}
