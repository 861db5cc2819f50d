//! Daemon mode (`vmsync` without `--once`): sync at start, then on `[agent] schedule`
//! plus a per-host jitter, with capped backoff after failures; SIGHUP reloads the config
//! and syncs now; SIGTERM/SIGINT let the action in flight finish, then exit 0. With
//! `[webhook] listen`, a signed push also syncs now (`agent::webhook`): the loop runs at
//! most one sync at a time, with at most one more queued.
//!
//! The sync itself (git2, libvirt, qemu-img) runs on a blocking thread, off the async
//! runtime; between ticks the process sleeps in the kernel (no CPU). The libvirt
//! connection is kept across syncs and reopened when it died. Scheduling is a pure
//! function of the clock ([`next_attempt`]), tested with fixed times.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::agent::report::Report;
use crate::agent::sync::{self, Connection, Options, SyncError};
use crate::agent::webhook::{self, Hub, Secret};
use crate::agent::{metrics, notify, watchdog};
use crate::config::{self, ConfigError, Overrides, Settings};
use crate::reconcile::window_gate;
use crate::record::store;
use crate::repo::probe;
use crate::util::commit_id;

/// The per-host delay added to every tick: stable for a host, spread over the fleet.
pub fn jitter(host: &str, max_seconds: u64) -> Duration {
    if max_seconds == 0 {
        return Duration::ZERO;
    }
    let digest = Sha256::digest(host.as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    Duration::from_secs(n % (max_seconds + 1))
}

/// Backoff after `failures` consecutive failed syncs: 10 s, 20 s, 40 s … capped.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let secs = 10u64.saturating_mul(1u64 << (failures - 1).min(30));
    Duration::from_secs(secs).min(max)
}

/// When to sync next: the first tick of `schedule` at or after `now + backoff`, plus the
/// host's jitter. `None` if the schedule has no future tick.
pub fn next_attempt(
    schedule: &cron::Schedule,
    now: DateTime<Utc>,
    jitter: Duration,
    failures: u32,
    backoff_max: Duration,
) -> Option<DateTime<Utc>> {
    let earliest = now + chrono::Duration::from_std(backoff(failures, backoff_max)).ok()?;
    // Strictly after: a sync that ran at a tick's second is not repeated at that tick.
    let tick = schedule.after(&earliest).next()?;
    Some(tick + chrono::Duration::from_std(jitter).ok()?)
}

fn notify(status: &str) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(status)]);
}

/// Runs the daemon until SIGTERM/SIGINT; returns the exit status.
pub fn run(flags: Overrides, settings: Settings) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("failed to start the async runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(run_async(flags, settings))
}

/// Resolves when the webhook asked for a sync; never without a webhook.
async fn pushed(hub: &Option<Arc<Hub>>) {
    match hub {
        Some(hub) => hub.sync_requested().await,
        None => std::future::pending().await,
    }
}

/// The config with its webhook secret (read from `[webhook] secret_file`, if set): what
/// the daemon loads at start and on SIGHUP.
fn load_with_secret(flags: &Overrides) -> Result<(Settings, Option<Secret>), ConfigError> {
    let settings = config::load(flags)?;
    let secret = secret_of(&settings)?;
    Ok((settings, secret))
}

fn secret_of(settings: &Settings) -> Result<Option<Secret>, ConfigError> {
    settings
        .webhook
        .as_ref()
        .map(|w| webhook::read_secret(&w.secret_file).map_err(ConfigError))
        .transpose()
}

/// Starts the webhook listener of `settings`, if it has one. Its `/metrics` starts with
/// the record's figures until the first sync renders them anew. Exit status on failure:
/// 2 for the secret file (a config error), 1 when the address cannot be bound.
async fn start_webhook(settings: &Settings) -> Result<Option<Arc<Hub>>, (u8, String)> {
    let Some(config) = &settings.webhook else {
        return Ok(None);
    };
    let secret = webhook::read_secret(&config.secret_file).map_err(|e| (2, e))?;
    let record = store::load(&settings.state_dir).unwrap_or_default();
    let metrics = metrics::render(&record, None, Duration::ZERO);
    let hub = Hub::new(secret, &settings.branch, metrics);
    let listener = webhook::bind(config.listen).await.map_err(|e| (1, e))?;
    let addr = listener.local_addr().map_err(|e| (1, e.to_string()))?;
    info!(listen = %addr, path = webhook::PUSH_PATH, "webhook listening");
    tokio::spawn(webhook::serve(listener, hub.clone()));
    Ok(Some(hub))
}

