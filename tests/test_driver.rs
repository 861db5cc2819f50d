//! Tier 2: the real binary and the real pipeline against libvirt's in-process
//! `test:///default` driver (no daemon), real git repositories and real `qemu-img`.

mod common;

use std::sync::atomic::AtomicBool;

use common::{Env, Manifest, Vm, bios_xml, hand_made_xml, listing, sha256_file, vmsync};

use vmsync::agent::sync::{self, SyncError};
use vmsync::host::hypervisor::{Hypervisor, Libvirt};
use vmsync::record;
use vmsync::util::fsio;

/// An ISOs directory and `vms`, autostarted.
fn manifest(env: &Env, vms: impl IntoIterator<Item = Vm>) -> Manifest {
    Manifest::new()
        .directory(&env.images.join("ISOs"))
        .vms(vms.into_iter().map(|vm| vm.key("autostart = true")))
}

/// The standard VMs `names` (one 64M disk each, see [`Env::vm`]).
fn vms<'a>(env: &'a Env, names: &'a [&str]) -> impl Iterator<Item = Vm> + 'a {
    names.iter().map(|name| env.vm(name))
}

/// An env on the test driver with [`manifest`] of the VMs `names` committed.
fn env_with(names: &[&str]) -> Env {
    let env = Env::new();
    env.commit(&manifest(&env, vms(&env, names)), "initial");
    env
}

#[test]
fn first_sync_creates_disks_defines_and_records() {
    let env = env_with(&["t2-web", "t2-db"]);
    let head = env.repo.head();
    let run = env.run(&["--once"]).expect(0);
    run.stdout_has(&format!("applied commit {head}"))
        .stdout_has("t2-web: create qcow2 disk")
        .stdout_has("define, set autostart, start");
    assert!(env.images.join("ISOs").is_dir());
    for name in ["t2-web", "t2-db"] {
        let info = common::qemu_img_info(&env.disk(name));
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
    let record = env.record();
    assert_eq!(record.last_applied_commit.as_deref(), Some(head.as_str()));
    assert_eq!(record.vms.len(), 2);
    assert!(record.vms["t2-web"].ok && record.vms["t2-web"].autostart);

    // status: the record's fields (the test driver of a new process has no domains).
    let status = env.status();
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
    let env = env_with(&["t2-inv"]);
    env.run(&["--once"]).expect(0);
    let before = env.record();
    let disk = env.disk("t2-inv");
    let disk_hash = sha256_file(&disk);

    // A typo in a key, and a second VM whose XML names another domain.
    let other = bios_xml("t2-other", "kvm", &env.disk("t2-new"), 128);
    let typo = Manifest::new()
        .directory(&env.images.join("ISOs"))
        .vm(env.vm("t2-inv").key("autostrat = true"))
        .vm(env.vm("t2-new").key("autostart = true").xml(&other));
    let bad = env.commit(&typo, "typo");
    env.run(&["--once"])
        .expect(3)
        .stderr_has("vmsync.toml:9: vm 't2-inv': field 'autostrat': unknown field `autostrat`")
        .stderr_has(&format!("commit {bad} is invalid; nothing was applied"));

    // Fix the typo: now the mismatched <name> is the problem.
    let fixed = manifest(&env, vms(&env, &["t2-inv", "t2-new"])).toml();
    env.repo.write("vmsync.toml", &fixed);
    env.repo.commit("name mismatch");
    env.run(&["--once"]).expect(3).stderr_has(
        "vms/t2-new.xml: vm 't2-new': field 'name': the xml's <name> is 't2-other' but the manifest says 't2-new'",
    );
    assert!(
        !env.disk("t2-new").exists(),
        "no disk of an invalid commit is created"
    );
    assert_eq!(sha256_file(&disk), disk_hash);

    let after = env.record();
    assert_eq!(after.last_applied_commit, before.last_applied_commit);
    assert_eq!(after.vms, before.vms);
    assert_eq!(after.last_result, Some(record::SyncResult::Invalid));
}

/// The log as a timer's run or a pipe gets it: plain text (no colour codes without a
/// terminal, `NO_COLOR` unset), a held lock at INFO (a normal outcome, exit 75), and a
/// definition diff one line per event, each with its VM and commit: no line without
/// its level and fields (under journald each line is an entry of its own).
#[test]
fn log_lines_are_plain_whole_and_a_held_lock_is_no_error() {
    let env = env_with(&["t2-logs"]);
    let run_piped = || -> common::Run {
        env.command(&["--once"])
            .env_remove("NO_COLOR")
            .env_remove("JOURNAL_STREAM")
            .output()
            .unwrap()
            .into()
    };
    let held = fsio::lock(env.state.path()).unwrap();
    let run = run_piped().expect(75);
    assert!(!run.stderr.contains("\x1b["), "{:?}", run.stderr);
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("another vmsync is running"))
        .unwrap_or_else(|| panic!("{}", run.stderr));
    assert!(line.contains(" INFO "), "{line}");
    assert!(!run.stderr.contains("ERROR"), "{}", run.stderr);
    drop(held);

    let run = run_piped().expect(0);
    assert!(!run.stderr.contains("\x1b["), "{:?}", run.stderr);
    let diff: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("definition diff"))
        .collect();
    assert!(
        diff.len() > 5,
        "a new domain's whole definition: {}",
        run.stderr
    );
    for line in &diff {
        assert!(line.contains(" vm=t2-logs commit="), "{line}");
    }
    assert!(
        diff.iter()
            .any(|l| l.ends_with("line=+  <name>t2-logs</name>")),
        "{diff:#?}"
    );
    for line in run.stderr.lines() {
        assert!(
            [" INFO ", " WARN ", "ERROR ", "DEBUG ", "TRACE "]
                .iter()
                .any(|level| line.contains(level)),
            "a line without its event: {line:?}\n{}",
            run.stderr
        );
    }
}

