//! Applying a plan: creates directories and disks, defines domains, sets autostart and
//! starts domains, through the `Hypervisor` and `DiskProvisioner` seams. One VM failing
//! does not stop the others; within a VM, the first failed action stops that VM.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{error, info, warn};

use crate::disk::DiskProvisioner;
use crate::hypervisor::Hypervisor;
use crate::plan::{Action, Plan};

/// How one VM's actions went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOutcome {
    pub name: String,
    pub fingerprint: String,
    pub autostart: bool,
    /// Descriptions of the actions done.
    pub done: Vec<String>,
    pub error: Option<String>,
    pub pending_restart: bool,
    /// Running after the actions (was running, or was started).
    pub up: bool,
    /// Kinds of the actions done (see `Action::kind`).
    pub kinds: Vec<&'static str>,
}

/// How applying a plan went.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    pub directories_created: usize,
    pub directory_errors: Vec<String>,
    pub vms: Vec<VmOutcome>,
}

impl Outcome {
    pub fn all_ok(&self) -> bool {
        self.directory_errors.is_empty() && self.vms.iter().all(|vm| vm.error.is_none())
    }
    /// Directories created plus actions done.
    pub fn changes(&self) -> usize {
        self.directories_created + self.vms.iter().map(|vm| vm.done.len()).sum::<usize>()
    }
}

/// The error a VM gets when vmsync stops before doing its actions.
pub const INTERRUPTED: &str = "interrupted: vmsync is stopping; the next run continues";

/// Applies `plan`. When `cancel` becomes true, the action in flight finishes and no
/// further action starts (those VMs are recorded as interrupted).
pub fn apply(
    plan: &Plan,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
    cancel: &AtomicBool,
) -> Outcome {
    let short = &plan.commit[..plan.commit.len().min(12)];
    let mut outcome = Outcome::default();
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
    for vm in &plan.vms {
        let mut result = VmOutcome {
            name: vm.name.clone(),
            fingerprint: vm.fingerprint.clone(),
            autostart: vm.autostart,
            done: Vec::new(),
            error: vm.error.clone(),
            pending_restart: vm.pending_restart,
            up: vm.active,
            kinds: Vec::new(),
        };
        for warning in &vm.warnings {
            warn!(vm = %vm.name, "{warning}");
        }
        if let Some(e) = &vm.error {
            error!(vm = %vm.name, commit = %short, error = %e, "vm not converged");
        } else if vm.actions.is_empty() {
            info!(vm = %vm.name, commit = %short, pending_restart = vm.pending_restart, "unchanged");
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
            let what = action.describe();
            let done = match action {
                Action::CreateDisk(spec) => disks.create(spec).map_err(|e| e.to_string()),
                Action::Define { xml, .. } => hv
                    .define(xml)
                    .inspect(|()| crate::crash_point("after-define"))
                    .map_err(|e| format!("failed to define domain: {e}")),
                Action::SetAutostart(on) => hv
                    .set_autostart(&vm.name, *on)
                    .map_err(|e| format!("failed to set autostart: {e}")),
                Action::Start => hv
                    .start(&vm.name)
                    .map_err(|e| format!("failed to start domain: {e}")),
            };
            match done {
                Ok(()) => {
                    info!(vm = %vm.name, commit = %short, action = %what, "done");
                    result.done.push(what);
                    result.kinds.push(action.kind());
                    if matches!(action, Action::Start) {
                        result.up = true;
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
        outcome.vms.push(result);
    }
    outcome
}
