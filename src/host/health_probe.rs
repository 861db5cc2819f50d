//! Health checks and reverts on the host, the side effects of `[vm.health]`: watching
//! that a domain stays running for `settle`, pinging the QEMU guest agent, running the
//! check command with the VM's name, UUID and addresses in its environment, and putting
//! a last healthy definition back in place. What to check and what follows is decided in
//! `reconcile::health_rules` (the stage that runs the checks is `apply::health_stage`).
//!
//! The whole check runs within `timeout`, counted from the start of the check: first
//! `settle` (the domain is polled; any state but running or blocked fails it at once),
//! then the guest agent ping (tried until it answers), then the command (killed when the
//! timeout passes).

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::desired::health_spec::HealthSpec;
use crate::desired::path_rule;
use crate::host::hypervisor::Hypervisor;
use crate::host::power::graceful_stop;

/// How often a settling domain's state is polled, and a child's exit.
const POLL: Duration = Duration::from_millis(250);

/// Most of a command's output read for the log.
const OUTPUT_LIMIT: usize = 4 * 1024;
/// Most lines of a command's output logged.
const OUTPUT_LINES: usize = 20;
/// Most characters of one output line logged.
const OUTPUT_LINE_CHARS: usize = 200;

/// How a check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// What failed.
    Unhealthy(String),
    /// vmsync is stopping: the check did not finish.
    Interrupted,
}

