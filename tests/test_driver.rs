//! Tier 2: the real binary and the real pipeline against libvirt's in-process
//! `test:///default` driver (no daemon), real git repositories and real `qemu-img`.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use common::{Repo, bios_xml, sha256_file, vmsync};
use vmsync::config::Settings;
use vmsync::hypervisor::{Hypervisor, Libvirt, TestDriverSchema};
use vmsync::state;
use vmsync::sync::{self, SyncError};
use vmsync::validate::Policy;

fn manifest(images: &Path, names: &[&str]) -> String {
    let mut m = format!(
        "version = 1\n\n[[directory]]\npath = \"{}/ISOs\"\n",
        images.display()
    );
    for name in names {
        m += &format!(
            "\n[[vm]]\nname = \"{name}\"\nxml = \"vms/{name}.xml\"\nautostart = true\n\n  [[vm.disk]]\n  path = \"{}/{name}.qcow2\"\n  size = \"64M\"\n",
            images.display()
        );
    }
    m
}

fn repo_with(images: &Path, names: &[&str]) -> Repo {
    let repo = Repo::new();
    repo.write("vmsync.toml", &manifest(images, names));
    for name in names {
        repo.write(
            &format!("vms/{name}.xml"),
            &bios_xml(name, "kvm", &images.join(format!("{name}.qcow2")), 128),
        );
    }
    repo.commit("initial");
    repo
}

