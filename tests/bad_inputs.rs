//! A corpus of bad VM repositories (`tests/corpus/<case>/`: the repository's files plus
//! `expected`, the exact problem lines), and generated ones that cannot sit in a corpus
//! well (huge files, symlinks, bytes that are not UTF-8). Each is run through
//! `vmsync validate DIR` and through `vmsync --once` from a real git commit against
//! `test:///default`: exit 3, exactly the expected problems, nothing made on the host
//! (the disk root does not even exist afterwards), the record says "invalid".
//!
//! Also the agent config (exit 2): unknown keys, wrong types, bad paths.

mod common;

use std::path::{Path, PathBuf};

use common::{Env, vmsync};

use vmsync::record::SyncResult;

/// The disk root every corpus manifest uses; it must never be created.
const ROOT: &str = "/srv/vmsync-corpus";

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// The problem lines of a run's stderr (indented under "… is invalid; nothing was applied:").
fn problems(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .map(str::to_string)
        .collect()
}

/// An env on the test driver whose disk root is [`ROOT`], and whose cloud-init seeds
/// would go below it too.
fn bad_env() -> Env {
    let mut env = Env::new();
    env.images = ROOT.into();
    let config = env.state.path().join("agent.toml");
    std::fs::write(&config, format!("[policy]\nseed_dir = \"{ROOT}/seeds\"\n")).unwrap();
    env.config_file = Some(config);
    env
}

/// Runs the bad repository of `env` both ways and checks the problems of each.
fn check_repo(name: &str, env: &Env, expected: &[String]) {
    let repo = &env.repo;
    assert!(
        !Path::new(ROOT).exists(),
        "{ROOT} must not exist on the test host"
    );
    let dir = repo.path().display().to_string();
    let run = vmsync(&["validate", &dir, "--disk-root", ROOT]);
    assert_eq!(run.code, 3, "{name}: validate\n{}", run.stderr);
    assert_eq!(problems(&run.stderr), expected, "{name}: validate");

    let commit = repo.commit("bad input");
    let run = env.run(&["--once"]);
    assert_eq!(run.code, 3, "{name}: --once\n{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("commit {commit} is invalid; nothing was applied:")),
        "{name}: {}",
        run.stderr
    );
    assert_eq!(problems(&run.stderr), expected, "{name}: --once");
    let record = env.record();
    assert_eq!(record.last_result, Some(SyncResult::Invalid), "{name}");
    assert_eq!(record.last_applied_commit, None, "{name}");
    assert!(record.vms.is_empty(), "{name}");
    assert!(!Path::new(ROOT).exists(), "{name}: the host was touched");
}

/// A corpus case marked with this file names something only a host can lack (a network,
/// pool or volume the commit does not make): `vmsync validate DIR`, which runs offline,
/// passes it with a note, and `vmsync --once` refuses it (exit 3).
const HOST_ONLY: &str = "validate-ok";

fn check_host_only(name: &str, env: &Env, expected: &[String]) {
    let dir = env.repo.path().display().to_string();
    let run = vmsync(&["validate", &dir, "--disk-root", ROOT]);
    assert_eq!(run.code, 0, "{name}: validate\n{}", run.stderr);
    assert!(
        run.stdout
            .contains("is not in the commit; the host must have it (checked at sync)"),
        "{name}: validate\n{}",
        run.stdout
    );
    let commit = env.repo.commit("bad input");
    let run = env.run(&["--once"]);
    assert_eq!(run.code, 3, "{name}: --once\n{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("commit {commit} is invalid; nothing was applied:")),
        "{name}: {}",
        run.stderr
    );
    assert_eq!(problems(&run.stderr), expected, "{name}: --once");
    let record = env.record();
    assert_eq!(record.last_result, Some(SyncResult::Invalid), "{name}");
    assert!(record.vms.is_empty(), "{name}");
    assert!(!Path::new(ROOT).exists(), "{name}: the host was touched");
}

#[test]
fn corpus_of_bad_repositories() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 30, "the corpus is incomplete: {cases:?}");
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let expected: Vec<String> = std::fs::read_to_string(case.join("expected"))
            .unwrap_or_else(|e| panic!("{name}: expected: {e}"))
            .lines()
            .map(str::to_string)
            .collect();
        assert!(!expected.is_empty(), "{name}: empty expected file");
        let env = bad_env();
        common::copy_tree_except(&case, env.repo.path(), &["expected", HOST_ONLY]);
        if case.join(HOST_ONLY).exists() {
            check_host_only(&name, &env, &expected);
        } else {
            check_repo(&name, &env, &expected);
        }
    }
}

