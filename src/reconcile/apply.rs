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
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::agent::state::VmRecord;
use crate::desired::domain_xml;
use crate::host::disk::DiskProvisioner;
use crate::host::hypervisor::Hypervisor;
use crate::reconcile::plan::{Action, Plan, VmPlan};

/// How often a shutting-down domain is polled.
const POLL: Duration = Duration::from_millis(250);

/// How one VM's actions went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOutcome {
    pub name: String,
    pub fingerprint: String,
    pub autostart: bool,
    pub state: crate::desired::manifest::PowerState,
    /// Descriptions of the actions done.
    pub done: Vec<String>,
    pub error: Option<String>,
    pub pending_restart: bool,
    /// Drift found before applying (healed unless `drift_reported_only`).
    pub drift: Vec<String>,
    pub drift_reported_only: bool,
    /// The new drift baseline when the domain was (re)defined: `definition_hash` of the
    /// inactive XML read back.
    pub definition_hash: Option<String>,
    /// `definition_hash` of the domain before this sync.
    pub previous_hash: Option<String>,
    /// Running after the actions (was running and not stopped, or was started).
    pub up: bool,
    /// Kinds of the actions done (see `Action::kind`).
    pub kinds: Vec<crate::reconcile::plan::ActionKind>,
    /// The commit's definition was defined (or redefined) on the host.
    pub defined: bool,
    /// The autostart flag was set to `autostart` on the host.
    pub autostart_set: bool,
    /// A stop or restart was begun and not seen through (the guest may be shutting
    /// down, shut off, or still running): no power state can be claimed for it.
    pub power_unsettled: bool,
}

impl VmOutcome {
    /// This VM's entry in the record after this sync, given its entry before (`old`).
    /// Converged: the commit, with the new drift baseline. Not converged: the old entry
    /// with the error, updated with what was done to the host all the same (the new
    /// fingerprint and baseline after a define, the autostart flag after it was set; no
    /// power state after an unfinished stop or restart), so that the record stays true
    /// and the next run does not report vmsync's own changes as drift.
    pub fn record(&self, commit: &str, old: VmRecord) -> VmRecord {
        if self.error.is_none() {
            return VmRecord {
                applied_commit: Some(commit.to_string()),
                fingerprint: Some(self.fingerprint.clone()),
                autostart: self.autostart,
                ok: true,
                last_error: None,
                pending_restart: self.pending_restart,
                // The new baseline; else the old one (kept while drift is only
                // reported) when it is this definition's; else (first seen converged,
                // or the record of vmsync's last define was lost) the definition as it
                // is.
                definition_hash: self
                    .definition_hash
                    .clone()
                    .or(old
                        .definition_hash
                        .filter(|_| old.fingerprint.as_deref() == Some(self.fingerprint.as_str())))
                    .or(self.previous_hash.clone()),
                state: Some(self.state),
                drift: self.drift.clone(),
                ..old
            };
        }
        let mut entry = VmRecord {
            ok: false,
            last_error: self.error.clone(),
            drift: self.drift.clone(),
            ..old
        };
        if self.defined {
            entry.fingerprint = Some(self.fingerprint.clone());
            entry.definition_hash = self.definition_hash.clone().or(entry.definition_hash);
        }
        if self.autostart_set {
            entry.autostart = self.autostart;
        }
        if self.power_unsettled {
            // `defined`: vmsync claims no power state, so whatever state the guest ends
            // in is no drift; the next plan starts or stops it as the commit says.
            entry.state = Some(crate::desired::manifest::PowerState::Defined);
        }
        entry
    }
}

/// How pruning one domain went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneOutcome {
    pub name: String,
    pub done: Vec<String>,
    pub error: Option<String>,
    /// Its disks, kept: orphaned once it is undefined.
    pub orphaned_disks: Vec<std::path::PathBuf>,
}

/// How applying a plan went.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    pub directories_created: usize,
    pub directory_errors: Vec<String>,
    pub vms: Vec<VmOutcome>,
    pub pruned: Vec<PruneOutcome>,
    /// Networks, pools and volumes.
    pub resources: crate::reconcile::resources::ResourceOutcome,
}

