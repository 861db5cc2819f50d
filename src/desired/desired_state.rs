//! What a validated commit asks of this host: its VMs (with their parsed definitions,
//! disks and health checks), networks, pools and volumes, and the host policy they were
//! checked against. Built by `validate`; read by observation, the planner and apply.

use std::path::PathBuf;

use crate::desired::disk_spec::DiskSpec;
use crate::desired::domain_xml::DomainSummary;
use crate::desired::manifest::{self, OnChange, Problem, VolumeSpec};
use crate::desired::resource_xml::{ResourceKind, ResourceSummary};
use crate::desired::{health_spec, host_policy_settings, start_order, window_spec};

/// What this host's policy allows and which VMs it applies.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// This host's name, matched against a VM's `hosts`; `None` validates every VM.
    pub host: Option<String>,
    pub disk_roots: Vec<PathBuf>,
    /// What domain XML may ask of the host beyond disk images (see `host_policy`).
    pub host_policy: host_policy_settings::HostPolicy,
    /// The name templates see as `host` when `host` is `None` (`vmsync validate DIR`,
    /// `vmsync render`: the agent's host name); `None` too: using `host` is an error.
    pub render_host: Option<String>,
    /// `[policy] seed_dir`: where cloud-init seeds are written (`None`: the default,
    /// `seed_spec::DEFAULT_SEED_DIR`).
    pub seed_dir: Option<PathBuf>,
    /// How secrets are opened: decrypted with the host's identity, or (offline
    /// validation) only their format checked.
    pub secrets: crate::desired::secret_port::Secrets,
}

/// One VM as this host should have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVm {
    pub name: String,
    /// The file its XML came from (for messages).
    pub xml_file: String,
    /// The domain XML as committed.
    pub xml: String,
    pub summary: DomainSummary,
    pub fingerprint: String,
    pub autostart: bool,
    pub disks: Vec<DiskSpec>,
    pub on_change: manifest::OnChange,
    pub state: manifest::PowerState,
    /// `None`: the agent's default.
    pub shutdown_timeout: Option<std::time::Duration>,
    /// `None`: the agent's `policy.self_heal`.
    pub self_heal: Option<bool>,
    /// Take over an existing domain of this name without vmsync's tag (`adopt`).
    pub adopt: bool,
    /// `[vm.health]`: checked after vmsync starts it with a new definition.
    pub health: Option<health_spec::HealthSpec>,
    /// `depends_on`, and whether the VM is in a dependency graph at all.
    pub order: start_order::VmOrder,
    /// `[vm.cloud_init]`: the seed built for it (its CD-ROM is in `xml` already).
    pub seed: Option<crate::desired::seed_spec::SeedSpec>,
}

impl DesiredVm {
    /// libvirt's autostart flag for it: `autostart`, except for a VM in a dependency
    /// graph, which vmsync starts itself, in order (at boot too).
    pub fn libvirt_autostart(&self) -> bool {
        self.autostart && !self.order.in_graph
    }
}

/// The validated desired state of this host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    pub directories: Vec<PathBuf>,
    pub vms: Vec<DesiredVm>,
    /// Networks, pools and pool volumes (see `resources`).
    pub resources: crate::desired::desired_state::DesiredResources,
    /// `[[window]]`: when running guests may be interrupted (none: always).
    pub windows: Vec<window_spec::Window>,
}

/// A network or pool as this host should have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredResource {
    pub kind: ResourceKind,
    pub name: String,
    /// The file its XML came from (for messages).
    pub xml_file: String,
    /// The XML as committed.
    pub xml: String,
    pub summary: ResourceSummary,
    pub fingerprint: String,
    pub autostart: bool,
    pub adopt: bool,
    pub on_change: OnChange,
}

/// A pool volume a VM's `[[vm.disk]]` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVolume {
    pub vm: String,
    pub spec: VolumeSpec,
}

/// What a reference names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Network(String),
    Pool(String),
    Volume { pool: String, volume: String },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Network(n) => write!(f, "network '{n}'"),
            Target::Pool(p) => write!(f, "pool '{p}'"),
            Target::Volume { pool, volume } => write!(f, "volume '{volume}' of pool '{pool}'"),
        }
    }
}

/// A reference to a network, pool or volume the commit does not make for this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    pub vm: String,
    pub file: String,
    pub field: String,
    pub target: Target,
}

impl ExternalRef {
    /// The problem when the host does not have it either.
    pub fn problem(&self) -> Problem {
        Problem {
            file: self.file.clone(),
            line: None,
            vm: Some(self.vm.clone()),
            field: Some(self.field.clone()),
            message: format!(
                "{} is neither in the commit for this host nor on the host",
                self.target
            ),
        }
    }
}

/// The networks, pools and volumes of a commit for this host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredResources {
    pub networks: Vec<DesiredResource>,
    pub pools: Vec<DesiredResource>,
    pub volumes: Vec<DesiredVolume>,
    /// What the host must have already.
    pub external: Vec<ExternalRef>,
}

impl DesiredResources {
    /// The entries of `kind`.
    pub fn of(&self, kind: ResourceKind) -> &[DesiredResource] {
        match kind {
            ResourceKind::Network => &self.networks,
            ResourceKind::Pool => &self.pools,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
            && self.pools.is_empty()
            && self.volumes.is_empty()
            && self.external.is_empty()
    }
}
