//! One sync's events: the sync tells [`SyncEvents`] when it starts applying a commit and
//! what applying did; after the sync, [`SyncEvents::finish`] turns the result into an
//! outcome and, when it is a change, an event for the [`Notifier`].

use std::sync::{Arc, Mutex};

use super::event::{self, Event, EventKind, HeldBack, Item, Suspended, Told, decide};
use super::{Notifier, forge};
use crate::agent::report::Report;
use crate::agent::suspend::Held;
use crate::agent::sync::SyncError;
use crate::reconcile::outcome;
use crate::reconcile::outcome::Outcome;
use crate::record::{HealthResult, Record};
use crate::util::clock;
use crate::util::commit_id::short;

/// What applying did: VMs, networks, pools.
type Applied = (Vec<Item>, Vec<Item>, Vec<Item>);

/// What one sync tells its events as it goes.
pub struct SyncEvents {
    notifier: Arc<Notifier>,
    started_at: String,
    /// The last applied commit when the sync started applying.
    previous: Mutex<Option<Option<String>>>,
    applied: Mutex<Option<Applied>>,
}

impl SyncEvents {
    /// Before a sync.
    pub fn new(notifier: &Arc<Notifier>) -> SyncEvents {
        SyncEvents {
            notifier: notifier.clone(),
            started_at: clock::now_rfc3339(),
            previous: Mutex::new(None),
            applied: Mutex::new(None),
        }
    }

    fn event(&self, kind: EventKind, commit: Option<&str>, summary: String) -> Event {
        let mut event = Event::new(kind, self.notifier.host(), commit, summary);
        event.previous_commit = self.previous.lock().expect("events lock").clone().flatten();
        event.started_at = self.started_at.clone();
        event
    }

    /// The sync is about to apply `commit` (trusted, valid, planned): `applying` is told
    /// once per commit (not again when the same commit is retried). `previous`: the last
    /// applied commit before it.
    pub fn applying(&self, commit: &str, previous: Option<&str>) {
        *self.previous.lock().expect("events lock") = Some(previous.map(str::to_string));
        let told = self.notifier.read_file(|f| {
            // A commit told as suspended was not being applied then.
            f.applying.as_deref() == Some(commit)
                || f.last.as_ref().is_some_and(|l| {
                    l.commit.as_deref() == Some(commit) && l.outcome != EventKind::Suspended
                })
        });
        if !told {
            // Kept in memory: written with the outcome (a crash in between only means
            // `applying` is told again).
            self.notifier
                .note(|f| f.applying = Some(commit.to_string()));
            let summary = format!("applying commit {}", short(commit));
            self.notifier
                .send(&self.event(EventKind::Applying, Some(commit), summary));
        }
    }

    /// What applying did, per VM, network and pool.
    pub fn applied(&self, outcome: &Outcome) {
        let vms = outcome
            .vms
            .iter()
            .map(|vm| Item {
                name: vm.name.clone(),
                actions: vm.done.clone(),
                error: vm.error.as_ref().map(ToString::to_string),
            })
            .chain(outcome.pruned.iter().map(|p| Item {
                name: p.name.clone(),
                actions: p.done.clone(),
                error: p.error.clone().map(|e| format!("prune: {e}")),
            }))
            .filter(|i| !i.actions.is_empty() || i.error.is_some())
            .collect();
        let res = |list: &[outcome::ResOutcome]| -> Vec<Item> {
            list.iter()
                .filter(|r| !r.done.is_empty() || r.error.is_some())
                .map(|r| Item {
                    name: r.name.clone(),
                    actions: r.done.clone(),
                    error: r.error.clone(),
                })
                .collect()
        };
        let mut pools = res(&outcome.resources.pools);
        for v in &outcome.resources.volumes {
            let (vm, pool, volume) = (&v.vm, &v.pool, &v.name);
            let (actions, error) = match &v.result {
                Ok(d) => (vec![format!("volume '{volume}' for vm '{vm}': {d}")], None),
                Err(e) => (
                    vec![],
                    Some(format!("volume '{volume}' for vm '{vm}': {e}")),
                ),
            };
            pools.push(Item {
                name: pool.clone(),
                actions,
                error,
            });
        }
        *self.applied.lock().expect("events lock") =
            Some((vms, res(&outcome.resources.networks), pools));
    }

    /// After the sync: the outcome, told when it differs from the last one told.
    /// `record` is the record the sync left.
    pub fn finish(&self, result: &Result<Report, SyncError>, record: &Record) {
        {
            // Nothing was applied: the last applied commit is the one before.
            let mut previous = self.previous.lock().expect("events lock");
            if previous.is_none() {
                *previous = Some(record.last_applied_commit.clone());
            }
        }
        let Some(event) = self.outcome_event(result, record) else {
            return;
        };
        let last = self.notifier.read_file(|f| f.last.clone());
        let Some(kind) = decide(last.as_ref(), event.commit.as_deref(), event.event) else {
            return;
        };
        let told = Told {
            commit: event.commit.clone(),
            outcome: event.event,
            at: clock::now_rfc3339(),
        };
        self.notifier.with_file(|f| f.last = Some(told));
        let mut event = event;
        if kind == EventKind::Recovered {
            event.summary = format!("recovered: {}", event.summary);
        }
        event.event = kind;
        tracing::info!(event = kind.as_str(), commit = ?event.commit.as_deref().map(short), "telling the outcome");
        self.notifier.send(&event);
    }

