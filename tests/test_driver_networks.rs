//! Tier 2 for networks, storage pools and volumes, on libvirt's in-process
//! `test:///default` driver: the whole pipeline in process (validate, observe, plan,
//! apply, record) with real libvirt network and storage code, and the real binary for
//! `plan --json` and an unknown network. The test driver's own `default` network and
//! `default-pool` stand for what an operator made by hand.

mod common;

use common::{Env, TEST_URI, sync_head};

use vmsync::agent::sync::SyncError;
use vmsync::desired::resource_xml::ResourceKind;
use vmsync::host::hypervisor::{Hypervisor, Libvirt, Listing, ResOp};
use vmsync::reconcile::outcome::VolumeDone;
use vmsync::record::Record;

fn resource(hv: &dyn Hypervisor, kind: ResourceKind, name: &str) -> Option<Listing> {
    hv.list_resources(kind)
        .unwrap()
        .into_iter()
        .find(|l| l.name == name)
}

/// A manifest with the pool `{p}-pool`, the network `{p}-net` and the VM `{p}-vm` on
/// them (one qcow2 volume); `net_keys` go into the network's entry.
fn commit(env: &Env, p: &str, net_keys: &str, net_extra: &str) -> String {
    let pool_dir = env.images.join(format!("{p}-pool"));
    env.repo.write(
        "vmsync.toml",
        &format!(
            r#"version = 1
[[pool]]
name = "{p}-pool"
xml = "pool.xml"
autostart = true
[[network]]
name = "{p}-net"
xml = "net.xml"
autostart = true
{net_keys}
[[vm]]
name = "{p}-vm"
xml = "vm.xml"
autostart = true
  [[vm.disk]]
  pool = "{p}-pool"
  volume = "{p}-vm.qcow2"
  size = "64M"
"#
        ),
    );
    env.repo.write(
        "pool.xml",
        &format!(
            "<pool type='dir'><name>{p}-pool</name><target><path>{}</path></target></pool>",
            pool_dir.display()
        ),
    );
    env.repo.write(
        "net.xml",
        &format!("<network><name>{p}-net</name><bridge name='{p}br'/>{net_extra}</network>"),
    );
    env.repo.write(
        "vm.xml",
        &format!(
            "<domain type='test'><name>{p}-vm</name><memory unit='MiB'>128</memory><os><type>hvm</type></os><devices><disk type='volume' device='disk'><source pool='{p}-pool' volume='{p}-vm.qcow2'/><target dev='vda'/></disk><interface type='network'><source network='{p}-net'/></interface></devices></domain>"
        ),
    );
    env.repo.commit("pool, network, vm")
}

