//! Tier 2, safe change handling on libvirt's in-process `test:///default` driver: the
//! graceful path of a restart (the test driver's domains honour a shutdown at once),
//! renames by UUID, pruning, a failing commit superseded by a newer one, per-VM
//! self-heal, and `--once --dry-run --json` from the real binary.

mod common;

use std::path::Path;

use common::{Repo, bios_xml, vmsync};
use vmsync::agent::state::{self, Record};
use vmsync::agent::sync::{self, Report, SyncError};
use vmsync::config::{ChangePolicy, Settings};
use vmsync::desired::validate::Policy;
use vmsync::host::hypervisor::{Hypervisor, Libvirt, TestDriverSchema};

const UUID: &str = "0f7e1b9c-4a44-4a8e-9b0e-2b1f4a3c5d6e";

struct Env {
    repo: Repo,
    images: tempfile::TempDir,
    state: tempfile::TempDir,
    hv: Libvirt,
    changes: ChangePolicy,
}

impl Env {
    fn new() -> Self {
        Env {
            repo: Repo::new(),
            images: tempfile::tempdir().unwrap(),
            state: tempfile::tempdir().unwrap(),
            hv: Libvirt::connect("test:///default").unwrap(),
            changes: ChangePolicy::default(),
        }
    }

    /// Commits `(name, extra manifest keys, memory MiB, extra xml after <name>)`.
    fn commit(&self, vms: &[(&str, &str, u32, &str)]) -> String {
        let mut m = "version = 1\n".to_string();
        for (name, extra, memory, xml_extra) in vms {
            m += &format!("\n[[vm]]\nname = \"{name}\"\nxml = \"vms/{name}.xml\"\n{extra}\n");
            let disk = self.images.path().join(format!("{name}.qcow2"));
            self.repo.write(
                &format!("vms/{name}.xml"),
                &bios_xml(name, "kvm", &disk, *memory)
                    .replace("</name>", &format!("</name>{xml_extra}")),
            );
        }
        self.repo.write("vmsync.toml", &m);
        self.repo.commit("change")
    }

    fn settings(&self) -> Settings {
        let base = common::settings(
            self.repo.path(),
            self.state.path(),
            self.images.path(),
            "test:///default",
        );
        Settings {
            changes: self.changes.clone(),
            ..base
        }
    }

    fn sync(&self, record: &mut Record) -> Result<Report, SyncError> {
        let settings = self.settings();
        let fetched =
            vmsync::repo::source::fetch(&settings.source().unwrap(), &settings.state_dir).unwrap();
        let commit = fetched.id();
        let policy = Policy {
            host: Some("hv1".into()),
            disk_roots: settings.disk_roots.clone(),
            host_policy: settings.host_policy.clone(),
        };
        let desired = sync::validate_commit(
            &fetched,
            &commit,
            &policy,
            &TestDriverSchema::new().unwrap(),
        )?;
        sync::apply_commit(
            &settings,
            record,
            &commit,
            &desired,
            &self.hv,
            &vmsync::host::disk::QemuImg::default(),
            &std::sync::atomic::AtomicBool::new(false),
        )
    }

    fn listing(&self, name: &str) -> Option<vmsync::host::hypervisor::Listing> {
        self.hv.list().unwrap().into_iter().find(|d| d.name == name)
    }

    fn done(report: &Report, name: &str) -> Vec<String> {
        report
            .outcome
            .vms
            .iter()
            .find(|vm| vm.name == name)
            .unwrap()
            .done
            .clone()
    }
}