impl Outcome {
    pub fn all_ok(&self) -> bool {
        self.directory_errors.is_empty()
            && self.vms.iter().all(|vm| vm.error.is_none())
            && self.pruned.iter().all(|p| p.error.is_none())
            && self.resources.errors().is_empty()
    }
    /// Directories created plus actions done.
    pub fn changes(&self) -> usize {
        self.directories_created
            + self.vms.iter().map(|vm| vm.done.len()).sum::<usize>()
            + self.pruned.iter().map(|p| p.done.len()).sum::<usize>()
            + self.resources.changes()
    }
}

/// Lines for `vmsync --once` about pruned domains, orphaned disks and reported drift.
pub fn render_extra(outcome: &Outcome) -> String {
    let mut out = crate::reconcile::resources::render_outcome(&outcome.resources);
    for vm in outcome.vms.iter().filter(|vm| vm.drift_reported_only) {
        out += &format!(
            "  {}: drift (self_heal is off, left as is): {}\n",
            vm.name,
            vm.drift.join("; ")
        );
    }
    for p in &outcome.pruned {
        match &p.error {
            None => out += &format!("  {}: pruned: {}\n", p.name, p.done.join(", ")),
            Some(e) => out += &format!("  {}: prune failed: {e}\n", p.name),
        }
        for disk in &p.orphaned_disks {
            out += &format!("    orphaned disk (kept): {}\n", disk.display());
        }
    }
    out
}

/// Shuts `name` down gracefully: ACPI request, wait up to `timeout`, destroy only then.
/// Returns what happened. When `cancel` becomes true during the wait, the wait ends (the
/// guest is not destroyed) with the error [`SHUTDOWN_INTERRUPTED`].
pub fn graceful_stop(
    hv: &dyn Hypervisor,
    name: &str,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<String, String> {
    if !hv.is_active(name).map_err(|e| e.to_string())? {
        return Ok("already shut off".into());
    }
    hv.shutdown(name).map_err(|e| e.to_string())?;
    let secs = humantime::format_duration(timeout);
    info!(vm = %name, timeout = %secs, "graceful shutdown requested");
    let started = Instant::now();
    loop {
        if !hv.is_active(name).map_err(|e| e.to_string())? {
            info!(vm = %name, "shut down gracefully");
            return Ok("shut down gracefully".into());
        }
        if cancel.load(Ordering::SeqCst) {
            let waited =
                humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()));
            warn!(vm = %name, waited = %waited, "vmsync is stopping: no longer waiting for the guest to shut down");
            return Err(SHUTDOWN_INTERRUPTED.to_string());
        }
        if started.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(
            POLL.min(timeout.saturating_sub(started.elapsed()))
                .max(Duration::from_millis(10)),
        );
    }
    warn!(vm = %name, timeout = %secs, "still running after the shutdown timeout; destroying");
    match hv.destroy(name) {
        Ok(()) => Ok(format!(
            "shutdown requested, still running after {secs}, destroyed"
        )),
        // It may have gone off between the last poll and the destroy.
        Err(_) if !hv.is_active(name).unwrap_or(true) => Ok("shut down gracefully".into()),
        Err(e) => Err(format!("after the shutdown timeout, {e}")),
    }
}

/// VMs converged at the same time.
pub const THREADS: usize = 4;

/// The error a VM gets when vmsync stops before doing its actions.
pub const INTERRUPTED: &str = "interrupted: vmsync is stopping; the next run continues";

/// The error a VM gets when vmsync stops while waiting for its guest to shut down.
pub const SHUTDOWN_INTERRUPTED: &str = "interrupted: vmsync is stopping; the guest was asked to shut down and was still running (not destroyed); the next run continues";

