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

use common::{Env, Manifest, Run};

use vmsync::record::SyncResult;

/// The one VM of these tests.
const VM: &str = "vm";

/// Writes the manifest with [`VM`] and its XML with `memory` MiB.
fn write_vm(env: &Env, memory: u32) {
    let vm = env.vm(VM).xml(&env.bios(VM, memory));
    Manifest::new().vm(vm).write(&env.repo);
}

/// `env` with [`VM`] committed.
fn committed(env: Env) -> Env {
    write_vm(&env, 128);
    env.repo.commit("initial");
    env
}

/// The temporary image a disk is made as before it is linked into place.
fn tmp_disk(env: &Env) -> PathBuf {
    env.images
        .join(format!(".{}.qcow2.vmsync-tmp", env.name(VM)))
}

/// `vmsync --once` with the env's flags.
fn once(env: &Env) -> Run {
    env.run(&["--once"])
}

/// The next run converges: exit 0, the head applied, the disk a sound qcow2 image.
fn recovers(env: &Env) {
    once(env).expect(0);
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(env.repo.head().as_str())
    );
    common::output_ok(
        Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(env.disk(VM)),
    );
}

#[test]
fn qemu_img_missing_fails_the_vm_and_the_next_run_recovers() {
    let env = committed(Env::new());
    let empty = tempfile::tempdir().unwrap();
    let run = Run::from(
        env.command(&["--once"])
            .env("PATH", empty.path())
            .output()
            .unwrap(),
    )
    .expect(1);
    run.stderr_has("qemu-img not found at 'qemu-img' (is qemu-utils installed?)");
    run.stderr_has("1 of 1 vms failed at commit");
    let record = env.record();
    assert_eq!(record.last_result, Some(SyncResult::Failed));
    assert!(!record.vms[VM].ok);
    assert!(
        record.vms[VM]
            .last_error
            .as_deref()
            .unwrap()
            .contains("qemu-img not found"),
        "{record:?}"
    );
    assert_eq!(record.last_applied_commit, None);
    assert!(!env.disk(VM).exists() && !tmp_disk(&env).exists());
    recovers(&env);
}

#[test]
fn libvirt_unreachable_exits_1_before_touching_disks() {
    let env = committed(Env::new());
    let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
    let run = env.run_at(&["--once"], None, Some(uri)).expect(1);
    run.stderr_has(
        "failed to connect to libvirt at 'qemu+unix:///system?socket=/nonexistent/libvirt-sock'",
    );
    assert_eq!(env.record().last_result, Some(SyncResult::Failed));
    assert!(!env.disk(VM).exists(), "nothing is made without libvirt");
    recovers(&env);
}

#[test]
fn an_unreachable_git_server_exits_4_and_the_next_run_recovers() {
    let env = committed(Env::new());
    // A port that was free a moment ago: nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/vms.git");
    let run = env.run_at(&["--once"], Some(&url), None).expect(4);
    run.stderr_has(&format!("failed to fetch branch 'main' from '{url}'"));
    assert_eq!(env.record().last_result, Some(SyncResult::FetchFailed));
    recovers(&env);
}

#[test]
fn a_git_server_answering_garbage_exits_4() {
    let env = committed(Env::new());
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
        let run = env.run_at(&["--once"], Some(&url), None).expect(4);
        run.stderr_has(&format!("failed to fetch branch 'main' from '{url}'"));
    }
    assert_eq!(env.record().last_result, Some(SyncResult::FetchFailed));
    recovers(&env);
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
    let env = committed(Env::new());
    let Some(_mount) = mount_or_skip(&["--bind", env.images.to_str().unwrap()], &env.images) else {
        return;
    };
    assert!(Mount::run(&["-o", "remount,bind,ro"], &env.images));
    let run = once(&env).expect(1);
    run.stderr_has("Read-only file system");
    run.stderr_has(&format!("'{}'", env.disk(VM).display()));
    assert!(!env.record().vms[VM].ok);
    assert!(!env.disk(VM).exists() && !tmp_disk(&env).exists());
    assert!(Mount::run(&["-o", "remount,bind,rw"], &env.images));
    recovers(&env);
}

#[test]
fn a_full_disk_root_fails_the_vm_leaves_no_partial_image_and_recovers() {
    let env = committed(Env::new());
    let Some(_mount) = mount_or_skip(&["-t", "tmpfs", "-o", "size=64k", "tmpfs"], &env.images)
    else {
        return;
    };
    let run = once(&env).expect(1);
    run.stderr_has("No space left on device");
    let record = env.record();
    assert_eq!(record.last_result, Some(SyncResult::Failed));
    assert!(
        !env.disk(VM).exists(),
        "no half-made image at the real path"
    );
    assert!(!tmp_disk(&env).exists(), "the temporary image is removed");
    assert!(Mount::run(&["-o", "remount,size=16m"], &env.images));
    recovers(&env);
}

