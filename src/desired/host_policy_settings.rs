//! What the host's operator allows a commit (`[policy]` of the agent's configuration,
//! as the checks of domain, network and pool XML read it), and one refusal of it. The
//! checks are in `host_policy` (domains) and `host_access` (paths, networks, pools).

use std::path::PathBuf;

/// What domain XML may ask of this host (`[policy]`); everything off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPolicy {
    /// `[policy] allow_hostdev`: host devices passed to guests; default false.
    pub allow_hostdev: bool,
    /// `[policy] allow_direct_interfaces`: `type='direct'` (macvtap) interfaces; default false.
    pub allow_direct_interfaces: bool,
    /// `[policy] allow_block_devices`: host block devices as disks; default false.
    pub allow_block_devices: bool,
    /// `[policy] allow_qemu_commandline`: hypervisor namespaces, custom emulators,
    /// interface scripts; default false.
    pub allow_qemu_commandline: bool,
    /// `[policy] allow_unconfined`: `<seclabel type='none'>`; default false.
    pub allow_unconfined: bool,
    /// `[policy] allowed_paths`: host paths XML may name besides the disk roots; default [].
    pub allowed_paths: Vec<PathBuf>,
    /// `[policy] health_commands`: programs (or directories of them) a `[vm.health]`
    /// command may run; default [] (every check command refused).
    pub health_commands: Vec<PathBuf>,
    /// `[policy] allow_link_local_hosts`: network disks and pools on link-local or
    /// cloud metadata addresses; default false.
    pub allow_link_local_hosts: bool,
    /// `[policy] allow_open_listeners`: listeners on host addresses other than loopback
    /// without a password (VNC/SPICE, TCP/UDP character devices, server/mcast/udp
    /// interfaces, passt port forwards); default false.
    pub allow_open_listeners: bool,
}

/// One thing the XML asks that the policy refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub line: Option<usize>,
    /// Where in the domain, e.g. `devices/hostdev`.
    pub field: String,
    pub message: String,
}
