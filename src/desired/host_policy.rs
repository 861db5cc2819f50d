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

use std::path::PathBuf;

use roxmltree::Node;

use crate::desired::host_access::{self, Use};
use crate::desired::host_policy_settings::{HostPolicy, Violation};
use crate::desired::path_rule;
use crate::desired::path_rule::escape;

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
    /// The domain's `<name>`: whose files in libvirt's shared directories it may name.
    vm: String,
    out: Vec<Violation>,
    /// The VM's own files in libvirt's shared directories that the XML names.
    claims: Vec<host_access::Claim>,
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
            "allow_link_local_hosts" => p.allow_link_local_hosts,
            "allow_open_listeners" => p.allow_open_listeners,
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

    /// A host path the XML names, used as `usage`: the one path rule, below a disk root
    /// or allowed path, or one of this VM's own files in libvirt's directories
    /// (`host_access::domain_path`).
    fn path(&mut self, node: Node, field: &str, raw: &str, usage: Use) {
        match host_access::domain_path(raw, &self.roots, &self.vm, usage) {
            Err(message) => self.out.push(Violation {
                line: Self::line(node),
                field: field.to_string(),
                message,
            }),
            Ok(Some(path)) => self.claims.push(host_access::Claim {
                line: Self::line(node),
                field: field.to_string(),
                path,
                usage,
            }),
            Ok(None) => {}
        }
    }

    fn namespaces(&mut self, node: Node) {
        let mut found = Vec::new();
        host_access::foreign_elements(node, &mut |child, name, ns| {
            found.push((child, name, ns.to_string()))
        });
        for (child, name, ns) in found {
            self.refuse(
                child,
                &name,
                &format!("hypervisor-specific element <{name}> (namespace '{ns}')"),
                "allow_qemu_commandline",
            );
        }
    }

    fn os(&mut self, os: Node) {
        for node in elements(os) {
            let text = node.text().unwrap_or("").trim();
            match node.tag_name().name() {
                "loader" if !text.is_empty() => self.path(node, "os/loader", text, Use::Firmware),
                "nvram" => {
                    if let Some(template) = node.attribute("template") {
                        self.path(node, "os/nvram", template, Use::Firmware);
                    }
                    if !text.is_empty() {
                        self.path(node, "os/nvram", text, Use::Nvram);
                    }
                    // libvirt 8.5+: <nvram type='file'><source file=…/></nvram>; a
                    // network NVRAM is checked as a network disk.
                    if let Some(source) = element(node, "source") {
                        self.sources(node, "os/nvram/source", source, Use::Nvram);
                    }
                }
                name @ ("kernel" | "initrd" | "dtb") if !text.is_empty() => {
                    self.path(node, &format!("os/{name}"), text, Use::Plain)
                }
                "acpi" => {
                    for table in elements(node).filter(|t| t.tag_name().name() == "table") {
                        let text = table.text().unwrap_or("").trim();
                        self.path(table, "os/acpi/table", text, Use::Plain);
                    }
                }
                _ => {}
            }
        }
    }

    /// A host name or address a disk, pool or character device connects to.
    fn remote(&mut self, node: Node, field: &str, host: &str) {
        if let Some(why) = host_access::link_local(host) {
            self.refuse(
                node,
                field,
                &format!("a connection to '{}' ({why})", escape(host)),
                "allow_link_local_hosts",
            );
        }
    }

    /// A listener on a host `address` (`None`: libvirt's default, loopback unless
    /// qemu.conf says otherwise) without authentication.
    fn listener(&mut self, node: Node, field: &str, what: &str, address: Option<&str>) {
        let address = address.unwrap_or("0.0.0.0");
        if host_access::is_open(address) {
            self.refuse(
                node,
                field,
                &format!(
                    "{what} on host address '{}' (reachable from other machines, no password)",
                    escape(address)
                ),
                "allow_open_listeners",
            );
        }
    }

    /// The paths, devices and hosts a `<source>` (of a disk, its backing chain or
    /// mirror, an NVRAM) names: `file`/`dir`/`path`/`socket` are host paths, `dev` a
    /// block device, `<host>` a remote end (or a socket), `<config>`, `<knownHosts>`,
    /// `<identity keyfile>`, `<reservations><source path>` and `<dataStore>` host files.
    fn sources(&mut self, owner: Node, field: &str, source: Node, usage: Use) {
        if let Some(dev) = source.attribute("dev") {
            if self.policy.allow_block_devices {
                if let Err(message) = host_access::device_path(dev, &self.roots) {
                    self.out.push(Violation {
                        line: Self::line(source),
                        field: field.into(),
                        message,
                    });
                }
            } else {
                let name = owner.tag_name().name();
                self.refuse(
                    source,
                    field,
                    &format!("a {name} on host block device '{}'", escape(dev)),
                    "allow_block_devices",
                );
            }
        }
        for attr in ["file", "dir", "path", "socket"] {
            if let Some(path) = source.attribute(attr) {
                self.path(source, field, path, usage);
            }
        }
        for node in source
            .descendants()
            .filter(|n| n.is_element() && *n != source)
        {
            let sub = format!("{field}/{}", node.tag_name().name());
            match node.tag_name().name() {
                "host" => {
                    if let Some(socket) = node.attribute("socket") {
                        self.path(node, &sub, socket, Use::Plain);
                    }
                    if let Some(name) = node.attribute("name") {
                        self.remote(node, &sub, name);
                    }
                }
                "config" | "dataStore" | "source" => {
                    for attr in ["file", "path", "dir"] {
                        if let Some(path) = node.attribute(attr) {
                            self.path(node, &sub, path, Use::Plain);
                        }
                    }
                }
                "knownHosts" => {
                    if let Some(path) = node.attribute("path") {
                        self.path(node, &sub, path, Use::Plain);
                    }
                }
                "identity" => {
                    for attr in ["keyfile", "agentsock"] {
                        if let Some(path) = node.attribute(attr) {
                            self.path(node, &sub, path, Use::Plain);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// A disk: its `<source>`, backing chain and mirror.
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
        if let Some(file) = element(disk, "mirror").and_then(|m| m.attribute("file")) {
            self.path(disk, "devices/disk/mirror", file, Use::Plain);
        }
        // Every <source> of the disk, its <backingStore> chain and <mirror>, but not a
        // <source> nested in another <source> (handled by `sources`).
        for source in disk.descendants().filter(|n| {
            n.is_element()
                && n.tag_name().name() == "source"
                && !n
                    .ancestors()
                    .skip(1)
                    .take_while(|a| *a != disk)
                    .any(|a| a.tag_name().name() == "source")
        }) {
            self.sources(disk, "devices/disk/source", source, Use::Plain);
        }
    }

    fn filesystem(&mut self, fs: Node) {
        if let Some(source) = element(fs, "source") {
            self.sources(fs, "devices/filesystem/source", source, Use::Plain);
        }
        if let Some(binary) = element(fs, "binary")
            && let Some(path) = binary.attribute("path")
            && !VIRTIOFSD.contains(&path.trim())
        {
            self.refuse(
                binary,
                "devices/filesystem/binary",
                &format!("program '{}' run on the host (not virtiofsd)", escape(path)),
                "allow_qemu_commandline",
            );
        }
    }

    /// A character device's source, wherever it sits (serial, parallel, console,
    /// channel, a smartcard or USB redirection, an EGD random source).
    fn chardev(&mut self, dev: Node, field: &str, kind: Option<&str>) {
        let source = element(dev, "source");
        match kind {
            Some("dev" | "nmdm") => self.refuse(
                dev,
                field,
                &format!("a <{}> on a host character device", dev.tag_name().name()),
                "allow_hostdev",
            ),
            Some("file" | "pipe" | "unix") => {
                if let Some(path) = source.and_then(|s| s.attribute("path")) {
                    self.path(dev, &format!("{field}/source"), path, Use::Chardev);
                }
            }
            Some("tcp" | "udp") => {
                for s in elements(dev).filter(|s| s.tag_name().name() == "source") {
                    let host = s.attribute("host");
                    if s.attribute("mode") == Some("bind") {
                        self.listener(
                            s,
                            &format!("{field}/source"),
                            "a character device listening",
                            host,
                        );
                    } else if let Some(host) = host {
                        self.remote(s, &format!("{field}/source"), host);
                    }
                }
            }
            _ => {}
        }
        if let Some(tty) = dev.attribute("tty") {
            let what = format!("host terminal '{}'", escape(tty));
            self.refuse(dev, field, &what, "allow_hostdev");
        }
        if let Some(file) = element(dev, "log").and_then(|l| l.attribute("file")) {
            self.path(dev, &format!("{field}/log"), file, Use::Log);
        }
    }

    fn interface(&mut self, dev: Node, kind: Option<&str>) {
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
            Some("vdpa") => self.refuse(
                dev,
                "devices/interface",
                "a host vDPA device (<interface type='vdpa'>)",
                "allow_hostdev",
            ),
            Some("ethernet")
                if element(dev, "target").and_then(|t| t.attribute("managed")) == Some("no") =>
            {
                self.refuse(
                    dev,
                    "devices/interface/target",
                    "an existing host tap device (<target managed='no'>)",
                    "allow_hostdev",
                )
            }
            Some("vhostuser") => {
                if let Some(path) = element(dev, "source").and_then(|s| s.attribute("path")) {
                    self.path(dev, "devices/interface/source", path, Use::Chardev);
                }
            }
            Some("server" | "mcast" | "udp") => {
                // udp: bound on <local>, sending to <source>; the others bind <source>.
                let bound = if kind == Some("udp") {
                    element(dev, "source").and_then(|s| element(s, "local"))
                } else {
                    element(dev, "source")
                };
                let host = bound.and_then(|s| s.attribute("address"));
                self.listener(
                    dev,
                    "devices/interface/source",
                    "a socket interface listening",
                    host,
                );
            }
            Some("client") => {
                if let Some(host) = element(dev, "source").and_then(|s| s.attribute("address")) {
                    self.remote(dev, "devices/interface/source", host);
                }
            }
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
        if let Some(backend) = element(dev, "backend") {
            for (attr, standard) in [("tap", "/dev/net/tun"), ("vhost", "/dev/vhost-net")] {
                if let Some(path) = backend.attribute(attr)
                    && path.trim() != standard
                {
                    self.refuse(
                        backend,
                        "devices/interface/backend",
                        &format!("host device '{}' as the interface's {attr}", escape(path)),
                        "allow_hostdev",
                    );
                }
            }
            if let Some(log) = backend.attribute("logFile") {
                self.path(backend, "devices/interface/backend", log, Use::Log);
            }
        }
        for fwd in elements(dev).filter(|n| n.tag_name().name() == "portForward") {
            self.listener(
                fwd,
                "devices/interface/portForward",
                "a port forward (passt) listening",
                fwd.attribute("address"),
            );
        }
    }

    fn graphics(&mut self, dev: Node) {
        let kind = dev.attribute("type").unwrap_or("");
        if let Some(xauth) = dev.attribute("xauth") {
            self.path(dev, "devices/graphics", xauth, Use::Plain);
        }
        if let Some(socket) = dev.attribute("socket") {
            self.path(dev, "devices/graphics", socket, Use::Chardev);
        }
        let mut listens: Vec<(Node, Option<&str>)> = Vec::new();
        if let Some(listen) = dev.attribute("listen") {
            listens.push((dev, Some(listen)));
        }
        for l in elements(dev).filter(|l| l.tag_name().name() == "listen") {
            match l.attribute("type") {
                Some("address") => {
                    if let Some(address) = l.attribute("address") {
                        listens.push((l, Some(address)));
                    }
                }
                Some("socket") => {
                    if let Some(socket) = l.attribute("socket") {
                        self.path(l, "devices/graphics/listen", socket, Use::Chardev);
                    }
                }
                _ => {}
            }
        }
        let password = dev.attribute("passwd").is_some_and(|p| !p.is_empty());
        if matches!(kind, "vnc" | "spice" | "rdp") && !password {
            for (node, address) in listens {
                let what = format!("a {kind} console");
                self.listener(node, "devices/graphics", &what, address);
            }
        }
    }

    /// What any device may carry: a `<rom file>` (read into the guest) and a render
    /// node (`<gl rendernode>`, `<acceleration rendernode>`: a host GPU device).
    fn any_device(&mut self, dev: Node) {
        let name = dev.tag_name().name();
        for node in dev.descendants().filter(Node::is_element) {
            if node.tag_name().name() == "rom"
                && let Some(file) = node.attribute("file")
            {
                self.path(node, &format!("devices/{name}/rom"), file, Use::Plain);
            }
            if let Some(render) = node.attribute("rendernode")
                && (!render.trim().starts_with("/dev/dri/render")
                    || path_rule::absolute(render).is_err())
            {
                let field = format!("devices/{name}/{}", node.tag_name().name());
                let what = format!("host device '{}' as a render node", escape(render));
                self.refuse(node, &field, &what, "allow_hostdev");
            }
        }
    }

    fn devices(&mut self, devices: Node) {
        for dev in elements(devices) {
            self.any_device(dev);
            let name = dev.tag_name().name();
            let kind = dev.attribute("type");
            match name {
                "emulator" => self.emulator(dev),
                "hostdev" => self.refuse(
                    dev,
                    "devices/hostdev",
                    "host device passthrough (<hostdev>)",
                    "allow_hostdev",
                ),
                "interface" => self.interface(dev, kind),
                "disk" => self.disk(dev),
                "filesystem" => self.filesystem(dev),
                "graphics" => self.graphics(dev),
                "smartcard" => self.smartcard(dev, kind),
                "redirdev" => self.chardev(dev, "devices/redirdev", kind),
                "input" if matches!(kind, Some("passthrough" | "evdev")) => {
                    self.refuse(dev, "devices/input", "a host input device", "allow_hostdev")
                }
                "tpm" => self.tpm(dev),
                "rng" => self.rng(dev),
                "shmem" => {
                    if let Some(path) = element(dev, "server").and_then(|s| s.attribute("path")) {
                        self.path(dev, "devices/shmem/server", path, Use::Chardev);
                    }
                }
                "memory" => {
                    if let Some(path) = element(dev, "source").and_then(|s| element(s, "path")) {
                        let text = path.text().unwrap_or("").trim();
                        self.path(path, "devices/memory/source/path", text, Use::Plain);
                    }
                }
                "audio" => self.audio(dev, kind),
                "serial" | "parallel" | "console" | "channel" => {
                    self.chardev(dev, &format!("devices/{name}"), kind)
                }
                _ => {}
            }
        }
    }

    /// `<emulator>`: a QEMU binary under /usr.
    fn emulator(&mut self, dev: Node) {
        let path = dev.text().unwrap_or("").trim();
        if !QEMU_BINARIES.iter().any(|b| path.starts_with(b)) || path_rule::absolute(path).is_err()
        {
            self.refuse(
                dev,
                "devices/emulator",
                &format!("emulator '{}' (not a QEMU binary under /usr)", escape(path)),
                "allow_qemu_commandline",
            );
        }
    }

    /// `<smartcard>`: the host's reader, a certificate database, or a character device.
    fn smartcard(&mut self, dev: Node, kind: Option<&str>) {
        match dev.attribute("mode") {
            Some("host") => self.refuse(
                dev,
                "devices/smartcard",
                "the host's smartcard reader",
                "allow_hostdev",
            ),
            Some("host-certificates") => {
                if let Some(db) = element(dev, "database") {
                    let text = db.text().unwrap_or("").trim();
                    self.path(db, "devices/smartcard/database", text, Use::Plain);
                }
            }
            _ => self.chardev(dev, "devices/smartcard", kind),
        }
    }

    /// `<tpm>`: the host's TPM passed through, or an emulated one's source path.
    fn tpm(&mut self, dev: Node) {
        let Some(backend) = element(dev, "backend") else {
            return;
        };
        match backend.attribute("type") {
            Some("passthrough") => {
                self.refuse(dev, "devices/tpm", "the host's TPM", "allow_hostdev")
            }
            _ => {
                if let Some(path) = element(backend, "source").and_then(|s| s.attribute("path")) {
                    self.path(backend, "devices/tpm/backend/source", path, Use::Plain);
                }
            }
        }
    }

    /// `<rng>`: a host random device, or an egd character device.
    fn rng(&mut self, dev: Node) {
        let Some(backend) = element(dev, "backend") else {
            return;
        };
        match backend.attribute("model") {
            Some("random") => {
                let path = backend.text().unwrap_or("").trim();
                if !path.is_empty() && !RANDOM_DEVICES.contains(&path) {
                    self.refuse(
                        backend,
                        "devices/rng/backend",
                        &format!("host device '{}' as a random source", escape(path)),
                        "allow_hostdev",
                    );
                }
            }
            Some("egd") => {
                let kind = backend.attribute("type");
                self.chardev(backend, "devices/rng/backend", kind);
            }
            _ => {}
        }
    }

    /// `<audio>`: a path, or a host sound device.
    fn audio(&mut self, dev: Node, kind: Option<&str>) {
        if let Some(path) = dev.attribute("path") {
            self.path(dev, "devices/audio", path, Use::Plain);
        }
        if matches!(kind, Some("oss" | "alsa"))
            && elements(dev).any(|io| io.attribute("dev").is_some())
        {
            self.refuse(dev, "devices/audio", "a host sound device", "allow_hostdev");
        }
    }
}

/// virtiofsd where distributions install it: the only programs a `<filesystem>` may
/// name without `allow_qemu_commandline`.
const VIRTIOFSD: &[&str] = &[
    "/usr/libexec/virtiofsd",
    "/usr/lib/qemu/virtiofsd",
    "/usr/bin/virtiofsd",
];

/// Checks a domain XML (already well-formed, see `domain_xml::summarize`) against the
/// host policy. Returns every violation, in document order per kind.
pub fn check(xml: &str, policy: &HostPolicy, disk_roots: &[PathBuf]) -> Vec<Violation> {
    check_with_claims(xml, policy, disk_roots).0
}

/// [`check`], and the VM's own files in libvirt's shared directories that the XML names
/// (for `host_access::shared_name_clashes`).
pub fn check_with_claims(
    xml: &str,
    policy: &HostPolicy,
    disk_roots: &[PathBuf],
) -> (Vec<Violation>, Vec<host_access::Claim>) {
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        ..Default::default()
    };
    let Ok(doc) = roxmltree::Document::parse_with_options(xml, options) else {
        return (Vec::new(), Vec::new()); // summarize reports it
    };
    let root = doc.root_element();
    let mut roots = disk_roots.to_vec();
    roots.extend(policy.allowed_paths.iter().cloned());
    let vm = element(root, "name")
        .and_then(|n| n.text())
        .unwrap_or("")
        .trim()
        .to_string();
    let mut checker = Checker {
        policy,
        roots,
        vm,
        out: Vec::new(),
        claims: Vec::new(),
    };
    checker.namespaces(root);
    if let Some(os) = element(root, "os") {
        checker.os(os);
    }
    if let Some(bootloader) = element(root, "bootloader") {
        checker.refuse(
            bootloader,
            "bootloader",
            "a <bootloader> (a program run on the host)",
            "allow_qemu_commandline",
        );
    }
    // fw_cfg entries read from host files into the guest.
    for sysinfo in elements(root).filter(|n| n.tag_name().name() == "sysinfo") {
        for entry in sysinfo
            .descendants()
            .filter(|n| n.is_element() && n.tag_name().name() == "entry")
        {
            if let Some(file) = entry.attribute("file") {
                checker.path(entry, "sysinfo/entry", file, Use::Plain);
            }
        }
    }
    // A cgroup partition is a path in the host's cgroup tree.
    if let Some(partition) = element(root, "resource").and_then(|r| element(r, "partition")) {
        let text = partition.text().unwrap_or("").trim();
        if let Err(message) = path_rule::absolute(text) {
            checker.out.push(Violation {
                line: Checker::line(partition),
                field: "resource/partition".into(),
                message,
            });
        }
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
        } else if label.attribute("type") == Some("static") || element(label, "baselabel").is_some()
        {
            // A label of the XML's choosing can be an unconfined one.
            checker.refuse(
                label,
                "seclabel",
                "a security label chosen by the XML (<seclabel type='static'> or <baselabel>)",
                "allow_unconfined",
            );
        }
    }
    (checker.out, checker.claims)
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
    fn every_surface_of_the_survey_is_checked() {
        // (body, field, what the message names) — each one refused by default.
        let cases: &[(&str, &str, &str)] = &[
            // defect 5: a serial file onto another VM's NVRAM, a socket onto its monitor.
            (
                "<devices><serial type='file'><source path='/var/lib/libvirt/qemu/nvram/other_VARS.fd'/></serial></devices>",
                "devices/serial/source",
                "shared directory",
            ),
            (
                "<devices><channel type='unix'><source mode='connect' path='/var/lib/libvirt/qemu/domain-1-other/monitor.sock'/></channel></devices>",
                "devices/channel/source",
                "shared directory",
            ),
            (
                "<devices><serial type='file'><source path='/var/log/libvirt/qemu/other.log'/></serial></devices>",
                "devices/serial/source",
                "shared directory",
            ),
            (
                "<os><nvram>/var/lib/libvirt/qemu/nvram/other_VARS.fd</nvram></os>",
                "os/nvram",
                "shared directory",
            ),
            (
                "<os><nvram type='file'><source file='/etc/shadow'/></nvram></os>",
                "os/nvram/source",
                "allowed_paths",
            ),
            // defect 10: control characters in a path.
            (
                "<devices><disk type='file'><source file='/srv/images/a&#10;INFO forged'/></disk></devices>",
                "devices/disk/source",
                "control",
            ),
            (
                "<os><acpi><table type='slic'>/etc/shadow</table></acpi></os>",
                "os/acpi/table",
                "allowed_paths",
            ),
            (
                "<sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo>",
                "sysinfo/entry",
                "allowed_paths",
            ),
            (
                "<bootloader>/usr/bin/pygrub</bootloader>",
                "bootloader",
                "allow_qemu_commandline",
            ),
            (
                "<resource><partition>/machine/../../x</partition></resource>",
                "resource/partition",
                "'..'",
            ),
            (
                "<seclabel type='static' model='apparmor'><label>unconfined</label></seclabel>",
                "seclabel",
                "allow_unconfined",
            ),
            (
                "<devices><disk type='network'><source protocol='http' name='latest/meta-data'><host name='169.254.169.254' port='80'/></source></disk></devices>",
                "devices/disk/source/host",
                "allow_link_local_hosts",
            ),
            (
                "<devices><disk type='network'><source protocol='rbd' name='p/i'><host name='ceph'/><config file='/etc/shadow'/></source></disk></devices>",
                "devices/disk/source/config",
                "allowed_paths",
            ),
            (
                "<devices><disk type='network'><source protocol='ssh' name='x'><host name='h'/><identity username='u' keyfile='/root/.ssh/id_ed25519'/><knownHosts path='/root/.ssh/known_hosts'/></source></disk></devices>",
                "devices/disk/source/identity",
                "allowed_paths",
            ),
            (
                "<devices><disk type='network'><source protocol='nbd'><host transport='unix' socket='/run/libvirt/libvirt-sock'/></source></disk></devices>",
                "devices/disk/source/host",
                "shared directory",
            ),
            (
                "<devices><disk type='vhostuser'><source type='unix' path='/tmp/vhost.sock'/></disk></devices>",
                "devices/disk/source",
                "allowed_paths",
            ),
            (
                "<devices><disk type='file'><source file='/srv/images/a.qcow2'><reservations managed='no'><source type='unix' path='/tmp/pr.sock' mode='client'/></reservations></source></disk></devices>",
                "devices/disk/source/source",
                "allowed_paths",
            ),
            (
                "<devices><disk type='file'><source file='/srv/images/a.qcow2'><dataStore type='file'><source file='/etc/shadow'/></dataStore></source></disk></devices>",
                "devices/disk/source/source",
                "allowed_paths",
            ),
            (
                "<devices><filesystem type='mount'><driver type='virtiofs'/><binary path='/tmp/evil'/><source dir='/srv/images/share'/><target dir='s'/></filesystem></devices>",
                "devices/filesystem/binary",
                "allow_qemu_commandline",
            ),
            (
                "<devices><filesystem type='mount'><driver type='virtiofs'/><source socket='/tmp/fs.sock'/><target dir='s'/></filesystem></devices>",
                "devices/filesystem/source",
                "allowed_paths",
            ),
            (
                "<devices><interface type='user'><backend type='passt' logFile='/etc/cron.d/x'/></interface></devices>",
                "devices/interface/backend",
                "allowed_paths",
            ),
            (
                "<devices><interface type='user'><backend type='passt'/><portForward proto='tcp'><range start='22'/></portForward></interface></devices>",
                "devices/interface/portForward",
                "allow_open_listeners",
            ),
            (
                "<devices><interface type='network'><source network='default'/><backend tap='/dev/sda'/></interface></devices>",
                "devices/interface/backend",
                "allow_hostdev",
            ),
            (
                "<devices><interface type='network'><source network='default'/><rom file='/etc/shadow'/></interface></devices>",
                "devices/interface/rom",
                "allowed_paths",
            ),
            (
                "<devices><interface type='vhostuser'><source type='unix' path='/tmp/vu.sock' mode='client'/></interface></devices>",
                "devices/interface/source",
                "allowed_paths",
            ),
            (
                "<devices><interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/></interface></devices>",
                "devices/interface",
                "allow_hostdev",
            ),
            (
                "<devices><interface type='server'><source address='0.0.0.0' port='5558'/></interface></devices>",
                "devices/interface/source",
                "allow_open_listeners",
            ),
            (
                "<devices><interface type='ethernet'><target dev='vnet0' managed='no'/></interface></devices>",
                "devices/interface/target",
                "allow_hostdev",
            ),
            // the risks: an open console, an open serial port.
            (
                "<devices><graphics type='vnc' port='-1' autoport='yes' listen='0.0.0.0'/></devices>",
                "devices/graphics",
                "allow_open_listeners",
            ),
            (
                "<devices><graphics type='spice' autoport='yes'><listen type='address' address='::'/></graphics></devices>",
                "devices/graphics",
                "allow_open_listeners",
            ),
            (
                "<devices><graphics type='egl-headless'><gl rendernode='/dev/sda'/></graphics></devices>",
                "devices/graphics/gl",
                "allow_hostdev",
            ),
            (
                "<devices><video><model type='virtio'><acceleration accel3d='yes' rendernode='/dev/nvme0'/></model></video></devices>",
                "devices/video/acceleration",
                "allow_hostdev",
            ),
            (
                "<devices><graphics type='vnc' socket='/run/libvirt/libvirt-sock'/></devices>",
                "devices/graphics",
                "shared directory",
            ),
            (
                "<devices><graphics type='spice' passwd='x'><listen type='socket' socket='/etc/x.sock'/></graphics></devices>",
                "devices/graphics/listen",
                "allowed_paths",
            ),
            (
                "<devices><console type='pty' tty='/dev/tty1'/></devices>",
                "devices/console",
                "allow_hostdev",
            ),
            (
                "<devices><interface type='udp'><source address='192.0.2.1' port='1'><local address='0.0.0.0' port='2'/></source></interface></devices>",
                "devices/interface/source",
                "allow_open_listeners",
            ),
            (
                "<devices><hostdev mode='subsystem' type='pci'><rom file='/etc/shadow'/></hostdev></devices>",
                "devices/hostdev/rom",
                "allowed_paths",
            ),
            (
                "<devices><serial type='tcp'><source mode='bind' host='0.0.0.0' service='2445'/><protocol type='telnet'/></serial></devices>",
                "devices/serial/source",
                "allow_open_listeners",
            ),
            (
                "<devices><serial type='tcp'><source mode='bind' service='2445'/></serial></devices>",
                "devices/serial/source",
                "allow_open_listeners",
            ),
            (
                "<devices><smartcard mode='host-certificates'><certificate>a</certificate><database>/etc/pki/nssdb</database></smartcard></devices>",
                "devices/smartcard/database",
                "allowed_paths",
            ),
            (
                "<devices><smartcard mode='passthrough' type='unix'><source mode='connect' path='/run/libvirt/virtlogd-sock'/></smartcard></devices>",
                "devices/smartcard/source",
                "shared directory",
            ),
            (
                "<devices><redirdev bus='usb' type='tcp'><source mode='connect' host='169.254.169.254' service='80'/></redirdev></devices>",
                "devices/redirdev/source",
                "allow_link_local_hosts",
            ),
            (
                "<devices><rng model='virtio'><backend model='egd' type='file'><source path='/etc/shadow'/></backend></rng></devices>",
                "devices/rng/backend/source",
                "allowed_paths",
            ),
            (
                "<devices><shmem name='s'><server path='/tmp/ivshmem.sock'/></shmem></devices>",
                "devices/shmem/server",
                "allowed_paths",
            ),
            (
                "<devices><memory model='nvdimm'><source><path>/etc/shadow</path></source><target><size unit='KiB'>1</size></target></memory></devices>",
                "devices/memory/source/path",
                "allowed_paths",
            ),
            (
                "<devices><audio id='1' type='file' path='/etc/cron.d/x'/></devices>",
                "devices/audio",
                "allowed_paths",
            ),
            (
                "<devices><audio id='1' type='oss'><input dev='/dev/dsp0'/></audio></devices>",
                "devices/audio",
                "allow_hostdev",
            ),
            (
                "<devices><emulator>/usr/bin/qemu-system-x86_64/../../../tmp/evil</emulator></devices>",
                "devices/emulator",
                "allow_qemu_commandline",
            ),
        ];
        for (body, field, hint) in cases {
            let got = run(body, &HostPolicy::default());
            assert!(
                got.iter().any(|(f, m)| f == field && m.contains(hint)),
                "{body}: {got:?}"
            );
            assert!(
                got.iter().all(|(_, m)| !m.chars().any(char::is_control)),
                "{got:?}"
            );
        }
        // What stays allowed: the VM's own files, loopback listeners, a password.
        let fine = "<os><nvram>/var/lib/libvirt/qemu/nvram/x_VARS.fd</nvram></os><devices>
<serial type='file'><source path='/var/log/libvirt/qemu/x-serial0.log'/></serial>
<channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/x.org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
<graphics type='vnc' port='-1' listen='127.0.0.1'/><graphics type='vnc' port='-1'/>
<graphics type='spice' autoport='yes' passwd='secret'><listen type='address' address='0.0.0.0'/></graphics>
<serial type='tcp'><source mode='bind' host='127.0.0.1' service='2445'/></serial>
<disk type='network'><source protocol='nbd' name='x'><host name='10.0.0.5'/></source></disk>
<filesystem type='mount'><driver type='virtiofs'/><binary path='/usr/libexec/virtiofsd'/><source dir='/srv/images/share'/><target dir='s'/></filesystem>
<interface type='user'><backend type='passt'/><portForward proto='tcp' address='127.0.0.1'><range start='2222' to='22'/></portForward></interface>
</devices>";
        assert_eq!(run(fine, &HostPolicy::default()), vec![]);
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
            allow_link_local_hosts: true,
            allow_open_listeners: true,
            health_commands: vec![],
            images: Default::default(),
        };
        let body = "<qemu:commandline/><seclabel type='none'/><os><kernel>/boot/vmlinuz</kernel></os><devices><hostdev/><interface type='direct'/><disk type='block'><source dev='/dev/sda'/></disk><serial type='file'><source path='/etc/cron.d/x'/></serial></devices>";
        assert_eq!(run(body, &all), vec![]);
        assert_eq!(run(body, &HostPolicy::default()).len(), 7);
    }
}
