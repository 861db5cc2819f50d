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
use std::path::{Path, PathBuf};

use common::{
    Repo, SystemCleanup, bios_xml, libvirtd_available, sha256_file, uefi_tpm_xml,
    virsh_system as virsh, virsh_system_ok as virsh_ok, vmsync,
};

fn domain_type() -> &'static str {
    if Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "qemu"
    }
}

/// One VM repository, state directory and images directory on the real host.
struct Host {
    repo: Repo,
    state: tempfile::TempDir,
    images: PathBuf,
    p: String,
}

struct Vm<'a> {
    name: &'a str,
    extra: &'a str,
    memory: u32,
}

impl Host {
    fn new(p: &str) -> Self {
        let images = common::images_dir(p);
        std::fs::create_dir_all(&images).unwrap();
        Host {
            repo: Repo::new(),
            state: tempfile::tempdir().unwrap(),
            images,
            p: p.to_string(),
        }
    }

    fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.p)
    }

    fn disk(&self, short: &str) -> PathBuf {
        self.images.join(format!("{short}.qcow2"))
    }

    /// Commits a manifest with `vms` (BIOS guests, one disk each).
    fn commit(&self, vms: &[Vm], message: &str) -> String {
        let mut m = "version = 1\n".to_string();
        for vm in vms {
            let name = self.name(vm.name);
            m += &format!(
                "\n[[vm]]\nname = \"{name}\"\nxml = \"vms/{}.xml\"\n{}\n  [[vm.disk]]\n  path = \"{}\"\n  size = \"64M\"\n",
                vm.name,
                vm.extra,
                self.disk(vm.name).display()
            );
            self.repo.write(
                &format!("vms/{}.xml", vm.name),
                &bios_xml(&name, domain_type(), &self.disk(vm.name), vm.memory),
            );
        }
        self.repo.write("vmsync.toml", &m);
        self.repo.commit(message)
    }

    fn args(&self) -> Vec<String> {
        [
            "--url",
            &self.repo.path().display().to_string(),
            "--state-dir",
            &self.state.path().display().to_string(),
            "--connect",
            "qemu:///system",
            "--disk-root",
            &self.images.display().to_string(),
            "--host",
            "hv1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn run(&self, extra: &[&str]) -> common::Run {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(self.args());
        vmsync(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn status(&self) -> serde_json::Value {
        let args = self.args();
        common::status_json(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn vm_status(&self, short: &str) -> serde_json::Value {
        let name = self.name(short);
        self.status()["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} not in status"))
            .clone()
    }

    fn inactive(&self, short: &str) -> String {
        virsh_ok(&["dumpxml", "--inactive", &self.name(short)])
    }

    fn domstate(&self, short: &str) -> String {
        virsh_ok(&["domstate", &self.name(short)])
    }

    fn domid(&self, short: &str) -> String {
        virsh_ok(&["domid", &self.name(short)])
    }

    fn autostart(&self, short: &str) -> bool {
        virsh_ok(&["dominfo", &self.name(short)])
            .lines()
            .any(|l| l.starts_with("Autostart:") && l.ends_with("enable"))
    }

    fn defined(&self, short: &str) -> bool {
        virsh(&["domuuid", &self.name(short)]).0
    }

    fn state_json(&self) -> Option<String> {
        std::fs::read_to_string(self.state.path().join("state.json")).ok()
    }
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
    if !libvirtd_available() {
        return;
    }
    let p = common::prefix("plan");
    let host = Host::new(&p);
    let _cleanup = SystemCleanup::new(&p, &host.images);
    let vms = |memory| {
        [
            Vm {
                name: "a",
                extra: "autostart = true",
                memory,
            },
            Vm {
                name: "b",
                extra: "",
                memory: 128,
            },
        ]
    };
    host.commit(&vms(128), "two vms");

    // Before anything exists: every action planned, nothing made.
    let run = host.run(&["plan"]).expect(0);
    let a = host.name("a");
    assert!(
        run.stdout.contains(&format!(
            "{a}: create qcow2 disk '{}' (64 MiB), define, set autostart, start",
            host.disk("a").display()
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("+  <name>{a}</name>")),
        "{}",
        run.stdout
    );
    assert!(!host.defined("a") && !host.defined("b"));
    assert!(!host.disk("a").exists(), "plan creates no disk");
    assert_eq!(host.state_json(), None, "plan writes no record");

    host.run(&["--once"]).expect(0);
    let (xml_a, xml_b, id_a) = (host.inactive("a"), host.inactive("b"), host.domid("a"));
    let record = host.state_json().unwrap();

    // A memory change: the plan's diff shows exactly the memory line, although libvirt's
    // QEMU driver added a machine type, controllers, addresses and a MAC.
    let c2 = host.commit(&vms(256), "more memory for a");
    let run = host.run(&["plan"]).expect(0);
    assert!(
        run.stdout.contains(&format!("plan for commit {c2}")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("{a}: redefine in place (pending restart)")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("{}: nothing to do", host.name("b"))),
        "{}",
        run.stdout
    );
    let json_run = host.run(&["--once", "--dry-run", "--json"]).expect(0);
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
    assert_eq!(host.inactive("a"), xml_a);
    assert_eq!(host.inactive("b"), xml_b);
    assert_eq!(host.domid("a"), id_a);
    assert_eq!(host.state_json().unwrap(), record);

    // The sync logs the same diff when it redefines.
    let run = host.run(&["--once"]).expect(0);
    assert!(run.stderr.contains("definition diff"), "{}", run.stderr);
    assert!(
        run.stderr.contains("+  <memory unit='KiB'>262144</memory>"),
        "{}",
        run.stderr
    );
}

#[test]
fn real_drift_is_reported_then_healed() {
    if !libvirtd_available() {
        return;
    }
    let p = common::prefix("drift");
    let host = Host::new(&p);
    let _cleanup = SystemCleanup::new(&p, &host.images);
    host.commit(
        &[Vm {
            name: "vm",
            extra: "autostart = true",
            memory: 128,
        }],
        "one vm",
    );
    host.run(&["--once"]).expect(0);
    let name = host.name("vm");
    assert_eq!(host.domstate("vm"), "running");
    assert_eq!(host.vm_status("vm")["drift"], serde_json::json!([]));

    // Outside git: `virsh edit` (define of the edited inactive XML, tag kept), autostart
    // off, a manual stop.
    let edited = host.inactive("vm").replace(
        "<vcpu placement='static'>1</vcpu>",
        "<vcpu placement='static'>2</vcpu>",
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &edited).unwrap();
    virsh_ok(&["define", &file.path().display().to_string()]);
    virsh_ok(&["autostart", "--disable", &name]);
    virsh_ok(&["destroy", &name]);

    let drift = host.vm_status("vm")["drift"].clone();
    assert_eq!(
        drift,
        serde_json::json!([
            "definition changed outside vmsync",
            "autostart is off, committed on",
            "domain is shut off, committed state running"
        ])
    );

    // self_heal off: reported (plan with the diff back to the commit), nothing changed.
    let run = host.run(&["plan", "--self-heal=false"]).expect(0);
    assert!(
        run.stdout
            .contains("drift: definition changed outside vmsync (reported only, self_heal is off)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("-    <vcpu placement='static'>2</vcpu>")
            || run.stdout.contains("-  <vcpu placement='static'>2</vcpu>"),
        "{}",
        run.stdout
    );
    let run = host.run(&["--once", "--self-heal=false"]).expect(0);
    assert!(
        run.stdout.contains("self_heal is off, left as is"),
        "{}",
        run.stdout
    );
    assert!(
        host.inactive("vm")
            .contains("<vcpu placement='static'>2</vcpu>")
    );
    assert!(!host.autostart("vm"));
    assert_eq!(host.domstate("vm"), "shut off");
    assert_eq!(host.vm_status("vm")["drift"].as_array().unwrap().len(), 3);

    // self_heal on (the default): definition, autostart flag and power state restored.
    let run = host.run(&["--once"]).expect(0);
    assert!(
        run.stdout
            .contains(&format!("{name}: redefine in place, set autostart, start")),
        "{}",
        run.stdout
    );
    assert!(
        host.inactive("vm")
            .contains("<vcpu placement='static'>1</vcpu>")
    );
    assert!(host.autostart("vm"));
    assert_eq!(host.domstate("vm"), "running");
    assert_eq!(host.vm_status("vm")["drift"], serde_json::json!([]));
    let run = host.run(&["--once"]).expect(0);
    assert!(run.stdout.contains("nothing to do"), "{}", run.stdout);
}

#[test]
fn real_restart_shuts_down_first_and_defer_keeps_running() {
    if !libvirtd_available() {
        return;
    }
    let p = common::prefix("restart");
    let host = Host::new(&p);
    let _cleanup = SystemCleanup::new(&p, &host.images);
    let vms = |memory, defer_extra| {
        [
            Vm {
                name: "r",
                extra: "autostart = true\non_change = \"restart\"\nshutdown_timeout = \"3s\"",
                memory,
            },
            Vm {
                name: "d",
                extra: defer_extra,
                memory,
            },
        ]
    };
    host.commit(&vms(128, "autostart = true"), "two running vms");
    host.run(&["--once"]).expect(0);
    let (id_r, id_d) = (host.domid("r"), host.domid("d"));

    host.commit(&vms(256, "autostart = true"), "more memory");
    let started = std::time::Instant::now();
    let run = host.run(&["--once"]).expect(0);
    let (r, d) = (host.name("r"), host.name("d"));
    // The guest has no OS to honour ACPI: the shutdown was requested, the timeout
    // passed, and only then was it destroyed and started with the new definition.
    assert!(
        run.stdout.contains(&format!(
            "{r}: redefine in place, restart (shutdown requested, still running after 3s, destroyed, started)"
        )),
        "{}",
        run.stdout
    );
    assert!(started.elapsed() >= std::time::Duration::from_secs(3));
    let requested = run
        .stderr
        .find("graceful shutdown requested")
        .expect("requested");
    let destroying = run.stderr.find("destroying").expect("destroyed");
    assert!(requested < destroying, "{}", run.stderr);
    assert_eq!(host.domstate("r"), "running");
    assert_ne!(host.domid("r"), id_r, "r was power-cycled");
    assert!(virsh_ok(&["dumpxml", &r]).contains("<memory unit='KiB'>262144</memory>"));

    // "defer": still running the old definition, reported as pending restart.
    assert!(
        run.stdout.contains(&format!("{d}: redefine in place\n")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("{d}: pending restart")),
        "{}",
        run.stdout
    );
    assert_eq!(host.domstate("d"), "running");
    assert_eq!(host.domid("d"), id_d, "d kept running");
    assert!(virsh_ok(&["dumpxml", &d]).contains("<memory unit='KiB'>131072</memory>"));
    assert_eq!(host.vm_status("d")["pending_restart"], true);
    assert_eq!(host.vm_status("r")["pending_restart"], false);

    // state = "stopped": the same graceful way down.
    host.commit(
        &vms(256, "state = \"stopped\"\nshutdown_timeout = \"3s\""),
        "stop d",
    );
    let run = host.run(&["--once"]).expect(0);
    assert!(
        run.stdout.contains(&format!(
            "{d}: clear autostart, stop (shutdown requested, still running after 3s, destroyed)"
        )),
        "{}",
        run.stdout
    );
    assert_eq!(host.domstate("d"), "shut off");
    assert_eq!(host.domstate("r"), "running");
}

#[test]
fn real_prune_removes_only_tagged_domains_and_keeps_disks_nvram_tpm() {
    if !libvirtd_available() {
        return;
    }
    let p = common::prefix("prune");
    let host = Host::new(&p);
    let cleanup = SystemCleanup::new(&p, &host.images);
    let (keep, gone, hand) = (host.name("keep"), host.name("gone"), host.name("hand"));

    // A UEFI + TPM guest (running) and a BIOS guest, both vmsync's; one made by hand.
    let manifest = |with_gone: bool| {
        let mut m = format!(
            "version = 1\n[[vm]]\nname = \"{keep}\"\nxml = \"vms/keep.xml\"\n  [[vm.disk]]\n  path = \"{}\"\n  size = \"64M\"\n",
            host.disk("keep").display()
        );
        if with_gone {
            m += &format!(
                "[[vm]]\nname = \"{gone}\"\nxml = \"vms/gone.xml\"\nautostart = true\n  [[vm.disk]]\n  path = \"{}\"\n  size = \"64M\"\n",
                host.disk("gone").display()
            );
        }
        m
    };
    host.repo.write("vmsync.toml", &manifest(true));
    host.repo.write(
        "vms/keep.xml",
        &bios_xml(&keep, domain_type(), &host.disk("keep"), 128),
    );
    host.repo
        .write("vms/gone.xml", &uefi_tpm_xml(&gone, &host.disk("gone")));
    host.repo.commit("keep and gone");
    let by_hand = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        by_hand.path(),
        bios_xml(&hand, "qemu", &host.images.join("hand.qcow2"), 96),
    )
    .unwrap();
    virsh_ok(&["define", &by_hand.path().display().to_string()]);
    host.run(&["--once"]).expect(0);
    assert_eq!(host.domstate("gone"), "running");
    let uuid = virsh_ok(&["domuuid", &gone]);
    let nvram = PathBuf::from(format!("/var/lib/libvirt/qemu/nvram/{gone}_VARS.fd"));
    let tpm = PathBuf::from(format!("/var/lib/libvirt/swtpm/{uuid}"));
    cleanup.also_remove(nvram.clone());
    cleanup.also_remove(tpm.clone());
    assert!(nvram.is_file() && tpm.is_dir());
    let hand_xml = virsh_ok(&["dumpxml", "--inactive", &hand]);

    // `gone` leaves the manifest. Pruning is off by default: left alone, said so.
    host.repo.write("vmsync.toml", &manifest(false));
    host.repo.commit("drop gone");
    let run = host.run(&["--once"]).expect(0);
    assert!(host.defined("gone"), "{}", run.stdout);
    let run = host.run(&["plan", "--prune"]).expect(0);
    assert!(
        run.stdout.contains(&format!(
            "{gone}: prune: stop (graceful shutdown, destroy after 2m), undefine (keeping NVRAM, TPM state and disks)"
        )),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains(&hand),
        "untagged domains are not even listed: {}",
        run.stdout
    );
    assert!(host.defined("gone"), "plan changes nothing");

    let disk_hash = sha256_file(&host.disk("gone"));
    // The running firmware may still write its variables: the file itself must stay.
    let nvram_ino = std::fs::metadata(&nvram).unwrap().ino();
    let run = host
        .run(&["--once", "--prune", "--shutdown-timeout", "3s"])
        .expect(0);
    assert!(
        run.stdout.contains(&format!(
            "{gone}: pruned: stop (shutdown requested, still running after 3s, destroyed), undefine"
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!(
            "orphaned disk (kept): {}",
            host.disk("gone").display()
        )),
        "{}",
        run.stdout
    );
    assert!(!host.defined("gone"));
    assert_eq!(sha256_file(&host.disk("gone")), disk_hash, "disk kept");
    assert_eq!(
        std::fs::metadata(&nvram).unwrap().ino(),
        nvram_ino,
        "NVRAM kept"
    );
    assert!(std::fs::metadata(&nvram).unwrap().len() > 0);
    assert!(tpm.is_dir(), "TPM state kept");
    assert!(host.defined("keep"));
    assert_eq!(
        virsh_ok(&["dumpxml", "--inactive", &hand]),
        hand_xml,
        "hand-made untouched"
    );
    let status = host.status();
    assert_eq!(
        status["orphaned_disks"][host.disk("gone").display().to_string()],
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
    if !libvirtd_available() {
        return;
    }
    let p = common::prefix("mass");
    let host = Host::new(&p);
    let _cleanup = SystemCleanup::new(&p, &host.images);
    let vm = |name| Vm {
        name,
        extra: "",
        memory: 96,
    };
    host.commit(&[vm("a"), vm("b"), vm("c")], "three");
    host.run(&["--once"]).expect(0);
    let applied = host.status()["last_applied_commit"].clone();

    // Two of three removed with max_prune = 1: refused, nothing applied.
    let c2 = host.commit(&[vm("c")], "drop two");
    let run = host
        .run(&["--once", "--prune", "--max-prune", "1"])
        .expect(3);
    assert!(
        run.stderr
            .contains(&format!("commit {c2} is refused; nothing was applied")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("more than policy.max_prune = 1"),
        "{}",
        run.stderr
    );
    assert!(host.defined("a") && host.defined("b"));
    let status = host.status();
    assert_eq!(status["last_result"], "refused");
    assert_eq!(status["last_applied_commit"], applied);
    let run = host.run(&["plan", "--prune", "--max-prune", "1"]).expect(0);
    assert!(run.stdout.contains("REFUSED"), "{}", run.stdout);
    for short in ["a", "b"] {
        assert!(
            run.stdout
                .contains(&format!("{}: prune: undefine", host.name(short))),
            "the plan shows what would go: {}",
            run.stdout
        );
    }

    // Every managed domain: refused even within max_prune.
    let c3 = host.commit(&[], "empty manifest");
    let run = host.run(&["--once", "--prune"]).expect(3);
    assert!(
        run.stderr.contains("every managed domain on this host (3)"),
        "{}",
        run.stderr
    );
    assert!(host.defined("a") && host.defined("b") && host.defined("c"));

    // The operator confirms.
    let run = host
        .run(&["--once", "--prune", "--allow-mass-prune"])
        .expect(0);
    assert!(
        run.stdout.contains(&format!("applied commit {c3}")),
        "{}",
        run.stdout
    );
    assert!(!host.defined("a") && !host.defined("b") && !host.defined("c"));
    for short in ["a", "b", "c"] {
        assert!(host.disk(short).exists(), "disks are never deleted");
    }
}
