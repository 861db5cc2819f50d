//! Trust: signed commits (`[trust] allowed_signers`, real `git commit -S` with SSH keys),
//! no rollback or rewritten history (`--allow-rewind`), and what happens when the state
//! file is lost (the managed domains' tags still hold the floor). Tier 2
//! (`test:///default`, the real binary and the library) and tier 3 (`qemu:///system`).

mod common;

use std::sync::atomic::AtomicBool;

use common::{Env, Manifest, SigningKey};

use vmsync::agent::sync::{self, Connection, Options, SyncError};
use vmsync::record::SyncResult;
use vmsync::repo::trust::TrustError;

/// Writes the manifest with the one VM `short` and its XML with `memory` MiB (a change
/// of memory is a change of definition).
fn write_vm(env: &Env, short: &str, memory: u32) {
    let vm = env.vm(short).xml(&env.bios(short, memory));
    Manifest::new().vm(vm).write(&env.repo);
}

/// An env on the test driver with the VM `short` written, not committed.
fn env_with(short: &str) -> Env {
    let env = Env::new();
    write_vm(&env, short, 128);
    env
}

fn untrusted(env: &Env, run: &common::Run, reason: &str) {
    run.stderr_has(reason);
    run.stderr_has("nothing was applied");
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
    const VM: &str = "tr-sig";
    let mut env = env_with(VM);
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
    env.flags = vec!["--allowed-signers".into(), signers.display().to_string()];

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
        !env.disk(VM).exists(),
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
    run.stderr_has("(line 4 lists it for namespaces file only)");
    assert!(!env.disk(VM).exists());

    // Signed by alice: applied.
    let by_alice = env.repo.commit_signed("alice", &alice);
    let run = env.run(&["--once"]).expect(0);
    run.stderr_has("signature verified");
    run.stderr_has("alice@example.org");
    assert!(env.disk(VM).exists());
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(by_alice.as_str())
    );

    // An ECDSA key works too.
    write_vm(&env, VM, 256);
    let by_bob = env.repo.commit_signed("bob", &ecdsa);
    env.run(&["--once"]).expect(0);
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(by_bob.as_str())
    );

    // A key nobody listed.
    let stranger = SigningKey::new("ed25519");
    write_vm(&env, VM, 384);
    let by_stranger = env.repo.commit_signed("stranger", &stranger);
    let run = env.run(&["--once"]).expect(5);
    untrusted(
        &env,
        &run,
        &format!("commit {by_stranger} is signed by key SHA256:"),
    );
    run.stderr_has("which is not in");
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(by_bob.as_str())
    );
}

#[test]
fn a_tampered_signed_commit_is_refused() {
    const VM: &str = "tr-tamper";
    let mut env = env_with(VM);
    let alice = SigningKey::new("ed25519");
    let keys = tempfile::tempdir().unwrap();
    let signers = SigningKey::allowed_signers(keys.path(), &[format!("alice {}", alice.public)]);
    env.flags = vec!["--allowed-signers".into(), signers.display().to_string()];
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
    assert!(!env.disk(VM).exists());
}

#[test]
fn a_broken_allowed_signers_file_is_a_config_error() {
    const VM: &str = "tr-file";
    let mut env = env_with(VM);
    env.repo.commit("c");
    let keys = tempfile::tempdir().unwrap();
    let key = SigningKey::new("ed25519");
    let signers =
        SigningKey::allowed_signers(keys.path(), &[format!("a cert-authority {}", key.public)]);
    env.flags = vec!["--allowed-signers".into(), signers.display().to_string()];
    let run = env.run(&["--once"]).expect(2);
    run.stderr_has(&format!(
        "invalid allowed signers file '{}:1': option 'cert-authority' is not supported",
        signers.display()
    ));
    env.flags = vec!["--allowed-signers".into(), "/nonexistent/signers".into()];
    let run = env.run(&["--once"]).expect(2);
    run.stderr_has("invalid allowed signers file '/nonexistent/signers': failed to read it");
}

#[test]
fn a_rewound_or_replaced_branch_is_refused_until_allowed() {
    const VM: &str = "tr-rewind";
    let env = env_with(VM);
    let a = env.repo.commit("a");
    env.run(&["--once"]).expect(0);
    write_vm(&env, VM, 256);
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
    run.stderr_has("--allow-rewind");
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
    write_vm(&env, VM, 512);
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
    run.stderr_has("--allow-rewind is only accepted with --once");
    env.run(&["plan", "--allow-rewind"]).expect(2);

    // The operator accepts it: applied, and it is the new floor.
    let run = env.run(&["--once", "--allow-rewind"]).expect(0);
    run.stderr_has("--allow-rewind");
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(b2.as_str())
    );
    env.run(&["--once"]).expect(0);

    // A fast-forward needs nothing.
    write_vm(&env, VM, 640);
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
    const VM: &str = "tr-lost";
    let env = env_with(VM);
    let settings = env.settings();
    let cancel = AtomicBool::new(false);
    let mut conn = Connection::new(common::TEST_URI);
    let options = |allow_rewind| Options {
        allow_rewind,
        ..common::options(&cancel)
    };
    let a = env.repo.commit("a");
    sync::run(&settings, &mut conn, &options(false)).unwrap();
    write_vm(&env, VM, 256);
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
    let hv = vmsync::host::hypervisor::Libvirt::connect(common::TEST_URI).unwrap();
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
    let Some(env) = Env::system("trust") else {
        return;
    };
    let name = env.name("vm");
    write_vm(&env, "vm", 128);
    let a = env.repo.commit("a");
    env.run(&["--once"]).expect(0);
    write_vm(&env, "vm", 256);
    let b = env.repo.commit("b");
    env.run(&["--once"]).expect(0);

    std::fs::remove_dir_all(env.state.path()).unwrap();
    env.repo.git(&["reset", "-q", "--hard", &a]);
    // b is not in a fresh clone's history, or it is and a does not descend from it:
    // either way the domain's tag names the floor, and the rewind is refused.
    env.run(&["--once"])
        .expect(5)
        .stderr_has(&format!(
            "commit {b} (the commit domain '{name}' was defined from)"
        ))
        .stderr_has(&format!("commit {a} "))
        .stderr_has("refusing it (run `vmsync --once --allow-rewind` to accept it)");
    assert!(
        env.inactive("vm").contains(&b),
        "the domain still has b's definition"
    );
    env.run(&["--once", "--allow-rewind"]).expect(0);
    let xml = env.inactive("vm");
    assert!(
        xml.contains(&format!("<vmsync:commit>{a}</vmsync:commit>")),
        "{xml}"
    );
    env.run(&["--once"]).expect(0);
}
