//! Trust: signed commits (`[trust] allowed_signers`, real `git commit -S` with SSH keys),
//! no rollback or rewritten history (`--allow-rewind`), and what happens when the state
//! file is lost (the managed domains' tags still hold the floor). Tier 2
//! (`test:///default`, the real binary and the library) and tier 3 (`qemu:///system`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::{Repo, SigningKey, bios_xml, vmsync};
use vmsync::agent::state::{self, SyncResult};
use vmsync::agent::sync::{self, Connection, Options, SyncError};
use vmsync::config::Settings;
use vmsync::repo::trust::TrustError;

fn manifest(images: &Path, name: &str) -> String {
    format!(
        "version = 1\n\n[[vm]]\nname = \"{name}\"\nxml = \"vms/{name}.xml\"\n\n  [[vm.disk]]\n  path = \"{}/{name}.qcow2\"\n  size = \"16M\"\n",
        images.display()
    )
}

struct Env {
    name: String,
    repo: Repo,
    images: tempfile::TempDir,
    state: tempfile::TempDir,
    uri: String,
    extra: Vec<String>,
}

impl Env {
    fn new(name: &str) -> Self {
        Self::with_images(name, tempfile::tempdir().unwrap(), "test:///default")
    }

    fn with_images(name: &str, images: tempfile::TempDir, uri: &str) -> Self {
        let repo = Repo::new();
        let env = Env {
            name: name.to_string(),
            repo,
            images,
            state: tempfile::tempdir().unwrap(),
            uri: uri.to_string(),
            extra: Vec::new(),
        };
        env.write_vm(128);
        env
    }

    /// Writes the manifest and the VM's XML with `memory` MiB (a change of memory is a
    /// change of definition).
    fn write_vm(&self, memory: u32) {
        self.repo
            .write("vmsync.toml", &manifest(self.images.path(), &self.name));
        let domain_type = if self.uri.starts_with("test") {
            "kvm"
        } else {
            "qemu"
        };
        self.repo.write(
            &format!("vms/{}.xml", self.name),
            &bios_xml(&self.name, domain_type, &self.disk(), memory),
        );
    }

    fn disk(&self) -> PathBuf {
        self.images.path().join(format!("{}.qcow2", self.name))
    }

    fn run(&self, extra: &[&str]) -> common::Run {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--url".into(),
            self.repo.path().display().to_string(),
            "--state-dir".into(),
            self.state.path().display().to_string(),
            "--connect".into(),
            self.uri.clone(),
            "--disk-root".into(),
            self.images.path().display().to_string(),
            "--host".into(),
            "hv1".into(),
        ]);
        args.extend(self.extra.iter().cloned());
        vmsync(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn record(&self) -> state::Record {
        state::load(self.state.path()).unwrap()
    }

    fn settings(&self) -> Settings {
        common::settings(
            self.repo.path(),
            self.state.path(),
            self.images.path(),
            &self.uri,
        )
    }
}

fn untrusted(env: &Env, run: &common::Run, reason: &str) {
    assert!(run.stderr.contains(reason), "{}", run.stderr);
    assert!(run.stderr.contains("nothing was applied"), "{}", run.stderr);
    let record = env.record();
    assert_eq!(record.last_result, Some(SyncResult::Untrusted));
    assert!(
        record.last_error.as_deref().unwrap_or("").contains(reason),
        "{:?}",
        record.last_error
    );
}

#[test]
fn only_commits_signed_by_an_allowed_key_are_applied() {
    let mut env = Env::new("tr-sig");
    let alice = SigningKey::new("ed25519");
    let mallory = SigningKey::new("ed25519");
    let ecdsa = SigningKey::new("ecdsa");
    let keys = tempfile::tempdir().unwrap();
    let signers = SigningKey::allowed_signers(
        keys.path(),
        &[
            "# the ops team".into(),
            format!("alice@example.org namespaces=\"git\" {}", alice.public),
            format!("\"bob@example.org\" {}", ecdsa.public),
            format!("carol@example.org namespaces=\"file\" {}", mallory.public),
        ],
    );
    env.extra = vec!["--allowed-signers".into(), signers.display().to_string()];

    // Unsigned: refused with exit 5, nothing made.
    let unsigned = env.repo.commit("unsigned");
    let run = env.run(&["--once"]).expect(5);
    untrusted(
        &env,
        &run,
        &format!(
            "commit {unsigned} is not signed, and [trust] allowed_signers requires a signature"
        ),
    );
    assert!(
        !env.disk().exists(),
        "nothing applied for an unsigned commit"
    );
    assert_eq!(env.record().last_applied_commit, None);
    assert_eq!(
        env.record().last_attempted_commit.as_deref(),
        Some(unsigned.as_str())
    );

    // Signed by a key listed only for another namespace: refused.
    let by_mallory = env.repo.commit_signed("mallory", &mallory);
    let run = env.run(&["--once"]).expect(5);
    untrusted(
        &env,
        &run,
        &format!("commit {by_mallory} is signed by key SHA256:"),
    );
    assert!(
        run.stderr
            .contains("(line 4 lists it for namespaces file only)"),
        "{}",
        run.stderr
    );
    assert!(!env.disk().exists());

    // Signed by alice: applied.
    let by_alice = env.repo.commit_signed("alice", &alice);
    let run = env.run(&["--once"]).expect(0);
    assert!(run.stderr.contains("signature verified"), "{}", run.stderr);
    assert!(run.stderr.contains("alice@example.org"), "{}", run.stderr);
    assert!(env.disk().exists());
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(by_alice.as_str())
    );

    // An ECDSA key works too.
    env.write_vm(256);
    let by_bob = env.repo.commit_signed("bob", &ecdsa);
    env.run(&["--once"]).expect(0);
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(by_bob.as_str())
    );

    // A key nobody listed.
    let stranger = SigningKey::new("ed25519");
    env.write_vm(384);
    let by_stranger = env.repo.commit_signed("stranger", &stranger);
    let run = env.run(&["--once"]).expect(5);
    untrusted(
        &env,
        &run,
        &format!("commit {by_stranger} is signed by key SHA256:"),
    );
    assert!(run.stderr.contains("which is not in"), "{}", run.stderr);
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(by_bob.as_str())
    );
}

