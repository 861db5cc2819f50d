//! Test harness shared by the integration tiers. One [`Env`] per test: a VM repository
//! committed with the real `git` ([`Repo`]), a state directory, an images directory (the
//! disk root) and a libvirt URI — `test:///default`, or `qemu:///system` with a unique
//! name prefix and a guard that removes the test's domains and files. It writes the
//! repository's `vmsync.toml` and domain XML ([`Manifest`], [`Vm`]), runs the real
//! `vmsync` binary with the matching flags or config file and checks the exit status,
//! stdout and stderr ([`Run`]), and gives the same settings to tests that call the
//! library in-process.

#![allow(dead_code)]

pub mod daemon;
pub mod events;
pub mod guest;
pub mod seeds;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;

use vmsync::agent::report::Report;
use vmsync::agent::sync::{self, SyncError};
use vmsync::config::Settings;
use vmsync::desired::desired_state::Desired;
use vmsync::host::hypervisor::{Hypervisor, Listing};
use vmsync::host::schema_test_driver::TestDriverSchema;
use vmsync::record;
use vmsync::record::store;

/// libvirt's in-process test driver: no daemon, domains live as long as the process.
pub const TEST_URI: &str = "test:///default";
/// The real libvirtd.
pub const SYSTEM_URI: &str = "qemu:///system";
/// The host name every test agent runs as (`--host`).
pub const HOST: &str = "hv1";

/// A VM repository in a temp dir, committed with the `git` CLI.
pub struct Repo {
    pub dir: tempfile::TempDir,
}

impl Repo {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = Self { dir };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `git ARGS` in the repository, asserting success; stdout.
    pub fn git(&self, args: &[&str]) -> String {
        let out = output_ok(
            Command::new("git")
                .args([
                    "-c",
                    "user.name=vmsync-test",
                    "-c",
                    "user.email=test@vmsync.invalid",
                    "-c",
                    "commit.gpgsign=false",
                ])
                .args(args)
                .current_dir(self.path()),
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn write(&self, path: &str, content: &str) -> &Self {
        let full = self.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
        self
    }

    /// The full id of `HEAD`.
    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"]).trim().to_string()
    }

    /// Commits everything and returns the full commit id.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        self.head()
    }

    /// Commits everything with an SSH signature by `key` (`git commit -S`,
    /// `gpg.format=ssh`) and returns the full commit id.
    pub fn commit_signed(&self, message: &str, key: &SigningKey) -> String {
        self.git(&["add", "-A"]);
        let signing_key = format!("user.signingKey={}", key.private.display());
        self.git(&[
            "-c",
            "gpg.format=ssh",
            "-c",
            &signing_key,
            "commit",
            "-q",
            "-S",
            "--allow-empty",
            "-m",
            message,
        ]);
        self.head()
    }
}

/// One `[[vm]]` of a manifest and the domain XML file it names.
#[derive(Clone)]
pub struct Vm {
    pub name: String,
    file: String,
    keys: Vec<String>,
    disks: Vec<Vec<String>>,
    xml: Option<String>,
}

impl Vm {
    /// `name`, its XML at `vms/NAME.xml` (not written unless [`Vm::xml`] gives it), no
    /// other keys, no disk.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            file: format!("vms/{name}.xml"),
            keys: Vec::new(),
            disks: Vec::new(),
            xml: None,
        }
    }

    /// The XML file's path in the repository (`xml = "…"`).
    pub fn file(mut self, path: &str) -> Self {
        self.file = path.to_string();
        self
    }

    /// A `key = value` line (or several) after `name` and `xml`, as written.
    pub fn key(mut self, line: &str) -> Self {
        self.keys.push(line.to_string());
        self
    }

    /// A `[[vm.disk]]` with `path` and `size`.
    pub fn disk(mut self, path: &Path, size: &str) -> Self {
        self.disks.push(vec![
            format!("path = \"{}\"", path.display()),
            format!("size = \"{size}\""),
        ]);
        self
    }

    /// A `key = value` line of the last disk.
    pub fn disk_key(mut self, line: &str) -> Self {
        self.disks
            .last_mut()
            .expect("a disk to add the key to")
            .push(line.to_string());
        self
    }

    /// The content of the XML file (written with the manifest).
    pub fn xml(mut self, text: &str) -> Self {
        self.xml = Some(text.to_string());
        self
    }

    /// The XML with every `from` replaced by `to`.
    pub fn edit_xml(mut self, from: &str, to: &str) -> Self {
        let xml = self.xml.as_deref().expect("an xml to edit");
        self.xml = Some(xml.replace(from, to));
        self
    }

    /// No XML file is written (the repository keeps whatever is there).
    pub fn keep_file(mut self) -> Self {
        self.xml = None;
        self
    }

    /// The XML with an element libvirt's schema does not know (`<vcpux>`).
    pub fn schema_bad(self) -> Self {
        self.edit_xml("<vcpu>", "<vcpux>")
            .edit_xml("</vcpu>", "</vcpux>")
    }
}

