//! Tier 4: the shipped units under a real systemd. A Debian 12 tree (built once by
//! `tests/systemd/rootfs.sh` and cached) is booted with `systemd-nspawn -b`, the units,
//! binary and config are installed as deploy/README.md says, and `systemctl` inside the
//! container (run through `nsenter`) drives them:
//!
//! - `vmsync.service` applies a commit under the full sandbox, creates disks in the
//!   default disk root, fails with "Read-only file system" in an extra disk root until
//!   the README's `ReadWritePaths=` drop-in is added, and counts a held lock (exit 75)
//!   as success, logged at INFO; `vmsync.timer` starts it (with a drop-in for short
//!   intervals) and applies new commits. libvirt's test driver, in-process.
//! - `vmsync-agent.service` against the host's libvirtd (its socket bound in, the disk
//!   root bound at the same path): READY (`systemctl start` of a `Type=notify` unit
//!   returns only then), STATUS text, a webhook push (`[webhook] listen` in the sandbox)
//!   and `systemctl reload` sync a new commit, starting it
//!   stops the timer (`Conflicts=`), and `systemctl stop` during a guest's graceful
//!   shutdown (the guest boots no OS, so it never honours ACPI) ends at once, the unit
//!   not failed, the VM recorded as not stopped, no drift afterwards. The same stop of
//!   `vmsync.service` exits 143, counted as success.
//! - `vmsync-agent.service` with `vmsync-shutdown.service` and a dependency graph
//!   (router <- db <- app): started as at boot, the agent's first sync starts the graph
//!   in order (libvirt's autostart flags off); stopping the shutdown unit (as at host
//!   shutdown) runs `vmsync shutdown`: app, db, router, in libvirt's event stream.
//!
//! Needs root, `systemd-nspawn` (package systemd-container), `nsenter` (util-linux), and
//! `debootstrap` plus deb.debian.org the first time (about 2 minutes, 320 MB in
//! /var/cache/vmsync-tests); the agent test also needs a libvirtd at qemu:///system.
//! Without them the tests skip with a message, unless `VMSYNC_REQUIRE_LIBVIRTD` is set
//! (CI): then they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Repo, bios_xml};

/// Where the checkout is.
fn checkout() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn required() -> bool {
    std::env::var_os("VMSYNC_REQUIRE_LIBVIRTD").is_some()
}