const MANIFEST: &str = "version = 1\n\n[[vm]]\nname = \"a\"\nxml = \"vms/a.xml\"\n";

fn small_xml() -> String {
    "<domain type='kvm'>\n  <name>a</name>\n  <memory unit='MiB'>128</memory>\n  <os><type arch='x86_64' machine='pc'>hvm</type></os>\n</domain>\n".into()
}

/// A secret this host cannot decrypt: `vmsync validate DIR` checks its format only and
/// passes; a sync names the file and the identity tried (exit 3), and nothing is made.
#[test]
fn a_secret_for_another_host_fails_on_this_host_only() {
    use age::secrecy::ExposeSecret;
    let env = bad_env();
    let ours = age::x25519::Identity::generate();
    let theirs = age::x25519::Identity::generate();
    let identity = env.state.path().join("host.key");
    std::fs::write(&identity, format!("{}\n", ours.to_string().expose_secret())).unwrap();
    let config = env.config_file.clone().unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text += &format!("[secrets]\nidentity = \"{}\"\n", identity.display());
    std::fs::write(&config, text).unwrap();
    let repo = &env.repo;
    repo.write(
        "vmsync.toml",
        &format!("{MANIFEST}\n  [vm.cloud_init]\n  user_data = \"ci/user.yaml.j2\"\n"),
    );
    repo.write("vms/a.xml", &small_xml());
    repo.write(
        "ci/user.yaml.j2",
        "password: {{ secret(\"secrets/pw.age\") }}\n",
    );
    let secret = age::encrypt(&theirs.to_public(), b"hunter2").unwrap();
    std::fs::create_dir_all(repo.path().join("secrets")).unwrap();
    std::fs::write(repo.path().join("secrets/pw.age"), secret).unwrap();

    let dir = repo.path().display().to_string();
    let run = vmsync(&["validate", &dir, "--disk-root", ROOT]);
    assert_eq!(
        run.code, 0,
        "validate checks the format only\n{}",
        run.stderr
    );
    repo.commit("a secret for another host");
    let run = env.run(&["--once"]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert_eq!(
        problems(&run.stderr),
        [format!(
            "ci/user.yaml.j2:1: vm 'a': field 'cloud_init.user_data': invalid operation: cannot decrypt 'secrets/pw.age' with identity '{}': it is not encrypted to this host's key",
            identity.display()
        )]
    );
    assert_eq!(env.record().last_result, Some(SyncResult::Invalid));
    assert!(!Path::new(ROOT).exists(), "the host was touched");
}

#[test]
fn huge_files_are_refused_before_they_are_read() {
    let env = bad_env();
    let repo = &env.repo;
    repo.write("vmsync.toml", MANIFEST);
    // A comment that takes the XML past 1 MiB.
    let huge = small_xml().replace(
        "</domain>",
        &format!("<!--{}--></domain>", "x".repeat(1 << 20)),
    );
    let size = huge.len();
    repo.write("vms/a.xml", &huge);
    check_repo(
        "huge xml",
        &env,
        &[format!(
            "vmsync.toml:4: vm 'a': field 'xml': 'vms/a.xml' is {size} bytes, more than the limit of 1048576"
        )],
    );

    let env = bad_env();
    let repo = &env.repo;
    let manifest = format!("{MANIFEST}# {}\n", "x".repeat(1 << 20));
    let size = manifest.len();
    repo.write("vmsync.toml", &manifest);
    check_repo(
        "huge manifest",
        &env,
        &[format!(
            "vmsync.toml: 'vmsync.toml' is {size} bytes, more than the limit of 1048576"
        )],
    );
}

#[test]
fn symlinks_in_the_tree_are_refused() {
    // The XML itself is a symlink to a file outside the repository.
    let env = bad_env();
    let repo = &env.repo;
    repo.write("vmsync.toml", MANIFEST);
    std::fs::create_dir_all(repo.path().join("vms")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", repo.path().join("vms/a.xml")).unwrap();
    check_repo(
        "symlinked xml",
        &env,
        &["vmsync.toml:4: vm 'a': field 'xml': 'vms/a.xml' is not a regular file (symlinks and directories are refused)".into()],
    );

    // A directory on the way is a symlink (to a directory with a valid XML).
    let env = bad_env();
    let repo = &env.repo;
    repo.write("vmsync.toml", MANIFEST);
    repo.write("real/a.xml", &small_xml());
    std::os::unix::fs::symlink("real", repo.path().join("vms")).unwrap();
    check_repo(
        "symlinked directory",
        &env,
        &["vmsync.toml:4: vm 'a': field 'xml': 'vms/a.xml' is not a regular file (symlinks and directories are refused)".into()],
    );

    // The manifest is a symlink.
    let env = bad_env();
    let repo = &env.repo;
    repo.write("real.toml", MANIFEST);
    std::os::unix::fs::symlink("real.toml", repo.path().join("vmsync.toml")).unwrap();
    check_repo(
        "symlinked manifest",
        &env,
        &["vmsync.toml: 'vmsync.toml' is not a regular file (symlinks and directories are refused)".into()],
    );
}

#[test]
fn text_that_is_not_utf8_is_refused() {
    let env = bad_env();
    let repo = &env.repo;
    repo.write("vmsync.toml", MANIFEST);
    std::fs::create_dir_all(repo.path().join("vms")).unwrap();
    let mut bytes = small_xml().into_bytes();
    bytes.splice(30..30, [0xff, 0xfe, 0x80]);
    std::fs::write(repo.path().join("vms/a.xml"), bytes).unwrap();
    check_repo(
        "latin-1 xml",
        &env,
        &["vmsync.toml:4: vm 'a': field 'xml': 'vms/a.xml' is not valid UTF-8".into()],
    );

    let env = bad_env();
    let repo = &env.repo;
    std::fs::write(
        repo.path().join("vmsync.toml"),
        [b"version = 1\n# caf\xe9\n".as_slice()].concat(),
    )
    .unwrap();
    check_repo(
        "latin-1 manifest",
        &env,
        &["vmsync.toml: 'vmsync.toml' is not valid UTF-8".into()],
    );
}

#[test]
fn bad_agent_configs_exit_2_with_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "[policy]\nallow_hostdev = true\nallow_hostdevs = true\n",
            ":3': unknown field `allow_hostdevs`",
        ),
        (
            "[policy]\nallow_hostdev = \"yes\"\n",
            ":2': invalid type: string \"yes\", expected a boolean",
        ),
        (
            "[trust]\nallowed_signer = \"/x\"\n",
            ":2': unknown field `allowed_signer`",
        ),
        (
            "[policy]\nallowed_paths = [\"relative\"]\n",
            "invalid policy.allowed_paths entry: path 'relative' must be absolute",
        ),
        (
            "[policy]\ndisk_roots = [\"/srv/../etc\"]\n",
            "invalid policy.disk_roots entry: path '/srv/../etc' must not contain '.' or '..'",
        ),
        ("[source\nurl = 1\n", ":1': "),
    ];
    for (i, (text, message)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("config{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let run = vmsync(&[
            "--once",
            "--config",
            path.to_str().unwrap(),
            "--host",
            "hv1",
            "--state-dir",
            dir.path().to_str().unwrap(),
        ]);
        assert_eq!(run.code, 2, "{text}\n{}", run.stderr);
        assert!(run.stderr.contains(message), "{text}\n{}", run.stderr);
    }
}