/// A `vmsync.toml`: directories and VMs, in the layout users write.
#[derive(Clone, Default)]
pub struct Manifest {
    directories: Vec<PathBuf>,
    vms: Vec<Vm>,
}

impl Manifest {
    pub fn new() -> Self {
        Self::default()
    }

    /// A `[[directory]]`.
    pub fn directory(mut self, path: &Path) -> Self {
        self.directories.push(path.to_path_buf());
        self
    }

    pub fn vm(mut self, vm: Vm) -> Self {
        self.vms.push(vm);
        self
    }

    pub fn vms(mut self, vms: impl IntoIterator<Item = Vm>) -> Self {
        self.vms.extend(vms);
        self
    }

    /// The manifest's text. The first VM's first key is on line 6, or line 9 after one
    /// directory.
    pub fn toml(&self) -> String {
        let mut m = "version = 1\n".to_string();
        for dir in &self.directories {
            m += &format!("\n[[directory]]\npath = \"{}\"\n", dir.display());
        }
        for vm in &self.vms {
            m += &format!("\n[[vm]]\nname = \"{}\"\nxml = \"{}\"\n", vm.name, vm.file);
            for key in &vm.keys {
                m += &format!("{key}\n");
            }
            for disk in &vm.disks {
                m += "\n  [[vm.disk]]\n";
                for line in disk {
                    m += &format!("  {line}\n");
                }
            }
        }
        m
    }

    /// Writes `vmsync.toml` and the VMs' XML files into `repo`.
    pub fn write(&self, repo: &Repo) {
        repo.write("vmsync.toml", &self.toml());
        for vm in &self.vms {
            if let Some(xml) = &vm.xml {
                repo.write(&vm.file, xml);
            }
        }
    }
}

/// The result of one `vmsync` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts the exit status (a signal is -1).
    #[track_caller]
    pub fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "exit status\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn stdout_has(&self, text: &str) -> &Self {
        contains("stdout", &self.stdout, text, true);
        self
    }

    #[track_caller]
    pub fn stdout_lacks(&self, text: &str) -> &Self {
        contains("stdout", &self.stdout, text, false);
        self
    }

    #[track_caller]
    pub fn stderr_has(&self, text: &str) -> &Self {
        contains("stderr", &self.stderr, text, true);
        self
    }

    #[track_caller]
    pub fn stderr_lacks(&self, text: &str) -> &Self {
        contains("stderr", &self.stderr, text, false);
        self
    }
}

/// Asserts that `output` (stdout or stderr, by `name`) holds `text`, or not.
#[track_caller]
fn contains(name: &str, output: &str, text: &str, expected: bool) {
    let verb = if expected {
        "expected"
    } else {
        "did not expect"
    };
    assert!(
        output.contains(text) == expected,
        "{verb} {text:?} in {name}:\n{output}"
    );
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// The real binary with plain logs and nothing of the caller's environment that changes
/// what it does (journald, fail points).
pub fn vmsync_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmsync"));
    cmd.env("NO_COLOR", "1")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("FAILPOINTS");
    cmd
}

/// Runs the real binary with `args` and no config file unless `args` name one.
pub fn vmsync(args: &[&str]) -> Run {
    // No host config leaks into tests: an empty config unless the test gives one.
    let config: &[&str] = if args.contains(&"--config") {
        &[]
    } else {
        &["--config", "/dev/null"]
    };
    vmsync_command()
        .args(config)
        .args(args)
        .output()
        .unwrap()
        .into()
}

/// Who removes the images directory.
enum Images {
    Temp(tempfile::TempDir),
    System(SystemCleanup),
}

