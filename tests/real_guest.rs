//! The real-guest tier: a real Debian 12 guest (tests/guest/build-image.sh: debootstrap,
//! cloud-init, qemu-guest-agent, the cloud kernel; booted by direct kernel boot under
//! KVM, or TCG where KVM does not boot it), applied by the real binary on a real
//! libvirtd.
//!
//! Health (`[vm.health]`, docs/health.md): the guest's real qemu-guest-agent answers
//! `guest_agent = true`, and a check command reaches the guest's sshd over an isolated
//! libvirt network of the test's own (at the DHCP lease vmsync gives it in
//! `VMSYNC_VM_ADDRESSES`), reading its banner; a commit that boots the same guest with its
//! agent masked (`systemd.mask=qemu-guest-agent.service` on the kernel command line) is
//! unhealthy although the guest is up (sshd answers, the agent does not).
//!
//! End to end: a local HTTP server serves the guest image as an `[[image]]`; vmsync
//! brings the VM up from a commit (an overlay on the downloaded image, a NoCloud seed it
//! builds), and the real cloud-init in the guest sets the hostname, creates a user with
//! an SSH key and writes a file whose content is an `.age` secret of the repository
//! (decrypted on the host with its SSH key); the test reads them back through the guest
//! agent. A changed user-data and secret with `on_change = "restart"`: the guest is
//! restarted, cloud-init applies the new instance, and the disk (inode, backing file),
//! UUID and MACs stay. The plaintext never shows in vmsync's output or state.
//!
//! Each boot's time is printed. Without a reachable `qemu:///system` or the image these
//! tests skip with a message, unless `VMSYNC_REQUIRE_LIBVIRTD` is set: then they fail.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::guest::{self, GuestXml, Image, TestNetwork};
use common::{Env, Manifest, Vm, seeds, virsh_system_ok as virsh_ok};

/// One guest of a test: its boot files, overlay disk and seed in the test's images
/// directory, and the network it is on.
struct Guest {
    name: String,
    image: &'static Image,
    disk: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    seed: PathBuf,
    network: Option<String>,
}

impl Guest {
    /// The guest `g` of `env`: an overlay on the image, a hand-made seed with
    /// `network_config`.
    fn new(env: &Env, image: &'static Image, network_config: Option<&str>) -> Self {
        let (kernel, initrd) = guest::boot_files(image, &env.images);
        let disk = env.disk("g");
        guest::overlay(image, &disk);
        let seed = env.images.join("seed.iso");
        let name = env.name("g");
        guest::hand_seed(
            &seed,
            &format!("instance-id: {name}-1\nlocal-hostname: guest\n"),
            "#cloud-config\n",
            network_config,
        );
        Self {
            name,
            image,
            disk,
            kernel,
            initrd,
            seed,
            network: None,
        }
    }

    /// The domain XML with `extra` appended to the kernel command line.
    fn xml(&self, extra: &str) -> String {
        GuestXml {
            name: &self.name,
            domain_type: self.image.domain_type,
            disk: &self.disk,
            kernel: &self.kernel,
            initrd: &self.initrd,
            cmdline: &format!("{}{extra}", self.image.cmdline),
            seed: Some(&self.seed),
            network: self.network.as_deref(),
            memory_mib: 512,
        }
        .xml()
    }

    /// The `[[vm]]`: started, restarted on change (gracefully: the guest honours ACPI),
    /// with `[vm.health]` lines `health`.
    fn vm(&self, extra: &str, health: &str) -> Vm {
        Vm::new(&self.name)
            .key(&format!(
                "autostart = true\non_change = \"restart\"\nshutdown_timeout = \"2m\"\n[vm.health]\n{health}"
            ))
            .xml(&self.xml(extra))
    }
}

/// `vmsync --once`, printing how long it took (it boots guests) and, from its log, how
/// long the guest took from its start to its agent's first answer.
fn timed_run(env: &Env, image: &Image, what: &str) -> (common::Run, Duration) {
    let started = Instant::now();
    let run = env.run(&["--once"]);
    let took = started.elapsed();
    let boot = boot_seconds(&run.stderr).map_or("-".to_string(), |s| format!("{s:.1} s"));
    eprintln!(
        "{what} ({}): vmsync --once took {:.1} s; boot to the guest agent {boot}",
        image.domain_type,
        took.as_secs_f64(),
    );
    (run, took)
}

