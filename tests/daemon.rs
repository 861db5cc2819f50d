//! The daemon as users run it: the real binary, a temp VM repository, libvirt's
//! `test:///default` driver (the daemon keeps its connection, so the driver keeps its
//! domains across syncs), signals sent with `kill`. Also `vmsync --once` stopped by
//! SIGTERM in the middle of a sync.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{Env, Manifest, Vm};

fn record(state: &Path) -> serde_json::Value {
    std::fs::read(state.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Waits until `check` holds for the record, or fails with the daemon's log.
fn wait_for(daemon: &Daemon, state: &Path, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if check(&record(state)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "timed out waiting for: {what}\nrecord: {}\nlog:\n{}",
        record(state),
        daemon.log()
    );
}

/// The metrics file once it has a line `line` (it is written right after the record).
fn metrics_with(daemon: &Daemon, path: &Path, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(|l| l == line) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never had {line:?}:\n{text}\nlog:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The env's agent config for the daemon: metrics to `metrics`, and no sync after the
/// first but on SIGHUP.
fn config(env: &Env, metrics: &Path) -> String {
    env.config(&format!(
        "# 1 January at midnight: in the test only SIGHUP triggers syncs after the first.\n\
         schedule = \"0 0 0 1 1 *\"\njitter_seconds = 0\nmetrics_file = \"{}\"\n",
        metrics.display()
    ))
}

#[test]
fn daemon_syncs_on_start_and_sighup_survives_failures_and_stops_on_sigterm() {
    let env = Env::new();
    let (repo, state) = (&env.repo, &env.state);
    let etc = tempfile::tempdir().unwrap();
    let disk = env.disk("d-web");
    let web = env.vm("d-web").file("web.xml").key("autostart = true");
    let c1 = env.commit(&Manifest::new().vm(web), "one vm");
    let metrics = state.path().join("vmsync.prom");
    let config_path = etc.path().join("config.toml");
    let good = config(&env, &metrics);
    std::fs::write(&config_path, &good).unwrap();

    let mut daemon = Daemon::start(&config_path, etc.path().join("daemon.log"));
    wait_for(&daemon, state.path(), "first sync at start", |r| {
        r["last_applied_commit"] == c1.as_str()
    });
    assert!(disk.exists());
    let text = metrics_with(
        &daemon,
        &metrics,
        &format!("vmsync_last_applied_commit_info{{commit=\"{c1}\"}} 1"),
    );
    assert!(
        text.contains(&format!(
            "vmsync_last_applied_commit_info{{commit=\"{c1}\"}} 1"
        )),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "vmsync_last_sync_success 1"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "vmsync_vm_up{vm=\"d-web\"} 1"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "vmsync_last_sync_actions{kind=\"define\"} 1"),
        "{text}"
    );

    // A new commit is applied on SIGHUP (the schedule would wait until January).
    repo.write("web.xml", &env.bios("d-web", 256));
    let c2 = repo.commit("more memory");
    daemon.signal("-HUP");
    wait_for(
        &daemon,
        state.path(),
        "sync of the new commit on SIGHUP",
        |r| r["last_applied_commit"] == c2.as_str(),
    );
    let text = metrics_with(
        &daemon,
        &metrics,
        &format!("vmsync_last_applied_commit_info{{commit=\"{c2}\"}} 1"),
    );
    assert!(
        text.lines()
            .any(|l| l == "vmsync_last_sync_actions{kind=\"redefine\"} 1"),
        "{text}"
    );

    // libvirt unreachable: the sync fails, the daemon lives on.
    let bad = good.replace(
        &format!("uri = \"{}\"", common::TEST_URI),
        "uri = \"qemu+unix:///system?socket=/nonexistent/sock\"",
    );
    std::fs::write(&config_path, bad).unwrap();
    let c3 = repo.commit("empty commit");
    daemon.signal("-HUP");
    wait_for(&daemon, state.path(), "failed sync with a bad uri", |r| {
        r["last_attempted_commit"] == c3.as_str() && r["last_result"] == "failed"
    });
    assert!(
        record(state.path())["last_error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/sock")
    );
    assert_eq!(record(state.path())["last_applied_commit"], c2.as_str());
    assert!(
        daemon.alive(),
        "the daemon survives a failed sync:\n{}",
        daemon.log()
    );
    let text = metrics_with(&daemon, &metrics, "vmsync_last_sync_success 0");
    assert!(
        text.lines().any(|l| l == "vmsync_last_sync_success 0"),
        "{text}"
    );

    // Fixed config: recovers on the next SIGHUP.
    std::fs::write(&config_path, &good).unwrap();
    daemon.signal("-HUP");
    wait_for(&daemon, state.path(), "recovery", |r| {
        r["last_applied_commit"] == c3.as_str() && r["last_result"] == "converged"
    });

    // A manual --once while the daemon idles shares the lock and works.
    let run = common::vmsync(&["--once", "--config", &config_path.display().to_string()]);
    assert_eq!(run.code, 0, "{}", run.stderr);

    daemon.signal("-TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    while daemon.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = daemon
        .child
        .try_wait()
        .unwrap()
        .expect("daemon exits on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    assert!(daemon.log().contains("daemon stopped"));
}

#[test]
fn daemon_gives_up_on_a_commit_that_keeps_failing() {
    let env = Env::new();
    let state = &env.state;
    let etc = tempfile::tempdir().unwrap();
    let missing = Manifest::new().vm(Vm::new("d-bad").file("missing.xml"));
    let c1 = env.commit(&missing, "broken");
    let config_path = etc.path().join("config.toml");
    let metrics = state.path().join("vmsync.prom");
    let text = config(&env, &metrics) + "max_attempts = 2\n";
    std::fs::write(&config_path, text).unwrap();
    let daemon = Daemon::start(&config_path, etc.path().join("daemon.log"));
    wait_for(&daemon, state.path(), "first invalid attempt", |r| {
        r["failed_attempts"] == 1
    });
    daemon.signal("-HUP");
    wait_for(&daemon, state.path(), "second invalid attempt", |r| {
        r["failed_attempts"] == 2
    });
    daemon.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon
        .log()
        .contains("not retrying it until a newer commit arrives")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        daemon
            .log()
            .contains(&format!("commit {c1} failed 2 times in a row")),
        "{}",
        daemon.log()
    );
    assert_eq!(
        record(state.path())["failed_attempts"],
        2,
        "not attempted a third time"
    );

    // A newer commit is attempted again.
    let c2 = env.commit(&Manifest::new(), "fixed");
    daemon.signal("-HUP");
    wait_for(&daemon, state.path(), "newer commit applied", |r| {
        r["last_applied_commit"] == c2.as_str()
    });
    assert_eq!(record(state.path())["failed_attempts"], 0);
}

#[test]
fn once_stops_on_sigterm_after_the_action_in_flight_and_records_it() {
    let env = Env::new();
    let tools = tempfile::tempdir().unwrap();
    let manifest = Manifest::new().vms(["o-a", "o-b"].map(|n| env.vm(n).key("autostart = true")));
    let commit = env.commit(&manifest, "two vms");
    let bin = common::slow_qemu_img(tools.path(), 2);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let child = env
        .command(&["--once"])
        .env("PATH", path)
        .env_remove("NO_COLOR")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both VMs' disk creations under way (VMs converge in parallel).
    let creating = || {
        std::fs::read_dir(tools.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with("create-started.")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while creating() < 2 {
        assert!(
            Instant::now() < deadline,
            "the disk creations did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let sent = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Killed by the signal, it would have no exit code and no record.
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(sent.elapsed() < Duration::from_secs(10), "{stderr}");
    assert!(
        stderr.contains("stopped before the sync finished") && stderr.contains("SIGTERM"),
        "{stderr}"
    );
    // The creations in flight finished (each VM's first action); nothing after them.
    for name in ["o-a", "o-b"] {
        assert!(env.disk(name).exists(), "{name}");
    }
    let r: serde_json::Value = serde_json::from_str(&env.state_json().unwrap()).unwrap();
    assert_eq!(r["last_attempted_commit"], commit.as_str(), "{r}");
    assert_eq!(r["last_result"], "failed", "{r}");
    assert_eq!(r["last_applied_commit"], serde_json::Value::Null, "{r}");
    for name in ["o-a", "o-b"] {
        assert_eq!(
            r["vms"][name]["last_error"],
            vmsync::reconcile::outcome::INTERRUPTED,
            "{r}"
        );
    }
    // The log went to a pipe: no colour codes.
    assert!(!stderr.contains("\x1b["), "{stderr}");
}
