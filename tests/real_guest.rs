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
//! Each boot's time is printed. Without a reachable `qemu:///system` or the image these
//! tests skip with a message, unless `VMSYNC_REQUIRE_LIBVIRTD` is set: then they fail.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::guest::{self, GuestXml, Image, TestNetwork};
use common::{Env, Manifest, Vm, virsh_system_ok as virsh_ok};

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