/// Checks the health of domain `name` (UUID `uuid`) by `spec`, now.
pub fn check(
    hv: &dyn Hypervisor,
    name: &str,
    uuid: &str,
    spec: &HealthSpec,
    cancel: &AtomicBool,
) -> Verdict {
    let started = Instant::now();
    // A timeout of centuries (any number of seconds parses) must not overflow.
    let deadline = started
        .checked_add(spec.timeout)
        .unwrap_or(started + Duration::from_secs(u64::from(u32::MAX)));
    info!(vm = %name, settle = %humantime::format_duration(spec.settle), timeout = %humantime::format_duration(spec.timeout), "checking health");
    // Settle: running the whole time.
    loop {
        match hv.run_state(name) {
            Ok(state) if state.is_running() => {}
            Ok(state) => {
                return Verdict::Unhealthy(format!(
                    "{state} {} after the start, before settle ({}) passed",
                    secs(started.elapsed()),
                    humantime::format_duration(spec.settle)
                ));
            }
            Err(e) => return Verdict::Unhealthy(e.to_string()),
        }
        if started.elapsed() >= spec.settle {
            break;
        }
        if cancel.load(Ordering::SeqCst) {
            return Verdict::Interrupted;
        }
        std::thread::sleep(POLL.min(spec.settle.saturating_sub(started.elapsed())));
    }
    if spec.guest_agent {
        let mut last = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Verdict::Unhealthy(format!(
                    "the guest agent did not answer a ping within the timeout ({}): {last}",
                    humantime::format_duration(spec.timeout)
                ));
            }
            match hv.agent_ping(name, left.min(Duration::from_secs(5))) {
                Ok(()) => {
                    info!(vm = %name, "guest agent answered");
                    break;
                }
                Err(e) => last = e.message,
            }
            if cancel.load(Ordering::SeqCst) {
                return Verdict::Interrupted;
            }
            std::thread::sleep(Duration::from_secs(1).min(left));
        }
    }
    if let Some(command) = &spec.command {
        let addresses = hv.addresses(name).join(" ");
        let env = [
            ("VMSYNC_VM_NAME", name.to_string()),
            ("VMSYNC_VM_UUID", uuid.to_string()),
            ("VMSYNC_VM_ADDRESSES", addresses),
        ];
        if let Err(e) = run_command(name, command, &env, deadline, cancel) {
            return e;
        }
    }
    // Still running after the command (it may have taken a while).
    match hv.run_state(name) {
        Ok(state) if state.is_running() => Verdict::Healthy,
        Ok(state) => Verdict::Unhealthy(format!("{state} at the end of the check")),
        Err(e) => Verdict::Unhealthy(e.to_string()),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Runs the check command with `env` added to its environment, its output (stdout and
/// stderr, in one file) logged; killed at `deadline`.
fn run_command(
    vm: &str,
    command: &[String],
    env: &[(&str, String)],
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<(), Verdict> {
    let shown = path_rule::escape(&command.join(" "));
    let output = tempfile::tempfile().map_err(|e| {
        Verdict::Unhealthy(format!("failed to make the output file of '{shown}': {e}"))
    })?;
    let err_output = output.try_clone().map_err(|e| {
        Verdict::Unhealthy(format!("failed to make the output file of '{shown}': {e}"))
    })?;
    let mut child = Command::new(&command[0])
        .args(&command[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(
            output
                .try_clone()
                .map_err(|e| Verdict::Unhealthy(e.to_string()))?,
        )
        .stderr(err_output)
        .spawn()
        .map_err(|e| Verdict::Unhealthy(format!("failed to run '{shown}': {e}")))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(e) => {
                warn!(vm = %vm, error = %e, "failed to wait for the health command");
                break None;
            }
        }
        if Instant::now() >= deadline || cancel.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(POLL);
    };
    log_output(vm, &shown, output);
    match status {
        Some(s) if s.success() => {
            info!(vm = %vm, command = %shown, took = %secs(started.elapsed()), "health command passed");
            Ok(())
        }
        Some(s) => Err(Verdict::Unhealthy(format!(
            "health command '{shown}' {}",
            match s.code() {
                Some(code) => format!("exited with status {code}"),
                None => "was killed by a signal".into(),
            }
        ))),
        None if cancel.load(Ordering::SeqCst) => Err(Verdict::Interrupted),
        None => Err(Verdict::Unhealthy(format!(
            "health command '{shown}' gave no answer within the timeout (killed after {})",
            secs(started.elapsed())
        ))),
    }
}

/// Logs the start of a command's output, bounded and escaped: at most
/// [`OUTPUT_LINES`] lines of at most [`OUTPUT_LINE_CHARS`] characters from the first
/// [`OUTPUT_LIMIT`] bytes, control characters shown as escapes (a check's output must
/// not fill the journal or forge log lines, and is not meant to carry data).
fn log_output(vm: &str, command: &str, mut file: std::fs::File) {
    use std::io::Seek;
    let mut bytes = Vec::new();
    let total = file.seek(std::io::SeekFrom::End(0)).unwrap_or(0);
    let _ = file.seek(std::io::SeekFrom::Start(0));
    let _ = file.take(OUTPUT_LIMIT as u64).read_to_end(&mut bytes);
    let (lines, omitted) = bounded_output(&bytes, total);
    for line in lines {
        info!(vm = %vm, command = %command, line = %line, "health command output");
    }
    if omitted > 0 {
        info!(vm = %vm, command = %command, omitted_bytes = omitted, "health command output cut");
    }
}

/// The lines [`log_output`] logs, and how many bytes of `total` it leaves out.
fn bounded_output(bytes: &[u8], total: u64) -> (Vec<String>, u64) {
    let text = String::from_utf8_lossy(bytes);
    let mut shown = 0usize;
    let mut lines = Vec::new();
    for line in text.split_inclusive('\n').take(OUTPUT_LINES) {
        shown += line.len();
        let line = line.trim_end_matches(['\n', '\r']);
        let cut: String = line.chars().take(OUTPUT_LINE_CHARS).collect();
        let mut escaped = path_rule::escape(&cut);
        if cut.len() < line.len() {
            escaped.push('…');
        }
        lines.push(escaped);
    }
    (lines, total.saturating_sub(shown.min(bytes.len()) as u64))
}

/// Puts `healthy_xml` back as the definition of `name`, in place (the same UUID, so the
/// same NVRAM and TPM state; no disk is touched): the running domain is shut down
/// gracefully (destroyed after `shutdown_timeout`), the definition redefined, the domain
/// started. Returns the definition libvirt holds then (inactive XML).
pub fn revert(
    hv: &dyn Hypervisor,
    name: &str,
    healthy_xml: &str,
    shutdown_timeout: Duration,
    cancel: &AtomicBool,
) -> Result<String, String> {
    let how = graceful_stop(hv, name, shutdown_timeout, cancel).map_err(|e| e.to_string())?;
    info!(vm = %name, how = %how, "stopped for the revert");
    hv.define(healthy_xml).map_err(|e| e.to_string())?;
    let after = hv.xml(name, true).map_err(|e| e.to_string())?;
    hv.start(name).map_err(|e| e.to_string())?;
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::hypervisor::RunState;
    use crate::testing::FakeHost;

    fn state(state: &'static str, reason: &str) -> RunState {
        RunState {
            state,
            reason: reason.into(),
        }
    }

    /// A domain whose state follows `states` (the i-th poll, the last one after), whose
    /// guest agent answers from the `agent_from`-th ping on, with two addresses.
    fn scripted(states: Vec<RunState>, agent_from: usize) -> FakeHost {
        let mut hv = FakeHost::scripted(states, agent_from);
        hv.addresses = vec!["192.0.2.7".into(), "2001:db8::7".into()];
        hv
    }

    #[test]
    fn a_commands_output_is_logged_bounded_and_escaped() {
        let mut out = String::from("ok\x1b[2J\nroot:$6$secret\r\n");
        out += &"x".repeat(500);
        out += "\n";
        for i in 0..100 {
            out += &format!("line {i}\n");
        }
        let (lines, omitted) = bounded_output(out.as_bytes(), out.len() as u64 + 1_000_000);
        assert_eq!(lines.len(), OUTPUT_LINES);
        assert_eq!(lines[0], "ok\\u{1b}[2J");
        assert_eq!(lines[1], "root:$6$secret");
        assert_eq!(
            lines[2].chars().count(),
            OUTPUT_LINE_CHARS + 1,
            "cut with …"
        );
        assert!(omitted > 1_000_000, "{omitted}");
        assert!(lines.iter().all(|l| !l.chars().any(char::is_control)));
    }

    fn spec(settle_ms: u64, timeout_ms: u64, command: Option<Vec<String>>) -> HealthSpec {
        HealthSpec {
            settle: Duration::from_millis(settle_ms),
            command,
            timeout: Duration::from_millis(timeout_ms),
            revert: true,
            guest_agent: false,
        }
    }

    static GO: AtomicBool = AtomicBool::new(false);

    #[test]
    fn settle_fails_on_any_state_but_running() {
        let running = state("running", "booted");
        let hv = scripted(vec![running.clone(), running.clone()], 0);
        assert_eq!(
            check(&hv, "web", "u", &spec(300, 5000, None), &GO),
            Verdict::Healthy
        );
        for bad in [
            state("shut off", "failed"),
            state("paused", "user"),
            state("crashed", "panicked"),
        ] {
            let hv = scripted(vec![running.clone(), bad.clone()], 0);
            let Verdict::Unhealthy(why) = check(&hv, "web", "u", &spec(2000, 5000, None), &GO)
            else {
                panic!("{bad:?} passed");
            };
            assert!(why.starts_with(&bad.to_string()), "{why}");
            assert!(why.contains("before settle (2s) passed"), "{why}");
        }
        // Blocked on a resource is still running.
        let hv = scripted(vec![state("blocked", "")], 0);
        assert_eq!(
            check(&hv, "web", "u", &spec(300, 5000, None), &GO),
            Verdict::Healthy
        );
    }

    #[test]
    fn the_command_gets_the_vms_identity_and_its_exit_status_decides() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("env");
        let script = dir.path().join("check");
        crate::testing::executable_script(
            &script,
            &format!(
                "#!/bin/sh\necho \"$VMSYNC_VM_NAME $VMSYNC_VM_UUID $VMSYNC_VM_ADDRESSES\" > {}\necho checking; exit \"$1\"\n",
                seen.display()
            ),
        );
        let cmd = |arg: &str| Some(vec![script.display().to_string(), arg.to_string()]);
        let hv = scripted(vec![state("running", "booted")], 0);
        assert_eq!(
            check(&hv, "web", "uuid-1", &spec(0, 5000, cmd("0")), &GO),
            Verdict::Healthy
        );
        assert_eq!(
            std::fs::read_to_string(&seen).unwrap(),
            "web uuid-1 192.0.2.7 2001:db8::7\n"
        );
        assert!(
            std::env::var_os("VMSYNC_VM_NAME").is_none(),
            "set on the command, not on vmsync"
        );
        assert_eq!(
            check(&hv, "web", "uuid-1", &spec(0, 5000, cmd("3")), &GO),
            Verdict::Unhealthy(format!(
                "health command '{} 3' exited with status 3",
                script.display()
            ))
        );
        // No answer within the timeout: killed, unhealthy.
        let started = Instant::now();
        let slow = Some(vec!["sleep".to_string(), "30".to_string()]);
        let Verdict::Unhealthy(why) = check(&hv, "web", "u", &spec(0, 1000, slow), &GO) else {
            panic!("a hung command passed");
        };
        assert!(why.contains("gave no answer within the timeout"), "{why}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let missing = Some(vec!["/nonexistent/check".to_string()]);
        let Verdict::Unhealthy(why) = check(&hv, "web", "u", &spec(0, 1000, missing), &GO) else {
            panic!("a missing command passed");
        };
        assert!(
            why.starts_with("failed to run '/nonexistent/check'"),
            "{why}"
        );
    }

    #[test]
    fn the_guest_agent_must_answer_within_the_timeout() {
        let mut s = spec(0, 4000, None);
        s.guest_agent = true;
        let hv = scripted(vec![state("running", "booted")], 2);
        assert_eq!(check(&hv, "web", "u", &s, &GO), Verdict::Healthy);
        assert_eq!(hv.pings(), 2);
        let mut s = spec(0, 1500, None);
        s.guest_agent = true;
        let hv = scripted(vec![state("running", "booted")], usize::MAX);
        let Verdict::Unhealthy(why) = check(&hv, "web", "u", &s, &GO) else {
            panic!("a silent agent passed");
        };
        assert!(
            why.starts_with("the guest agent did not answer a ping within the timeout (1s 500ms)")
                && why.contains("Guest agent is not responding"),
            "{why}"
        );
    }

    #[test]
    fn a_timeout_of_centuries_does_not_overflow() {
        let hv = scripted(vec![state("running", "booted")], 0);
        let mut s = spec(0, 0, Some(vec!["true".into()]));
        s.timeout = Duration::from_secs(u64::MAX);
        assert_eq!(check(&hv, "web", "u", &s, &GO), Verdict::Healthy);
    }

    #[test]
    fn a_stop_request_ends_the_check() {
        static STOP: AtomicBool = AtomicBool::new(true);
        let hv = scripted(vec![state("running", "booted")], 0);
        assert_eq!(
            check(&hv, "web", "u", &spec(5000, 10000, None), &STOP),
            Verdict::Interrupted
        );
    }
}
