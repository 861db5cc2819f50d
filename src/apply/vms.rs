//! Applying a plan: creates directories and disks, renames, defines, sets autostart,
//! starts, restarts and stops domains, and prunes, through the `Hypervisor` and
//! `DiskProvisioner` seams. One VM failing does not stop the others; within a VM, the
//! first failed action stops that VM.
//!
//! Stopping is always graceful first: an ACPI shutdown request, then polling until the
//! domain is off; only when the VM's shutdown timeout passes is it destroyed. A failed
//! shutdown request is an error, never a reason to destroy. A stop request (SIGTERM)
//! ends the wait at once: that stop is not done, and the VM is recorded as interrupted.
//!
//! A VM whose actions stopped short is recorded as it is on the host
//! ([`VmOutcome::record`]): what was done stays in its record, so the next run does not
//! take vmsync's own changes for drift.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{debug, error, info, warn};

use crate::apply::{networks_pools, ordered_start};
use crate::desired::domain_xml;
use crate::host::disk::DiskProvisioner;
use crate::host::hypervisor::Hypervisor;
use crate::host::power::{StopError, graceful_stop};
use crate::host::seed_file;
use crate::reconcile::diff;
use crate::reconcile::outcome::{Outcome, PruneOutcome, VmFailure, VmOutcome};
use crate::reconcile::plan_types::{Action, Plan, VmPlan};
use crate::util::commit_id;

/// VMs converged at the same time.
pub const THREADS: usize = 4;

/// Applies `plan`. A refused plan applies nothing. When `cancel` becomes true, the
/// action in flight finishes and no further action starts (those VMs are recorded as
/// interrupted; pruning is skipped).
pub fn apply(
    plan: &Plan,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
    cancel: &AtomicBool,
) -> Outcome {
    let short = commit_id::short(&plan.commit);
    let mut outcome = Outcome::default();
    if let Some(why) = &plan.refused {
        error!(commit = %short, "{why}");
        return outcome;
    }
    for dir in &plan.create_directories {
        match disks.ensure_dir(dir) {
            Ok(_) => {
                info!(directory = %dir.display(), commit = %short, "created directory");
                outcome.directories_created += 1;
            }
            Err(e) => {
                error!(directory = %dir.display(), error = %e, "failed to create directory");
                outcome.directory_errors.push(e.to_string());
            }
        }
    }
    // Pools (defined, built, started), then volumes, then networks, before the domains.
    outcome.resources = networks_pools::apply_before_domains(&plan.resources, hv, short);
    // VMs are independent: their actions run on a few threads (libvirt serves
    // concurrent calls on one connection; disk creations are separate processes).
    // Within a VM, actions stay in order.
    // VMs with `depends_on` wait for their dependencies (see `ordered_start`).
    outcome.vms = ordered_start::apply_in_order(plan, hv, cancel, THREADS, &|vm| {
        apply_vm(vm, hv, disks, cancel, short)
    });
    for p in plan
        .prune
        .iter()
        .filter(|p| p.skipped.is_none() && !cancel.load(Ordering::SeqCst))
    {
        let mut result = PruneOutcome {
            name: p.name.clone(),
            done: Vec::new(),
            kinds: Vec::new(),
            error: None,
            orphaned_disks: Vec::new(),
        };
        for action in &p.actions {
            let mut what = action.describe();
            let done = match action {
                Action::Stop { timeout } => graceful_stop(hv, &p.name, *timeout, cancel)
                    .map(|how| what = format!("stop ({how})"))
                    .map_err(|e| e.to_string()),
                Action::Undefine => hv.undefine_keep_state(&p.name).map_err(|e| e.to_string()),
                other => Err(format!("'{}' is not a prune action", other.describe())),
            };
            match done {
                Ok(()) => {
                    info!(vm = %p.name, commit = %short, action = %what, "pruned");
                    result.done.push(what);
                    result.kinds.push(action.kind());
                }
                Err(e) => {
                    error!(vm = %p.name, commit = %short, action = %what, error = %e, "prune failed");
                    result.error = Some(e);
                    break;
                }
            }
        }
        if result.error.is_none() {
            for disk in &p.disks {
                warn!(vm = %p.name, disk = %disk.display(), "orphaned disk kept (vmsync never deletes disks)");
            }
            result.orphaned_disks = p.disks.clone();
        }
        outcome.pruned.push(result);
    }
    // Networks and pools after the domains that used them.
    if !cancel.load(Ordering::SeqCst) {
        networks_pools::apply_prune(&plan.resources, hv, short, &mut outcome.resources);
    }
    outcome
}

