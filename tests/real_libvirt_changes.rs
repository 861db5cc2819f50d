//! Tier 3, safe change handling: the real binary against a real libvirtd — plan output
//! with no side effects, drift detected and healed, the "restart" and "defer" change
//! policies and `state = "stopped"`, pruning (only tagged domains; disks, NVRAM and TPM
//! state kept) and the mass-prune guard.
//!
//! Guests here boot no OS, so they ignore ACPI shutdown requests: the graceful shutdown
//! times out and the domain is destroyed, which is the path tested here (with a 3 s
//! timeout). The graceful path itself is tested on the test driver
//! (tests/test_driver_changes.rs), whose domains shut down at once.
//!
//! Without a reachable `qemu:///system` these tests skip with a message, unless
//! `VMSYNC_REQUIRE_LIBVIRTD` is set: then they fail.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use common::{Env, Manifest, Vm, bios_xml, sha256_file, uefi_tpm_xml, virsh_system_ok as virsh_ok};

/// A BIOS guest of these tests: its short name, manifest keys and memory.
struct Guest<'a> {
    name: &'a str,
    extra: &'a str,
    memory: u32,
}

/// Commits a manifest with `guests`, one 64M disk each.
fn commit(env: &Env, guests: &[Guest], message: &str) -> String {
    let m = Manifest::new().vms(guests.iter().map(|g| {
        env.vm(g.name)
            .file(&format!("vms/{}.xml", g.name))
            .key(g.extra)
            .xml(&env.bios(g.name, g.memory))
    }));
    env.commit(&m, message)
}

/// The changed lines of a unified diff (without the --- / +++ headers).
fn changed_lines(diff: &str) -> Vec<&str> {
    diff.lines()
        .filter(|l| {
            (l.starts_with('+') || l.starts_with('-'))
                && !l.starts_with("+++")
                && !l.starts_with("---")
        })
        .collect()
}

