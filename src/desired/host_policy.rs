//! The host policy: what a commit's domain XML may ask of this host beyond disk images
//! under `disk_roots`. Whoever can push to the VM repository must not become root on the
//! hypervisor by asking for it in XML, so everything that hands host resources to a guest
//! or makes libvirt run something on the host is refused unless the operator allows it in
//! `[policy]` (every switch defaults to false):
//!
//! - `allow_qemu_commandline`: elements in a hypervisor namespace outside `<metadata>`
//!   (`<qemu:commandline>`, `<qemu:override>`, `<lxc:namespace>`, …), an `<emulator>`
//!   that is not a QEMU binary, and interface `<script>`/`<downscript>` (programs run as
//!   root on the host);
//! - `allow_hostdev`: `<hostdev>`, `<interface type='hostdev'>`, NVMe disks, host
//!   smartcards, evdev/passthrough input, passthrough TPMs, character devices of type
//!   `dev`, RNG backends other than the kernel's random devices;
//! - `allow_block_devices`: disks and filesystems backed by a host block device;
//! - `allow_direct_interfaces`: `<interface type='direct'>` (macvtap on a host NIC);
//! - `allow_unconfined`: `<seclabel type='none'>` (no sVirt/AppArmor confinement).
//!
//! Host paths are checked too: disk and filesystem sources, char device files, logs and
//! sockets, kernel/initrd/dtb must be below a disk root or an `allowed_paths` entry;
//! firmware (`<loader>`, the NVRAM `template`) may also be under `/usr/share/`, NVRAM
//! files also under `/var/lib/libvirt/qemu/nvram/`, sockets and logs also under libvirt's
//! own `/var/lib/libvirt/qemu/` and `/var/log/libvirt/`. Paths must be absolute without
//! `.`/`..`; symlinks on the host are not resolved (the roots are the operator's).

use std::path::{Path, PathBuf};

use roxmltree::Node;

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
}

/// One thing the XML asks that the policy refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub line: Option<usize>,
    /// Where in the domain, e.g. `devices/hostdev`.
    pub field: String,
    pub message: String,
}

const QEMU_BINARIES: &[&str] = &[
    "/usr/bin/qemu-system-",
    "/usr/libexec/qemu-kvm",
    "/usr/bin/qemu-kvm",
    "/usr/bin/kvm",
];
const RANDOM_DEVICES: &[&str] = &["/dev/random", "/dev/urandom", "/dev/hwrng"];

struct Checker<'p> {
    policy: &'p HostPolicy,
    roots: Vec<PathBuf>,
    out: Vec<Violation>,
}

fn element<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none()
    })
}

fn elements<'a, 'i: 'a>(node: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    node.children()
        .filter(|c| c.is_element() && c.tag_name().namespace().is_none())
}

