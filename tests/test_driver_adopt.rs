//! Tier 2: `vmsync import` and `adopt = true` against libvirt's in-process
//! `test:///default` driver (no daemon), with real git repositories and `qemu-img`.
//! The real-libvirtd side (UEFI + TPM, lifecycle events) is in tests/real_libvirt_adopt.rs.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Env, Manifest, Vm, bios_xml, listing, sha256_file, vmsync};

use vmsync::agent::sync::{self, SyncError};
use vmsync::desired::domain_xml;
use vmsync::host::hypervisor::{Hypervisor, Libvirt};
use vmsync::onboard::{definition, import};
use vmsync::record;

const TAG_ONLY: &str = "adopt (tag only: the definition is the commit's)";

/// A 64M qcow2 image at `path`.
fn image(path: &Path) {
    common::output_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg("64M"),
    );
}

#[test]
fn import_writes_a_valid_repo_and_adopting_it_only_adds_the_tag() {
    let env = Env::new();
    let settings = env.settings();
    let hv = Libvirt::connect(common::TEST_URI).unwrap();
    let (web, outside) = ("t2a-web", "t2a-outside");
    // Defined by hand: one guest with its image under the disk root, autostarted and
    // running; one whose image is outside every disk root.
    image(&env.disk(web));
    hv.define(&bios_xml(web, "kvm", &env.disk(web), 128))
        .unwrap();
    hv.set_autostart(web, true).unwrap();
    hv.start(web).unwrap();
    hv.define(&bios_xml(
        outside,
        "kvm",
        Path::new("/srv/elsewhere/t2a.qcow2"),
        128,
    ))
    .unwrap();
    let before = hv.xml(web, true).unwrap();
    let outside_before = hv.xml(outside, true).unwrap();
    let disk_before = sha256_file(&env.disk(web));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("repo");
    let done = import::import(&settings, &out, &[web.into(), outside.into()], false).unwrap();
    assert_eq!(done.entries, [web]);
    assert_eq!(done.commented.len(), 1, "{done:?}");
    assert_eq!(done.commented[0].0, outside);
    assert!(
        done.commented[0].1[0].contains("outside the disk roots"),
        "{done:?}"
    );

    // Nothing on the host changed.
    assert_eq!(hv.xml(web, true).unwrap(), before);
    assert_eq!(hv.xml(outside, true).unwrap(), outside_before);
    assert_eq!(sha256_file(&env.disk(web)), disk_before);

    // The repository: libvirt's definition, the host's autostart flag, adopt, the disk
    // as qemu-img reports it; the refused vm commented out with why; a README.
    let xml = std::fs::read_to_string(out.join(format!("vms/{web}.xml"))).unwrap();
    assert_eq!(xml, definition::clean(&before).unwrap());
    assert_eq!(
        domain_xml::summarize(&xml).unwrap().uuid,
        Some(listing(&hv, web).unwrap().uuid)
    );
    let manifest = std::fs::read_to_string(out.join("vmsync.toml")).unwrap();
    for line in [
        format!("name = \"{web}\""),
        "autostart = true".into(),
        "adopt = true".into(),
        format!("path = \"{}\"", env.disk(web).display()),
        "size = \"64M\"".into(),
        "format = \"qcow2\"".into(),
        format!("# name = \"{outside}\""),
    ] {
        assert!(manifest.contains(&line), "{line} in:\n{manifest}");
    }
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        readme.contains("Review before the first commit"),
        "{readme}"
    );
    assert!(readme.contains(outside), "{readme}");
    let valid = sync::validate_dir(&settings, &out).unwrap();
    assert_eq!(valid.vms.len(), 1);
    assert!(valid.vms[0].adopt);

    // A second import into the same directory is refused.
    let err = import::import(&settings, &out, &[], false).unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("is not empty"), "{err}");

    // Committed as written: plan and sync only add the tag (no redefine, no diff).
    common::copy_tree(&out, env.repo.path());
    let commit = env.repo.commit("import");
    let plan = sync::plan_only(&settings).unwrap();
    let vm = &plan.vms[0];
    assert_eq!(
        vm.actions.iter().map(|a| a.describe()).collect::<Vec<_>>(),
        [TAG_ONLY]
    );
    assert_eq!(vm.diff, None);
    assert_eq!(hv.xml(web, true).unwrap(), before, "plan changes nothing");

    let mut record = record::Record::default();
    let first = common::sync_head(&settings, &mut record, &hv).unwrap();
    assert_eq!(common::done(&first, web), [TAG_ONLY]);
    assert!(!first.outcome.vms[0].pending_restart, "tagged live too");
    let after = hv.xml(web, true).unwrap();
    let tag = domain_xml::read_tag(&after).expect("tagged");
    assert_eq!(tag.commit, commit);
    assert_eq!(
        definition::clean(&after).unwrap(),
        before,
        "only the tag was added"
    );
    let live = hv.xml(web, false).unwrap();
    assert_eq!(domain_xml::read_tag(&live), Some(tag));
    let l = listing(&hv, web).unwrap();
    assert!(l.active && l.autostart);

    // Adopted: the next sync is a no-op with `adopt = true` still there.
    let second = common::sync_head(&settings, &mut record, &hv).unwrap();
    assert_eq!(second.outcome.changes(), 0, "{:?}", second.outcome);
    assert!(second.plan.is_noop());
    assert_eq!(hv.xml(web, true).unwrap(), after);
    assert_eq!(hv.xml(outside, true).unwrap(), outside_before);
}

