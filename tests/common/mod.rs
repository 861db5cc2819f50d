//! Test harness shared by the integration tiers: a temp VM repository built with the
//! real `git`, and a runner for the real `vmsync` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=vmsync-test",
                "-c",
                "user.email=test@vmsync.invalid",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(self.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn write(&self, path: &str, content: &str) -> &Self {
        let full = self.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
        self
    }

    /// Commits everything and returns the full commit id.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        self.git(&["rev-parse", "HEAD"]).trim().to_string()
    }
}

/// The result of one `vmsync` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "exit status\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
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

/// Runs the real binary with `args`, no config file, plain logs.
pub fn vmsync(args: &[&str]) -> Run {
    // No host config leaks into tests: an empty config unless the test gives one.
    let config: &[&str] = if args.contains(&"--config") {
        &[]
    } else {
        &["--config", "/dev/null"]
    };
    Command::new(env!("CARGO_BIN_EXE_vmsync"))
        .args(config)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap()
        .into()
}

/// `vmsync status --json` as a JSON value.
pub fn status_json(common: &[&str]) -> serde_json::Value {
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(common);
    let run = vmsync(&args).expect(0);
    serde_json::from_str(&run.stdout).unwrap()
}

/// sha256 of a file's content, for "left untouched" checks.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// A minimal domain XML (no uuid, one user-mode NIC without MAC) with one qcow2 disk.
pub fn bios_xml(name: &str, domain_type: &str, disk: &Path, memory_mib: u32) -> String {
    format!(
        r#"<domain type='{domain_type}'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <graphics type='vnc' listen='127.0.0.1'/>
  </devices>
</domain>
"#,
        disk = disk.display()
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
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <graphics type='vnc' listen='127.0.0.1'/>
  </devices>
</domain>
"#,
        disk = disk.display()
    )
}

/// A unique name prefix for this test process.
pub fn prefix(test: &str) -> String {
    format!("vmsynctest-{}-{test}", std::process::id())
}

/// A unique name prefix for `test`, its images directory (created) and the guard that
/// removes both the prefixed `qemu:///system` domains and the directory.
pub fn scratch(test: &str) -> (String, PathBuf, SystemCleanup) {
    let prefix = prefix(test);
    let images = images_dir(&prefix);
    let cleanup = SystemCleanup::new(&prefix, &images);
    std::fs::create_dir_all(&images).unwrap();
    (prefix, images, cleanup)
}

pub fn images_dir(prefix: &str) -> PathBuf {
    PathBuf::from("/var/lib/libvirt/images").join(prefix)
}

/// Whether a real libvirtd answers at `qemu:///system`; panics when it must
/// (`VMSYNC_REQUIRE_LIBVIRTD` set) and does not, else prints a skip message.
pub fn libvirtd_available() -> bool {
    let ok = Command::new("virsh")
        .args(["-c", "qemu:///system", "uri"])
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
        .args(["-c", "qemu:///system"])
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
/// deliberately kept).
pub struct SystemCleanup {
    pub prefix: String,
    pub images: PathBuf,
    pub extra: std::cell::RefCell<Vec<PathBuf>>,
}

impl SystemCleanup {
    pub fn new(prefix: &str, images: &Path) -> Self {
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
            .filter(|n| n.starts_with(&self.prefix))
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
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-C", "signer", "-f"])
            .arg(&private)
            .output()
            .unwrap();
        assert!(out.status.success(), "ssh-keygen: {out:?}");
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

impl Repo {
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
        self.git(&["rev-parse", "HEAD"]).trim().to_string()
    }
}

/// Agent settings as the flags `--url --state-dir --connect --host hv1 --disk-root` give
/// them (through the real config loader, with an empty config file).
pub fn settings(url: &Path, state: &Path, images: &Path, uri: &str) -> vmsync::config::Settings {
    vmsync::config::load(&vmsync::config::Overrides {
        config: Some("/dev/null".into()),
        url: Some(url.display().to_string()),
        state_dir: Some(state.to_path_buf()),
        connect: Some(uri.to_string()),
        host: Some("hv1".into()),
        disk_roots: vec![images.to_path_buf()],
        ..Default::default()
    })
    .unwrap()
}