/// One test's world: repository, state directory, images directory and libvirt URI.
pub struct Env {
    pub repo: Repo,
    pub state: tempfile::TempDir,
    /// The disk root (`--disk-root`).
    pub images: PathBuf,
    pub uri: String,
    /// Before every VM name of a `qemu:///system` test (`prefix-NAME`); empty on the
    /// test driver.
    pub prefix: String,
    /// Flags added to every run.
    pub flags: Vec<String>,
    /// The agent config file of every run (`--config`); `None`: `/dev/null`. For the
    /// `[policy]` keys that have no flag (flags still win over it).
    pub config_file: Option<PathBuf>,
    owner: Images,
}

impl Env {
    /// On `test:///default`, with an empty repository and a temp images directory.
    pub fn new() -> Self {
        let images = tempfile::tempdir().unwrap();
        Self {
            repo: Repo::new(),
            state: tempfile::tempdir().unwrap(),
            images: images.path().to_path_buf(),
            uri: TEST_URI.to_string(),
            prefix: String::new(),
            flags: Vec::new(),
            config_file: None,
            owner: Images::Temp(images),
        }
    }

    /// On `qemu:///system` with the unique prefix of `test` and its images directory
    /// under `/var/lib/libvirt/images` (readable by QEMU); removed with the prefixed
    /// domains when the env is dropped. `None` (skip) without a reachable libvirtd,
    /// unless `VMSYNC_REQUIRE_LIBVIRTD` is set: then it panics.
    pub fn system(test: &str) -> Option<Self> {
        if !libvirtd_available() {
            return None;
        }
        let (prefix, images, cleanup) = scratch(test);
        Some(Self {
            repo: Repo::new(),
            state: tempfile::tempdir().unwrap(),
            images,
            uri: SYSTEM_URI.to_string(),
            prefix,
            flags: Vec::new(),
            config_file: None,
            owner: Images::System(cleanup),
        })
    }

    /// The guard of a `qemu:///system` env.
    pub fn cleanup(&self) -> &SystemCleanup {
        match &self.owner {
            Images::System(cleanup) => cleanup,
            Images::Temp(_) => panic!("only a qemu:///system env has a cleanup guard"),
        }
    }

    /// The domain name of `short` (with the prefix on `qemu:///system`).
    pub fn name(&self, short: &str) -> String {
        if self.prefix.is_empty() {
            short.to_string()
        } else {
            format!("{}-{short}", self.prefix)
        }
    }

    /// `IMAGES/NAME.qcow2`.
    pub fn disk(&self, short: &str) -> PathBuf {
        self.images.join(format!("{}.qcow2", self.name(short)))
    }

