//! Tier 3, health and revert (`[vm.health]`): the real binary against a real libvirtd.
//! A change whose new definition cannot start, or whose health command fails after
//! `settle`, is reverted to the last healthy definition (same UUID, NVRAM and TPM
//! state) and held back; a passing change becomes the new baseline; the same HEAD run
//! again restarts nothing.
//!
//! Guests here boot no OS: they ignore ACPI shutdown requests, so a restart waits for
//! the short `shutdown_timeout` and destroys. Without a reachable `qemu:///system` these
//! tests skip with a message, unless `VMSYNC_REQUIRE_LIBVIRTD` is set: then they fail.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Env, Manifest, Vm, sha256_file, uefi_tpm_xml, virsh_system_ok as virsh_ok};

/// Restart on change, a 2 s shutdown timeout and `[vm.health]` with `health` lines.
fn keys(health: &str) -> String {
    format!(
        "autostart = true\non_change = \"restart\"\nshutdown_timeout = \"2s\"\n[vm.health]\n{health}"
    )
}

/// The guest `short` with `xml` and the health lines.
fn guest(env: &Env, short: &str, xml: &str, health: &str) -> Vm {
    env.vm(short).key(&keys(health)).xml(xml)
}

/// `xml` with a second disk whose image does not exist: libvirt defines it, but refuses
/// to start it.
fn with_missing_disk(xml: &str, missing: &Path) -> String {
    xml.replacen(
        "    <interface",
        &format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='{}'/>\n      <target dev='vdb' bus='virtio'/>\n    </disk>\n    <interface",
            missing.display()
        ),
        1,
    )
}

/// An agent config in `dir` whose `[policy] health_commands` lists `allowed`.
fn allow_checks(dir: &Path, allowed: &[&Path]) -> PathBuf {
    let list: Vec<String> = allowed
        .iter()
        .map(|p| format!("\"{}\"", p.display()))
        .collect();
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!("[policy]\nhealth_commands = [{}]\n", list.join(", ")),
    )
    .unwrap();
    path
}

fn short(commit: &str) -> &str {
    &commit[..12]
}

/// The commit in the vmsync tag of `xml`.
fn tag_commit(xml: &str) -> String {
    let at = xml.find("<vmsync:commit>").expect("a vmsync tag") + "<vmsync:commit>".len();
    xml[at..at + 40].to_string()
}

fn healthy_file(env: &Env, short: &str) -> PathBuf {
    env.state
        .path()
        .join("healthy")
        .join(format!("{}.xml", env.name(short)))
}