async fn run_async(flags: Overrides, settings: Settings) -> u8 {
    let Some(mut signals) = Signals::install() else {
        error!("failed to install signal handlers");
        return 1;
    };
    let hub = match start_webhook(&settings).await {
        Ok(hub) => hub,
        Err((status, e)) => {
            error!("{e}");
            return status;
        }
    };
    let mut daemon = Daemon::new(flags, settings, hub);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    info!(schedule = %daemon.settings.schedule.source(), host = %daemon.settings.host, "daemon started");
    let mut due = Utc::now();
    let mut first = true;
    loop {
        let Some(trigger) = daemon.wait(&mut signals, due, first).await else {
            break;
        };
        first = false;
        info!(trigger, "sync started");
        let (result, stopping) = daemon.sync(&mut signals).await;
        notify(&daemon.status_after(&result, stopping));
        if stopping {
            break;
        }
        due = daemon.next_due();
    }
    daemon.stop();
    0
}

/// The signals the daemon answers: SIGHUP reloads, SIGTERM and SIGINT stop.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Option<Self> {
        match (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(hup), Ok(term), Ok(int)) => Some(Self { hup, term, int }),
            _ => None,
        }
    }
}

/// What woke the daemon between syncs.
enum Wake {
    Timer,
    Push,
    Hangup,
    Stop,
}

/// What the daemon carries from one sync to the next.
struct Daemon {
    flags: Overrides,
    settings: Settings,
    hub: Option<Arc<Hub>>,
    /// Kept across syncs; lent to the sync thread while one runs.
    conn: Option<Connection>,
    /// Consecutive failed syncs (the backoff).
    failures: u32,
    notifier: Option<Arc<notify::Notifier>>,
    watchdog: watchdog::Watchdog,
}

impl Daemon {
    fn new(flags: Overrides, settings: Settings, hub: Option<Arc<Hub>>) -> Self {
        let conn = Some(Connection::new(&settings.libvirt_uri));
        let notifier =
            notify::daemon_notifier(None, &settings.state_dir, &settings.host, &settings.notify);
        let watchdog = watchdog::start(settings.tick_timeout);
        Self {
            flags,
            settings,
            hub,
            conn,
            failures: 0,
            notifier,
            watchdog,
        }
    }