/// Reads the definition back after a define or an adoption: the new drift baseline, and
/// the diff logged.
fn read_back(hv: &dyn Hypervisor, vm: &VmPlan, short: &str, result: &mut VmOutcome) {
    match hv.xml(&vm.name, true) {
        Ok(after) => {
            result.definition_hash = domain_xml::definition_hash(&after);
            let diff =
                diff::definition_diff(&vm.name, vm.current_xml.as_deref(), &after, &vm.source_xml);
            diff::log(&vm.name, short, &diff);
        }
        Err(e) => {
            warn!(vm = %vm.name, error = %e, "could not read the new definition back")
        }
    }
}

/// Runs one VM's actions in order, stopping at the first failure or when `cancel` is set.
fn apply_vm(
    vm: &VmPlan,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
    cancel: &AtomicBool,
    short: &str,
) -> VmOutcome {
    let run = VmRun {
        vm,
        hv,
        disks,
        cancel,
        short,
    };
    let mut result = planned_outcome(vm);
    log_plan(vm, short);
    for action in vm
        .error
        .is_none()
        .then_some(&vm.actions)
        .into_iter()
        .flatten()
    {
        if cancel.load(Ordering::SeqCst) {
            warn!(vm = %vm.name, commit = %short, "stopping before the next action");
            result.error = Some(VmFailure::Interrupted);
            break;
        }
        let mut what = action.describe();
        match run.action(action, &mut what, &mut result) {
            Ok(()) => {
                info!(vm = %vm.name, commit = %short, action = %what, "done");
                record_done(&mut result, action, what);
            }
            Err(e) => {
                if matches!(action, Action::Stop { .. } | Action::Restart { .. }) {
                    result.power_unsettled = true;
                }
                if e == VmFailure::ShutdownInterrupted {
                    // What a stop request asks for, not a failure.
                    warn!(vm = %vm.name, commit = %short, action = %what, "not done: {e}");
                } else {
                    error!(vm = %vm.name, commit = %short, action = %what, error = %e, "action failed");
                }
                result.error = Some(e);
                break;
            }
        }
    }
    if result.pending_restart {
        warn!(vm = %vm.name, commit = %short, "running with an older definition: pending restart");
    }
    result
}

/// A VM's outcome before any action ran: what the plan says of it.
fn planned_outcome(vm: &VmPlan) -> VmOutcome {
    VmOutcome {
        name: vm.name.clone(),
        fingerprint: vm.fingerprint.clone(),
        autostart: vm.autostart,
        state: vm.state,
        done: Vec::new(),
        error: vm.error.clone().map(VmFailure::Planned),
        pending_restart: vm.pending_restart,
        drift: vm.drift.clone(),
        drift_reported_only: vm.drift_reported_only,
        definition_hash: None,
        previous_hash: vm.current_hash.clone(),
        up: vm.active,
        kinds: Vec::new(),
        defined: false,
        autostart_set: false,
        power_unsettled: false,
    }
}

/// Logs what the plan says of a VM before its actions run: warnings, drift, its error.
fn log_plan(vm: &VmPlan, short: &str) {
    for warning in &vm.warnings {
        warn!(vm = %vm.name, "{warning}");
    }
    for d in &vm.drift {
        if vm.drift_reported_only {
            warn!(vm = %vm.name, drift = %d, "drift (self_heal is off: reported only)");
        } else {
            warn!(vm = %vm.name, drift = %d, "drift: putting it back to the commit");
        }
    }
    if let Some(e) = &vm.error {
        error!(vm = %vm.name, commit = %short, error = %e, "vm not converged");
    } else if vm.actions.is_empty() {
        debug!(vm = %vm.name, commit = %short, pending_restart = vm.pending_restart, "unchanged");
    }
}

/// Notes a done action in the VM's outcome: what it did and what the host now has.
fn record_done(result: &mut VmOutcome, action: &Action, what: String) {
    result.done.push(what);
    result.kinds.push(action.kind());
    match action {
        Action::Start | Action::Restart { .. } => result.up = true,
        Action::Stop { .. } => result.up = false,
        Action::Define { .. } | Action::Adopt { .. } => result.defined = true,
        Action::SetAutostart(_) => result.autostart_set = true,
        _ => {}
    }
}

/// What one VM's actions run against.
struct VmRun<'a> {
    vm: &'a VmPlan,
    hv: &'a dyn Hypervisor,
    disks: &'a dyn DiskProvisioner,
    cancel: &'a AtomicBool,
    short: &'a str,
}

