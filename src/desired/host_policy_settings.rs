//! What the host's operator allows a commit (`[policy]` of the agent's configuration,
//! as the checks of domain, network and pool XML read it), and one refusal of it. The
//! checks are in `host_policy` (domains) and `host_access` (paths, networks, pools).

use std::path::PathBuf;
use std::time::Duration;

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
    /// `[policy] image_dir`, `image_urls`, `image_timeout`: where `[[image]]` entries
    /// may be downloaded from and where they are kept.
    pub images: ImagePolicy,
}

/// One thing the XML asks that the policy refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub line: Option<usize>,
    /// Where in the domain, e.g. `devices/hostdev`.
    pub field: String,
    pub message: String,
}

/// `[policy] image_dir`'s default.
pub const DEFAULT_IMAGE_DIR: &str = "/var/lib/libvirt/images/vmsync-images";

/// `[policy] image_timeout`'s default: a download fails when the server sends nothing
/// for this long (connecting included).
pub const DEFAULT_IMAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the host's operator allows `[[image]]` entries (`[policy] image_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePolicy {
    /// `[policy] image_dir`: where downloaded images are kept, one file per sha256;
    /// default [`DEFAULT_IMAGE_DIR`].
    pub dir: PathBuf,
    /// `[policy] image_urls`: URL prefixes images may be downloaded from; default
    /// `["https://"]`.
    pub urls: Vec<String>,
    /// `[policy] image_timeout`: a download that receives nothing for this long fails;
    /// default [`DEFAULT_IMAGE_TIMEOUT`].
    pub timeout: Duration,
}

impl Default for ImagePolicy {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(DEFAULT_IMAGE_DIR),
            urls: vec!["https://".into()],
            timeout: DEFAULT_IMAGE_TIMEOUT,
        }
    }
}