struct Env {
    repo: Repo,
    images: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Env {
    fn new(names: &[&str]) -> Self {
        let images = tempfile::tempdir().unwrap();
        let repo = repo_with(images.path(), names);
        Env {
            repo,
            images,
            state: tempfile::tempdir().unwrap(),
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--url".into(),
            self.repo.path().display().to_string(),
            "--state-dir".into(),
            self.state.path().display().to_string(),
            "--connect".into(),
            "test:///default".into(),
            "--disk-root".into(),
            self.images.path().display().to_string(),
            "--host".into(),
            "hv1".into(),
        ]
    }

    fn run(&self, extra: &[&str]) -> common::Run {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(self.args());
        vmsync(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Writes `vms/NAME.xml` with an element libvirt's schema does not know (`<vcpux>`).
    fn write_schema_bad(&self, name: &str, memory: u32) {
        let disk = self.images.path().join(format!("{name}.qcow2"));
        let xml = bios_xml(name, "kvm", &disk, memory)
            .replace("<vcpu>", "<vcpux>")
            .replace("</vcpu>", "</vcpux>");
        self.repo.write(&format!("vms/{name}.xml"), &xml);
    }

    fn settings(&self) -> Settings {
        common::settings(
            self.repo.path(),
            self.state.path(),
            self.images.path(),
            "test:///default",
        )
    }
}

#[test]
fn first_sync_creates_disks_defines_and_records() {
    let env = Env::new(&["t2-web", "t2-db"]);
    let head = env.repo.git(&["rev-parse", "HEAD"]).trim().to_string();
    let run = env.run(&["--once"]).expect(0);
    assert!(
        run.stdout.contains(&format!("applied commit {head}")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("t2-web: create qcow2 disk"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("define, set autostart, start"),
        "{}",
        run.stdout
    );
    assert!(env.images.path().join("ISOs").is_dir());
    for name in ["t2-web", "t2-db"] {
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(env.images.path().join(format!("{name}.qcow2")))
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 64 << 20);
    }
    // The converged line tells how long each stage took, in pipeline order.
    let stages = run
        .stderr
        .lines()
        .find(|l| l.contains(" converged "))
        .and_then(|l| l.split("stages_ms=").nth(1))
        .unwrap_or_else(|| panic!("no stage times in {}", run.stderr));
    let names: Vec<&str> = stages
        .split(", ")
        .map(|stage| {
            let (name, ms) = stage.trim().split_once(' ').expect("stage ms");
            assert!(ms.parse::<f64>().is_ok_and(|ms| ms >= 0.0), "{stages}");
            name
        })
        .collect();
    assert_eq!(
        names,
        ["fetch", "validate", "connect", "observe", "plan", "apply"]
    );
    let record = state::load(env.state.path()).unwrap();
    assert_eq!(record.last_applied_commit.as_deref(), Some(head.as_str()));
    assert_eq!(record.vms.len(), 2);
    assert!(record.vms["t2-web"].ok && record.vms["t2-web"].autostart);

    // status: the record's fields (the test driver of a new process has no domains).
    let mut args = vec!["status", "--json"];
    let common = env.args();
    args.extend(common.iter().map(String::as_str));
    let status: serde_json::Value = serde_json::from_str(&vmsync(&args).expect(0).stdout).unwrap();
    assert_eq!(status["last_applied_commit"], head.as_str());
    assert_eq!(status["last_attempted_commit"], head.as_str());
    assert_eq!(status["last_result"], "converged");
    let names: Vec<_> = status["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["t2-db", "t2-web"]);
    for key in [
        "defined",
        "active",
        "autostart",
        "applied_commit",
        "pending_restart",
        "drift",
    ] {
        assert!(status["vms"][0].get(key).is_some(), "missing {key}");
    }
}

#[test]
fn invalid_commit_exits_3_names_the_problem_and_changes_nothing() {
    let env = Env::new(&["t2-inv"]);
    env.run(&["--once"]).expect(0);
    let before = state::load(env.state.path()).unwrap();
    let disk = env.images.path().join("t2-inv.qcow2");
    let disk_hash = sha256_file(&disk);

    // A typo in a key, and a second VM whose XML names another domain.
    let mut m = manifest(env.images.path(), &["t2-inv", "t2-new"]).replacen(
        "autostart = true",
        "autostrat = true",
        1,
    );
    env.repo.write("vmsync.toml", &m);
    env.repo.write(
        "vms/t2-new.xml",
        &bios_xml(
            "t2-other",
            "kvm",
            &env.images.path().join("t2-new.qcow2"),
            128,
        ),
    );
    let bad = env.repo.commit("typo");
    let run = env.run(&["--once"]).expect(3);
    assert!(
        run.stderr
            .contains("vmsync.toml:9: vm 't2-inv': field 'autostrat': unknown field `autostrat`"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains(&format!("commit {bad} is invalid; nothing was applied")),
        "{}",
        run.stderr
    );

    // Fix the typo: now the mismatched <name> is the problem.
    m = manifest(env.images.path(), &["t2-inv", "t2-new"]);
    env.repo.write("vmsync.toml", &m);
    env.repo.commit("name mismatch");
    let run = env.run(&["--once"]).expect(3);
    assert!(
        run.stderr.contains("vms/t2-new.xml: vm 't2-new': field 'name': the xml's <name> is 't2-other' but the manifest says 't2-new'"),
        "{}",
        run.stderr
    );
    assert!(
        !env.images.path().join("t2-new.qcow2").exists(),
        "no disk of an invalid commit is created"
    );
    assert_eq!(sha256_file(&disk), disk_hash);

    let after = state::load(env.state.path()).unwrap();
    assert_eq!(after.last_applied_commit, before.last_applied_commit);
    assert_eq!(after.vms, before.vms);
    assert_eq!(after.last_result, Some(state::SyncResult::Invalid));
}

#[test]
fn lock_held_exits_75_at_once() {
    let env = Env::new(&["t2-lock"]);
    let _held = state::lock(env.state.path()).unwrap();
    let started = std::time::Instant::now();
    let run = env.run(&["--once"]).expect(75);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(
        run.stderr.contains("another vmsync is running"),
        "{}",
        run.stderr
    );
    assert!(
        state::load(env.state.path())
            .unwrap()
            .last_attempted_commit
            .is_none()
    );
}

/// A child forked by another thread shares the lock's open file until it executes its
/// program; a dropped lock must be free at once all the same (the next sync of an
/// in-process caller, or a test on another thread, takes it right away).
#[test]
fn a_dropped_lock_is_free_while_a_forked_child_still_shares_it() {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;

    let state = tempfile::tempdir().unwrap();
    let held = state::lock(state.path()).unwrap();
    let (mut forked, mut tell) = std::io::pipe().unwrap();
    let child = std::thread::spawn(move || {
        let mut cmd = std::process::Command::new("true");
        // SAFETY: between fork and exec only write(2) and nanosleep(2) are called.
        unsafe {
            cmd.pre_exec(move || {
                tell.write_all(b"x")?;
                std::thread::sleep(std::time::Duration::from_secs(1));
                Ok(())
            })
        };
        cmd.status().unwrap()
    });
    // The child exists and holds a copy of every descriptor, the lock's among them.
    forked.read_exact(&mut [0u8]).unwrap();
    drop(held);
    let again = state::lock(state.path());
    assert!(again.is_ok(), "{:?}", again.err());
    assert!(child.join().unwrap().success());
}

#[test]
fn fetch_and_config_errors_have_their_exit_codes() {
    let env = Env::new(&["t2-err"]);
    let state = env.state.path().display().to_string();
    let run = vmsync(&[
        "--once",
        "--url",
        "/nonexistent/vms",
        "--state-dir",
        &state,
        "--connect",
        "test:///default",
    ])
    .expect(4);
    assert!(run.stderr.contains("/nonexistent/vms"), "{}", run.stderr);
    assert_eq!(
        state::load(env.state.path()).unwrap().last_result,
        Some(state::SyncResult::FetchFailed)
    );

    let run = env.run(&["--once", "--branch", "nope"]).expect(4);
    assert!(run.stderr.contains("branch 'nope'"), "{}", run.stderr);

    vmsync(&["--once", "--state-dir", &state]).expect(2);
    let run = vmsync(&["--once", "--config", "/nonexistent/config.toml"]).expect(2);
    assert!(
        run.stderr.contains("failed to read config"),
        "{}",
        run.stderr
    );
}

#[test]
fn validate_dir_checks_every_host_offline() {
    let images = tempfile::tempdir().unwrap();
    let repo = repo_with(images.path(), &["t2-val"]);
    let root = images.path().display().to_string();
    let dir = repo.path().display().to_string();
    let run = vmsync(&["validate", &dir, "--disk-root", &root]).expect(0);
    assert!(run.stdout.contains("valid (1 vm(s)"), "{}", run.stdout);

    repo.write(
        "vms/t2-val.xml",
        &bios_xml("t2-val", "kvm", &images.path().join("t2-val.qcow2"), 128)
            .replace("<vcpu>", "<vcpus>")
            .replace("</vcpu>", "</vcpus>"),
    );
    let run = vmsync(&["validate", &dir, "--disk-root", &root]).expect(3);
    assert!(
        run.stderr
            .contains("vms/t2-val.xml: vm 't2-val': field 'xml': rejected by libvirt"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("vcpus"), "{}", run.stderr);

    let run = vmsync(&["validate", &dir, "--disk-root", "/srv/elsewhere"]).expect(3);
    assert!(
        run.stderr
            .contains("is not below a disk root ('/srv/elsewhere')"),
        "{}",
        run.stderr
    );
}

/// In one process the test driver keeps its domains, so a whole life cycle runs here.
#[test]
fn second_sync_is_a_noop_and_a_change_redefines_only_that_domain() {
    let env = Env::new(&["t2-cyc-a", "t2-cyc-b"]);
    let settings = env.settings();
    let hv = Libvirt::connect("test:///default").unwrap();
    let disks = vmsync::disk::QemuImg::default();
    let schema = TestDriverSchema::new().unwrap();
    let policy = Policy {
        host: Some("hv1".into()),
        disk_roots: settings.disk_roots.clone(),
        ..Default::default()
    };
    let sync_head = |record: &mut state::Record| {
        let fetched =
            vmsync::source::fetch(&settings.source().unwrap(), &settings.state_dir).unwrap();
        let commit = fetched.id();
        let desired = sync::validate_commit(&fetched, &commit, &policy, &schema)?;
        sync::apply_commit(
            &settings,
            record,
            &commit,
            &desired,
            &hv,
            &disks,
            &AtomicBool::new(false),
        )
    };
    let mut record = state::Record::default();

    let first = sync_head(&mut record).unwrap();
    assert_eq!(
        first.outcome.changes(),
        9,
        "1 directory + 2 x (disk, define, autostart, start)"
    );
    let uuid_a = hv
        .list()
        .unwrap()
        .into_iter()
        .find(|d| d.name == "t2-cyc-a")
        .unwrap()
        .uuid;
    let xml_b = hv.xml("t2-cyc-b", true).unwrap();

    let second = sync_head(&mut record).unwrap();
    assert_eq!(second.outcome.changes(), 0, "{:?}", second.outcome);
    assert!(second.plan.is_noop());

    env.repo.write(
        "vms/t2-cyc-a.xml",
        &bios_xml(
            "t2-cyc-a",
            "kvm",
            &env.images.path().join("t2-cyc-a.qcow2"),
            256,
        ),
    );
    let c3 = env.repo.commit("more memory for a");
    let third = sync_head(&mut record).unwrap();
    let done: Vec<_> = third
        .outcome
        .vms
        .iter()
        .map(|vm| (vm.name.as_str(), vm.done.clone()))
        .collect();
    assert_eq!(
        done,
        vec![
            ("t2-cyc-a", vec!["redefine in place".to_string()]),
            ("t2-cyc-b", vec![])
        ]
    );
    assert!(
        third.outcome.vms[0].pending_restart,
        "a is running with the old definition"
    );
    let a = hv
        .list()
        .unwrap()
        .into_iter()
        .find(|d| d.name == "t2-cyc-a")
        .unwrap();
    assert_eq!(a.uuid, uuid_a);
    assert!(a.active);
    let xml_a = hv.xml("t2-cyc-a", true).unwrap();
    assert!(xml_a.contains("262144"), "new memory applied");
    assert_eq!(vmsync::domain_xml::read_tag(&xml_a).unwrap().commit, c3);
    assert_eq!(hv.xml("t2-cyc-b", true).unwrap(), xml_b, "b untouched");
    assert_eq!(
        record.vms["t2-cyc-b"].applied_commit.as_deref(),
        Some(c3.as_str())
    );

    // A domain made by hand with a managed name is never touched: that VM fails.
    env.repo.write(
        "vmsync.toml",
        &manifest(env.images.path(), &["t2-cyc-a", "t2-cyc-b", "t2-cyc-hand"]),
    );
    env.repo.write(
        "vms/t2-cyc-hand.xml",
        &bios_xml(
            "t2-cyc-hand",
            "kvm",
            &env.images.path().join("t2-cyc-hand.qcow2"),
            128,
        ),
    );
    env.repo.commit("adopt a hand-made domain?");
    let by_hand = "<domain type='test'><name>t2-cyc-hand</name><memory>131072</memory><os><type>hvm</type></os></domain>";
    hv.define(by_hand).unwrap();
    let hand_xml = hv.xml("t2-cyc-hand", true).unwrap();
    let err = sync_head(&mut record).unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::ActionsFailed {
                failed: 1,
                total: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.exit_code(), 1);
    assert_eq!(hv.xml("t2-cyc-hand", true).unwrap(), hand_xml);
    assert!(!env.images.path().join("t2-cyc-hand.qcow2").exists());
    assert!(
        record.vms["t2-cyc-hand"]
            .last_error
            .as_deref()
            .unwrap()
            .contains("not defined by vmsync")
    );
    assert_eq!(
        record.last_applied_commit.as_deref(),
        Some(c3.as_str()),
        "failed commit not recorded as applied"
    );
    assert!(record.vms["t2-cyc-a"].ok, "the others were still applied");
}

#[test]
fn vms_for_other_hosts_are_left_alone() {
    let images = tempfile::tempdir().unwrap();
    let repo = Repo::new();
    let m = manifest(images.path(), &["t2-here", "t2-there"]).replacen(
        "name = \"t2-there\"",
        "name = \"t2-there\"\nhosts = [\"hv2\"]",
        1,
    );
    repo.write("vmsync.toml", &m);
    repo.write(
        "vms/t2-here.xml",
        &bios_xml("t2-here", "kvm", &images.path().join("t2-here.qcow2"), 128),
    );
    // hv2's XML is broken, which hv1 does not care about.
    repo.write("vms/t2-there.xml", "<domain>");
    repo.commit("two hosts");
    let state = tempfile::tempdir().unwrap();
    let run = vmsync(&[
        "--once",
        "--url",
        &repo.path().display().to_string(),
        "--state-dir",
        &state.path().display().to_string(),
        "--connect",
        "test:///default",
        "--disk-root",
        &images.path().display().to_string(),
        "--host",
        "hv1",
    ])
    .expect(0);
    assert!(run.stdout.contains("t2-here"), "{}", run.stdout);
    assert!(!run.stdout.contains("t2-there"), "{}", run.stdout);
    assert!(!images.path().join("t2-there.qcow2").exists());
}

#[test]
fn stopping_before_an_action_leaves_no_half_done_vm_and_no_applied_record() {
    let env = Env::new(&["t2-stop"]);
    let settings = env.settings();
    let hv = Libvirt::connect("test:///default").unwrap();
    let fetched = vmsync::source::fetch(&settings.source().unwrap(), &settings.state_dir).unwrap();
    let commit = fetched.id();
    let policy = Policy {
        host: Some("hv1".into()),
        disk_roots: settings.disk_roots.clone(),
        ..Default::default()
    };
    let desired = sync::validate_commit(
        &fetched,
        &commit,
        &policy,
        &TestDriverSchema::new().unwrap(),
    )
    .unwrap();
    let mut record = state::Record::default();
    let cancel = AtomicBool::new(true);
    let err = sync::apply_commit(
        &settings,
        &mut record,
        &commit,
        &desired,
        &hv,
        &vmsync::disk::QemuImg::default(),
        &cancel,
    )
    .unwrap_err();
    assert!(matches!(err, SyncError::ActionsFailed { .. }), "{err}");
    assert_eq!(record.last_applied_commit, None);
    assert_eq!(
        record.vms["t2-stop"].last_error.as_deref(),
        Some(vmsync::apply::INTERRUPTED)
    );
    assert!(!hv.list().unwrap().iter().any(|d| d.name == "t2-stop"));
    assert!(!env.images.path().join("t2-stop.qcow2").exists());
    // The next run (not stopping) converges.
    let report = sync::apply_commit(
        &settings,
        &mut record,
        &commit,
        &desired,
        &hv,
        &vmsync::disk::QemuImg::default(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(report.outcome.all_ok());
    assert_eq!(record.last_applied_commit.as_deref(), Some(commit.as_str()));
}

#[test]
fn cached_validation_still_checks_names_and_sees_changed_files() {
    let env = Env::new(&["t2-cache"]);
    env.run(&["--once"]).expect(0);
    let cache = env.state.path().join(vmsync::schema_cache::CACHE_FILE);
    let text = std::fs::read_to_string(&cache).unwrap();
    assert!(
        text.contains("\"blob:"),
        "validated files are remembered by blob id: {text}"
    );

    // Same XML blob, but the manifest now calls the VM something else: still refused.
    let m = manifest(env.images.path(), &["t2-cache"])
        .replace("name = \"t2-cache\"", "name = \"t2-renamed\"");
    env.repo.write("vmsync.toml", &m);
    env.repo.commit("rename in the manifest only");
    let run = env.run(&["--once"]).expect(3);
    assert!(
        run.stderr
            .contains("the xml's <name> is 't2-cache' but the manifest says 't2-renamed'"),
        "{}",
        run.stderr
    );

    // A changed file is a new blob: checked against the schema again.
    env.repo
        .write("vmsync.toml", &manifest(env.images.path(), &["t2-cache"]));
    env.write_schema_bad("t2-cache", 128);
    env.repo.commit("schema error");
    let run = env.run(&["--once"]).expect(3);
    assert!(
        run.stderr.contains("rejected by libvirt") && run.stderr.contains("vcpux"),
        "{}",
        run.stderr
    );
}

/// The child a sync starts for libvirt's schema checks (`vmsync schema-check`): libvirt's
/// verdict per XML, in order, with libvirt's message for a rejected one.
#[test]
fn schema_check_child_gives_libvirts_verdict_per_xml() {
    let good = "<domain type='qemu'><name>sc-good</name><memory>131072</memory><os><type arch='x86_64'>hvm</type></os></domain>";
    let unknown_element = good.replace("<memory>", "<vcpux>1</vcpux><memory>");
    let bad_value = good.replace("131072", "lots");
    let verdicts = vmsync::schema_check::spawn(
        Path::new(env!("CARGO_BIN_EXE_vmsync")),
        &[
            good.to_string(),
            unknown_element,
            bad_value,
            good.to_string(),
        ],
    )
    .unwrap()
    .wait()
    .unwrap();
    assert_eq!(verdicts.len(), 4);
    assert_eq!((&verdicts[0], &verdicts[3]), (&None, &None), "{verdicts:?}");
    let first = verdicts[1].as_deref().unwrap_or_default();
    assert!(first.contains("vcpux"), "{first}");
    assert!(verdicts[2].is_some(), "{verdicts:?}");
}

/// The schema checks run in a child while the host is observed: their verdict still
/// comes before anything changes, and with other mistakes all are reported at once.
#[test]
fn schema_rejection_in_the_child_changes_nothing() {
    let env = Env::new(&["t2-mixa", "t2-mixb"]);
    let images = env.images.path();
    env.write_schema_bad("t2-mixa", 128);
    env.repo.write(
        "vms/t2-mixb.xml",
        &bios_xml("t2-other", "kvm", &images.join("t2-mixb.qcow2"), 128),
    );
    env.repo.commit("two mistakes");
    let run = env.run(&["--once"]).expect(3);
    assert!(
        run.stderr
            .contains("vms/t2-mixa.xml: vm 't2-mixa': field 'xml': rejected by libvirt")
            && run.stderr.contains("vcpux"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("the xml's <name> is 't2-other' but the manifest says 't2-mixb'"),
        "{}",
        run.stderr
    );

    // Only the schema mistake left: t2-mixb is valid, but nothing is applied, not even
    // its disk, because the child's verdict is awaited before planning.
    env.repo.write(
        "vms/t2-mixb.xml",
        &bios_xml("t2-mixb", "kvm", &images.join("t2-mixb.qcow2"), 128),
    );
    env.repo.commit("one mistake");
    let run = env.run(&["--once"]).expect(3);
    assert!(run.stderr.contains("vcpux"), "{}", run.stderr);
    assert!(!images.join("t2-mixa.qcow2").exists());
    assert!(!images.join("t2-mixb.qcow2").exists());
    let record = state::load(env.state.path()).unwrap();
    assert_eq!(record.last_applied_commit, None);
    assert_eq!(record.last_result, Some(state::SyncResult::Invalid));
}

/// A child that cannot be started (no `/proc`, a missing executable): the schema checks
/// run in this process instead, with the same verdicts.
#[test]
fn schema_checks_run_here_when_the_child_cannot_start() {
    let env = Env::new(&["t2-here"]);
    let settings = env.settings();
    let cancel = AtomicBool::new(false);
    let options = sync::Options {
        give_up_after: None,
        cancel: &cancel,
        allow_rewind: false,
        child_exe: Some(Path::new("/nonexistent/vmsync")),
    };
    let mut conn = sync::Connection::new("test:///default");
    let report = sync::run(&settings, &mut conn, &options).unwrap();
    assert!(report.outcome.all_ok() && report.outcome.changes() > 0);

    env.write_schema_bad("t2-here", 256);
    env.repo.commit("schema mistake");
    let err = sync::run(&settings, &mut conn, &options).unwrap_err();
    assert_eq!(err.exit_code(), 3, "{err}");
    assert!(err.to_string().contains("vcpux"), "{err}");
}

/// A commit that changes one file, whose define is the only change: libvirt's validating
/// define is its schema check, and no child is started (here a "child" that would fail).
/// Any other commit has its XML checked before anything is applied, and a rejected define
/// is reported as the schema mistake it is, with nothing changed.
#[test]
fn one_changed_file_is_checked_by_its_validating_define() {
    let env = Env::new(&["t2-def-a", "t2-def-b"]);
    let settings = env.settings();
    let cancel = AtomicBool::new(false);
    let options = |checker| sync::Options {
        give_up_after: None,
        cancel: &cancel,
        allow_rewind: false,
        child_exe: Some(checker),
    };
    let real = Path::new(env!("CARGO_BIN_EXE_vmsync"));
    let failing = Path::new("/bin/false");
    let mut conn = sync::Connection::new("test:///default");
    sync::run(&settings, &mut conn, &options(real)).unwrap();
    let memory = |conn: &mut sync::Connection, name: &str| {
        let xml = conn.get().unwrap().xml(name, true).unwrap();
        xml.split("<memory unit='KiB'>").nth(1).unwrap()[..6].to_string()
    };
    let applied = |env: &Env| {
        state::load(env.state.path())
            .unwrap()
            .last_applied_commit
            .unwrap()
    };
    let images = env.images.path();
    let write = |name: &str, mib| {
        let xml = bios_xml(name, "kvm", &images.join(format!("{name}.qcow2")), mib);
        env.repo.write(&format!("vms/{name}.xml"), &xml);
    };

    // One file changed: redefined without a child.
    write("t2-def-a", 256);
    let one = env.repo.commit("more memory for a");
    let report = sync::run(&settings, &mut conn, &options(failing)).unwrap();
    assert_eq!(report.outcome.changes(), 1);
    assert_eq!(memory(&mut conn, "t2-def-a"), "262144");
    assert_eq!(applied(&env), one);
    // Its pass is remembered: the same blob needs no check at the next commit.
    env.repo.write("README.md", "unrelated\n");
    let unrelated = env.repo.commit("unrelated");
    sync::run(&settings, &mut conn, &options(failing)).unwrap();
    assert_eq!(applied(&env), unrelated);

    // Two files changed: checked before anything is applied (the failing child fails it).
    write("t2-def-a", 384);
    write("t2-def-b", 384);
    env.repo.commit("more memory for both");
    let err = sync::run(&settings, &mut conn, &options(failing)).unwrap_err();
    assert_eq!(err.exit_code(), 1, "{err}");
    assert_eq!(memory(&mut conn, "t2-def-a"), "262144");
    assert_eq!(memory(&mut conn, "t2-def-b"), "131072");

    // One file changed, but a disk is created before its define: checked first too, and
    // the disk is not created.
    write("t2-def-b", 128);
    let m = manifest(images, &["t2-def-a", "t2-def-b"]).replace(
        "autostart = true\n\n  [[vm.disk]]\n  path = \"",
        &format!(
            "autostart = true\n\n  [[vm.disk]]\n  path = \"{}/t2-def-extra.qcow2\"\n  size = \"8M\"\n\n  [[vm.disk]]\n  path = \"",
            images.display()
        ),
    );
    env.repo.write("vmsync.toml", &m);
    env.repo.commit("a second disk for a");
    let err = sync::run(&settings, &mut conn, &options(failing)).unwrap_err();
    assert_eq!(err.exit_code(), 1, "{err}");
    assert!(!images.join("t2-def-extra.qcow2").exists());
    assert_eq!(memory(&mut conn, "t2-def-a"), "262144");
    assert_eq!(applied(&env), unrelated);

    // One file changed and invalid: the define is refused, the child names the mistake,
    // nothing changed, the last applied commit stays.
    env.repo
        .write("vmsync.toml", &manifest(images, &["t2-def-a", "t2-def-b"]));
    env.write_schema_bad("t2-def-a", 512);
    env.repo.commit("schema mistake in a");
    let err = sync::run(&settings, &mut conn, &options(real)).unwrap_err();
    assert_eq!(err.exit_code(), 3, "{err}");
    assert!(
        err.to_string()
            .contains("vms/t2-def-a.xml: vm 't2-def-a': field 'xml': rejected by libvirt")
            && err.to_string().contains("vcpux"),
        "{err}"
    );
    assert_eq!(memory(&mut conn, "t2-def-a"), "262144");
    let record = state::load(env.state.path()).unwrap();
    assert_eq!(
        record.last_applied_commit.as_deref(),
        Some(unrelated.as_str())
    );
    assert_eq!(record.last_result, Some(state::SyncResult::Invalid));
}

/// libgit2 leaves a pack per fetch; past `packs::MAX_PACKS` a sync merges them in its
/// `pack-clone` child, and the clone still serves the syncs after it.
#[test]
fn the_local_clone_keeps_few_packs() {
    let env = Env::new(&["t2-packs"]);
    let clone = env.state.path().join("repo");
    let mut packed = false;
    for i in 0..=vmsync::packs::MAX_PACKS + 1 {
        env.repo.write("README.md", &format!("commit {i}\n"));
        let commit = env.repo.commit(&format!("commit {i}"));
        let run = env.run(&["--once"]).expect(0);
        packed |= run.stderr.contains("packed the local clone");
        let packs = vmsync::packs::packs(&clone).len();
        assert!(
            packs <= vmsync::packs::MAX_PACKS,
            "{packs} packs after {i} syncs"
        );
        let record = state::load(env.state.path()).unwrap();
        assert_eq!(record.last_applied_commit.as_deref(), Some(commit.as_str()));
    }
    assert!(packed, "the packs were merged once");
}
