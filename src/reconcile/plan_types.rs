//! What a plan is: per VM the actions that converge it (or why not), the domains to
//! prune, and per network, pool and volume the same. Built by `plan` and
//! `plan_networks_pools`, rendered by `render`, carried out by `apply`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::desired::disk_spec::{DiskImage, DiskSpec};
use crate::desired::domain_xml::Tag;
use crate::desired::manifest::PowerState;
use crate::desired::resource_xml::ResourceKind;
use crate::desired::seed_spec::SeedSpec;
use crate::desired::values;
use crate::record::{HealthResult, VmRecord};
use crate::util::commit_id::short;

/// One step of converging a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Download a base image into the image directory (before the disk made from it;
    /// once per sync however many VMs need it).
    DownloadImage(DiskImage),
    CreateDisk(DiskSpec),
    /// Write the VM's cloud-init seed image: a missing one, or (`replaces`) one whose
    /// content changed, rebuilt in place.
    WriteSeed {
        seed: Box<SeedSpec>,
        replaces: bool,
    },
    /// Rename the (shut-off) domain `from` to the VM's name.
    Rename {
        from: String,
    },
    /// Define a new domain, or redefine an existing one in place.
    Define {
        xml: String,
        redefine: bool,
    },
    SetAutostart(bool),
    Start,
    /// Graceful shutdown (destroy after `timeout`), then start with the new definition.
    Restart {
        timeout: Duration,
    },
    /// Graceful shutdown (destroy after `timeout`).
    Stop {
        timeout: Duration,
    },
    /// Undefine, keeping NVRAM, TPM state and disks (pruning only).
    Undefine,
    /// Take over a domain vmsync did not define (`adopt = true`): with `xml`, redefine it
    /// in place with the commit's XML (its UUID and MACs kept); without, its definition
    /// is the commit's already and only `tag` is written (`virDomainSetMetadata`, no
    /// redefine), into the running definition too with `live`.
    Adopt {
        tag: Tag,
        xml: Option<String>,
        live: bool,
    },
}

/// What an action does, for machines: the plan's JSON, the outcome of a sync, metrics
/// (which list every kind, even at 0). In plan order.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    strum::EnumIter,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ActionKind {
    /// A `[[directory]]` created (not an [`Action`]: directories come before the VMs).
    CreateDirectory,
    // Pools, volumes and networks (`reconcile::plan_networks_pools`), before the domains.
    DefinePool,
    RedefinePool,
    BuildPool,
    SetPoolAutostart,
    ClearPoolAutostart,
    StartPool,
    RestartPool,
    CreateVolume,
    DefineNetwork,
    RedefineNetwork,
    SetNetworkAutostart,
    ClearNetworkAutostart,
    StartNetwork,
    RestartNetwork,
    DownloadImage,
    CreateDisk,
    /// A cloud-init seed image written (new, or rebuilt in place).
    WriteSeed,
    Rename,
    /// An existing domain taken over (`adopt = true`), tag only or redefined in place.
    Adopt,
    Define,
    Redefine,
    SetAutostart,
    ClearAutostart,
    Start,
    Restart,
    Stop,
    Undefine,
    // Pruning of networks, then pools, after the domains'.
    StopNetwork,
    UndefineNetwork,
    StopPool,
    UndefinePool,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl Action {
    /// Short description for logs and plans.
    pub fn describe(&self) -> String {
        match self {
            Action::DownloadImage(image) => format!(
                "download image '{}' from {}",
                image.image.name, image.image.url
            ),
            Action::CreateDisk(spec) => {
                let base = match &spec.image {
                    Some(i) if i.copy => format!(", a copy of image '{}'", i.image.name),
                    Some(i) => format!(", an overlay on image '{}'", i.image.name),
                    None => String::new(),
                };
                format!(
                    "create {} disk '{}' ({}{base})",
                    spec.format,
                    spec.path.display(),
                    values::human_size(spec.size_bytes)
                )
            }
            Action::WriteSeed { seed, replaces } => format!(
                "{} cloud-init seed '{}' (instance-id {}){}",
                if *replaces { "rebuild" } else { "write" },
                seed.path.display(),
                seed.instance_id,
                match (replaces, seed.has_secret) {
                    (true, true) => ": content changed (secret, not shown)",
                    (true, false) => ": content changed",
                    (false, true) => ": holds a secret, not shown",
                    (false, false) => "",
                }
            ),
            Action::Rename { from } => format!("rename from '{from}'"),
            Action::Define {
                redefine: false, ..
            } => "define".into(),
            Action::Define { redefine: true, .. } => "redefine in place".into(),
            Action::SetAutostart(true) => "set autostart".into(),
            Action::SetAutostart(false) => "clear autostart".into(),
            Action::Start => "start".into(),
            Action::Restart { timeout } => format!(
                "restart (graceful shutdown, destroy after {})",
                humantime::format_duration(*timeout)
            ),
            Action::Stop { timeout } => format!(
                "stop (graceful shutdown, destroy after {})",
                humantime::format_duration(*timeout)
            ),
            Action::Undefine => "undefine (keeping NVRAM, TPM state and disks)".into(),
            Action::Adopt { xml: None, .. } => {
                "adopt (tag only: the definition is the commit's)".into()
            }
            Action::Adopt { xml: Some(_), .. } => "adopt (redefine in place)".into(),
        }
    }

    /// Whether it interrupts a running guest (a restart, a stop): such an action waits
    /// for a maintenance window (`[[window]]`).
    pub fn interrupts_guest(&self) -> bool {
        match self {
            Action::Restart { .. } | Action::Stop { .. } => true,
            Action::CreateDisk(_)
            | Action::Rename { .. }
            | Action::Define { .. }
            | Action::SetAutostart(_)
            | Action::Start
            | Action::Undefine
            | Action::Adopt { .. }
            | Action::WriteSeed { .. }
            | Action::DownloadImage(_) => false,
        }
    }

    /// Whether it starts the guest (after its dependencies are up).
    pub fn starts_guest(&self) -> bool {
        matches!(self, Action::Start | Action::Restart { .. })
    }

    /// The action's kind for machines (`vmsync plan --json`, metrics).
    pub fn kind(&self) -> ActionKind {
        match self {
            Action::DownloadImage(_) => ActionKind::DownloadImage,
            Action::CreateDisk(_) => ActionKind::CreateDisk,
            Action::WriteSeed { .. } => ActionKind::WriteSeed,
            Action::Rename { .. } => ActionKind::Rename,
            Action::Define {
                redefine: false, ..
            } => ActionKind::Define,
            Action::Define { redefine: true, .. } => ActionKind::Redefine,
            Action::SetAutostart(true) => ActionKind::SetAutostart,
            Action::SetAutostart(false) => ActionKind::ClearAutostart,
            Action::Start => ActionKind::Start,
            Action::Restart { .. } => ActionKind::Restart,
            Action::Stop { .. } => ActionKind::Stop,
            Action::Undefine => ActionKind::Undefine,
            Action::Adopt { .. } => ActionKind::Adopt,
        }
    }
}

