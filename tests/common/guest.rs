//! The real Debian 12 guest of the real-guest tier: its image (built once per machine by
//! `tests/guest/build-image.sh`, which caches it by the hash of its recipe), domain XML
//! that boots it by direct kernel boot (KVM when `/dev/kvm` opens, TCG otherwise), a
//! hand-made NoCloud seed, an isolated libvirt network of the test's own, and the QEMU
//! guest agent (`virsh qemu-agent-command`): ping, run a command, read a file.
//!
//! Everything a test makes here carries its unique prefix and is removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;

use super::{output_ok, virsh_system};

/// The built image: a compressed qcow2 with an ext4 root on the whole disk, its kernel,
/// initrd and kernel command line.
#[derive(Debug)]
pub struct Image {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// `kvm` when KVM boots this kernel here, `qemu` (TCG) otherwise ([`probe_kvm`]).
    pub domain_type: &'static str,
}

fn required() -> bool {
    std::env::var_os("VMSYNC_REQUIRE_LIBVIRTD").is_some()
}

/// The guest image, built (or found in the cache) once per test process; `None` (skip,
/// with a message) when it cannot be built, unless `VMSYNC_REQUIRE_LIBVIRTD` is set:
/// then it panics.
pub fn image() -> Option<&'static Image> {
    static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
    match IMAGE.get_or_init(build_image) {
        Ok(image) => Some(image),
        Err(why) if required() => {
            panic!("VMSYNC_REQUIRE_LIBVIRTD is set but the guest image cannot be built: {why}")
        }
        Err(why) => {
            eprintln!(
                "SKIPPED: real guest: {why} (set VMSYNC_REQUIRE_LIBVIRTD=1 to make this a failure)"
            );
            None
        }
    }
}

/// Runs `tests/guest/build-image.sh` (cached: it returns at once when the recipe's
/// image is there; several processes wait for one build).
fn build_image() -> Result<Image, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build-image.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed (needs root, debootstrap and deb.debian.org the first time)",
            script.display()
        ));
    }
    // The last line: the image's directory.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    eprintln!(
        "guest image {} ready after {:.1} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    let cmdline = std::fs::read_to_string(dir.join("cmdline"))
        .map_err(|e| format!("{}: {e}", dir.join("cmdline").display()))?;
    let kernel = dir.join("vmlinuz");
    let domain_type = probe_kvm(&kernel);
    Ok(Image {
        disk: dir.join("disk.qcow2"),
        initrd: dir.join("initrd.img"),
        cmdline: cmdline.trim().to_string(),
        kernel,
        domain_type,
        dir,
    })
}

/// `kvm` when KVM boots `kernel` here, `qemu` (TCG) otherwise; `VMSYNC_GUEST_ACCEL=kvm`
/// or `=tcg` decides without trying. A `/dev/kvm` that opens is not enough: under some
/// nested hypervisors KVM runs the firmware, then resets in a loop once the kernel
/// starts. So the kernel is booted with QEMU alone, without a root (it panics at once),
/// and KVM is used when the panic shows on the serial line within 30 s.
fn probe_kvm(kernel: &Path) -> &'static str {
    match std::env::var("VMSYNC_GUEST_ACCEL").as_deref() {
        Ok("kvm") => return "kvm",
        Ok("tcg") => return "qemu",
        _ => {}
    }
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !opens {
        eprintln!("guest accelerator: TCG (/dev/kvm does not open)");
        return "qemu";
    }
    let out = Command::new("timeout")
        .args(["30", "qemu-system-x86_64", "-accel", "kvm", "-m", "128"])
        .args([
            "-nodefaults",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .output();
    let booted = out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Kernel panic"));
    if booted {
        eprintln!("guest accelerator: KVM");
        "kvm"
    } else {
        eprintln!("guest accelerator: TCG (/dev/kvm opens, but KVM did not boot the kernel)");
        "qemu"
    }
}

impl Image {
    /// How long a boot may take to reach the guest agent: far longer under TCG.
    pub fn boot_limit(&self) -> Duration {
        if self.domain_type == "kvm" {
            Duration::from_secs(120)
        } else {
            Duration::from_secs(600)
        }
    }
}

/// The kernel and initrd placed in `dir` (a disk root, where the policy lets a domain
/// name them): hard links to the cached ones where possible, else copies.
pub fn boot_files(image: &Image, dir: &Path) -> (PathBuf, PathBuf) {
    let place = |from: &Path, name: &str| {
        let to = dir.join(name);
        if std::fs::hard_link(from, &to).is_err() {
            std::fs::copy(from, &to).unwrap();
        }
        to
    };
    (
        place(&image.kernel, "vmlinuz"),
        place(&image.initrd, "initrd.img"),
    )
}

/// A qcow2 overlay at `path` on the cached image (which is never written).
pub fn overlay(image: &Image, path: &Path) {
    output_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&image.disk)
            .arg(path)
            .arg("4G"),
    );
}

