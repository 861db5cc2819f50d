//! Tier 3: the real binary against a real libvirtd with QEMU (KVM for the BIOS guest where
//! `/dev/kvm` exists, TCG otherwise and for UEFI), real qemu-img disks, OVMF with secure
//! boot and swtpm TPM 2.0.
//!
//! Without a reachable `qemu:///system` these tests skip with a message, unless
//! `VMSYNC_REQUIRE_LIBVIRTD` is set (CI sets it through scripts/test.sh): then they fail.
//! Test domains carry a unique name prefix and are removed afterwards.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Repo, bios_xml, sha256_file, uefi_tpm_xml, vmsync};

fn qemu_img_info(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn manifest(p: &str, images: &Path) -> String {
    format!(
        r#"version = 1

[[directory]]
path = "{images}/ISOs"

[[vm]]
name = "{p}-uefi"
xml = "vms/uefi.xml"
autostart = true

  [[vm.disk]]
  path = "{images}/{p}-uefi.qcow2"
  size = "256M"

[[vm]]
name = "{p}-bios"
xml = "vms/bios.xml"
autostart = false

  [[vm.disk]]
  path = "{images}/{p}-bios.qcow2"
  size = "128M"
  format = "qcow2"

[[vm]]
name = "{p}-keep"
xml = "vms/keep.xml"

  [[vm.disk]]
  path = "{images}/{p}-keep.qcow2"
  size = "1G"
"#,
        images = images.display()
    )
}

#[test]
fn real_libvirtd_sync_life_cycle() {
    if !common::libvirtd_available() {
        return;
    }
    let (p, images, _cleanup) = common::scratch("life");
    let kvm = if Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "qemu"
    };
    let (uefi, bios, keep) = (
        format!("{p}-uefi"),
        format!("{p}-bios"),
        format!("{p}-keep"),
    );
    let disk = |name: &str| images.join(format!("{name}.qcow2"));

    // An existing disk (smaller than the manifest says) that must stay byte-for-byte.
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(disk(&keep))
        .arg("64M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let keep_hash = sha256_file(&disk(&keep));
    let keep_meta = std::fs::metadata(disk(&keep)).unwrap();

    let repo = Repo::new();
    repo.write("vmsync.toml", &manifest(&p, &images));
    repo.write("vms/uefi.xml", &uefi_tpm_xml(&uefi, &disk(&uefi)));
    repo.write("vms/bios.xml", &bios_xml(&bios, kvm, &disk(&bios), 128));
    repo.write("vms/keep.xml", &bios_xml(&keep, kvm, &disk(&keep), 128));
    let c1 = repo.commit("three vms");
    let state = tempfile::tempdir().unwrap();
    let url = repo.path().display().to_string();
    let state_dir = state.path().display().to_string();
    let root = images.display().to_string();
    let args = [
        "--url",
        &url,
        "--state-dir",
        &state_dir,
        "--connect",
        "qemu:///system",
        "--disk-root",
        &root,
        "--host",
        "hv1",
    ];
    let once = || {
        let mut a = vec!["--once"];
        a.extend_from_slice(&args);
        vmsync(&a)
    };

    // First sync: directories, disks, definitions, autostart, the UEFI + TPM guest runs.
    let run = once().expect(0);
    assert!(
        run.stdout.contains(&format!("applied commit {c1}")),
        "{}",
        run.stdout
    );
    assert!(images.join("ISOs").is_dir());
    for (name, size) in [(&uefi, 256u64 << 20), (&bios, 128 << 20)] {
        let info = qemu_img_info(&disk(name));
        assert_eq!(info["format"], "qcow2", "{name}");
        assert_eq!(info["virtual-size"], size, "{name}");
    }
    assert_eq!(
        sha256_file(&disk(&keep)),
        keep_hash,
        "existing disk untouched"
    );
    assert_eq!(
        std::fs::metadata(disk(&keep)).unwrap().mtime(),
        keep_meta.mtime()
    );
    assert!(
        run.stderr.contains("left as is"),
        "size difference reported: {}",
        run.stderr
    );

    assert_eq!(common::virsh_system_ok(&["domstate", &uefi]), "running");
    assert_eq!(common::virsh_system_ok(&["domstate", &bios]), "shut off");
    assert!(
        common::virsh_system_ok(&["dominfo", &uefi])
            .lines()
            .any(|l| l.starts_with("Autostart:") && l.ends_with("enable"))
    );
    assert!(
        common::virsh_system_ok(&["dominfo", &bios])
            .lines()
            .any(|l| l.starts_with("Autostart:") && l.ends_with("disable"))
    );
    let uuid = common::virsh_system_ok(&["domuuid", &uefi]);
    let nvram = PathBuf::from(format!("/var/lib/libvirt/qemu/nvram/{uefi}_VARS.fd"));
    let tpm_dir = PathBuf::from(format!("/var/lib/libvirt/swtpm/{uuid}"));
    assert!(nvram.is_file(), "OVMF NVRAM created at {}", nvram.display());
    assert!(tpm_dir.is_dir(), "swtpm state at {}", tpm_dir.display());
    let live = common::virsh_system_ok(&["dumpxml", &uefi]);
    assert!(
        live.contains("<tpm model='tpm-crb'>") && live.contains("secure='yes'"),
        "{live}"
    );
    let inactive = |name: &str| common::virsh_system_ok(&["dumpxml", "--inactive", name]);
    let uefi_xml_1 = inactive(&uefi);
    assert!(
        uefi_xml_1.contains(&format!("<vmsync:commit>{c1}</vmsync:commit>")),
        "{uefi_xml_1}"
    );
    let mac = |name: &str| {
        let xml = inactive(name);
        let at = xml.find("<mac address='").expect("libvirt generated a mac") + 14;
        xml[at..at + 17].to_string()
    };
    let (uefi_mac, bios_mac) = (mac(&uefi), mac(&bios));

    // Second sync on the same commit: nothing changes.
    let (bios_xml_1, keep_xml_1) = (inactive(&bios), inactive(&keep));
    let run = once().expect(0);
    assert!(
        run.stdout.contains(&format!("nothing to do: commit {c1}")),
        "{}",
        run.stdout
    );
    assert_eq!(inactive(&uefi), uefi_xml_1);
    assert_eq!(inactive(&bios), bios_xml_1);
    assert_eq!(inactive(&keep), keep_xml_1);

    // Edit only the running UEFI guest: redefined in place, UUID/MAC/NVRAM/TPM kept,
    // still running (pending restart); the others are not touched.
    let nvram_ino = std::fs::metadata(&nvram).unwrap().ino();
    repo.write(
        "vms/uefi.xml",
        &uefi_tpm_xml(&uefi, &disk(&uefi)).replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>"),
    );
    let c2 = repo.commit("two vcpus for uefi");
    let run = once().expect(0);
    assert!(
        run.stdout.contains(&format!("{uefi}: redefine in place")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("{uefi}: pending restart")),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains(&format!("{bios}:")), "{}", run.stdout);
    let uefi_xml_2 = inactive(&uefi);
    assert!(
        uefi_xml_2.contains("<vcpu placement='static'>2</vcpu>"),
        "{uefi_xml_2}"
    );
    assert!(uefi_xml_2.contains(&format!("<vmsync:commit>{c2}</vmsync:commit>")));
    assert_eq!(common::virsh_system_ok(&["domuuid", &uefi]), uuid);
    assert_eq!(mac(&uefi), uefi_mac);
    assert_eq!(mac(&bios), bios_mac);
    assert_eq!(common::virsh_system_ok(&["domstate", &uefi]), "running");
    assert_eq!(
        std::fs::metadata(&nvram).unwrap().ino(),
        nvram_ino,
        "NVRAM file kept"
    );
    // (Its content is the running firmware's to change; that the same file is still
    // there, not a fresh copy of the template, is what "kept" means.)
    assert!(tpm_dir.is_dir(), "TPM state kept");
    assert_eq!(inactive(&bios), bios_xml_1);
    assert_eq!(inactive(&keep), keep_xml_1);

    let status = common::status_json(&args);
    assert_eq!(status["last_applied_commit"], c2.as_str());
    let vm = |name: &str| {
        status["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(vm(&uefi)["pending_restart"], true);
    assert_eq!(vm(&uefi)["active"], true);
    assert_eq!(vm(&uefi)["autostart"], true);
    assert_eq!(vm(&bios)["defined"], true);
    assert_eq!(vm(&bios)["active"], false);
    assert_eq!(vm(&bios)["pending_restart"], false);
    assert_eq!(vm(&bios)["drift"], serde_json::json!([]));

    // A commit with one broken VM: exit 3, nothing on the host or in the record moves.
    let record_before = std::fs::read_to_string(state.path().join("state.json")).unwrap();
    repo.write(
        "vms/bios.xml",
        &bios_xml(&bios, kvm, &disk(&bios), 256).replace("<vcpu>1</vcpu>", "<vcpus>1</vcpus>"),
    );
    repo.write("vms/keep.xml", &bios_xml(&keep, kvm, &disk(&keep), 512));
    repo.commit("broken bios, bigger keep");
    let run = once().expect(3);
    assert!(
        run.stderr.contains(&format!(
            "vms/bios.xml: vm '{bios}': field 'xml': rejected by libvirt"
        )),
        "{}",
        run.stderr
    );
    assert_eq!(inactive(&uefi), uefi_xml_2);
    assert_eq!(inactive(&bios), bios_xml_1);
    assert_eq!(
        inactive(&keep),
        keep_xml_1,
        "the valid VM of an invalid commit is not applied either"
    );
    assert_eq!(common::virsh_system_ok(&["domstate", &uefi]), "running");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.path().join("state.json")).unwrap())
            .unwrap();
    let before: serde_json::Value = serde_json::from_str(&record_before).unwrap();
    assert_eq!(record["last_applied_commit"], c2.as_str());
    assert_eq!(record["vms"], before["vms"]);
    assert_eq!(record["last_result"], "invalid");
    assert_eq!(sha256_file(&disk(&keep)), keep_hash);

    // The broken file alone: its define is the only change, so libvirtd's validating
    // define checks it; refused there, it is still a schema mistake (exit 3) and nothing
    // moves.
    repo.write("vms/bios.xml", &bios_xml(&bios, kvm, &disk(&bios), 128));
    repo.write("vms/keep.xml", &bios_xml(&keep, kvm, &disk(&keep), 128));
    let c3 = repo.commit("as c2");
    once().expect(0);
    let record_before = std::fs::read_to_string(state.path().join("state.json")).unwrap();
    let before: serde_json::Value = serde_json::from_str(&record_before).unwrap();
    repo.write(
        "vms/bios.xml",
        &bios_xml(&bios, kvm, &disk(&bios), 256).replace("<vcpu>1</vcpu>", "<vcpus>1</vcpus>"),
    );
    repo.commit("broken bios only");
    let run = once().expect(3);
    assert!(
        run.stderr.contains(&format!(
            "vms/bios.xml: vm '{bios}': field 'xml': rejected by libvirt"
        )) && run.stderr.contains("vcpus"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("failed to define domain"),
        "libvirtd was asked: {}",
        run.stderr
    );
    assert_eq!(inactive(&bios), bios_xml_1);
    assert_eq!(inactive(&keep), keep_xml_1);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.path().join("state.json")).unwrap())
            .unwrap();
    assert_eq!(record["last_applied_commit"], c3.as_str());
    assert_eq!(record["vms"], before["vms"]);
    assert_eq!(record["last_result"], "invalid");
}