#[test]
fn real_unstartable_change_is_reverted_held_back_and_retried() {
    let Some(env) = Env::system("hstart") else {
        return;
    };
    let name = env.name("a");
    let settle = "settle = \"1s\"";
    let good = env.bios("a", 128);
    let c1 = env.commit(&Manifest::new().vm(guest(&env, "a", &good, settle)), "a");
    env.run(&["--once"]).expect(0);
    // The first start passed: its definition is the last healthy one.
    let st = env.vm_status("a");
    assert_eq!(st["health"]["result"], "healthy", "{st}");
    assert_eq!(st["health"]["last_healthy_commit"], c1.as_str());
    assert_eq!(st["health"]["held_back"], serde_json::Value::Null);
    assert_eq!(
        tag_commit(&std::fs::read_to_string(healthy_file(&env, "a")).unwrap()),
        c1
    );
    let uuid = virsh_ok(&["domuuid", &name]);

    // A second disk whose image does not exist: the restart fails, the old definition
    // is put back and runs again.
    let missing = env.images.join("missing.qcow2");
    let c2 = env.commit(
        &Manifest::new().vm(guest(
            &env,
            "a",
            &with_missing_disk(&good, &missing),
            settle,
        )),
        "a disk that does not exist",
    );
    let run = env.run(&["--once"]).expect(1);
    run.stderr_has("health check failed");
    run.stderr_has("libvirt refused to start the new definition");
    run.stderr_has("putting the last healthy definition back");
    assert!(
        run.stderr.lines().any(|l| l.contains("definition diff")
            && l.contains("line=-")
            && l.contains("missing.qcow2")),
        "the log shows what was put back, as a diff:\n{}",
        run.stderr
    );
    assert_eq!(env.domstate("a"), "running");
    let inactive = env.inactive("a");
    assert!(!inactive.contains("missing.qcow2"), "{inactive}");
    assert_eq!(tag_commit(&inactive), c1);
    assert_eq!(virsh_ok(&["domuuid", &name]), uuid, "redefined in place");
    assert!(!missing.exists(), "no disk is made or changed by a revert");
    let status = env.status();
    assert_eq!(status["last_result"], "failed");
    assert_eq!(status["last_applied_commit"], c1.as_str());
    let st = env.vm_status("a");
    assert_eq!(st["health"]["result"], "reverted", "{st}");
    assert_eq!(st["health"]["held_back"], c2.as_str());
    assert_eq!(st["health"]["last_healthy_commit"], c1.as_str());
    assert_eq!(st["active"], true);
    let error = st["last_error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!(
            "reverted: commit {} was unhealthy (libvirt refused to start the new definition",
            short(&c2)
        )),
        "{error}"
    );
    let text = env.run(&["status"]).expect(0);
    text.stdout_has(&format!(
        "health: reverted; last healthy commit {}; held back: commit {}",
        short(&c1),
        short(&c2)
    ));

    // The same HEAD again (as the daemon's next tick): held back, not restarted.
    let id = env.domid("a");
    let run = env.run(&["--once"]).expect(1);
    run.stderr_has(&format!(
        "held back: its definition in commit {} was reverted",
        short(&c2)
    ));
    assert_eq!(env.domid("a"), id, "not restarted");
    // A commit that does not change this vm: still held back.
    env.repo.write("README", "unrelated\n");
    env.repo.commit("unrelated");
    env.run(&["--once"]).expect(1).stderr_has("held back");
    assert_eq!(env.domid("a"), id, "not restarted");
    let plan = env.run(&["plan"]).expect(0);
    plan.stdout_has(&format!("{name}: error: held back"));
    plan.stdout_has(&format!(
        "health: reverted; last healthy commit {}",
        short(&c1)
    ));

    // --retry tries it again (and it is reverted again).
    let run = env.run(&["--once", "--retry", &name]).expect(1);
    run.stderr_has("--retry: trying the held back definition again");
    run.stderr_has("libvirt refused to start the new definition");
    assert_ne!(env.domid("a"), id, "tried again");
    assert_eq!(tag_commit(&env.inactive("a")), c1);
    assert_eq!(env.domstate("a"), "running");

    // A newer commit that changes the vm is tried, passes and is kept.
    let c4 = env.commit(
        &Manifest::new().vm(guest(&env, "a", &env.bios("a", 160), settle)),
        "fixed",
    );
    env.run(&["--once"]).expect(0);
    let st = env.vm_status("a");
    assert_eq!(st["health"]["result"], "healthy", "{st}");
    assert_eq!(st["health"]["last_healthy_commit"], c4.as_str());
    assert_eq!(st["health"]["held_back"], serde_json::Value::Null);
    assert!(
        env.inactive("a")
            .contains("<memory unit='KiB'>163840</memory>")
    );
    assert_eq!(virsh_ok(&["domuuid", &name]), uuid);
}

