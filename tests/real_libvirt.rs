//! Tier 3: the real binary against a real libvirtd with QEMU (KVM for the BIOS guest where
//! `/dev/kvm` exists, TCG otherwise and for UEFI), real qemu-img disks, OVMF with secure
//! boot and swtpm TPM 2.0.
//!
//! Without a reachable `qemu:///system` these tests skip with a message, unless
//! `VMSYNC_REQUIRE_LIBVIRTD` is set (CI sets it through scripts/test.sh): then they fail.
//! Test domains carry a unique name prefix and are removed afterwards.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

use common::{Env, Manifest, Vm, bios_xml, qemu_img_info, sha256_file, uefi_tpm_xml};

#[test]
fn real_libvirtd_sync_life_cycle() {
    let Some(env) = Env::system("life") else {
        return;
    };
    let kvm = env.domain_type();
    let (uefi, bios, keep) = (env.name("uefi"), env.name("bios"), env.name("keep"));
    let disk = |name: &str| env.images.join(format!("{name}.qcow2"));

    // An existing disk (smaller than the manifest says) that must stay byte-for-byte.
    common::output_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(disk(&keep))
            .arg("64M"),
    );
    let keep_hash = sha256_file(&disk(&keep));
    let keep_meta = std::fs::metadata(disk(&keep)).unwrap();

    let repo = &env.repo;
    let three = Manifest::new()
        .directory(&env.images.join("ISOs"))
        .vm(Vm::new(&uefi)
            .file("vms/uefi.xml")
            .key("autostart = true")
            .disk(&disk(&uefi), "256M")
            .xml(&uefi_tpm_xml(&uefi, &disk(&uefi))))
        .vm(Vm::new(&bios)
            .file("vms/bios.xml")
            .key("autostart = false")
            .disk(&disk(&bios), "128M")
            .disk_key("format = \"qcow2\"")
            .xml(&bios_xml(&bios, kvm, &disk(&bios), 128)))
        .vm(Vm::new(&keep)
            .file("vms/keep.xml")
            .disk(&disk(&keep), "1G")
            .xml(&bios_xml(&keep, kvm, &disk(&keep), 128)));
    let c1 = env.commit(&three, "three vms");
    let once = || env.run(&["--once"]);

    // First sync: directories, disks, definitions, autostart, the UEFI + TPM guest runs.
    let run = once().expect(0);
    run.stdout_has(&format!("applied commit {c1}"));
    assert!(env.images.join("ISOs").is_dir());
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
    // The size difference is reported.
    run.stderr_has(&format!(
        "existing image is 64 MiB, manifest says 1 GiB; left as is vm={keep}"
    ));

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
    run.stdout_has(&format!("nothing to do: commit {c1}"));
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
    run.stdout_has(&format!("{uefi}: redefine in place"));
    run.stdout_has(&format!("{uefi}: pending restart"));
    run.stdout_lacks(&format!("{bios}:"));
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

    let status = env.status();
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
    let record_before = env.state_json().unwrap();
    repo.write(
        "vms/bios.xml",
        &bios_xml(&bios, kvm, &disk(&bios), 256).replace("<vcpu>1</vcpu>", "<vcpus>1</vcpus>"),
    );
    repo.write("vms/keep.xml", &bios_xml(&keep, kvm, &disk(&keep), 512));
    repo.commit("broken bios, bigger keep");
    let run = once().expect(3);
    run.stderr_has(&format!(
        "vms/bios.xml: vm '{bios}': field 'xml': rejected by libvirt"
    ));
    assert_eq!(inactive(&uefi), uefi_xml_2);
    assert_eq!(inactive(&bios), bios_xml_1);
    assert_eq!(
        inactive(&keep),
        keep_xml_1,
        "the valid VM of an invalid commit is not applied either"
    );
    assert_eq!(common::virsh_system_ok(&["domstate", &uefi]), "running");
    let record: serde_json::Value = serde_json::from_str(&env.state_json().unwrap()).unwrap();
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
    let record_before = env.state_json().unwrap();
    let before: serde_json::Value = serde_json::from_str(&record_before).unwrap();
    repo.write(
        "vms/bios.xml",
        &bios_xml(&bios, kvm, &disk(&bios), 256).replace("<vcpu>1</vcpu>", "<vcpus>1</vcpus>"),
    );
    let c4 = repo.commit("broken bios only");
    let run = once().expect(3);
    run.stderr_has(&format!(
        "vms/bios.xml: vm '{bios}': field 'xml': rejected by libvirt"
    ))
    .stderr_has("Extra element vcpus");
    // Refused before anything reached libvirtd: no action was tried.
    assert!(!run.stderr.contains("action failed"), "{}", run.stderr);
    let _ = c4;
    assert_eq!(inactive(&bios), bios_xml_1);
    assert_eq!(inactive(&keep), keep_xml_1);
    let record: serde_json::Value = serde_json::from_str(&env.state_json().unwrap()).unwrap();
    assert_eq!(record["last_applied_commit"], c3.as_str());
    assert_eq!(record["vms"], before["vms"]);
    assert_eq!(record["last_result"], "invalid");
}

#[test]
fn real_libvirtd_never_touches_a_hand_made_domain() {
    let Some(env) = Env::system("hand") else {
        return;
    };
    let name = env.name("vm");
    let disk = env.disk("vm");
    // Defined by an operator, by hand, without vmsync's tag.
    let by_hand = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(by_hand.path(), bios_xml(&name, "qemu", &disk, 96)).unwrap();
    common::virsh_system_ok(&["define", &by_hand.path().display().to_string()]);
    let before = env.inactive("vm");

    let claim = env
        .vm("vm")
        .file("vm.xml")
        .key("autostart = true")
        .xml(&bios_xml(&name, "qemu", &disk, 128));
    env.commit(&Manifest::new().vm(claim), "claim a hand-made domain");
    env.run(&["--once"])
        .expect(1)
        .stderr_has("was not defined by vmsync");
    assert_eq!(env.inactive("vm"), before);
    assert_eq!(env.domstate("vm"), "shut off");
    assert!(
        !disk.exists(),
        "no disk created for a VM that is not converged"
    );
}