#[test]
fn real_libvirtd_never_touches_a_hand_made_domain() {
    if !common::libvirtd_available() {
        return;
    }
    let (p, images, _cleanup) = common::scratch("hand");
    let name = format!("{p}-vm");
    let disk = images.join("vm.qcow2");
    // Defined by an operator, by hand, without vmsync's tag.
    let by_hand = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(by_hand.path(), bios_xml(&name, "qemu", &disk, 96)).unwrap();
    common::virsh_system_ok(&["define", &by_hand.path().display().to_string()]);
    let before = common::virsh_system_ok(&["dumpxml", "--inactive", &name]);

    let repo = Repo::new();
    repo.write(
        "vmsync.toml",
        &format!("version = 1\n[[vm]]\nname = \"{name}\"\nxml = \"vm.xml\"\nautostart = true\n  [[vm.disk]]\n  path = \"{}\"\n  size = \"64M\"\n", disk.display()),
    );
    repo.write("vm.xml", &bios_xml(&name, "qemu", &disk, 128));
    repo.commit("claim a hand-made domain");
    let state = tempfile::tempdir().unwrap();
    let run = vmsync(&[
        "--once",
        "--url",
        &repo.path().display().to_string(),
        "--state-dir",
        &state.path().display().to_string(),
        "--connect",
        "qemu:///system",
        "--disk-root",
        &images.display().to_string(),
    ])
    .expect(1);
    assert!(
        run.stderr.contains("was not defined by vmsync"),
        "{}",
        run.stderr
    );
    assert_eq!(
        common::virsh_system_ok(&["dumpxml", "--inactive", &name]),
        before
    );
    assert_eq!(common::virsh_system_ok(&["domstate", &name]), "shut off");
    assert!(
        !disk.exists(),
        "no disk created for a VM that is not converged"
    );
}