#[cfg(feature = "failpoints")]
mod crashes {
    use super::*;
    use vmsync::record::{self, store};

    fn crash_at(env: &Env, point: &str) {
        let out = env
            .command(&["--once"])
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
        let env = committed(Env::new());
        crash_at(&env, "disk-temp-created");
        assert!(
            tmp_disk(&env).exists(),
            "the crash left the temporary image"
        );
        assert!(!env.disk(VM).exists(), "but nothing at the real path");
        assert_eq!(env.record(), record::Record::default(), "no record written");
        recovers(&env);
        assert!(
            !tmp_disk(&env).exists(),
            "the stale temporary image was removed"
        );
    }

    #[test]
    fn crash_right_after_the_link_keeps_the_complete_image() {
        let env = committed(Env::new());
        crash_at(&env, "disk-linked");
        assert!(env.disk(VM).exists());
        recovers(&env);
    }

    #[test]
    fn crash_before_the_state_rename_leaves_the_old_record() {
        let env = committed(Env::new());
        // First ever record: none is there after the crash, and the next run makes it.
        crash_at(&env, "before-rename");
        assert!(!env.state.path().join(store::STATE_FILE).exists());
        recovers(&env);
        let old = std::fs::read(env.state.path().join(store::STATE_FILE)).unwrap();
        // A newer commit: the crash leaves the old record byte for byte.
        write_vm(&env, 256);
        env.repo.commit("more memory");
        crash_at(&env, "before-rename");
        assert_eq!(
            std::fs::read(env.state.path().join(store::STATE_FILE)).unwrap(),
            old,
            "the record is the old one, whole"
        );
        recovers(&env);
    }

    #[test]
    fn kill_9_while_making_a_disk_then_the_next_run_converges() {
        let env = committed(Env::new());
        let mut child = env
            .command(&["--once"])
            .env("FAILPOINTS", "disk-temp-created=sleep(60000)")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !tmp_disk(&env).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "never reached the disk"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(!env.disk(VM).exists());
        recovers(&env);
    }

    /// On a real libvirtd the domain outlives the crash: defined with the new commit's
    /// tag while the record still names the old commit. The next run converges.
    #[test]
    fn crash_after_define_on_a_real_libvirtd() {
        let Some(env) = Env::system("faults") else {
            return;
        };
        let env = committed(env);
        recovers(&env);
        let old = env.record();
        write_vm(&env, 256);
        let new = env.repo.commit("more memory");
        crash_at(&env, "after-define");
        assert!(env.inactive(VM).contains(&new), "defined before the crash");
        assert_eq!(env.record(), old, "the record is the old one");
        recovers(&env);
        assert_eq!(
            env.record().last_applied_commit.as_deref(),
            Some(new.as_str())
        );
    }