impl Checker<'_> {
    fn line(node: Node) -> Option<usize> {
        Some(node.document().text_pos_at(node.range().start).row as usize)
    }

    fn refuse(&mut self, node: Node, field: &str, what: &str, flag: &str) {
        let p = self.policy;
        let allowed = match flag {
            "allow_hostdev" => p.allow_hostdev,
            "allow_direct_interfaces" => p.allow_direct_interfaces,
            "allow_block_devices" => p.allow_block_devices,
            "allow_qemu_commandline" => p.allow_qemu_commandline,
            "allow_unconfined" => p.allow_unconfined,
            _ => unreachable!("unknown policy flag {flag}"),
        };
        if allowed {
            return;
        }
        self.out.push(Violation {
            line: Self::line(node),
            field: field.to_string(),
            message: format!(
                "{what} is refused by this host's policy (set [policy] {flag} = true to allow it)"
            ),
        });
    }

    /// A host path the XML names: must be under a disk root, an allowed path or `extra`.
    fn path(&mut self, node: Node, field: &str, raw: &str, extra: &[&str]) {
        let raw = raw.trim();
        let problem = match crate::desired::values::absolute_path(raw) {
            Err(e) => Some(e),
            Ok(path) => {
                let inside = |root: &Path| path.starts_with(root) && path != root;
                if self.roots.iter().any(|r| inside(r))
                    || extra.iter().any(|r| inside(Path::new(r)))
                {
                    None
                } else {
                    let mut allowed: Vec<String> = self
                        .roots
                        .iter()
                        .map(|r| format!("'{}'", r.display()))
                        .collect();
                    allowed.extend(extra.iter().map(|r| format!("'{r}'")));
                    Some(format!(
                        "host path '{raw}' is outside the disk roots and allowed paths ({}); add it to [policy] allowed_paths to allow it",
                        allowed.join(", ")
                    ))
                }
            }
        };
        if let Some(message) = problem {
            self.out.push(Violation {
                line: Self::line(node),
                field: field.to_string(),
                message,
            });
        }
    }

    fn namespaces(&mut self, node: Node) {
        for child in node.children().filter(Node::is_element) {
            match child.tag_name().namespace() {
                Some(ns) => {
                    let prefix = child.lookup_prefix(ns).unwrap_or("");
                    let name = if prefix.is_empty() {
                        format!("{{{ns}}}{}", child.tag_name().name())
                    } else {
                        format!("{prefix}:{}", child.tag_name().name())
                    };
                    self.refuse(
                        child,
                        &name,
                        &format!("hypervisor-specific element <{name}> (namespace '{ns}')"),
                        "allow_qemu_commandline",
                    );
                }
                None if child.tag_name().name() == "metadata"
                    && child.parent() == Some(child.document().root_element()) => {}
                None => self.namespaces(child),
            }
        }
    }

    fn os(&mut self, os: Node) {
        for node in elements(os) {
            let text = node.text().unwrap_or("").trim();
            match node.tag_name().name() {
                "loader" if !text.is_empty() => {
                    self.path(node, "os/loader", text, &["/usr/share/"])
                }
                "nvram" => {
                    if let Some(template) = node.attribute("template") {
                        self.path(node, "os/nvram", template, &["/usr/share/"]);
                    }
                    if !text.is_empty() {
                        self.path(node, "os/nvram", text, &["/var/lib/libvirt/qemu/nvram/"]);
                    }
                }
                name @ ("kernel" | "initrd" | "dtb") if !text.is_empty() => {
                    self.path(node, &format!("os/{name}"), text, &[])
                }
                _ => {}
            }
        }
    }

    /// The `<source>` elements of a disk, its backing chain and mirror.
    fn disk(&mut self, disk: Node) {
        let kind = disk.attribute("type").unwrap_or("file");
        if kind == "nvme" {
            self.refuse(
                disk,
                "devices/disk",
                "an NVMe disk (a host PCI device)",
                "allow_hostdev",
            );
        }
        for source in disk
            .descendants()
            .filter(|n| n.is_element() && n.tag_name().name() == "source")
        {
            if let Some(dev) = source.attribute("dev") {
                self.refuse(
                    source,
                    "devices/disk/source",
                    &format!("a disk on host block device '{dev}'"),
                    "allow_block_devices",
                );
            }
            for attr in ["file", "dir"] {
                if let Some(path) = source.attribute(attr) {
                    self.path(source, "devices/disk/source", path, &[]);
                }
            }
        }
    }

    fn filesystem(&mut self, fs: Node) {
        let Some(source) = element(fs, "source") else {
            return;
        };
        if let Some(dev) = source.attribute("dev") {
            self.refuse(
                source,
                "devices/filesystem/source",
                &format!("a filesystem on host block device '{dev}'"),
                "allow_block_devices",
            );
        }
        for attr in ["dir", "file"] {
            if let Some(path) = source.attribute(attr) {
                self.path(source, "devices/filesystem/source", path, &[]);
            }
        }
    }

    fn chardev(&mut self, dev: Node, name: &str) {
        let field = format!("devices/{name}");
        match dev.attribute("type") {
            Some("dev") => self.refuse(
                dev,
                &field,
                &format!("a <{name}> on a host character device"),
                "allow_hostdev",
            ),
            Some("file" | "pipe" | "unix") => {
                if let Some(path) = element(dev, "source").and_then(|s| s.attribute("path")) {
                    self.path(
                        dev,
                        &format!("{field}/source"),
                        path,
                        &["/var/lib/libvirt/qemu/", "/var/log/libvirt/"],
                    );
                }
            }
            _ => {}
        }
        if let Some(file) = element(dev, "log").and_then(|l| l.attribute("file")) {
            self.path(dev, &format!("{field}/log"), file, &["/var/log/libvirt/"]);
        }
    }

    fn devices(&mut self, devices: Node) {
        for dev in elements(devices) {
            let name = dev.tag_name().name();
            let kind = dev.attribute("type");
            match name {
                "emulator" => {
                    let path = dev.text().unwrap_or("").trim();
                    if !QEMU_BINARIES.iter().any(|b| path.starts_with(b)) {
                        self.refuse(
                            dev,
                            "devices/emulator",
                            &format!("emulator '{path}' (not a QEMU binary under /usr)"),
                            "allow_qemu_commandline",
                        );
                    }
                }
                "hostdev" => self.refuse(
                    dev,
                    "devices/hostdev",
                    "host device passthrough (<hostdev>)",
                    "allow_hostdev",
                ),
                "interface" => {
                    match kind {
                        Some("direct") => self.refuse(
                            dev,
                            "devices/interface",
                            "a direct (macvtap) interface on a host NIC",
                            "allow_direct_interfaces",
                        ),
                        Some("hostdev") => self.refuse(
                            dev,
                            "devices/interface",
                            "a host network device passed through (<interface type='hostdev'>)",
                            "allow_hostdev",
                        ),
                        _ => {}
                    }
                    for script in ["script", "downscript"] {
                        if let Some(node) = element(dev, script) {
                            self.refuse(
                                node,
                                &format!("devices/interface/{script}"),
                                &format!("an interface <{script}> (a program run on the host)"),
                                "allow_qemu_commandline",
                            );
                        }
                    }
                }
                "disk" => self.disk(dev),
                "filesystem" => self.filesystem(dev),
                "smartcard" if dev.attribute("mode") == Some("host") => self.refuse(
                    dev,
                    "devices/smartcard",
                    "the host's smartcard reader",
                    "allow_hostdev",
                ),
                "input" if matches!(kind, Some("passthrough" | "evdev")) => {
                    self.refuse(dev, "devices/input", "a host input device", "allow_hostdev")
                }
                "tpm"
                    if element(dev, "backend").and_then(|b| b.attribute("type"))
                        == Some("passthrough") =>
                {
                    self.refuse(dev, "devices/tpm", "the host's TPM", "allow_hostdev");
                }
                "rng" => {
                    if let Some(backend) = element(dev, "backend")
                        && backend.attribute("model") == Some("random")
                    {
                        let path = backend.text().unwrap_or("").trim();
                        if !path.is_empty() && !RANDOM_DEVICES.contains(&path) {
                            self.refuse(
                                backend,
                                "devices/rng/backend",
                                &format!("host device '{path}' as a random source"),
                                "allow_hostdev",
                            );
                        }
                    }
                }
                "serial" | "parallel" | "console" | "channel" => self.chardev(dev, name),
                _ => {}
            }
        }
    }
}