#[test]
fn adopt_redefines_a_changed_definition_in_place_and_refuses_another_uuid() {
    let env = Env::new();
    let settings = env.settings();
    let hv = Libvirt::connect(common::TEST_URI).unwrap();
    let (changed, other, left) = ("t2a-changed", "t2a-other-uuid", "t2a-left");
    for name in [changed, other, left] {
        hv.define(&bios_xml(name, "kvm", &env.disk(name), 128))
            .unwrap();
    }
    let uuid = listing(&hv, changed).unwrap().uuid;
    let other_before = hv.xml(other, true).unwrap();
    let left_before = hv.xml(left, true).unwrap();

    let stranger = "0f7e1b9c-4a44-4a8e-9b0e-2b1f4a3c5d6e";
    let manifest = Manifest::new()
        .vm(Vm::new(changed).key("adopt = true").xml(&bios_xml(
            changed,
            "kvm",
            &env.disk(changed),
            256,
        )))
        .vm(Vm::new(other).key("adopt = true").xml(
            &bios_xml(other, "kvm", &env.disk(other), 128)
                .replace("</name>", &format!("</name>\n  <uuid>{stranger}</uuid>")),
        ))
        // Without adopt: an untagged domain stays untouchable.
        .vm(Vm::new(left).xml(&bios_xml(left, "kvm", &env.disk(left), 256)));
    env.commit(&manifest, "adopt two, claim one");

    // plan: the adoption with its diff; the errors named.
    let plan = sync::plan_only(&settings).unwrap();
    let diff = plan.vms[0].diff.as_deref().expect("a diff");
    assert!(
        diff.contains("-  <memory unit='KiB'>131072</memory>")
            && diff.contains("+  <memory unit='KiB'>262144</memory>"),
        "{diff}"
    );
    let text = vmsync::reconcile::render::render(&plan);
    assert!(
        text.contains(&format!("{changed}: adopt (redefine in place)")),
        "{text}"
    );
    let json = serde_json::to_value(plan.to_json()).unwrap();
    assert_eq!(json["vms"][0]["actions"][0]["kind"], "adopt");

    let mut record = record::Record::default();
    let err = common::sync_head(&settings, &mut record, &hv).unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::ActionsFailed {
                failed: 2,
                total: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.exit_code(), 1);
    // Redefined in place: same UUID, the commit's memory, tagged.
    let xml = hv.xml(changed, true).unwrap();
    assert!(xml.contains("262144"), "{xml}");
    assert_eq!(listing(&hv, changed).unwrap().uuid, uuid);
    assert!(domain_xml::read_tag(&xml).is_some());
    assert!(record.vms[changed].ok);
    // Another UUID: not adopted, untouched, the reason in the record.
    let why = record.vms[other].last_error.clone().unwrap();
    assert!(
        why.contains(&format!(
            "but the commit's xml says {stranger}; not adopted"
        )),
        "{why}"
    );
    assert_eq!(hv.xml(other, true).unwrap(), other_before);
    // Without adopt: untouched.
    let why = record.vms[left].last_error.clone().unwrap();
    assert!(
        why.contains("not defined by vmsync") && why.contains("set adopt = true"),
        "{why}"
    );
    assert_eq!(hv.xml(left, true).unwrap(), left_before);

    // The adopted one is managed from now on: nothing to do for it on the next sync.
    let err = common::sync_head(&settings, &mut record, &hv).unwrap_err();
    assert!(err.to_string().contains("2 of 3 vms failed"), "{err}");
    assert_eq!(hv.xml(changed, true).unwrap(), xml, "no-op once adopted");
    assert!(record.vms[changed].ok);
}

