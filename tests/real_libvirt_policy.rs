//! Tier 3 for the host policy (issue 21): hostile commits against a real libvirtd, each
//! refused at validation (exit 3, naming the field and the key that would allow it) with
//! nothing changed on the host — no pool, network or domain defined, the victim's files
//! as they were:
//!
//! - a `dir` pool whose target climbs out of the disk root with `..` and asks for
//!   `<permissions>` 0777 on a root-only directory;
//! - an `fs` pool on a loop device (made here with `losetup` on a file holding data, and
//!   detached afterwards) without `allow_block_devices`: libvirt would run mkfs over it;
//! - a network with `<dnsmasq:options>` (`log-facility=` makes dnsmasq's root helper
//!   write a file anywhere);
//! - a domain whose `<serial type='file'>` points at another VM's NVRAM file (QEMU
//!   would truncate it);
//!
//! and the VM's own serial log file in libvirt's log directory, which is allowed and
//! really written by a started guest.
//!
//! Without a reachable `qemu:///system` these tests skip, unless
//! `VMSYNC_REQUIRE_LIBVIRTD` is set: then they fail. Everything carries the test's
//! unique prefix and is removed afterwards.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, virsh_system};

/// The problem lines of a refused commit.
fn problems(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .collect()
}

/// Whether libvirt has a pool, network or domain of this name (`kind`: pool, net, dom).
fn defined(kind: &str, name: &str) -> bool {
    let list = match kind {
        "pool" => "pool-list",
        "net" => "net-list",
        _ => "list",
    };
    let (_, out) = virsh_system(&[list, "--all", "--name"]);
    out.lines().any(|l| l.trim() == name)
}

/// Runs `--once` on the commit of `manifest` and files, which must be refused.
fn refused(env: &Env, manifest: &str, files: &[(&str, String)]) -> Vec<String> {
    env.repo.write("vmsync.toml", manifest);
    for (path, text) in files {
        env.repo.write(path, text);
    }
    let commit = env.repo.commit("hostile");
    let run = env.run(&["--once"]).expect(3);
    run.stderr_has(&format!("commit {commit} is invalid; nothing was applied:"));
    let record = env.record();
    assert_eq!(record.last_applied_commit, None);
    problems(&run.stderr)
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn a_pool_target_with_dotdot_does_not_chmod_a_directory_outside_the_roots() {
    let Some(env) = Env::system("pooldotdot") else {
        return;
    };
    // A root-only directory outside the disk root, reached from it with '..'.
    let victim = PathBuf::from(format!("/tmp/{}-victim", env.prefix));
    env.cleanup().also_remove(victim.clone());
    std::fs::create_dir(&victim).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o700)).unwrap();
    let up = "../".repeat(env.images.components().count() - 1);
    let target = format!("{}/{up}tmp/{}-victim", env.images.display(), env.prefix);
    let pool = env.name("pool");
    let xml = format!(
        "<pool type='dir'>\n  <name>{pool}</name>\n  <target>\n    <path>{target}</path>\n    <permissions>\n      <mode>0777</mode>\n      <owner>65534</owner>\n      <group>65534</group>\n    </permissions>\n  </target>\n</pool>\n"
    );
    let manifest = format!(
        "version = 1\n\n[[pool]]\nname = \"{pool}\"\nxml = \"pools/p.xml\"\nautostart = true\n"
    );
    let p = refused(&env, &manifest, &[("pools/p.xml", xml)]);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].contains("field 'pool.target/path'") && p[0].contains("must not contain '.' or '..'"),
        "{p:?}"
    );
    assert!(!defined("pool", &pool), "the pool was defined");
    let meta = std::fs::metadata(&victim).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700, "mode changed");
    assert_eq!(
        std::fs::read_dir(&victim).unwrap().count(),
        0,
        "a file appeared"
    );
}

/// A loop device on a file, detached when dropped.
struct Loop {
    dev: String,
}

