//! Events (`[[notify]]` in the host's config): after a sync whose outcome differs from
//! the last one told, an event goes to each webhook, forge commit status and command that
//! wants it (docs/notifications.md).
//!
//! Delivery is off the sync's path: each target has a lane (a bounded queue and a thread
//! of its own), so a receiver that accepts a connection and never answers holds up its
//! own lane only, for at most its `timeout` per try. A failed try is retried with backoff
//! for [`RETRY_FOR`]; then the event is dropped with a log line and
//! `vmsync_notify_failures_total` counts it. Nothing here fails or holds back a sync.
//! `vmsync --once` waits at most [`ONCE_WAIT`] for its events before it exits; what is
//! left is kept in `<state_dir>/notify.json` and sent by the next run.

pub mod deliver;
pub mod event;
pub mod forge;
pub mod sync_events;
pub mod targets;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::util::{clock, fsio};
pub use event::{Event, EventKind};
pub use sync_events::SyncEvents;
pub use targets::{RawNotify, Target};

/// The file in the state directory: last outcome told, failure count, undelivered events.
pub const NOTIFY_FILE: &str = "notify.json";
/// How long a failing delivery is retried before it is dropped.
pub const RETRY_FOR: Duration = Duration::from_secs(300);
/// The most events a lane holds; a newer one pushes the oldest out (counted as a failure).
pub const LANE_CAPACITY: usize = 64;
/// How long `vmsync --once` (and a stopping daemon) waits for its events.
pub const ONCE_WAIT: Duration = Duration::from_secs(5);
/// An undelivered event older than this is not sent by a later run: dropped, counted.
pub const KEEP_FOR: Duration = Duration::from_secs(3600);

/// An event waiting for a target, as kept in `notify.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undelivered {
    /// [`Target::id`].
    pub target: String,
    pub event: Event,
    /// RFC 3339: when it was first queued.
    pub queued_at: String,
}

/// `<state_dir>/notify.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyFile {
    #[serde(default)]
    pub version: u32,
    /// The last outcome told.
    #[serde(default)]
    pub last: Option<event::Told>,
    /// The commit whose `applying` was told last.
    #[serde(default)]
    pub applying: Option<String>,
    /// Events dropped after their retries (or pushed out of a full lane), ever.
    #[serde(default)]
    pub failures_total: u64,
    #[serde(default)]
    pub undelivered: Vec<Undelivered>,
}

/// Reads `notify.json` (missing or unreadable: empty, with a warning for the latter).
pub fn load_file(state_dir: &Path) -> NotifyFile {
    let path = state_dir.join(NOTIFY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            warn!(file = %path.display(), error = %e, "ignoring an unreadable notify file");
            NotifyFile::default()
        }),
        Err(_) => NotifyFile::default(),
    }
}

fn save_file(state_dir: &Path, file: &NotifyFile) {
    let mut file = file.clone();
    file.version = 1;
    let text = serde_json::to_string_pretty(&file).expect("notify file serializes");
    if let Err(e) = fsio::write_atomic(&state_dir.join(NOTIFY_FILE), text.as_bytes()) {
        warn!(error = %e, "failed to write the notify file");
    }
}

/// `vmsync_notify_failures_total`, from the file (for a metrics render without a notifier).
pub fn metrics(failures_total: u64) -> String {
    format!(
        "# HELP vmsync_notify_failures_total Events dropped after their delivery retries ran out.\n# TYPE vmsync_notify_failures_total counter\nvmsync_notify_failures_total {failures_total}\n"
    )
}

struct Job {
    event: Event,
    queued_at: String,
    attempts: u32,
    next_at: Instant,
    give_up_at: Instant,
}

struct Lane {
    target: Target,
    queue: VecDeque<Job>,
    /// The job being delivered now (kept so a flush can save it).
    in_flight: Option<(Event, String)>,
    /// The lane's thread should end (the target went away on a reload, or shutdown).
    closed: bool,
}

struct Inner {
    file: NotifyFile,
    lanes: Vec<Lane>,
}

struct Shared {
    state_dir: PathBuf,
    host: String,
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// The delivery machinery: one lane per target. Cheap to share (`Arc`).
pub struct Notifier {
    shared: Arc<Shared>,
}

fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(6)).min(Duration::from_secs(60))
}

