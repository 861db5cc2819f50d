//! Tier 2, safe change handling on libvirt's in-process `test:///default` driver: the
//! graceful path of a restart (the test driver's domains honour a shutdown at once),
//! renames by UUID, pruning, a failing commit superseded by a newer one, per-VM
//! self-heal, and `--once --dry-run --json` from the real binary.

mod common;

use common::{Env, Manifest, TEST_URI, Vm, done, listing, sync_head};

use vmsync::agent::sync::SyncError;
use vmsync::host::hypervisor::{Hypervisor, Libvirt};
use vmsync::record::{Record, store};

const UUID: &str = "0f7e1b9c-4a44-4a8e-9b0e-2b1f4a3c5d6e";

/// Commits the VMs `(name, manifest keys, memory MiB, XML after <name>)`, without disks.
fn commit(env: &Env, vms: &[(&str, &str, u32, &str)]) -> String {
    let m = Manifest::new().vms(vms.iter().map(|(name, keys, memory, after_name)| {
        let xml = env
            .bios(name, *memory)
            .replace("</name>", &format!("</name>{after_name}"));
        Vm::new(name).key(keys).xml(&xml)
    }));
    env.commit(&m, "change")
}

#[test]
fn restart_policy_shuts_down_gracefully_on_the_test_driver() {
    let env = Env::new();
    let hv = Libvirt::connect(TEST_URI).unwrap();
    let settings = env.settings();
    let mut record = Record::default();
    let restart = "autostart = true\non_change = \"restart\"\nshutdown_timeout = \"30s\"";
    commit(
        &env,
        &[
            ("t2c-rst", restart, 128, ""),
            ("t2c-dfr", "autostart = true", 128, ""),
        ],
    );
    sync_head(&settings, &mut record, &hv).unwrap();
    assert!(listing(&hv, "t2c-rst").unwrap().active);

    commit(
        &env,
        &[
            ("t2c-rst", restart, 256, ""),
            ("t2c-dfr", "autostart = true", 256, ""),
        ],
    );
    let started = std::time::Instant::now();
    let report = sync_head(&settings, &mut record, &hv).unwrap();
    assert_eq!(
        done(&report, "t2c-rst"),
        vec![
            "redefine in place".to_string(),
            "restart (shut down gracefully, started)".to_string()
        ]
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "no waiting for the timeout when the guest honours the shutdown"
    );
    assert!(listing(&hv, "t2c-rst").unwrap().active);
    assert!(
        hv.xml("t2c-rst", false)
            .unwrap()
            .contains("<memory unit='KiB'>262144</memory>"),
        "running the new definition"
    );
    assert!(!record.vms["t2c-rst"].pending_restart);
    assert_eq!(
        done(&report, "t2c-dfr"),
        vec!["redefine in place".to_string()]
    );
    assert!(
        record.vms["t2c-dfr"].pending_restart,
        "defer: still the old definition"
    );
    assert!(listing(&hv, "t2c-dfr").unwrap().active);
}

#[test]
fn a_rename_with_the_same_uuid_renames_instead_of_duplicating() {
    let env = Env::new();
    let hv = Libvirt::connect(TEST_URI).unwrap();
    let settings = env.settings();
    let mut record = Record::default();
    let uuid = format!("<uuid>{UUID}</uuid>");
    commit(&env, &[("t2c-old", "", 128, &uuid)]);
    sync_head(&settings, &mut record, &hv).unwrap();

    commit(&env, &[("t2c-new", "", 128, &uuid)]);
    let report = sync_head(&settings, &mut record, &hv).unwrap();
    assert_eq!(
        done(&report, "t2c-new"),
        vec![
            "rename from 't2c-old'".to_string(),
            "redefine in place".to_string()
        ]
    );
    assert!(listing(&hv, "t2c-old").is_none(), "not duplicated");
    assert_eq!(listing(&hv, "t2c-new").unwrap().uuid, UUID);
    assert!(!record.vms.contains_key("t2c-old"));
    assert!(record.vms["t2c-new"].ok);

    // Running with on_change = "defer": a clear error, nothing done.
    hv.start("t2c-new").unwrap();
    commit(&env, &[("t2c-newer", "", 128, &uuid)]);
    let err = sync_head(&settings, &mut record, &hv).unwrap_err();
    assert!(matches!(err, SyncError::ActionsFailed { .. }), "{err}");
    assert!(
        record.vms["t2c-newer"]
            .last_error
            .as_deref()
            .unwrap()
            .contains("libvirt renames only shut-off domains")
    );
    assert!(listing(&hv, "t2c-new").unwrap().active);
    hv.destroy("t2c-new").unwrap();
}