    /// `kvm` where it runs (the test driver takes any type), TCG (`qemu`) otherwise.
    pub fn domain_type(&self) -> &'static str {
        if self.uri == TEST_URI || Path::new("/dev/kvm").exists() {
            "kvm"
        } else {
            "qemu"
        }
    }

    /// The BIOS guest `short` with its disk and `memory_mib` (see [`bios_xml`]).
    pub fn bios(&self, short: &str, memory_mib: u32) -> String {
        bios_xml(
            &self.name(short),
            self.domain_type(),
            &self.disk(short),
            memory_mib,
        )
    }

    /// The VM `short`: a BIOS guest with 128 MiB, at `vms/NAME.xml`, with one 64M
    /// disk `IMAGES/NAME.qcow2`.
    pub fn vm(&self, short: &str) -> Vm {
        Vm::new(&self.name(short))
            .disk(&self.disk(short), "64M")
            .xml(&self.bios(short, 128))
    }

    /// Writes the manifest and its XML files, then commits; the commit id.
    pub fn commit(&self, manifest: &Manifest, message: &str) -> String {
        manifest.write(&self.repo);
        self.repo.commit(message)
    }

    /// `--url --state-dir --connect --disk-root --host`, then [`Env::flags`].
    pub fn args(&self) -> Vec<String> {
        self.args_at(&self.repo.path().display().to_string(), &self.uri)
    }

    /// [`Env::args`] with another repository URL and libvirt URI.
    fn args_at(&self, url: &str, uri: &str) -> Vec<String> {
        let mut args: Vec<String> = [
            "--url",
            url,
            "--state-dir",
            &self.state.path().display().to_string(),
            "--connect",
            uri,
            "--disk-root",
            &self.images.display().to_string(),
            "--host",
            HOST,
        ]
        .map(String::from)
        .into();
        args.extend(self.flags.iter().cloned());
        args
    }

    /// The real binary with `extra` then [`Env::args`], not yet run (to set its
    /// environment or spawn it).
    pub fn command(&self, extra: &[&str]) -> Command {
        self.command_at(extra, None, None)
    }

    /// [`Env::command`] with another repository URL or libvirt URI.
    pub fn command_at(&self, extra: &[&str], url: Option<&str>, uri: Option<&str>) -> Command {
        let repo = self.repo.path().display().to_string();
        let mut cmd = vmsync_command();
        let config = self
            .config_file
            .as_deref()
            .unwrap_or(Path::new("/dev/null"));
        cmd.arg("--config")
            .arg(config)
            .args(extra)
            .args(self.args_at(url.unwrap_or(&repo), uri.unwrap_or(&self.uri)));
        cmd
    }

    /// [`Env::run`] with another repository URL or libvirt URI.
    pub fn run_at(&self, extra: &[&str], url: Option<&str>, uri: Option<&str>) -> Run {
        self.command_at(extra, url, uri).output().unwrap().into()
    }

    /// Runs the real binary with `extra` then [`Env::args`].
    pub fn run(&self, extra: &[&str]) -> Run {
        self.command(extra).output().unwrap().into()
    }

    /// `vmsync status --json`, which must succeed.
    pub fn status(&self) -> serde_json::Value {
        let run = self.run(&["status", "--json"]).expect(0);
        serde_json::from_str(&run.stdout).unwrap()
    }

    /// The entry of `short` in [`Env::status`].
    pub fn vm_status(&self, short: &str) -> serde_json::Value {
        let name = self.name(short);
        self.status()["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} not in status"))
            .clone()
    }

    /// The record in the state directory.
    pub fn record(&self) -> record::Record {
        store::load(self.state.path()).unwrap()
    }

    /// The record file's text, if there is one.
    pub fn state_json(&self) -> Option<String> {
        std::fs::read_to_string(self.state.path().join(store::STATE_FILE)).ok()
    }

    /// The agent config file that says what [`Env::args`] say, with `agent` lines added
    /// to its `[agent]` table (the last one).
    pub fn config(&self, agent: &str) -> String {
        format!(
            "[source]\nurl = \"{}\"\n[libvirt]\nuri = \"{}\"\n[policy]\ndisk_roots = [\"{}\"]\n\
             [agent]\nstate_dir = \"{}\"\nhost = \"{HOST}\"\n{agent}",
            self.repo.path().display(),
            self.uri,
            self.images.display(),
            self.state.path().display(),
        )
    }

    /// The settings [`Env::args`] give (through the real config loader, with an empty
    /// config file), for tests that call the library in-process.
    pub fn settings(&self) -> Settings {
        vmsync::config::load(&vmsync::config::Overrides {
            config: Some("/dev/null".into()),
            url: Some(self.repo.path().display().to_string()),
            state_dir: Some(self.state.path().to_path_buf()),
            connect: Some(self.uri.clone()),
            host: Some(HOST.into()),
            disk_roots: vec![self.images.clone()],
            ..Default::default()
        })
        .unwrap()
    }

    /// `virsh -c qemu:///system dumpxml --inactive NAME`.
    pub fn inactive(&self, short: &str) -> String {
        virsh_system_ok(&["dumpxml", "--inactive", &self.name(short)])
    }

    pub fn domstate(&self, short: &str) -> String {
        virsh_system_ok(&["domstate", &self.name(short)])
    }

    pub fn domid(&self, short: &str) -> String {
        virsh_system_ok(&["domid", &self.name(short)])
    }

    pub fn autostart(&self, short: &str) -> bool {
        virsh_system_ok(&["dominfo", &self.name(short)])
            .lines()
            .any(|l| l.starts_with("Autostart:") && l.ends_with("enable"))
    }

    pub fn defined(&self, short: &str) -> bool {
        virsh_system(&["domuuid", &self.name(short)]).0
    }
}

/// Fetches the head of `settings`' repository in this process and validates it
/// (libvirt's schema through the test driver): the commit id and what it wants.
pub fn validate_head(settings: &Settings) -> Result<(String, Desired), SyncError> {
    let fetched =
        vmsync::repo::source::fetch(&settings.source().unwrap(), &settings.state_dir).unwrap();
    let commit = fetched.id();
    let policy = sync::policy(settings);
    let desired = sync::validate_commit(
        &fetched,
        &commit,
        &policy,
        &TestDriverSchema::new().unwrap(),
    )?;
    Ok((commit, desired))
}