#[test]
fn real_failing_health_command_is_reverted_after_settle_and_a_passing_change_is_kept() {
    let Some(mut env) = Env::system("hcmd") else {
        return;
    };
    let name = env.name("a");
    // The check looks at the guest: unhealthy while its definition says BROKEN.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("check");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"checking $VMSYNC_VM_NAME $VMSYNC_VM_UUID\"\n\
         if virsh -c qemu:///system dumpxml \"$VMSYNC_VM_NAME\" | grep -q BROKEN; then echo 'guest is broken'; exit 1; fi\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The host allows the checks in that directory ([policy] health_commands).
    env.config_file = Some(allow_checks(dir.path(), &[dir.path()]));
    let health = format!(
        "settle = \"2s\"\ncommand = [\"{}\"]\ntimeout = \"1m\"",
        script.display()
    );
    let commit = |xml: &str, message| {
        env.commit(&Manifest::new().vm(guest(&env, "a", xml, &health)), message)
    };
    let c1 = commit(&env.bios("a", 128), "a");
    let run = env.run(&["--once"]).expect(0);
    let uuid = virsh_ok(&["domuuid", &name]);
    run.stderr_has(&format!("checking {name} {uuid}"));
    run.stderr_has("health command passed");
    assert_eq!(
        env.vm_status("a")["health"]["last_healthy_commit"],
        c1.as_str()
    );

    // A change the check fails: found after settle, reverted.
    let broken = env
        .bios("a", 160)
        .replace("</name>", "</name>\n  <description>BROKEN</description>");
    let c2 = commit(&broken, "broken");
    let started = Instant::now();
    let run = env.run(&["--once"]).expect(1);
    assert!(started.elapsed() >= Duration::from_secs(4), "settle, twice");
    let checking = run.stderr.find("checking health").expect("check started");
    let failed = run
        .stderr
        .find("health check failed")
        .expect("check failed");
    assert!(checking < failed);
    run.stderr_has("guest is broken");
    run.stderr_has(&format!(
        "health command '{}' exited with status 1",
        script.display()
    ));
    run.stderr_has("putting the last healthy definition back");
    run.stderr_has("reverted: the last healthy definition runs again");
    assert_eq!(env.domstate("a"), "running");
    let inactive = env.inactive("a");
    assert!(!inactive.contains("BROKEN"), "{inactive}");
    assert!(inactive.contains("<memory unit='KiB'>131072</memory>"));
    assert_eq!(tag_commit(&inactive), c1);
    let st = env.vm_status("a");
    assert_eq!(st["health"]["result"], "reverted", "{st}");
    assert_eq!(st["health"]["held_back"], c2.as_str());
    assert!(
        st["last_error"]
            .as_str()
            .unwrap()
            .contains("exited with status 1"),
        "{st}"
    );

    // A passing change is kept and becomes the new baseline.
    let c3 = commit(&env.bios("a", 192), "more memory");
    let run = env.run(&["--once"]).expect(0);
    run.stdout_has(&format!("applied commit {c3}"));
    run.stderr_has("healthy: kept as the last healthy definition");
    let st = env.vm_status("a");
    assert_eq!(st["health"]["result"], "healthy");
    assert_eq!(st["health"]["last_healthy_commit"], c3.as_str());
    assert_eq!(st["health"]["held_back"], serde_json::Value::Null);
    assert_eq!(
        tag_commit(&std::fs::read_to_string(healthy_file(&env, "a")).unwrap()),
        c3
    );
    assert!(
        env.inactive("a")
            .contains("<memory unit='KiB'>196608</memory>")
    );

    // The same HEAD again: nothing is restarted or checked.
    let id = env.domid("a");
    let run = env.run(&["--once"]).expect(0);
    run.stdout_has(&format!("nothing to do: commit {c3}"));
    assert!(!run.stderr.contains("checking health"), "{}", run.stderr);
    assert_eq!(env.domid("a"), id);
}

#[test]
fn real_first_start_unhealthy_is_reported_not_reverted() {
    let Some(mut env) = Env::system("hfirst") else {
        return;
    };
    let etc = tempfile::tempdir().unwrap();
    env.config_file = Some(allow_checks(etc.path(), &[Path::new("/bin/false")]));
    let health = "settle = \"1s\"\ncommand = [\"/bin/false\"]\ntimeout = \"30s\"";
    env.commit(
        &Manifest::new().vm(guest(&env, "a", &env.bios("a", 128), health)),
        "a",
    );
    let run = env.run(&["--once"]).expect(1);
    run.stderr_has("not reverted: no healthy definition to go back to yet");
    assert_eq!(env.domstate("a"), "running", "left as it is");
    let st = env.vm_status("a");
    assert_eq!(st["health"]["result"], "unhealthy", "{st}");
    assert_eq!(st["health"]["held_back"], serde_json::Value::Null);
    assert_eq!(st["health"]["last_healthy_commit"], serde_json::Value::Null);
    // Not checked or restarted again: its definition did not change.
    let id = env.domid("a");
    env.run(&["--once"]).expect(0);
    assert_eq!(env.domid("a"), id);
}

/// The bytes that differ between two files of the same size (`None`: sizes differ).
fn differing_bytes(a: &[u8], b: &[u8]) -> Option<usize> {
    (a.len() == b.len()).then(|| a.iter().zip(b).filter(|(x, y)| x != y).count())
}