#[test]
fn lock_held_exits_75_at_once() {
    let env = env_with(&["t2-lock"]);
    let _held = fsio::lock(env.state.path()).unwrap();
    let started = std::time::Instant::now();
    let run = env.run(&["--once"]).expect(75);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    run.stderr_has(&format!(
        "another vmsync is running (lock '{}' is held)",
        env.state.path().join(fsio::LOCK_FILE).display()
    ));
    assert!(env.record().last_attempted_commit.is_none());
}

/// A child forked by another thread shares the lock's open file until it executes its
/// program; a dropped lock must be free at once all the same (the next sync of an
/// in-process caller, or a test on another thread, takes it right away).
#[test]
fn a_dropped_lock_is_free_while_a_forked_child_still_shares_it() {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;

    let state = tempfile::tempdir().unwrap();
    let held = fsio::lock(state.path()).unwrap();
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
    let again = fsio::lock(state.path());
    assert!(again.is_ok(), "{:?}", again.err());
    assert!(child.join().unwrap().success());
}

#[test]
fn fetch_and_config_errors_have_their_exit_codes() {
    let env = env_with(&["t2-err"]);
    let state = env.state.path().display().to_string();
    vmsync(&[
        "--once",
        "--url",
        "/nonexistent/vms",
        "--state-dir",
        &state,
        "--connect",
        common::TEST_URI,
    ])
    .expect(4)
    .stderr_has("failed to fetch branch 'main' from '/nonexistent/vms'");
    assert_eq!(
        env.record().last_result,
        Some(record::SyncResult::FetchFailed)
    );

    env.run(&["--once", "--branch", "nope"])
        .expect(4)
        .stderr_has(&format!(
            "branch 'nope' does not exist in '{}'",
            env.repo.path().display()
        ));

    vmsync(&["--once", "--state-dir", &state])
        .expect(2)
        .stderr_has("no VM repository configured: set [source] url");
    vmsync(&["--once", "--config", "/nonexistent/config.toml"])
        .expect(2)
        .stderr_has("failed to read config '/nonexistent/config.toml'");
}

