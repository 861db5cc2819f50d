//! Tier 3 for networks, storage pools and volumes: the real binary against a real
//! libvirtd. A bridge network (`<forward mode='bridge'/>` on a bridge this test makes
//! with `ip link add … type bridge`), an isolated network (dnsmasq and iptables, which
//! scripts/setup-host.sh installs before libvirtd starts), a `dir` pool with a qcow2, a
//! raw and a backed qcow2 volume checked with `qemu-img info`, and a domain whose
//! interfaces and disks use them and which really starts. Then: a no-op sync, a changed
//! network definition (pending restart, then `on_change = "restart"`), a hand-made
//! network (refused, then adopted with its UUID), and pruning (the pool's storage and
//! volumes stay).
//!
//! Without a reachable `qemu:///system` these tests skip, unless
//! `VMSYNC_REQUIRE_LIBVIRTD` is set: then they fail. Every network, pool, bridge and
//! domain carries the test's unique prefix and is removed afterwards.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Env, qemu_img_info, virsh_system, virsh_system_ok};

/// Removes the test's networks, pools and bridge (the domains and the images directory
/// go with the env's own cleanup, which runs after this guard: declared before it).
struct NetCleanup {
    prefix: String,
    bridge: String,
}

impl Drop for NetCleanup {
    fn drop(&mut self) {
        // Domains first: a running domain holds its network's bridge.
        let (_, names) = virsh_system(&["list", "--all", "--name"]);
        for name in names
            .lines()
            .map(str::trim)
            .filter(|n| common::owned_by(n, &self.prefix))
        {
            virsh_system(&["destroy", name]);
            virsh_system(&["undefine", name, "--nvram"]);
        }
        let (_, nets) = virsh_system(&["net-list", "--all", "--name"]);
        for name in nets
            .lines()
            .map(str::trim)
            .filter(|n| common::owned_by(n, &self.prefix))
        {
            virsh_system(&["net-destroy", name]);
            virsh_system(&["net-undefine", name]);
        }
        let (_, pools) = virsh_system(&["pool-list", "--all", "--name"]);
        for name in pools
            .lines()
            .map(str::trim)
            .filter(|n| common::owned_by(n, &self.prefix))
        {
            virsh_system(&["pool-destroy", name]);
            virsh_system(&["pool-undefine", name]);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

fn ip_ok(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bridge_network(name: &str, bridge: &str) -> String {
    format!(
        "<network>\n  <name>{name}</name>\n  <forward mode='bridge'/>\n  <bridge name='{bridge}'/>\n</network>\n"
    )
}

fn isolated_network(name: &str, bridge: &str, net: u32) -> String {
    format!(
        "<network>\n  <name>{name}</name>\n  <bridge name='{bridge}'/>\n  <ip address='10.{net}.77.1' netmask='255.255.255.0'>\n    <dhcp>\n      <range start='10.{net}.77.10' end='10.{net}.77.20'/>\n    </dhcp>\n  </ip>\n</network>\n"
    )
}

fn dir_pool(name: &str, path: &Path) -> String {
    format!(
        "<pool type='dir'>\n  <name>{name}</name>\n  <target>\n    <path>{}</path>\n  </target>\n</pool>\n",
        path.display()
    )
}

fn guest(name: &str, kind: &str, pool: &str, br: &str, iso: &str) -> String {
    format!(
        r#"<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='{pool}' volume='{name}.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='raw'/>
      <source pool='{pool}' volume='{name}-data.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='network'><source network='{br}'/><model type='virtio'/></interface>
    <interface type='network'><source network='{iso}'/><model type='virtio'/></interface>
    <graphics type='vnc' listen='127.0.0.1'/>
  </devices>
</domain>
"#
    )
}

#[test]
fn real_libvirtd_networks_pools_and_volumes() {
    let Some(env) = Env::system("net") else {
        return;
    };
    let pid = std::process::id();
    // Interface names are at most 15 characters.
    let bridge = format!("vsb{}", pid % 1_000_000);
    let iso_bridge = format!("vsi{}", pid % 1_000_000);
    let _net_cleanup = NetCleanup {
        prefix: env.prefix.clone(),
        bridge: bridge.clone(),
    };
    ip_ok(&["link", "add", &bridge, "type", "bridge"]);
    ip_ok(&["link", "set", &bridge, "up"]);

    let (br, iso, pool, vm) = (
        env.name("br"),
        env.name("iso"),
        env.name("pool"),
        env.name("vm"),
    );
    let pool_dir = env.images.join("pool");
    let base = env.images.join("base.qcow2");
    common::output_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("32M"),
    );
    let repo = &env.repo;
    let manifest = |net_extra: &str| {
        format!(
            r#"version = 1

[[pool]]
name = "{pool}"
xml = "pools/pool.xml"
autostart = true

[[network]]
name = "{br}"
xml = "networks/br.xml"
autostart = true

[[network]]
name = "{iso}"
xml = "networks/iso.xml"
autostart = true
{net_extra}

[[vm]]
name = "{vm}"
xml = "vms/vm.xml"
autostart = true

  [[vm.disk]]
  pool = "{pool}"
  volume = "{vm}.qcow2"
  size = "64M"
  format = "qcow2"

  [[vm.disk]]
  pool = "{pool}"
  volume = "{vm}-data.img"
  size = "16M"
  format = "raw"

  [[vm.disk]]
  pool = "{pool}"
  volume = "{vm}-clone.qcow2"
  size = "32M"
  format = "qcow2"
  backing = "{base}"
  backing_format = "qcow2"
"#,
            base = base.display()
        )
    };
    let net = 100 + pid % 100;
    repo.write("vmsync.toml", &manifest(""));
    repo.write("pools/pool.xml", &dir_pool(&pool, &pool_dir));
    repo.write("networks/br.xml", &bridge_network(&br, &bridge));
    repo.write(
        "networks/iso.xml",
        &isolated_network(&iso, &iso_bridge, net),
    );
    repo.write(
        "vms/vm.xml",
        &guest(&vm, env.domain_type(), &pool, &br, &iso),
    );
    let c1 = repo.commit("pool, networks and a vm on them");

    // First sync: pool defined, built, started; volumes made; networks started; the
    // domain defined and started on them.
    let run = env.run(&["--once"]).expect(0);
    run.stdout_has(&format!("applied commit {c1}"));
    run.stdout_has(&format!(
        "pool {pool}: define, build (never overwriting), set autostart, start"
    ));
    run.stdout_has(&format!("network {br}: define, set autostart, start"));
    assert!(pool_dir.is_dir(), "the pool's directory was built");
    let info = qemu_img_info(&pool_dir.join(format!("{vm}.qcow2")));
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64u64 << 20);
    let info = qemu_img_info(&pool_dir.join(format!("{vm}-data.img")));
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual-size"], 16u64 << 20);
    let info = qemu_img_info(&pool_dir.join(format!("{vm}-clone.qcow2")));
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["backing-filename"], base.display().to_string());
    assert_eq!(virsh_system_ok(&["domstate", &vm]), "running");
    for name in [&br, &iso] {
        let info = virsh_system_ok(&["net-info", name]);
        assert!(info.contains("Active:         yes"), "{name}: {info}");
        assert!(info.contains("Autostart:      yes"), "{name}: {info}");
    }
    let pool_info = virsh_system_ok(&["pool-info", &pool]);
    assert!(pool_info.contains("State:          running"), "{pool_info}");
    // The guest's interfaces are on the test's bridge and the isolated network's.
    let ifaces = virsh_system_ok(&["domiflist", &vm]);
    assert!(ifaces.contains(&br) && ifaces.contains(&iso), "{ifaces}");
    for b in [&bridge, &iso_bridge] {
        let out = Command::new("ip")
            .args(["-o", "link", "show", "master", b])
            .output()
            .unwrap();
        let ports = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            ports.contains("vnet"),
            "the guest's tap device is on {b}: {ports}"
        );
    }
    // Networks carry vmsync's tag; the pool is recorded with its UUID.
    let xml = virsh_system_ok(&["net-dumpxml", "--inactive", &br]);
    assert!(xml.contains("vmsync/xmlns"), "{xml}");
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env.state.path().join("state.json")).unwrap(),
    )
    .unwrap();
    let pool_uuid = virsh_system_ok(&["pool-uuid", &pool]);
    assert_eq!(record["pools"][&pool]["uuid"], pool_uuid);

    // A volume that exists is never overwritten: its bytes stay.
    let data = pool_dir.join(format!("{vm}-data.img"));
    std::fs::write(&data, vec![7u8; 16 << 20]).unwrap();

    // Second sync: nothing to do.
    let run = env.run(&["--once"]).expect(0);
    run.stdout_has("nothing to do");
    assert_eq!(std::fs::read(&data).unwrap(), vec![7u8; 16 << 20]);

    // A changed definition of an active network: redefined in place, pending restart.
    let br_uuid = virsh_system_ok(&["net-uuid", &br]);
    repo.write(
        "networks/iso.xml",
        &isolated_network(&iso, &iso_bridge, net).replace(
            &format!("end='10.{net}.77.20'"),
            &format!("end='10.{net}.77.30'"),
        ),
    );
    repo.commit("wider dhcp range");
    let run = env.run(&["--once"]).expect(0);
    run.stdout_has(&format!("network {iso}: redefine in place"));
    run.stdout_has(&format!("network {iso}: pending restart"));
    let xml = virsh_system_ok(&["net-dumpxml", "--inactive", &iso]);
    assert!(xml.contains(".77.30"), "{xml}");
    let live = virsh_system_ok(&["net-dumpxml", &iso]);
    assert!(live.contains(".77.20"), "still running the old one: {live}");
    let status = env.run(&["status", "--json"]).expect(0);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let iso_status = status["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == iso.as_str())
        .unwrap()
        .clone();
    assert_eq!(iso_status["pending_restart"], true, "{status}");
    assert_eq!(iso_status["active"], true, "{status}");

    // on_change = "restart": stopped and started, naming the VM that loses its link.
    repo.write("vmsync.toml", &manifest("on_change = \"restart\""));
    repo.commit("restart the isolated network on change");
    let run = env.run(&["--once"]).expect(0);
    run.stderr_has("lose their link");
    run.stderr_has(&vm);
    let live = virsh_system_ok(&["net-dumpxml", &iso]);
    assert!(live.contains(".77.30"), "restarted on the new one: {live}");
    assert_eq!(virsh_system_ok(&["net-uuid", &br]), br_uuid);

    // A hand-made network named by an entry: refused (exit 1), untouched; with adopt,
    // redefined in place with its UUID and tagged.
    let hand = env.name("hand");
    let hand_xml = bridge_network(&hand, &bridge);
    let file = env.images.join("hand.xml");
    std::fs::write(&file, &hand_xml).unwrap();
    virsh_system_ok(&["net-define", &file.display().to_string()]);
    let hand_uuid = virsh_system_ok(&["net-uuid", &hand]);
    let with_hand = |adopt: &str| {
        format!(
            "{}\n[[network]]\nname = \"{hand}\"\nxml = \"networks/hand.xml\"\n{adopt}\n",
            manifest("on_change = \"restart\"")
        )
    };
    repo.write("vmsync.toml", &with_hand(""));
    repo.write(
        "networks/hand.xml",
        &hand_xml.replace("</network>", "<!-- managed -->\n</network>"),
    );
    repo.commit("a hand-made network");
    let run = env.run(&["--once"]).expect(1);
    run.stderr_has(&format!(
        "name={hand} commit={} error=exists but was not defined by vmsync (no vmsync metadata)",
        &repo.head()[..12]
    ));
    let record = std::fs::read_to_string(env.state.path().join("state.json")).unwrap();
    assert!(
        record.contains(&format!(
            "network '{hand}': exists but was not defined by vmsync"
        )),
        "{record}"
    );
    let xml = virsh_system_ok(&["net-dumpxml", "--inactive", &hand]);
    assert!(!xml.contains("vmsync/xmlns"), "untouched: {xml}");
    repo.write("vmsync.toml", &with_hand("adopt = true"));
    repo.commit("adopt it");
    env.run(&["--once"]).expect(0);
    assert_eq!(virsh_system_ok(&["net-uuid", &hand]), hand_uuid);
    let xml = virsh_system_ok(&["net-dumpxml", "--inactive", &hand]);
    assert!(xml.contains("vmsync/xmlns"), "tagged: {xml}");

    // Pruning: the vm, then its networks and pool leave the manifest. Undefined after
    // the domain; the pool's directory and volumes stay.
    repo.write("vmsync.toml", "version = 1\n");
    repo.commit("empty");
    let run = env
        .run(&[
            "--once",
            "--prune",
            "--allow-mass-prune",
            "--shutdown-timeout",
            "1s",
        ])
        .expect(0);
    run.stdout_has(&format!(
        "pool {pool}: pruned: stop, undefine (keeping its storage and volumes)"
    ));
    run.stdout_has(&format!("network {br}: pruned"));
    let (defined, _) = virsh_system(&["net-info", &br]);
    assert!(!defined, "network {br} undefined");
    let (defined, _) = virsh_system(&["pool-info", &pool]);
    assert!(!defined, "pool {pool} undefined");
    assert!(
        pool_dir.join(format!("{vm}.qcow2")).is_file(),
        "volumes kept"
    );
    assert_eq!(std::fs::read(&data).unwrap(), vec![7u8; 16 << 20]);
}