#[test]
fn real_plan_shows_diffs_and_changes_nothing() {
    let Some(env) = Env::system("plan") else {
        return;
    };
    let vms = |memory| {
        [
            Guest {
                name: "a",
                extra: "autostart = true",
                memory,
            },
            Guest {
                name: "b",
                extra: "",
                memory: 128,
            },
        ]
    };
    commit(&env, &vms(128), "two vms");

    // Before anything exists: every action planned, nothing made.
    let run = env.run(&["plan"]).expect(0);
    let a = env.name("a");
    run.stdout_has(&format!(
        "{a}: create qcow2 disk '{}' (64 MiB), define, set autostart, start",
        env.disk("a").display()
    ));
    run.stdout_has(&format!("+  <name>{a}</name>"));
    assert!(!env.defined("a") && !env.defined("b"));
    assert!(!env.disk("a").exists(), "plan creates no disk");
    assert_eq!(env.state_json(), None, "plan writes no record");

    env.run(&["--once"]).expect(0);
    let (xml_a, xml_b, id_a) = (env.inactive("a"), env.inactive("b"), env.domid("a"));
    let record = env.state_json().unwrap();

    // A memory change: the plan's diff shows exactly the memory line, although libvirt's
    // QEMU driver added a machine type, controllers, addresses and a MAC.
    let c2 = commit(&env, &vms(256), "more memory for a");
    let run = env.run(&["plan"]).expect(0);
    run.stdout_has(&format!("plan for commit {c2}"));
    run.stdout_has(&format!("{a}: redefine in place (pending restart)"));
    run.stdout_has(&format!("{}: nothing to do", env.name("b")));
    let json_run = env.run(&["--once", "--dry-run", "--json"]).expect(0);
    let plan: serde_json::Value = serde_json::from_str(&json_run.stdout).unwrap();
    assert_eq!(plan["commit"], c2.as_str());
    let vm_a = plan["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == a.as_str())
        .unwrap();
    assert_eq!(vm_a["actions"][0]["kind"], "redefine");
    assert_eq!(vm_a["pending_restart"], true);
    let diff = vm_a["diff"].as_str().unwrap();
    assert_eq!(
        changed_lines(diff),
        vec![
            "-  <memory unit='KiB'>131072</memory>",
            "+  <memory unit='KiB'>262144</memory>"
        ],
        "{diff}"
    );
    assert_eq!(plan["vms"][1]["actions"], serde_json::json!([]));
    assert_eq!(plan["noop"], false);

    // Nothing changed on the host or in the record.
    assert_eq!(env.inactive("a"), xml_a);
    assert_eq!(env.inactive("b"), xml_b);
    assert_eq!(env.domid("a"), id_a);
    assert_eq!(env.state_json().unwrap(), record);

    // The sync logs the same diff when it redefines.
    let run = env.run(&["--once"]).expect(0);
    run.stderr_has("definition diff");
    run.stderr_has("+  <memory unit='KiB'>262144</memory>");
}

#[test]
fn real_drift_is_reported_then_healed() {
    let Some(env) = Env::system("drift") else {
        return;
    };
    commit(
        &env,
        &[Guest {
            name: "vm",
            extra: "autostart = true",
            memory: 128,
        }],
        "one vm",
    );
    env.run(&["--once"]).expect(0);
    let name = env.name("vm");
    assert_eq!(env.domstate("vm"), "running");
    assert_eq!(env.vm_status("vm")["drift"], serde_json::json!([]));

    // Outside git: `virsh edit` (define of the edited inactive XML, tag kept), autostart
    // off, a manual stop.
    let edited = env.inactive("vm").replace(
        "<vcpu placement='static'>1</vcpu>",
        "<vcpu placement='static'>2</vcpu>",
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &edited).unwrap();
    virsh_ok(&["define", &file.path().display().to_string()]);
    virsh_ok(&["autostart", "--disable", &name]);
    virsh_ok(&["destroy", &name]);

    let drift = env.vm_status("vm")["drift"].clone();
    assert_eq!(
        drift,
        serde_json::json!([
            "definition changed outside vmsync",
            "autostart is off, committed on",
            "domain is shut off, committed state running"
        ])
    );

    // self_heal off: reported (plan with the diff back to the commit), nothing changed.
    let run = env.run(&["plan", "--self-heal=false"]).expect(0);
    run.stdout_has("drift: definition changed outside vmsync (reported only, self_heal is off)");
    assert!(
        run.stdout
            .contains("-    <vcpu placement='static'>2</vcpu>")
            || run.stdout.contains("-  <vcpu placement='static'>2</vcpu>"),
        "{}",
        run.stdout
    );
    let run = env.run(&["--once", "--self-heal=false"]).expect(0);
    run.stdout_has("self_heal is off, left as is");
    assert!(
        env.inactive("vm")
            .contains("<vcpu placement='static'>2</vcpu>")
    );
    assert!(!env.autostart("vm"));
    assert_eq!(env.domstate("vm"), "shut off");
    assert_eq!(env.vm_status("vm")["drift"].as_array().unwrap().len(), 3);

    // self_heal on (the default): definition, autostart flag and power state restored.
    let run = env.run(&["--once"]).expect(0);
    run.stdout_has(&format!("{name}: redefine in place, set autostart, start"));
    assert!(
        env.inactive("vm")
            .contains("<vcpu placement='static'>1</vcpu>")
    );
    assert!(env.autostart("vm"));
    assert_eq!(env.domstate("vm"), "running");
    assert_eq!(env.vm_status("vm")["drift"], serde_json::json!([]));
    let run = env.run(&["--once"]).expect(0);
    run.stdout_has("nothing to do");
}

/// Starting a q35 domain makes libvirt move the `virtio-serial` controller it added for a
/// guest-agent channel behind the PCIe controllers in the inactive XML: the same
/// definition in another order, which the next sync must not take for drift (and
/// redefine in place).
#[test]
fn real_q35_start_reordering_controllers_is_no_drift() {
    let Some(env) = Env::system("q35order") else {
        return;
    };
    let name = env.name("vm");
    let xml = format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>64</memory>\n  \
         <os><type machine='q35'>hvm</type></os>\n  <devices><channel type='unix'>\
         <target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices>\n\
         </domain>\n"
    );
    let vm = Vm::new(&name).key("autostart = true").xml(&xml);
    env.commit(&Manifest::new().vm(vm), "q35 with a guest-agent channel");
    env.run(&["--once"]).expect(0);
    assert_eq!(env.domstate("vm"), "running");
    let run = env.run(&["--once"]).expect(0);
    run.stdout_lacks("drift").stdout_lacks("redefine");
    run.stdout_has("nothing to do");
    assert_eq!(env.vm_status("vm")["drift"], serde_json::json!([]));

    // A real change to a controller is still drift.
    let edited = env.inactive("vm").replace(
        "<controller type='virtio-serial' index='0'>",
        "<controller type='virtio-serial' index='0' ports='4'>",
    );
    assert!(edited.contains("ports='4'"), "{edited}");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &edited).unwrap();
    virsh_ok(&["define", &file.path().display().to_string()]);
    assert_eq!(
        env.vm_status("vm")["drift"],
        serde_json::json!(["definition changed outside vmsync"])
    );
}