/// What to do for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPlan {
    pub name: String,
    pub fingerprint: String,
    pub autostart: bool,
    pub state: PowerState,
    pub actions: Vec<Action>,
    /// The VM cannot be converged (conflict, disk format mismatch); nothing of it is done.
    pub error: Option<String>,
    /// Notes that are not errors (an existing disk of another size).
    pub warnings: Vec<String>,
    /// Running with an older definition, after this plan is applied.
    pub pending_restart: bool,
    /// The domain is running now (before the plan is applied).
    pub active: bool,
    /// What differs from the last applied state (healed or only reported).
    pub drift: Vec<String>,
    /// Whether drift is left as is (self-heal off).
    pub drift_reported_only: bool,
    /// The committed XML (reference for the diff normalization); empty unless a
    /// definition is rendered.
    pub source_xml: String,
    /// The XML vmsync would define when drift is only reported (a planned define
    /// carries its XML in the action; [`VmPlan::rendered`] gives either).
    pub rendered_xml: Option<String>,
    /// libvirt's inactive XML of the existing domain now, when a definition is rendered.
    pub current_xml: Option<String>,
    /// `domain_xml::definition_hash` of `current_xml`.
    pub current_hash: Option<String>,
    /// Unified diff of the definition (filled in by `diff::annotate` for `vmsync plan`).
    pub diff: Option<String>,
    /// Health, last healthy commit and hold-back (`[vm.health]`, see `health`).
    pub health: Option<crate::reconcile::plan_types::HealthView>,
    /// Its dependencies, how others tell it is up, and what its actions wait for.
    pub order: OrderView,
}

/// A VM's place in the start order and what it waits for (`depends_on`, `[[window]]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderView {
    /// `depends_on`: it starts only when each of these is up.
    pub after: Vec<String>,
    /// How the VMs that depend on it tell it is up: its `[vm.health]` check passes
    /// (`None`: it is running).
    pub up_check: Option<crate::desired::health_spec::HealthSpec>,
    /// Why its actions that interrupt the running guest wait ("window <next start>").
    pub waiting: Option<String>,
    /// Its own `shutdown_timeout` (`None`: the agent's), kept for `vmsync shutdown`.
    pub shutdown_timeout: Option<Duration>,
}