#[test]
fn the_import_command_refuses_a_non_empty_dir_and_its_output_validates() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("repo");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine\n").unwrap();
    let out_arg = out.display().to_string();
    let import = |extra: &[&str]| {
        let mut args = vec!["--connect", common::TEST_URI, "import"];
        args.extend_from_slice(extra);
        vmsync(&args)
    };

    import(&[&out_arg])
        .expect(2)
        .stderr_has("is not empty; refusing to write into it");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    import(&[&out_arg, "no-such-domain", "--force"])
        .expect(2)
        .stderr_has("no domain, network or pool named 'no-such-domain'");

    // The test driver's own domain `test`, network `default` and pool `default-pool`,
    // with --force next to the operator's file: the domain's disk `/guest/diskimage1`
    // and the pool's directory `/default-pool` are outside the disk roots, so their
    // entries are written commented out, with the reason, and the repository validates.
    import(&[&out_arg, "--force"])
        .expect(0)
        .stdout_has(&format!(
            "imported 1 definition(s) into {out_arg}: network default"
        ))
        .stdout_has("test: written commented out: vms/test.xml:")
        .stdout_has("host path '/guest/diskimage1' is outside the disk roots")
        .stdout_has("pool default-pool: written commented out: pools/default-pool.xml:")
        .stdout_has("nothing on the host was changed");
    let manifest = std::fs::read_to_string(out.join("vmsync.toml")).unwrap();
    assert!(
        manifest.contains("#   vms/test.xml:") && manifest.contains("\n# name = \"test\"\n"),
        "{manifest}"
    );
    assert!(
        manifest.contains("[[network]]\nname = \"default\"\n")
            && manifest.contains("\n# name = \"default-pool\"\n"),
        "{manifest}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine\n"
    );
    assert!(out.join("vms/test.xml").is_file() && out.join("README.md").is_file());
    vmsync(&["validate", &out_arg])
        .expect(0)
        .stdout_has("valid (0 vm(s)")
        .stdout_has("1 network(s), 0 pool(s)");
}