/// Checks a domain XML (already well-formed, see `domain_xml::summarize`) against the
/// host policy. Returns every violation, in document order per kind.
pub fn check(xml: &str, policy: &HostPolicy, disk_roots: &[PathBuf]) -> Vec<Violation> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        ..Default::default()
    };
    let Ok(doc) = roxmltree::Document::parse_with_options(xml, options) else {
        return Vec::new(); // summarize reports it
    };
    let root = doc.root_element();
    let mut roots = disk_roots.to_vec();
    roots.extend(policy.allowed_paths.iter().cloned());
    let mut checker = Checker {
        policy,
        roots,
        out: Vec::new(),
    };
    checker.namespaces(root);
    if let Some(os) = element(root, "os") {
        checker.os(os);
    }
    if let Some(devices) = element(root, "devices") {
        checker.devices(devices);
    }
    for label in root
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "seclabel")
    {
        if label.attribute("type") == Some("none") {
            checker.refuse(
                label,
                "seclabel",
                "running the guest unconfined (<seclabel type='none'>)",
                "allow_unconfined",
            );
        }
    }
    checker.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(body: &str) -> String {
        format!(
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n<name>x</name>\n{body}\n</domain>"
        )
    }

    fn run(body: &str, policy: &HostPolicy) -> Vec<(String, String)> {
        check(&domain(body), policy, &[PathBuf::from("/srv/images")])
            .into_iter()
            .map(|v| (v.field, v.message))
            .collect()
    }

    fn fields(body: &str) -> Vec<String> {
        run(body, &HostPolicy::default())
            .into_iter()
            .map(|(f, _)| f)
            .collect()
    }

    #[test]
    fn an_ordinary_guest_passes() {
        let body = "<metadata><vmsync:x xmlns:vmsync='urn:x'/></metadata>
<os firmware='efi'><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader><nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/x_VARS.fd</nvram></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><source file='/srv/images/x.qcow2'><backingStore type='file'><source file='/srv/images/base.qcow2'/></backingStore></source></disk>
<disk type='network'><source protocol='nbd' name='x'><host name='h'/></source></disk>
<interface type='network'><source network='default'/></interface><interface type='bridge'><source bridge='br0'/></interface>
<serial type='pty'/><console type='pty'/><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices>";
        assert_eq!(fields(body), Vec::<String>::new());
    }

    #[test]
    fn each_dangerous_thing_is_refused_with_its_field_and_flag() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "<qemu:commandline><qemu:arg value='-x'/></qemu:commandline>",
                "qemu:commandline",
                "allow_qemu_commandline",
            ),
            (
                "<devices><emulator>/bin/sh</emulator></devices>",
                "devices/emulator",
                "allow_qemu_commandline",
            ),
            (
                "<devices><hostdev mode='subsystem' type='pci'/></devices>",
                "devices/hostdev",
                "allow_hostdev",
            ),
            (
                "<devices><interface type='direct'><source dev='eth0' mode='bridge'/></interface></devices>",
                "devices/interface",
                "allow_direct_interfaces",
            ),
            (
                "<devices><interface type='ethernet'><script path='/tmp/x'/></interface></devices>",
                "devices/interface/script",
                "allow_qemu_commandline",
            ),
            (
                "<devices><disk type='block'><source dev='/dev/sda'/></disk></devices>",
                "devices/disk/source",
                "allow_block_devices",
            ),
            (
                "<devices><disk type='file'><source file='/etc/shadow'/></disk></devices>",
                "devices/disk/source",
                "allowed_paths",
            ),
            (
                "<devices><disk type='file'><source file='/srv/images/../../etc/shadow'/></disk></devices>",
                "devices/disk/source",
                "'..'",
            ),
            (
                "<devices><filesystem type='mount'><source dir='/'/><target dir='r'/></filesystem></devices>",
                "devices/filesystem/source",
                "allowed_paths",
            ),
            (
                "<devices><serial type='file'><source path='/etc/cron.d/x'/></serial></devices>",
                "devices/serial/source",
                "allowed_paths",
            ),
            (
                "<devices><serial type='dev'><source path='/dev/ttyS0'/></serial></devices>",
                "devices/serial",
                "allow_hostdev",
            ),
            (
                "<devices><tpm><backend type='passthrough'/></tpm></devices>",
                "devices/tpm",
                "allow_hostdev",
            ),
            (
                "<devices><input type='evdev'/></devices>",
                "devices/input",
                "allow_hostdev",
            ),
            (
                "<os><type>hvm</type><kernel>/boot/vmlinuz</kernel></os>",
                "os/kernel",
                "allowed_paths",
            ),
            (
                "<os><type>hvm</type><nvram>/etc/passwd</nvram></os>",
                "os/nvram",
                "allowed_paths",
            ),
            ("<seclabel type='none'/>", "seclabel", "allow_unconfined"),
        ];
        for (body, field, hint) in cases {
            let got = run(body, &HostPolicy::default());
            assert_eq!(got.len(), 1, "{body}: {got:?}");
            assert_eq!(got[0].0, *field, "{body}");
            assert!(got[0].1.contains(hint), "{body}: {}", got[0].1);
        }
    }

    #[test]
    fn the_policy_switches_allow_them() {
        let all = HostPolicy {
            allow_hostdev: true,
            allow_direct_interfaces: true,
            allow_block_devices: true,
            allow_qemu_commandline: true,
            allow_unconfined: true,
            allowed_paths: vec!["/etc/cron.d".into(), "/boot".into()],
        };
        let body = "<qemu:commandline/><seclabel type='none'/><os><kernel>/boot/vmlinuz</kernel></os><devices><hostdev/><interface type='direct'/><disk type='block'><source dev='/dev/sda'/></disk><serial type='file'><source path='/etc/cron.d/x'/></serial></devices>";
        assert_eq!(run(body, &all), vec![]);
        assert_eq!(run(body, &HostPolicy::default()).len(), 7);
    }
}
