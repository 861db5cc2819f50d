//! Applying a plan: creates directories and disks, renames, defines, sets autostart,
//! starts, restarts and stops domains, and prunes, through the `Hypervisor` and
//! `DiskProvisioner` seams. One VM failing does not stop the others; within a VM, the
//! first failed action stops that VM.
//!
//! Stopping is always graceful first: an ACPI shutdown request, then polling until the
//! domain is off; only when the VM's shutdown timeout passes is it destroyed. A failed
//! shutdown request is an error, never a reason to destroy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::disk::DiskProvisioner;
use crate::domain_xml;
use crate::hypervisor::Hypervisor;
use crate::plan::{Action, Plan, VmPlan};

/// How often a shutting-down domain is polled.
const POLL: Duration = Duration::from_millis(250);

/// How one VM's actions went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOutcome {
    pub name: String,
    pub fingerprint: String,
    pub autostart: bool,
    pub state: crate::manifest::PowerState,
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
    pub kinds: Vec<crate::plan::ActionKind>,
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
}

impl Outcome {
    pub fn all_ok(&self) -> bool {
        self.directory_errors.is_empty()
            && self.vms.iter().all(|vm| vm.error.is_none())
            && self.pruned.iter().all(|p| p.error.is_none())
    }
    /// Directories created plus actions done.
    pub fn changes(&self) -> usize {
        self.directories_created
            + self.vms.iter().map(|vm| vm.done.len()).sum::<usize>()
            + self.pruned.iter().map(|p| p.done.len()).sum::<usize>()
    }
}

/// Lines for `vmsync --once` about pruned domains, orphaned disks and reported drift.
pub fn render_extra(outcome: &Outcome) -> String {
    let mut out = String::new();
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
/// Returns what happened.
pub fn graceful_stop(hv: &dyn Hypervisor, name: &str, timeout: Duration) -> Result<String, String> {
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
    // VMs are independent: their actions run on a few threads (libvirt serves
    // concurrent calls on one connection; disk creations are separate processes).
    // Within a VM, actions stay in order.
    let vms: Vec<&VmPlan> = plan.vms.iter().collect();
    outcome.vms = crate::par::map(vms, THREADS, |vm| apply_vm(vm, hv, disks, cancel, short));
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
                Action::Stop { timeout } => {
                    graceful_stop(hv, &p.name, *timeout).map(|how| what = format!("stop ({how})"))
                }
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
    outcome
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
            Action::Define { xml, .. } => hv
                .define(xml)
                .inspect(|()| crate::crash_point("after-define"))
                .map_err(|e| e.to_string())
                .map(|()| match hv.xml(&vm.name, true) {
                    Ok(after) => {
                        result.definition_hash = domain_xml::definition_hash(&after);
                        let diff = crate::diff::definition_diff(
                            &vm.name,
                            vm.current_xml.as_deref(),
                            &after,
                            &vm.source_xml,
                        );
                        if !diff.is_empty() {
                            info!(vm = %vm.name, commit = %short, "definition diff:\n{diff}");
                        }
                    }
                    Err(e) => {
                        warn!(vm = %vm.name, error = %e, "could not read the new definition back")
                    }
                }),
            Action::SetAutostart(on) => hv.set_autostart(&vm.name, *on).map_err(|e| e.to_string()),
            Action::Start => hv.start(&vm.name).map_err(|e| e.to_string()),
            Action::Restart { timeout } => graceful_stop(hv, &vm.name, *timeout)
                .and_then(|how| {
                    hv.start(&vm.name)
                        .map_err(|e| format!("after the shutdown, {e}"))
                        .map(|()| how)
                })
                .map(|how| what = format!("restart ({how}, started)")),
            Action::Stop { timeout } => {
                graceful_stop(hv, &vm.name, *timeout).map(|how| what = format!("stop ({how})"))
            }
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
                    _ => {}
                }
            }
            Err(e) => {
                error!(vm = %vm.name, commit = %short, action = %what, error = %e, "action failed");
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
