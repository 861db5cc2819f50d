//! Every file we ship for users is checked: the example VM repository validates, the
//! example agent config parses with the values it documents, and the documentation
//! (README.md, docs/, SECURITY.md, deploy/ and example-repo/ READMEs) links only to files
//! and headings that exist in this repository and points nowhere outside it.

mod common;

use std::path::Path;

use vmsync::config::{self, Overrides};

#[test]
fn example_repo_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("example-repo");
    let run = common::vmsync(&["validate", &dir.display().to_string()]).expect(0);
    run.stdout_has("valid (4 vm(s), 1 directory(ies))");
    run.stdout_has("1 network(s), 1 pool(s), 0 pool volume(s)");
}

#[test]
fn example_repo_network_and_pool_files_are_all_used() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("example-repo");
    let manifest = std::fs::read_to_string(dir.join("vmsync.toml")).unwrap();
    for sub in ["networks", "pools"] {
        for entry in std::fs::read_dir(dir.join(sub)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                manifest.contains(&format!("{sub}/{name}")),
                "example-repo/{sub}/{name} is not in vmsync.toml"
            );
        }
    }
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
fn example_repo_template_renders_for_both_its_vms() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("example-repo");
    let manifest = std::fs::read_to_string(dir.join("vmsync.toml")).unwrap();
    for entry in std::fs::read_dir(dir.join("templates")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            manifest
                .matches(&format!("template = \"templates/{name}\""))
                .count()
                >= 2,
            "example-repo/templates/{name} is not used by two VMs in vmsync.toml"
        );
    }
    let dir = dir.display().to_string();
    // [vm.params] over [params]: web-1 has its own memory, web-2 the default.
    common::vmsync(&["render", &dir, "web-1"])
        .expect(0)
        .stdout_has("<name>web-1</name>")
        .stdout_has("<memory unit='MiB'>1024</memory>");
    common::vmsync(&["render", &dir, "web-2"])
        .expect(0)
        .stdout_has("<name>web-2</name>")
        .stdout_has("<memory unit='MiB'>512</memory>");
    common::vmsync(&["render", &dir, "web-3"])
        .expect(2)
        .stderr_has("vm 'web-3' is not in");
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
    // Nothing listens unless the operator sets [webhook] listen.
    assert_eq!(s.webhook, None);
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
            // A commented `[[notify]]` example: its header too, so that its keys land
            // in its own table.
            Some(rest) if key(rest) || rest == "[[notify]]" => {
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
    let settings = config::load(&Overrides {
        config: Some(full),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(settings.notify.len(), 3, "the [[notify]] examples");
}

/// `name = value` with a lowercase snake_case name.
fn regex_free_key(line: &str) -> bool {
    let Some((name, _)) = line.split_once(" = ") else {
        return false;
    };
    !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
}

/// The documents users read, relative to the repository root: README.md, SECURITY.md,
/// every `docs/*.md`, and the READMEs of `deploy/` and `example-repo/`.
fn documents() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs: Vec<String> = [
        "README.md",
        "SECURITY.md",
        "deploy/README.md",
        "example-repo/README.md",
    ]
    .map(String::from)
    .to_vec();
    let mut in_docs: Vec<String> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    in_docs.sort();
    assert!(
        in_docs.len() >= 5,
        "expected the docs/ pages, found {in_docs:?}"
    );
    docs.extend(in_docs);
    docs
}

/// `text` without fenced code blocks and inline code spans (whose brackets are not links).
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            out.push('\n');
            continue;
        }
        if fenced {
            out.push('\n');
            continue;
        }
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// The targets of the inline links `[text](target)` in `text`.
fn link_targets(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut targets = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        match after.find(')') {
            Some(end) => {
                targets.push(after[..end].trim().to_string());
                rest = &after[end..];
            }
            None => break,
        }
    }
    targets
}

/// GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens.
fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of the headings of a markdown file.
fn anchors(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.push(anchor_of(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn anchors_are_computed_like_github() {
    assert_eq!(anchor_of(" `[policy]`"), "policy");
    assert_eq!(
        anchor_of(" The host policy: what validation refuses"),
        "the-host-policy-what-validation-refuses"
    );
    assert_eq!(
        link_targets("see [a](docs/a.md#x) and `[b](not/a/link)` [c](https://e.org)"),
        ["docs/a.md#x", "https://e.org"]
    );
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .unwrap();
    let mut checked = 0;
    let mut broken = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(root.join(&doc)).unwrap();
        let dir = root.join(&doc).parent().unwrap().to_path_buf();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((file, anchor)) => (file, Some(anchor)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() {
                root.join(&doc)
            } else {
                dir.join(file)
            };
            let Ok(path) = path.canonicalize() else {
                broken.push(format!("{doc}: '{target}' does not exist"));
                continue;
            };
            if !path.starts_with(&root) {
                broken.push(format!("{doc}: '{target}' points outside the repository"));
                continue;
            }
            if let Some(anchor) = anchor {
                let heading = std::fs::read_to_string(&path)
                    .map(|t| anchors(&t).iter().any(|a| a == anchor))
                    .unwrap_or(false);
                if !heading {
                    broken.push(format!("{doc}: '{target}' names no heading"));
                }
            }
            checked += 1;
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked >= 30, "only {checked} relative links found");
}

#[test]
fn no_document_points_outside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = documents();
    files.extend(
        ["example-repo/vmsync.toml", "deploy/config.toml"]
            .iter()
            .map(|f| f.to_string()),
    );
    for file in files {
        let text = std::fs::read_to_string(root.join(&file)).unwrap();
        // Spelled in pieces so that a grep of the repository for them finds only docs.
        for outside in [concat!("DESIGN", ".md"), concat!("shared", "/"), "/work/"] {
            assert!(
                !text.contains(outside),
                "{file} mentions '{outside}', which users do not have"
            );
        }
    }
}

#[test]
fn readme_is_a_front_page() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= 300,
        "README.md has {lines} lines; move detail to docs/"
    );
    // The quick start is exactly these two commands.
    for command in ["scripts/quickstart.sh", "scripts/test.sh"] {
        assert!(readme.contains(command), "README.md lacks {command}");
        assert!(root.join(command).exists(), "{command} is missing");
    }
    for page in [
        "docs/repository-format.md",
        "docs/configuration.md",
        "docs/operations.md",
        "docs/design.md",
        "docs/performance.md",
        "docs/moving-from-the-old-ways.md",
    ] {
        assert!(
            readme.contains(&format!("]({page})")),
            "README.md does not link {page}"
        );
    }
}
