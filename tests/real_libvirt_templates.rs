//! Tier 3, templates: three UEFI guests rendered from one template against a real
//! libvirtd. One change to the template in git redefines all three in place (UUID,
//! NVRAM file and MACs kept); one VM's params changed redefines only that one; an
//! unchanged commit is a no-op.
//!
//! Without a reachable `qemu:///system` this test skips with a message, unless
//! `VMSYNC_REQUIRE_LIBVIRTD` is set: then it fails.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use common::{Env, virsh_system_ok as virsh};

/// UEFI (OVMF) under TCG, which runs everywhere (`type='qemu'`); no `<uuid>`, no `<mac>`.
fn template() -> String {
    format!(
        "<domain type='qemu'>
  <name>{{{{ vm.name }}}}</name>
  <memory unit='MiB'>{{{{ params.memory_mib }}}}</memory>
  <vcpu>1</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <features><acpi/><apic/></features>
{}</domain>
",
        common::devices_xml("{{ params.images }}/{{ vm.name }}.qcow2", "")
    )
}

fn manifest(env: &Env, names: &[String], memory: [u32; 3]) -> String {
    let mut m = format!(
        "version = 1\n\n[params]\nmemory_mib = 256\nimages = \"{}\"\n",
        env.images.display()
    );
    for (name, memory) in names.iter().zip(memory) {
        m += &format!(
            "\n[[vm]]\nname = \"{name}\"\ntemplate = \"templates/uefi.xml\"\nautostart = true\n  [vm.params]\n  memory_mib = {memory}\n\n  [[vm.disk]]\n  path = \"{}/{name}.qcow2\"\n  size = \"64M\"\n",
            env.images.display()
        );
    }
    m
}

/// What must survive a redefine: UUID, the NVRAM file (by inode) and the MAC.
#[derive(Debug, PartialEq, Eq)]
struct Identity {
    uuid: String,
    nvram_inode: u64,
    mac: String,
}

fn identity(name: &str) -> Identity {
    let xml = virsh(&["dumpxml", "--inactive", name]);
    let at = xml.find("<mac address='").expect("libvirt generated a mac") + 14;
    let nvram = PathBuf::from(format!("/var/lib/libvirt/qemu/nvram/{name}_VARS.fd"));
    Identity {
        uuid: virsh(&["domuuid", name]),
        nvram_inode: std::fs::metadata(&nvram)
            .unwrap_or_else(|e| panic!("NVRAM {}: {e}", nvram.display()))
            .ino(),
        mac: xml[at..at + 17].to_string(),
    }
}

#[test]
fn real_template_change_redefines_its_vms_in_place() {
    let Some(env) = Env::system("tmpl") else {
        return;
    };
    let names: Vec<String> = ["t1", "t2", "t3"].iter().map(|s| env.name(s)).collect();
    let repo = &env.repo;
    repo.write("templates/uefi.xml", &template());
    repo.write("vmsync.toml", &manifest(&env, &names, [256, 256, 256]));
    repo.commit("three uefi vms from one template");
    let once = || env.run(&["--once"]);

    // First sync: all three defined and started (OVMF makes each one's NVRAM file).
    let run = once().expect(0);
    for name in &names {
        run.stdout_has(&format!("{name}: create qcow2 disk"));
        assert_eq!(virsh(&["domstate", name]), "running", "{name}");
    }
    let before: Vec<Identity> = names.iter().map(|n| identity(n)).collect();
    let inactive = |name: &str| virsh(&["dumpxml", "--inactive", name]);
    let xml_1: Vec<String> = names.iter().map(|n| inactive(n)).collect();

    // The same commit again: nothing rendered differently, nothing to do.
    once().expect(0).stdout_has("nothing to do");

    // One change to the template: plan shows the rendered diff, the sync redefines all
    // three in place, and they keep their identity and NVRAM.
    repo.write(
        "templates/uefi.xml",
        &template().replace("  <vcpu>", "  <title>from a template</title>\n  <vcpu>"),
    );
    let c2 = repo.commit("a title for every vm of the template");
    let plan = env.run(&["plan"]).expect(0);
    plan.stdout_has(&format!("plan for commit {c2}"));
    plan.stdout_has("+  <title>from a template</title>");
    let run = once().expect(0);
    run.stdout_has(": 3 change(s)");
    for (i, name) in names.iter().enumerate() {
        run.stdout_has(&format!("{name}: redefine in place"));
        let xml = inactive(name);
        assert!(xml.contains("<title>from a template</title>"), "{xml}");
        assert!(xml.contains(&format!("<vmsync:commit>{c2}</vmsync:commit>")));
        assert_eq!(identity(name), before[i], "{name} kept its identity");
        assert_eq!(virsh(&["domstate", name]), "running", "{name}");
    }
    let xml_2: Vec<String> = names.iter().map(|n| inactive(n)).collect();
    assert_ne!(xml_1, xml_2);

    // One VM's params changed: only that VM is redefined.
    repo.write("vmsync.toml", &manifest(&env, &names, [256, 320, 256]));
    repo.commit("more memory for t2");
    let run = once().expect(0);
    run.stdout_has(": 1 change(s)");
    run.stdout_has(&format!("{}: redefine in place", names[1]));
    run.stdout_lacks(&format!("{}: redefine", names[0]));
    run.stdout_lacks(&format!("{}: redefine", names[2]));
    assert!(inactive(&names[1]).contains("<memory unit='KiB'>327680</memory>"));
    assert_eq!(inactive(&names[0]), xml_2[0]);
    assert_eq!(inactive(&names[2]), xml_2[2]);
    for (i, name) in names.iter().enumerate() {
        assert_eq!(identity(name), before[i], "{name} kept its identity");
    }
}