    /// Waits until `due`, a push or SIGHUP (which reloads the config first); returns what
    /// triggered the sync, or `None` on SIGTERM/SIGINT.
    async fn wait(
        &mut self,
        signals: &mut Signals,
        due: DateTime<Utc>,
        first: bool,
    ) -> Option<&'static str> {
        let wait = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        let wake = tokio::select! {
            _ = tokio::time::sleep(wait) => Wake::Timer,
            _ = pushed(&self.hub) => Wake::Push,
            _ = signals.hup.recv() => Wake::Hangup,
            _ = signals.term.recv() => Wake::Stop,
            _ = signals.int.recv() => Wake::Stop,
        };
        match wake {
            Wake::Timer if first => Some("start"),
            Wake::Timer => Some("schedule"),
            Wake::Push => {
                // A push notification knows better than a cached probe file.
                probe::force_next_fetch();
                Some("webhook")
            }
            Wake::Hangup => {
                self.reload();
                Some("sighup")
            }
            Wake::Stop => None,
        }
    }

    /// SIGHUP: the new config, its webhook secret and notify targets, or the old ones
    /// when it does not load.
    fn reload(&mut self) {
        match load_with_secret(&self.flags) {
            Ok((new, secret)) => {
                info!("SIGHUP: reloaded the config; syncing now");
                reload_webhook(self.hub.as_deref(), &self.settings, &new, secret);
                self.notifier = notify::daemon_notifier(
                    self.notifier.take(),
                    &new.state_dir,
                    &new.host,
                    &new.notify,
                );
                self.watchdog.set_bound(new.tick_timeout);
                self.settings = new;
            }
            Err(e) => error!(error = %e, "SIGHUP: keeping the old config; syncing now"),
        }
    }

    /// One sync on a blocking thread; SIGTERM/SIGINT meanwhile let the action in flight
    /// finish. Returns its result and whether the daemon is stopping.
    async fn sync(&mut self, signals: &mut Signals) -> (Result<Report, SyncError>, bool) {
        let cancel = Arc::new(AtomicBool::new(false));
        let mut connection = self
            .conn
            .take()
            .expect("connection is returned after every sync");
        connection.set_uri(&self.settings.libvirt_uri);
        let (job_settings, job_cancel) = (self.settings.clone(), cancel.clone());
        let max_attempts = self.settings.max_attempts;
        let render = self.hub.is_some();
        let events = self.notifier.as_ref().map(notify::SyncEvents::new);
        let tick = self.watchdog.tick();
        let job = tokio::task::spawn_blocking(move || {
            let _tick = tick;
            let options = Options {
                give_up_after: Some(max_attempts),
                cancel: &job_cancel,
                allow_rewind: false,
                retry: &[],
                events: events.as_ref(),
            };
            let (result, metrics) =
                sync::run_with_metrics(&job_settings, &mut connection, &options, render);
            (connection, result, metrics)
        });
        tokio::pin!(job);
        let mut stopping = false;
        let (connection, result, metrics) = loop {
            tokio::select! {
                done = &mut job => break done.expect("the sync thread does not panic"),
                _ = signals.term.recv() => { stopping = true; cancel.store(true, Ordering::SeqCst); info!("stopping after the action in flight"); }
                _ = signals.int.recv() => { stopping = true; cancel.store(true, Ordering::SeqCst); info!("stopping after the action in flight"); }
            }
        };
        self.conn = Some(connection);
        if let (Some(hub), Some(text)) = (&self.hub, metrics) {
            hub.set_metrics(text);
        }
        (result, stopping)
    }

    /// Logs a sync's result, counts a failure (or clears the count) and returns the
    /// status line for systemd.
    fn status_after(&mut self, result: &Result<Report, SyncError>, stopping: bool) -> String {
        match result {
            Ok(report) if report.held.host.is_some() => {
                self.failures = 0;
                format!(
                    "suspended: commit {} planned, not applied",
                    commit_id::short(&report.commit)
                )
            }
            Ok(report) => {
                self.failures = 0;
                format!(
                    "converged at {} ({} change(s))",
                    commit_id::short(&report.commit),
                    report.outcome.changes()
                )
            }
            Err(SyncError::Locked(e)) => {
                info!("{e}; trying again at the next tick");
                "skipped: another vmsync is running".to_string()
            }
            Err(e @ SyncError::GaveUp { .. }) => {
                warn!("{e}");
                e.to_string()
            }
            // Stopped in the middle: the VMs left are recorded as interrupted, and the
            // next start continues; not a failure of the commit.
            Err(e @ SyncError::ActionsFailed { .. }) if stopping => {
                warn!("stopped before the sync finished: {e}");
                format!("stopped before the sync finished: {e}")
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                error!(failures = self.failures, "sync failed: {e}");
                format!("failed: {e}")
            }
        }
    }

    /// When the next sync is due: the schedule, the backoff and the host's jitter; or
    /// the start of a maintenance window a restart, stop or prune waits for, if sooner.
    fn next_due(&self) -> DateTime<Utc> {
        let scheduled = self.next_scheduled();
        let record = store::load(&self.settings.state_dir).unwrap_or_default();
        let window = record
            .vms
            .values()
            .filter_map(|vm| vm.waiting_for.as_deref().and_then(window_gate::start_of))
            .filter(|start| *start < scheduled)
            .min();
        match window {
            Some(start) => {
                // Just after the start: the window is open then.
                let due = start + chrono::Duration::milliseconds(100);
                info!(next = %due.to_rfc3339(), "next sync at the start of a maintenance window");
                due
            }
            None => scheduled,
        }
    }

    /// The next tick of the schedule, after the backoff, with the host's jitter.
    fn next_scheduled(&self) -> DateTime<Utc> {
        let settings = &self.settings;
        let now = Utc::now();
        let jitter = jitter(&settings.host, settings.jitter_seconds);
        match next_attempt(
            &settings.schedule,
            now,
            jitter,
            self.failures,
            Duration::from_secs(settings.backoff_max_seconds),
        ) {
            Some(next) => {
                info!(next = %next.to_rfc3339(), "next sync");
                next
            }
            None => {
                warn!("the schedule has no future tick; waiting for SIGHUP or SIGTERM");
                now + chrono::Duration::days(365 * 100)
            }
        }
    }

    /// Tells systemd, sends the events still queued, and says goodbye.
    fn stop(&self) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        if let Some(notifier) = &self.notifier {
            notifier.flush(notify::ONCE_WAIT);
            notifier.close();
        }
        info!("daemon stopped");
    }
}