#[test]
fn pools_volumes_networks_converge_before_the_domains_and_stay_converged() {
    let env = Env::new();
    let hv = Libvirt::connect(TEST_URI).unwrap();
    let settings = env.settings();
    let mut record = Record::default();
    commit(&env, "t2n1", "", "");
    let report = sync_head(&settings, &mut record, &hv).unwrap();
    let res = &report.outcome.resources;
    assert_eq!(
        res.pools[0].done,
        [
            "define",
            "build (never overwriting)",
            "set autostart",
            "start"
        ]
    );
    assert_eq!(res.networks[0].done, ["define", "set autostart", "start"]);
    assert!(matches!(
        &res.volumes[0].result,
        Ok(VolumeDone::Created(what)) if what.starts_with("create qcow2 volume")
    ));
    let pool = resource(&hv, ResourceKind::Pool, "t2n1-pool").unwrap();
    assert!(pool.active && pool.autostart);
    assert_eq!(
        record.pools["t2n1-pool"].uuid.as_deref(),
        Some(pool.uuid.as_str())
    );
    assert!(
        hv.pool_volumes("t2n1-pool")
            .unwrap()
            .contains(&"t2n1-vm.qcow2".to_string())
    );
    let net = resource(&hv, ResourceKind::Network, "t2n1-net").unwrap();
    assert!(net.active && net.autostart);
    assert!(common::listing(&hv, "t2n1-vm").unwrap().active);

    // Nothing to do the second time, and the volume is not made again.
    let report = sync_head(&settings, &mut record, &hv).unwrap();
    assert!(report.plan.is_noop(), "{:?}", report.plan.resources);

    // Drift: stopped and autostart cleared by hand; healed, and reported.
    hv.resource_op(ResourceKind::Network, "t2n1-net", ResOp::Stop)
        .unwrap();
    hv.resource_op(ResourceKind::Pool, "t2n1-pool", ResOp::Autostart(false))
        .unwrap();
    let report = sync_head(&settings, &mut record, &hv).unwrap();
    let res = &report.outcome.resources;
    assert_eq!(res.networks[0].done, ["start"]);
    assert_eq!(res.networks[0].drift, ["stopped outside vmsync"]);
    assert_eq!(res.pools[0].done, ["set autostart"]);
    assert!(
        resource(&hv, ResourceKind::Network, "t2n1-net")
            .unwrap()
            .active
    );

    // With self-heal off, drift is reported only.
    hv.resource_op(ResourceKind::Network, "t2n1-net", ResOp::Stop)
        .unwrap();
    let mut off = settings.clone();
    off.changes.self_heal = false;
    let report = sync_head(&off, &mut record, &hv).unwrap();
    assert!(report.outcome.resources.networks[0].done.is_empty());
    assert_eq!(
        record.networks["t2n1-net"].drift,
        ["stopped outside vmsync"]
    );
    assert!(
        !resource(&hv, ResourceKind::Network, "t2n1-net")
            .unwrap()
            .active
    );
    sync_head(&settings, &mut record, &hv).unwrap();

    // A changed definition of the active network: redefined, pending restart.
    commit(&env, "t2n1", "", "<domain name='lab.example'/>");
    let report = sync_head(&settings, &mut record, &hv).unwrap();
    assert_eq!(
        report.outcome.resources.networks[0].done,
        ["redefine in place"]
    );
    assert!(record.networks["t2n1-net"].pending_restart);
    assert_eq!(
        resource(&hv, ResourceKind::Network, "t2n1-net")
            .unwrap()
            .uuid,
        net.uuid,
        "the same network, redefined in place"
    );
    // on_change = "restart": restarted, and the running vm on it is named.
    commit(
        &env,
        "t2n1",
        "on_change = \"restart\"",
        "<domain name='lab2.example'/>",
    );
    let report = sync_head(&settings, &mut record, &hv).unwrap();
    let plan = &report.plan.resources.networks[0];
    assert_eq!(plan.affected_vms, ["t2n1-vm"]);
    assert_eq!(
        report.outcome.resources.networks[0].done,
        ["redefine in place", "restart (stop, then start)"]
    );
    assert!(!record.networks["t2n1-net"].pending_restart);

    // Pruning: the whole manifest gone; the domain first, then network and pool; the
    // pool's storage stays. Refused as a mass prune without the override.
    env.repo.write("vmsync.toml", "version = 1\n");
    env.repo.commit("empty");
    let mut prune = settings.clone();
    prune.changes.prune = true;
    assert!(matches!(
        sync_head(&prune, &mut record, &hv),
        Err(SyncError::Refused { .. })
    ));
    prune.changes.allow_mass_prune = true;
    prune.changes.shutdown_timeout = std::time::Duration::from_secs(5);
    let report = sync_head(&prune, &mut record, &hv).unwrap();
    let pruned: Vec<_> = report
        .outcome
        .resources
        .pruned
        .iter()
        .map(|o| (o.name.as_str(), o.done.clone()))
        .collect();
    assert_eq!(
        pruned,
        [
            ("t2n1-net", vec!["stop".to_string(), "undefine".to_string()]),
            (
                "t2n1-pool",
                vec![
                    "stop".to_string(),
                    "undefine (keeping its storage and volumes)".to_string()
                ]
            ),
        ]
    );
    assert!(resource(&hv, ResourceKind::Network, "t2n1-net").is_none());
    assert!(resource(&hv, ResourceKind::Pool, "t2n1-pool").is_none());
    assert!(record.networks.is_empty() && record.pools.is_empty());
}