#[test]
fn render_of_an_invalid_checkout_prints_nothing_and_exits_3() {
    let case = corpus_dir().join("template-undefined-variable");
    let run = vmsync(&[
        "render",
        &case.display().to_string(),
        "a",
        "--disk-root",
        ROOT,
    ]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert_eq!(run.stdout, "");
    let expected = std::fs::read_to_string(case.join("expected")).unwrap();
    assert_eq!(problems(&run.stderr), expected.lines().collect::<Vec<_>>());
}

/// A small qcow2 made by qemu-img in `dir`, `mib` MiB large (each size its own bytes).
fn small_qcow2(dir: &Path, mib: u32) -> Vec<u8> {
    let path = dir.join("base.qcow2");
    let ok = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(format!("{mib}M"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "qemu-img create");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    bytes
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Images that go wrong while they download (a byte changed, a server that stalls, a
/// download cut short) fail only the VMs made from them, with the URL and the hashes
/// named; nothing is left at the image's final path nor as a temporary file, and those
/// VMs' disks and domains are not made. The other VMs are applied (exit 1).
#[test]
fn broken_image_downloads_fail_only_their_vms_and_leave_nothing() {
    use vmsync::testing::{Reply, http_server};
    let mut env = Env::new();
    let [good, tampered_src, stall, cut] = [8, 9, 10, 11].map(|m| small_qcow2(&env.images, m));
    let mut tampered = tampered_src.clone();
    tampered[tampered_src.len() / 2] ^= 0x01;
    let server = http_server(vec![
        ("/good.qcow2", Reply::Body(good.clone())),
        ("/tampered.qcow2", Reply::Body(tampered.clone())),
        (
            "/stall.qcow2",
            Reply::Stall {
                body: stall.clone(),
                after: 4096,
            },
        ),
        (
            "/cut.qcow2",
            Reply::Cut {
                body: cut.clone(),
                after: 4096,
            },
        ),
    ]);
    let image_dir = env.images.join("base-images");
    let config = env.state.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[policy]\nimage_urls = [\"{}\"]\nimage_dir = \"{}\"\nimage_timeout = \"2s\"\n",
            server.base,
            image_dir.display()
        ),
    )
    .unwrap();
    env.config_file = Some(config);
    let mut manifest = String::from("version = 1\n");
    for (name, bytes) in [
        ("good", &good),
        ("tampered", &tampered_src),
        ("stall", &stall),
        ("cut", &cut),
    ] {
        manifest += &format!(
            "\n[[image]]\nname = \"{name}\"\nurl = \"{}/{name}.qcow2\"\nsha256 = \"{}\"\n",
            server.base,
            sha256_hex(bytes)
        );
    }
    let vms = [
        ("ok", Some("good")),
        ("plain", None),
        ("t", Some("tampered")),
        ("s", Some("stall")),
        ("c", Some("cut")),
    ];
    for (vm, image) in vms {
        manifest += &format!(
            "\n[[vm]]\nname = \"{vm}\"\nxml = \"vms/{vm}.xml\"\n  [[vm.disk]]\n  path = \"{}/{vm}.qcow2\"\n  size = \"16M\"\n",
            env.images.display()
        );
        if let Some(image) = image {
            manifest += &format!("  image = \"{image}\"\n");
        }
        let xml = small_xml().replace("<name>a</name>", &format!("<name>{vm}</name>"));
        env.repo.write(&format!("vms/{vm}.xml"), &xml);
    }
    env.repo.write("vmsync.toml", &manifest);
    env.repo.commit("images");
    let run = env.run(&["--once"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let good_file = image_dir.join(format!("{}.qcow2", sha256_hex(&good)));
    let mut left: Vec<String> = std::fs::read_dir(&image_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let only = vec![
        good_file
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
    ];
    assert_eq!(left, only, "only the good image, no temporary file");
    assert_eq!(std::fs::read(&good_file).unwrap(), good);
    let record = env.record();
    for vm in ["ok", "plain"] {
        assert!(record.vms[vm].ok, "{vm}: {:?}", record.vms[vm]);
        assert!(env.images.join(format!("{vm}.qcow2")).exists(), "{vm}");
    }
    let expected = sha256_hex(&tampered_src);
    let received = sha256_hex(&tampered);
    for (vm, what) in [
        ("t", format!("expected {expected}, received {received}")),
        ("s", "within the timeout".to_string()),
        ("c", "cut".to_string()),
    ] {
        let error = record.vms[vm].last_error.clone().unwrap_or_default();
        assert!(!record.vms[vm].ok, "{vm}");
        assert!(error.contains(&what), "{vm}: {error}");
        assert!(
            error.contains(&format!("{}/", server.base)),
            "{vm}: names the URL: {error}"
        );
        assert!(run.stderr.contains(&what), "{vm}: {}", run.stderr);
        assert!(
            !env.images.join(format!("{vm}.qcow2")).exists(),
            "{vm}: no disk"
        );
        assert_eq!(record.vms[vm].applied_commit, None, "{vm}: not defined");
    }
    // The overlay's backing file is the image in the image directory.
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(env.images.join("ok.qcow2"))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], good_file.display().to_string());
    assert_eq!(info["virtual-size"], 16 << 20);
}