/// Applies `plan`. A refused plan applies nothing. When `cancel` becomes true, the
/// action in flight finishes and no further action starts (those VMs are recorded as
/// interrupted; pruning is skipped).
pub fn apply(
    plan: &Plan,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
    cancel: &AtomicBool,
) -> Outcome {
    let short = &plan.commit[..plan.commit.len().min(12)];
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
    outcome.resources =
        crate::reconcile::resources::apply_before_domains(&plan.resources, hv, short);
    // VMs are independent: their actions run on a few threads (libvirt serves
    // concurrent calls on one connection; disk creations are separate processes).
    // Within a VM, actions stay in order.
    let vms: Vec<&VmPlan> = plan.vms.iter().collect();
    outcome.vms = crate::host::par::map(vms, THREADS, |vm| apply_vm(vm, hv, disks, cancel, short));
    for p in plan
        .prune
        .iter()
        .filter(|p| p.skipped.is_none() && !cancel.load(Ordering::SeqCst))
    {
        let mut result = PruneOutcome {
            name: p.name.clone(),
            done: Vec::new(),
            error: None,
            orphaned_disks: Vec::new(),
        };
        for action in &p.actions {
            let mut what = action.describe();
            let done = match action {
                Action::Stop { timeout } => graceful_stop(hv, &p.name, *timeout, cancel)
                    .map(|how| what = format!("stop ({how})")),
                Action::Undefine => hv.undefine_keep_state(&p.name).map_err(|e| e.to_string()),
                other => Err(format!("'{}' is not a prune action", other.describe())),
            };
            match done {
                Ok(()) => {
                    info!(vm = %p.name, commit = %short, action = %what, "pruned");
                    result.done.push(what);
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
        crate::reconcile::resources::apply_prune(
            &plan.resources,
            hv,
            short,
            &mut outcome.resources,
        );
    }
    outcome
}

/// Reads the definition back after a define or an adoption: the new drift baseline, and
/// the diff logged.
fn read_back(hv: &dyn Hypervisor, vm: &VmPlan, short: &str, result: &mut VmOutcome) {
    match hv.xml(&vm.name, true) {
        Ok(after) => {
            result.definition_hash = domain_xml::definition_hash(&after);
            let diff = crate::reconcile::diff::definition_diff(
                &vm.name,
                vm.current_xml.as_deref(),
                &after,
                &vm.source_xml,
            );
            crate::reconcile::diff::log(&vm.name, short, &diff);
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
    let mut result = VmOutcome {
        name: vm.name.clone(),
        fingerprint: vm.fingerprint.clone(),
        autostart: vm.autostart,
        state: vm.state,
        done: Vec::new(),
        error: vm.error.clone(),
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
    };
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
    for action in vm
        .error
        .is_none()
        .then_some(&vm.actions)
        .into_iter()
        .flatten()
    {
        if cancel.load(Ordering::SeqCst) {
            warn!(vm = %vm.name, commit = %short, "stopping before the next action");
            result.error = Some(INTERRUPTED.to_string());
            break;
        }
        let mut what = action.describe();
        let done = match action {
            Action::CreateDisk(spec) => disks.create(spec).map_err(|e| e.to_string()),
            Action::Rename { from } => hv.rename(from, &vm.name).map_err(|e| e.to_string()),
            Action::Define { xml, .. } | Action::Adopt { xml: Some(xml), .. } => hv
                .define(xml)
                .inspect(|()| crate::crash_point("after-define"))
                .map_err(|e| e.to_string())
                .map(|()| read_back(hv, vm, short, &mut result)),
            Action::Adopt {
                tag,
                xml: None,
                live,
            } => hv
                .set_tag(&vm.name, tag, *live)
                .map_err(|e| e.to_string())
                .map(|()| read_back(hv, vm, short, &mut result)),
            Action::SetAutostart(on) => hv.set_autostart(&vm.name, *on).map_err(|e| e.to_string()),
            Action::Start => hv.start(&vm.name).map_err(|e| e.to_string()),
            Action::Restart { timeout } => graceful_stop(hv, &vm.name, *timeout, cancel)
                .and_then(|how| {
                    hv.start(&vm.name)
                        .map_err(|e| format!("after the shutdown, {e}"))
                        .map(|()| how)
                })
                .map(|how| what = format!("restart ({how}, started)")),
            Action::Stop { timeout } => graceful_stop(hv, &vm.name, *timeout, cancel)
                .map(|how| what = format!("stop ({how})")),
            Action::Undefine => Err("undefine is only planned for pruning".into()),
        };
        match done {
            Ok(()) => {
                info!(vm = %vm.name, commit = %short, action = %what, "done");
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
            Err(e) => {
                if matches!(action, Action::Stop { .. } | Action::Restart { .. }) {
                    result.power_unsettled = true;
                }
                if e == SHUTDOWN_INTERRUPTED {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::manifest::PowerState;
    use crate::host::hypervisor::{HvError, Listing};
    use std::sync::Mutex;

    /// A running guest that ignores ACPI shutdown requests (as a guest without an OS
    /// does); records the calls that change it.
    #[derive(Default)]
    struct StubbornGuest {
        calls: Mutex<Vec<String>>,
    }

    impl StubbornGuest {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn note(&self, call: String) -> Result<(), HvError> {
            self.calls.lock().unwrap().push(call);
            Ok(())
        }
    }

    impl Hypervisor for StubbornGuest {
        fn list(&self) -> Result<Vec<Listing>, HvError> {
            unimplemented!("not used by apply")
        }
        fn xml(&self, _: &str, _: bool) -> Result<String, HvError> {
            Err(HvError::new(
                "read the XML of",
                None,
                "stub:///",
                "no xml in this stub",
            ))
        }
        fn define(&self, _: &str) -> Result<(), HvError> {
            self.note("define".into())
        }
        fn set_autostart(&self, _: &str, on: bool) -> Result<(), HvError> {
            self.note(format!("autostart {on}"))
        }
        fn start(&self, _: &str) -> Result<(), HvError> {
            self.note("start".into())
        }
        fn is_active(&self, _: &str) -> Result<bool, HvError> {
            Ok(true)
        }
        fn shutdown(&self, _: &str) -> Result<(), HvError> {
            self.note("shutdown".into())
        }
        fn destroy(&self, _: &str) -> Result<(), HvError> {
            self.note("destroy".into())
        }
        fn undefine_keep_state(&self, _: &str) -> Result<(), HvError> {
            self.note("undefine".into())
        }
        fn rename(&self, _: &str, _: &str) -> Result<(), HvError> {
            self.note("rename".into())
        }
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
        let hv = StubbornGuest::default();
        cancel_after(&CANCEL, Duration::from_millis(300));
        let started = Instant::now();
        let result = graceful_stop(&hv, "web", Duration::from_secs(120), &CANCEL);
        assert_eq!(result, Err(SHUTDOWN_INTERRUPTED.to_string()));
        // One poll interval after the request, not the 120 s timeout.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(hv.calls(), ["shutdown"], "asked, never destroyed");

        // Without a stop request the timeout still ends in a destroy.
        let hv = StubbornGuest::default();
        let result = graceful_stop(
            &hv,
            "web",
            Duration::from_millis(50),
            &AtomicBool::new(false),
        );
        assert!(result.unwrap().ends_with("destroyed"));
        assert_eq!(hv.calls(), ["shutdown", "destroy"]);
    }

    fn vm_plan(actions: Vec<Action>) -> VmPlan {
        VmPlan {
            name: "web".into(),
            fingerprint: "fp-new".into(),
            autostart: false,
            state: PowerState::Stopped,
            actions,
            error: None,
            warnings: Vec::new(),
            pending_restart: false,
            active: true,
            drift: Vec::new(),
            drift_reported_only: false,
            source_xml: String::new(),
            rendered_xml: None,
            current_xml: None,
            current_hash: Some("hash-old".into()),
            diff: None,
            health: None,
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
        let hv = StubbornGuest::default();
        let plan = vm_plan(vec![
            Action::Define {
                xml: "<domain/>".into(),
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
        assert_eq!(hv.calls(), ["define", "autostart false", "shutdown"]);
        assert_eq!(outcome.error.as_deref(), Some(SHUTDOWN_INTERRUPTED));
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
        let hv = StubbornGuest::default();
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
