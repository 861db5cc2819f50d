//! The deployment files we ship are checked with the tools that will read them:
//! `systemd-analyze verify` for the systemd units, `nix-instantiate --parse` for the NixOS
//! module and package, plus the facts the docs promise about them (oneshot vs notify,
//! state directory, sandbox, ordering after libvirt).
//!
//! Neither tool is optional: when one is missing the test fails and says which package to
//! install (`scripts/setup-host.sh` installs both). A silently skipped check is no check.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNITS: [&str; 3] = ["vmsync.service", "vmsync.timer", "vmsync-agent.service"];
const NIX_FILES: [&str; 2] = ["module.nix", "package.nix"];

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
        let rewritten = text.replace("ExecStart=/usr/bin/vmsync", &format!("ExecStart={bin}"));
        if name.ends_with(".service") {
            assert_ne!(rewritten, text, "{name}: no ExecStart=/usr/bin/vmsync");
        }
        let path = dir.path().join(name);
        std::fs::write(&path, rewritten).unwrap();
        paths.push(path);
    }

    let out = run(
        Command::new("systemd-analyze")
            .arg("verify")
            .args(&paths)
            .env_remove("SYSTEMD_LOG_LEVEL"),
        "systemd-analyze",
        "systemd",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Unknown keys and unparsable values are only warnings (exit status 0), so the output
    // must also be clean. Lines about other units of the host (possible on a real system
    // or in a container) are not ours to judge.
    let dir_str = dir.path().display().to_string();
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
        let path = repo().join("deploy/nixos").join(name);
        let out = run(
            Command::new("nix-instantiate").arg("--parse").arg(&path),
            "nix-instantiate",
            "nix-bin",
        );
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
fn timer_schedules_the_oneshot_service() {
    let unit = read("deploy/systemd/vmsync.timer");
    assert_eq!(single(&unit, "Timer", "OnBootSec"), "1min");
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

#[test]
fn nixos_module_declares_the_documented_options() {
    let module = read("deploy/nixos/module.nix");
    for needle in [
        "options.services.vmsync",
        "enable = lib.mkEnableOption",
        "package = lib.mkOption",
        "settings = lib.mkOption",
        "mode = lib.mkOption",
        "\"timer\"",
        "\"daemon\"",
        "interval = lib.mkOption",
        "pkgs.formats.toml",
        "virtualisation.libvirtd.enable = true",
        "environment.etc.\"vmsync/config.toml\".source",
        "StateDirectory = \"vmsync\"",
        "ProtectSystem = \"strict\"",
        "Type = \"oneshot\"",
        "Type = \"notify\"",
        "SuccessExitStatus = [ 75 ]",
        "\"libvirtd.service\"",
    ] {
        assert!(module.contains(needle), "module.nix lacks {needle}");
    }
}

/// Just enough of nixpkgs' `lib` and `pkgs` (and of the NixOS `config`) to evaluate
/// module.nix without nixpkgs, which is not available here. It catches what `--parse`
/// cannot: wrong attribute paths inside the module, a broken `mkMerge`, values of the
/// wrong shape. Called as `stub module mode settings knownHosts`.
const NIX_STUB: &str = r#"
module: mode: settings: knownHosts:
let
  ru = a: b: a // builtins.mapAttrs (n: v:
    if builtins.isAttrs v && a ? ${n} && builtins.isAttrs a.${n} then ru a.${n} v else v) b;
  lib = {
    mkOption = o: o;
    mkEnableOption = d: { description = d; };
    types = { package = "package"; str = "str"; enum = l: { enum = l; }; listOf = t: { listOf = t; }; };
    literalExpression = s: s;
    mkIf = c: v: if c then v else null;
    mkMerge = l: builtins.foldl' ru { } (builtins.filter (x: x != null) l);
    mkDefault = v: v;
    optional = c: v: if c then [ v ] else [ ];
    "getExe'" = p: n: "${p}/bin/${n}";
    concatLines = l: builtins.concatStringsSep "\n" l + "\n";
  };
  pkgs = {
    formats.toml = { }: { type = "toml"; generate = n: v: "/nix/store/x-${n}"; };
    writeText = n: t: "/nix/store/x-${n}";
    coreutils = "/nix/store/x-coreutils";
  };
  config = {
    services.vmsync = {
      enable = true; package = "/nix/store/x-vmsync"; interval = "7min";
      inherit mode settings knownHosts;
    };
    virtualisation.libvirtd.qemu.package = "/nix/store/x-qemu";
  };
in (import module { inherit config lib pkgs; }).config
"#;

fn eval_module(mode: &str, settings: &str, known_hosts: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let stub = dir.path().join("stub.nix");
    std::fs::write(&stub, NIX_STUB).unwrap();
    let module = repo().join("deploy/nixos/module.nix");
    let expr = format!(
        "import {} {} \"{mode}\" {settings} {known_hosts}",
        stub.display(),
        module.display()
    );
    let out = run(
        Command::new("nix-instantiate").args(["--eval", "--strict", "--json", "-E", &expr]),
        "nix-instantiate",
        "nix-bin",
    );
    assert!(
        out.status.success(),
        "nix-instantiate --eval: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
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
            serde_json::Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().expect("string list").to_string())
                .collect(),
            other => panic!("module.nix serviceConfig.{key}: {other}"),
        };
        assert_eq!(
            got, want,
            "module.nix serviceConfig.{key} differs from the units"
        );
    }
}