#[test]
fn a_tampered_signed_commit_is_refused() {
    let mut env = Env::new("tr-tamper");
    let alice = SigningKey::new("ed25519");
    let keys = tempfile::tempdir().unwrap();
    let signers = SigningKey::allowed_signers(keys.path(), &[format!("alice {}", alice.public)]);
    env.extra = vec!["--allowed-signers".into(), signers.display().to_string()];
    env.repo.commit_signed("signed by alice", &alice);
    // Same signature, another message: the signed payload no longer matches.
    let object = env.repo.git(&["cat-file", "commit", "HEAD"]);
    let forged = object.replace("signed by alice", "signed by alice, honest");
    let path = env.repo.path().join("forged");
    std::fs::write(&path, forged).unwrap();
    let id = env
        .repo
        .git(&["hash-object", "-t", "commit", "-w", path.to_str().unwrap()])
        .trim()
        .to_string();
    env.repo.git(&["update-ref", "refs/heads/main", &id]);
    let run = env.run(&["--once"]).expect(5);
    untrusted(
        &env,
        &run,
        &format!("commit {id} has a bad signature: verification with key"),
    );
    assert!(!env.disk().exists());
}

#[test]
fn a_broken_allowed_signers_file_is_a_config_error() {
    let mut env = Env::new("tr-file");
    env.repo.commit("c");
    let keys = tempfile::tempdir().unwrap();
    let key = SigningKey::new("ed25519");
    let signers =
        SigningKey::allowed_signers(keys.path(), &[format!("a cert-authority {}", key.public)]);
    env.extra = vec!["--allowed-signers".into(), signers.display().to_string()];
    let run = env.run(&["--once"]).expect(2);
    assert!(
        run.stderr.contains(&format!(
            "invalid allowed signers file '{}:1': option 'cert-authority' is not supported",
            signers.display()
        )),
        "{}",
        run.stderr
    );
    env.extra = vec!["--allowed-signers".into(), "/nonexistent/signers".into()];
    let run = env.run(&["--once"]).expect(2);
    assert!(
        run.stderr
            .contains("invalid allowed signers file '/nonexistent/signers': failed to read it"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_rewound_or_replaced_branch_is_refused_until_allowed() {
    let env = Env::new("tr-rewind");
    let a = env.repo.commit("a");
    env.run(&["--once"]).expect(0);
    env.write_vm(256);
    let b = env.repo.commit("b");
    env.run(&["--once"]).expect(0);

    // Rewind main to a: exit 5, b stays the last applied commit.
    env.repo.git(&["reset", "-q", "--hard", &a]);
    let run = env.run(&["--once"]).expect(5);
    untrusted(
        &env,
        &run,
        &format!(
            "commit {a} does not descend from commit {b} (the last applied commit in state.json)"
        ),
    );
    assert!(run.stderr.contains("--allow-rewind"), "{}", run.stderr);
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(b.as_str())
    );
    // Still refused on the next run: refusal is not a one-off.
    env.run(&["--once"]).expect(5);
    // plan refuses it too.
    env.run(&["plan"]).expect(5);

    // Replaced history (amend b): refused as well.
    env.repo.git(&["reset", "-q", "--hard", &b]);
    env.write_vm(512);
    env.repo.git(&["add", "-A"]);
    env.repo
        .git(&["commit", "-q", "--amend", "-m", "b, rewritten"]);
    let b2 = env.repo.git(&["rev-parse", "HEAD"]).trim().to_string();
    let run = env.run(&["--once"]).expect(5);
    untrusted(
        &env,
        &run,
        &format!("commit {b2} does not descend from commit {b}"),
    );

    // --allow-rewind only goes with --once.
    let run = env.run(&["--allow-rewind"]).expect(2);
    assert!(
        run.stderr
            .contains("--allow-rewind is only accepted with --once"),
        "{}",
        run.stderr
    );
    env.run(&["plan", "--allow-rewind"]).expect(2);

    // The operator accepts it: applied, and it is the new floor.
    let run = env.run(&["--once", "--allow-rewind"]).expect(0);
    assert!(run.stderr.contains("--allow-rewind"), "{}", run.stderr);
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(b2.as_str())
    );
    env.run(&["--once"]).expect(0);

    // A fast-forward needs nothing.
    env.write_vm(640);
    let c = env.repo.commit("c");
    env.run(&["--once"]).expect(0);
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(c.as_str())
    );
}