impl VmPlan {
    /// A plan for `name` with nothing to do yet: no action, error, note, drift, XML or
    /// health; the planner and the tests fill in the rest.
    pub fn new(name: &str, fingerprint: &str, autostart: bool, state: PowerState) -> VmPlan {
        VmPlan {
            name: name.to_string(),
            fingerprint: fingerprint.to_string(),
            autostart,
            state,
            actions: Vec::new(),
            error: None,
            warnings: Vec::new(),
            pending_restart: false,
            active: false,
            drift: Vec::new(),
            drift_reported_only: false,
            source_xml: String::new(),
            rendered_xml: None,
            current_xml: None,
            current_hash: None,
            diff: None,
            health: None,
            order: OrderView::default(),
        }
    }

    /// The XML vmsync defines, or would define when drift is only reported.
    pub fn rendered(&self) -> Option<&str> {
        self.actions
            .iter()
            .find_map(|a| match a {
                Action::Define { xml, .. } | Action::Adopt { xml: Some(xml), .. } => {
                    Some(xml.as_str())
                }
                _ => None,
            })
            .or(self.rendered_xml.as_deref())
    }
}

/// A tagged domain that is no longer in the manifest for this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrunePlan {
    pub name: String,
    pub active: bool,
    /// Stop (if running) and undefine; empty when pruning is off.
    pub actions: Vec<Action>,
    /// Its disks, which are never deleted: orphaned once it is undefined.
    pub disks: Vec<PathBuf>,
    /// Why it is left alone (pruning off, transient).
    pub skipped: Option<String>,
}

/// The whole plan for one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub commit: String,
    pub create_directories: Vec<PathBuf>,
    pub vms: Vec<VmPlan>,
    pub prune: Vec<PrunePlan>,
    /// Set when the commit is refused by the prune guards; nothing may be applied.
    pub refused: Option<String>,
    /// Domains with vmsync's tag that this agent never applied (another repository or
    /// state directory made them): never pruned, only counted.
    pub foreign_tagged: usize,
    /// Networks, pools and volumes (applied before the domains; pruned after them).
    pub resources: crate::reconcile::plan_types::ResourcePlan,
    /// The next start of a maintenance window that an action of this plan waits for:
    /// the daemon syncs then.
    pub next_window: Option<chrono::DateTime<chrono::Utc>>,
}

impl Plan {
    /// Whether applying the plan changes nothing.
    pub fn is_noop(&self) -> bool {
        self.create_directories.is_empty()
            && self.vms.iter().all(|vm| vm.actions.is_empty())
            && self.prune.iter().all(|p| p.actions.is_empty())
            && self.resources.is_noop()
    }
}

/// One step for a network or pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResAction {
    Define {
        xml: String,
        redefine: bool,
    },
    Build,
    SetAutostart(bool),
    Start,
    /// Stop and start again (`on_change = "restart"`).
    Restart,
    Stop,
    Undefine,
}

impl ResAction {
    pub fn describe(&self, kind: ResourceKind) -> String {
        match self {
            ResAction::Define {
                redefine: false, ..
            } => "define".into(),
            ResAction::Define { redefine: true, .. } => "redefine in place".into(),
            ResAction::Build => "build (never overwriting)".into(),
            ResAction::SetAutostart(true) => "set autostart".into(),
            ResAction::SetAutostart(false) => "clear autostart".into(),
            ResAction::Start => "start".into(),
            ResAction::Restart => "restart (stop, then start)".into(),
            ResAction::Stop => "stop".into(),
            ResAction::Undefine if kind == ResourceKind::Pool => {
                "undefine (keeping its storage and volumes)".into()
            }
            ResAction::Undefine => "undefine".into(),
        }
    }

    pub fn kind(&self, kind: ResourceKind) -> ActionKind {
        use ActionKind as K;
        use ResourceKind::{Network as N, Pool as P};
        match (self, kind) {
            (
                ResAction::Define {
                    redefine: false, ..
                },
                N,
            ) => K::DefineNetwork,
            (ResAction::Define { redefine: true, .. }, N) => K::RedefineNetwork,
            (
                ResAction::Define {
                    redefine: false, ..
                },
                P,
            ) => K::DefinePool,
            (ResAction::Define { redefine: true, .. }, P) => K::RedefinePool,
            (ResAction::Build, _) => K::BuildPool,
            (ResAction::SetAutostart(true), N) => K::SetNetworkAutostart,
            (ResAction::SetAutostart(false), N) => K::ClearNetworkAutostart,
            (ResAction::SetAutostart(true), P) => K::SetPoolAutostart,
            (ResAction::SetAutostart(false), P) => K::ClearPoolAutostart,
            (ResAction::Start, N) => K::StartNetwork,
            (ResAction::Start, P) => K::StartPool,
            (ResAction::Restart, N) => K::RestartNetwork,
            (ResAction::Restart, P) => K::RestartPool,
            (ResAction::Stop, N) => K::StopNetwork,
            (ResAction::Stop, P) => K::StopPool,
            (ResAction::Undefine, N) => K::UndefineNetwork,
            (ResAction::Undefine, P) => K::UndefinePool,
        }
    }
}

