//! Faults: the machine, the network or libvirt misbehaves during a sync. Each case gives
//! its documented exit status and a clear message, loses nothing, and the next run
//! recovers. The real binary against `test:///default` (and `qemu:///system` for a crash
//! after a define, where the domain outlives the process).
//!
//! Crashes use fail points (`cargo test --features failpoints --test faults`; without
//! the feature those tests are not compiled) and `kill -9` of the real process.
//! The read-only and full disk root cases mount a bind mount / tmpfs, which needs root
//! with CAP_SYS_ADMIN; elsewhere they skip with a message.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Repo, bios_xml};
use vmsync::agent::state::{self, SyncResult};

struct Env {
    name: String,
    repo: Repo,
    images: PathBuf,
    _images_dir: tempfile::TempDir,
    state: tempfile::TempDir,
    uri: String,
}

impl Env {
    fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        Self::at(name, dir, images, "test:///default")
    }

    fn at(name: &str, dir: tempfile::TempDir, images: PathBuf, uri: &str) -> Self {
        let env = Env {
            name: name.to_string(),
            repo: Repo::new(),
            images,
            _images_dir: dir,
            state: tempfile::tempdir().unwrap(),
            uri: uri.to_string(),
        };
        env.write_vm(128);
        env.repo.commit("initial");
        env
    }

    fn write_vm(&self, memory: u32) {
        self.repo.write(
            "vmsync.toml",
            &format!(
                "version = 1\n\n[[vm]]\nname = \"{n}\"\nxml = \"vms/{n}.xml\"\n\n  [[vm.disk]]\n  path = \"{d}\"\n  size = \"64M\"\n",
                n = self.name,
                d = self.disk().display()
            ),
        );
        let domain_type = if self.uri.starts_with("test") {
            "kvm"
        } else {
            "qemu"
        };
        self.repo.write(
            &format!("vms/{}.xml", self.name),
            &bios_xml(&self.name, domain_type, &self.disk(), memory),
        );
    }

    fn disk(&self) -> PathBuf {
        self.images.join(format!("{}.qcow2", self.name))
    }

    fn tmp_disk(&self) -> PathBuf {
        self.images.join(format!(".{}.qcow2.vmsync-tmp", self.name))
    }

    fn command(&self, url: Option<&str>, uri: Option<&str>) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmsync"));
        cmd.args(["--config", "/dev/null", "--once", "--url"])
            .arg(url.map_or_else(|| self.repo.path().to_path_buf(), PathBuf::from))
            .arg("--state-dir")
            .arg(self.state.path())
            .args(["--connect", uri.unwrap_or(&self.uri)])
            .arg("--disk-root")
            .arg(&self.images)
            .args(["--host", "hv1"])
            .env_remove("FAILPOINTS")
            .env_remove("JOURNAL_STREAM");
        cmd
    }

    fn run(&self) -> common::Run {
        self.command(None, None).output().unwrap().into()
    }

    fn record(&self) -> state::Record {
        state::load(self.state.path()).unwrap()
    }

    fn head(&self) -> String {
        self.repo.git(&["rev-parse", "HEAD"]).trim().to_string()
    }

    /// The next run converges: exit 0, the head applied, the disk a sound qcow2 image.
    fn recovers(&self) {
        self.run().expect(0);
        assert_eq!(
            self.record().last_applied_commit.as_deref(),
            Some(self.head().as_str())
        );
        let check = Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(self.disk())
            .output()
            .unwrap();
        assert!(check.status.success(), "qemu-img check: {check:?}");
    }
}

fn contains(run: &common::Run, text: &str) {
    assert!(
        run.stderr.contains(text),
        "expected {text:?} in:\n{}",
        run.stderr
    );
}

