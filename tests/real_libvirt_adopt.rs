//! Tier 3: `vmsync import` and `adopt = true` against a real libvirtd with QEMU: a
//! hand-defined UEFI guest (OVMF secure boot + swtpm TPM 2.0, under TCG) and a BIOS
//! guest with qcow2 disks. Import changes nothing on the host; adopting an unchanged
//! definition only adds vmsync's tag (no lifecycle event at all); adopting a changed one
//! redefines it in place (one "Defined Updated" event, never "Undefined") and keeps
//! UUID, NVRAM and TPM state byte for byte; the next sync is a no-op.
//!
//! libvirt's domain events are watched with `virsh event --all --loop`; a marker domain
//! defined before and undefined after the syncs brackets the events that belong to them.
//!
//! Without a reachable `qemu:///system` these tests skip with a message, unless
//! `VMSYNC_REQUIRE_LIBVIRTD` is set (CI): then they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, bios_xml, sha256_file, uefi_tpm_xml, virsh_system_ok as virsh_ok};

use vmsync::desired::domain_xml;
use vmsync::onboard::definition;

/// `virsh define` of `xml`, as an operator does by hand.
fn define_by_hand(xml: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), xml).unwrap();
    virsh_ok(&["define", &file.path().display().to_string()]);
}

/// A 64M qcow2 image at `path`.
fn image(path: &Path) {
    common::output_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg("64M"),
    );
}

/// sha256 of every file below `dir`, by path relative to it.
fn tree_hashes(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push((path.strip_prefix(dir).unwrap().into(), sha256_file(&path)));
            }
        }
    }
    out.sort();
    out
}

/// A UEFI + TPM guest's state files on the host.
struct UefiState {
    uuid: String,
    nvram: PathBuf,
    tpm: PathBuf,
}

impl UefiState {
    /// Starts the hand-defined guest once (OVMF copies its NVRAM template, swtpm makes
    /// its state), then powers it off, so the files exist and stay still.
    fn make(name: &str) -> Self {
        virsh_ok(&["start", name]);
        std::thread::sleep(Duration::from_secs(2));
        virsh_ok(&["destroy", name]);
        let uuid = virsh_ok(&["domuuid", name]);
        let state = Self {
            nvram: PathBuf::from(format!("/var/lib/libvirt/qemu/nvram/{name}_VARS.fd")),
            tpm: PathBuf::from(format!("/var/lib/libvirt/swtpm/{uuid}")),
            uuid,
        };
        assert!(state.nvram.is_file(), "{}", state.nvram.display());
        assert!(
            !tree_hashes(&state.tpm).is_empty(),
            "{}",
            state.tpm.display()
        );
        state
    }

    /// NVRAM and TPM state, byte for byte.
    fn hashes(&self) -> (String, Vec<(PathBuf, String)>) {
        (sha256_file(&self.nvram), tree_hashes(&self.tpm))
    }
}

/// libvirt's domain events while it lives (`virsh event --all --loop`), bracketed by a
/// marker domain so that every event between [`Events::start`] and [`Events::finish`]
/// is seen.
struct Events {
    child: Child,
    log: tempfile::NamedTempFile,
    marker: String,
}