/// What to do for one network or pool.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResPlan {
    pub kind: Option<ResourceKind>,
    pub name: String,
    pub fingerprint: String,
    pub autostart: bool,
    pub actions: Vec<ResAction>,
    /// Not converged (not vmsync's, unreadable); nothing of it is done.
    pub error: Option<String>,
    pub pending_restart: bool,
    /// Active now (before the plan is applied).
    pub active: bool,
    pub drift: Vec<String>,
    pub drift_reported_only: bool,
    /// Taken over with `adopt = true` (not vmsync's before).
    pub adopted: bool,
    /// Running VMs attached to it that lose their link while it restarts.
    pub affected_vms: Vec<String>,
    /// Why a prune candidate is left alone (pruning off).
    pub skipped: Option<String>,
    /// The committed XML and libvirt's XML now, when a definition is rendered (diff).
    pub source_xml: String,
    pub current_xml: Option<String>,
    pub current_hash: Option<String>,
    pub uuid: Option<String>,
    /// A pool's type (`dir`, `logical`, …): how it is built.
    pub pool_type: Option<String>,
    /// Unified diff of the definition (`vmsync plan`).
    pub diff: Option<String>,
}

impl ResPlan {
    pub fn kind(&self) -> ResourceKind {
        self.kind.unwrap_or(ResourceKind::Network)
    }
}

/// A pool volume to create (or that could not be checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlan {
    pub vm: String,
    pub pool: String,
    pub name: String,
    /// The `<volume>` XML to create it from; `None`: it exists.
    pub create: Option<String>,
    pub error: Option<String>,
    pub description: String,
}

/// The networks, pools and volumes part of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourcePlan {
    pub pools: Vec<ResPlan>,
    pub volumes: Vec<VolumePlan>,
    pub networks: Vec<ResPlan>,
    /// Owned networks and pools no longer in the manifest for this host.
    pub prune: Vec<ResPlan>,
}

impl ResourcePlan {
    pub fn is_noop(&self) -> bool {
        self.pools
            .iter()
            .chain(&self.networks)
            .chain(&self.prune)
            .all(|p| p.actions.is_empty())
            && self.volumes.iter().all(|v| v.create.is_none())
    }
    /// Networks and pools the plan would undefine (the mass-prune guard counts them).
    pub fn pruning(&self) -> usize {
        self.prune.iter().filter(|p| !p.actions.is_empty()).count()
    }
    /// Owned networks and pools on the host (desired ones vmsync defined, and prune
    /// candidates).
    pub fn managed(&self) -> usize {
        self.pools
            .iter()
            .chain(&self.networks)
            .filter(|p| p.error.is_none() && !p.adopted && p.current_hash.is_some())
            .count()
            + self.prune.len()
    }
}

/// Health as `plan` and `status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct HealthView {
    /// The last check's result (`null`: never checked).
    pub result: Option<HealthResult>,
    pub last_healthy_commit: Option<String>,
    /// The commit whose definition of this VM is held back (`null`: none).
    pub held_back: Option<String>,
    /// What the check does (`[vm.health]`: settle, guest agent, the command run on the
    /// host); set by the planner, `null` in a record's view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

impl HealthView {
    /// From a VM's record; `None` when there is nothing to show.
    pub fn of(record: &VmRecord) -> Option<HealthView> {
        let view = HealthView {
            result: record.health,
            last_healthy_commit: record.healthy_commit.clone(),
            held_back: record.held_back.as_ref().map(|h| h.commit.clone()),
            check: None,
        };
        (view != HealthView::default()).then_some(view)
    }

    /// One line for people: `health: reverted; last healthy commit abc…; held back: def…`.
    pub fn line(&self) -> String {
        let mut parts = vec![format!(
            "health: {}",
            self.result
                .map(HealthResult::as_str)
                .unwrap_or("not checked")
        )];
        if let Some(c) = &self.last_healthy_commit {
            parts.push(format!("last healthy commit {}", short(c)));
        }
        if let Some(c) = &self.held_back {
            parts.push(format!("held back: commit {}", short(c)));
        }
        if let Some(check) = &self.check {
            parts.push(format!("check: {check}"));
        }
        parts.join("; ")
    }
}
