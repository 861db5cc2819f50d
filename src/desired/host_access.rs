//! What a commit's networks, storage pools and health checks may make the host do, and
//! the parts of the host policy that domains, networks and pools share: host paths in
//! libvirt's own directories, foreign XML namespaces, host addresses and listeners.
//!
//! - **Health checks**: a `[vm.health] command`'s program must be an absolute path equal
//!   to or below an entry of `[policy] health_commands` (none by default), symlinks
//!   resolved; it is run without a shell.
//! - **Pools**: the target, and source paths and devices, obey the one path rule
//!   (`path_rule`) and must be below `disk_roots`/`allowed_paths`; a pool whose target
//!   libvirt fills in is checked against what libvirt will use (`logical`: `/dev/VG`,
//!   `zfs`: `/dev/zvol/POOL`); pools on host devices (`fs`, `disk`, `logical`, `iscsi`,
//!   `iscsi-direct`, `scsi`, `mpath`, `zfs`) need `allow_block_devices`; option
//!   namespaces (`<fs:mount_opts>`, `<rbd:config_opts>`) need `allow_qemu_commandline`.
//! - **Networks**: the dnsmasq namespace (`<dnsmasq:options>`) and any other foreign
//!   element outside `<metadata>` need `allow_qemu_commandline` as in a domain; macvtap
//!   in a network's `<forward mode='bridge'>` with host NICs needs
//!   `allow_direct_interfaces`; a TFTP root is a host path.
//! - **libvirt's shared directories** (`/var/lib/libvirt/qemu/`, `/run/libvirt/`,
//!   `/var/log/libvirt/`, swtpm state …): a path there must belong to the VM that names
//!   it (told by the VM's name, as libvirt names its files), whatever the roots say; a
//!   pool or network gets none.
//! - **Addresses**: a network disk or pool on a link-local or cloud metadata address
//!   needs `allow_link_local_hosts`; a listener on a host address other than loopback
//!   (VNC/SPICE without a password, a TCP/UDP character device in bind mode, a `server`,
//!   `mcast` or `udp` interface, a passt port forward) needs `allow_open_listeners`.
//! - No attribute of a network or pool may hold a control character (dnsmasq's
//!   configuration is line-based).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use roxmltree::Node;

use crate::desired::domain_xml;
use crate::desired::host_policy_settings::{HostPolicy, Violation};
use crate::desired::path_rule::{self, escape};

/// Directories libvirt and its helpers keep per-VM or per-network state in, shared by
/// every VM of the host: a path there must belong to whoever names it.
pub const SHARED_AREAS: &[&str] = &[
    "/var/lib/libvirt/qemu",
    "/var/lib/libvirt/swtpm",
    "/var/lib/libvirt/dnsmasq",
    "/var/lib/libvirt/lockd",
    "/var/lib/libvirt/sanlock",
    "/var/lib/libvirt/network",
    "/var/lib/libvirt/lxc",
    "/var/lib/libvirt/libxl",
    "/var/lib/libvirt/ch",
    "/var/lib/swtpm-localca",
    "/run/libvirt",
    "/var/run/libvirt",
    "/var/log/libvirt",
    "/var/log/swtpm",
    "/etc/libvirt",
    "/var/cache/libvirt",
];

/// What a host path in a domain is for: decides which of libvirt's own files it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Read-only firmware (`<loader>`, the NVRAM `template`): also anything under
    /// `/usr/share/`.
    Firmware,
    /// The VM's NVRAM file: also `/var/lib/libvirt/qemu/nvram/NAME_VARS.fd`.
    Nvram,
    /// A character device's file, pipe or socket: also the VM's own
    /// `/var/lib/libvirt/qemu/[channel/target/]NAME.*` and `/var/log/libvirt/[qemu/]NAME[.-]*`.
    Chardev,
    /// A log file: also `/var/log/libvirt/[qemu/]NAME[.-]*`.
    Log,
    /// Anything else: only below the roots.
    Plain,
}

fn shared_area(path: &Path) -> Option<&'static str> {
    SHARED_AREAS.iter().copied().find(|a| path.starts_with(a))
}

/// Whether `path` in a shared area is one of VM `vm`'s own files for `usage`.
fn owned_by(path: &Path, vm: &str, usage: Use) -> bool {
    let (Some(parent), Some(file)) = (path.parent(), path.file_name().and_then(|f| f.to_str()))
    else {
        return false;
    };
    let parent = parent.to_string_lossy();
    let starts = |seps: &[char]| {
        file.strip_prefix(vm)
            .and_then(|rest| rest.chars().next().filter(|c| seps.contains(c)))
            .is_some()
            && file.len() > vm.len() + 1
    };
    let log_dir = matches!(
        parent.as_ref(),
        "/var/log/libvirt" | "/var/log/libvirt/qemu"
    );
    match usage {
        Use::Nvram => {
            parent == "/var/lib/libvirt/qemu/nvram" && file == format!("{vm}_VARS.fd").as_str()
        }
        Use::Chardev => {
            (matches!(
                parent.as_ref(),
                "/var/lib/libvirt/qemu" | "/var/lib/libvirt/qemu/channel/target"
            ) && starts(&['.']))
                || (log_dir && starts(&['.', '-']))
        }
        Use::Log => log_dir && starts(&['.', '-']),
        Use::Firmware | Use::Plain => false,
    }
}