#[test]
fn validate_dir_checks_every_host_offline() {
    let env = env_with(&["t2-val"]);
    let root = env.images.display().to_string();
    let dir = env.repo.path().display().to_string();
    vmsync(&["validate", &dir, "--disk-root", &root])
        .expect(0)
        .stdout_has("valid (1 vm(s)");

    env.repo.write(
        "vms/t2-val.xml",
        &env.bios("t2-val", 128)
            .replace("<vcpu>", "<vcpus>")
            .replace("</vcpu>", "</vcpus>"),
    );
    vmsync(&["validate", &dir, "--disk-root", &root])
        .expect(3)
        .stderr_has("vms/t2-val.xml: vm 't2-val': field 'xml': rejected by libvirt")
        .stderr_has("vcpus");

    vmsync(&["validate", &dir, "--disk-root", "/srv/elsewhere"])
        .expect(3)
        .stderr_has("is not below a disk root ('/srv/elsewhere')");
}

/// In one process the test driver keeps its domains, so a whole life cycle runs here.
#[test]
fn second_sync_is_a_noop_and_a_change_redefines_only_that_domain() {
    let env = env_with(&["t2-cyc-a", "t2-cyc-b"]);
    let settings = env.settings();
    let hv = Libvirt::connect(common::TEST_URI).unwrap();
    let mut record = record::Record::default();

    let first = common::sync_head(&settings, &mut record, &hv).unwrap();
    assert_eq!(
        first.outcome.changes(),
        9,
        "1 directory + 2 x (disk, define, autostart, start)"
    );
    let uuid_a = listing(&hv, "t2-cyc-a").unwrap().uuid;
    let xml_b = hv.xml("t2-cyc-b", true).unwrap();

    let second = common::sync_head(&settings, &mut record, &hv).unwrap();
    assert_eq!(second.outcome.changes(), 0, "{:?}", second.outcome);
    assert!(second.plan.is_noop());

    env.repo
        .write("vms/t2-cyc-a.xml", &env.bios("t2-cyc-a", 256));
    let c3 = env.repo.commit("more memory for a");
    let third = common::sync_head(&settings, &mut record, &hv).unwrap();
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
    let a = listing(&hv, "t2-cyc-a").unwrap();
    assert_eq!(a.uuid, uuid_a);
    assert!(a.active);
    let xml_a = hv.xml("t2-cyc-a", true).unwrap();
    assert!(xml_a.contains("262144"), "new memory applied");
    assert_eq!(
        vmsync::desired::domain_xml::read_tag(&xml_a)
            .unwrap()
            .commit,
        c3
    );
    assert_eq!(hv.xml("t2-cyc-b", true).unwrap(), xml_b, "b untouched");
    assert_eq!(
        record.vms["t2-cyc-b"].applied_commit.as_deref(),
        Some(c3.as_str())
    );

    // A domain made by hand with a managed name is never touched: that VM fails.
    let adopt = [
        env.vm("t2-cyc-a").keep_file(),
        env.vm("t2-cyc-b").keep_file(),
        env.vm("t2-cyc-hand"),
    ];
    env.commit(&manifest(&env, adopt), "adopt a hand-made domain?");
    hv.define(&hand_made_xml("t2-cyc-hand")).unwrap();
    let hand_xml = hv.xml("t2-cyc-hand", true).unwrap();
    let err = common::sync_head(&settings, &mut record, &hv).unwrap_err();
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
    assert!(!env.disk("t2-cyc-hand").exists());
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
    let env = Env::new();
    // hv2's XML is broken, which hv1 does not care about.
    let m = manifest(
        &env,
        [
            env.vm("t2-here"),
            env.vm("t2-there").key("hosts = [\"hv2\"]").xml("<domain>"),
        ],
    );
    env.commit(&m, "two hosts");
    env.run(&["--once"])
        .expect(0)
        .stdout_has("t2-here")
        .stdout_lacks("t2-there");
    assert!(!env.disk("t2-there").exists());
}