/// Skips (or, when required, fails) with `why`.
fn cannot_run(why: &str) {
    if required() {
        panic!("VMSYNC_REQUIRE_LIBVIRTD is set but the systemd tier cannot run: {why}");
    }
    eprintln!(
        "SKIPPED: systemd tier: {why} (set VMSYNC_REQUIRE_LIBVIRTD=1 to make this a failure)"
    );
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The booted tree's path, when everything the tier needs is here.
fn tree() -> Option<PathBuf> {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        cannot_run("not root");
        return None;
    }
    for (tool, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
    ] {
        if !runs(tool, &["--version"]) {
            cannot_run(&format!("`{tool}` not found: apt-get install {package}"));
            return None;
        }
    }
    let script = checkout().join("tests/systemd/rootfs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    if !out.status.success() {
        cannot_run(&format!(
            "{} failed (needs debootstrap and deb.debian.org the first time)",
            script.display()
        ));
        return None;
    }
    Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

/// Polls `check` every 100 ms until it gives a value, or fails after `limit` with `what`
/// and `context()`.
fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the container printed on its console, and nspawn's own messages.
fn console_log(dir: &Path) -> String {
    format!(
        "console:\n{}\nnspawn:\n{}",
        std::fs::read_to_string(dir.join("console.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("nspawn.err")).unwrap_or_default()
    )
}

/// A bind mount into the container: host path, path inside, read-only.
type Bind = (PathBuf, String, bool);

/// A booted container; powered off when dropped.
struct Machine {
    nspawn: Child,
    leader: u32,
    console: PathBuf,
    _dir: tempfile::TempDir,
}

impl Machine {
    /// Boots `tree` (never written: `--volatile=overlay` keeps changes in memory) with
    /// `binds` (host path, container path, read-only) and waits until it has booted.
    fn boot(tree: &Path, name: &str, binds: &[Bind]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("--directory")
            .arg(tree)
            .args(["--volatile=overlay", "--boot", "--quiet"])
            // systemd is not PID 1 of this machine (a container): no scope unit of our
            // own, no registration with machined.
            .args(["--keep-unit", "--register=no", "--console=passive"])
            .arg(format!("--machine={name}"));
        for (host, inside, read_only) in binds {
            let flag = if *read_only { "--bind-ro" } else { "--bind" };
            cmd.arg(format!("{flag}={}:{inside}", host.display()));
        }
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&console).unwrap())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("nspawn.err")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let pid = nspawn.id();
        let read_console = || console_log(dir.path());
        // The container's init is nspawn's child.
        let leader = wait_for(
            "the container's systemd",
            Duration::from_secs(30),
            || {
                let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
                tasks
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
                    .flat_map(|c| {
                        c.split_whitespace()
                            .filter_map(|p| p.parse::<u32>().ok())
                            .collect::<Vec<_>>()
                    })
                    .find(|child| {
                        std::fs::read_to_string(format!("/proc/{child}/comm"))
                            .is_ok_and(|c| c.trim() == "systemd")
                    })
            },
            read_console,
        );
        let machine = Machine {
            nspawn,
            leader,
            console,
            _dir: dir,
        };
        let read_console = || console_log(machine._dir.path());
        // Until systemd listens, systemctl cannot connect: ask again.
        let state = wait_for(
            "the container to boot",
            Duration::from_secs(60),
            || {
                let out = machine.sh("systemctl is-system-running --wait || true");
                let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                (!state.is_empty() && state != "offline").then_some(state)
            },
            read_console,
        );
        // "degraded": some unit of the container failed. None of ours runs at boot, and
        // each check below names what it needs: report, go on.
        assert!(
            state == "running" || state == "degraded",
            "{state}\n{}",
            read_console()
        );
        if state == "degraded" {
            eprintln!(
                "note: the container booted degraded; failed units:\n{}",
                machine.ok("systemctl --failed --no-legend || true")
            );
        }
        machine
    }

    /// Runs `script` with `sh -e` inside the container (all its namespaces), with a clean
    /// environment.
    fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a"])
            .args([
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
            ])
            .args(["sh", "-ec", script])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// [`Machine::sh`], asserting success; its stdout.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the container: {script}\n{}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `content` to `path` in the container.
    fn write(&self, path: &str, content: &str) {
        let mut child = Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a"])
            .args([
                "sh",
                "-ec",
                &format!("mkdir -p \"$(dirname '{path}')\"; cat > '{path}'"),
            ])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(content.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "write {path}");
    }

    /// `systemctl show -p NAME --value UNIT`.
    fn show(&self, unit: &str, property: &str) -> String {
        self.ok(&format!("systemctl show -p {property} --value {unit}"))
            .trim()
            .to_string()
    }

    /// What the processes of `unit` logged (not systemd's lines about it), one entry a
    /// line.
    fn journal(&self, unit: &str) -> String {
        // --sync: journald first takes in what the streams still hold.
        self.ok(&format!(
            "journalctl --sync\njournalctl --no-pager -q -o cat _SYSTEMD_UNIT={unit}"
        ))
    }

    /// A mark in the journal, for [`Machine::logged_since`]: the cursor of an entry
    /// written now by another program than vmsync.
    fn cursor(&self) -> String {
        self.ok(
            "echo mark | systemd-cat -t vmsync-test-mark\njournalctl --sync\n\
             journalctl -q -n 1 -o export -t vmsync-test-mark | sed -n 's/^__CURSOR=//p'",
        )
        .trim()
        .to_string()
    }

    /// What vmsync processes logged after `cursor`, one entry a line. By program name:
    /// a run that exits at once (a held lock) may be gone before journald looks up its
    /// unit and invocation.
    fn logged_since(&self, cursor: &str) -> String {
        self.logged_at("debug", &format!("-t vmsync --cursor='{cursor}'"))
    }

    /// The entries matching `filter` (journalctl matches and options) at `priority` or
    /// more urgent (`err`, `warning`): vmsync gives journald each line's priority.
    fn logged_at(&self, priority: &str, filter: &str) -> String {
        self.ok(&format!(
            "journalctl --sync\njournalctl --no-pager -q -o cat -p {priority} {filter}"
        ))
    }

    /// state.json, `null` when missing.
    fn record(&self) -> serde_json::Value {
        let out = self.sh("cat /var/lib/vmsync/state.json");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// deploy/README.md, "systemd": the binary, the config, the units, daemon-reload.
    fn install_vmsync(&self, config: &str) {
        self.ok("install -m 0755 /mnt/vmsync/vmsync /usr/bin/vmsync\n\
             install -d -m 0755 /etc/vmsync");
        self.write("/etc/vmsync/config.toml", config);
        self.ok("cd /mnt/vmsync/checkout\n\
             install -m 0644 deploy/systemd/vmsync.service deploy/systemd/vmsync.timer \\\n\
                 deploy/systemd/vmsync-agent.service deploy/systemd/vmsync-shutdown.service \\\n\
                 /etc/systemd/system/\n\
             systemctl daemon-reload");
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.sh("systemctl poweroff --no-block");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "the container did not power off; killing it\n{}",
            std::fs::read_to_string(&self.console).unwrap_or_default()
        );
        let _ = Command::new("kill")
            .args(["-KILL", &self.leader.to_string()])
            .status();
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The binds every test needs: the binary this build made and the checkout (for the
/// unit files), read-only.
fn vmsync_binds() -> Vec<Bind> {
    vec![
        (
            PathBuf::from(env!("CARGO_BIN_EXE_vmsync")),
            "/mnt/vmsync/vmsync".into(),
            true,
        ),
        (
            checkout().to_path_buf(),
            "/mnt/vmsync/checkout".into(),
            true,
        ),
    ]
}

fn machine_name(test: &str) -> String {
    format!("vmsync-{}-{test}", std::process::id())
}

fn vm(name: &str, disk: &str, extra: &str) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\nxml = \"{name}.xml\"\n{extra}\n  [[vm.disk]]\n  path = \"{disk}\"\n  size = \"64M\"\n"
    )
}

/// The host's libvirt socket(s), bound into a container at the same path.
fn libvirt_socket_binds() -> Vec<Bind> {
    let sockets: Vec<&str> = ["/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock"]
        .into_iter()
        .filter(|s| Path::new(s).exists())
        .collect();
    assert!(
        !sockets.is_empty(),
        "qemu:///system answers, but through no socket in /run/libvirt"
    );
    sockets
        .into_iter()
        .map(|s| (PathBuf::from(s), s.to_string(), false))
        .collect()
}

/// Boot and shutdown of a dependency graph (router <- db <- app) under the shipped
/// units: enabled `vmsync-agent.service` and `vmsync-shutdown.service`, started together
/// as at boot (the host's libvirtd is up: the agent's first sync) start the graph in order, libvirt's autostart flags off; stopping
/// `vmsync-shutdown.service` (as at host shutdown) stops app, db, router, in that order.
#[test]
fn units_start_a_dependency_graph_in_order_and_stop_it_in_reverse() {
    let Some(tree) = tree() else { return };
    if !common::libvirtd_available() {
        return;
    }
    let (prefix, images, _cleanup) = common::scratch("sdorder");
    let kind = if Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "qemu"
    };
    let names: Vec<String> = ["router", "db", "app"]
        .iter()
        .map(|s| format!("{prefix}-{s}"))
        .collect();
    let repo = Repo::new();
    let mut manifest = "version = 1\n".to_string();
    for (i, name) in names.iter().enumerate() {
        let disk = images.join(format!("{name}.qcow2"));
        let deps = match i {
            0 => String::new(),
            _ => format!("depends_on = [\"{}\"]\n", names[i - 1]),
        };
        manifest += &vm(
            name,
            &disk.display().to_string(),
            &format!("autostart = true\nshutdown_timeout = \"2s\"\n{deps}"),
        );
        repo.write(&format!("{name}.xml"), &bios_xml(name, kind, &disk, 128));
    }
    repo.write("vmsync.toml", &manifest);
    repo.commit("a graph");
    let mut binds = vmsync_binds();
    binds.push((repo.path().to_path_buf(), "/srv/vm-repo".into(), true));
    let images_inside = images.display().to_string();
    binds.push((images.clone(), images_inside.clone(), false));
    binds.extend(libvirt_socket_binds());
    let m = Machine::boot(&tree, &machine_name("order"), &binds);
    m.install_vmsync(&format!(
        "[source]\nurl = \"/srv/vm-repo\"\n[libvirt]\nuri = \"qemu:///system\"\n\
         [agent]\nhost = \"hv1\"\nschedule = \"0 0 0 1 1 *\"\njitter_seconds = 0\n\
         [policy]\ndisk_roots = [\"{images_inside}\"]\n"
    ));
    let events = common::events::Events::start();
    let since = chrono::Utc::now();
    // Enabled and started together, as at boot (the shutdown unit first: Before=).
    m.ok(
        "systemctl enable vmsync-agent.service vmsync-shutdown.service\n\
          systemctl start vmsync-agent.service vmsync-shutdown.service",
    );
    let started = wait_for(
        "the graph started",
        Duration::from_secs(90),
        || events.order(&names, "Started", since),
        || {
            format!(
                "{}\n{}\nevents: {:#?}",
                m.ok("systemctl status --no-pager vmsync-agent.service || true"),
                m.ok("journalctl --no-pager -b | grep -i vmsync | tail -40 || true"),
                events.of("")
            )
        },
    );
    eprintln!("start order under the units: {started:?}");
    assert_eq!(started, names, "router, db, app");
    assert_eq!(m.show("vmsync-shutdown.service", "ActiveState"), "active");
    for name in &names {
        let info = common::virsh_system_ok(&["dominfo", name]);
        assert!(
            info.lines()
                .any(|l| l.starts_with("Autostart:") && l.ends_with("disable")),
            "{name}: libvirt's autostart stays off\n{info}"
        );
    }

    // Host shutdown: the agent stops first (Before=), then `vmsync shutdown` runs as the
    // shutdown unit's stop.
    let since = chrono::Utc::now();
    m.ok("systemctl stop vmsync-agent.service vmsync-shutdown.service");
    let stopped = wait_for(
        "the graph stopped",
        Duration::from_secs(60),
        || events.order(&names, "Stopped", since),
        || m.journal("vmsync-shutdown.service"),
    );
    let mut reversed = names.clone();
    reversed.reverse();
    eprintln!("shutdown order under the units: {stopped:?}");
    assert_eq!(stopped, reversed, "app, db, router");
    let log = m.journal("vmsync-shutdown.service");
    assert!(log.contains("still running after 2s, destroyed"), "{log}");
    assert_eq!(
        m.show("vmsync-shutdown.service", "Result"),
        "success",
        "{log}"
    );
}

#[test]
fn oneshot_and_timer_apply_commits_in_the_sandbox() {
    let Some(tree) = tree() else { return };
    let started = Instant::now();
    let repo = Repo::new();
    let (a_disk, b_disk) = (
        "/var/lib/libvirt/images/sd-a.qcow2",
        "/srv/vm-disks/sd-b.qcow2",
    );
    let commit = |memory: u32, message: &str| {
        repo.write(
            "vmsync.toml",
            &format!(
                "version = 1\n{}{}",
                vm("sd-a", a_disk, "autostart = true"),
                vm("sd-b", b_disk, "")
            ),
        );
        repo.write(
            "sd-a.xml",
            &bios_xml("sd-a", "kvm", Path::new(a_disk), memory),
        );
        repo.write("sd-b.xml", &bios_xml("sd-b", "kvm", Path::new(b_disk), 128));
        repo.commit(message)
    };
    let c1 = commit(128, "two vms");
    let mut binds = vmsync_binds();
    binds.push((repo.path().to_path_buf(), "/srv/vm-repo".into(), true));
    let m = Machine::boot(&tree, &machine_name("oneshot"), &binds);
    m.install_vmsync(
        "[source]\nurl = \"/srv/vm-repo\"\n[libvirt]\nuri = \"test:///default\"\n\
         [agent]\nhost = \"hv1\"\n\
         [policy]\ndisk_roots = [\"/var/lib/libvirt/images\", \"/srv/vm-disks\"]\n",
    );
    m.ok("install -d -m 0755 /srv/vm-disks");

    // An extra disk root without its ReadWritePaths= line: read-only in the sandbox.
    let before = m.cursor();
    let run = m.sh("systemctl start vmsync.service");
    assert!(!run.status.success());
    assert_eq!(m.show("vmsync.service", "Result"), "exit-code");
    assert_eq!(m.show("vmsync.service", "ExecMainStatus"), "1");
    let log = m.logged_since(&before);
    assert!(log.contains("Read-only file system"), "{log}");
    // At priority err: the failure, not the INFO lines around it.
    // (--cursor: from the mark, which is not vmsync's; journalctl 252 with a match and
    // --after-cursor leaves out the first entry that matches.)
    let errors = m.logged_at("err", &format!("-t vmsync --cursor='{before}'"));
    assert!(errors.contains("Read-only file system"), "{errors}");
    assert!(!errors.contains(" INFO "), "{errors}");
    m.ok("test -f /var/lib/libvirt/images/sd-a.qcow2 && ! test -e /srv/vm-disks/sd-b.qcow2");

    // The README's drop-in for extra disk roots.
    m.write(
        "/etc/systemd/system/vmsync.service.d/disk-roots.conf",
        "[Service]\nReadWritePaths=/srv/vm-disks\n",
    );
    let before = m.cursor();
    m.ok("systemctl daemon-reload\nsystemctl reset-failed vmsync.service\nsystemctl start vmsync.service");
    assert_eq!(m.show("vmsync.service", "Result"), "success");
    assert_eq!(m.record()["last_applied_commit"], c1.as_str());
    let info = m.ok("qemu-img info --output=json /srv/vm-disks/sd-b.qcow2");
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    // Under journald: no colour codes, and each diff line is an entry with its fields.
    let log = m.logged_since(&before);
    assert!(!log.contains('\x1b'), "{log:?}");
    let diff: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("definition diff"))
        .collect();
    assert!(diff.len() > 5, "{log}");
    assert!(diff.iter().all(|l| l.contains(" vm=sd-")), "{log}");

    // Another vmsync holds the lock: exit 75, a success, logged at INFO.
    let before = m.cursor();
    m.ok("flock /var/lib/vmsync/lock systemctl start vmsync.service");
    assert_eq!(m.show("vmsync.service", "Result"), "success");
    let log = m.logged_since(&before);
    // (systemd 252 clears ExecMainStatus once a oneshot ends well: vmsync's word.)
    assert!(log.contains("exit_status=75"), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("another vmsync is running"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(" INFO "), "{line}");
    assert!(!log.contains("ERROR"), "{log}");

    // The timer, with short intervals (README: "Other intervals"), applies new commits.
    m.write(
        "/etc/systemd/system/vmsync.timer.d/test.conf",
        "[Timer]\nOnBootSec=\nOnActiveSec=1s\nOnUnitActiveSec=2s\nRandomizedDelaySec=0\nAccuracySec=100ms\n",
    );
    let c2 = commit(256, "more memory");
    m.ok("systemctl daemon-reload\nsystemctl enable --now vmsync.timer");
    let applied_by_timer = |commit: &str| {
        wait_for(
            &format!("a timer's run to apply {commit}"),
            Duration::from_secs(30),
            || (m.record()["last_applied_commit"] == commit).then_some(()),
            || m.journal("vmsync.service"),
        )
    };
    applied_by_timer(&c2);
    // ...and again, OnUnitActiveSec= after the last run.
    applied_by_timer(&commit(384, "even more"));
    assert_eq!(m.show("vmsync.timer", "ActiveState"), "active");
    assert_eq!(m.show("vmsync.service", "Result"), "success");
    eprintln!(
        "oneshot and timer: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn agent_reports_status_reloads_and_stops_during_a_guest_shutdown() {
    let Some(tree) = tree() else { return };
    if !common::libvirtd_available() {
        return;
    }
    let started = Instant::now();
    let (prefix, images, _cleanup) = common::scratch("sd");
    let name = format!("{prefix}-a");
    let disk = images.join("a.qcow2");
    let kind = if Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "qemu"
    };
    let repo = Repo::new();
    let commit = |memory: u32, extra: &str, message: &str| {
        repo.write(
            "vmsync.toml",
            &format!(
                "version = 1\n{}",
                vm(&name, &disk.display().to_string(), extra)
            ),
        );
        repo.write(
            &format!("{name}.xml"),
            &bios_xml(&name, kind, &disk, memory),
        );
        repo.commit(message)
    };
    let c1 = commit(128, "autostart = true", "one vm");
    let mut binds = vmsync_binds();
    binds.push((repo.path().to_path_buf(), "/srv/vm-repo".into(), true));
    // The host's libvirtd sees the disks at the same path.
    let images_inside = images.display().to_string();
    binds.push((images.clone(), images_inside.clone(), false));
    // The monolithic daemon's socket or the modular one's, whichever this host has.
    binds.extend(libvirt_socket_binds());
    let m = Machine::boot(&tree, &machine_name("agent"), &binds);
    m.install_vmsync(&format!(
        "[source]\nurl = \"/srv/vm-repo\"\n[libvirt]\nuri = \"qemu:///system\"\n\
         [agent]\nhost = \"hv1\"\n# Only start and SIGHUP sync in this test.\n\
         schedule = \"0 0 0 1 1 *\"\njitter_seconds = 0\n\
         [policy]\ndisk_roots = [\"{images_inside}\"]\n\
         [webhook]\nlisten = \"127.0.0.1:0\"\nsecret_file = \"/etc/vmsync/webhook-secret\"\n"
    ));
    m.write("/etc/vmsync/webhook-secret", "gitlab-token\n");
    m.ok("chmod 600 /etc/vmsync/webhook-secret");
    let agent = "vmsync-agent.service";
    let status = || m.show(agent, "StatusText");
    let converged_at = |commit: &str| {
        let short = &commit[..12];
        wait_for(
            &format!("STATUS= converged at {short}"),
            Duration::from_secs(60),
            || {
                status()
                    .starts_with(&format!("converged at {short} "))
                    .then_some(())
            },
            || format!("status: {}\n{}", status(), m.journal(agent)),
        )
    };

    // Starting the daemon stops the timer (Conflicts=); a notify unit's start returns
    // once vmsync sent READY=1.
    m.ok("systemctl enable --now vmsync.timer");
    m.ok("systemctl enable --now vmsync-agent.service");
    assert_eq!(m.show("vmsync.timer", "ActiveState"), "inactive");
    assert_eq!(m.show(agent, "ActiveState"), "active");
    assert_eq!(m.show(agent, "SubState"), "running");
    converged_at(&c1);
    assert_eq!(common::virsh_system_ok(&["domstate", &name]), "running");
    assert!(disk.exists());

    // The webhook listens in the sandbox (the container shares the host's network): a
    // push with GitLab's token syncs the new commit.
    let journal = m.journal(agent);
    let listen = journal
        .lines()
        .find_map(|l| l.split("webhook listening listen=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no webhook listener:\n{journal}"))
        .to_string();
    let pushed = commit(192, "autostart = true", "pushed");
    let body = format!(r#"{{"ref":"refs/heads/main","after":"{pushed}"}}"#);
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .args([
            "-H",
            "X-Gitlab-Token: gitlab-token",
            "-H",
            "X-Gitlab-Event: Push Hook",
        ])
        .args(["--data-binary", &body])
        .arg(format!("http://{listen}/hooks/push"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "202", "{out:?}");
    converged_at(&pushed);
    assert!(
        m.journal(agent)
            .contains("sync started trigger=\"webhook\"")
    );

    // `systemctl reload`: SIGHUP, re-read the config, sync now.
    let c2 = commit(256, "autostart = true", "more memory");
    m.ok("systemctl reload vmsync-agent.service");
    converged_at(&c2);
    assert!(m.journal(agent).contains("SIGHUP: reloaded the config"));

    // Stop while the guest is asked to shut down: it boots no OS and ignores ACPI, and
    // its shutdown timeout (10 min) is far beyond TimeoutStopSec.
    let c3 = commit(
        256,
        "autostart = false\nstate = \"stopped\"\nshutdown_timeout = \"10min\"",
        "stop it",
    );
    m.ok("systemctl reload vmsync-agent.service");
    wait_for(
        "the graceful shutdown request",
        Duration::from_secs(60),
        || {
            m.journal(agent)
                .contains("graceful shutdown requested")
                .then_some(())
        },
        || m.journal(agent),
    );
    let stopping = Instant::now();
    m.ok("systemctl stop vmsync-agent.service");
    let stop_took = stopping.elapsed();
    let log = m.journal(agent);
    assert!(stop_took < Duration::from_secs(10), "{stop_took:?}\n{log}");
    assert_eq!(m.show(agent, "Result"), "success", "{log}");
    assert_eq!(m.show(agent, "ActiveState"), "inactive");
    assert_eq!(m.show(agent, "ExecMainStatus"), "0");
    assert_eq!(m.show(agent, "NRestarts"), "0");
    assert!(
        log.contains("no longer waiting for the guest to shut down"),
        "{log}"
    );
    // A stop request is no error: warnings, nothing at priority err.
    let unit = format!("_SYSTEMD_UNIT={agent}");
    let warnings = m.logged_at("warning", &unit);
    assert!(warnings.contains("no longer waiting"), "{warnings}");
    assert_eq!(m.logged_at("err", &unit), "", "{log}");
    // The record says what happened: the stop not done, autostart cleared.
    let r = m.record();
    assert_eq!(r["last_attempted_commit"], c3.as_str(), "{r}");
    assert_eq!(r["last_applied_commit"], c2.as_str(), "{r}");
    assert_eq!(
        r["vms"][&name]["last_error"],
        vmsync::host::power::SHUTDOWN_INTERRUPTED,
        "{r}"
    );
    assert_eq!(r["vms"][&name]["autostart"], false, "{r}");
    assert_eq!(common::virsh_system_ok(&["domstate", &name]), "running");
    let dominfo = common::virsh_system_ok(&["dominfo", &name]);
    assert!(
        dominfo
            .lines()
            .any(|l| l.starts_with("Autostart:") && l.ends_with("disable")),
        "{dominfo}"
    );
    // ...so the next run finds no drift.
    let status_json: serde_json::Value =
        serde_json::from_str(&m.ok("vmsync status --json")).unwrap();
    assert_eq!(
        status_json["vms"][0]["drift"],
        serde_json::json!([]),
        "{status_json}"
    );
    let plan = m.ok("vmsync plan");
    assert!(!plan.contains("drift"), "{plan}");
    // Under journald: every entry is a whole event (level, message, fields), no colour.
    for line in log.lines() {
        assert!(
            [" INFO ", " WARN ", "ERROR ", "DEBUG "]
                .iter()
                .any(|level| line.contains(level)),
            "an entry without its event: {line:?}\n{log}"
        );
    }
    assert!(!log.contains('\x1b'), "{log:?}");

    // The oneshot stopped the same way: exit 143, a success for the unit.
    let before = m.cursor();
    m.ok("systemctl start --no-block vmsync.service");
    wait_for(
        "the oneshot's graceful shutdown request",
        Duration::from_secs(60),
        || {
            m.logged_since(&before)
                .contains("graceful shutdown requested")
                .then_some(())
        },
        || m.journal("vmsync.service"),
    );
    let stopping = Instant::now();
    m.ok("systemctl stop vmsync.service");
    let oneshot_stop_took = stopping.elapsed();
    let log = m.logged_since(&before);
    assert!(oneshot_stop_took < Duration::from_secs(10), "{log}");
    assert_eq!(m.show("vmsync.service", "Result"), "success", "{log}");
    assert_eq!(m.show("vmsync.service", "ExecMainStatus"), "143", "{log}");
    assert_eq!(
        m.record()["vms"][&name]["last_error"],
        vmsync::host::power::SHUTDOWN_INTERRUPTED
    );
    eprintln!(
        "agent: {:.1} s; stop during a guest shutdown: agent {} ms, oneshot {} ms",
        started.elapsed().as_secs_f64(),
        stop_took.as_millis(),
        oneshot_stop_took.as_millis()
    );
}

#[test]
fn agent_whose_sync_hangs_is_restarted_by_the_systemd_watchdog() {
    let Some(tree) = tree() else { return };
    // A git server that accepts connections and never answers: the container shares the
    // host's network, and the kernel completes the handshake for the listener's backlog.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hung.local_addr().unwrap().port();
    let m = Machine::boot(&tree, &machine_name("watchdog"), &vmsync_binds());
    m.install_vmsync(&format!(
        "[source]\nurl = \"http://127.0.0.1:{port}/vms.git\"\n[libvirt]\nuri = \"test:///default\"\n\
         [agent]\nhost = \"hv1\"\ntick_timeout = \"3s\"\n"
    ));
    // The shipped unit's WatchdogSec=, shortened for the test.
    m.write(
        "/etc/systemd/system/vmsync-agent.service.d/watchdog.conf",
        "[Service]\nWatchdogSec=2s\nRestartSec=1s\n",
    );
    m.ok("systemctl daemon-reload\nsystemctl start vmsync-agent.service");
    assert_eq!(m.show("vmsync-agent.service", "WatchdogUSec"), "2s");
    // The first sync hangs in the fetch; past tick_timeout the pings stop, systemd kills
    // the daemon and starts it again.
    wait_for(
        "systemd to restart the hung daemon",
        Duration::from_secs(60),
        || {
            let restarts: u32 = m.show("vmsync-agent.service", "NRestarts").parse().ok()?;
            (restarts >= 1).then_some(())
        },
        || m.journal("vmsync-agent.service"),
    );
    let log = m.journal("vmsync-agent.service");
    assert!(log.contains("systemd watchdog on"), "{log}");
    assert!(
        log.contains("longer than [agent] tick_timeout: no more watchdog pings"),
        "{log}"
    );
    let systemd_log =
        m.ok("journalctl --sync\njournalctl --no-pager -q -o cat -u vmsync-agent.service");
    assert!(systemd_log.contains("Watchdog timeout"), "{systemd_log}");
    drop(hung);
}