/// In one process the test driver keeps its domains: lose the state directory entirely,
/// rewind the branch, and the domains' tags still refuse the rollback.
#[test]
fn losing_the_state_file_does_not_reopen_the_door() {
    let env = Env::new("tr-lost");
    let settings = env.settings();
    let cancel = AtomicBool::new(false);
    let mut conn = Connection::new("test:///default");
    let options = |allow_rewind| Options {
        give_up_after: None,
        cancel: &cancel,
        allow_rewind,
    };
    let a = env.repo.commit("a");
    sync::run(&settings, &mut conn, &options(false)).unwrap();
    env.write_vm(256);
    let b = env.repo.commit("b");
    sync::run(&settings, &mut conn, &options(false)).unwrap();

    // The state directory (record and clone) is gone, and main is rewound to a.
    std::fs::remove_dir_all(env.state.path()).unwrap();
    env.repo.git(&["reset", "-q", "--hard", &a]);
    env.repo.git(&["reflog", "expire", "--expire=now", "--all"]);
    env.repo.git(&["gc", "-q", "--prune=now"]);
    let err = sync::run(&settings, &mut conn, &options(false)).unwrap_err();
    assert_eq!(err.exit_code(), 5, "{err}");
    match &err {
        SyncError::Untrusted(TrustError::UnknownFloor {
            commit,
            floor,
            source_of_floor,
        }) => {
            assert_eq!((commit, floor), (&a, &b));
            assert_eq!(
                source_of_floor,
                "the commit domain 'tr-lost' was defined from"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let record = env.record();
    assert_eq!(record.last_result, Some(SyncResult::Untrusted));
    assert_eq!(record.last_applied_commit, None);

    // Accepted explicitly: the domain is redefined from a.
    let report = sync::run(&settings, &mut conn, &options(true)).unwrap();
    assert_eq!(report.commit, a);
    let hv = vmsync::host::hypervisor::Libvirt::connect("test:///default").unwrap();
    let tag = vmsync::desired::domain_xml::read_tag(
        &vmsync::host::hypervisor::Hypervisor::xml(&hv, "tr-lost", true).unwrap(),
    )
    .unwrap();
    assert_eq!(tag.commit, a);
    sync::run(&settings, &mut conn, &options(false)).unwrap();
}

/// Tier 3: the same with the real binary and a real libvirtd, where the domain outlives
/// the process.
#[test]
fn real_libvirtd_state_loss_and_rewind() {
    if !common::libvirtd_available() {
        return;
    }
    let (prefix, images_path, _cleanup) = common::scratch("trust");
    // A temp dir object that does not delete the images dir (the guard does).
    let images = tempfile::Builder::new()
        .prefix("imgs")
        .tempdir_in(&images_path)
        .unwrap();
    let name = format!("{prefix}-vm");
    let env = Env::with_images(&name, images, "qemu:///system");
    let a = env.repo.commit("a");
    env.run(&["--once"]).expect(0);
    env.write_vm(256);
    let b = env.repo.commit("b");
    env.run(&["--once"]).expect(0);

    std::fs::remove_dir_all(env.state.path()).unwrap();
    env.repo.git(&["reset", "-q", "--hard", &a]);
    let run = env.run(&["--once"]).expect(5);
    assert!(
        run.stderr.contains(&format!("commit {b} (the commit domain '{name}' was defined from)"))
            || run.stderr.contains(&format!(
                "commit {a} does not descend from commit {b} (the commit domain '{name}' was defined from)"
            )),
        "{}",
        run.stderr
    );
    let (_, xml) = common::virsh_system(&["dumpxml", "--inactive", &name]);
    assert!(xml.contains(&b), "the domain still has b's definition");
    env.run(&["--once", "--allow-rewind"]).expect(0);
    let (_, xml) = common::virsh_system(&["dumpxml", "--inactive", &name]);
    assert!(
        xml.contains(&format!("<vmsync:commit>{a}</vmsync:commit>")),
        "{xml}"
    );
    env.run(&["--once"]).expect(0);
}