/// The seconds between the last `checking health` line of a vmsync log (right after
/// the start) and the `guest agent answered` line after it.
fn boot_seconds(log: &str) -> Option<f64> {
    let time =
        |line: &str| chrono::DateTime::parse_from_rfc3339(line.split_whitespace().next()?).ok();
    let lines: Vec<&str> = log.lines().collect();
    let answered = lines
        .iter()
        .position(|l| l.contains("guest agent answered"))?;
    let checking = lines[..answered]
        .iter()
        .rposition(|l| l.contains("checking health"))?;
    let span = time(lines[answered])? - time(lines[checking])?;
    Some(span.num_milliseconds() as f64 / 1000.0)
}

/// A check that is healthy when sshd answers at one of the addresses vmsync gives it
/// (`VMSYNC_VM_ADDRESSES`: the guest's DHCP lease) within `$1` seconds: its banner, read
/// over TCP with bash's /dev/tcp.
const SSH_CHECK: &str = r#"#!/bin/bash
echo "vm $VMSYNC_VM_NAME addresses: [$VMSYNC_VM_ADDRESSES]"
deadline=$((SECONDS + $1))
while [ "$SECONDS" -lt "$deadline" ]; do
  for addr in $VMSYNC_VM_ADDRESSES; do
    banner=$(timeout 3 bash -c "exec 3<>/dev/tcp/$addr/22 && head -c 7 <&3" 2>/dev/null)
    if [ "${banner:0:4}" = SSH- ]; then echo "sshd answers at $addr: $banner"; exit 0; fi
  done
  sleep 1
done
echo "no sshd at [$VMSYNC_VM_ADDRESSES] after $1 s"
exit 1
"#;

/// The check script in `dir` and an agent config allowing it; their paths.
fn ssh_check(dir: &Path) -> (PathBuf, PathBuf) {
    let script = dir.join("ssh-check");
    std::fs::write(&script, SSH_CHECK).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("[policy]\nhealth_commands = [\"{}\"]\n", dir.display()),
    )
    .unwrap();
    (script, config)
}