#[test]
fn restart_policy_shuts_down_gracefully_on_the_test_driver() {
    let env = Env::new();
    let mut record = Record::default();
    let restart = "autostart = true\non_change = \"restart\"\nshutdown_timeout = \"30s\"";
    env.commit(&[
        ("t2c-rst", restart, 128, ""),
        ("t2c-dfr", "autostart = true", 128, ""),
    ]);
    env.sync(&mut record).unwrap();
    assert!(env.listing("t2c-rst").unwrap().active);

    env.commit(&[
        ("t2c-rst", restart, 256, ""),
        ("t2c-dfr", "autostart = true", 256, ""),
    ]);
    let started = std::time::Instant::now();
    let report = env.sync(&mut record).unwrap();
    assert_eq!(
        Env::done(&report, "t2c-rst"),
        vec![
            "redefine in place".to_string(),
            "restart (shut down gracefully, started)".to_string()
        ]
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "no waiting for the timeout when the guest honours the shutdown"
    );
    assert!(env.listing("t2c-rst").unwrap().active);
    assert!(
        env.hv
            .xml("t2c-rst", false)
            .unwrap()
            .contains("<memory unit='KiB'>262144</memory>"),
        "running the new definition"
    );
    assert!(!record.vms["t2c-rst"].pending_restart);
    assert_eq!(
        Env::done(&report, "t2c-dfr"),
        vec!["redefine in place".to_string()]
    );
    assert!(
        record.vms["t2c-dfr"].pending_restart,
        "defer: still the old definition"
    );
    assert!(env.listing("t2c-dfr").unwrap().active);
}

#[test]
fn a_rename_with_the_same_uuid_renames_instead_of_duplicating() {
    let env = Env::new();
    let mut record = Record::default();
    let uuid = format!("<uuid>{UUID}</uuid>");
    env.commit(&[("t2c-old", "", 128, &uuid)]);
    env.sync(&mut record).unwrap();

    env.commit(&[("t2c-new", "", 128, &uuid)]);
    let report = env.sync(&mut record).unwrap();
    assert_eq!(
        Env::done(&report, "t2c-new"),
        vec![
            "rename from 't2c-old'".to_string(),
            "redefine in place".to_string()
        ]
    );
    assert!(env.listing("t2c-old").is_none(), "not duplicated");
    assert_eq!(env.listing("t2c-new").unwrap().uuid, UUID);
    assert!(!record.vms.contains_key("t2c-old"));
    assert!(record.vms["t2c-new"].ok);

    // Running with on_change = "defer": a clear error, nothing done.
    env.hv.start("t2c-new").unwrap();
    env.commit(&[("t2c-newer", "", 128, &uuid)]);
    let err = env.sync(&mut record).unwrap_err();
    assert!(matches!(err, SyncError::ActionsFailed { .. }), "{err}");
    assert!(
        record.vms["t2c-newer"]
            .last_error
            .as_deref()
            .unwrap()
            .contains("libvirt renames only shut-off domains")
    );
    assert!(env.listing("t2c-new").unwrap().active);
    env.hv.destroy("t2c-new").unwrap();
}

#[test]
fn prune_undefines_only_tagged_domains_of_this_agent() {
    let mut env = Env::new();
    let mut record = Record::default();
    env.commit(&[
        ("t2c-p-keep", "", 128, ""),
        ("t2c-p-gone", "autostart = true", 128, ""),
    ]);
    env.sync(&mut record).unwrap();
    let hand = "<domain type='test'><name>t2c-p-hand</name><memory>131072</memory><os><type>hvm</type></os></domain>";
    env.hv.define(hand).unwrap();

    // Off: kept (and still this agent's).
    env.commit(&[("t2c-p-keep", "", 128, "")]);
    let report = env.sync(&mut record).unwrap();
    assert!(report.plan.prune[0].skipped.is_some());
    assert!(env.listing("t2c-p-gone").is_some());
    assert!(record.vms.contains_key("t2c-p-gone"));

    // On: the graceful stop works at once here, then undefine; the disk stays.
    let disk = env.images.path().join("t2c-p-gone.qcow2");
    std::fs::write(&disk, b"image").unwrap();
    env.changes.prune = true;
    let report = env.sync(&mut record).unwrap();
    assert_eq!(
        report.outcome.pruned[0].done,
        vec![
            "stop (shut down gracefully)".to_string(),
            "undefine (keeping NVRAM, TPM state and disks)".to_string()
        ]
    );
    assert!(env.listing("t2c-p-gone").is_none());
    assert!(
        env.listing("t2c-p-hand").is_some(),
        "untagged: never touched"
    );
    assert!(env.listing("t2c-p-keep").is_some());
    assert_eq!(std::fs::read(&disk).unwrap(), b"image");
    assert_eq!(
        record.orphaned_disks.get(&disk.display().to_string()),
        Some(&"t2c-p-gone".to_string())
    );
    assert!(!record.vms.contains_key("t2c-p-gone"));
    env.hv.undefine_keep_state("t2c-p-hand").unwrap();
}