/// A NoCloud seed made by hand (`genisoimage -V cidata`) at `path`, with `meta-data`
/// and `user-data` (and `network-config` when given).
pub fn hand_seed(path: &Path, meta_data: &str, user_data: &str, network_config: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("meta-data"), meta_data).unwrap();
    std::fs::write(dir.path().join("user-data"), user_data).unwrap();
    if let Some(net) = network_config {
        std::fs::write(dir.path().join("network-config"), net).unwrap();
    }
    output_ok(
        Command::new("genisoimage")
            .args(["-quiet", "-V", "cidata", "-J", "-r", "-o"])
            .arg(path)
            .arg(dir.path()),
    );
}

/// What a guest domain is made of.
pub struct GuestXml<'a> {
    pub name: &'a str,
    /// `kvm` or `qemu` ([`Image::domain_type`]).
    pub domain_type: &'a str,
    pub disk: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    /// A seed ISO attached as a read-only virtio disk (`vdb`): Debian's cloud kernel has
    /// no AHCI driver, so it never sees a SATA CD-ROM; NoCloud finds the `cidata` label
    /// on any block device.
    pub seed: Option<&'a Path>,
    /// A libvirt network for a virtio NIC (no MAC given); without: user-mode networking.
    pub network: Option<&'a str>,
    pub memory_mib: u32,
}

impl GuestXml<'_> {
    /// The domain XML: no UUID, no MAC; the guest agent channel; the serial console
    /// written to `DISK.console` beside the disk.
    pub fn xml(&self) -> String {
        let nic = match self.network {
            Some(net) => format!(
                "    <interface type='network'><source network='{net}'/><model type='virtio'/></interface>\n"
            ),
            None => "    <interface type='user'><model type='virtio'/></interface>\n".to_string(),
        };
        let seed = self.seed.map_or(String::new(), |iso| {
            format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='{}'/>\n      <target dev='vdb' bus='virtio'/>\n      <readonly/>\n    </disk>\n",
                iso.display()
            )
        });
        format!(
            r#"<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_reboot>restart</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
{seed}{nic}    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>
"#,
            kind = self.domain_type,
            name = self.name,
            memory = self.memory_mib,
            kernel = self.kernel.display(),
            initrd = self.initrd.display(),
            cmdline = self.cmdline,
            disk = self.disk.display(),
            console = console_path(self.disk).display(),
        )
    }
}

/// Where [`GuestXml`] writes the serial console of the guest whose disk is `disk`.
pub fn console_path(disk: &Path) -> PathBuf {
    disk.with_extension("console")
}