#[test]
fn stopping_before_an_action_leaves_no_half_done_vm_and_no_applied_record() {
    let env = env_with(&["t2-stop"]);
    let settings = env.settings();
    let hv = Libvirt::connect(common::TEST_URI).unwrap();
    let (commit, desired) = common::validate_head(&settings).unwrap();
    let mut record = record::Record::default();
    let apply = |record: &mut record::Record, stop: bool| {
        let env = sync::Env {
            settings: &settings,
            hv: &hv,
            disks: &vmsync::host::disk::QemuImg::default(),
            cancel: &AtomicBool::new(stop),
            events: None,
        };
        sync::apply_commit(&env, record, &commit, &desired)
    };
    let err = apply(&mut record, true).unwrap_err();
    assert!(matches!(err, SyncError::ActionsFailed { .. }), "{err}");
    assert_eq!(record.last_applied_commit, None);
    assert_eq!(
        record.vms["t2-stop"].last_error.as_deref(),
        Some(vmsync::reconcile::outcome::INTERRUPTED)
    );
    assert!(listing(&hv, "t2-stop").is_none());
    assert!(!env.disk("t2-stop").exists());
    // The next run (not stopping) converges.
    let report = apply(&mut record, false).unwrap();
    assert!(report.outcome.all_ok());
    assert_eq!(record.last_applied_commit.as_deref(), Some(commit.as_str()));
}

#[test]
fn cached_validation_still_checks_names_and_sees_changed_files() {
    let env = env_with(&["t2-cache"]);
    env.run(&["--once"]).expect(0);
    let cache = env
        .state
        .path()
        .join(vmsync::host::schema_cache::CACHE_FILE);
    let bytes = std::fs::read(&cache).unwrap();
    assert!(
        bytes.windows(5).any(|w| w == b"blob:"),
        "validated files are remembered by blob id"
    );

    // Same XML blob, but the manifest now calls the VM something else: still refused.
    let renamed = Vm::new("t2-renamed")
        .file("vms/t2-cache.xml")
        .disk(&env.disk("t2-cache"), "64M");
    let renamed = manifest(&env, [renamed]);
    env.commit(&renamed, "rename in the manifest only");
    env.run(&["--once"])
        .expect(3)
        .stderr_has("the xml's <name> is 't2-cache' but the manifest says 't2-renamed'");

    // A changed file is a new blob: checked against the schema again.
    let bad = manifest(&env, [env.vm("t2-cache").schema_bad()]);
    env.commit(&bad, "schema error");
    env.run(&["--once"])
        .expect(3)
        .stderr_has("rejected by libvirt")
        .stderr_has("vcpux");
}

/// libvirt's schema verdict comes before anything changes, and with other mistakes all
/// are reported at once.
#[test]
fn schema_rejection_changes_nothing() {
    let env = env_with(&["t2-mixa", "t2-mixb"]);
    let other = bios_xml("t2-other", "kvm", &env.disk("t2-mixb"), 128);
    let two = manifest(
        &env,
        [
            env.vm("t2-mixa").schema_bad(),
            env.vm("t2-mixb").xml(&other),
        ],
    );
    env.commit(&two, "two mistakes");
    env.run(&["--once"])
        .expect(3)
        .stderr_has("vms/t2-mixa.xml: vm 't2-mixa': field 'xml': rejected by libvirt")
        .stderr_has("vcpux")
        .stderr_has("the xml's <name> is 't2-other' but the manifest says 't2-mixb'");

    // Only the schema mistake left: t2-mixb is valid, but nothing is applied, not even
    // its disk: the whole commit validates before anything changes.
    env.repo.write("vms/t2-mixb.xml", &env.bios("t2-mixb", 128));
    env.repo.commit("one mistake");
    env.run(&["--once"]).expect(3).stderr_has("vcpux");
    assert!(!env.disk("t2-mixa").exists());
    assert!(!env.disk("t2-mixb").exists());
    let record = env.record();
    assert_eq!(record.last_applied_commit, None);
    assert_eq!(record.last_result, Some(record::SyncResult::Invalid));
}