/// What else a path of `usage` may be, for messages.
fn own_patterns(vm: &str, usage: Use) -> Vec<String> {
    match usage {
        Use::Firmware => vec!["/usr/share/".into()],
        Use::Nvram => vec![format!("/var/lib/libvirt/qemu/nvram/{vm}_VARS.fd")],
        Use::Chardev => vec![
            format!("/var/lib/libvirt/qemu/{vm}.*"),
            format!("/var/lib/libvirt/qemu/channel/target/{vm}.*"),
            format!("/var/log/libvirt/qemu/{vm}-*"),
        ],
        Use::Log => vec![format!("/var/log/libvirt/qemu/{vm}-*")],
        Use::Plain => vec![],
    }
}

/// Checks a host path a domain of VM `vm` names for `usage`: the path rule, then either
/// one of the VM's own files in libvirt's shared directories, or strictly below `roots`
/// (the disk roots and `allowed_paths`), or (firmware) under `/usr/share/`.
/// `Ok(Some(path))`: one of the VM's own files in a shared directory (a [`Claim`]).
pub fn domain_path(
    raw: &str,
    roots: &[PathBuf],
    vm: &str,
    usage: Use,
) -> Result<Option<PathBuf>, String> {
    let path = path_rule::absolute(raw.trim())?;
    if let Some(area) = shared_area(&path) {
        if owned_by(&path, vm, usage) {
            return Ok(Some(path));
        }
        let own = own_patterns(vm, usage);
        return Err(format!(
            "host path '{}' is in libvirt's shared directory '{area}/' but is not a file of vm '{}'{}; libvirt keeps other VMs' NVRAM, sockets and logs there",
            path.display(),
            escape(vm),
            if own.is_empty() {
                String::new()
            } else {
                format!(" ({})", own.join(", "))
            }
        ));
    }
    if path_rule::strictly_below(&path, roots)
        || (usage == Use::Firmware
            && path.starts_with("/usr/share")
            && path != Path::new("/usr/share"))
    {
        return Ok(None);
    }
    let mut allowed: Vec<String> = roots.iter().map(|r| format!("'{}'", r.display())).collect();
    allowed.extend(own_patterns(vm, usage).iter().map(|p| format!("'{p}'")));
    Err(format!(
        "host path '{}' is outside the disk roots and allowed paths ({}); add it to [policy] allowed_paths to allow it",
        path.display(),
        allowed.join(", ")
    ))
}

/// A file in libvirt's shared directories that a domain names as its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub line: Option<usize>,
    pub field: String,
    pub path: PathBuf,
    pub usage: Use,
}

/// Names whose files in libvirt's shared directories a file of VM `vm` could be too:
/// the other names of `names` that are `vm` followed by `.`, `-` or `_` and more.
pub fn longer_names<'n>(vm: &str, names: &'n [&'n str]) -> Vec<&'n str> {
    names
        .iter()
        .copied()
        .filter(|other| {
            other
                .strip_prefix(vm)
                .and_then(|rest| rest.chars().next())
                .is_some_and(|c| matches!(c, '.' | '-' | '_'))
        })
        .collect()
}

/// Of `claims` (VM `vm`'s own files in the shared directories), those that are just as
/// much files of another VM of `others` (see [`longer_names`]): VM `web` naming
/// `/var/log/libvirt/qemu/web-2.log`, the log of VM `web-2`. Returns each with the
/// other VM's name.
pub fn clashes<'c, 'n>(claims: &'c [Claim], others: &[&'n str]) -> Vec<(&'c Claim, &'n str)> {
    claims
        .iter()
        .filter_map(|c| {
            others
                .iter()
                .find(|o| owned_by(&c.path, o, c.usage))
                .map(|o| (c, *o))
        })
        .collect()
}

/// Checks a host path a network or pool names: the path rule, not in libvirt's shared
/// directories, strictly below `roots` or equal to one of `exact` (an `allowed_paths`
/// entry is a directory the operator gave for exactly this, e.g. a pool's target).
pub fn resource_path(raw: &str, roots: &[PathBuf], exact: &[PathBuf]) -> Result<PathBuf, String> {
    let path = path_rule::absolute(raw.trim())?;
    if let Some(area) = shared_area(&path) {
        return Err(format!(
            "host path '{}' is in libvirt's shared directory '{area}/' (other VMs' and networks' files)",
            path.display()
        ));
    }
    if path_rule::strictly_below(&path, roots) || exact.contains(&path) {
        Ok(path)
    } else {
        Err(format!(
            "'{}' is not below a disk root or allowed path ({}); add it to [policy] allowed_paths to allow it",
            path.display(),
            path_rule::roots_text(roots)
        ))
    }
}

