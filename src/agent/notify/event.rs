//! The event: what one sync's outcome tells receivers (JSON, `version` 1, documented in
//! docs/notifications.md), and the rule that tells each change of outcome once.
//!
//! An outcome is a (commit, result) pair. After every sync the outcome is compared with
//! the last one told (kept in the state directory): the same outcome again is not told
//! (a failure that goes on is told once, not every tick); a different one is. An
//! `applied` outcome after a failing one is told as `recovered`. Nothing of a secret goes
//! into an event: it is built from vmsync's own error messages, names and commit ids.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::suspend::Suspension;
use crate::util::clock;

/// The schema version of [`Event`].
pub const VERSION: u32 = 1;

/// What an event tells; the names `[[notify]] events` filters on.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::EnumIter,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum EventKind {
    /// A new commit is being applied (the commit status's `pending`).
    Applying,
    /// The commit converged.
    Applied,
    /// The commit converged after an outcome that was not `applied`.
    Recovered,
    /// Some action failed (a VM, network or pool); the last applied commit is unchanged.
    Failed,
    /// A health check failed and a VM was put back to its last healthy definition; the
    /// commit is held back for that VM.
    Reverted,
    /// The commit did not validate; nothing was applied.
    Invalid,
    /// The commit was refused (mass prune guard); nothing was applied.
    Refused,
    /// The commit is not trusted (signature, history rewrite); nothing was applied.
    Untrusted,
    /// The source could not be fetched.
    FetchFailed,
    /// The host (or a VM with changes) is suspended: planned, not applied.
    Suspended,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn all() -> Vec<EventKind> {
        use strum::IntoEnumIterator;
        EventKind::iter().collect()
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::all().into_iter().find(|k| k.as_str() == name)
    }

    /// Whether this outcome is a problem (an `applied` after it is a recovery).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            EventKind::Failed
                | EventKind::Reverted
                | EventKind::Invalid
                | EventKind::Refused
                | EventKind::Untrusted
                | EventKind::FetchFailed
        )
    }
}

/// One VM, network or pool in an event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub name: String,
    /// What this sync did to it (`defined`, `started`, …).
    pub actions: Vec<String>,
    pub error: Option<String>,
}

/// A VM whose definition from `commit` was reverted and is held back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBack {
    pub vm: String,
    pub commit: String,
    pub reason: String,
}

/// Who suspended what (the suspensions in force during the sync).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspended {
    pub host: Option<Suspension>,
    pub vms: BTreeMap<String, Suspension>,
}

/// The event JSON (docs/notifications.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Schema version: 1.
    pub version: u32,
    pub event: EventKind,
    /// This agent's `[agent] host`.
    pub host: String,
    /// The commit (full hex); `null` when nothing was fetched.
    pub commit: Option<String>,
    /// The last applied commit before this sync.
    pub previous_commit: Option<String>,
    /// One line, what the commit status shows.
    pub summary: String,
    /// The error (several lines for an invalid commit), if any.
    pub error: Option<String>,
    /// RFC 3339: when the sync started and ended (`null` while applying).
    pub started_at: String,
    pub finished_at: Option<String>,
    pub vms: Vec<Item>,
    pub networks: Vec<Item>,
    pub pools: Vec<Item>,
    /// VMs put back to their last healthy definition by this commit.
    pub reverted: Vec<String>,
    /// Definitions held back after a revert.
    pub held_back: Vec<HeldBack>,
    pub suspended: Option<Suspended>,
}

impl Event {
    /// An event with no details yet (no error, items or suspension).
    pub fn new(kind: EventKind, host: &str, commit: Option<&str>, summary: String) -> Event {
        Event {
            version: VERSION,
            event: kind,
            host: host.to_string(),
            commit: commit.map(str::to_string),
            previous_commit: None,
            summary,
            error: None,
            started_at: clock::now_rfc3339(),
            finished_at: None,
            vms: vec![],
            networks: vec![],
            pools: vec![],
            reverted: vec![],
            held_back: vec![],
            suspended: None,
        }
    }
}

/// The last outcome told, as the state directory keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Told {
    pub commit: Option<String>,
    pub outcome: EventKind,
    pub at: String,
}

/// Which event (if any) an outcome is, given the last one told: `None` when it is the
/// same outcome for the same commit.
pub fn decide(last: Option<&Told>, commit: Option<&str>, outcome: EventKind) -> Option<EventKind> {
    if let Some(last) = last
        && last.commit.as_deref() == commit
        && last.outcome == outcome
    {
        return None;
    }
    let after_failure = last.is_some_and(|l| l.outcome.is_failure());
    Some(match outcome {
        EventKind::Applied if after_failure => EventKind::Recovered,
        other => other,
    })
}

/// `text` cut to at most `max` characters (with `…` when cut), on a character boundary.
pub fn shorten(text: &str, max: usize) -> String {
    let one_line = text.lines().next().unwrap_or("").trim();
    if one_line.chars().count() <= max && !text.trim().contains('\n') {
        return one_line.to_string();
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn told(commit: Option<&str>, outcome: EventKind) -> Told {
        Told {
            commit: commit.map(str::to_string),
            outcome,
            at: "t".into(),
        }
    }

    #[test]
    fn each_change_of_outcome_is_told_once_and_recovery_is_told() {
        use EventKind::*;
        assert_eq!(decide(None, Some("a"), Applied), Some(Applied));
        let applied = told(Some("a"), Applied);
        assert_eq!(
            decide(Some(&applied), Some("a"), Applied),
            None,
            "every tick the same"
        );
        assert_eq!(decide(Some(&applied), Some("b"), Applied), Some(Applied));
        assert_eq!(decide(Some(&applied), Some("b"), Failed), Some(Failed));
        let failed = told(Some("b"), Failed);
        assert_eq!(
            decide(Some(&failed), Some("b"), Failed),
            None,
            "a failure that goes on"
        );
        assert_eq!(decide(Some(&failed), Some("b"), Applied), Some(Recovered));
        assert_eq!(decide(Some(&failed), Some("c"), Applied), Some(Recovered));
        let fetch = told(None, FetchFailed);
        assert_eq!(decide(Some(&fetch), None, FetchFailed), None);
        assert_eq!(decide(Some(&fetch), Some("a"), Applied), Some(Recovered));
        let suspended = told(Some("a"), Suspended);
        assert_eq!(decide(Some(&suspended), Some("a"), Suspended), None);
        assert_eq!(decide(Some(&suspended), Some("a"), Applied), Some(Applied));
    }

    #[test]
    fn shorten_cuts_on_a_character_boundary() {
        assert_eq!(shorten("short", 10), "short");
        assert_eq!(shorten("ééééé", 3), "éé…");
        assert_eq!(shorten("first\nsecond", 40), "first…");
        assert_eq!(shorten(&"x".repeat(200), 140).chars().count(), 140);
    }

    #[test]
    fn kinds_have_stable_names() {
        assert_eq!(EventKind::FetchFailed.as_str(), "fetch-failed");
        assert_eq!(EventKind::parse("recovered"), Some(EventKind::Recovered));
        assert_eq!(
            serde_json::to_string(&EventKind::FetchFailed).unwrap(),
            "\"fetch-failed\""
        );
    }
}