/// libgit2 leaves a pack per fetch; past `source::MAX_PACKS` a sync writes them into one,
/// and the clone still serves the syncs after it.
#[test]
fn the_local_clone_keeps_few_packs() {
    let env = env_with(&["t2-packs"]);
    let mut packed = false;
    for i in 0..=vmsync::repo::source::MAX_PACKS + 1 {
        env.repo.write("README.md", &format!("commit {i}\n"));
        let commit = env.repo.commit(&format!("commit {i}"));
        let run = env.run(&["--once"]).expect(0);
        packed |= run.stderr.contains("packed the local clone into one pack");
        let packs = vmsync::repo::source::packs(env.state.path()).len();
        assert!(
            packs <= vmsync::repo::source::MAX_PACKS,
            "{packs} packs after {i} syncs"
        );
        let record = env.record();
        assert_eq!(record.last_applied_commit.as_deref(), Some(commit.as_str()));
    }
    assert!(packed, "the packs were merged once");
}

#[test]
fn a_health_command_runs_only_when_the_host_allows_it_and_plan_shows_it() {
    let mut env = Env::new();
    let vm = env
        .vm("a")
        .key("autostart = true\n[vm.health]\nsettle = \"1s\"\ncommand = [\"/bin/true\", \"--x\"]");
    let commit = env.commit(&Manifest::new().vm(vm), "health");
    // No [policy] health_commands: refused at validation, naming the key; nothing made.
    let run = env.run(&["--once"]).expect(3);
    run.stderr_has(&format!("commit {commit} is invalid; nothing was applied:"))
        .stderr_has("field 'health.command': the check's program '/bin/true'")
        .stderr_has("[policy] health_commands");
    assert!(!env.disk("a").exists(), "the disk was made");
    // Allowed: the plan shows what will run, resolved, without a shell.
    let etc = tempfile::tempdir().unwrap();
    let config = etc.path().join("config.toml");
    std::fs::write(&config, "[policy]\nhealth_commands = [\"/bin/true\"]\n").unwrap();
    env.config_file = Some(config);
    let run = env.run(&["plan"]).expect(0);
    let program = std::fs::canonicalize("/bin/true").unwrap();
    run.stdout_has(&format!(
        "check: settle 1s, command '{}' '--x' (no shell), timeout 5m, revert",
        program.display()
    ));
}

/// The fake host of the unit tests, from here (`vmsync::testing`, the `test-support`
/// feature): a commit validated against libvirt's schema, applied on a host that refuses
/// one start; the other VM converges, the commit is not the applied one.
#[test]
fn a_start_the_host_refuses_fails_that_vm_only_on_the_shared_fake_host() {
    let env = env_with(&["t2-ok", "t2-refused"]);
    let settings = env.settings();
    let host = vmsync::testing::FakeHost::refusing_to_start(&["t2-refused"]);
    let mut record = record::Record::default();
    let err = common::sync_head(&settings, &mut record, &host).unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::ActionsFailed {
                failed: 1,
                total: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(host.calls().contains(&"start t2-ok".to_string()));
    assert!(host.is_active("t2-ok").unwrap());
    assert!(!host.is_active("t2-refused").unwrap());
    assert!(record.vms["t2-ok"].ok);
    assert!(!record.vms["t2-refused"].ok);
    assert_eq!(record.last_applied_commit, None);
}
