//! The daemon's systemd watchdog (`WatchdogSec=` in vmsync-agent.service): a task on the
//! daemon's async loop sends `WATCHDOG=1` every half period, but only while the loop
//! makes progress: between syncs, and during a sync younger than `[agent] tick_timeout`.
//! A sync that hangs (a libvirt call, a fetch from a server that accepts and never
//! answers) past that bound stops the pings, and systemd kills and restarts the daemon.
//! A stuck async loop stops them too (the task runs on it). Without `WATCHDOG_USEC`
//! (not under systemd, or no `WatchdogSec=`) nothing is sent.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct State {
    tick_started: Option<Instant>,
    bound: Duration,
}

/// The watchdog's view of the loop.
#[derive(Debug, Clone)]
pub struct Watchdog {
    state: Arc<Mutex<State>>,
}

/// A sync in progress; dropping it (the sync ended) marks the loop idle again.
pub struct Tick {
    state: Arc<Mutex<State>>,
}

impl Drop for Tick {
    fn drop(&mut self) {
        self.state.lock().expect("watchdog lock").tick_started = None;
    }
}

/// Whether the loop counts as making progress at `now`.
pub fn progressing(tick_started: Option<Instant>, now: Instant, bound: Duration) -> bool {
    match tick_started {
        None => true,
        Some(started) => now.saturating_duration_since(started) < bound,
    }
}

/// Starts the pinging task when systemd asked for a watchdog (call inside the runtime).
pub fn start(bound: Duration) -> Watchdog {
    let watchdog = Watchdog {
        state: Arc::new(Mutex::new(State {
            tick_started: None,
            bound,
        })),
    };
    if let Some(period) = sd_notify::watchdog_enabled() {
        let every = (period / 2).max(Duration::from_millis(100));
        tracing::info!(
            watchdog_seconds = period.as_secs_f64(),
            tick_timeout_seconds = bound.as_secs(),
            "systemd watchdog on"
        );
        let state = watchdog.state.clone();
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                let (started, bound) = {
                    let s = state.lock().expect("watchdog lock");
                    (s.tick_started, s.bound)
                };
                if progressing(started, Instant::now(), bound) {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    warned = false;
                } else if !warned {
                    tracing::error!(
                        tick_timeout_seconds = bound.as_secs(),
                        "the sync has run longer than [agent] tick_timeout: no more watchdog pings; systemd will restart the daemon"
                    );
                    warned = true;
                }
                tokio::time::sleep(every).await;
            }
        });
    }
    watchdog
}

impl Watchdog {
    /// A sync starts now.
    pub fn tick(&self) -> Tick {
        self.state.lock().expect("watchdog lock").tick_started = Some(Instant::now());
        Tick {
            state: self.state.clone(),
        }
    }

    /// A reloaded `[agent] tick_timeout`.
    pub fn set_bound(&self, bound: Duration) {
        self.state.lock().expect("watchdog lock").bound = bound;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_stop_when_a_sync_outlives_its_bound() {
        let t0 = Instant::now();
        let bound = Duration::from_secs(60);
        assert!(
            progressing(None, t0 + Duration::from_secs(3600), bound),
            "idle"
        );
        assert!(progressing(Some(t0), t0 + Duration::from_secs(59), bound));
        assert!(!progressing(Some(t0), t0 + Duration::from_secs(60), bound));
    }

    #[test]
    fn a_finished_sync_marks_the_loop_idle() {
        let w = Watchdog {
            state: Arc::new(Mutex::new(State {
                tick_started: None,
                bound: Duration::from_secs(1),
            })),
        };
        let tick = w.tick();
        assert!(w.state.lock().unwrap().tick_started.is_some());
        drop(tick);
        assert!(w.state.lock().unwrap().tick_started.is_none());
    }
}