impl Notifier {
    /// Starts a lane per target and queues what an earlier run left undelivered.
    pub fn start(state_dir: &Path, host: &str, targets: &[Target]) -> Arc<Notifier> {
        let file = load_file(state_dir);
        let left = file.undelivered.clone();
        let shared = Arc::new(Shared {
            state_dir: state_dir.to_path_buf(),
            host: host.to_string(),
            inner: Mutex::new(Inner {
                file,
                lanes: Vec::new(),
            }),
            changed: Condvar::new(),
        });
        let notifier = Arc::new(Notifier { shared });
        notifier.set_targets(targets);
        let now = std::time::SystemTime::now();
        let mut inner = notifier.shared.inner.lock().expect("notify lock");
        let mut dropped = 0;
        inner.file.undelivered.clear();
        let had_undelivered = !left.is_empty();
        for u in left {
            let fresh = humantime::parse_rfc3339(&u.queued_at)
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age < KEEP_FOR);
            match inner.lanes.iter_mut().find(|l| l.target.id() == u.target) {
                Some(lane) if fresh => {
                    debug!(target = %u.target, event = u.event.event.as_str(), "sending an event an earlier run left");
                    lane.queue.push_back(Job {
                        event: u.event,
                        queued_at: u.queued_at,
                        attempts: 0,
                        next_at: Instant::now(),
                        give_up_at: Instant::now() + RETRY_FOR,
                    });
                }
                Some(_) => {
                    warn!(target = %u.target, event = u.event.event.as_str(), queued_at = %u.queued_at, "event not delivered within an hour; dropped");
                    dropped += 1;
                }
                None => {
                    debug!(target = %u.target, "dropping an event for a target no longer configured")
                }
            }
        }
        if dropped > 0 {
            inner.file.failures_total += dropped;
        }
        if had_undelivered {
            // Re-queued (or dropped): the file no longer holds them.
            save_file(&notifier.shared.state_dir, &inner.file);
        }
        drop(inner);
        notifier.shared.changed.notify_all();
        notifier
    }

    /// Replaces the targets (SIGHUP): lanes of targets that stay keep their queues.
    pub fn set_targets(&self, targets: &[Target]) {
        let mut inner = self.shared.inner.lock().expect("notify lock");
        for lane in inner.lanes.iter_mut() {
            if !targets.contains(&lane.target) {
                lane.closed = true;
            }
        }
        for target in targets {
            if inner.lanes.iter().any(|l| !l.closed && &l.target == target) {
                continue;
            }
            inner.lanes.push(Lane {
                target: target.clone(),
                queue: VecDeque::new(),
                in_flight: None,
                closed: false,
            });
            let index = inner.lanes.len() - 1;
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("vmsync-notify".into())
                .spawn(move || lane_loop(shared, index));
            if let Err(e) = spawned {
                warn!(error = %e, "failed to start a notify thread");
            }
        }
        drop(inner);
        self.shared.changed.notify_all();
    }

    /// The host name events carry.
    pub fn host(&self) -> &str {
        &self.shared.host
    }

    /// Queues `event` for every target that wants it.
    pub fn send(&self, event: &Event) {
        let mut inner = self.shared.inner.lock().expect("notify lock");
        let mut dropped = 0;
        for lane in inner.lanes.iter_mut().filter(|l| !l.closed) {
            if !lane.target.wants(event.event) {
                continue;
            }
            if let targets::Kind::CommitStatus { forge, .. } = &lane.target.kind {
                if event.commit.is_none() || forge::state(*forge, event.event).is_none() {
                    continue;
                }
                // The newest state of a commit wins: an older one still queued is moot.
                lane.queue.retain(|j| j.event.commit != event.commit);
            }
            if lane.queue.len() >= LANE_CAPACITY {
                let old = lane.queue.pop_front().expect("full");
                warn!(target = %lane.target.id(), event = old.event.event.as_str(), "notify queue full: dropped the oldest event");
                dropped += 1;
            }
            let now = Instant::now();
            lane.queue.push_back(Job {
                event: event.clone(),
                queued_at: clock::now_rfc3339(),
                attempts: 0,
                next_at: now,
                give_up_at: now + RETRY_FOR,
            });
        }
        if dropped > 0 {
            inner.file.failures_total += dropped;
            save_file(&self.shared.state_dir, &inner.file);
        }
        drop(inner);
        self.shared.changed.notify_all();
    }

    /// Reads the file's bookkeeping (last told, applying).
    pub fn read_file<T>(&self, f: impl FnOnce(&NotifyFile) -> T) -> T {
        f(&self.shared.inner.lock().expect("notify lock").file)
    }

    /// Changes the file's bookkeeping in memory only: written with the next change.
    pub fn note<T>(&self, f: impl FnOnce(&mut NotifyFile) -> T) -> T {
        f(&mut self.shared.inner.lock().expect("notify lock").file)
    }

    /// Reads and changes the file's bookkeeping (last told, applying) under the lock, and
    /// saves it.
    pub fn with_file<T>(&self, f: impl FnOnce(&mut NotifyFile) -> T) -> T {
        let mut inner = self.shared.inner.lock().expect("notify lock");
        let out = f(&mut inner.file);
        save_file(&self.shared.state_dir, &inner.file);
        out
    }

    /// `vmsync_notify_failures_total`.
    pub fn failures_total(&self) -> u64 {
        self.shared
            .inner
            .lock()
            .expect("notify lock")
            .file
            .failures_total
    }

    /// Waits up to `wait` for every lane to be idle, then keeps what is left (queued or
    /// in flight) in `notify.json` for the next run. Returns how many were left.
    pub fn flush(&self, wait: Duration) -> usize {
        let deadline = Instant::now() + wait;
        let mut inner = self.shared.inner.lock().expect("notify lock");
        loop {
            let busy = inner
                .lanes
                .iter()
                .any(|l| !l.closed && (l.in_flight.is_some() || !l.queue.is_empty()));
            let now = Instant::now();
            if !busy || now >= deadline {
                break;
            }
            inner = self
                .shared
                .changed
                .wait_timeout(inner, deadline - now)
                .expect("notify lock")
                .0;
        }
        let mut left = Vec::new();
        for lane in inner.lanes.iter().filter(|l| !l.closed) {
            let id = lane.target.id();
            if let Some((event, queued_at)) = &lane.in_flight {
                left.push(Undelivered {
                    target: id.clone(),
                    event: event.clone(),
                    queued_at: queued_at.clone(),
                });
            }
            left.extend(lane.queue.iter().map(|j| Undelivered {
                target: id.clone(),
                event: j.event.clone(),
                queued_at: j.queued_at.clone(),
            }));
        }
        let count = left.len();
        if count > 0 {
            info!(
                events = count,
                "events not delivered yet; kept for the next run"
            );
        }
        // The file is written only when there is something to keep or to clear (its
        // other fields are written when they change).
        if count > 0 || !inner.file.undelivered.is_empty() {
            inner.file.undelivered = left;
            save_file(&self.shared.state_dir, &inner.file);
        }
        count
    }

    /// Ends every lane's thread (after the job in flight).
    pub fn close(&self) {
        let mut inner = self.shared.inner.lock().expect("notify lock");
        for lane in inner.lanes.iter_mut() {
            lane.closed = true;
        }
        drop(inner);
        self.shared.changed.notify_all();
    }
}

