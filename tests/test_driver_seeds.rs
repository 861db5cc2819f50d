//! Cloud-init seeds and secrets through the real binary on libvirt's test driver: the
//! seed is a NoCloud ISO (label `cidata`, Joliet names) that `isoinfo` and `blkid` read,
//! its user-data holds a secret decrypted with the host's SSH key, the plaintext is in no
//! output, state file or plan, an unchanged seed is not written again, a changed one is,
//! and `vmsync validate DIR` checks a secret's format without the key.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::seeds::{self, HostKey};
use common::{Env, Manifest, vmsync};

const SECRET: &str = "hunter2-b6f1c0";

const USER_DATA: &str = "#cloud-config\nhostname: {{ vm.name }}\nchpasswd:\n  list: |\n    root:{{ secret(\"secrets/root.age\") }}\n";

/// An env whose VM `web` has a seed with a secret; the seed directory.
fn seeded_env() -> (Env, std::path::PathBuf, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let key = HostKey::ssh(keys.path());
    let mut env = Env::new();
    let seed_dir = env.images.join("seeds");
    seeds::configure(&mut env, &seed_dir, &key.path, "");
    env.repo.write("cloud-init/web.yaml.j2", USER_DATA);
    std::fs::create_dir_all(env.repo.path().join("secrets")).unwrap();
    std::fs::write(
        env.repo.path().join("secrets/root.age"),
        key.encrypt(SECRET.as_bytes()),
    )
    .unwrap();
    let vm = env
        .vm("web")
        .key("autostart = true")
        .key(&seeds::cloud_init("cloud-init/web.yaml.j2", ""));
    env.commit(&Manifest::new().vm(vm), "web with a seed");
    (env, seed_dir, keys)
}

#[test]
fn the_seed_is_a_nocloud_iso_with_the_secret_and_nothing_else_shows_it() {
    let (env, seed_dir, _keys) = seeded_env();
    let once = env.run(&["--once"]).expect(0);
    let image = seed_dir.join("web-cidata.iso");
    assert_eq!(
        std::fs::metadata(&image).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&seed_dir).unwrap().permissions().mode() & 0o777,
        0o711
    );
    let descriptor = seeds::seed_descriptor(&image);
    assert!(descriptor.contains("Volume id: cidata"), "{descriptor}");
    assert!(descriptor.contains("Joliet"), "{descriptor}");
    let listing = seeds::seed_listing(&image);
    assert!(
        listing.contains("user-data") && listing.contains("meta-data"),
        "{listing}"
    );
    assert_eq!(seeds::blkid_label(&image), "cidata");
    let user_data = seeds::seed_file(&image, "user-data");
    assert!(user_data.contains(&format!("root:{SECRET}")), "{user_data}");
    assert!(user_data.contains("hostname: web"), "{user_data}");
    let meta = seeds::seed_file(&image, "meta-data");
    assert!(meta.starts_with("instance-id: iid-"), "{meta}");
    assert!(meta.contains("local-hostname: web"), "{meta}");

    // The plaintext is in no output, plan, state file or file of the state directory.
    let plan = env.run(&["plan"]).expect(0);
    let json = env.run(&["plan", "--json"]).expect(0);
    for (what, text) in [
        ("--once stdout", &once.stdout),
        ("--once stderr", &once.stderr),
        ("plan", &plan.stdout),
        ("plan stderr", &plan.stderr),
        ("plan --json", &json.stdout),
    ] {
        assert!(!text.contains(SECRET), "{what} shows the secret:\n{text}");
    }
    // On the test driver every run starts without domains: the plan defines it again,
    // with the seed's read-only CD-ROM in the XML, and leaves the seed alone.
    assert!(
        plan.stdout.contains("device=\"cdrom\"") || plan.stdout.contains("device='cdrom'"),
        "{}",
        plan.stdout
    );
    assert!(
        !plan.stdout.contains("cloud-init seed '"),
        "{}",
        plan.stdout
    );
    for entry in walk(env.state.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{} holds the secret",
            entry.display()
        );
    }
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.is_file() {
            out.push(path);
        }
    }
    out
}