#[test]
fn a_newer_commit_supersedes_a_failing_one() {
    let env = Env::new();
    let mut record = Record::default();
    let hand = "<domain type='test'><name>t2c-s-hand</name><memory>131072</memory><os><type>hvm</type></os></domain>";
    env.hv.define(hand).unwrap();
    // One VM conflicts with a hand-made domain: it fails, the other is applied.
    let bad = env.commit(&[("t2c-s-ok", "", 128, ""), ("t2c-s-hand", "", 128, "")]);
    assert!(env.sync(&mut record).is_err());
    assert!(
        env.listing("t2c-s-ok").is_some(),
        "one failing vm does not stop the others"
    );
    assert_eq!(record.last_attempted_commit.as_deref(), Some(bad.as_str()));
    assert_ne!(record.last_applied_commit.as_deref(), Some(bad.as_str()));
    // The fix is a newer commit: it is applied as a whole; the failed one is not retried.
    let good = env.commit(&[("t2c-s-ok", "", 256, "")]);
    let report = env.sync(&mut record).unwrap();
    assert_eq!(report.commit, good);
    assert_eq!(record.last_applied_commit.as_deref(), Some(good.as_str()));
    assert!(record.vms["t2c-s-ok"].ok);
    env.hv.undefine_keep_state("t2c-s-hand").unwrap();
}

#[test]
fn per_vm_self_heal_overrides_the_agent() {
    let mut env = Env::new();
    env.changes.self_heal = false;
    let mut record = Record::default();
    env.commit(&[
        ("t2c-h-on", "autostart = true\nself_heal = true", 128, ""),
        ("t2c-h-off", "autostart = true", 128, ""),
    ]);
    env.sync(&mut record).unwrap();
    env.hv.destroy("t2c-h-on").unwrap();
    env.hv.destroy("t2c-h-off").unwrap();
    let report = env.sync(&mut record).unwrap();
    assert_eq!(Env::done(&report, "t2c-h-on"), vec!["start".to_string()]);
    assert!(Env::done(&report, "t2c-h-off").is_empty());
    assert_eq!(
        record.vms["t2c-h-off"].drift,
        vec!["domain is shut off, committed state running".to_string()]
    );
    assert!(env.listing("t2c-h-on").unwrap().active);
    assert!(!env.listing("t2c-h-off").unwrap().active);
}

#[test]
fn dry_run_json_plans_everything_and_changes_nothing() {
    let images = tempfile::tempdir().unwrap();
    let repo = Repo::new();
    let disk = images.path().join("t2c-dry.qcow2");
    repo.write(
        "vmsync.toml",
        &format!(
            "version = 1\n[[vm]]\nname = \"t2c-dry\"\nxml = \"vm.xml\"\nautostart = true\n  [[vm.disk]]\n  path = \"{}\"\n  size = \"64M\"\n",
            disk.display()
        ),
    );
    repo.write("vm.xml", &bios_xml("t2c-dry", "kvm", &disk, 128));
    let commit = repo.commit("one");
    let state = tempfile::tempdir().unwrap();
    let args = [
        "--url",
        &repo.path().display().to_string(),
        "--state-dir",
        &state.path().display().to_string(),
        "--connect",
        "test:///default",
        "--disk-root",
        &images.path().display().to_string(),
    ]
    .map(|s| s.to_string());
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = extra.to_vec();
        a.extend(args.iter().map(String::as_str));
        vmsync(&a)
    };
    let out = run(&["--once", "--dry-run", "--json"]).expect(0);
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
    assert!(!state.path().join("state.json").exists());
    let text = run(&["plan"]).expect(0);
    assert!(
        text.stdout.contains("t2c-dry: create qcow2 disk"),
        "{}",
        text.stdout
    );
    let json = run(&["plan", "--json"]).expect(0);
    assert!(json.stdout.trim_start().starts_with('{'));
    run(&["--json"]).expect(2);
    run(&["--dry-run"]).expect(2);
    run(&["plan", "--allow-mass-prune"]).expect(2);
    assert!(!Path::new(&state.path().join("state.json")).exists());
    assert_eq!(state::load(state.path()).unwrap(), Record::default());
}