/// Checks a host device path (`allow_block_devices` already granted): the path rule, and
/// `/dev` (a disk pool's usual target) or below it, or below `roots` (a "device" that is
/// `/etc/passwd` would get a file system).
pub fn device_path(raw: &str, roots: &[PathBuf]) -> Result<PathBuf, String> {
    let path = path_rule::absolute(raw.trim())?;
    if path.starts_with("/dev") || path_rule::strictly_below(&path, roots) {
        Ok(path)
    } else {
        Err(format!(
            "device '{}' is not below /dev/ nor a disk root or allowed path",
            path.display()
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Health checks

/// Checks a health check's program against `[policy] health_commands` and returns the
/// path to run: absolute, by the path rule, symlinks resolved when it exists on this
/// host, equal to or below an entry (entries resolved too).
pub fn health_program(program: &str, allowed: &[PathBuf]) -> Result<PathBuf, String> {
    let hint = format!(
        "add it, or a directory above it, to [policy] health_commands to allow it{}",
        if allowed.is_empty() {
            " (none are allowed by default: a check command runs as root on the host)"
        } else {
            ""
        }
    );
    let given =
        path_rule::absolute(program).map_err(|e| format!("the check's program: {e} ({hint})"))?;
    let resolved = std::fs::canonicalize(&given).unwrap_or_else(|_| given.clone());
    let ok = allowed.iter().any(|entry| {
        let entry = std::fs::canonicalize(entry).unwrap_or_else(|_| entry.clone());
        resolved.starts_with(&entry)
    });
    if ok {
        Ok(resolved)
    } else {
        let shown = if resolved == given {
            format!("'{}'", given.display())
        } else {
            format!("'{}' (resolved: '{}')", given.display(), resolved.display())
        };
        Err(format!(
            "the check's program {shown} is not allowed by this host's [policy] health_commands ({}); {hint}",
            if allowed.is_empty() {
                "none".into()
            } else {
                path_rule::roots_text(allowed)
            }
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Addresses

/// Host names of cloud metadata services (besides the link-local addresses).
const METADATA_NAMES: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
];

/// What `host` (a name or address a disk or pool connects to) is when it is a
/// link-local or cloud metadata address: `a link-local address, …`.
pub fn link_local(host: &str) -> Option<&'static str> {
    let h = host.trim().trim_start_matches('[').trim_end_matches(']');
    let lower = h.to_ascii_lowercase();
    if METADATA_NAMES.contains(&lower.trim_end_matches('.')) {
        return Some("a cloud metadata service's name");
    }
    match h.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) if a.is_link_local() => {
            Some("a link-local address, where cloud metadata services live")
        }
        IpAddr::V4(a) if a.octets() == [100, 100, 100, 200] => {
            Some("a cloud metadata service's address")
        }
        IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => Some("a link-local address"),
        IpAddr::V6(a) if a.segments() == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254] => {
            Some("a cloud metadata service's address")
        }
        IpAddr::V6(a) => a
            .to_ipv4_mapped()
            .filter(|v4| v4.is_link_local())
            .map(|_| "a link-local address"),
        _ => None,
    }
}

/// Whether a listener on `address` is reachable from other machines: anything but a
/// loopback address or `localhost` (`0.0.0.0` and `::` are every address).
pub fn is_open(address: &str) -> bool {
    let a = address.trim().trim_start_matches('[').trim_end_matches(']');
    if a.eq_ignore_ascii_case("localhost") {
        return false;
    }
    match a.parse::<IpAddr>() {
        Ok(ip) => !ip.is_loopback(),
        Err(_) => true,
    }
}

// ---------------------------------------------------------------------------------------
// XML shared by domains, networks and pools

/// Calls `found(element, shown_name, namespace)` for every element in a foreign XML
/// namespace below `node`, except inside the document's top-level `<metadata>`.
pub fn foreign_elements<'a, 'i>(
    node: Node<'a, 'i>,
    found: &mut dyn FnMut(Node<'a, 'i>, String, &str),
) {
    for child in node.children().filter(Node::is_element) {
        match child.tag_name().namespace() {
            Some(ns) => {
                let prefix = child.lookup_prefix(ns).unwrap_or("");
                let name = if prefix.is_empty() {
                    format!("{{{ns}}}{}", child.tag_name().name())
                } else {
                    format!("{prefix}:{}", child.tag_name().name())
                };
                found(child, name, ns);
            }
            None if child.tag_name().name() == "metadata"
                && child.parent() == Some(child.document().root_element()) => {}
            None => foreign_elements(child, found),
        }
    }
}

/// The element path of `node` below the root, for a field name: `ip/dhcp/host`.
fn field_of(node: Node) -> String {
    let mut parts: Vec<&str> = node
        .ancestors()
        .filter(|n| n.is_element() && n.parent().is_some_and(|p| p.is_element()))
        .map(|n| n.tag_name().name())
        .collect();
    parts.reverse();
    parts.join("/")
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none()
    })
}

fn children<'a, 'i: 'a>(
    node: Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    node.children().filter(move |c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none()
    })
}