#[test]
fn nixos_module_timer_mode_evaluates_to_oneshot_and_timer() {
    let c = eval_module("timer", r#"{ source.url = "file:///srv/vms"; }"#, "[ ]");
    assert_eq!(c["virtualisation"]["libvirtd"]["enable"], true);
    assert_eq!(
        c["environment"]["etc"]["vmsync/config.toml"]["source"],
        "/nix/store/x-vmsync-config.toml"
    );
    let svc = &c["systemd"]["services"]["vmsync"];
    let sc = &svc["serviceConfig"];
    assert_eq!(sc["Type"], "oneshot");
    assert_eq!(sc["ExecStart"], "/nix/store/x-vmsync/bin/vmsync --once");
    assert_eq!(sc["SuccessExitStatus"], serde_json::json!([75]));
    assert_eq!(sc["StateDirectory"], "vmsync");
    assert_eq!(
        sc["ReadWritePaths"],
        serde_json::json!(["-/var/lib/libvirt/images"])
    );
    assert_same_sandbox_as_units(sc);
    assert_eq!(svc["requires"], serde_json::json!(["libvirtd.service"]));
    assert!(
        svc["after"]
            .as_array()
            .unwrap()
            .contains(&"libvirtd.service".into())
    );
    assert_eq!(svc["path"], serde_json::json!(["/nix/store/x-qemu"]));
    assert_eq!(svc["environment"]["HOME"], "/var/lib/vmsync");
    let timer = &c["systemd"]["timers"]["vmsync"];
    assert_eq!(timer["timerConfig"]["OnUnitActiveSec"], "7min");
    assert_eq!(timer["wantedBy"], serde_json::json!(["timers.target"]));
    assert!(c["systemd"]["services"].get("vmsync-agent").is_none());
}

#[test]
fn nixos_module_daemon_mode_evaluates_to_notify_service() {
    let c = eval_module(
        "daemon",
        r#"{ source.url = "file:///srv/vms"; policy.disk_roots = [ "/a" "/b" ];
             agent.metrics_file = "/var/lib/node-exporter/vmsync.prom"; }"#,
        r#"[ "git.example.org ssh-ed25519 AAAA" ]"#,
    );
    assert!(c["systemd"].get("timers").is_none(), "{}", c["systemd"]);
    assert!(c["systemd"]["services"].get("vmsync").is_none());
    let svc = &c["systemd"]["services"]["vmsync-agent"];
    let sc = &svc["serviceConfig"];
    assert_eq!(sc["Type"], "notify");
    assert_eq!(sc["ExecStart"], "/nix/store/x-vmsync/bin/vmsync");
    assert_eq!(sc["Restart"], "on-failure");
    assert_eq!(
        sc["ReadWritePaths"],
        serde_json::json!(["-/a", "-/b", "-/var/lib/node-exporter"])
    );
    assert_same_sandbox_as_units(sc);
    assert_eq!(svc["wantedBy"], serde_json::json!(["multi-user.target"]));
    assert_eq!(
        svc["reloadTriggers"],
        serde_json::json!(["/nix/store/x-vmsync-config.toml"])
    );
    let rules = c["systemd"]["tmpfiles"]["rules"].as_array().unwrap();
    assert!(
        rules.contains(
            &"L+ /var/lib/vmsync/.ssh/known_hosts - - - - /nix/store/x-vmsync-known_hosts".into()
        ),
        "{rules:?}"
    );
}
