//! The deployment files we ship are checked with the tools that will read them:
//! `systemd-analyze verify` for the systemd units, `nix-instantiate --parse` for the NixOS
//! module and package, plus the facts the docs promise about them (oneshot vs notify,
//! state directory, sandbox, ordering after libvirt). The NixOS module is also evaluated
//! as on a host, with the module system in tests/nixos/ (see "NixOS" below).
//!
//! Neither tool is optional: when one is missing the test fails and says which package to
//! install (`scripts/setup-host.sh` installs both). A silently skipped check is no check.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNITS: [&str; 4] = [
    "vmsync.service",
    "vmsync.timer",
    "vmsync-agent.service",
    "vmsync-shutdown.service",
];
/// Every Nix file shipped, and those the tests below evaluate it with.
const NIX_FILES: [&str; 8] = [
    "flake.nix",
    "deploy/nixos/module.nix",
    "deploy/nixos/package.nix",
    "tests/nixos/flake-outputs.nix",
    "tests/nixos/lib.nix",
    "tests/nixos/pkgs.nix",
    "tests/nixos/nixos.nix",
    "tests/nixos/eval.nix",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs a tool; a missing tool fails the test with the package that provides it.
fn run(cmd: &mut Command, tool: &str, package: &str) -> Output {
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{tool}` not found: install {package} (scripts/setup-host.sh does)")
        }
        Err(e) => panic!("cannot run `{tool}`: {e}"),
    }
}

/// The `Key=value` lines of one section (comments and blank lines dropped).
fn directives<'a>(unit: &'a str, section: &str) -> Vec<(&'a str, &'a str)> {
    let header = format!("[{section}]");
    let mut inside = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == header;
        } else if inside && !line.is_empty() && !line.starts_with('#') {
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not a directive: {line}"));
            out.push((k.trim(), v.trim()));
        }
    }
    out
}

/// All values of `key` in `section`, each split on whitespace and joined (systemd's list
/// directives add up over repeated lines).
fn values(unit: &str, section: &str, key: &str) -> Vec<String> {
    directives(unit, section)
        .into_iter()
        .filter(|(k, _)| *k == key)
        .flat_map(|(_, v)| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

fn single(unit: &str, section: &str, key: &str) -> String {
    let all: Vec<&str> = directives(unit, section)
        .into_iter()
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(all.len(), 1, "{key}= in [{section}]: {all:?}");
    all[0].to_string()
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_vmsync");
    // `verify` checks that ExecStart= exists and is executable: point it at the binary
    // this test run built instead of /usr/bin/vmsync. The timer's service sits beside it.
    let mut paths: Vec<PathBuf> = Vec::new();
    for name in UNITS {
        let text = read(&format!("deploy/systemd/{name}"));
        let rewritten = text
            .replace("ExecStart=/usr/bin/vmsync", &format!("ExecStart={bin}"))
            .replace("ExecStop=/usr/bin/vmsync", &format!("ExecStop={bin}"));
        if name.ends_with(".service") {
            assert_ne!(rewritten, text, "{name}: no Exec*=/usr/bin/vmsync");
        }
        let path = dir.path().join(name);
        std::fs::write(&path, rewritten).unwrap();
        paths.push(path);
    }

    assert_units_verify(dir.path(), &paths, false);
}

/// `systemd-analyze verify` of the units at `paths` (in `dir`; with `dir` on the unit
/// search path when `search_dir`) passes and says nothing about them. Unknown keys and
/// unparsable values are only warnings (exit status 0), so the output must also be
/// clean. Lines about other units of the host (possible on a real system or in a
/// container) are not ours to judge.
fn assert_units_verify(dir: &Path, paths: &[PathBuf], search_dir: bool) {
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify")
        .args(paths)
        .env_remove("SYSTEMD_LOG_LEVEL");
    if search_dir {
        cmd.env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()));
    }
    let out = run(&mut cmd, "systemd-analyze", "systemd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir_str = dir.display().to_string();
    let ours: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .filter(|l| l.contains(&dir_str) || l.contains("vmsync"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

#[test]
fn nix_files_parse() {
    for name in NIX_FILES {
        let path = repo().join(name);
        let out = nix(Command::new("nix-instantiate").arg("--parse").arg(&path));
        assert!(
            out.status.success(),
            "nix-instantiate --parse {}: {}\n{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn oneshot_service_runs_once_and_tolerates_a_held_lock() {
    let unit = read("deploy/systemd/vmsync.service");
    assert_eq!(single(&unit, "Service", "Type"), "oneshot");
    assert_eq!(
        single(&unit, "Service", "ExecStart"),
        "/usr/bin/vmsync --once"
    );
    // 75: lock held; 143: stopped by SIGTERM (`vmsync --once` exits 128 + 15).
    assert_eq!(values(&unit, "Service", "SuccessExitStatus"), ["75", "143"]);
    // Started by the timer, never enabled on its own.
    assert!(directives(&unit, "Install").is_empty());
}

#[test]
fn agent_service_is_a_notify_daemon_in_its_own_mode() {
    let unit = read("deploy/systemd/vmsync-agent.service");
    assert_eq!(single(&unit, "Service", "Type"), "notify");
    assert_eq!(single(&unit, "Service", "ExecStart"), "/usr/bin/vmsync");
    // The shell's kill: /bin/kill (procps) is missing on minimal installs.
    assert_eq!(
        single(&unit, "Service", "ExecReload"),
        "/bin/sh -c \"kill -HUP ${MAINPID}\""
    );
    assert_eq!(single(&unit, "Service", "Restart"), "on-failure");
    let conflicts = values(&unit, "Unit", "Conflicts");
    assert!(
        conflicts.iter().any(|u| u == "vmsync.timer"),
        "{conflicts:?}"
    );
    assert_eq!(values(&unit, "Install", "WantedBy"), ["multi-user.target"]);
}

#[test]
fn both_services_stop_after_the_action_in_flight() {
    for name in ["vmsync.service", "vmsync-agent.service"] {
        let unit = read(&format!("deploy/systemd/{name}"));
        // SIGTERM to vmsync alone: a qemu-img it runs finishes with the action.
        assert_eq!(single(&unit, "Service", "KillMode"), "mixed", "{name}");
        // Set, not the 90 s default, and below the default 120 s shutdown timeout:
        // the stop no longer waits for a guest's shutdown.
        assert_eq!(single(&unit, "Service", "TimeoutStopSec"), "60s", "{name}");
    }
}

#[test]
fn shutdown_service_runs_vmsync_shutdown_before_libvirtd_stops() {
    let unit = read("deploy/systemd/vmsync-shutdown.service");
    assert_eq!(single(&unit, "Service", "Type"), "oneshot");
    assert_eq!(single(&unit, "Service", "RemainAfterExit"), "yes");
    assert_eq!(single(&unit, "Service", "ExecStart"), "/bin/true");
    assert_eq!(
        single(&unit, "Service", "ExecStop"),
        "/usr/bin/vmsync shutdown"
    );
    // Units stop in the reverse order of After=: before libvirtd and libvirt-guests,
    // after the sync units (Before=).
    let after = values(&unit, "Unit", "After").join(" ");
    for dep in [
        "libvirtd.service",
        "virtqemud.service",
        "libvirt-guests.service",
    ] {
        assert!(
            after.split(' ').any(|u| u == dep),
            "After= lacks {dep}: {after}"
        );
    }
    let before = values(&unit, "Unit", "Before").join(" ");
    for dep in ["vmsync.service", "vmsync-agent.service"] {
        assert!(
            before.split(' ').any(|u| u == dep),
            "Before= lacks {dep}: {before}"
        );
    }
    assert_eq!(single(&unit, "Install", "WantedBy"), "multi-user.target");
}

#[test]
fn timer_schedules_the_oneshot_service() {
    let unit = read("deploy/systemd/vmsync.timer");
    // At boot, as soon as vmsync.service's After= (libvirt, network) allow.
    assert_eq!(single(&unit, "Timer", "OnBootSec"), "1s");
    assert_eq!(single(&unit, "Timer", "OnUnitActiveSec"), "5min");
    assert_eq!(single(&unit, "Timer", "RandomizedDelaySec"), "30s");
    assert_eq!(single(&unit, "Timer", "Unit"), "vmsync.service");
    assert_eq!(values(&unit, "Install", "WantedBy"), ["timers.target"]);
}

#[test]
fn both_services_are_ordered_after_libvirt_and_sandboxed_alike() {
    let oneshot = read("deploy/systemd/vmsync.service");
    let agent = read("deploy/systemd/vmsync-agent.service");
    for (name, unit) in [
        ("vmsync.service", &oneshot),
        ("vmsync-agent.service", &agent),
    ] {
        let after = values(unit, "Unit", "After");
        for dep in [
            "libvirtd.service",
            "virtqemud.service",
            "network-online.target",
        ] {
            assert!(after.iter().any(|u| u == dep), "{name}: After= {after:?}");
        }
        assert_eq!(
            single(unit, "Service", "StateDirectory"),
            "vmsync",
            "{name}"
        );
        assert_eq!(single(unit, "Service", "ProtectSystem"), "strict", "{name}");
        assert_eq!(single(unit, "Service", "NoNewPrivileges"), "yes", "{name}");
        assert_eq!(single(unit, "Service", "ProtectHome"), "yes", "{name}");
        // ProtectHome=yes hides /root: libgit2's known_hosts must come from the state dir.
        assert_eq!(
            values(unit, "Service", "Environment"),
            ["HOME=/var/lib/vmsync"],
            "{name}"
        );
        // The default disk root must be writable under ProtectSystem=strict.
        let rw = values(unit, "Service", "ReadWritePaths");
        assert!(
            rw.iter().any(|p| p == "-/var/lib/libvirt/images"),
            "{name}: ReadWritePaths= {rw:?}"
        );
    }
    // The sandbox is one block, copied: the two must not drift apart.
    let sandbox = |unit: &str| -> Vec<(String, String)> {
        directives(unit, "Service")
            .into_iter()
            .skip_while(|(k, _)| *k != "Environment")
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(sandbox(&oneshot), sandbox(&agent));
    assert!(sandbox(&oneshot).len() > 20, "{:?}", sandbox(&oneshot));
}

// ---- NixOS -----------------------------------------------------------------------------
//
// deploy/nixos/module.nix is evaluated as on a host: tests/nixos/lib.nix is a small module
// system that behaves like nixpkgs' (typed options that refuse a wrong value, unknown
// options refused, priorities, mkIf/mkMerge, submodules, freeformType), nixos.nix the
// NixOS modules the module meets (assertions, systemd units and tmpfiles, polkit, libvirtd
// with its polkit assertion), pkgs.nix the few packages involved. nixpkgs itself cannot be
// fetched here; `nixos_evaluator_follows_nixpkgs_module_semantics` pins the behaviour the
// tests rely on.

/// Runs a nix command with state, store, log and config directories of its own. Nix
/// creates its state directories (db, gcroots, profiles) on first use, and two tests doing
/// that at once on a fresh machine raced: "creating symlink from
/// '/nix/var/nix/gcroots/profiles' ... File exists", "schema is corrupt", "SQLite database
/// is busy". Private directories leave nothing to share, and nothing of the host's /nix
/// is touched.
fn nix(cmd: &mut Command) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(
        cmd.env("NIX_STATE_DIR", d.join("var"))
            .env("NIX_STORE_DIR", d.join("store"))
            .env("NIX_LOG_DIR", d.join("log"))
            .env("NIX_CONF_DIR", d.join("etc"))
            .env("XDG_CACHE_HOME", d.join("cache"))
            // No nixbld group on a test host: keep its warning out of stderr.
            .env("NIX_CONFIG", "build-users-group ="),
        "nix-instantiate",
        "nix-bin",
    )
}

/// A Nix path expression for an absolute path (quoted: safe with any characters).
fn nix_path(path: &Path) -> String {
    format!(
        "(/. + {})",
        serde_json::to_string(&path.display().to_string()).unwrap()
    )
}

/// Evaluates a host configuration file with tests/nixos/eval.nix: the parts of the system
/// configuration the tests read, or nix's error message (failed assertions included).
fn eval_host_file(host: &Path) -> Result<serde_json::Value, String> {
    // --read-write-mode: a host may copy a local checkout into the (private) store, as
    // `"${vmsyncSrc}/deploy/nixos/module.nix"` in deploy/README.md does.
    let out = nix(Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "--read-write-mode"])
        .arg(repo().join("tests/nixos/eval.nix"))
        .args(["--arg", "host"])
        .arg(nix_path(host)));
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A host with vmsync enabled (package from package.nix); `vmsync` goes inside
/// `services.vmsync`, `other` beside it.
fn eval_host(vmsync: &str, other: &str) -> Result<serde_json::Value, String> {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.nix");
    let text = format!(
        "{{ pkgs, lib, ... }}:\n{{\n  imports = [ {} ];\n  services.vmsync = {{\n    enable = true;\n    package = pkgs.callPackage {} {{ }};\n    {vmsync}\n  }};\n  {other}\n}}\n",
        nix_path(&repo().join("deploy/nixos/module.nix")),
        nix_path(&repo().join("deploy/nixos/package.nix")),
    );
    std::fs::write(&host, text).unwrap();
    eval_host_file(&host)
}

fn eval_ok(vmsync: &str, other: &str) -> serde_json::Value {
    eval_host(vmsync, other).unwrap_or_else(|e| panic!("evaluation failed for {vmsync}:\n{e}"))
}

fn eval_err(vmsync: &str, other: &str) -> String {
    match eval_host(vmsync, other) {
        Ok(_) => panic!("evaluation succeeded for {vmsync} {other}"),
        Err(e) => e,
    }
}

const URL: &str = r#"settings.source.url = "file:///srv/vms";"#;

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_str().expect("string").to_string())
        .collect()
}

/// The module's serviceConfig must carry the same sandbox as the shipped unit files
/// (paths aside, which the module derives from the settings).
fn assert_same_sandbox_as_units(service_config: &serde_json::Value) {
    let unit = read("deploy/systemd/vmsync.service");
    let keys: Vec<&str> = directives(&unit, "Service")
        .into_iter()
        .skip_while(|(k, _)| *k != "Environment")
        .map(|(k, _)| k)
        .filter(|k| !["Environment", "ReadWritePaths"].contains(k))
        .collect();
    for key in keys {
        let want = values(&unit, "Service", key);
        let got: Vec<String> = match &service_config[key] {
            serde_json::Value::Bool(b) => vec![if *b { "yes" } else { "no" }.to_string()],
            serde_json::Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
            serde_json::Value::Array(_) => strings(&service_config[key]),
            other => panic!("module.nix serviceConfig.{key}: {other}"),
        };
        assert_eq!(
            got, want,
            "module.nix serviceConfig.{key} differs from the units"
        );
    }
}

#[test]
fn nixos_evaluator_follows_nixpkgs_module_semantics() {
    // Each case: modules, then the expected `config.a` (JSON) or a piece of the error.
    let str_opt = r#"{ options.a = lib.mkOption { type = lib.types.str; default = "default"; }; }"#;
    let list_opt = r#"{ options.a = lib.mkOption { type = lib.types.listOf lib.types.int; default = [ ]; }; }"#;
    let cases: [(String, Result<&str, &str>); 11] = [
        (format!(r#"{str_opt} {{ a = lib.mkDefault "weak"; }}"#), Ok(r#""weak""#)),
        (
            format!(r#"{str_opt} {{ a = lib.mkDefault "weak"; }} {{ a = "plain"; }}"#),
            Ok(r#""plain""#),
        ),
        (
            format!(r#"{str_opt} {{ a = lib.mkForce "forced"; }} {{ a = "plain"; }}"#),
            Ok(r#""forced""#),
        ),
        (
            format!(r#"{str_opt} {{ a = "x"; }} {{ a = "y"; }}"#),
            Err("The option `a' has conflicting definition values"),
        ),
        (
            format!(r#"{list_opt} {{ a = [ 1 ]; }} {{ a = lib.mkMerge [ [ 2 ] (lib.mkIf false [ 3 ]) ]; }}"#),
            Ok("[1,2]"),
        ),
        (
            format!(
                r#"{str_opt} {{ options.c = lib.mkOption {{ type = lib.types.bool; default = true; }}; }} ({{ config, ... }}: {{ a = lib.mkIf config.c "on"; }})"#
            ),
            Ok(r#""on""#),
        ),
        (
            format!(r#"{str_opt} {{ a = 5; }}"#),
            Err("A definition for option `a' is not of type `string'"),
        ),
        (
            format!(r#"{str_opt} {{ b = "x"; }}"#),
            Err("The option `b' does not exist"),
        ),
        (
            r#"{ options.a = lib.mkOption { type = lib.types.submodule { freeformType = lib.types.attrsOf lib.types.str; options.x = lib.mkOption { type = lib.types.int; default = 1; }; }; default = { }; }; } { a.y = "free"; }"#.to_string(),
            Ok(r#"{"x":1,"y":"free"}"#),
        ),
        (
            r#"{ options.a = lib.mkOption { type = lib.types.submodule { options.x = lib.mkOption { type = lib.types.int; }; }; default = { }; }; } { a.y = 1; }"#.to_string(),
            Err("The option `a.y' does not exist"),
        ),
        (
            r#"{ options.a = lib.mkOption { type = lib.types.submodule { options.x = lib.mkOption { type = lib.types.int; }; }; default = { }; }; }"#.to_string(),
            Err("The option `a.x' is used but not defined"),
        ),
    ];
    let lib = nix_path(&repo().join("tests/nixos/lib.nix"));
    for (modules, want) in cases {
        let expr = format!(
            "let lib = import {lib}; in (lib.evalModules {{ modules = [ {modules} ]; }}).config.a"
        );
        let out = nix(
            Command::new("nix-instantiate").args(["--eval", "--strict", "--json", "-E", &expr])
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        match want {
            Ok(json) => {
                assert!(out.status.success(), "{modules}:\n{stderr}");
                let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(
                    got,
                    serde_json::from_str::<serde_json::Value>(json).unwrap(),
                    "{modules}"
                );
            }
            Err(message) => {
                assert!(!out.status.success(), "{modules}: evaluated");
                assert!(stderr.contains(message), "{modules}:\n{stderr}");
            }
        }
    }
}

#[test]
fn nixos_module_evaluates_on_a_headless_host_without_polkit_set() {
    // libvirtd's module asserts polkit, whose default is off: the module turns it on.
    let c = eval_ok(URL, "");
    assert_eq!(c["polkit"]["enable"], true);
    assert_eq!(c["libvirtd"]["enable"], true);
    assert_eq!(c["libvirtd"]["swtpm"], true);
    // Only as a default: a host that forces it off gets libvirtd's assertion, as in nixpkgs.
    let err = eval_err(URL, "security.polkit.enable = lib.mkForce false;");
    assert!(
        err.contains("Failed assertions:") && err.contains("requires Polkit"),
        "{err}"
    );
    // The module's own assertion.
    let err = eval_err("", "");
    assert!(
        err.contains("services.vmsync.settings.source.url must be set"),
        "{err}"
    );
}

#[test]
fn nixos_settings_of_the_wrong_type_fail_evaluation_naming_the_option() {
    for (setting, want) in [
        (
            "settings.agent.schedule = 5;",
            "A definition for option `services.vmsync.settings.agent.schedule' is not of type `non-empty string'",
        ),
        (
            "settings.agent.max_attempts = 0;",
            "A definition for option `services.vmsync.settings.agent.max_attempts' is not of type `integer between 1",
        ),
        (
            "settings.agent.jitter_seconds = -1;",
            "`services.vmsync.settings.agent.jitter_seconds' is not of type `unsigned integer",
        ),
        (
            r#"settings.policy.disk_roots = [ "images" ];"#,
            "`services.vmsync.settings.policy.disk_roots.[definition 1-entry 1]' is not of type `absolute path",
        ),
        (
            r#"settings.policy.disk_roots = [ "/srv/../etc" ];"#,
            "`services.vmsync.settings.policy.disk_roots.[definition 1-entry 1]' is not of type `absolute path",
        ),
        (
            // A Nix path would put the key in the world-readable store.
            "settings.source.ssh_key = ./deploy_key;",
            "`services.vmsync.settings.source.ssh_key' is not of type `null or absolute path",
        ),
        (
            r#"settings.policy.health_commands = [ "checks/" ];"#,
            "`services.vmsync.settings.policy.health_commands.[definition 1-entry 1]' is not of type `absolute path",
        ),
        (
            r#"settings.policy.allow_open_listeners = "no";"#,
            "`services.vmsync.settings.policy.allow_open_listeners' is not of type `boolean'",
        ),
        (
            r#"settings.policy.prune = "yes";"#,
            "`services.vmsync.settings.policy.prune' is not of type `boolean'",
        ),
        (
            r#"settings.agent.host = "";"#,
            "`services.vmsync.settings.agent.host' is not of type `null or non-empty string'",
        ),
    ] {
        let err = eval_err(&format!("{URL} {setting}"), "");
        assert!(err.contains(want), "{setting}:\n{err}");
    }
}

#[test]
fn nixos_unknown_settings_keys_fail_evaluation() {
    for (setting, want) in [
        (
            r#"settings.agent.shedule = "0 */5 * * * *";"#,
            "The option `services.vmsync.settings.agent.shedule' does not exist",
        ),
        (
            r#"settings.sources.branch = "main";"#,
            "The option `services.vmsync.settings.sources' does not exist",
        ),
        (
            "settings.trust.allowed_signer = \"/etc/vmsync/allowed_signers\";",
            "The option `services.vmsync.settings.trust.allowed_signer' does not exist",
        ),
        (
            r#"intervall = "7min";"#,
            "The option `services.vmsync.intervall' does not exist",
        ),
    ] {
        let err = eval_err(&format!("{URL} {setting}"), "");
        assert!(err.contains(want), "{setting}:\n{err}");
    }
}

/// The keys of the agent config: section -> keys, read from the `Raw*` structs of
/// src/config.rs (each `#[serde(deny_unknown_fields)]`).
fn agent_config_keys() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let src = read("src/config.rs");
    let fields = |name: &str| -> Vec<(String, String)> {
        let start = src
            .find(&format!("struct {name} {{"))
            .unwrap_or_else(|| panic!("src/config.rs: no struct {name}"));
        let body = &src[start..];
        let body = &body[body.find('{').unwrap() + 1..body.find("\n}").unwrap()];
        body.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("//"))
            .map(|l| {
                let (k, t) = l.split_once(':').unwrap_or_else(|| panic!("field: {l}"));
                (
                    k.trim().to_string(),
                    t.trim().trim_end_matches(',').to_string(),
                )
            })
            .collect()
    };
    // `notify` is a list of tables (`[[notify]]`), its keys in RawNotify.
    let notify: Vec<String> = {
        let src = read("src/agent/notify/targets.rs");
        let start = src.find("struct RawNotify {").expect("struct RawNotify");
        let body = &src[start..];
        body[body.find('{').unwrap() + 1..body.find("\n}").unwrap()]
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| l.split_once(':').unwrap().0.to_string())
            .collect()
    };
    fields("RawConfig")
        .into_iter()
        .map(|(section, ty)| {
            let keys = if section == "notify" {
                notify
                    .iter()
                    .cloned()
                    .collect::<std::collections::BTreeSet<String>>()
            } else {
                fields(&ty).into_iter().map(|(k, _)| k).collect()
            };
            (section, keys)
        })
        .collect()
}

#[test]
fn nixos_settings_options_are_the_agent_config_keys_and_are_documented() {
    let keys = agent_config_keys();
    assert_eq!(
        keys.keys().collect::<Vec<_>>(),
        [
            "agent", "libvirt", "notify", "policy", "secrets", "source", "trust", "webhook"
        ]
    );
    // One [[notify]] entry, so that its options show.
    let c = eval_ok(
        &format!(r#"{URL} settings.notify = [ {{ url = "https://hooks.example.org/x"; }} ];"#),
        "",
    );
    let settings = c["vmsync"]["settings"].as_object().unwrap();
    // Every option shows in the evaluated settings (unset ones as null).
    let declared: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = settings
        .iter()
        .map(|(s, v)| {
            let table = if s == "notify" { &v[0] } else { v };
            (
                s.clone(),
                table.as_object().unwrap().keys().cloned().collect(),
            )
        })
        .collect();
    assert_eq!(
        declared, keys,
        "module.nix settings options vs src/config.rs"
    );
    // The settings description names every section and key.
    let doc = c["vmsync"]["settingsDescription"].as_str().unwrap();
    let words: std::collections::BTreeSet<&str> = doc
        .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
        .collect();
    for (section, keys) in &keys {
        assert!(
            words.contains(section.as_str()),
            "settings description lacks [{section}]"
        );
        for key in keys {
            assert!(
                words.contains(key.as_str()),
                "settings description lacks {section}.{key}"
            );
        }
    }
}

#[test]
fn nixos_state_dir_is_created_and_opened_in_the_sandbox() {
    // Outside /var/lib: a tmpfiles rule creates it; the sandbox opens it with "-", so a
    // missing directory cannot fail the unit with 226/NAMESPACE.
    let c = eval_ok(
        &format!(r#"{URL} settings.agent.state_dir = "/srv/vmsync";"#),
        "",
    );
    let svc = &c["systemd"]["services"]["vmsync"];
    let sc = &svc["serviceConfig"];
    let rules = strings(&c["systemd"]["tmpfiles"]["rules"]);
    assert!(
        rules.contains(&"d /srv/vmsync 0700 root root -".to_string()),
        "{rules:?}"
    );
    let rw = strings(&sc["ReadWritePaths"]);
    assert_eq!(rw, ["-/var/lib/libvirt/images", "-/srv/vmsync"]);
    assert!(sc.get("StateDirectory").is_none(), "{sc}");
    assert_eq!(svc["environment"]["HOME"], "/srv/vmsync");
    assert_eq!(c["configFile"]["toml"]["agent"]["state_dir"], "/srv/vmsync");

    // Below /var/lib: systemd's StateDirectory= creates and opens it.
    let c = eval_ok(
        &format!(r#"{URL} settings.agent.state_dir = "/var/lib/vmsync-prod"; mode = "daemon";"#),
        "",
    );
    let sc = &c["systemd"]["services"]["vmsync-agent"]["serviceConfig"];
    assert_eq!(sc["StateDirectory"], "vmsync-prod");
    assert_eq!(sc["StateDirectoryMode"], "0700");
    assert_eq!(strings(&sc["ReadWritePaths"]), ["-/var/lib/libvirt/images"]);
    let rules = strings(&c["systemd"]["tmpfiles"]["rules"]);
    assert!(
        rules.contains(&"d /var/lib/vmsync-prod 0700 root root -".to_string()),
        "{rules:?}"
    );
}

#[test]
fn nixos_module_timer_mode_evaluates_to_oneshot_and_timer() {
    let c = eval_ok(&format!(r#"{URL} interval = "7min";"#), "");
    let pkg = c["vmsync"]["package"].as_str().unwrap();
    assert!(pkg.ends_with("-vmsync-0.1.0"), "{pkg}");
    let svc = &c["systemd"]["services"]["vmsync"];
    let sc = &svc["serviceConfig"];
    assert_eq!(sc["Type"], "oneshot");
    assert_eq!(sc["ExecStart"], format!("{pkg}/bin/vmsync --once"));
    assert_eq!(sc["SuccessExitStatus"], serde_json::json!([75]));
    assert_eq!(sc["StateDirectory"], "vmsync");
    assert_eq!(strings(&sc["ReadWritePaths"]), ["-/var/lib/libvirt/images"]);
    assert_same_sandbox_as_units(sc);
    assert_eq!(strings(&svc["requires"]), ["libvirtd.service"]);
    assert!(strings(&svc["after"]).contains(&"libvirtd.service".to_string()));
    // qemu-img from libvirtd's QEMU, ahead of NixOS' default service PATH.
    assert_eq!(svc["path"][0], c["qemu"]);
    assert_eq!(svc["environment"]["HOME"], "/var/lib/vmsync");
    let timer = &c["systemd"]["timers"]["vmsync"];
    assert_eq!(timer["timerConfig"]["OnUnitActiveSec"], "7min");
    assert_eq!(timer["timerConfig"]["OnBootSec"], "1s");
    // orderedShutdown (default on): `vmsync shutdown` when the unit stops, before libvirtd.
    let down = &c["systemd"]["services"]["vmsync-shutdown"];
    assert_eq!(
        down["serviceConfig"]["ExecStop"],
        format!("{pkg}/bin/vmsync shutdown")
    );
    assert_eq!(down["serviceConfig"]["RemainAfterExit"], true);
    assert!(strings(&down["after"]).contains(&"libvirtd.service".to_string()));
    assert!(strings(&down["before"]).contains(&"vmsync.service".to_string()));
    assert_eq!(strings(&down["wantedBy"]), ["multi-user.target"]);
    assert_eq!(strings(&timer["wantedBy"]), ["timers.target"]);
    assert!(c["systemd"]["services"].get("vmsync-agent").is_none());
    let rules = strings(&c["systemd"]["tmpfiles"]["rules"]);
    assert!(
        rules.contains(&"d /var/lib/vmsync 0700 root root -".to_string()),
        "{rules:?}"
    );
    // /etc/vmsync/config.toml: the checked file, with vmsync's defaults written out.
    let source = c["configFile"]["source"].as_str().unwrap();
    assert!(source.ends_with("-vmsync-config.toml"), "{source}");
    let toml = &c["configFile"]["toml"];
    assert_eq!(
        toml["source"],
        serde_json::json!({"url": "file:///srv/vms", "branch": "main"})
    );
    assert_eq!(toml["agent"]["schedule"], "0 */5 * * * *");
    assert!(
        toml["agent"].get("host").is_none(),
        "null keys are left out: {toml}"
    );
}

#[test]
fn nixos_module_daemon_mode_evaluates_to_notify_service() {
    let c = eval_ok(
        &format!(
            r#"{URL} mode = "daemon"; settings.policy.disk_roots = [ "/a" "/b" ];
               settings.agent.metrics_file = "/var/lib/node-exporter/vmsync.prom";
               knownHosts = [ "git.example.org ssh-ed25519 AAAA" ];"#
        ),
        "",
    );
    let pkg = c["vmsync"]["package"].as_str().unwrap();
    assert!(
        c["systemd"]["timers"].get("vmsync").is_none(),
        "{}",
        c["systemd"]["timers"]
    );
    assert!(c["systemd"]["services"].get("vmsync").is_none());
    let svc = &c["systemd"]["services"]["vmsync-agent"];
    let sc = &svc["serviceConfig"];
    assert_eq!(sc["Type"], "notify");
    assert_eq!(sc["ExecStart"], format!("{pkg}/bin/vmsync"));
    assert_eq!(sc["Restart"], "on-failure");
    // The base image directory (default below /var/lib/libvirt/images) is opened too:
    // no disk root covers it here.
    assert_eq!(
        strings(&sc["ReadWritePaths"]),
        [
            "-/a",
            "-/b",
            "-/var/lib/node-exporter",
            "-/var/lib/libvirt/images/vmsync-images"
        ]
    );
    assert_same_sandbox_as_units(sc);
    assert_eq!(strings(&svc["wantedBy"]), ["multi-user.target"]);
    // A changed config.toml reloads the daemon instead of restarting it.
    assert_eq!(
        svc["reloadTriggers"],
        serde_json::json!([c["configFile"]["source"]])
    );
    let rules = strings(&c["systemd"]["tmpfiles"]["rules"]);
    let link = rules
        .iter()
        .find(|r| r.starts_with("L+ /var/lib/vmsync/.ssh/known_hosts - - - - "))
        .unwrap_or_else(|| panic!("{rules:?}"));
    assert!(link.ends_with("-vmsync-known_hosts"), "{link}");
    assert!(rules.contains(&"d /var/lib/vmsync/.ssh 0700 root root -".to_string()));
}

/// Runs the module's config check (a runCommand script) the way the Nix build would:
/// the generated TOML in `$unchecked`, the package's `vmsync` on PATH (here the binary
/// this test run built), a fresh working directory, `$out` to create.
fn run_config_check(c: &serde_json::Value) -> (Output, PathBuf, tempfile::TempDir) {
    let script = c["configFile"]["script"]
        .as_str()
        .unwrap_or_else(|| panic!("no config check: {}", c["configFile"]));
    let dir = tempfile::tempdir().unwrap();
    let unchecked = dir.path().join("vmsync-config.toml");
    std::fs::write(
        &unchecked,
        toml::to_string(&c["configFile"]["toml"]).unwrap(),
    )
    .unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vmsync"), bin.join("vmsync")).unwrap();
    let build = dir.path().join("build");
    std::fs::create_dir(&build).unwrap();
    let out_file = dir.path().join("out");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(&build)
        .env("PATH", path)
        .env("unchecked", &unchecked)
        .env("out", &out_file)
        .output()
        .unwrap();
    (out, out_file, dir)
}

#[test]
fn nixos_config_check_runs_the_package_on_the_generated_file() {
    // A valid file passes and is the output, unchanged; a host's allowed-signers file
    // (absent at build time) does not fail the check.
    let c = eval_ok(
        &format!(r#"{URL} settings.trust.allowed_signers = "/etc/vmsync/allowed_signers";"#),
        "",
    );
    let (out, out_file, dir) = run_config_check(&c);
    assert!(
        out.status.success(),
        "{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&out_file).unwrap(),
        std::fs::read(dir.path().join("vmsync-config.toml")).unwrap()
    );
    // What the option types cannot see: a cron schedule without seconds is a string.
    let c = eval_ok(
        &format!(r#"{URL} settings.agent.schedule = "*/5 * * * *";"#),
        "",
    );
    let (out, out_file, _dir) = run_config_check(&c);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("invalid [agent] schedule '*/5 * * * *'"),
        "{stderr}"
    );
    assert!(!out_file.exists());
    // checkConfig = false: the generated file itself, no check.
    let c = eval_ok(&format!("{URL} checkConfig = false;"), "");
    assert!(c["configFile"]["script"].is_null(), "{}", c["configFile"]);
    assert!(
        c["configFile"]["source"]
            .as_str()
            .unwrap()
            .ends_with("-vmsync-config.toml")
    );
}

#[test]
fn nixos_rendered_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_vmsync");
    let mut paths = Vec::new();
    for (mode, units) in [
        (
            "timer",
            &["vmsync.service", "vmsync.timer", "vmsync-shutdown.service"][..],
        ),
        ("daemon", &["vmsync-agent.service"][..]),
    ] {
        let c = eval_ok(&format!(r#"{URL} mode = "{mode}";"#), "");
        let pkg = c["vmsync"]["package"].as_str().unwrap();
        for name in units {
            let text = c["systemd"]["units"][name]
                .as_str()
                .unwrap_or_else(|| panic!("no unit {name}"));
            // `verify` checks that each Exec*= program exists: the binary of this test run
            // for vmsync, the host's /bin for other store paths (coreutils' kill).
            let store = Path::new(pkg).parent().unwrap().display().to_string();
            let text: String = text
                .replace(&format!("{pkg}/bin/vmsync"), bin)
                .lines()
                .map(|line| match line.split_once('=') {
                    Some((key, value)) if key.starts_with("Exec") && value.starts_with(&store) => {
                        let program = value.split_whitespace().next().unwrap();
                        let name = Path::new(program).file_name().unwrap().to_str().unwrap();
                        format!(
                            "{key}={}\n",
                            value.replacen(program, &format!("/bin/{name}"), 1)
                        )
                    }
                    _ => format!("{line}\n"),
                })
                .collect();
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            paths.push(path);
        }
    }
    // What Requires= names, present on a NixOS host (from libvirt's package).
    std::fs::write(
        dir.path().join("libvirtd.service"),
        "[Service]\nType=notify\nExecStart=/bin/true\n",
    )
    .unwrap();
    assert_units_verify(dir.path(), &paths, true);
}

#[test]
fn nixos_readme_example_host_evaluates() {
    let readme = read("deploy/README.md");
    let start = readme
        .find("### Example host configuration")
        .expect("deploy/README.md: no example host configuration");
    let block = &readme[start..];
    let block = &block[block.find("```nix\n").unwrap() + 7..];
    let block = &block[..block.find("```").unwrap()];
    assert!(block.contains("/path/to/vmsync"), "{block}");
    // The checkout the example points at: only what it reads (the whole repository with
    // target/ would be copied into the store).
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("deploy/nixos")).unwrap();
    for file in [
        "deploy/nixos/module.nix",
        "deploy/nixos/package.nix",
        "Cargo.lock",
    ] {
        std::fs::copy(repo().join(file), src.path().join(file)).unwrap();
    }
    let host = src.path().join("configuration.nix");
    std::fs::write(
        &host,
        block.replace("/path/to/vmsync", &src.path().display().to_string()),
    )
    .unwrap();
    let c = eval_host_file(&host).unwrap_or_else(|e| panic!("deploy/README.md example:\n{e}"));
    assert_eq!(c["polkit"]["enable"], true);
    let sc = &c["systemd"]["services"]["vmsync-agent"]["serviceConfig"];
    assert_eq!(sc["Type"], "notify");
    assert!(strings(&sc["ReadWritePaths"]).contains(&"-/srv/vm-disks".to_string()));
}

#[test]
fn nixos_webhook_is_off_by_default_and_checked_when_set() {
    // Off by default: an empty [webhook] table (no listen) in the file.
    let c = eval_ok(&format!(r#"{URL} mode = "daemon";"#), "");
    assert_eq!(
        c["configFile"]["toml"]["webhook"],
        serde_json::json!({}),
        "{}",
        c["configFile"]["toml"]
    );
    // Set: written as vmsync reads it, and the build's config check passes although the
    // host's secret file is not there at build time.
    let c = eval_ok(
        &format!(
            r#"{URL} mode = "daemon";
               settings.webhook.listen = "127.0.0.1:9870";
               settings.webhook.secret_file = "/etc/vmsync/webhook-secret";"#
        ),
        "",
    );
    assert_eq!(
        c["configFile"]["toml"]["webhook"],
        serde_json::json!({"listen": "127.0.0.1:9870", "secret_file": "/etc/vmsync/webhook-secret"})
    );
    assert_eq!(c["warnings"], serde_json::json!([]));
    let (out, _, _dir) = run_config_check(&c);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Half a webhook, a webhook in timer mode, or a secret in the store: refused or warned.
    let err = eval_err(
        &format!(r#"{URL} mode = "daemon"; settings.webhook.listen = "127.0.0.1:9870";"#),
        "",
    );
    assert!(
        err.contains("set both listen and secret_file, or neither"),
        "{err}"
    );
    let err = eval_err(
        &format!(
            r#"{URL} settings.webhook.listen = "127.0.0.1:9870";
               settings.webhook.secret_file = "/etc/vmsync/webhook-secret";"#
        ),
        "",
    );
    assert!(
        err.contains("webhook.listen needs services.vmsync.mode"),
        "{err}"
    );
    // (Each evaluation here has a store directory of its own.)
    let c = eval_ok(
        &format!(
            r#"{URL} mode = "daemon"; settings.webhook.listen = "127.0.0.1:9870";
               settings.webhook.secret_file = "${{builtins.storeDir}}/0000-webhook-secret";"#
        ),
        "",
    );
    let warnings = strings(&c["warnings"]);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("secret_file is in the Nix store")),
        "{warnings:?}"
    );
    // A listen that is no address fails the build's check, naming the key.
    let c = eval_ok(
        &format!(
            r#"{URL} mode = "daemon"; settings.webhook.listen = "localhost";
               settings.webhook.secret_file = "/etc/vmsync/webhook-secret";"#
        ),
        "",
    );
    let (out, _, _dir) = run_config_check(&c);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("invalid [webhook] listen 'localhost'"),
        "{stderr}"
    );
}

#[test]
fn nixos_notify_entries_are_written_as_vmsync_reads_them_and_the_daemon_has_a_watchdog() {
    let c = eval_ok(
        &format!(
            r#"{URL} mode = "daemon";
               settings.agent.tick_timeout = "20m";
               settings.notify = [
                 {{ kind = "commit-status"; forge = "gitea"; api_url = "https://git.example.org/api/v1";
                    repository = "infra/vms"; token_file = "/etc/vmsync/status-token"; }}
                 {{ url = "https://hooks.example.org/vmsync"; secret_file = "/etc/vmsync/notify-secret";
                    events = [ "failed" "recovered" ]; }}
                 {{ kind = "command"; command = [ "/usr/local/bin/vmsync-mail" "--to" "ops" ]; }}
               ];"#
        ),
        "",
    );
    assert_eq!(
        c["configFile"]["toml"]["notify"],
        serde_json::json!([
            {"kind": "commit-status", "forge": "gitea", "api_url": "https://git.example.org/api/v1",
             "repository": "infra/vms", "token_file": "/etc/vmsync/status-token"},
            {"kind": "webhook", "url": "https://hooks.example.org/vmsync",
             "secret_file": "/etc/vmsync/notify-secret", "events": ["failed", "recovered"]},
            {"kind": "command", "command": ["/usr/local/bin/vmsync-mail", "--to", "ops"]},
        ])
    );
    assert_eq!(c["configFile"]["toml"]["agent"]["tick_timeout"], "20m");
    assert_eq!(c["warnings"], serde_json::json!([]));
    let (out, _, _dir) = run_config_check(&c);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        c["systemd"]["services"]["vmsync-agent"]["serviceConfig"]["WatchdogSec"],
        "60s"
    );
    assert_eq!(
        single(
            &read("deploy/systemd/vmsync-agent.service"),
            "Service",
            "WatchdogSec"
        ),
        "60s",
        "the shipped unit and the module agree"
    );
    // A token in the store is warned about; an entry vmsync refuses fails the check.
    let c = eval_ok(
        &format!(
            r#"{URL} settings.notify = [ {{ kind = "commit-status"; forge = "github";
                 repository = "infra/vms"; token_file = "${{builtins.storeDir}}/0000-token"; }} ];"#
        ),
        "",
    );
    assert!(
        strings(&c["warnings"])
            .iter()
            .any(|w| w.contains("0000-token is in the Nix store")),
        "{}",
        c["warnings"]
    );
    let c = eval_ok(
        &format!(r#"{URL} settings.notify = [ {{ kind = "command"; command = [ "mail" ]; }} ];"#),
        "",
    );
    let (out, _, _dir) = run_config_check(&c);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("[[notify]] entry 1")
            && stderr.contains("absolute"),
        "{stderr}"
    );
}

// flake.nix: its outputs evaluated with stand-ins for nixpkgs (tests/nixos/flake-outputs.nix):
// nothing is built, but every output's shape, the package's inputs and install script, and
// the module on a host are as a real `nix flake check` would evaluate them.

fn flake_outputs() -> serde_json::Value {
    let out = nix(Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(repo().join("tests/nixos/flake-outputs.nix"))
        .args(["--arg", "src"])
        .arg(nix_path(repo())));
    assert!(
        out.status.success(),
        "flake outputs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn flake_outputs_evaluate_with_stand_in_inputs() {
    let v = flake_outputs();
    assert_eq!(
        v["outputs"],
        serde_json::json!(["checks", "nixosModules", "overlays", "packages"])
    );
    assert_eq!(
        v["inputs"]["nixpkgs"],
        "github:NixOS/nixpkgs/nixos-unstable"
    );
    let name = format!("vmsync-{}", env!("CARGO_PKG_VERSION"));
    for system in ["x86_64-linux", "aarch64-linux"] {
        let p = &v["packages"][system]["default"];
        assert_eq!(
            p["name"],
            name.as_str(),
            "{system}: package.nix version vs Cargo.toml"
        );
        assert_eq!(
            p["commit"], "0123456789ab",
            "{system}: the flake's revision"
        );
        assert_eq!(p["meta"]["mainProgram"], "vmsync");
        for lib in ["libvirt", "libxml2", "openssl", "zlib"] {
            assert!(
                strings(&p["buildInputs"]).contains(&lib.to_owned()),
                "{system}: {lib}"
            );
        }
        assert!(strings(&p["nativeBuildInputs"]).contains(&"pkg-config".to_owned()));
        let check = &v["checks"][system]["nixos-module"];
        assert_eq!(check["service"]["Type"], "oneshot", "{check}");
        assert!(
            check["service"]["ExecStart"]
                .as_str()
                .unwrap()
                .ends_with(&format!("-{name}/bin/vmsync --once")),
            "{check}"
        );
        assert_eq!(check["timer"]["Unit"], "vmsync.service");
    }
    assert_eq!(v["overlay"]["name"], name.as_str());
    // A host importing only nixosModules.default gets the flake's package.
    assert_eq!(v["host"]["package"], name.as_str());
    let systems: Vec<&String> = v["packages"].as_object().unwrap().keys().collect();
    assert_eq!(systems, ["aarch64-linux", "x86_64-linux"]);
}

/// The package's postInstall, run with the built binary as `$out/bin/vmsync` and the two
/// nixpkgs install-shell-files functions reduced to what they do with these arguments.
#[test]
fn flake_package_install_script_makes_man_pages_and_completions() {
    let v = flake_outputs();
    let script = v["packages"]["x86_64-linux"]["default"]["postInstall"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("bin")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vmsync"), out.join("bin/vmsync")).unwrap();
    let build = dir.path().join("build");
    std::fs::create_dir_all(&build).unwrap();
    let functions = r#"
set -euo pipefail
installManPage() {
  local f
  for f in "$@"; do
    [ -s "$f" ] || { echo "installManPage: $f missing"; exit 1; }
    install -D -m 0644 "$f" "$out/share/man/man${f##*.}/${f##*/}"
  done
}
installShellCompletion() {
  local cmd=
  while [ $# -gt 0 ]; do
    case $1 in
      --cmd) cmd=$2; shift 2 ;;
      --bash) install -D -m 0644 "$2" "$out/share/bash-completion/completions/$cmd.bash"; shift 2 ;;
      --zsh) install -D -m 0644 "$2" "$out/share/zsh/site-functions/_$cmd"; shift 2 ;;
      --fish) install -D -m 0644 "$2" "$out/share/fish/vendor_completions.d/$cmd.fish"; shift 2 ;;
      *) echo "installShellCompletion: unexpected $1"; exit 1 ;;
    esac
  done
}
"#;
    let run = Command::new("bash")
        .arg("-c")
        .arg(format!("{functions}\n{script}"))
        .current_dir(&build)
        .env("out", &out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "postInstall: {}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    for file in [
        "share/man/man1/vmsync.1",
        "share/man/man1/vmsync-plan.1",
        "share/man/man1/vmsync-validate.1",
        "share/man/man5/vmsync.toml.5",
        "share/bash-completion/completions/vmsync.bash",
        "share/zsh/site-functions/_vmsync",
        "share/fish/vendor_completions.d/vmsync.fish",
    ] {
        let len = std::fs::metadata(out.join(file))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 0, "{file} not installed by postInstall");
    }
}