/// One sync of the head of `settings`' repository in this process: [`validate_head`],
/// then apply on `hv` with `record`.
pub fn sync_head(
    settings: &Settings,
    record: &mut record::Record,
    hv: &dyn Hypervisor,
) -> Result<Report, SyncError> {
    let (commit, desired) = validate_head(settings)?;
    let env = sync::Env {
        settings,
        hv,
        disks: &vmsync::host::disk::QemuImg::default(),
        cancel: &AtomicBool::new(false),
        events: None,
    };
    sync::apply_commit(&env, record, &commit, &desired)
}

/// Options of an in-process `sync::run`: not stopped, no rewind.
pub fn options(cancel: &AtomicBool) -> sync::Options<'_> {
    sync::Options {
        give_up_after: None,
        cancel,
        allow_rewind: false,
        retry: &[],
        events: None,
    }
}

/// The domain `name` as `hv` lists it.
pub fn listing(hv: &dyn Hypervisor, name: &str) -> Option<Listing> {
    hv.list().unwrap().into_iter().find(|d| d.name == name)
}

/// What was done for `name` in a sync's report.
pub fn done(report: &Report, name: &str) -> Vec<String> {
    report
        .outcome
        .vms
        .iter()
        .find(|vm| vm.name == name)
        .unwrap_or_else(|| panic!("{name} not in the report"))
        .done
        .clone()
}

/// sha256 of a file's content, for "left untouched" checks.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// `qemu-img info` of an image, as JSON (`-U`: a running guest may hold it).
pub fn qemu_img_info(path: &Path) -> serde_json::Value {
    let out = output_ok(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(path),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `cmd`, asserting that it succeeds; its output.
#[track_caller]
pub fn output_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A minimal domain XML (no uuid, one user-mode NIC without MAC) with one qcow2 disk.
pub fn bios_xml(name: &str, domain_type: &str, disk: &Path, memory_mib: u32) -> String {
    format!(
        r#"<domain type='{domain_type}'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
{devices}</domain>
"#,
        devices = devices_xml(&disk.display().to_string(), "")
    )
}

/// The `<devices>` of the test guests: one qcow2 disk at `disk` (vda, virtio), one
/// user-mode NIC without MAC, `extra` (whole lines), VNC on 127.0.0.1.
pub fn devices_xml(disk: &str, extra: &str) -> String {
    format!(
        r#"  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
{extra}    <graphics type='vnc' listen='127.0.0.1'/>
  </devices>
"#
    )
}

/// A UEFI (secure boot) + TPM 2.0 q35 guest under TCG, without uuid or MAC.
pub fn uefi_tpm_xml(name: &str, disk: &Path) -> String {
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader secure='yes'/>
  </os>
  <features><acpi/><apic/><smm state='on'/></features>
{devices}</domain>
"#,
        devices = devices_xml(
            &disk.display().to_string(),
            "    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\n"
        )
    )
}

/// A domain defined straight into libvirt's test driver, as an operator would by hand
/// (no vmsync tag).
pub fn hand_made_xml(name: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name><memory>131072</memory><os><type>hvm</type></os></domain>"
    )
}

/// A unique name prefix for this test process.
/// Whether `name` is one of the test's with `prefix` (`vmsynctest-PID-adopt-uefi`): the
/// prefix and a dash, so that test `adopt`'s cleanup never takes test `adoptchg`'s
/// domains (it did, mid-test, when both ran at once).
pub fn owned_by(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('-'))
}

fn prefix(test: &str) -> String {
    format!("vmsynctest-{}-{test}", std::process::id())
}