#[test]
fn real_reverted_uefi_tpm_guest_keeps_its_nvram_and_tpm_state() {
    let Some(env) = Env::system("htpm") else {
        return;
    };
    let name = env.name("u");
    let good = uefi_tpm_xml(&name, &env.disk("u"));
    let settle = "settle = \"1s\"";
    let c1 = env.commit(&Manifest::new().vm(guest(&env, "u", &good, settle)), "uefi");
    env.run(&["--once"]).expect(0);
    let uuid = virsh_ok(&["domuuid", &name]);
    let nvram = PathBuf::from(format!("/var/lib/libvirt/qemu/nvram/{name}_VARS.fd"));
    let permall = PathBuf::from(format!(
        "/var/lib/libvirt/swtpm/{uuid}/tpm2/tpm2-00.permall"
    ));
    env.cleanup().also_remove(nvram.clone());
    env.cleanup()
        .also_remove(PathBuf::from(format!("/var/lib/libvirt/swtpm/{uuid}")));
    // Shut off to read them settled (the next sync starts it again: self-heal).
    virsh_ok(&["destroy", &name]);
    let (nvram_hash, nvram_ino) = (
        sha256_file(&nvram),
        std::fs::metadata(&nvram).unwrap().ino(),
    );
    let tpm_before = std::fs::read(&permall).unwrap();

    let missing = env.images.join("missing.qcow2");
    env.commit(
        &Manifest::new().vm(guest(
            &env,
            "u",
            &with_missing_disk(&good, &missing),
            settle,
        )),
        "a disk that does not exist",
    );
    let run = env.run(&["--once"]).expect(1);
    run.stderr_has("libvirt refused to start the new definition");
    run.stderr_has("reverted: the last healthy definition runs again");
    assert_eq!(env.domstate("u"), "running");
    assert_eq!(tag_commit(&env.inactive("u")), c1);
    assert_eq!(virsh_ok(&["domuuid", &name]), uuid);
    virsh_ok(&["destroy", &name]);

    // NVRAM: the same file, byte for byte (OVMF writes nothing on a boot like this).
    assert_eq!(std::fs::metadata(&nvram).unwrap().ino(), nvram_ino);
    assert_eq!(sha256_file(&nvram), nvram_hash, "NVRAM kept byte for byte");
    // TPM: the same state. swtpm rewrites it on every boot, advancing its reset
    // counters (3 bytes of 6116 differed after a plain `virsh start`/`destroy`); a
    // newly made TPM differs in most of them (4730 measured).
    let tpm_after = std::fs::read(&permall).unwrap();
    let differ = differing_bytes(&tpm_before, &tpm_after);
    assert!(
        differ.is_some_and(|n| n <= 16),
        "TPM state kept: {differ:?} bytes of {} differ",
        tpm_before.len()
    );
}

/// The record's failed attempts (0 before the first).
fn failed_attempts(env: &Env) -> u64 {
    env.state_json()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|r| r["failed_attempts"].as_u64())
        .unwrap_or(0)
}