#[test]
fn real_restart_shuts_down_first_and_defer_keeps_running() {
    let Some(env) = Env::system("restart") else {
        return;
    };
    let vms = |memory, defer_extra| {
        [
            Guest {
                name: "r",
                extra: "autostart = true\non_change = \"restart\"\nshutdown_timeout = \"3s\"",
                memory,
            },
            Guest {
                name: "d",
                extra: defer_extra,
                memory,
            },
        ]
    };
    commit(&env, &vms(128, "autostart = true"), "two running vms");
    env.run(&["--once"]).expect(0);
    let (id_r, id_d) = (env.domid("r"), env.domid("d"));

    commit(&env, &vms(256, "autostart = true"), "more memory");
    let started = std::time::Instant::now();
    let run = env.run(&["--once"]).expect(0);
    let (r, d) = (env.name("r"), env.name("d"));
    // The guest has no OS to honour ACPI: the shutdown was requested, the timeout
    // passed, and only then was it destroyed and started with the new definition.
    run.stdout_has(&format!(
        "{r}: redefine in place, restart (shutdown requested, still running after 3s, destroyed, started)"
    ));
    assert!(started.elapsed() >= std::time::Duration::from_secs(3));
    let requested = run
        .stderr
        .find("graceful shutdown requested")
        .expect("requested");
    let destroying = run.stderr.find("destroying").expect("destroyed");
    assert!(requested < destroying, "{}", run.stderr);
    assert_eq!(env.domstate("r"), "running");
    assert_ne!(env.domid("r"), id_r, "r was power-cycled");
    assert!(virsh_ok(&["dumpxml", &r]).contains("<memory unit='KiB'>262144</memory>"));

    // "defer": still running the old definition, reported as pending restart.
    run.stdout_has(&format!("{d}: redefine in place\n"));
    run.stdout_has(&format!("{d}: pending restart"));
    assert_eq!(env.domstate("d"), "running");
    assert_eq!(env.domid("d"), id_d, "d kept running");
    assert!(virsh_ok(&["dumpxml", &d]).contains("<memory unit='KiB'>131072</memory>"));
    assert_eq!(env.vm_status("d")["pending_restart"], true);
    assert_eq!(env.vm_status("r")["pending_restart"], false);

    // state = "stopped": the same graceful way down.
    commit(
        &env,
        &vms(256, "state = \"stopped\"\nshutdown_timeout = \"3s\""),
        "stop d",
    );
    let run = env.run(&["--once"]).expect(0);
    run.stdout_has(&format!(
        "{d}: clear autostart, stop (shutdown requested, still running after 3s, destroyed)"
    ));
    assert_eq!(env.domstate("d"), "shut off");
    assert_eq!(env.domstate("r"), "running");
}