#[test]
fn an_unchanged_seed_is_not_written_again_and_a_changed_one_is() {
    let (env, seed_dir, _keys) = seeded_env();
    env.run(&["--once"]).expect(0);
    let image = seed_dir.join("web-cidata.iso");
    let first = seeds::identity_of(&image);
    let first_meta = seeds::seed_file(&image, "meta-data");
    env.run(&["--once"]).expect(0);
    assert_eq!(
        seeds::identity_of(&image),
        first,
        "an unchanged seed was written"
    );

    env.repo.write(
        "cloud-init/web.yaml.j2",
        &format!("{USER_DATA}packages: [htop]\n"),
    );
    env.repo.commit("user-data changed");
    let plan = env.run(&["plan"]).expect(0);
    assert!(
        plan.stdout.contains("rebuild cloud-init seed '")
            && plan
                .stdout
                .contains(": content changed (secret, not shown)"),
        "{}",
        plan.stdout
    );
    env.run(&["--once"]).expect(0);
    assert_ne!(seeds::identity_of(&image), first);
    let meta = seeds::seed_file(&image, "meta-data");
    assert_ne!(meta, first_meta, "a changed seed gets a new instance-id");
    assert!(seeds::seed_file(&image, "user-data").contains("htop"));
}

#[test]
fn validate_checks_a_secrets_format_without_the_key() {
    let (env, _seed_dir, _keys) = seeded_env();
    let dir = env.repo.path().display().to_string();
    let disk_root = env.images.display().to_string();
    // No identity anywhere near: only the format is checked.
    vmsync(&["validate", &dir, "--disk-root", &disk_root]).expect(0);
    std::fs::write(env.repo.path().join("secrets/root.age"), b"not an age file").unwrap();
    let run = vmsync(&["validate", &dir, "--disk-root", &disk_root]).expect(3);
    assert!(
        run.stderr
            .contains("'secrets/root.age' is not a valid age file"),
        "{}",
        run.stderr
    );
}

/// libvirt's schema check of a VM with a seed runs on the committed XML (beside
/// observation); its rejection still names the VM, and nothing is written.
#[test]
fn a_schema_error_in_a_seeded_vm_is_reported_and_no_seed_is_written() {
    let keys = tempfile::tempdir().unwrap();
    let key = HostKey::ssh(keys.path());
    let mut env = Env::new();
    let seed_dir = env.images.join("seeds");
    seeds::configure(&mut env, &seed_dir, &key.path, "");
    env.repo.write("cloud-init/web.yaml", "#cloud-config\n");
    let vm = env
        .vm("web")
        .schema_bad()
        .key(&seeds::cloud_init("cloud-init/web.yaml", ""));
    env.commit(&Manifest::new().vm(vm), "schema error");
    let run = env.run(&["--once"]).expect(3);
    assert!(
        run.stderr.contains("vm 'web': field 'xml'") && run.stderr.contains("vcpux"),
        "{}",
        run.stderr
    );
    assert!(
        !seed_dir.exists(),
        "a seed was written for an invalid commit"
    );
}

#[test]
fn an_unchanged_seed_is_taken_from_the_cache_and_a_lost_one_is_built_again() {
    let (env, seed_dir, keys) = seeded_env();
    env.run(&["--once"]).expect(0);
    let image = seed_dir.join("web-cidata.iso");
    let written = std::fs::read(&image).unwrap();
    let debug_once = || {
        let out = env
            .command(&["--once"])
            .env("VMSYNC_LOG", "debug")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        stderr
    };
    // The second sync takes the seed's hash from the cache: nothing rendered, decrypted
    // or written.
    let second = debug_once();
    assert!(second.contains("seeds_from_cache=1"), "{second}");
    assert!(!second.contains("building them"), "{second}");
    let cache = std::fs::read(env.state.path().join("schema-cache.bin")).unwrap();
    let holds = |text: &str| cache.windows(text.len()).any(|w| w == text.as_bytes());
    assert!(holds("seed:"), "no seed entry in the cache");
    assert!(
        !holds(SECRET) && !holds("chpasswd"),
        "the cache holds content"
    );

    // A seed deleted by hand is built again from the commit: the same bytes.
    std::fs::remove_file(&image).unwrap();
    let third = debug_once();
    assert!(third.contains("building them"), "{third}");
    assert_eq!(std::fs::read(&image).unwrap(), written);

    // A replaced host key is a new identity: the secret is decrypted again, and one the
    // new key cannot open fails validation (exit 3) though the seed was remembered.
    let other = tempfile::tempdir().unwrap();
    let stranger = HostKey::ssh(other.path());
    std::fs::copy(&stranger.path, keys.path().join("host_ed25519_key")).unwrap();
    let run = env.run(&["--once"]).expect(3);
    assert!(run.stderr.contains("secrets/root.age"), "{}", run.stderr);
    assert_eq!(std::fs::read(&image).unwrap(), written);
}
