//! Tier 3, order and windows (`depends_on`, `vmsync shutdown`, `[[window]]`): the real
//! binary against a real libvirtd, each order read from libvirt's own event stream
//! (`virsh event --all --loop --timestamp`).
//!
//! - router <- db <- app, db healthy only some seconds after its start: started router,
//!   db, app, and app only after db's check passed; libvirt's autostart flag stays off;
//!   `vmsync shutdown` stops app, then db, then router, each guest (no OS: it ignores
//!   ACPI) destroyed only after its shutdown_timeout; the next sync (as after a boot)
//!   starts them again in order.
//! - a db that never becomes healthy fails app ("waiting for …: not healthy after 5s")
//!   and not an unrelated VM.
//! - a commit that needs a restart outside a window restarts nothing and is applied by
//!   the daemon at the window's start, while a definition-only change in the same
//!   commit is applied at once.
//!
//! Without a reachable `qemu:///system` these tests skip with a message, unless
//! `VMSYNC_REQUIRE_LIBVIRTD` is set: then they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::events::Events;
use common::{Env, Manifest, Vm};

/// Waits (up to `limit`) for `check`.
fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A health check script in `dir`: healthy `delay` seconds after its first run for
/// that VM (a negative delay: never).
fn delayed_check(dir: &Path, delay: i64) -> PathBuf {
    let script = dir.join("check");
    let body = if delay < 0 {
        "#!/bin/sh\necho 'never ready'\nexit 1\n".to_string()
    } else {
        format!(
            "#!/bin/sh\nf=\"{}/first-$VMSYNC_VM_NAME\"\n[ -e \"$f\" ] || date +%s > \"$f\"\n\
             if [ $(( $(date +%s) - $(cat \"$f\") )) -ge {delay} ]; then echo ready; exit 0; fi\n\
             echo 'not ready yet'; exit 1\n",
            dir.display()
        )
    };
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

/// An agent config allowing the checks in `dir`, with `agent` lines under `[agent]`.
fn config(env: &Env, dir: &Path, agent: &str) -> PathBuf {
    let path = dir.join("config.toml");
    let text = env.config(agent).replace(
        "[policy]\n",
        &format!("[policy]\nhealth_commands = [\"{}\"]\n", dir.display()),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The three VMs router <- db <- app (all autostart, 3 s shutdown timeout); db with a
/// check `check` (settle 1s, timeout `timeout`).
fn graph(env: &Env, check: &Path, timeout: &str) -> Manifest {
    let keys = "autostart = true\nshutdown_timeout = \"3s\"";
    Manifest::new()
        .vm(env.vm("router").key(keys))
        .vm(env.vm("db").key(keys).key(&format!(
            "depends_on = [\"{}\"]\n[vm.health]\nsettle = \"1s\"\ncommand = [\"{}\"]\ntimeout = \"{timeout}\"",
            env.name("router"),
            check.display()
        )))
        .vm(env.vm("app").key(keys).key(&format!(
            "depends_on = [\"{}\"]",
            env.name("db")
        )))
}

/// The order of the first `what` event of each of `shorts` after `since`, with times.
fn order(
    env: &Env,
    events: &Events,
    shorts: &[&str],
    what: &str,
    since: DateTime<Utc>,
) -> Vec<(String, DateTime<Utc>)> {
    // Read from a pipe, an event may come a moment after the run that caused it.
    wait_for(
        &format!("the '{what}' events"),
        Duration::from_secs(10),
        || {
            shorts.iter().all(|s| {
                events
                    .first(&env.prefix, &env.name(s), what, since)
                    .is_some()
            })
        },
    );
    let mut seen: Vec<(String, DateTime<Utc>)> = shorts
        .iter()
        .map(|s| {
            let e = events.first(&env.prefix, &env.name(s), what, since);
            (s.to_string(), e.expect("waited for").at)
        })
        .collect();
    seen.sort_by_key(|(_, at)| *at);
    seen
}

fn names(seen: &[(String, DateTime<Utc>)]) -> Vec<&str> {
    seen.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn real_graph_starts_in_order_after_health_and_shuts_down_in_reverse() {
    let Some(mut env) = Env::system("order") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let check = delayed_check(dir.path(), 6);
    env.config_file = Some(config(&env, dir.path(), ""));
    env.commit(&graph(&env, &check, "1m"), "graph");
    let events = Events::start();
    let since = Utc::now();
    let run = env.run(&["--once"]).expect(0);
    run.stderr_has("dependency is up (healthy)");
    let started = order(&env, &events, &["app", "db", "router"], "Started", since);
    eprintln!("start order: {started:?}");
    assert_eq!(names(&started), ["router", "db", "app"]);
    // app waited for db's check, which passes 6 s after its first run.
    let db_to_app = started[2].1 - started[1].1;
    eprintln!(
        "db started -> app started: {} ms",
        db_to_app.num_milliseconds()
    );
    assert!(db_to_app >= chrono::Duration::seconds(5), "{db_to_app:?}");
    for vm in ["router", "db", "app"] {
        assert_eq!(env.domstate(vm), "running");
        assert!(
            !env.autostart(vm),
            "{vm}: libvirt's autostart stays off in a graph"
        );
    }
    let st = env.vm_status("app");
    assert_eq!(st["waiting_for"], serde_json::Value::Null, "{st}");

    // Shutdown: app, then db, then router; no OS, so each is destroyed after 3 s.
    let since = Utc::now();
    let run = env.run(&["shutdown"]).expect(0);
    run.stdout_has("still running after 3s, destroyed");
    let stopped = order(&env, &events, &["app", "db", "router"], "Stopped", since);
    eprintln!("shutdown order: {stopped:?}");
    assert_eq!(names(&stopped), ["app", "db", "router"]);
    let first = stopped[0].1 - since;
    assert!(
        first >= chrono::Duration::seconds(3),
        "destroyed only after its timeout: {first:?}"
    );
    for vm in ["router", "db", "app"] {
        assert_eq!(env.domstate(vm), "shut off");
    }

    // The first sync after a boot (everything off, autostart flags off): vmsync starts
    // the graph again, in order.
    let since = Utc::now();
    env.run(&["--once"]).expect(0);
    let again = order(&env, &events, &["app", "db", "router"], "Started", since);
    eprintln!("start order after the shutdown: {again:?}");
    assert_eq!(names(&again), ["router", "db", "app"]);
}

#[test]
fn real_dependency_never_healthy_fails_its_dependents_only() {
    let Some(mut env) = Env::system("ordfail") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let check = delayed_check(dir.path(), -1);
    env.config_file = Some(config(&env, dir.path(), ""));
    let manifest = graph(&env, &check, "4s").vm(env.vm("other").key("autostart = true"));
    env.commit(&manifest, "graph with a db that never becomes healthy");
    let started = Instant::now();
    let run = env.run(&["--once"]).expect(1);
    eprintln!("run took {:?}", started.elapsed());
    let expected = format!("waiting for {}: not healthy after 5s", env.name("db"));
    run.stderr_has(&expected);
    assert_eq!(env.domstate("app"), "shut off", "app is not started");
    assert!(env.defined("app"), "its definition is applied");
    assert_eq!(env.domstate("other"), "running", "an unrelated vm starts");
    assert_eq!(env.domstate("router"), "running");
    let app = env.vm_status("app");
    assert!(
        app["last_error"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&expected),
        "{app}"
    );
    assert_eq!(
        env.vm_status("other")["last_error"],
        serde_json::Value::Null
    );
}

/// The cron schedule (with seconds, UTC) of the second `at`.
fn cron_at(at: DateTime<Utc>) -> String {
    format!(
        "{} {} {} * * *",
        at.format("%-S"),
        at.format("%-M"),
        at.format("%-H")
    )
}

#[test]
fn real_restart_waits_for_the_window_and_a_definition_is_applied_at_once() {
    let Some(mut env) = Env::system("window") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The daemon's own schedule is hourly: only the window wakes it in this test.
    env.config_file = Some(config(
        &env,
        dir.path(),
        "schedule = \"0 0 * * * *\"\njitter_seconds = 0\n",
    ));
    let web = |memory| {
        Vm::new(&env.name("web"))
            .disk(&env.disk("web"), "64M")
            .xml(&env.bios("web", memory))
            .key("autostart = true\non_change = \"restart\"\nshutdown_timeout = \"1s\"")
    };
    let spare = |memory| {
        Vm::new(&env.name("spare"))
            .disk(&env.disk("spare"), "64M")
            .xml(&env.bios("spare", memory))
    };
    env.commit(&Manifest::new().vm(web(128)).vm(spare(128)), "first");
    env.run(&["--once"]).expect(0);
    let id = env.domid("web");

    // A commit that restarts web and redefines spare, and a window opening in 20 s.
    let opens = Utc::now() + chrono::Duration::seconds(20);
    let opens = opens - chrono::Duration::nanoseconds(opens.timestamp_subsec_nanos() as i64);
    let manifest = Manifest::new().vm(web(160)).vm(spare(160));
    manifest.write(&env.repo);
    let window = format!(
        "\n[[window]]\nschedule = \"{}\"\nduration = \"10m\"\ntimezone = \"UTC\"\nvms = [\"{}\"]\n",
        cron_at(opens),
        env.name("w*")
    );
    env.repo.write("vmsync.toml", &(manifest.toml() + &window));
    env.repo.commit("restart web in the window");

    // `plan` says so, and --ignore-windows would restart now.
    let plan = env.run(&["plan"]).expect(0);
    let waiting = format!("waiting for window {}", opens.format("%Y-%m-%dT%H:%M:%SZ"));
    plan.stdout_has(&waiting);
    let plan = env.run(&["plan", "--ignore-windows"]).expect(0);
    assert!(
        !plan.stdout.contains("waiting for window"),
        "{}",
        plan.stdout
    );

    let events = Events::start();
    let log = dir.path().join("daemon.log");
    let mut daemon = env
        .command(&[])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the first sync", Duration::from_secs(30), || {
        read_log().contains("next sync at the start of a maintenance window")
    });
    assert!(
        Utc::now() < opens,
        "the first sync ended after the window opened:\n{}",
        read_log()
    );
    // At once: spare's new definition; web redefined for its next boot, not restarted.
    assert!(
        env.inactive("spare")
            .contains("<memory unit='KiB'>163840</memory>")
    );
    assert!(
        env.inactive("web")
            .contains("<memory unit='KiB'>163840</memory>")
    );
    assert_eq!(
        env.domid("web"),
        id,
        "web is not restarted outside the window"
    );
    let st = env.vm_status("web");
    assert_eq!(
        st["waiting_for"],
        format!("window {}", opens.format("%Y-%m-%dT%H:%M:%SZ")).as_str(),
        "{st}"
    );
    assert_eq!(st["pending_restart"], true, "{st}");

    // At the window's start the daemon wakes and restarts web (seen in libvirt's events;
    // read from a pipe, they may come a moment after the state).
    let mut restarted = None;
    wait_for("the restart in the window", Duration::from_secs(60), || {
        restarted = events.first(&env.prefix, &env.name("web"), "Started", opens);
        restarted.is_some()
    });
    let restarted = restarted.unwrap();
    assert_eq!(env.domstate("web"), "running");
    assert_ne!(env.domid("web"), id);
    let delay = restarted.at - opens;
    eprintln!(
        "window opened {opens}, web started again {} ({} ms later; 1 s of it the shutdown timeout)",
        restarted.at,
        delay.num_milliseconds()
    );
    assert!(delay >= chrono::Duration::zero(), "{delay:?}");
    assert!(delay < chrono::Duration::seconds(15), "{delay:?}");
    wait_for(
        "the record after the restart",
        Duration::from_secs(30),
        || env.vm_status("web")["waiting_for"].is_null(),
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
}