    /// The record of a sync is lost after everything reached the host (the write fails:
    /// a full disk, a crash before the rename). vmsync's own define, autostart flag and
    /// start are not "changed outside vmsync" at the next run, and nothing is done
    /// again: the domain's tag is the truth of what was applied.
    #[test]
    fn a_lost_record_is_not_drift_and_nothing_is_applied_again() {
        let Some(env) = Env::system("lostrec") else {
            return;
        };
        let env = committed(env);
        recovers(&env);
        let old = env.record();
        let vm = env.vm(VM).key("autostart = true").xml(&env.bios(VM, 256));
        Manifest::new().vm(vm).write(&env.repo);
        let new = env.repo.commit("more memory, autostart");
        crash_at(&env, "record-write");
        assert!(env.inactive(VM).contains(&new), "defined before the crash");
        assert!(env.autostart(VM), "autostart set before the crash");
        assert_eq!(env.domstate(VM), "running");
        assert_eq!(env.record(), old, "the record is the old one");
        let uuid_xml = env.inactive(VM);

        let run = once(&env).expect(0);
        for wrong in [
            "changed outside vmsync",
            "autostart is on",
            "committed state",
            "drift",
        ] {
            assert!(!run.stderr.contains(wrong), "{wrong}:\n{}", run.stderr);
        }
        assert!(
            !run.stderr.contains(" done "),
            "nothing is done again:\n{}",
            run.stderr
        );
        assert_eq!(env.inactive(VM), uuid_xml, "not defined again");
        let record = env.record();
        assert_eq!(record.last_applied_commit.as_deref(), Some(new.as_str()));
        assert!(record.vms[&env.name(VM)].drift.is_empty());
        // The baseline is this definition's: the run after sees no drift either, and a
        // hand edit after that is still caught.
        let run = once(&env).expect(0);
        assert!(
            !run.stderr.contains("drift") && !run.stderr.contains(" done "),
            "{}",
            run.stderr
        );
        assert!(
            env.status()["vms"][0]["drift"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }
}

/// Damages the local clone under the state dir as `how` says.
fn damage_clone(env: &Env, how: &str) {
    let clone = env.state.path().join("repo");
    match how {
        "truncated packs and objects" => {
            let mut files = Vec::new();
            let mut todo = vec![clone.join("objects")];
            while let Some(dir) = todo.pop() {
                for entry in std::fs::read_dir(&dir).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_dir() {
                        todo.push(path);
                    } else if path.extension().is_none_or(|e| e == "pack") {
                        files.push(path);
                    }
                }
            }
            assert!(!files.is_empty());
            for f in files {
                let len = std::fs::metadata(&f).unwrap().len();
                let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
                file.set_len(len / 2).unwrap();
            }
        }
        "no objects" => std::fs::remove_dir_all(clone.join("objects")).unwrap(),
        "garbage HEAD" => std::fs::write(clone.join("HEAD"), "\u{1}garbage\n").unwrap(),
        other => panic!("{other}"),
    }
}

#[test]
fn a_damaged_local_clone_is_moved_aside_and_cloned_again() {
    for how in ["truncated packs and objects", "no objects", "garbage HEAD"] {
        let env = committed(Env::new());
        once(&env).expect(0);
        damage_clone(&env, how);
        // A new commit, then the next run: it recovers on its own, and says so.
        write_vm(&env, 256);
        let head = env.repo.commit("more memory");
        let run = once(&env).expect(0);
        run.stderr_has("the local clone is damaged; moving it aside and cloning again");
        assert_eq!(
            env.record().last_applied_commit.as_deref(),
            Some(head.as_str()),
            "{how}"
        );
        assert!(env.state.path().join("repo.damaged").is_dir(), "{how}");
        // And the run after that is an ordinary no-op.
        let run = once(&env).expect(0);
        assert!(!run.stderr.contains("damaged"), "{how}: {}", run.stderr);
    }
}

#[test]
fn a_damaged_clone_that_cannot_be_cloned_again_says_what_to_do() {
    let env = committed(Env::new());
    once(&env).expect(0);
    damage_clone(&env, "no objects");
    // The source is gone too: the error names both and what to check.
    let moved = env.repo.path().with_extension("gone");
    std::fs::rename(env.repo.path(), &moved).unwrap();
    let run = once(&env).expect(4);
    run.stderr_has("the local clone was damaged (")
        .stderr_has("cloning again failed too")
        .stderr_has("Check the source url and the state directory's disk");
    std::fs::rename(&moved, env.repo.path()).unwrap();
    once(&env).expect(0);
}

#[test]
fn a_network_failure_leaves_a_sound_clone_alone() {
    let env = committed(Env::new());
    once(&env).expect(0);
    let moved = env.repo.path().with_extension("gone");
    std::fs::rename(env.repo.path(), &moved).unwrap();
    let run = once(&env).expect(4);
    assert!(!run.stderr.contains("damaged"), "{}", run.stderr);
    assert!(!env.state.path().join("repo.damaged").exists());
    std::fs::rename(&moved, env.repo.path()).unwrap();
    once(&env).expect(0);
}

#[test]
fn a_damaged_record_is_reported_with_what_to_do_and_never_guessed() {
    let env = committed(Env::new());
    once(&env).expect(0);
    let file = env.state.path().join(vmsync::record::store::STATE_FILE);
    std::fs::write(&file, "{\"last_applied_commit\": \"abc").unwrap();
    let run = once(&env);
    assert_ne!(run.code, 0, "{}", run.stderr);
    run.stderr_has("is corrupt")
        .stderr_has("move it aside (mv ")
        .stderr_has("and run again");
    // Left as it was for the operator.
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "{\"last_applied_commit\": \"abc"
    );
    // Doing what it says works.
    std::fs::rename(&file, file.with_extension("json.damaged")).unwrap();
    once(&env).expect(0);
}

#[test]
fn a_damaged_schema_cache_is_said_and_rebuilt() {
    let env = committed(Env::new());
    once(&env).expect(0);
    let cache = env.state.path().join("schema-cache.bin");
    let whole = std::fs::read(&cache).unwrap();
    // Cut short (the cache is not fsynced: what a crash may leave).
    std::fs::write(&cache, &whole[..whole.len() - 9]).unwrap();
    write_vm(&env, 256);
    env.repo.commit("more memory");
    once(&env)
        .expect(0)
        .stderr_has("the schema cache is damaged; starting it again");
    // Rebuilt whole: the next sync reads it without a word.
    once(&env)
        .expect(0)
        .stderr_lacks("the schema cache is damaged");
    assert!(std::fs::read(&cache).unwrap().len() > 9);
}