/// Collects what a network's or pool's XML asks that the policy refuses.
struct Resource<'p> {
    policy: &'p HostPolicy,
    roots: Vec<PathBuf>,
    out: Vec<Violation>,
}

impl Resource<'_> {
    fn push(&mut self, node: Node, field: &str, message: String) {
        self.out.push(Violation {
            line: Some(node.document().text_pos_at(node.range().start).row as usize),
            field: field.to_string(),
            message,
        });
    }

    fn refuse(&mut self, node: Node, field: &str, what: &str, key: &str, allowed: bool) {
        if !allowed {
            self.push(
                node,
                field,
                format!("{what} is refused by this host's policy (set [policy] {key} = true to allow it)"),
            );
        }
    }

    fn path(&mut self, node: Node, field: &str, raw: &str) {
        let exact: Vec<PathBuf> = (self.policy.allowed_paths.iter())
            .filter_map(|p| path_rule::absolute(&p.to_string_lossy()).ok())
            .collect();
        if let Err(e) = resource_path(raw, &self.roots, &exact) {
            self.push(node, field, e);
        }
    }

    fn device(&mut self, node: Node, field: &str, raw: &str) {
        if let Err(e) = device_path(raw, &self.roots) {
            self.push(node, field, e);
        }
    }

    fn host(&mut self, node: Node, field: &str) {
        if let Some(name) = node.attribute("name")
            && let Some(why) = link_local(name)
            && !self.policy.allow_link_local_hosts
        {
            self.push(
                node,
                field,
                format!(
                    "a connection to '{}' ({why}) is refused by this host's policy (set [policy] allow_link_local_hosts = true to allow it)",
                    escape(name)
                ),
            );
        }
    }

    /// Foreign namespaces and control characters in attributes, anywhere.
    fn common(&mut self, root: Node) {
        let mut found = Vec::new();
        foreign_elements(root, &mut |node, name, ns| {
            found.push((node, name, ns.to_string()))
        });
        for (node, name, ns) in found {
            let allowed = self.policy.allow_qemu_commandline;
            self.refuse(
                node,
                &name,
                &format!(
                    "element <{name}> (namespace '{ns}': options passed to a program on the host)"
                ),
                "allow_qemu_commandline",
                allowed,
            );
        }
        for node in root.descendants().filter(Node::is_element) {
            for attr in node.attributes() {
                if attr.value().chars().any(path_rule::is_forbidden_char) {
                    let field = format!("{}@{}", field_of(node), attr.name());
                    self.push(
                        node,
                        &field,
                        format!(
                            "'{}' has a control or formatting character",
                            path_rule::shown(attr.value(), 80)
                        ),
                    );
                }
            }
        }
    }
}

/// Pool types whose storage is the host's own block devices (or a volume group, zpool,
/// SCSI adapter, iSCSI LUNs logged in on the host).
pub const DEVICE_POOLS: &[&str] = &[
    "fs",
    "disk",
    "logical",
    "iscsi",
    "iscsi-direct",
    "scsi",
    "mpath",
    "zfs",
];

/// The target path libvirt uses for a pool of `pool_type` named `name`, where libvirt
/// fills it in whatever the XML says (`logical`: `/dev/VG`, `zfs`: `/dev/zvol/POOL`;
/// the volume group or zpool is `<source><name>`, else the pool's name).
pub fn implied_target(pool_type: &str, name: &str, source_name: Option<&str>) -> Option<String> {
    let source = source_name.unwrap_or(name);
    match pool_type {
        "logical" => Some(format!("/dev/{source}")),
        "zfs" => Some(format!("/dev/zvol/{source}")),
        _ => None,
    }
}

/// Checks a `<pool>` definition (well-formed: `resource_xml::summarize` passed) against
/// the host policy; `disk_roots` and `policy.allowed_paths` are where its paths may be.
pub fn check_pool(xml: &str, policy: &HostPolicy, disk_roots: &[PathBuf]) -> Vec<Violation> {
    check_resource(xml, policy, disk_roots, pool)
}