/// Whether a real libvirtd answers at `qemu:///system`; panics when it must
/// (`VMSYNC_REQUIRE_LIBVIRTD` set) and does not, else prints a skip message.
pub fn libvirtd_available() -> bool {
    let ok = Command::new("virsh")
        .args(["-c", SYSTEM_URI, "uri"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("VMSYNC_REQUIRE_LIBVIRTD").is_some() {
            panic!(
                "VMSYNC_REQUIRE_LIBVIRTD is set but qemu:///system is not reachable (run scripts/setup-host.sh)"
            );
        }
        eprintln!(
            "SKIPPED: no libvirtd at qemu:///system (set VMSYNC_REQUIRE_LIBVIRTD=1 to make this a failure)"
        );
    }
    ok
}

/// `virsh -c qemu:///system ARGS`: success and stdout+stderr.
pub fn virsh_system(args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .args(["-c", SYSTEM_URI])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Like [`virsh_system`], asserting success; trimmed output.
pub fn virsh_system_ok(args: &[&str]) -> String {
    let (ok, out) = virsh_system(args);
    assert!(ok, "virsh {args:?}: {out}");
    out.trim().to_string()
}

/// Removes, when dropped, every `qemu:///system` domain with the prefix (with NVRAM and
/// TPM state), the images directory and any extra paths (NVRAM/TPM state that pruning
/// A unique name prefix for `test`, its images directory under
/// `/var/lib/libvirt/images` (created, readable by QEMU) and the guard that removes both
/// the prefixed `qemu:///system` domains and the directory.
pub fn scratch(test: &str) -> (String, PathBuf, SystemCleanup) {
    let prefix = prefix(test);
    let images = PathBuf::from("/var/lib/libvirt/images").join(&prefix);
    let cleanup = SystemCleanup::new(&prefix, &images);
    std::fs::create_dir_all(&images).unwrap();
    (prefix, images, cleanup)
}

/// deliberately kept).
pub struct SystemCleanup {
    prefix: String,
    images: PathBuf,
    extra: std::cell::RefCell<Vec<PathBuf>>,
}

impl SystemCleanup {
    fn new(prefix: &str, images: &Path) -> Self {
        Self {
            prefix: prefix.to_string(),
            images: images.to_path_buf(),
            extra: Default::default(),
        }
    }

    pub fn also_remove(&self, path: PathBuf) {
        self.extra.borrow_mut().push(path);
    }
}

impl Drop for SystemCleanup {
    fn drop(&mut self) {
        let (_, names) = virsh_system(&["list", "--all", "--name"]);
        for name in names
            .lines()
            .map(str::trim)
            .filter(|n| owned_by(n, &self.prefix))
        {
            virsh_system(&["destroy", name]);
            virsh_system(&["undefine", name, "--nvram", "--tpm"]);
        }
        let _ = std::fs::remove_dir_all(&self.images);
        for path in self.extra.borrow().iter() {
            let _ = std::fs::remove_dir_all(path);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An SSH key pair made with `ssh-keygen` for signing commits.
pub struct SigningKey {
    pub dir: tempfile::TempDir,
    /// The private key file (`user.signingKey`).
    pub private: PathBuf,
    /// The public key line (`ssh-ed25519 AAAA… comment`).
    pub public: String,
}

impl SigningKey {
    /// `kind`: "ed25519", "ecdsa" or "rsa".
    pub fn new(kind: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("key");
        output_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", kind, "-N", "", "-C", "signer", "-f"])
                .arg(&private),
        );
        let public = std::fs::read_to_string(private.with_extension("pub"))
            .unwrap()
            .trim()
            .to_string();
        Self {
            dir,
            private,
            public,
        }
    }

    /// Writes an allowed signers file with `lines` and returns its path.
    pub fn allowed_signers(dir: &Path, lines: &[String]) -> PathBuf {
        let path = dir.join("allowed_signers");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    }
}

/// A `qemu-img` that takes `seconds` to create an image (then runs the real one), and
/// leaves a file `create-started.PID` in `dir` when a create starts: something slow in flight to stop at.
pub fn slow_qemu_img(dir: &Path, seconds: u32) -> PathBuf {
    let real = Command::new("sh")
        .args(["-c", "command -v qemu-img"])
        .output()
        .unwrap();
    let real = String::from_utf8(real.stdout).unwrap().trim().to_string();
    assert!(!real.is_empty(), "qemu-img not found");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let source = dir.join("qemu-img.sh");
    std::fs::write(
        &source,
        format!(
            "#!/bin/sh\nif [ \"$1\" = create ]; then touch '{}/create-started.'$$; sleep {seconds}; fi\nexec '{real}' \"$@\"\n",
            dir.display()
        ),
    )
    .unwrap();
    // Written by a child: a file this process holds open for writing would be inherited
    // by a child another test thread forks, and executing it fail with ETXTBSY.
    let ok = Command::new("install")
        .args(["-m", "755"])
        .arg(&source)
        .arg(bin.join("qemu-img"))
        .status()
        .unwrap()
        .success();
    assert!(ok);
    bin
}

/// Copies the files of `from` into `to` (an import's output, or a corpus case, into a
/// test's repository).
pub fn copy_tree(from: &Path, to: &Path) {
    copy_tree_except(from, to, &[]);
}

/// [`copy_tree`], leaving out the entries named in `skip` (at any depth).
pub fn copy_tree_except(from: &Path, to: &Path, skip: &[&str]) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_tree_except(&entry.path(), &target, skip);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
