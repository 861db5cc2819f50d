//! What applying a plan did: per VM, per pruned domain, per network, pool and volume.
//! Pure data, written by `apply` and read by the health rules, the record update, the
//! rendering and the metrics.

use crate::desired::manifest;
use crate::desired::resource_xml::ResourceKind;
use crate::host::power::SHUTDOWN_INTERRUPTED;
use crate::reconcile::plan_types;
use crate::reconcile::plan_types::ActionKind;
use crate::record::VmRecord;

/// Why a VM did not converge. The text ([`Display`](std::fmt::Display)) is what the
/// record, the log and the messages show; code branches on the variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmFailure {
    /// vmsync stopped before the VM's next action.
    Interrupted,
    /// vmsync stopped while waiting for the guest to shut down (it was not destroyed).
    ShutdownInterrupted,
    /// A restart shut the domain down, then starting it failed (libvirt's message).
    StartAfterStop(String),
    /// An action failed (its message).
    Action(String),
    /// The planner could not plan the VM (its message).
    Planned(String),
    /// Its health check failed (what the check found and what followed).
    Unhealthy(String),
    /// Not started: a dependency was not up ("waiting for db: not healthy after 5m").
    Waiting(String),
}

impl std::fmt::Display for VmFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmFailure::Interrupted => f.write_str(INTERRUPTED),
            VmFailure::ShutdownInterrupted => f.write_str(SHUTDOWN_INTERRUPTED),
            VmFailure::StartAfterStop(e) => write!(f, "after the shutdown, {e}"),
            VmFailure::Action(m)
            | VmFailure::Planned(m)
            | VmFailure::Unhealthy(m)
            | VmFailure::Waiting(m) => f.write_str(m),
        }
    }
}

/// How one VM's actions went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOutcome {
    pub name: String,
    pub fingerprint: String,
    pub autostart: bool,
    pub state: manifest::PowerState,
    /// Descriptions of the actions done.
    pub done: Vec<String>,
    pub error: Option<VmFailure>,
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
    pub kinds: Vec<plan_types::ActionKind>,
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
            last_error: self.error.as_ref().map(ToString::to_string),
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
            entry.state = Some(manifest::PowerState::Defined);
        }
        entry
    }
}

/// How pruning one domain went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneOutcome {
    pub name: String,
    /// Descriptions of the actions done.
    pub done: Vec<String>,
    /// Kinds of the actions done (a stop, then the undefine).
    pub kinds: Vec<ActionKind>,
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
    pub resources: ResourceOutcome,
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

/// The error a VM gets when vmsync stops before doing its actions.
pub const INTERRUPTED: &str = "interrupted: vmsync is stopping; the next run continues";

/// How one network or pool went.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResOutcome {
    pub kind: Option<ResourceKind>,
    pub name: String,
    pub done: Vec<String>,
    pub kinds: Vec<ActionKind>,
    pub error: Option<String>,
    pub pending_restart: bool,
    pub drift: Vec<String>,
    pub fingerprint: String,
    pub autostart: bool,
    /// Defined now (its definition is the commit's).
    pub defined: bool,
    /// After a define: the UUID and the drift baseline read back.
    pub uuid: Option<String>,
    pub definition_hash: Option<String>,
    /// Before this sync.
    pub previous_uuid: Option<String>,
    pub previous_hash: Option<String>,
    /// A prune candidate that was undefined.
    pub pruned: bool,
    /// A prune candidate left alone.
    pub skipped: bool,
}

/// How the networks, pools and volumes went.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceOutcome {
    pub pools: Vec<ResOutcome>,
    pub networks: Vec<ResOutcome>,
    pub volumes: Vec<VolumeOutcome>,
    pub pruned: Vec<ResOutcome>,
}

/// How one volume a VM names went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOutcome {
    pub vm: String,
    pub pool: String,
    /// The volume's name.
    pub name: String,
    /// What happened, or the error.
    pub result: Result<VolumeDone, String>,
}

impl VolumeOutcome {
    /// Whether the volume was created now.
    pub fn created(&self) -> bool {
        matches!(self.result, Ok(VolumeDone::Created(_)))
    }
}

/// What happened to a volume that converged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeDone {
    /// It was there already and was not touched.
    Exists,
    /// Created now; the plan's description (`create qcow2 volume 'a' in pool 'p' (1 GiB)`).
    Created(String),
}

impl std::fmt::Display for VolumeDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VolumeDone::Exists => f.write_str("exists"),
            VolumeDone::Created(what) => f.write_str(what),
        }
    }
}

impl ResourceOutcome {
    /// What failed, named for the sync's summary line: `network 'lab'`,
    /// `volume 'web.qcow2' of pool 'vmpool'`.
    pub fn failed_names(&self) -> Vec<String> {
        let kind = |o: &ResOutcome| o.kind.unwrap_or(ResourceKind::Network);
        let mut out: Vec<String> = self
            .pools
            .iter()
            .chain(&self.networks)
            .chain(&self.pruned)
            .filter(|o| o.error.is_some())
            .map(|o| format!("{} '{}'", kind(o), o.name))
            .collect();
        out.extend(
            self.volumes
                .iter()
                .filter(|v| v.result.is_err())
                .map(|v| format!("volume '{}' of pool '{}'", v.name, v.pool)),
        );
        out
    }

    pub fn errors(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .pools
            .iter()
            .chain(&self.networks)
            .filter_map(|o| {
                o.error.as_ref().map(|e| {
                    format!(
                        "{} '{}': {e}",
                        o.kind.unwrap_or(ResourceKind::Network),
                        o.name
                    )
                })
            })
            .collect();
        out.extend(self.volumes.iter().filter_map(|v| {
            v.result.as_ref().err().map(|e| {
                format!(
                    "vm '{}': volume '{}' of pool '{}': {e}",
                    v.vm, v.name, v.pool
                )
            })
        }));
        out.extend(self.pruned.iter().filter_map(|o| {
            o.error.as_ref().map(|e| {
                format!(
                    "prune {} '{}': {e}",
                    o.kind.unwrap_or(ResourceKind::Network),
                    o.name
                )
            })
        }));
        out
    }
    pub fn changes(&self) -> usize {
        self.pools
            .iter()
            .chain(&self.networks)
            .chain(&self.pruned)
            .map(|o| o.done.len())
            .sum::<usize>()
            + self.volumes.iter().filter(|v| v.created()).count()
    }
    /// Kinds of the actions done.
    pub fn kinds(&self) -> impl Iterator<Item = ActionKind> + '_ {
        self.pools
            .iter()
            .chain(&self.networks)
            .chain(&self.pruned)
            .flat_map(|o| o.kinds.iter().copied())
            .chain(
                self.volumes
                    .iter()
                    .filter(|v| v.created())
                    .map(|_| ActionKind::CreateVolume),
            )
    }
}