/// Parses a network's or pool's XML, runs the checks of both ([`Resource::common`]) and
/// `kind`'s own, and returns what they found.
fn check_resource(
    xml: &str,
    policy: &HostPolicy,
    disk_roots: &[PathBuf],
    kind: fn(&mut Resource, Node),
) -> Vec<Violation> {
    let Ok(doc) = domain_xml::parse_doc(xml) else {
        return Vec::new();
    };
    let root = doc.root_element();
    let mut roots = disk_roots.to_vec();
    roots.extend(policy.allowed_paths.iter().cloned());
    let mut c = Resource {
        policy,
        roots,
        out: Vec::new(),
    };
    c.common(root);
    kind(&mut c, root);
    c.out
}

fn pool(c: &mut Resource, root: Node) {
    let policy = c.policy;
    let kind = root.attribute("type").unwrap_or("");
    let name = child(root, "name")
        .and_then(|n| n.text())
        .unwrap_or("")
        .trim();
    let source = child(root, "source");
    let on_devices = DEVICE_POOLS.contains(&kind);
    if on_devices {
        let allowed = policy.allow_block_devices;
        c.refuse(
            root,
            "type",
            &format!("a '{kind}' pool (storage on the host's block devices)"),
            "allow_block_devices",
            allowed,
        );
    }
    if let Some(source) = source {
        let source_name = child(source, "name").and_then(|n| n.text()).map(str::trim);
        if let Some(sn) = source_name
            && (sn
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
                || sn.chars().any(path_rule::is_forbidden_char))
        {
            let node = child(source, "name").unwrap_or(source);
            c.push(
                node,
                "source/name",
                format!(
                    "'{}' is not a plain name (no '.', '..' or empty parts)",
                    escape(sn)
                ),
            );
        }
        for dev in children(source, "device") {
            let Some(path) = dev.attribute("path") else {
                continue;
            };
            // An iSCSI "device" is the target's IQN, not a host path.
            if !matches!(kind, "iscsi" | "iscsi-direct") {
                c.device(dev, "source/device", path);
            }
        }
        for dir in children(source, "dir") {
            // A netfs, gluster or vstorage source directory is on the remote server;
            // only a dir pool's (unused by libvirt) would be local.
            if let (Some(path), "dir" | "fs") = (dir.attribute("path"), kind) {
                c.path(dir, "source/dir", path);
            }
        }
        for host in children(source, "host") {
            c.host(host, "source/host");
        }
        if let Some(adapter) = child(source, "adapter")
            && kind != "scsi"
        {
            let allowed = policy.allow_block_devices;
            c.refuse(
                adapter,
                "source/adapter",
                "a host SCSI adapter",
                "allow_block_devices",
                allowed,
            );
        }
    }
    let source_name = source
        .and_then(|s| child(s, "name"))
        .and_then(|n| n.text())
        .map(str::trim);
    let target = child(root, "target")
        .and_then(|t| child(t, "path"))
        .map(|p| (p, p.text().unwrap_or("").trim().to_string()));
    let bad_source_name = c.out.iter().any(|v| v.field == "source/name");
    if let Some(implied) = implied_target(kind, name, source_name).filter(|_| !bad_source_name) {
        // libvirt uses this whatever <target> says: it is a device path.
        if let Err(e) = device_path(&implied, &[]) {
            c.push(root, "target/path", format!("the target libvirt uses, {e}"));
        }
    } else if on_devices {
        if let Some((node, path)) = &target {
            c.device(*node, "target/path", path);
        }
    } else if let Some((node, path)) = &target {
        c.path(*node, "target/path", path);
    }
}

/// Checks a `<network>` definition (well-formed) against the host policy: foreign
/// namespaces (dnsmasq options), macvtap on host NICs in bridge mode, the TFTP root,
/// control characters in attributes.
pub fn check_network(xml: &str, policy: &HostPolicy, disk_roots: &[PathBuf]) -> Vec<Violation> {
    check_resource(xml, policy, disk_roots, network)
}

