//! Every file we ship for users is checked: the example VM repository validates, and the
//! example agent config parses with the values it documents.

mod common;

use std::path::Path;

use vmsync::config::{self, Overrides};

#[test]
fn example_repo_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("example-repo");
    let run = common::vmsync(&["validate", &dir.display().to_string()]).expect(0);
    run.stdout_has("valid (2 vm(s), 1 directory(ies))");
}

#[test]
fn example_repo_xml_files_are_all_used() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("example-repo");
    let manifest = std::fs::read_to_string(dir.join("vmsync.toml")).unwrap();
    for entry in std::fs::read_dir(dir.join("vms")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            manifest.contains(&format!("vms/{name}")),
            "example-repo/vms/{name} is not in vmsync.toml"
        );
    }
}

#[test]
fn deploy_config_parses_with_documented_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config.toml");
    let s = config::load(&Overrides {
        config: Some(path),
        host: Some("hv1".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        s.url.as_deref(),
        Some("ssh://git@git.example.org/infra/vms.git")
    );
    assert_eq!(s.branch, "main");
    assert_eq!(s.libvirt_uri, "qemu:///system");
    assert_eq!(s.state_dir, Path::new("/var/lib/vmsync"));
    assert_eq!(s.schedule.source(), "0 */5 * * * *");
    assert_eq!(
        s.disk_roots,
        vec![Path::new("/var/lib/libvirt/images").to_path_buf()]
    );
}

#[test]
fn every_commented_key_in_deploy_config_is_a_real_setting() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let key = regex_free_key;
    let mut uncommented = 0;
    let all: String = text
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if key(rest) => {
                uncommented += 1;
                format!("{rest}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect();
    assert!(
        uncommented >= 8,
        "found only {uncommented} commented settings"
    );
    let dir = tempfile::tempdir().unwrap();
    // The documented allowed_signers path must hold a real key for the config to load.
    let key = dir.path().join("key");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let signers = dir.path().join("allowed_signers");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    std::fs::write(&signers, format!("ops@example.org {public}")).unwrap();
    let all = all.replace(
        "/etc/vmsync/allowed_signers",
        &signers.display().to_string(),
    );
    let full = dir.path().join("config.toml");
    std::fs::write(&full, all).unwrap();
    config::load(&Overrides {
        config: Some(full),
        ..Default::default()
    })
    .unwrap();
}

/// `name = value` with a lowercase snake_case name.
fn regex_free_key(line: &str) -> bool {
    let Some((name, _)) = line.split_once(" = ") else {
        return false;
    };
    !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
}
