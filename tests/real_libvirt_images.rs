//! Tier 3 for base images (`[[image]]`, `[[vm.disk]] image`): a real libvirtd and real
//! `qemu-img`, images served from a local HTTP server (a thread in this test) and
//! allowed by `[policy] image_urls`:
//!
//! - a qcow2 image: a running VM's disk is a qcow2 overlay on it (`qemu-img info` shows
//!   the image in the image directory as its backing file), grown to `size`;
//! - the same image as `.gz`: `copy = true` gives a full copy with no backing file;
//! - a raw image as `.xz`: a qcow2 overlay with a raw backing file;
//! - a second sync downloads nothing and changes nothing; a later change of the image
//!   entry (another image, another sha256) neither rebases nor recreates the disk, nor
//!   downloads the new image: `plan` says so.
//!
//! Without a reachable `qemu:///system` these tests skip, unless
//! `VMSYNC_REQUIRE_LIBVIRTD` is set: then they fail. Everything carries the test's
//! unique prefix and is removed afterwards.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{Env, Manifest};
use vmsync::testing::{Reply, http_server};

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// `qemu-img ARGS`, which must succeed.
fn qemu_img(args: &[&str]) {
    let ok = Command::new("qemu-img")
        .args(args)
        .status()
        .unwrap()
        .success();
    assert!(ok, "qemu-img {args:?}");
}

/// `qemu-img info` of a disk in use.
fn info(path: &Path) -> serde_json::Value {
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

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn xz(bytes: &[u8]) -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// An `[[image]]` table.
fn image(name: &str, url: &str, bytes: &[u8]) -> String {
    format!(
        "\n[[image]]\nname = \"{name}\"\nurl = \"{url}\"\nsha256 = \"{}\"\n",
        sha256_hex(bytes)
    )
}

#[test]
fn disks_are_made_once_from_served_images_and_never_rebased() {
    let Some(mut env) = Env::system("images") else {
        return;
    };
    // The images: a 32 MiB qcow2 with some data, the same gzipped, a raw one xz'd.
    let work = env.images.join("src");
    std::fs::create_dir(&work).unwrap();
    let (qcow, raw) = (work.join("base.qcow2"), work.join("base.raw"));
    std::fs::write(&raw, vec![0x5au8; 3 << 20]).unwrap();
    qemu_img(
        &["convert", "-q", "-f", "raw", "-O", "qcow2"]
            .into_iter()
            .chain([raw.to_str().unwrap(), qcow.to_str().unwrap()])
            .collect::<Vec<_>>(),
    );
    qemu_img(&["resize", "-q", "-f", "qcow2", qcow.to_str().unwrap(), "32M"]);
    let (qcow, raw) = (std::fs::read(&qcow).unwrap(), std::fs::read(&raw).unwrap());
    let other = gz(b"another image: never downloaded");
    let server = http_server(vec![
        ("/base.qcow2", Reply::Body(qcow.clone())),
        ("/base.qcow2.gz", Reply::Body(gz(&qcow))),
        ("/base.raw.xz", Reply::Body(xz(&raw))),
        ("/other.qcow2.gz", Reply::Body(other.clone())),
    ]);
    let image_dir = env.images.join("base-images");
    let config = env.state.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[policy]\nimage_urls = [\"{}\"]\nimage_dir = \"{}\"\n",
            server.base,
            image_dir.display()
        ),
    )
    .unwrap();
    env.config_file = Some(config);

    let url = |p: &str| format!("{}{p}", server.base);
    let images = image("base", &url("/base.qcow2"), &qcow)
        + &image("base-gz", &url("/base.qcow2.gz"), &gz(&qcow))
        + &image("raw", &url("/base.raw.xz"), &xz(&raw));
    let (ov, cp, rw) = (env.name("ov"), env.name("cp"), env.name("rw"));
    let manifest = |images: &str, base: &str| {
        let m = Manifest::new()
            .vm(env
                .vm("ov")
                .key("autostart = true")
                .disk_key(&format!("image = \"{base}\"")))
            .vm(env
                .vm("cp")
                .disk_key("image = \"base-gz\"")
                .disk_key("copy = true"))
            .vm(env.vm("rw").disk_key("image = \"raw\""));
        m.write(&env.repo);
        let text = std::fs::read_to_string(env.repo.path().join("vmsync.toml")).unwrap();
        env.repo.write("vmsync.toml", &(text + images));
        env.repo.commit("images")
    };
    manifest(&images, "base");

    // plan shows the downloads and each disk's base; nothing happens yet.
    let plan = env.run(&["plan"]).expect(0);
    plan.stdout_has(&format!(
        "download image 'base' from {}",
        url("/base.qcow2")
    ));
    plan.stdout_has(&format!(
        "download image 'raw' from {}",
        url("/base.raw.xz")
    ));
    plan.stdout_has("(64 MiB, an overlay on image 'base')");
    plan.stdout_has("(64 MiB, a copy of image 'base-gz')");
    assert!(!image_dir.exists(), "plan downloads nothing");
    assert!(server.hits.lock().unwrap().is_empty());

    env.run(&["--once"]).expect(0);
    let file = |bytes: &[u8], ext: &str| image_dir.join(format!("{}.{ext}", sha256_hex(bytes)));
    let (base_file, gz_file) = (file(&qcow, "qcow2"), file(&gz(&qcow), "qcow2"));
    let raw_file = file(&xz(&raw), "raw");
    assert_eq!(std::fs::read(&base_file).unwrap(), qcow);
    assert_eq!(std::fs::read(&gz_file).unwrap(), qcow, "decompressed");
    assert_eq!(std::fs::read(&raw_file).unwrap(), raw, "decompressed");
    let disk = |short: &str| info(&env.disk(short));
    let ov_info = disk("ov");
    assert_eq!(ov_info["backing-filename"], base_file.display().to_string());
    assert_eq!(ov_info["backing-filename-format"], "qcow2");
    assert_eq!(ov_info["virtual-size"], 64 << 20);
    let cp_info = disk("cp");
    assert!(cp_info.get("backing-filename").is_none(), "{cp_info}");
    assert_eq!(cp_info["format"], "qcow2");
    assert_eq!(cp_info["virtual-size"], 64 << 20);
    let rw_info = disk("rw");
    assert_eq!(rw_info["backing-filename"], raw_file.display().to_string());
    assert_eq!(rw_info["backing-filename-format"], "raw");
    assert_eq!(common::virsh_system_ok(&["domstate", &ov]), "running");
    for name in [&cp, &rw] {
        assert_eq!(common::virsh_system_ok(&["domstate", name]), "shut off");
    }
    let hits = server.hits.lock().unwrap().len();
    assert_eq!(hits, 3, "each image downloaded once");

    // A second sync: nothing to download, nothing to do.
    let run = env.run(&["--once"]).expect(0);
    run.stdout_lacks("download image");
    assert_eq!(server.hits.lock().unwrap().len(), hits);

    // The image entry changes: the disk made from the old one stays as it is.
    let changed = images.clone() + &image("other", &url("/other.qcow2.gz"), &other);
    manifest(&changed, "other");
    let plan = env.run(&["plan"]).expect(0);
    plan.stdout_has("a disk made from an image is never rebased or recreated");
    plan.stdout_lacks("download image");
    env.run(&["--once"]).expect(0);
    assert_eq!(
        disk("ov")["backing-filename"],
        base_file.display().to_string()
    );
    assert_eq!(
        server.hits.lock().unwrap().len(),
        hits,
        "the new image is not fetched"
    );
    assert_eq!(common::virsh_system_ok(&["domstate", &ov]), "running");
}