impl VmRun<'_> {
    /// Carries out one action; a stop or restart says in `what` how the VM stopped.
    fn action(
        &self,
        action: &Action,
        what: &mut String,
        result: &mut VmOutcome,
    ) -> Result<(), VmFailure> {
        let VmRun {
            vm,
            hv,
            disks,
            cancel,
            short,
        } = *self;
        let failed = |e: &dyn std::fmt::Display| VmFailure::Action(e.to_string());
        let stopped = |e: StopError| match e {
            StopError::Interrupted => VmFailure::ShutdownInterrupted,
            other => VmFailure::Action(other.to_string()),
        };
        match action {
            Action::DownloadImage(image) => disks.fetch_image(image).map_err(|e| failed(&e)),
            Action::CreateDisk(spec) => disks.create(spec).map_err(|e| failed(&e)),
            Action::WriteSeed { seed, .. } => seed_file::write(seed).map_err(|e| failed(&e)),
            Action::Rename { from } => hv.rename(from, &vm.name).map_err(|e| failed(&e)),
            Action::Define { xml, .. } | Action::Adopt { xml: Some(xml), .. } => hv
                .define(xml)
                .inspect(|()| crate::crash_point("after-define"))
                .map_err(|e| failed(&e))
                .map(|()| read_back(hv, vm, short, result)),
            Action::Adopt {
                tag,
                xml: None,
                live,
            } => hv
                .set_tag(&vm.name, tag, *live)
                .map_err(|e| failed(&e))
                .map(|()| read_back(hv, vm, short, result)),
            Action::SetAutostart(on) => hv.set_autostart(&vm.name, *on).map_err(|e| failed(&e)),
            Action::Start => hv.start(&vm.name).map_err(|e| failed(&e)),
            Action::Restart { timeout } => graceful_stop(hv, &vm.name, *timeout, cancel)
                .map_err(stopped)
                .and_then(|how| {
                    hv.start(&vm.name)
                        .map_err(|e| VmFailure::StartAfterStop(e.to_string()))
                        .map(|()| how)
                })
                .map(|how| *what = format!("restart ({how}, started)")),
            Action::Stop { timeout } => graceful_stop(hv, &vm.name, *timeout, cancel)
                .map(|how| *what = format!("stop ({how})"))
                .map_err(stopped),
            Action::Undefine => Err(failed(&"undefine is only planned for pruning")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::manifest::PowerState;
    use crate::host::hypervisor::Listing;
    use crate::host::power::SHUTDOWN_INTERRUPTED;
    use crate::host::power::{StopError, Stopped};
    use crate::reconcile::outcome::INTERRUPTED;
    use crate::record::VmRecord;
    use crate::testing::FakeHost;
    use std::time::Duration;
    use std::time::Instant;

    /// A running guest "web" that ignores ACPI shutdown requests (as a guest without an
    /// OS does) and whose XML cannot be read back.
    fn stubborn_guest() -> FakeHost {
        FakeHost::stubborn_guest("web")
    }

    /// Sets `cancel` after `after`, from another thread (as the signal handler does).
    fn cancel_after(cancel: &'static AtomicBool, after: Duration) {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            cancel.store(true, Ordering::SeqCst);
        });
    }

    #[test]
    fn a_stop_request_ends_the_wait_for_a_guest_shutdown() {
        static CANCEL: AtomicBool = AtomicBool::new(false);
        let hv = stubborn_guest();
        cancel_after(&CANCEL, Duration::from_millis(300));
        let started = Instant::now();
        let result = graceful_stop(&hv, "web", Duration::from_secs(120), &CANCEL);
        assert_eq!(result, Err(StopError::Interrupted));
        assert_eq!(StopError::Interrupted.to_string(), SHUTDOWN_INTERRUPTED);
        // One poll interval after the request, not the 120 s timeout.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(hv.calls(), ["shutdown web"], "asked, never destroyed");

        // Without a stop request the timeout still ends in a destroy.
        let hv = stubborn_guest();
        let result = graceful_stop(
            &hv,
            "web",
            Duration::from_millis(50),
            &AtomicBool::new(false),
        );
        let stopped = result.unwrap();
        assert_eq!(
            stopped,
            Stopped::Destroyed {
                after: Duration::from_millis(50)
            }
        );
        assert!(stopped.to_string().ends_with("destroyed"), "{stopped}");
        assert_eq!(hv.calls(), ["shutdown web", "destroy web"]);
    }

    fn vm_plan(actions: Vec<Action>) -> VmPlan {
        VmPlan {
            actions,
            active: true,
            current_hash: Some("hash-old".into()),
            ..VmPlan::new("web", "fp-new", false, PowerState::Stopped)
        }
    }

    fn old_record() -> VmRecord {
        VmRecord {
            applied_commit: Some("c-old".into()),
            fingerprint: Some("fp-old".into()),
            autostart: true,
            ok: true,
            last_error: None,
            pending_restart: false,
            definition_hash: Some("hash-old".into()),
            state: Some(PowerState::Running),
            drift: Vec::new(),
            ..Default::default()
        }
    }

    /// The defect under systemd: stopping vmsync while a guest shut down left the
    /// autostart flag changed on the host and the record on the old value, which the
    /// next run reported as drift. Now the stop is recorded as not done, and the record
    /// holds what was done.
    #[test]
    fn an_interrupted_stop_is_not_done_and_the_record_keeps_what_was_done() {
        static CANCEL: AtomicBool = AtomicBool::new(false);
        let hv = stubborn_guest();
        let plan = vm_plan(vec![
            Action::Define {
                xml: "<domain><name>web</name></domain>".into(),
                redefine: true,
            },
            Action::SetAutostart(false),
            Action::Stop {
                timeout: Duration::from_secs(120),
            },
        ]);
        cancel_after(&CANCEL, Duration::from_millis(300));
        let started = Instant::now();
        let outcome = apply_vm(
            &plan,
            &hv,
            &crate::host::disk::QemuImg::default(),
            &CANCEL,
            "c-new",
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            hv.calls(),
            ["define web", "autostart web false", "shutdown web"]
        );
        assert_eq!(outcome.error, Some(VmFailure::ShutdownInterrupted));
        assert_eq!(outcome.done, ["redefine in place", "clear autostart"]);
        assert!(outcome.up, "still running: the stop was not done");
        assert!(outcome.defined && outcome.autostart_set && outcome.power_unsettled);

        let entry = outcome.record("c-new", old_record());
        assert!(!entry.ok);
        assert_eq!(entry.last_error.as_deref(), Some(SHUTDOWN_INTERRUPTED));
        assert_eq!(
            entry.applied_commit.as_deref(),
            Some("c-old"),
            "not converged"
        );
        assert_eq!(entry.fingerprint.as_deref(), Some("fp-new"), "defined");
        assert!(!entry.autostart, "the flag as it is on the host");
        assert_eq!(entry.state, Some(PowerState::Defined), "no power claim");

        // What the next run sees on the host: redefined (its tag says fp-new; the
        // read-back failed in this stub, so the old baseline stays), autostart off,
        // and the guest shut off or still running: no drift either way.
        for active in [true, false] {
            let listing = Listing {
                name: "web".into(),
                uuid: "u".into(),
                active,
                autostart: false,
                persistent: true,
            };
            let now = crate::reconcile::drift::Now {
                listing: Some(&listing),
                tag_fingerprint: Some("fp-new"),
                definition_hash: Some("hash-old"),
            };
            assert_eq!(
                crate::reconcile::drift::detect(&entry, now),
                vec![],
                "active {active}"
            );
            assert!(
                !crate::reconcile::drift::detect(&old_record(), now).is_empty(),
                "the old record would report drift"
            );
        }
    }

    #[test]
    fn a_converged_vm_records_the_commit_and_an_untouched_one_keeps_its_entry() {
        let hv = stubborn_guest();
        let plan = vm_plan(vec![Action::SetAutostart(false)]);
        let outcome = apply_vm(
            &plan,
            &hv,
            &crate::host::disk::QemuImg::default(),
            &AtomicBool::new(false),
            "c-new",
        );
        let entry = outcome.record("c-new", old_record());
        assert!(entry.ok);
        assert_eq!(entry.applied_commit.as_deref(), Some("c-new"));
        assert_eq!(entry.state, Some(PowerState::Stopped));
        assert_eq!(entry.definition_hash.as_deref(), Some("hash-old"));

        // Stopped before its first action: the old entry, with the error.
        let outcome = apply_vm(
            &plan,
            &hv,
            &crate::host::disk::QemuImg::default(),
            &AtomicBool::new(true),
            "c-new",
        );
        let entry = outcome.record("c-new", old_record());
        assert_eq!(
            entry,
            VmRecord {
                ok: false,
                last_error: Some(INTERRUPTED.into()),
                ..old_record()
            }
        );
    }
}