    /// The event for this sync's outcome (its kind before [`decide`]); `None` when the
    /// sync did not get to an outcome (lock held, gave up).
    pub fn outcome_event(
        &self,
        result: &Result<Report, SyncError>,
        record: &Record,
    ) -> Option<Event> {
        let commit = outcome_commit(result, record)?;
        let held_back = held_back(record);
        let reverted = reverted(record, commit);
        let (vms, networks, pools) = self
            .applied
            .lock()
            .expect("events lock")
            .clone()
            .unwrap_or_default();
        let first_error = vms
            .iter()
            .chain(&networks)
            .chain(&pools)
            .find(|i| i.error.is_some() && !reverted.contains(&i.name))
            .map(|i| format!("'{}': {}", i.name, i.error.as_deref().unwrap_or("")));
        let (kind, summary, error, suspended) = match result {
            Ok(report) => {
                let (kind, summary, suspended) = success(report, &reverted);
                (kind, summary, None, suspended)
            }
            Err(e) => {
                let (kind, summary) = failure(e, first_error.as_deref(), &reverted);
                (kind, summary, Some(e.to_string()), None)
            }
        };
        let mut event = self.event(kind, commit, summary);
        event.error = error;
        event.finished_at = Some(clock::now_rfc3339());
        event.vms = vms;
        event.networks = networks;
        event.pools = pools;
        event.reverted = reverted;
        event.held_back = held_back;
        event.suspended = suspended;
        Some(event)
    }
}

/// The commit an outcome is about (`Some(None)`: none known); `None` when the sync did
/// not get to an outcome (lock held, gave up).
fn outcome_commit<'a>(
    result: &'a Result<Report, SyncError>,
    record: &'a Record,
) -> Option<Option<&'a str>> {
    match result {
        Ok(report) => Some(Some(report.commit.as_str())),
        Err(SyncError::Locked(_) | SyncError::GaveUp { .. }) => None,
        Err(SyncError::Fetch(_)) => Some(None),
        Err(SyncError::Invalid { commit, .. })
        | Err(SyncError::Refused { commit, .. })
        | Err(SyncError::ActionsFailed { commit, .. }) => Some(Some(commit.as_str())),
        Err(_) => Some(record.last_attempted_commit.as_deref()),
    }
}

/// The VMs the record holds back at a commit, with why.
fn held_back(record: &Record) -> Vec<HeldBack> {
    record
        .vms
        .iter()
        .filter_map(|(name, vm)| {
            vm.held_back.as_ref().map(|h| HeldBack {
                vm: name.clone(),
                commit: h.commit.clone(),
                reason: h.reason.clone(),
            })
        })
        .collect()
}

/// The VMs this commit's health stage reverted (or tried to).
fn reverted(record: &Record, commit: Option<&str>) -> Vec<String> {
    record
        .vms
        .iter()
        .filter(|(_, vm)| {
            matches!(
                vm.health,
                Some(HealthResult::Reverted | HealthResult::RevertFailed)
            ) && vm.held_back.as_ref().map(|h| h.commit.as_str()) == commit
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// A converged sync: suspended (held), reverted, or applied.
fn success(report: &Report, reverted: &[String]) -> (EventKind, String, Option<Suspended>) {
    let held: &Held = &report.held;
    if held.host.is_some() || !held.vms.is_empty() {
        let who = match (&held.host, held.vms.iter().next()) {
            (Some(s), _) => format!("host suspended {}", s.describe()),
            (None, Some((vm, s))) => format!("vm '{vm}' suspended {}", s.describe()),
            (None, None) => unreachable!(),
        };
        let suspended = Suspended {
            host: held.host.clone(),
            vms: held.vms.clone(),
        };
        return (
            EventKind::Suspended,
            format!("{who}; {} change(s) waiting", held.changes),
            Some(suspended),
        );
    }
    if !reverted.is_empty() {
        return (EventKind::Reverted, reverted_summary(reverted), None);
    }
    let n = report.outcome.changes();
    let summary = if n == 0 {
        format!("applied {}: nothing to change", short(&report.commit))
    } else {
        format!("applied {}: {n} change(s)", short(&report.commit))
    };
    (EventKind::Applied, summary, None)
}

/// A failed sync's kind and summary; `first_error`: the first item that failed (not
/// reverted).
fn failure(e: &SyncError, first_error: Option<&str>, reverted: &[String]) -> (EventKind, String) {
    let text = e.to_string();
    let first_line = text.lines().next().unwrap_or("").to_string();
    match e {
        SyncError::Fetch(_) => (
            EventKind::FetchFailed,
            format!("fetch failed: {first_line}"),
        ),
        SyncError::Invalid { problems, .. } => (
            EventKind::Invalid,
            format!(
                "invalid commit, nothing applied: {}",
                problems.first().map(|p| p.to_string()).unwrap_or_default()
            ),
        ),
        SyncError::Refused { message, .. } => (
            EventKind::Refused,
            format!("refused, nothing applied: {message}"),
        ),
        SyncError::Untrusted(t) => (
            EventKind::Untrusted,
            format!("untrusted commit, nothing applied: {t}"),
        ),
        SyncError::ActionsFailed { .. } if first_error.is_none() && !reverted.is_empty() => {
            (EventKind::Reverted, reverted_summary(reverted))
        }
        _ => (
            EventKind::Failed,
            match first_error {
                Some(item) => format!("failed: {item}"),
                None => format!("failed: {first_line}"),
            },
        ),
    }
}

fn reverted_summary(reverted: &[String]) -> String {
    let names = reverted
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("reverted vm {names} to its last healthy definition; this commit is held back for it")
}

/// The commit-status description an event gets on `forge` (for tests and docs).
pub fn description(event: &Event, forge: super::targets::Forge) -> String {
    event::shorten(&event.summary, forge::max_description(forge))
}