/// The daemon's notifier after (re)loading its settings: started when `[[notify]]`
/// entries appear, its targets replaced when they change.
pub fn daemon_notifier(
    current: Option<Arc<Notifier>>,
    state_dir: &Path,
    host: &str,
    targets: &[Target],
) -> Option<Arc<Notifier>> {
    match current {
        Some(n) => {
            n.set_targets(targets);
            Some(n)
        }
        None if targets.is_empty() => None,
        None => Some(Notifier::start(state_dir, host, targets)),
    }
}

/// One lane's thread: delivers its queue in order, retrying the head with backoff.
fn lane_loop(shared: Arc<Shared>, index: usize) {
    let mut inner = shared.inner.lock().expect("notify lock");
    loop {
        let lane = &mut inner.lanes[index];
        if lane.closed {
            lane.queue.clear();
            return;
        }
        let now = Instant::now();
        let wait = match lane.queue.front() {
            None => None,
            Some(job) if job.next_at <= now => Some(Duration::ZERO),
            Some(job) => Some(job.next_at - now),
        };
        match wait {
            None => {
                inner = shared.changed.wait(inner).expect("notify lock");
                continue;
            }
            Some(w) if !w.is_zero() => {
                inner = shared
                    .changed
                    .wait_timeout(inner, w)
                    .expect("notify lock")
                    .0;
                continue;
            }
            Some(_) => {}
        }
        let mut job = lane.queue.pop_front().expect("a due job");
        lane.in_flight = Some((job.event.clone(), job.queued_at.clone()));
        let target = lane.target.clone();
        drop(inner);
        let result = deliver::deliver(&target, &job.event);
        inner = shared.inner.lock().expect("notify lock");
        let id = target.id();
        let kind = job.event.event.as_str();
        let mut failed = false;
        match result {
            Ok(()) => debug!(target = %id, event = kind, "event delivered"),
            Err(f) if !f.permanent && Instant::now() + backoff(job.attempts) < job.give_up_at => {
                debug!(target = %id, event = kind, error = %f.message, "event delivery failed; trying again");
                job.next_at = Instant::now() + backoff(job.attempts);
                job.attempts += 1;
                inner.lanes[index].queue.push_front(job);
            }
            Err(f) => {
                warn!(target = %id, event = kind, attempts = job.attempts + 1, error = %f.message, "event not delivered; dropped");
                failed = true;
            }
        }
        inner.lanes[index].in_flight = None;
        if failed {
            inner.file.failures_total += 1;
            save_file(&shared.state_dir, &inner.file);
        }
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_target(script: &Path) -> Target {
        Target {
            kind: targets::Kind::Command {
                argv: vec![script.display().to_string()],
            },
            events: EventKind::all(),
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn what_a_run_could_not_deliver_is_kept_and_sent_by_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let (out, down) = (dir.path().join("got"), dir.path().join("down"));
        let script = dir.path().join("hook");
        crate::testing::executable_script(
            &script,
            &format!(
                "test -e {} && exit 1\ncat >> {}",
                down.display(),
                out.display()
            ),
        );
        std::fs::write(&down, "").unwrap();
        let target = command_target(&script);
        let event = Event::new(EventKind::Failed, "hv1", Some("c1"), "failed".into());

        let first = Notifier::start(dir.path(), "hv1", std::slice::from_ref(&target));
        first.send(&event);
        // The receiver is down: after the wait, the event is kept in notify.json.
        assert_eq!(first.flush(Duration::from_millis(300)), 1);
        first.close();
        let kept = load_file(dir.path());
        assert_eq!(kept.undelivered.len(), 1);
        assert_eq!(kept.undelivered[0].target, target.id());
        assert_eq!(kept.undelivered[0].event, event);

        // The next run sends it (and forgets it).
        std::fs::remove_file(&down).unwrap();
        let second = Notifier::start(dir.path(), "hv1", std::slice::from_ref(&target));
        assert!(load_file(dir.path()).undelivered.is_empty());
        assert_eq!(second.flush(Duration::from_secs(5)), 0);
        second.close();
        let got: Event = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(got, event);
        assert_eq!(load_file(dir.path()).failures_total, 0);
    }

    #[test]
    fn an_event_no_target_wants_is_not_queued_and_a_refusal_is_counted_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hook");
        crate::testing::executable_script(&script, "exit 0");
        let mut picky = command_target(&script);
        picky.events = vec![EventKind::Failed];
        let n = Notifier::start(dir.path(), "hv1", &[picky]);
        n.send(&Event::new(
            EventKind::Applied,
            "hv1",
            Some("c"),
            "ok".into(),
        ));
        assert_eq!(n.flush(Duration::ZERO), 0, "nothing queued");
        n.close();
        // A forge that refuses (a token file that is not there: permanent) is counted
        // without retries.
        let status = Target {
            kind: targets::Kind::CommitStatus {
                forge: targets::Forge::GitHub,
                api_url: "http://127.0.0.1:9".into(),
                repository: "o/r".into(),
                token_file: dir.path().join("no-token"),
                target_url: None,
            },
            events: EventKind::all(),
            timeout: Duration::from_secs(1),
        };
        let n = Notifier::start(dir.path(), "hv1", &[status]);
        n.send(&Event::new(
            EventKind::Applied,
            "hv1",
            Some("c"),
            "ok".into(),
        ));
        assert_eq!(n.flush(Duration::from_secs(5)), 0);
        n.close();
        assert_eq!(load_file(dir.path()).failures_total, 1);
        assert_eq!(n.failures_total(), 1);
    }
}