/// A reloaded config's secret and branch take effect for the next request; a new
/// `listen` (or turning the webhook on or off) needs a restart.
fn reload_webhook(hub: Option<&Hub>, old: &Settings, new: &Settings, secret: Option<Secret>) {
    let listen = |s: &Settings| s.webhook.as_ref().map(|w| w.listen);
    if listen(old) != listen(new) {
        warn!(
            old = ?listen(old),
            new = ?listen(new),
            "SIGHUP: [webhook] listen changed; it takes effect at the next restart"
        );
    }
    if let (Some(hub), Some(secret)) = (hub, secret) {
        hub.reload(secret, &new.branch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, h, m, s).unwrap()
    }

    #[test]
    fn next_tick_follows_the_schedule_plus_jitter() {
        let every5 = config::parse_schedule("0 */5 * * * *").unwrap();
        let max = Duration::from_secs(3600);
        assert_eq!(
            next_attempt(&every5, at(10, 1, 30), Duration::ZERO, 0, max),
            Some(at(10, 5, 0))
        );
        assert_eq!(
            next_attempt(&every5, at(10, 1, 30), Duration::from_secs(7), 0, max),
            Some(at(10, 5, 7))
        );
        // A sync that ran at 10:05:00 is not repeated at 10:05:00.
        assert_eq!(
            next_attempt(&every5, at(10, 5, 0), Duration::ZERO, 0, max),
            Some(at(10, 10, 0))
        );
    }

    #[test]
    fn failures_back_off_to_later_ticks_with_a_cap() {
        let every_second = config::parse_schedule("* * * * * *").unwrap();
        let max = Duration::from_secs(60);
        let now = at(10, 0, 0);
        assert_eq!(
            next_attempt(&every_second, now, Duration::ZERO, 1, max),
            Some(at(10, 0, 11))
        );
        assert_eq!(
            next_attempt(&every_second, now, Duration::ZERO, 3, max),
            Some(at(10, 0, 41))
        );
        assert_eq!(
            next_attempt(&every_second, now, Duration::ZERO, 9, max),
            Some(at(10, 1, 1)),
            "capped"
        );
        assert_eq!(
            next_attempt(&every_second, now, Duration::ZERO, 40, max),
            Some(at(10, 1, 1)),
            "no overflow"
        );
        let every5 = config::parse_schedule("0 */5 * * * *").unwrap();
        assert_eq!(
            next_attempt(&every5, at(10, 4, 55), Duration::ZERO, 1, max),
            Some(at(10, 10, 0))
        );
    }

    #[test]
    fn jitter_is_stable_per_host_and_bounded() {
        assert_eq!(jitter("hv1", 30), jitter("hv1", 30));
        assert_eq!(jitter("hv1", 0), Duration::ZERO);
        let spread: std::collections::BTreeSet<_> =
            (0..50).map(|i| jitter(&format!("hv{i}"), 30)).collect();
        assert!(
            spread.len() > 10,
            "hosts spread over the window: {spread:?}"
        );
        assert!(spread.iter().all(|j| *j <= Duration::from_secs(30)));
    }
}