#[test]
fn qemu_img_missing_fails_the_vm_and_the_next_run_recovers() {
    let env = Env::new("f-noimg");
    let empty = tempfile::tempdir().unwrap();
    let run: common::Run = env
        .command(None, None)
        .env("PATH", empty.path())
        .output()
        .unwrap()
        .into();
    let run = run.expect(1);
    contains(
        &run,
        "qemu-img not found at 'qemu-img' (is qemu-utils installed?)",
    );
    contains(&run, "1 of 1 vms failed at commit");
    let record = env.record();
    assert_eq!(record.last_result, Some(SyncResult::Failed));
    assert!(!record.vms[&env.name].ok);
    assert!(
        record.vms[&env.name]
            .last_error
            .as_deref()
            .unwrap()
            .contains("qemu-img not found"),
        "{record:?}"
    );
    assert_eq!(record.last_applied_commit, None);
    assert!(!env.disk().exists() && !env.tmp_disk().exists());
    env.recovers();
}

#[test]
fn libvirt_unreachable_exits_1_before_touching_disks() {
    let env = Env::new("f-nolibvirt");
    let run: common::Run = env
        .command(
            None,
            Some("qemu+unix:///system?socket=/nonexistent/libvirt-sock"),
        )
        .output()
        .unwrap()
        .into();
    let run = run.expect(1);
    contains(
        &run,
        "failed to connect to libvirt at 'qemu+unix:///system?socket=/nonexistent/libvirt-sock'",
    );
    assert_eq!(env.record().last_result, Some(SyncResult::Failed));
    assert!(!env.disk().exists(), "nothing is made without libvirt");
    env.recovers();
}

#[test]
fn an_unreachable_git_server_exits_4_and_the_next_run_recovers() {
    let env = Env::new("f-nogit");
    // A port that was free a moment ago: nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/vms.git");
    let run: common::Run = env.command(Some(&url), None).output().unwrap().into();
    let run = run.expect(4);
    contains(&run, &format!("failed to fetch branch 'main' from '{url}'"));
    assert_eq!(env.record().last_result, Some(SyncResult::FetchFailed));
    env.recovers();
}

#[test]
fn a_git_server_answering_garbage_exits_4() {
    let env = Env::new("f-junk");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let junk: &[u8] = match i % 2 {
                0 => b"HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\nContent-Length: 20\r\n\r\n\x00\xffgarbage\x01\x02\x03zzzzzzzz",
                _ => b"\x16\x03\x01 this is not http at all\r\n\r\n",
            };
            let _ = stream.write_all(junk);
        }
    });
    let url = format!("http://127.0.0.1:{port}/vms.git");
    for _ in 0..2 {
        let run: common::Run = env.command(Some(&url), None).output().unwrap().into();
        let run = run.expect(4);
        contains(&run, &format!("failed to fetch branch 'main' from '{url}'"));
    }
    assert_eq!(env.record().last_result, Some(SyncResult::FetchFailed));
    env.recovers();
}

/// A mount at `path`, undone when dropped.
struct Mount(PathBuf);

