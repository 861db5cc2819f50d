//! Tier 3, cloud-init seeds on a real libvirtd: the seed is attached as a read-only
//! SATA CD-ROM the committed XML does not mention, the guest starts with it, an unchanged
//! seed is not written again (same inode and mtime), and a changed seed is rebuilt in
//! place: with `on_change = "next-boot"` the running guest is left alone (pending
//! restart), with `"restart"` it is restarted, with `"never"` the first seed is kept. The
//! domain is never recreated: its UUID stays.
//!
//! The guest boots no OS (the real guest is tests/real_guest*), so a graceful shutdown
//! times out and the domain is destroyed after `shutdown_timeout` (3 s here).
//!
//! Without a reachable `qemu:///system` these tests skip with a message, unless
//! `VMSYNC_REQUIRE_LIBVIRTD` is set: then they fail.

mod common;

use common::seeds::{self, HostKey};
use common::{Env, Manifest, virsh_system_ok as virsh_ok};

/// Commits VM `web` (autostart) whose user-data is `user_data`, with `on_change`.
fn commit(env: &Env, user_data: &str, on_change: &str) {
    env.repo.write("cloud-init/web.yaml", user_data);
    let vm = env
        .vm("web")
        .key("autostart = true\nshutdown_timeout = \"3s\"")
        .key(&seeds::cloud_init(
            "cloud-init/web.yaml",
            &format!("  on_change = \"{on_change}\"\n"),
        ));
    env.commit(&Manifest::new().vm(vm), "web");
}

#[test]
fn real_seed_is_attached_read_only_and_follows_on_change() {
    let Some(mut env) = Env::system("seeds") else {
        return;
    };
    let key = HostKey::ssh(env.state.path());
    let seed_dir = env.images.join("seeds");
    seeds::configure(&mut env, &seed_dir, &key.path, "");
    let image = seed_dir.join(format!("{}-cidata.iso", env.name("web")));

    commit(&env, "#cloud-config\nhostname: one\n", "next-boot");
    env.run(&["--once"]).expect(0);
    let xml = env.inactive("web");
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let cdrom = doc
        .descendants()
        .find(|n| n.has_tag_name("disk") && n.attribute("device") == Some("cdrom"))
        .unwrap_or_else(|| panic!("no cdrom in\n{xml}"));
    let child = |name: &str| cdrom.children().find(|c| c.has_tag_name(name));
    assert!(child("readonly").is_some(), "{xml}");
    assert_eq!(
        child("source").and_then(|s| s.attribute("file")),
        Some(image.to_str().unwrap())
    );
    assert_eq!(
        child("target").and_then(|t| t.attribute("bus")),
        Some("scsi")
    );
    // On a virtio-scsi controller (the domain has no SCSI controller of its own).
    assert!(
        doc.descendants().any(|n| n.has_tag_name("controller")
            && n.attribute("type") == Some("scsi")
            && n.attribute("model") == Some("virtio-scsi")),
        "{xml}"
    );
    assert_eq!(env.domstate("web"), "running");
    let uuid = virsh_ok(&["domuuid", &env.name("web")]);
    let first = seeds::identity_of(&image);

    // Nothing changed: the seed is not written again, the guest keeps running.
    let id = env.domid("web");
    let run = env.run(&["--once"]).expect(0);
    assert_eq!(seeds::identity_of(&image), first, "{}", run.stderr);
    assert_eq!(env.domid("web"), id);
    assert_eq!(env.vm_status("web")["drift"], serde_json::json!([]));

    // next-boot: rebuilt in place, the running guest left alone and pending restart.
    commit(&env, "#cloud-config\nhostname: two\n", "next-boot");
    env.run(&["--once"]).expect(0);
    assert_ne!(seeds::identity_of(&image), first);
    assert!(seeds::seed_file(&image, "user-data").contains("hostname: two"));
    assert_eq!(env.domid("web"), id, "next-boot restarted the guest");
    assert_eq!(env.vm_status("web")["pending_restart"], true);
    // Still pending on the next sync, and the seed still not written again.
    let second = seeds::identity_of(&image);
    env.run(&["--once"]).expect(0);
    assert_eq!(env.vm_status("web")["pending_restart"], true);
    assert_eq!(seeds::identity_of(&image), second);

    // restart: rebuilt, and the guest restarted (a new QEMU process reads it).
    commit(&env, "#cloud-config\nhostname: three\n", "restart");
    env.run(&["--once"]).expect(0);
    assert!(seeds::seed_file(&image, "user-data").contains("hostname: three"));
    assert_ne!(env.domid("web"), id, "restart did not restart the guest");
    assert_eq!(env.domstate("web"), "running");
    assert_eq!(env.vm_status("web")["pending_restart"], false);

    // never: the first seed written stays.
    let kept = seeds::identity_of(&image);
    let id = env.domid("web");
    commit(&env, "#cloud-config\nhostname: four\n", "never");
    env.run(&["--once"]).expect(0);
    commit(&env, "#cloud-config\nhostname: five\n", "never");
    env.run(&["--once"]).expect(0);
    assert_eq!(seeds::identity_of(&image), kept);
    assert!(seeds::seed_file(&image, "user-data").contains("hostname: three"));
    assert_eq!(env.domid("web"), id);

    // Never recreated.
    assert_eq!(virsh_ok(&["domuuid", &env.name("web")]), uuid);
}