#[test]
fn real_daemon_does_not_restart_a_reverted_vm_at_the_next_ticks() {
    let Some(env) = Env::system("hdaemon") else {
        return;
    };
    let settle = "settle = \"1s\"";
    let good = env.bios("a", 128);
    env.commit(&Manifest::new().vm(guest(&env, "a", &good, settle)), "a");
    env.run(&["--once"]).expect(0);
    let missing = env.images.join("missing.qcow2");
    let c2 = env.commit(
        &Manifest::new().vm(guest(
            &env,
            "a",
            &with_missing_disk(&good, &missing),
            settle,
        )),
        "a disk that does not exist",
    );

    // Syncs on start and on SIGHUP (the schedule waits until January; failures back
    // off), and no giving up on the commit: only the hold-back stops a loop.
    let etc = tempfile::tempdir().unwrap();
    let metrics = etc.path().join("vmsync.prom");
    let config = etc.path().join("config.toml");
    std::fs::write(
        &config,
        env.config(&format!(
            "schedule = \"0 0 0 1 1 *\"\njitter_seconds = 0\nmax_attempts = 100\nmetrics_file = \"{}\"\n",
            metrics.display()
        )),
    )
    .unwrap();
    let log = etc.path().join("daemon.log");
    let mut daemon = common::vmsync_command()
        .args(["--config", &config.display().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait("reverted", &|| failed_attempts(&env) >= 1);
    assert_eq!(env.vm_status("a")["health"]["result"], "reverted");
    let id = env.domid("a");
    for attempt in 2..=3 {
        common::output_ok(
            std::process::Command::new("kill").args(["-HUP", &daemon.id().to_string()]),
        );
        wait("another sync", &|| failed_attempts(&env) >= attempt);
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_eq!(env.domid("a"), id, "not restarted by the later ticks");
    assert_eq!(
        tag_commit(&env.inactive("a")),
        env.vm_status("a")["health"]["last_healthy_commit"]
            .as_str()
            .unwrap()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("putting the last healthy definition back")
            .count(),
        1,
        "{text}"
    );
    assert!(text.contains(&format!(
        "held back: its definition in commit {}",
        short(&c2)
    )));
    let prom = std::fs::read_to_string(&metrics).unwrap();
    let name = env.name("a");
    for line in [
        format!("vmsync_vm_health{{vm=\"{name}\",result=\"reverted\"}} 1"),
        format!("vmsync_vm_held_back{{vm=\"{name}\"}} 1"),
    ] {
        assert!(prom.lines().any(|l| l == line), "missing {line} in\n{prom}");
    }
}

#[test]
fn real_guest_agent_that_does_not_answer_is_unhealthy() {
    let Some(env) = Env::system("hagent") else {
        return;
    };
    // No OS, no agent channel: the ping fails until the timeout.
    let health = "settle = \"1s\"\ntimeout = \"4s\"\nguest_agent = true";
    env.commit(
        &Manifest::new().vm(guest(&env, "a", &env.bios("a", 128), health)),
        "a",
    );
    let started = Instant::now();
    let run = env.run(&["--once"]).expect(1);
    assert!(started.elapsed() >= Duration::from_secs(4));
    run.stderr_has("the guest agent did not answer a ping within the timeout (4s)");
    assert_eq!(env.vm_status("a")["health"]["result"], "unhealthy");
}

#[test]
fn real_crash_during_settle_is_reverted_and_the_other_vms_are_unaffected() {
    let Some(env) = Env::system("hsettle") else {
        return;
    };
    let (a, b) = (env.name("a"), env.name("b"));
    let manifest = |memory| {
        Manifest::new()
            .vm(guest(&env, "a", &env.bios("a", memory), "settle = \"5s\""))
            .vm(guest(&env, "b", &env.bios("b", memory), "settle = \"1s\""))
    };
    let c1 = env.commit(&manifest(128), "a and b");
    env.run(&["--once"]).expect(0);

    // Both change; `a` goes down during its settle (destroyed here, as a crash would).
    let c2 = env.commit(&manifest(160), "more memory");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("once.log");
    let mut once = env
        .command(&["--once"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let checking = format!("checking health vm={a}");
    while !std::fs::read_to_string(&log).unwrap().contains(&checking) {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    virsh_ok(&["destroy", &a]);
    let status = once.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    // Seen going down ("shutting down" or "shut off (destroyed)", as the poll falls).
    assert!(
        text.lines()
            .any(|l| l.contains(&format!("health check failed vm={a}"))
                && l.contains("reason=shut")
                && l.contains("before settle (5s) passed")),
        "{text}"
    );

    // `a`: the old definition runs again; `b`: the commit, checked and kept.
    assert_eq!(env.domstate("a"), "running");
    assert_eq!(tag_commit(&env.inactive("a")), c1);
    let st = env.vm_status("a");
    assert_eq!(st["health"]["result"], "reverted", "{st}");
    assert_eq!(st["health"]["held_back"], c2.as_str());
    assert_eq!(env.domstate("b"), "running");
    assert_eq!(tag_commit(&env.inactive("b")), c2);
    assert!(virsh_ok(&["dumpxml", &b]).contains("<memory unit='KiB'>163840</memory>"));
    let st = env.vm_status("b");
    assert_eq!(st["applied_commit"], c2.as_str(), "{st}");
    assert_eq!(st["health"]["result"], "healthy");
    assert_eq!(st["health"]["last_healthy_commit"], c2.as_str());
    assert_eq!(st["last_error"], serde_json::Value::Null);
}

#[test]
fn real_health_added_to_a_running_vm_keeps_its_definition_as_the_healthy_one() {
    let Some(env) = Env::system("hadopt") else {
        return;
    };
    let good = env.bios("a", 128);
    let plain = env
        .vm("a")
        .key("autostart = true\non_change = \"restart\"\nshutdown_timeout = \"2s\"")
        .xml(&good);
    let c1 = env.commit(&Manifest::new().vm(plain), "a without health");
    env.run(&["--once"]).expect(0);
    assert_eq!(env.vm_status("a")["health"], serde_json::Value::Null);

    // [vm.health] added, the definition unchanged: nothing is restarted or checked, and
    // the running definition is kept as the last healthy one.
    let settle = "settle = \"1s\"";
    let id = env.domid("a");
    env.commit(
        &Manifest::new().vm(guest(&env, "a", &good, settle)),
        "health",
    );
    let run = env.run(&["--once"]).expect(0);
    assert!(!run.stderr.contains("checking health"), "{}", run.stderr);
    run.stderr_has("runs its committed definition: kept as the last healthy one");
    assert_eq!(env.domid("a"), id);
    let st = env.vm_status("a");
    assert_eq!(st["health"]["result"], serde_json::Value::Null, "{st}");
    assert_eq!(st["health"]["last_healthy_commit"], c1.as_str());

    // So the first broken change has something to go back to.
    let missing = env.images.join("missing.qcow2");
    env.commit(
        &Manifest::new().vm(guest(
            &env,
            "a",
            &with_missing_disk(&good, &missing),
            settle,
        )),
        "a disk that does not exist",
    );
    env.run(&["--once"]).expect(1);
    assert_eq!(env.vm_status("a")["health"]["result"], "reverted");
    assert_eq!(tag_commit(&env.inactive("a")), c1);
    assert_eq!(env.domstate("a"), "running");
}

#[test]
fn real_damaged_healthy_definition_is_reported_repaired_or_never_used() {
    let Some(env) = Env::system("hdamage") else {
        return;
    };
    let settle = "settle = \"1s\"";
    let good = env.bios("a", 128);
    let c1 = env.commit(&Manifest::new().vm(guest(&env, "a", &good, settle)), "a");
    env.run(&["--once"]).expect(0);
    let file = healthy_file(&env, "a");
    let kept = std::fs::read(&file).unwrap();

    // Damaged while the VM runs that very definition: status says so and what to do,
    // and the next sync writes it again from the domain.
    std::fs::write(&file, b"<domain>\xff truncated").unwrap();
    let st = env.vm_status("a");
    let problems = st["state_problems"].to_string();
    assert!(
        problems.contains("is damaged (not UTF-8)")
            && problems.contains("restore it from a backup, or delete it"),
        "{st}"
    );
    env.run(&["status"])
        .expect(0)
        .stdout_has("is damaged (not UTF-8)");
    env.run(&["plan"])
        .expect(0)
        .stdout_has("warning: the last healthy definition")
        .stdout_has("is damaged (not UTF-8); it is not used: restore it from a backup");
    env.run(&["--once"])
        .expect(0)
        .stderr_has("written again from the domain, which runs that definition");
    assert_eq!(std::fs::read(&file).unwrap(), kept);
    assert!(env.vm_status("a").get("state_problems").is_none());

    // Damaged (another VM's definition) when a change fails its check: not reverted
    // with it, and the error says why and what to do.
    std::fs::write(
        &file,
        String::from_utf8_lossy(&kept).replace(&env.name("a"), "someone-else"),
    )
    .unwrap();
    let missing = env.images.join("missing.qcow2");
    env.commit(
        &Manifest::new().vm(guest(
            &env,
            "a",
            &with_missing_disk(&good, &missing),
            settle,
        )),
        "a disk that does not exist",
    );
    let run = env.run(&["--once"]).expect(1);
    run.stderr_has("not reverted: the last healthy definition")
        .stderr_has("is damaged (not the domain definition of");
    assert!(
        !run.stderr
            .contains("putting the last healthy definition back"),
        "{}",
        run.stderr
    );
    let st = env.vm_status("a");
    assert_eq!(st["health"]["result"], "unhealthy", "{st}");
    let error = st["last_error"].as_str().unwrap();
    assert!(
        error.contains("is damaged") && error.contains("delete it"),
        "{error}"
    );
    assert_eq!(st["health"]["last_healthy_commit"], c1.as_str());
    assert!(!env.inactive("a").contains("someone-else"));
}