impl Mount {
    fn run(args: &[&str], path: &Path) -> bool {
        Command::new("mount")
            .args(args)
            .arg(path)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_or_skip(args: &[&str], path: &Path) -> Option<Mount> {
    if Mount::run(args, path) {
        Some(Mount(path.to_path_buf()))
    } else {
        eprintln!("SKIPPED: cannot mount here (needs root with CAP_SYS_ADMIN)");
        None
    }
}

#[test]
fn a_read_only_disk_root_fails_the_vm_and_the_next_run_recovers() {
    let env = Env::new("f-rofs");
    let Some(_mount) = mount_or_skip(&["--bind", env.images.to_str().unwrap()], &env.images) else {
        return;
    };
    assert!(Mount::run(&["-o", "remount,bind,ro"], &env.images));
    let run = env.run().expect(1);
    contains(&run, "Read-only file system");
    contains(&run, &format!("'{}'", env.disk().display()));
    assert!(!env.record().vms[&env.name].ok);
    assert!(!env.disk().exists() && !env.tmp_disk().exists());
    assert!(Mount::run(&["-o", "remount,bind,rw"], &env.images));
    env.recovers();
}

#[test]
fn a_full_disk_root_fails_the_vm_leaves_no_partial_image_and_recovers() {
    let env = Env::new("f-full");
    let Some(_mount) = mount_or_skip(&["-t", "tmpfs", "-o", "size=64k", "tmpfs"], &env.images)
    else {
        return;
    };
    let run = env.run().expect(1);
    contains(&run, "No space left on device");
    let record = env.record();
    assert_eq!(record.last_result, Some(SyncResult::Failed));
    assert!(!env.disk().exists(), "no half-made image at the real path");
    assert!(!env.tmp_disk().exists(), "the temporary image is removed");
    assert!(Mount::run(&["-o", "remount,size=16m"], &env.images));
    env.recovers();
}

#[cfg(feature = "failpoints")]
mod crashes {
    use super::*;

    fn crash_at(env: &Env, point: &str) {
        let out = env
            .command(None, None)
            .env("FAILPOINTS", format!("{point}=return"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            None,
            "killed by SIGABRT, not exited: {stderr}"
        );
        assert!(
            stderr.contains(&format!("fail point '{point}' reached")),
            "{stderr}"
        );
    }

    #[test]
    fn crash_with_the_temporary_image_made_leaves_nothing_at_the_real_path() {
        let env = Env::new("f-crash-tmp");
        crash_at(&env, "disk-temp-created");
        assert!(
            env.tmp_disk().exists(),
            "the crash left the temporary image"
        );
        assert!(!env.disk().exists(), "but nothing at the real path");
        assert_eq!(env.record(), state::Record::default(), "no record written");
        env.recovers();
        assert!(
            !env.tmp_disk().exists(),
            "the stale temporary image was removed"
        );
    }

    #[test]
    fn crash_right_after_the_link_keeps_the_complete_image() {
        let env = Env::new("f-crash-link");
        crash_at(&env, "disk-linked");
        assert!(env.disk().exists());
        env.recovers();
    }

    #[test]
    fn crash_before_the_state_rename_leaves_the_old_record() {
        let env = Env::new("f-crash-state");
        // First ever record: none is there after the crash, and the next run makes it.
        crash_at(&env, "before-rename");
        assert!(!env.state.path().join(state::STATE_FILE).exists());
        env.recovers();
        let old = std::fs::read(env.state.path().join(state::STATE_FILE)).unwrap();
        // A newer commit: the crash leaves the old record byte for byte.
        env.write_vm(256);
        env.repo.commit("more memory");
        crash_at(&env, "before-rename");
        assert_eq!(
            std::fs::read(env.state.path().join(state::STATE_FILE)).unwrap(),
            old,
            "the record is the old one, whole"
        );
        env.recovers();
    }

    #[test]
    fn kill_9_while_making_a_disk_then_the_next_run_converges() {
        let env = Env::new("f-kill9");
        let mut child = env
            .command(None, None)
            .env("FAILPOINTS", "disk-temp-created=sleep(60000)")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !env.tmp_disk().exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "never reached the disk"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(!env.disk().exists());
        env.recovers();
    }

    /// On a real libvirtd the domain outlives the crash: defined with the new commit's
    /// tag while the record still names the old commit. The next run converges.
    #[test]
    fn crash_after_define_on_a_real_libvirtd() {
        if !common::libvirtd_available() {
            return;
        }
        let (prefix, images, _cleanup) = common::scratch("faults");
        let dir = tempfile::tempdir().unwrap();
        let env = Env::at(&format!("{prefix}-vm"), dir, images, "qemu:///system");
        env.recovers();
        let old = env.record();
        env.write_vm(256);
        let new = env.repo.commit("more memory");
        crash_at(&env, "after-define");
        let (_, xml) = common::virsh_system(&["dumpxml", "--inactive", &env.name]);
        assert!(xml.contains(&new), "defined before the crash");
        assert_eq!(env.record(), old, "the record is the old one");
        env.recovers();
        assert_eq!(
            env.record().last_applied_commit.as_deref(),
            Some(new.as_str())
        );
    }
}