#[test]
fn import_writes_networks_and_pools_that_validate_and_adopting_them_converges() {
    use vmsync::desired::resource_xml::ResourceKind;
    use vmsync::host::hypervisor::ResOp;
    let env = Env::new();
    let settings = env.settings();
    let hv = Libvirt::connect(common::TEST_URI).unwrap();
    let (net, pool) = ("t2a-net", "t2a-pool");
    hv.define_resource(
        ResourceKind::Network,
        &format!("<network><name>{net}</name><bridge name='t2abr0'/></network>"),
    )
    .unwrap();
    hv.resource_op(ResourceKind::Network, net, ResOp::Autostart(true))
        .unwrap();
    let pool_dir = env.images.join(pool);
    hv.define_resource(
        ResourceKind::Pool,
        &format!(
            "<pool type='dir'><name>{pool}</name><target><path>{}</path></target></pool>",
            pool_dir.display()
        ),
    )
    .unwrap();
    let net_before = hv.resource_xml(ResourceKind::Network, net, true).unwrap();
    let pool_before = hv.resource_xml(ResourceKind::Pool, pool, true).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("repo");
    let done = import::import(&settings, &out, &[net.into(), pool.into()], false).unwrap();
    assert_eq!(
        done.entries,
        [format!("network {net}"), format!("pool {pool}")]
    );
    assert!(done.commented.is_empty(), "{done:?}");
    assert_eq!(
        hv.resource_xml(ResourceKind::Network, net, true).unwrap(),
        net_before
    );
    assert_eq!(
        hv.resource_xml(ResourceKind::Pool, pool, true).unwrap(),
        pool_before
    );
    assert_eq!(
        std::fs::read_to_string(out.join(format!("networks/{net}.xml"))).unwrap(),
        definition::clean(&net_before).unwrap()
    );
    let pool_file = std::fs::read_to_string(out.join(format!("pools/{pool}.xml"))).unwrap();
    assert_eq!(pool_file, definition::clean_pool(&pool_before).unwrap());
    let manifest = std::fs::read_to_string(out.join("vmsync.toml")).unwrap();
    for text in [
        format!(
            "[[network]]\nname = \"{net}\"\nxml = \"networks/{net}.xml\"\nautostart = true\nadopt = true"
        ),
        format!(
            "[[pool]]\nname = \"{pool}\"\nxml = \"pools/{pool}.xml\"\nautostart = false\nadopt = true"
        ),
    ] {
        assert!(manifest.contains(&text), "{text} in:\n{manifest}");
    }
    let valid = sync::validate_dir(&settings, &out).unwrap();
    assert_eq!(
        (valid.resources.networks.len(), valid.resources.pools.len()),
        (1, 1)
    );

    // Committed as written: adopted, then nothing to do.
    common::copy_tree(&out, env.repo.path());
    env.repo.commit("import");
    let mut record = record::Record::default();
    let first = common::sync_head(&settings, &mut record, &hv).unwrap();
    assert!(first.outcome.all_ok(), "{:?}", first.outcome);
    assert!(record.networks.contains_key(net) && record.pools.contains_key(pool));
    let second = common::sync_head(&settings, &mut record, &hv).unwrap();
    assert!(second.plan.is_noop(), "{:?}", second.plan.resources);
}

#[test]
fn import_force_never_writes_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let out = dir.path().join("repo");
    std::fs::create_dir(&out).unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let missing = outside.path().join("made-through-a-link");
    let out_arg = out.display().to_string();
    let import = || vmsync(&["--connect", common::TEST_URI, "import", &out_arg, "--force"]);

    // A link to a file outside, and one to a path that does not exist, at names import
    // writes: refused, nothing written, both links still point where they did.
    std::os::unix::fs::symlink(&victim, out.join("vmsync.toml")).unwrap();
    std::os::unix::fs::symlink(&missing, out.join("README.md")).unwrap();
    import()
        .expect(2)
        .stderr_has("vmsync.toml' is a symbolic link; vmsync import never writes through a link");
    assert_eq!(std::fs::read_link(out.join("vmsync.toml")).unwrap(), victim);
    assert_eq!(std::fs::read_link(out.join("README.md")).unwrap(), missing);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(!missing.exists());
    assert!(!out.join("vms").exists() && !out.join("networks").exists());

    // A folder import writes into (vms/) that links outside: refused the same way.
    std::fs::remove_file(out.join("vmsync.toml")).unwrap();
    std::fs::remove_file(out.join("README.md")).unwrap();
    std::os::unix::fs::symlink(outside.path(), out.join("vms")).unwrap();
    import().expect(2).stderr_has("vms' is a symbolic link");
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        1,
        "only the victim is outside"
    );
    assert!(!out.join("vmsync.toml").exists());

    // Without links, --force writes over plain files.
    std::fs::remove_file(out.join("vms")).unwrap();
    std::fs::write(out.join("vmsync.toml"), "old\n").unwrap();
    import().expect(0);
    assert!(
        std::fs::read_to_string(out.join("vmsync.toml"))
            .unwrap()
            .contains("version = 1")
    );
}