/// Whether sshd at `address` sends its banner: the guest is up and on the network.
fn ssh_banner(address: &str) -> bool {
    let Ok(addr) = format!("{address}:22").parse() else {
        return false;
    };
    let Ok(mut conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut banner = [0u8; 4];
    std::io::Read::read_exact(&mut conn, &mut banner).is_ok() && &banner == b"SSH-"
}

#[test]
fn real_guest_agent_and_a_check_over_a_libvirt_network() {
    let Some(mut env) = Env::system("ghealth") else {
        return;
    };
    let Some(image) = guest::image() else {
        return;
    };
    let net = TestNetwork::create(&env.prefix);
    let mut g = Guest::new(&env, image, None);
    g.network = Some(net.name.clone());
    let checks = tempfile::tempdir().unwrap();
    let (script, config) = ssh_check(checks.path());
    env.config_file = Some(config);
    let limit = image.boot_limit().as_secs();
    let health = format!(
        "settle = \"1s\"\ntimeout = \"{limit}s\"\nguest_agent = true\ncommand = [\"{}\", \"60\"]",
        script.display()
    );
    let c1 = env.commit(&Manifest::new().vm(g.vm("", &health)), "guest");
    let (run, first_boot) = timed_run(&env, image, "first boot, agent and sshd checked");
    let run = run.expect(0);
    run.stderr_has("guest agent answered");
    // vmsync gave the check the guest's lease on the test's network.
    let at = run
        .stderr
        .find(&format!("sshd answers at {}", net.subnet))
        .expect("sshd answered on the test's network");
    let address = run.stderr[at + "sshd answers at ".len()..]
        .split(':')
        .next()
        .unwrap()
        .to_string();
    run.stderr_has(&format!("sshd answers at {address}: SSH-2.0"));
    run.stderr_has("health command passed");
    run.stderr_has("healthy: kept as the last healthy definition");
    let st = env.vm_status("g");
    assert_eq!(st["health"]["result"], "healthy", "{st}");
    assert_eq!(st["health"]["last_healthy_commit"], c1.as_str());
    // The real guest: its agent runs commands and reads files; the address checked
    // is its own, from its seed.
    let release = guest::read_file(&g.name, "/etc/os-release").unwrap();
    assert!(String::from_utf8_lossy(&release).contains("bookworm"));
    let active = guest::exec_ok(&g.name, &["systemctl", "is-active", "qemu-guest-agent"]);
    assert_eq!(active.trim(), "active");
    let ip = guest::exec_ok(&g.name, &["ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(ip.contains(&format!("{address}/24")), "{ip}");
    let uuid = virsh_ok(&["domuuid", &g.name]);

    // The same guest booted with its agent masked: no answer within one and a half
    // times the first sync's time (at least a minute), unhealthy, kept (revert = false).
    let wait = (first_boot.as_secs() * 3 / 2).max(60);
    let masked = format!(
        "settle = \"1s\"\ntimeout = \"{wait}s\"\nguest_agent = true\nrevert = false\ncommand = [\"{}\", \"60\"]",
        script.display()
    );
    env.commit(
        &Manifest::new().vm(g.vm(" systemd.mask=qemu-guest-agent.service", &masked)),
        "agent masked",
    );
    let (run, _) = timed_run(&env, image, "reboot with the agent masked");
    let run = run.expect(1);
    run.stderr_has("the guest agent did not answer a ping within the timeout (");
    run.stderr_has("not reverted");
    assert_eq!(env.vm_status("g")["health"]["result"], "unhealthy");
    assert_eq!(virsh_ok(&["domuuid", &g.name]), uuid);
    // The guest is up (sshd answers on the network), only its agent is not.
    let deadline = Instant::now() + image.boot_limit();
    while !ssh_banner(&address) {
        assert!(
            Instant::now() < deadline,
            "the masked guest never came up; console:\n{}",
            guest::console_tail(&g.disk, 40)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(!guest::ping(&g.name), "the agent is masked in this boot");
}

/// The user-data template of the end-to-end test: hostname `host`, a user `tester` with
/// the SSH key `key`, and `/etc/vmsync-secret` holding the repository's `.age` secret
/// (decrypted on the host by `secret()`). `locale: false`: the test image has no
/// locales, so cloud-init's locale module would fail.
fn user_data(host: &str, key: &str) -> String {
    format!(
        "#cloud-config\nlocale: false\nhostname: {host}\nusers:\n  - name: tester\n    shell: /bin/bash\n    \
         ssh_authorized_keys:\n      - {key}\nwrite_files:\n  - path: /etc/vmsync-secret\n    \
         permissions: '0600'\n    content: |\n      {{{{ secret(\"secrets/motd.age\") }}}}\n"
    )
}

/// Waits until cloud-init has finished in the guest `name` (`cloud-init status`);
/// fails, with its warnings and errors, when it reports an error.
fn cloud_init_done(name: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let run = guest::exec(name, &["cloud-init", "status"]);
        if run.stdout.contains("status: done") {
            return;
        }
        if run.stdout.contains("status: error") {
            let long = guest::exec(name, &["cloud-init", "status", "--long"]);
            let log = guest::exec(
                name,
                &[
                    "grep",
                    "-E",
                    "WARNING|ERROR|Traceback",
                    "/var/log/cloud-init.log",
                ],
            );
            panic!("{name}: cloud-init: {}\n{}", long.stdout, log.stdout);
        }
        assert!(
            Instant::now() < deadline,
            "cloud-init never finished: {run:?}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// What cloud-init made of the seed in the guest `name`: its hostname, the secret
/// file, tester's authorized keys and the instance id.
fn applied(name: &str) -> [String; 4] {
    let read = |path: &str| {
        let bytes = guest::read_file(name, path).unwrap_or_else(|| panic!("{name}: {path}"));
        String::from_utf8(bytes).unwrap().trim().to_string()
    };
    [
        guest::exec_ok(name, &["hostname"]).trim().to_string(),
        read("/etc/vmsync-secret"),
        read("/home/tester/.ssh/authorized_keys"),
        read("/var/lib/cloud/data/instance-id"),
    ]
}

/// The disk's inode and backing file, the domain's UUID and its MACs: what must stay.
fn identity(env: &Env, disk: &Path) -> (u64, serde_json::Value, String, String) {
    use std::os::unix::fs::MetadataExt;
    let name = env.name("g");
    (
        std::fs::metadata(disk).unwrap().ino(),
        common::qemu_img_info(disk)["backing-filename"].clone(),
        virsh_ok(&["domuuid", &name]),
        virsh_ok(&["domiflist", &name]),
    )
}

#[test]
fn real_guest_comes_up_from_a_commit_and_takes_a_changed_seed_on_restart() {
    let Some(mut env) = Env::system("ge2e") else {
        return;
    };
    let Some(image) = guest::image() else {
        return;
    };
    let (kernel, initrd) = guest::boot_files(image, &env.images);
    // The image, served over HTTP; the host's SSH key decrypts the secrets.
    let sha = common::sha256_file(&image.disk);
    let server = vmsync::testing::http_server(vec![(
        "/debian-12.qcow2",
        vmsync::testing::Reply::Body(std::fs::read(&image.disk).unwrap()),
    )]);
    let host_key = seeds::HostKey::ssh(env.state.path());
    let policy = format!(
        "image_urls = [\"http://127.0.0.1\"]\nimage_dir = \"{}\"",
        env.images.join("base").display()
    );
    let seed_dir = env.images.join("seeds");
    seeds::configure(&mut env, &seed_dir, &host_key.path, &policy);
    let user = common::SigningKey::new("ed25519");
    let (name, disk) = (env.name("g"), env.disk("g"));
    let xml = GuestXml {
        name: &name,
        domain_type: image.domain_type,
        disk: &disk,
        kernel: &kernel,
        initrd: &initrd,
        cmdline: &image.cmdline,
        seed: None,
        network: None,
        memory_mib: 512,
    }
    .xml();
    env.repo.write(
        "vmsync.toml",
        &format!(
            "version = 1\n\n[[image]]\nname = \"debian-12\"\nurl = \"{}/debian-12.qcow2\"\nsha256 = \"{sha}\"\n\n\
             [[vm]]\nname = \"{name}\"\nxml = \"vms/g.xml\"\nautostart = true\nshutdown_timeout = \"2m\"\n\n  \
             [[vm.disk]]\n  path = \"{}\"\n  size = \"4G\"\n  image = \"debian-12\"\n\n  \
             [vm.cloud_init]\n  user_data = \"cloud-init/user-data.yaml.j2\"\n  on_change = \"restart\"\n",
            server.base,
            disk.display()
        ),
    );
    env.repo.write("vms/g.xml", &xml);
    let commit_seed = |host: &str, secret: &str, message: &str| {
        env.repo.write(
            "cloud-init/user-data.yaml.j2",
            &user_data(host, &user.public),
        );
        std::fs::create_dir_all(env.repo.path().join("secrets")).unwrap();
        std::fs::write(
            env.repo.path().join("secrets/motd.age"),
            host_key.encrypt(secret.as_bytes()),
        )
        .unwrap();
        env.repo.commit(message)
    };
    commit_seed(
        "guest-one",
        "the first secret",
        "a guest from an image and a seed",
    );

    let (run, _) = timed_run(&env, image, "first boot from the image and the seed");
    let run = run.expect(0);
    run.stderr_has("downloading image");
    run.stderr_has("image in place");
    assert!(!run.stderr.contains("the first secret") && !run.stdout.contains("the first secret"));
    let started = Instant::now();
    guest::wait_for_agent(&name, started, image.boot_limit(), &disk);
    cloud_init_done(&name, image.boot_limit());
    let [host, secret, keys, first_iid] = applied(&name);
    assert_eq!(host, "guest-one");
    assert_eq!(secret, "the first secret");
    assert!(keys.contains(&user.public), "{keys}");
    assert!(first_iid.starts_with("iid-"), "{first_iid}");
    let before = identity(&env, &disk);
    assert!(
        before.1.as_str().is_some_and(|b| b.contains("/base/")),
        "{before:?}"
    );
    let state = env.state_json().unwrap();
    assert!(!state.contains("the first secret"));

    // A new hostname and secret in git: the seed is rebuilt, the guest restarted, and
    // cloud-init applies the new instance; disk, UUID and MACs stay.
    commit_seed("guest-two", "the second secret", "new hostname and secret");
    let (run, _) = timed_run(&env, image, "restart with the changed seed");
    let run = run.expect(0);
    run.stderr_has("shut down gracefully");
    assert!(!run.stderr.contains("the second secret"));
    guest::wait_for_agent(&name, Instant::now(), image.boot_limit(), &disk);
    cloud_init_done(&name, image.boot_limit());
    let [host, secret, keys, iid] = applied(&name);
    assert_eq!(host, "guest-two");
    assert_eq!(secret, "the second secret");
    assert!(keys.contains(&user.public), "{keys}");
    assert_ne!(iid, first_iid);
    assert_eq!(
        identity(&env, &disk),
        before,
        "disk inode and backing, UUID, MACs"
    );
}
