//! Powering a domain off the way vmsync does it: an ACPI shutdown request, a wait of up
//! to the VM's shutdown timeout, and a destroy only then. Used by apply (stop, restart,
//! prune) and by the health stage's revert.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::host::hypervisor::{HvError, Hypervisor};

/// How often the domain's state is read while waiting for it to shut down.
const POLL: Duration = Duration::from_millis(250);

/// The error a VM gets when vmsync stops while waiting for its guest to shut down.
pub const SHUTDOWN_INTERRUPTED: &str = "interrupted: vmsync is stopping; the guest was asked to shut down and was still running (not destroyed); the next run continues";

/// How a domain came to be off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running.
    AlreadyOff,
    /// The guest shut down within the timeout.
    Graceful,
    /// Still running after `after` (the shutdown timeout): destroyed.
    Destroyed { after: Duration },
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::AlreadyOff => f.write_str("already shut off"),
            Stopped::Graceful => f.write_str("shut down gracefully"),
            Stopped::Destroyed { after } => write!(
                f,
                "shutdown requested, still running after {}, destroyed",
                humantime::format_duration(*after)
            ),
        }
    }
}

/// Why a domain could not be stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopError {
    /// vmsync is stopping: the wait ended, the guest was not destroyed.
    #[error("{}", SHUTDOWN_INTERRUPTED)]
    Interrupted,
    /// libvirt refused the state query or the shutdown request.
    #[error("{0}")]
    Hv(HvError),
    /// The destroy after the shutdown timeout failed.
    #[error("after the shutdown timeout, {0}")]
    DestroyFailed(HvError),
}

/// Shuts `name` down gracefully: ACPI request, wait up to `timeout`, destroy only then.
/// When `cancel` becomes true during the wait, the wait ends (the guest is not
/// destroyed) with [`StopError::Interrupted`].
pub fn graceful_stop(
    hv: &dyn Hypervisor,
    name: &str,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<Stopped, StopError> {
    if !hv.is_active(name).map_err(StopError::Hv)? {
        return Ok(Stopped::AlreadyOff);
    }
    hv.shutdown(name).map_err(StopError::Hv)?;
    let secs = humantime::format_duration(timeout);
    info!(vm = %name, timeout = %secs, "graceful shutdown requested");
    let started = Instant::now();
    loop {
        if !hv.is_active(name).map_err(StopError::Hv)? {
            info!(vm = %name, "shut down gracefully");
            return Ok(Stopped::Graceful);
        }
        if cancel.load(Ordering::SeqCst) {
            let waited =
                humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()));
            warn!(vm = %name, waited = %waited, "vmsync is stopping: no longer waiting for the guest to shut down");
            return Err(StopError::Interrupted);
        }
        if started.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(
            POLL.min(timeout.saturating_sub(started.elapsed()))
                .max(Duration::from_millis(10)),
        );
    }
    warn!(vm = %name, timeout = %secs, "still running after the shutdown timeout; destroying");
    match hv.destroy(name) {
        Ok(()) => Ok(Stopped::Destroyed { after: timeout }),
        // It may have gone off between the last poll and the destroy.
        Err(_) if !hv.is_active(name).unwrap_or(true) => Ok(Stopped::Graceful),
        Err(e) => Err(StopError::DestroyFailed(e)),
    }
}