/// Onboarding a host's own network and pool: `vmsync import` writes them, the first sync
/// with `adopt = true` only tags the network (a redefine with the same definition; it
/// keeps running, not pending restart) and leaves the pool's definition alone (its
/// ownership is the record), and the next sync has nothing to do.
#[test]
fn imported_network_and_pool_are_adopted_without_a_restart() {
    let Some(env) = Env::system("netimp") else {
        return;
    };
    let bridge = format!("vsj{}", std::process::id() % 1_000_000);
    let _net_cleanup = NetCleanup {
        prefix: env.prefix.clone(),
        bridge: bridge.clone(),
    };
    let (net, pool) = (env.name("iso"), env.name("pool"));
    let hand = tempfile::tempdir().unwrap();
    let net_file = hand.path().join("net.xml");
    let pool_file = hand.path().join("pool.xml");
    std::fs::write(&net_file, isolated_network(&net, &bridge, 79)).unwrap();
    std::fs::write(&pool_file, dir_pool(&pool, &env.images.join("pool"))).unwrap();
    std::fs::create_dir_all(env.images.join("pool")).unwrap();
    for args in [
        ["net-define", net_file.to_str().unwrap()],
        ["net-start", &net],
        ["pool-define", pool_file.to_str().unwrap()],
        ["pool-start", &pool],
    ] {
        virsh_system_ok(&args);
    }
    let net_uuid = virsh_system_ok(&["net-uuid", &net]);
    let pool_uuid = virsh_system_ok(&["pool-uuid", &pool]);

    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("repo");
    common::vmsync(&[
        "import",
        "--connect",
        "qemu:///system",
        dir.to_str().unwrap(),
        &net,
        &pool,
    ])
    .expect(0);
    for file in [
        "vmsync.toml",
        &format!("networks/{net}.xml"),
        &format!("pools/{pool}.xml"),
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        env.repo.write(file, &text);
    }
    env.repo.commit("import");

    let first = env.run(&["--once"]).expect(0);
    first
        .stdout_has(&format!("network {net}: redefine in place"))
        .stdout_lacks("pending restart")
        .stdout_lacks(&format!("pool {pool}: redefine"));
    assert!(
        virsh_system_ok(&["net-dumpxml", &net, "--inactive"]).contains("<vmsync:commit>"),
        "the network carries vmsync's tag"
    );
    assert_eq!(virsh_system_ok(&["net-uuid", &net]), net_uuid);
    assert_eq!(virsh_system_ok(&["pool-uuid", &pool]), pool_uuid);

    env.run(&["--once"])
        .expect(0)
        .stdout_has("nothing to do")
        .stdout_lacks("pending restart");
    let status = env.status();
    for (kind, name) in [("networks", &net), ("pools", &pool)] {
        let entry = status[kind]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{kind} {name} in {status}"));
        assert_eq!(entry["pending_restart"], false, "{kind} {name}: {entry}");
        assert_eq!(entry["active"], true, "{kind} {name}: {entry}");
    }
}