#[test]
fn prune_undefines_only_tagged_domains_of_this_agent() {
    let env = Env::new();
    let hv = Libvirt::connect(TEST_URI).unwrap();
    let mut settings = env.settings();
    let mut record = Record::default();
    commit(
        &env,
        &[
            ("t2c-p-keep", "", 128, ""),
            ("t2c-p-gone", "autostart = true", 128, ""),
        ],
    );
    sync_head(&settings, &mut record, &hv).unwrap();
    hv.define(&common::hand_made_xml("t2c-p-hand")).unwrap();

    // Off: kept (and still this agent's).
    commit(&env, &[("t2c-p-keep", "", 128, "")]);
    let report = sync_head(&settings, &mut record, &hv).unwrap();
    assert!(report.plan.prune[0].skipped.is_some());
    assert!(listing(&hv, "t2c-p-gone").is_some());
    assert!(record.vms.contains_key("t2c-p-gone"));

    // On: the graceful stop works at once here, then undefine; the disk stays.
    let disk = env.disk("t2c-p-gone");
    std::fs::write(&disk, b"image").unwrap();
    settings.changes.prune = true;
    let report = sync_head(&settings, &mut record, &hv).unwrap();
    assert_eq!(
        report.outcome.pruned[0].done,
        vec![
            "stop (shut down gracefully)".to_string(),
            "undefine (keeping NVRAM, TPM state and disks)".to_string()
        ]
    );
    assert!(listing(&hv, "t2c-p-gone").is_none());
    assert!(
        listing(&hv, "t2c-p-hand").is_some(),
        "untagged: never touched"
    );
    assert!(listing(&hv, "t2c-p-keep").is_some());
    assert_eq!(std::fs::read(&disk).unwrap(), b"image");
    assert_eq!(
        record.orphaned_disks.get(&disk.display().to_string()),
        Some(&"t2c-p-gone".to_string())
    );
    assert!(!record.vms.contains_key("t2c-p-gone"));
    hv.undefine_keep_state("t2c-p-hand").unwrap();
}

#[test]
fn a_newer_commit_supersedes_a_failing_one() {
    let env = Env::new();
    let hv = Libvirt::connect(TEST_URI).unwrap();
    let settings = env.settings();
    let mut record = Record::default();
    hv.define(&common::hand_made_xml("t2c-s-hand")).unwrap();
    // One VM conflicts with a hand-made domain: it fails, the other is applied.
    let bad = commit(
        &env,
        &[("t2c-s-ok", "", 128, ""), ("t2c-s-hand", "", 128, "")],
    );
    assert!(sync_head(&settings, &mut record, &hv).is_err());
    assert!(
        listing(&hv, "t2c-s-ok").is_some(),
        "one failing vm does not stop the others"
    );
    assert_eq!(record.last_attempted_commit.as_deref(), Some(bad.as_str()));
    assert_ne!(record.last_applied_commit.as_deref(), Some(bad.as_str()));
    // The fix is a newer commit: it is applied as a whole; the failed one is not retried.
    let good = commit(&env, &[("t2c-s-ok", "", 256, "")]);
    let report = sync_head(&settings, &mut record, &hv).unwrap();
    assert_eq!(report.commit, good);
    assert_eq!(record.last_applied_commit.as_deref(), Some(good.as_str()));
    assert!(record.vms["t2c-s-ok"].ok);
    hv.undefine_keep_state("t2c-s-hand").unwrap();
}

#[test]
fn per_vm_self_heal_overrides_the_agent() {
    let env = Env::new();
    let hv = Libvirt::connect(TEST_URI).unwrap();
    let mut settings = env.settings();
    settings.changes.self_heal = false;
    let mut record = Record::default();
    commit(
        &env,
        &[
            ("t2c-h-on", "autostart = true\nself_heal = true", 128, ""),
            ("t2c-h-off", "autostart = true", 128, ""),
        ],
    );
    sync_head(&settings, &mut record, &hv).unwrap();
    hv.destroy("t2c-h-on").unwrap();
    hv.destroy("t2c-h-off").unwrap();
    let report = sync_head(&settings, &mut record, &hv).unwrap();
    assert_eq!(done(&report, "t2c-h-on"), vec!["start".to_string()]);
    assert!(done(&report, "t2c-h-off").is_empty());
    assert_eq!(
        record.vms["t2c-h-off"].drift,
        vec!["domain is shut off, committed state running".to_string()]
    );
    assert!(listing(&hv, "t2c-h-on").unwrap().active);
    assert!(!listing(&hv, "t2c-h-off").unwrap().active);
}

#[test]
fn dry_run_json_plans_everything_and_changes_nothing() {
    let env = Env::new();
    let disk = env.disk("t2c-dry");
    let vm = env.vm("t2c-dry").file("vm.xml").key("autostart = true");
    let commit = env.commit(&Manifest::new().vm(vm), "one");
    let state = env.state.path();
    let out = env.run(&["--once", "--dry-run", "--json"]).expect(0);
    let plan: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(plan["commit"], commit.as_str());
    let kinds: Vec<_> = plan["vms"][0]["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec!["create_disk", "define", "set_autostart", "start"]
    );
    let diff = plan["vms"][0]["diff"].as_str().unwrap();
    assert!(diff.contains("+  <name>t2c-dry</name>"), "{diff}");
    assert!(
        diff.contains("+  <memory unit='KiB'>131072</memory>"),
        "{diff}"
    );
    assert!(!disk.exists());
    assert!(!state.join("state.json").exists());
    env.run(&["plan"])
        .expect(0)
        .stdout_has("t2c-dry: create qcow2 disk");
    let json = env.run(&["plan", "--json"]).expect(0);
    assert!(json.stdout.trim_start().starts_with('{'));
    env.run(&["--json"])
        .expect(2)
        .stderr_has("--json goes with --once --dry-run (or use `vmsync plan --json`)");
    env.run(&["--dry-run"])
        .expect(2)
        .stderr_has("--dry-run and --allow-mass-prune go with --once");
    env.run(&["plan", "--allow-mass-prune"])
        .expect(2)
        .stderr_has("unexpected argument '--allow-mass-prune'");
    assert!(!state.join("state.json").exists());
    assert_eq!(store::load(state).unwrap(), Record::default());
}