/// The last `lines` lines of the guest's console, for failure messages.
pub fn console_tail(disk: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(console_path(disk)).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `virsh qemu-agent-command DOMAIN JSON`: the `return` value, or virsh's message.
pub fn agent_command(
    domain: &str,
    command: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let (ok, out) = virsh_system(&[
        "qemu-agent-command",
        domain,
        &command.to_string(),
        "--timeout",
        "5",
    ]);
    if !ok {
        return Err(out.trim().to_string());
    }
    let reply: serde_json::Value =
        serde_json::from_str(out.trim()).map_err(|e| format!("{e}: {out}"))?;
    Ok(reply["return"].clone())
}

/// Whether the guest agent of `domain` answers `guest-ping`.
pub fn ping(domain: &str) -> bool {
    agent_command(domain, &serde_json::json!({"execute": "guest-ping"})).is_ok()
}

/// Waits until the guest agent of `domain` answers (the guest booted); prints and
/// returns how long that took from `since`. Panics after `limit` with the tail of the
/// console (`disk` is the guest's disk, see [`console_path`]).
pub fn wait_for_agent(domain: &str, since: Instant, limit: Duration, disk: &Path) -> Duration {
    while !ping(domain) {
        assert!(
            since.elapsed() < limit,
            "{domain}: the guest agent did not answer within {limit:?}; console:\n{}",
            console_tail(disk, 40)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = since.elapsed();
    eprintln!(
        "guest {domain}: its agent answered {:.1} s after the start",
        took.as_secs_f64()
    );
    took
}

/// A command's result in the guest.
#[derive(Debug)]
pub struct Exec {
    pub code: i64,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `argv` in the guest through the agent (`guest-exec`, no shell) and waits for it.
pub fn exec(domain: &str, argv: &[&str]) -> Exec {
    let started = agent_command(
        domain,
        &serde_json::json!({"execute": "guest-exec", "arguments": {
            "path": argv[0], "arg": &argv[1..], "capture-output": true}}),
    )
    .unwrap_or_else(|e| panic!("{domain}: guest-exec {argv:?}: {e}"));
    let pid = started["pid"].as_i64().expect("a pid");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = agent_command(
            domain,
            &serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
        )
        .unwrap_or_else(|e| panic!("{domain}: guest-exec-status {argv:?}: {e}"));
        if status["exited"] == true {
            return Exec {
                code: status["exitcode"].as_i64().unwrap_or(-1),
                stdout: decoded(&status["out-data"]),
                stderr: decoded(&status["err-data"]),
            };
        }
        assert!(Instant::now() < deadline, "{domain}: {argv:?} still runs");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// [`exec`], asserting exit 0; its standard output.
#[track_caller]
pub fn exec_ok(domain: &str, argv: &[&str]) -> String {
    let run = exec(domain, argv);
    assert_eq!(run.code, 0, "{domain}: {argv:?}: {run:?}");
    run.stdout
}

fn decoded(value: &serde_json::Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.as_str().unwrap_or(""))
        .unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The content of `path` in the guest (`guest-file-open`, `-read`, `-close`); `None`
/// when it cannot be opened.
pub fn read_file(domain: &str, path: &str) -> Option<Vec<u8>> {
    let handle = agent_command(
        domain,
        &serde_json::json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": "r"}}),
    )
    .ok()?;
    let mut content = Vec::new();
    loop {
        let chunk = agent_command(
            domain,
            &serde_json::json!({"execute": "guest-file-read", "arguments": {"handle": handle, "count": 65536}}),
        )
        .unwrap_or_else(|e| panic!("{domain}: guest-file-read {path}: {e}"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(chunk["buf-b64"].as_str().unwrap_or(""))
            .unwrap();
        content.extend_from_slice(&bytes);
        if chunk["eof"] == true || bytes.is_empty() {
            break;
        }
    }
    let _ = agent_command(
        domain,
        &serde_json::json!({"execute": "guest-file-close", "arguments": {"handle": handle}}),
    );
    Some(content)
}

/// An isolated libvirt network (no forward) of one test: its own bridge and /24,
/// DHCP on it; destroyed when dropped (it is transient: never defined).
pub struct TestNetwork {
    pub name: String,
    pub bridge: String,
    /// The host's address on the bridge, `10.213.N.1`.
    pub host_address: String,
    /// `10.213.N.`
    pub subnet: String,
}

impl TestNetwork {
    /// A network named `PREFIX-net`; tries free subnets until libvirt takes one.
    pub fn create(prefix: &str) -> Self {
        let pid = std::process::id();
        let name = format!("{prefix}-net");
        let mut tried = Vec::new();
        for attempt in 0..64u32 {
            let n = (pid.wrapping_add(attempt * 7) % 200) + 20;
            let bridge = format!("vsg{:x}x{attempt}", pid % 0x10000);
            let subnet = format!("10.213.{n}.");
            let xml = format!(
                "<network><name>{name}</name><bridge name='{bridge}'/>\
                 <ip address='{subnet}1' netmask='255.255.255.0'>\
                 <dhcp><range start='{subnet}100' end='{subnet}199'/></dhcp></ip></network>"
            );
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), xml).unwrap();
            let (ok, out) = virsh_system(&["net-create", &file.path().display().to_string()]);
            if ok {
                return Self {
                    name,
                    bridge,
                    host_address: format!("{subnet}1"),
                    subnet,
                };
            }
            tried.push(format!("{subnet}0/24: {}", out.trim()));
        }
        panic!("no free subnet for {name}:\n{}", tried.join("\n"));
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        virsh_system(&["net-destroy", &self.name]);
    }
}