impl Loop {
    fn new(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn an_fs_pool_on_a_host_block_device_needs_allow_block_devices() {
    let Some(env) = Env::system("fsloop") else {
        return;
    };
    // Unlabelled data on a block device: mkfs would destroy it.
    let backing = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(backing.path(), &data).unwrap();
    let lo = Loop::new(backing.path());
    let pool = env.name("fs");
    let xml = format!(
        "<pool type='fs'>\n  <name>{pool}</name>\n  <source>\n    <device path='{}'/>\n    <format type='ext4'/>\n  </source>\n  <target>\n    <path>{}</path>\n  </target>\n</pool>\n",
        lo.dev,
        env.images.join("fs").display()
    );
    let manifest = format!(
        "version = 1\n\n[[pool]]\nname = \"{pool}\"\nxml = \"pools/fs.xml\"\nautostart = true\n"
    );
    let p = refused(&env, &manifest, &[("pools/fs.xml", xml)]);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].contains("field 'pool.type'") && p[0].contains("allow_block_devices = true"),
        "{p:?}"
    );
    assert!(!defined("pool", &pool), "the pool was defined");
    assert!(!env.images.join("fs").exists(), "the target was made");
    drop(lo);
    assert!(
        std::fs::read(backing.path()).unwrap() == data,
        "the device's data changed"
    );
}

#[test]
fn dnsmasq_options_in_a_network_need_allow_qemu_commandline() {
    let Some(env) = Env::system("dnsmasq") else {
        return;
    };
    let pid = std::process::id();
    let net = env.name("net");
    let written = PathBuf::from(format!("/root/{}-dnsmasq.log", env.prefix));
    env.cleanup().also_remove(written.clone());
    let xml = format!(
        "<network xmlns:dnsmasq='http://libvirt.org/schemas/network/dnsmasq/1.0'>\n  <name>{net}</name>\n  <bridge name='vsd{}'/>\n  <ip address='10.{}.78.1' netmask='255.255.255.0'/>\n  <dnsmasq:options>\n    <dnsmasq:option value='log-facility={}'/>\n  </dnsmasq:options>\n</network>\n",
        pid % 1_000_000,
        100 + pid % 100,
        written.display()
    );
    let manifest = format!(
        "version = 1\n\n[[network]]\nname = \"{net}\"\nxml = \"networks/n.xml\"\nautostart = true\n"
    );
    let p = refused(&env, &manifest, &[("networks/n.xml", xml)]);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].contains("field 'network.dnsmasq:options'")
            && p[0].contains("allow_qemu_commandline = true"),
        "{p:?}"
    );
    assert!(!defined("net", &net), "the network was defined");
    assert!(!written.exists(), "dnsmasq wrote {}", written.display());
}

#[test]
fn a_serial_file_may_not_point_at_another_vms_nvram_but_at_its_own_log() {
    let Some(env) = Env::system("nvram") else {
        return;
    };
    // Another VM's NVRAM (its UEFI variables), where libvirt keeps it.
    let nvram = PathBuf::from(format!(
        "/var/lib/libvirt/qemu/nvram/{}_VARS.fd",
        env.name("victim")
    ));
    env.cleanup().also_remove(nvram.clone());
    std::fs::create_dir_all(nvram.parent().unwrap()).unwrap();
    let vars = vec![0x5au8; 128 * 1024];
    std::fs::write(&nvram, &vars).unwrap();

    let vm = env.name("a");
    let serial = |path: &str| {
        env.bios("a", 128).replace(
            "  </devices>",
            &format!("    <serial type='file'>\n      <source path='{path}'/>\n    </serial>\n  </devices>"),
        )
    };
    let manifest = format!(
        "version = 1\n\n[[vm]]\nname = \"{vm}\"\nxml = \"vms/a.xml\"\nautostart = true\n\n  [[vm.disk]]\n  path = \"{}\"\n  size = \"64M\"\n",
        env.disk("a").display()
    );
    let p = refused(
        &env,
        &manifest,
        &[("vms/a.xml", serial(&nvram.display().to_string()))],
    );
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].contains("field 'devices/serial/source'")
            && p[0].contains("libvirt's shared directory"),
        "{p:?}"
    );
    assert!(!defined("dom", &vm), "the domain was defined");
    assert!(!env.disk("a").exists(), "the disk was made");
    assert!(std::fs::read(&nvram).unwrap() == vars, "the NVRAM changed");

    // Its own serial log in libvirt's log directory: applied, started, written.
    let log = PathBuf::from(format!("/var/log/libvirt/qemu/{vm}-serial0.log"));
    env.cleanup().also_remove(log.clone());
    env.repo
        .write("vms/a.xml", &serial(&log.display().to_string()));
    env.repo.commit("own serial log");
    env.run(&["--once"]).expect(0);
    assert_eq!(env.domstate("a"), "running");
    assert!(log.exists(), "QEMU made the serial log");
    assert!(std::fs::read(&nvram).unwrap() == vars, "the NVRAM changed");
}