#[test]
fn hand_made_networks_and_pools_are_never_touched_unless_adopted() {
    let env = Env::new();
    let hv = Libvirt::connect(TEST_URI).unwrap();
    let settings = env.settings();
    let mut record = Record::default();
    let default = resource(&hv, ResourceKind::Network, "default").unwrap();
    // Shut off, so that the test driver (which keeps one definition) shows the
    // persistent one after the redefine.
    hv.resource_op(ResourceKind::Network, "default", ResOp::Stop)
        .unwrap();
    let default_xml = hv
        .resource_xml(ResourceKind::Network, "default", true)
        .unwrap();
    let manifest = |adopt: &str| {
        format!("version = 1\n[[network]]\nname = \"default\"\nxml = \"default.xml\"\n{adopt}\n")
    };
    env.repo.write("vmsync.toml", &manifest(""));
    env.repo.write(
        "default.xml",
        "<network><name>default</name><bridge name='virbr9'/></network>",
    );
    env.repo.commit("take default");
    let err = sync_head(&settings, &mut record, &hv).unwrap_err();
    assert!(matches!(err, SyncError::ActionsFailed { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("network 'default' failed at commit "),
        "the summary names the network, not '0 of 0 vms': {err}"
    );
    assert!(
        record
            .last_error
            .as_deref()
            .unwrap()
            .contains("network 'default': exists but was not defined by vmsync"),
        "{record:?}"
    );
    assert_eq!(
        hv.resource_xml(ResourceKind::Network, "default", true)
            .unwrap(),
        default_xml,
        "untouched"
    );
    assert!(!record.networks.contains_key("default"));

    env.repo.write("vmsync.toml", &manifest("adopt = true"));
    env.repo.commit("adopt default");
    sync_head(&settings, &mut record, &hv).unwrap();
    let after = resource(&hv, ResourceKind::Network, "default").unwrap();
    assert_eq!(after.uuid, default.uuid, "redefined in place with its uuid");
    let xml = hv
        .resource_xml(ResourceKind::Network, "default", true)
        .unwrap();
    assert!(
        xml.contains("virbr9") && xml.contains("vmsync/xmlns"),
        "{xml}"
    );
    assert_eq!(
        record.networks["default"].uuid.as_deref(),
        Some(default.uuid.as_str())
    );
    // Put the test driver's default back for the other tests of this process.
    hv.define_resource(ResourceKind::Network, &default_xml)
        .unwrap();
    hv.resource_op(ResourceKind::Network, "default", ResOp::Start)
        .unwrap();
}

#[test]
fn plan_json_and_an_unknown_network_from_the_binary() {
    let env = Env::new();
    commit(&env, "t2n3", "", "");
    let run = env.run(&["plan", "--json"]).expect(0);
    let plan: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let kinds = |part: &str| -> Vec<String> {
        plan["resources"][part][0]["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["kind"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        kinds("pools"),
        [
            "define_pool",
            "build_pool",
            "set_pool_autostart",
            "start_pool"
        ]
    );
    assert_eq!(
        kinds("networks"),
        ["define_network", "set_network_autostart", "start_network"]
    );
    assert_eq!(plan["resources"]["volumes"][0]["create"], true);
    let run = env.run(&["plan"]).expect(0);
    assert!(
        run.stdout.contains("network t2n3-net: define"),
        "{}",
        run.stdout
    );

    // A domain on a network neither the commit nor the host has: exit 3, named.
    env.repo.write(
        "vm.xml",
        &std::fs::read_to_string(env.repo.path().join("vm.xml"))
            .unwrap()
            .replace("network='t2n3-net'", "network='t2n3-nowhere'"),
    );
    let commit = env.repo.commit("unknown network");
    let run = env.run(&["--once"]).expect(3);
    run.stderr_has(&format!("commit {commit} is invalid; nothing was applied:"));
    run.stderr_has("vm.xml: vm 't2n3-vm': field 'devices/interface/source': network 't2n3-nowhere' is neither in the commit for this host nor on the host");
    // The test driver's own `default` network is one the host has.
    env.repo.write(
        "vm.xml",
        &std::fs::read_to_string(env.repo.path().join("vm.xml"))
            .unwrap()
            .replace("network='t2n3-nowhere'", "network='default'"),
    );
    env.repo.commit("default network");
    env.run(&["--once"]).expect(0);
}