#[test]
fn real_prune_removes_only_tagged_domains_and_keeps_disks_nvram_tpm() {
    let Some(env) = Env::system("prune") else {
        return;
    };
    let (gone, hand) = (env.name("gone"), env.name("hand"));

    // A UEFI + TPM guest (running) and a BIOS guest, both vmsync's; one made by hand.
    let keep_vm = env.vm("keep").file("vms/keep.xml");
    let gone_vm = env
        .vm("gone")
        .file("vms/gone.xml")
        .key("autostart = true")
        .xml(&uefi_tpm_xml(&gone, &env.disk("gone")));
    env.commit(
        &Manifest::new().vm(keep_vm.clone()).vm(gone_vm),
        "keep and gone",
    );
    let by_hand = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        by_hand.path(),
        bios_xml(&hand, "qemu", &env.images.join("hand.qcow2"), 96),
    )
    .unwrap();
    virsh_ok(&["define", &by_hand.path().display().to_string()]);
    env.run(&["--once"]).expect(0);
    assert_eq!(env.domstate("gone"), "running");
    let uuid = virsh_ok(&["domuuid", &gone]);
    let nvram = PathBuf::from(format!("/var/lib/libvirt/qemu/nvram/{gone}_VARS.fd"));
    let tpm = PathBuf::from(format!("/var/lib/libvirt/swtpm/{uuid}"));
    env.cleanup().also_remove(nvram.clone());
    env.cleanup().also_remove(tpm.clone());
    assert!(nvram.is_file() && tpm.is_dir());
    let hand_xml = virsh_ok(&["dumpxml", "--inactive", &hand]);

    // `gone` leaves the manifest. Pruning is off by default: left alone, said so.
    env.commit(&Manifest::new().vm(keep_vm), "drop gone");
    let run = env.run(&["--once"]).expect(0);
    assert!(env.defined("gone"), "{}", run.stdout);
    let run = env.run(&["plan", "--prune"]).expect(0);
    run.stdout_has(&format!(
        "{gone}: prune: stop (graceful shutdown, destroy after 2m), undefine (keeping NVRAM, TPM state and disks)"
    ));
    // Untagged domains are not even listed.
    run.stdout_lacks(&hand);
    assert!(env.defined("gone"), "plan changes nothing");

    let disk_hash = sha256_file(&env.disk("gone"));
    // The running firmware may still write its variables: the file itself must stay.
    let nvram_ino = std::fs::metadata(&nvram).unwrap().ino();
    let run = env
        .run(&["--once", "--prune", "--shutdown-timeout", "3s"])
        .expect(0);
    run.stdout_has(&format!(
        "{gone}: pruned: stop (shutdown requested, still running after 3s, destroyed), undefine"
    ));
    run.stdout_has(&format!(
        "orphaned disk (kept): {}",
        env.disk("gone").display()
    ));
    assert!(!env.defined("gone"));
    assert_eq!(sha256_file(&env.disk("gone")), disk_hash, "disk kept");
    assert_eq!(
        std::fs::metadata(&nvram).unwrap().ino(),
        nvram_ino,
        "NVRAM kept"
    );
    assert!(std::fs::metadata(&nvram).unwrap().len() > 0);
    assert!(tpm.is_dir(), "TPM state kept");
    assert!(env.defined("keep"));
    assert_eq!(
        virsh_ok(&["dumpxml", "--inactive", &hand]),
        hand_xml,
        "hand-made untouched"
    );
    let status = env.status();
    assert_eq!(
        status["orphaned_disks"][env.disk("gone").display().to_string()],
        gone.as_str()
    );
    assert!(
        status["vms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["name"] != gone.as_str())
    );
}

#[test]
fn real_mass_prune_is_refused_without_the_flag() {
    let Some(env) = Env::system("mass") else {
        return;
    };
    let vm = |name| Guest {
        name,
        extra: "",
        memory: 96,
    };
    commit(&env, &[vm("a"), vm("b"), vm("c")], "three");
    env.run(&["--once"]).expect(0);
    let applied = env.status()["last_applied_commit"].clone();

    // Two of three removed with max_prune = 1: refused, nothing applied.
    let c2 = commit(&env, &[vm("c")], "drop two");
    let run = env
        .run(&["--once", "--prune", "--max-prune", "1"])
        .expect(3);
    run.stderr_has(&format!("commit {c2} is refused; nothing was applied"));
    run.stderr_has("more than policy.max_prune = 1");
    assert!(env.defined("a") && env.defined("b"));
    let status = env.status();
    assert_eq!(status["last_result"], "refused");
    assert_eq!(status["last_applied_commit"], applied);
    let run = env.run(&["plan", "--prune", "--max-prune", "1"]).expect(0);
    run.stdout_has("REFUSED");
    for short in ["a", "b"] {
        assert!(
            run.stdout
                .contains(&format!("{}: prune: undefine", env.name(short))),
            "the plan shows what would go: {}",
            run.stdout
        );
    }

    // Every managed domain: refused even within max_prune.
    let c3 = commit(&env, &[], "empty manifest");
    let run = env.run(&["--once", "--prune"]).expect(3);
    run.stderr_has("every managed domain on this host (3)");
    assert!(env.defined("a") && env.defined("b") && env.defined("c"));

    // The operator confirms.
    let run = env
        .run(&["--once", "--prune", "--allow-mass-prune"])
        .expect(0);
    run.stdout_has(&format!("applied commit {c3}"));
    assert!(!env.defined("a") && !env.defined("b") && !env.defined("c"));
    for short in ["a", "b", "c"] {
        assert!(env.disk(short).exists(), "disks are never deleted");
    }
}
