//! The JSON of `plan --json` and `status --json` does not change: one fixed scenario on
//! the test driver (a pool with a volume, a network, two VMs, one of them on both), its
//! output byte for byte against `tests/fixtures/golden/`, with what differs between runs
//! (commit ids, temp paths, times) put in placeholders. The shapes the domain and the
//! network/pool types share are written from one place; these tests hold their JSON to
//! what it was before (with `record::store`'s round trip of `state-2375f90.json`).
//!
//! After a change meant to alter the output: `VMSYNC_BLESS=1 cargo test --test
//! golden_json` rewrites the files; review the diff.

mod common;

use std::path::Path;

use common::Env;

/// The scenario's first commit: pool `g-pool` (volume `g-vm.qcow2`), network `g-net`, VM
/// `g-vm` on both, and a plain VM `g-plain` with a file disk.
fn scenario(env: &Env) -> String {
    let pool_dir = env.images.join("g-pool");
    env.repo.write(
        "vmsync.toml",
        r#"version = 1
[[pool]]
name = "g-pool"
xml = "pool.xml"
autostart = true
[[network]]
name = "g-net"
xml = "net.xml"
autostart = true
[[vm]]
name = "g-vm"
xml = "vm.xml"
autostart = true
  [[vm.disk]]
  pool = "g-pool"
  volume = "g-vm.qcow2"
  size = "64M"
[[vm]]
name = "g-plain"
xml = "plain.xml"
"#,
    );
    env.repo.write(
        "pool.xml",
        &format!(
            "<pool type='dir'><name>g-pool</name><target><path>{}</path></target></pool>",
            pool_dir.display()
        ),
    );
    env.repo.write(
        "net.xml",
        "<network><name>g-net</name><bridge name='gbr'/></network>",
    );
    env.repo.write(
        "vm.xml",
        "<domain type='test'><name>g-vm</name><memory unit='MiB'>128</memory><os><type>hvm</type></os><devices><disk type='volume' device='disk'><source pool='g-pool' volume='g-vm.qcow2'/><target dev='vda'/></disk><interface type='network'><source network='g-net'/></interface></devices></domain>",
    );
    env.repo.write(
        "plain.xml",
        "<domain type='test'><name>g-plain</name><memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>",
    );
    env.repo.commit("golden scenario")
}

/// `text` with what differs between runs replaced: the commit id (full and short), the
/// temp directories, and RFC 3339 times.
fn normalize(env: &Env, commit: &str, text: &str) -> String {
    let mut out = text
        .replace(commit, "<COMMIT>")
        .replace(&commit[..12], "<SHORT>")
        .replace(&env.images.display().to_string(), "<IMAGES>")
        .replace(&env.state.path().display().to_string(), "<STATE>")
        .replace(&env.repo.path().display().to_string(), "<REPO>");
    // Times: "YYYY-MM-DDTHH:MM:SS…" up to the closing quote.
    let mut result = String::new();
    while let Some(at) = out.find('"') {
        result.push_str(&out[..=at]);
        out = out[at + 1..].to_string();
        let end = out.find('"').unwrap_or(out.len());
        let s = &out[..end];
        let b = s.as_bytes();
        let is_time = b.len() >= 20
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T';
        if is_time {
            result.push_str("<TIME>");
        } else {
            result.push_str(s);
        }
        result.push('"');
        out = out[(end + 1).min(out.len())..].to_string();
    }
    result.push_str(&out);
    result
}

/// Asserts `actual` is the golden file `name` (or writes it with `VMSYNC_BLESS=1`).
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name);
    if std::env::var_os("VMSYNC_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (VMSYNC_BLESS=1 writes it)", path.display()));
    assert_eq!(
        actual,
        expected,
        "{} changed (VMSYNC_BLESS=1 rewrites it after a wanted change)",
        path.display()
    );
}

#[test]
fn plan_json_of_a_fixed_scenario_is_unchanged() {
    let env = Env::new();
    let commit = scenario(&env);
    let run = env.run(&["plan", "--json"]).expect(0);
    golden("plan.json", &normalize(&env, &commit, &run.stdout));
}

#[test]
fn status_json_of_a_fixed_scenario_is_unchanged() {
    let env = Env::new();
    let commit = scenario(&env);
    env.run(&["--once"]).expect(0);
    let run = env.run(&["status", "--json"]).expect(0);
    golden("status.json", &normalize(&env, &commit, &run.stdout));
}