fn network(c: &mut Resource, root: Node) {
    let policy = c.policy;
    if let Some(forward) = child(root, "forward")
        && forward.attribute("mode") == Some("bridge")
        && child(root, "bridge").is_none()
        && (forward.attribute("dev").is_some() || child(forward, "interface").is_some())
    {
        let allowed = policy.allow_direct_interfaces;
        c.refuse(
            forward,
            "forward",
            "macvtap on a host NIC (<forward mode='bridge'> with host interfaces)",
            "allow_direct_interfaces",
            allowed,
        );
    }
    for ip in children(root, "ip") {
        if let Some(tftp) = child(ip, "tftp")
            && let Some(path) = tftp.attribute("root")
        {
            c.path(tftp, "ip/tftp", path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> Vec<PathBuf> {
        vec![PathBuf::from("/srv/images")]
    }

    #[test]
    fn shared_areas_hold_only_the_vms_own_files() {
        let ok = |raw: &str, usage| domain_path(raw, &roots(), "web", usage);
        assert!(ok("/var/lib/libvirt/qemu/nvram/web_VARS.fd", Use::Nvram).is_ok());
        assert!(
            ok(
                "/var/lib/libvirt/qemu/channel/target/web.org.qemu.guest_agent.0",
                Use::Chardev
            )
            .is_ok()
        );
        assert!(ok("/var/lib/libvirt/qemu/web.agent", Use::Chardev).is_ok());
        assert!(ok("/var/log/libvirt/qemu/web-serial0.log", Use::Chardev).is_ok());
        assert!(ok("/var/log/libvirt/qemu/web-console.log", Use::Log).is_ok());
        assert!(ok("/usr/share/OVMF/OVMF_CODE.fd", Use::Firmware).is_ok());
        let refused: &[(&str, Use)] = &[
            // defect 5: a serial file onto another VM's NVRAM.
            ("/var/lib/libvirt/qemu/nvram/db_VARS.fd", Use::Chardev),
            ("/var/lib/libvirt/qemu/nvram/db_VARS.fd", Use::Nvram),
            ("/var/lib/libvirt/qemu/nvram/web_VARS.fd", Use::Chardev),
            (
                "/var/lib/libvirt/qemu/domain-3-db/monitor.sock",
                Use::Chardev,
            ),
            ("/var/lib/libvirt/qemu/db.agent", Use::Chardev),
            ("/var/lib/libvirt/qemu/web", Use::Chardev),
            ("/var/lib/libvirt/qemu/web.", Use::Chardev),
            ("/var/log/libvirt/qemu/db.log", Use::Log),
            ("/var/log/libvirt/libvirtd.log", Use::Log),
            ("/run/libvirt/libvirt-sock", Use::Chardev),
            ("/var/lib/libvirt/swtpm/x/tpm2/tpm2-00.permall", Use::Plain),
            ("/etc/shadow", Use::Chardev),
            ("/usr/share/x", Use::Chardev),
        ];
        for (raw, usage) in refused {
            assert!(ok(raw, *usage).is_err(), "{raw} as {usage:?}");
        }
        // A disk root over a shared area does not make other VMs' files fair game.
        let wide = [PathBuf::from("/var/lib/libvirt")];
        assert!(
            domain_path(
                "/var/lib/libvirt/qemu/nvram/db_VARS.fd",
                &wide,
                "web",
                Use::Plain
            )
            .is_err()
        );
        assert!(domain_path("/var/lib/libvirt/images/a.qcow2", &wide, "web", Use::Plain).is_ok());
    }

    #[test]
    fn a_file_of_a_vm_with_a_longer_name_is_not_ones_own() {
        let names = ["web", "web-2", "web.prod", "webserver", "db"];
        assert_eq!(longer_names("web", &names), vec!["web-2", "web.prod"]);
        assert!(longer_names("db", &names).is_empty());
        let claim = |path: &str, usage| Claim {
            line: None,
            field: "devices/serial/source".into(),
            path: path.into(),
            usage,
        };
        let claims = [
            claim("/var/log/libvirt/qemu/web-2.log", Use::Log),
            claim("/var/log/libvirt/qemu/web-serial0.log", Use::Chardev),
            claim("/var/lib/libvirt/qemu/web.prod.agent", Use::Chardev),
        ];
        let found: Vec<(&str, &str)> = clashes(&claims, &longer_names("web", &names))
            .into_iter()
            .map(|(c, o)| (c.path.to_str().unwrap(), o))
            .collect();
        assert_eq!(
            found,
            vec![
                ("/var/log/libvirt/qemu/web-2.log", "web-2"),
                ("/var/lib/libvirt/qemu/web.prod.agent", "web.prod")
            ]
        );
    }

    #[test]
    fn health_programs_must_be_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let checks = dir.path().join("checks");
        std::fs::create_dir(&checks).unwrap();
        std::fs::write(checks.join("web"), "").unwrap();
        std::os::unix::fs::symlink("/bin/sh", checks.join("sh")).unwrap();
        let allowed = vec![checks.clone()];
        let program = checks.join("web");
        assert_eq!(
            health_program(program.to_str().unwrap(), &allowed).unwrap(),
            std::fs::canonicalize(&program).unwrap()
        );
        let e = health_program("/bin/sh", &[]).unwrap_err();
        assert!(
            e.contains("[policy] health_commands") && e.contains("none"),
            "{e}"
        );
        let e = health_program("/bin/sh", &allowed).unwrap_err();
        assert!(e.contains("not allowed"), "{e}");
        // A symlink in an allowed directory to a program outside it.
        let e = health_program(checks.join("sh").to_str().unwrap(), &allowed).unwrap_err();
        assert!(e.contains("resolved"), "{e}");
        let e = health_program("check-web", &allowed).unwrap_err();
        assert!(e.contains("must be absolute"), "{e}");
        let dotdot = format!("{}/../../bin/sh", checks.display());
        let e = health_program(&dotdot, &allowed).unwrap_err();
        assert!(e.contains("'..'"), "{e}");
    }

    #[test]
    fn link_local_and_metadata_addresses() {
        for bad in [
            "169.254.169.254",
            "fe80::1",
            "[fe80::1]",
            "fd00:ec2::254",
            "metadata.google.internal",
            "100.100.100.200",
            "::ffff:169.254.1.1",
        ] {
            assert!(link_local(bad).is_some(), "{bad}");
        }
        for good in [
            "10.0.0.1",
            "ceph.example.org",
            "::1",
            "127.0.0.1",
            "2001:db8::1",
        ] {
            assert!(link_local(good).is_none(), "{good}");
        }
        assert!(is_open("0.0.0.0") && is_open("::") && is_open("192.0.2.1") && is_open("hv1"));
        assert!(
            !is_open("127.0.0.1") && !is_open("::1") && !is_open("localhost") && !is_open("[::1]")
        );
    }

    fn pool_fields(xml: &str, policy: &HostPolicy) -> Vec<(String, String)> {
        check_pool(xml, policy, &roots())
            .into_iter()
            .map(|v| (v.field, v.message))
            .collect()
    }

    #[test]
    fn pools_obey_the_path_rule_and_need_allow_block_devices_on_host_devices() {
        let none = HostPolicy::default();
        let ok =
            "<pool type='dir'><name>p</name><target><path>/srv/images/p</path></target></pool>";
        assert_eq!(pool_fields(ok, &none), vec![]);
        // An allowed path is itself a fine target (a disk root is not).
        let pool_dir = HostPolicy {
            allowed_paths: vec!["/srv/pool/".into()],
            ..Default::default()
        };
        let exact = "<pool type='dir'><name>p</name><target><path>/srv/pool</path></target></pool>";
        assert_eq!(pool_fields(exact, &pool_dir), vec![]);
        assert_eq!(pool_fields(exact, &none).len(), 1);
        let cases: &[(&str, &str, &str)] = &[
            // defect 2: '..' out of the root.
            (
                "<pool type='dir'><name>p</name><target><path>/srv/images/../../etc</path></target></pool>",
                "target/path",
                "'..'",
            ),
            (
                "<pool type='dir'><name>p</name><target><path>/var/lib/libvirt/images/../../../../etc</path></target></pool>",
                "target/path",
                "'..'",
            ),
            (
                "<pool type='dir'><name>p</name><target><path>/srv/images</path></target></pool>",
                "target/path",
                "not below",
            ),
            (
                "<pool type='dir'><name>p</name><target><path>/srv/images/a&#10;b</path></target></pool>",
                "target/path",
                "control",
            ),
            // defect 3: pools on host devices.
            (
                "<pool type='fs'><name>p</name><source><device path='/dev/loop7'/></source><target><path>/srv/images/p</path></target></pool>",
                "type",
                "allow_block_devices",
            ),
            (
                "<pool type='logical'><name>vg</name><source><device path='/dev/sdb'/></source></pool>",
                "type",
                "allow_block_devices",
            ),
            (
                "<pool type='zfs'><name>tank</name></pool>",
                "type",
                "allow_block_devices",
            ),
            (
                "<pool type='disk'><name>d</name><source><device path='/dev/sdc'/></source><target><path>/dev</path></target></pool>",
                "type",
                "allow_block_devices",
            ),
            (
                "<pool type='iscsi'><name>i</name><source><host name='10.0.0.1'/><device path='iqn.2000-01.x:y'/></source><target><path>/dev/disk/by-path</path></target></pool>",
                "type",
                "allow_block_devices",
            ),
            (
                "<pool type='scsi'><name>s</name><source><adapter name='host0'/></source><target><path>/dev/disk/by-path</path></target></pool>",
                "type",
                "allow_block_devices",
            ),
            (
                "<pool type='mpath'><name>m</name><target><path>/dev/mapper</path></target></pool>",
                "type",
                "allow_block_devices",
            ),
            // option namespaces run programs with options.
            (
                "<pool type='netfs' xmlns:fs='http://libvirt.org/schemas/storagepool/fs/1.0'><name>n</name><source><host name='nfs'/><dir path='/x'/></source><target><path>/srv/images/n</path></target><fs:mount_opts><fs:option name='x'/></fs:mount_opts></pool>",
                "fs:mount_opts",
                "allow_qemu_commandline",
            ),
            (
                "<pool type='rbd' xmlns:rbd='http://libvirt.org/schemas/storagepool/rbd/1.0'><name>r</name><source><name>rbd</name><host name='ceph'/></source><rbd:config_opts><rbd:option name='log_file' value='/etc/x'/></rbd:config_opts></pool>",
                "rbd:config_opts",
                "allow_qemu_commandline",
            ),
            // a network pool on the metadata service.
            (
                "<pool type='netfs'><name>n</name><source><host name='169.254.169.254'/><dir path='/x'/></source><target><path>/srv/images/n</path></target></pool>",
                "source/host",
                "allow_link_local_hosts",
            ),
            (
                "<pool type='netfs'><name>n</name><source><host name='nfs'/><dir path='/x'/></source><target><path>/var/lib/libvirt/qemu/nvram</path></target></pool>",
                "target/path",
                "shared directory",
            ),
        ];
        for (xml, field, hint) in cases {
            let got = pool_fields(xml, &none);
            assert!(
                got.iter().any(|(f, m)| f == field && m.contains(hint)),
                "{xml}: {got:?}"
            );
        }
    }

    #[test]
    fn with_allow_block_devices_the_devices_and_implied_targets_are_still_checked() {
        let devices = HostPolicy {
            allow_block_devices: true,
            ..Default::default()
        };
        let fine = [
            "<pool type='fs'><name>p</name><source><device path='/dev/loop7'/></source><target><path>/srv/images/p</path></target></pool>",
            "<pool type='logical'><name>vg0</name><source><device path='/dev/sdb'/></source><target><path>/anything</path></target></pool>",
            "<pool type='logical'><name>p</name><source><name>vg0</name></source></pool>",
            "<pool type='disk'><name>d</name><source><device path='/dev/mapper/mpatha' part_separator='no'/><format type='gpt'/></source><target><path>/dev</path></target></pool>",
            "<pool type='zfs'><name>tank</name></pool>",
        ];
        for xml in fine {
            assert_eq!(pool_fields(xml, &devices), vec![], "{xml}");
        }
        let cases: &[(&str, &str)] = &[
            (
                "<pool type='fs'><name>p</name><source><device path='/etc/passwd'/></source><target><path>/srv/images/p</path></target></pool>",
                "source/device",
            ),
            (
                "<pool type='fs'><name>p</name><source><device path='/dev/../etc/passwd'/></source><target><path>/srv/images/p</path></target></pool>",
                "source/device",
            ),
            (
                "<pool type='logical'><name>p</name><source><name>../etc</name></source></pool>",
                "source/name",
            ),
            (
                "<pool type='disk'><name>d</name><source><device path='/dev/sdc'/></source><target><path>/etc</path></target></pool>",
                "target/path",
            ),
        ];
        for (xml, field) in cases {
            let got = pool_fields(xml, &devices);
            assert!(got.iter().any(|(f, _)| f == field), "{xml}: {got:?}");
        }
    }

    fn net_fields(xml: &str) -> Vec<String> {
        check_network(xml, &HostPolicy::default(), &roots())
            .into_iter()
            .map(|v| format!("{}: {}", v.field, v.message))
            .collect()
    }

    #[test]
    fn networks_need_the_switches_of_domains() {
        assert_eq!(
            net_fields(
                "<network><name>n</name><forward mode='nat'/><ip address='192.168.5.1' netmask='255.255.255.0'><tftp root='/srv/images/tftp'/></ip></network>"
            ),
            Vec::<String>::new()
        );
        let dnsmasq = net_fields(
            "<network xmlns:dnsmasq='http://libvirt.org/schemas/network/dnsmasq/1.0'><name>n</name><dnsmasq:options><dnsmasq:option value='dhcp-script=/tmp/x'/></dnsmasq:options></network>",
        );
        assert!(
            dnsmasq[0].starts_with("dnsmasq:options: ")
                && dnsmasq[0].contains("allow_qemu_commandline"),
            "{dnsmasq:?}"
        );
        let tftp = net_fields(
            "<network><name>n</name><ip address='192.168.5.1' prefix='24'><tftp root='/'/></ip></network>",
        );
        assert!(
            tftp[0].starts_with("ip/tftp: ") && tftp[0].contains("allowed_paths"),
            "{tftp:?}"
        );
        let macvtap = net_fields(
            "<network><name>n</name><forward mode='bridge'><interface dev='eth0'/></forward></network>",
        );
        assert!(
            macvtap[0].contains("allow_direct_interfaces"),
            "{macvtap:?}"
        );
        let ctl = net_fields(
            "<network><name>n</name><dns><txt name='x' value='a&#10;dhcp-script=/tmp/x'/></dns></network>",
        );
        assert!(
            ctl[0].starts_with("dns/txt@value: ") && ctl[0].contains("control"),
            "{ctl:?}"
        );
        assert!(!ctl[0].contains('\n'));
        // Inside the top-level <metadata> anything goes.
        assert_eq!(
            net_fields(
                "<network><name>n</name><metadata><x:y xmlns:x='urn:x'/></metadata></network>"
            ),
            Vec::<String>::new()
        );
    }
}