impl Events {
    fn start(env: &Env) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("virsh")
            .args(["-c", common::SYSTEM_URI, "event", "--all", "--loop"])
            .stdout(Stdio::from(log.reopen().unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let events = Self {
            child,
            log,
            marker: env.name("marker"),
        };
        let marker = format!(
            "<domain type='qemu'><name>{}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>",
            events.marker
        );
        // virsh subscribes after it connected: define the marker until its event shows.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            define_by_hand(&marker);
            if events.wait_for("Defined", Duration::from_secs(2)) {
                break;
            }
            assert!(Instant::now() < deadline, "virsh event never reported");
            virsh_ok(&["undefine", &events.marker]);
        }
        events
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.log.path())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn wait_for(&self, what: &str, within: Duration) -> bool {
        let line = format!("for domain '{}': {what}", self.marker);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.lines().iter().any(|l| l.contains(&line)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The events of the domains `names` since [`Events::start`].
    fn finish(mut self, names: &[&str]) -> Vec<String> {
        virsh_ok(&["undefine", &self.marker]);
        assert!(
            self.wait_for("Undefined", Duration::from_secs(20)),
            "{:?}",
            self.lines()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        let lines = self.lines();
        let start = lines
            .iter()
            .rposition(|l| l.contains(&format!("for domain '{}': Defined", self.marker)))
            .unwrap();
        lines[start..]
            .iter()
            .filter(|l| {
                names
                    .iter()
                    .any(|n| l.contains(&format!("for domain '{n}':")))
            })
            .cloned()
            .collect()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vmsync import` of `names` into `dir` with the env's libvirt and disk root.
fn import(env: &Env, dir: &Path, names: &[&str]) -> common::Run {
    let mut args = vec![
        "--connect".to_string(),
        env.uri.clone(),
        "--disk-root".into(),
        env.images.display().to_string(),
        "import".into(),
        dir.display().to_string(),
    ];
    args.extend(names.iter().map(|n| n.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::vmsync(&args)
}

#[test]
fn real_import_then_adopt_only_tags_and_changes_nothing_else() {
    let Some(env) = Env::system("adopt") else {
        return;
    };
    let (uefi, bios, left) = (env.name("uefi"), env.name("bios"), env.name("left"));
    for name in [&uefi, &bios, &left] {
        image(&env.images.join(format!("{name}.qcow2")));
    }
    let disk = |name: &str| env.images.join(format!("{name}.qcow2"));
    define_by_hand(&uefi_tpm_xml(&uefi, &disk(&uefi)));
    define_by_hand(&bios_xml(&bios, env.domain_type(), &disk(&bios), 128));
    define_by_hand(&bios_xml(&left, env.domain_type(), &disk(&left), 128));
    let state = UefiState::make(&uefi);
    // The BIOS guest runs and is autostarted, as the old units left it.
    virsh_ok(&["autostart", &bios]);
    virsh_ok(&["start", &bios]);

    let snapshot = || {
        (
            [&uefi, &bios, &left].map(|n| virsh_ok(&["dumpxml", "--inactive", n])),
            [&uefi, &bios, &left].map(|n| sha256_file(&disk(n))),
            state.hashes(),
        )
    };
    let before = snapshot();

    // Import: a repository that validates with the host's policy; the host unchanged.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("repo");
    import(&env, &out, &[&uefi, &bios])
        .expect(0)
        .stdout_has("imported 2 definition(s)")
        .stdout_has("nothing on the host was changed");
    assert!(snapshot() == before, "import changed the host");
    common::vmsync(&[
        "--disk-root",
        &env.images.display().to_string(),
        "validate",
        &out.display().to_string(),
    ])
    .expect(0)
    .stdout_has("valid (2 vm(s)");
    let manifest = std::fs::read_to_string(out.join("vmsync.toml")).unwrap();
    let entry = |name: &str| {
        let at = manifest.find(&format!("name = \"{name}\"")).unwrap();
        manifest[at..].split("[[vm]]").next().unwrap().to_string()
    };
    assert!(entry(&uefi).contains("autostart = false"), "{manifest}");
    assert!(entry(&bios).contains("autostart = true"), "{manifest}");
    for name in [&uefi, &bios] {
        let e = entry(name);
        assert!(e.contains("adopt = true"), "{manifest}");
        assert!(
            e.contains(&format!("path = \"{}\"", disk(name).display()))
                && e.contains("size = \"64M\"")
                && e.contains("format = \"qcow2\""),
            "{manifest}"
        );
    }
    let uefi_file = std::fs::read_to_string(out.join(format!("vms/{uefi}.xml"))).unwrap();
    assert!(uefi_file.contains(&format!("<uuid>{}</uuid>", state.uuid)));
    assert!(uefi_file.contains("<tpm model='tpm-crb'>") && uefi_file.contains("secure='yes'"));

    // Committed as written: plan and sync only add the tag; no lifecycle event.
    common::copy_tree(&out, env.repo.path());
    let commit = env.repo.commit("import");
    let events = Events::start(&env);
    let tag_only = "adopt (tag only: the definition is the commit's)";
    let plan = env.run(&["plan"]).expect(0);
    plan.stdout_has(&format!("{uefi}: {tag_only}"))
        .stdout_has(&format!("{bios}: {tag_only}"));
    let run = env.run(&["--once"]).expect(0);
    run.stdout_has(&format!("{uefi}: {tag_only}"))
        .stdout_has(&format!("{bios}: {tag_only}"))
        .stdout_lacks("pending restart");
    env.run(&["--once"])
        .expect(0)
        .stdout_has(&format!("nothing to do: commit {commit}"));
    let seen = events.finish(&[&uefi, &bios, &left]);
    assert!(
        !seen.iter().any(|l| l.contains("'lifecycle'")),
        "no lifecycle event: {seen:#?}"
    );
    for name in [&uefi, &bios] {
        assert!(
            seen.iter()
                .any(|l| l.contains(&format!("'metadata-change' for domain '{name}'"))),
            "the tag was written through the metadata API: {seen:#?}"
        );
    }

    // Only the tag was added; UUID, NVRAM, TPM state, disks and the other domain as
    // they were; the BIOS guest still runs.
    let after = snapshot();
    for (i, name) in [&uefi, &bios].into_iter().enumerate() {
        let xml = &after.0[i];
        assert_eq!(
            domain_xml::read_tag(xml).map(|t| t.commit),
            Some(commit.clone()),
            "{name}"
        );
        // (`virsh_ok` trims the trailing newline of both.)
        assert_eq!(
            definition::clean(xml).unwrap().trim_end(),
            before.0[i],
            "{name}"
        );
    }
    assert_eq!(
        after.0[2], before.0[2],
        "the domain not imported is untouched"
    );
    assert_eq!(after.1, before.1, "disks");
    assert_eq!(after.2, before.2, "NVRAM and TPM state");
    assert_eq!(virsh_ok(&["domuuid", &uefi]), state.uuid);
    assert_eq!(virsh_ok(&["domstate", &bios]), "running");
    assert_eq!(virsh_ok(&["domstate", &uefi]), "shut off");
    let status = env.status();
    assert_eq!(status["last_applied_commit"], commit.as_str());
}

#[test]
fn real_adopting_a_changed_uefi_definition_redefines_in_place_and_keeps_its_state() {
    let Some(env) = Env::system("adoptchg") else {
        return;
    };
    let uefi = env.name("uefi");
    let disk = env.images.join(format!("{uefi}.qcow2"));
    image(&disk);
    define_by_hand(&uefi_tpm_xml(&uefi, &disk));
    let state = UefiState::make(&uefi);
    let (nvram_before, tpm_before) = state.hashes();
    let disk_before = sha256_file(&disk);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("repo");
    import(&env, &out, &[&uefi]).expect(0);
    common::copy_tree(&out, env.repo.path());
    let file = format!("vms/{uefi}.xml");
    let xml = std::fs::read_to_string(env.repo.path().join(&file)).unwrap();
    let one = "<vcpu placement='static'>1</vcpu>";
    assert!(xml.contains(one), "{xml}");
    env.repo.write(
        &file,
        &xml.replace(one, "<vcpu placement='static'>2</vcpu>"),
    );
    env.repo.commit("import, two vcpus");

    let events = Events::start(&env);
    let plan = env.run(&["plan"]).expect(0);
    plan.stdout_has(&format!("{uefi}: adopt (redefine in place)"))
        .stdout_has("-  <vcpu placement='static'>1</vcpu>")
        .stdout_has("+  <vcpu placement='static'>2</vcpu>");
    env.run(&["--once"])
        .expect(0)
        .stdout_has(&format!("{uefi}: adopt (redefine in place)"));
    env.run(&["--once"]).expect(0).stdout_has("nothing to do");
    let seen = events.finish(&[&uefi]);
    let lifecycle: Vec<_> = seen.iter().filter(|l| l.contains("'lifecycle'")).collect();
    assert_eq!(
        lifecycle,
        [&format!(
            "event 'lifecycle' for domain '{uefi}': Defined Updated"
        )],
        "redefined in place, never undefined"
    );

    let xml = virsh_ok(&["dumpxml", "--inactive", &uefi]);
    assert!(xml.contains("<vcpu placement='static'>2</vcpu>"), "{xml}");
    assert!(domain_xml::read_tag(&xml).is_some());
    assert_eq!(virsh_ok(&["domuuid", &uefi]), state.uuid);
    let (nvram_after, tpm_after) = state.hashes();
    assert_eq!(nvram_after, nvram_before, "NVRAM byte for byte");
    assert_eq!(tpm_after, tpm_before, "TPM state byte for byte");
    assert_eq!(sha256_file(&disk), disk_before);
}

#[test]
fn real_import_does_not_write_qemu_env_values() {
    let Some(env) = Env::system("importenv") else {
        return;
    };
    let name = env.name("env");
    let disk = env.images.join(format!("{name}.qcow2"));
    image(&disk);
    let xml = bios_xml(&name, env.domain_type(), &disk, 128)
        .replacen(
            "<domain ",
            "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' ",
            1,
        )
        .replace(
            "</domain>",
            "  <qemu:commandline>\n    <qemu:env name='API_TOKEN' value='tok-s3cr3t-value'/>\n  </qemu:commandline>\n</domain>",
        );
    define_by_hand(&xml);
    assert!(virsh_ok(&["dumpxml", "--inactive", &name]).contains("tok-s3cr3t-value"));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("repo");
    let run = import(&env, &out, &[&name]).expect(0);
    run.stdout_has("API_TOKEN were not imported");
    let mut written = String::new();
    for (path, _) in tree_hashes(&out) {
        written.push_str(&std::fs::read_to_string(out.join(path)).unwrap());
    }
    assert!(!written.contains("tok-s3cr3t-value"), "{written}");
    assert!(!run.stdout.contains("tok-s3cr3t-value") && !run.stderr.contains("tok-s3cr3t-value"));
    let vm_xml = std::fs::read_to_string(out.join(format!("vms/{name}.xml"))).unwrap();
    assert!(
        vm_xml.contains("name='API_TOKEN' value='VALUE-NOT-IMPORTED'")
            && vm_xml.contains("the value of API_TOKEN was not imported"),
        "{vm_xml}"
    );
    // Nothing on the host changed.
    assert!(virsh_ok(&["dumpxml", "--inactive", &name]).contains("tok-s3cr3t-value"));
}
