//! Drift: how a managed domain differs from what vmsync last applied to it, found by
//! comparing the per-VM record (`state.json`) with what libvirt says now. Pure; used by
//! the planner (to heal or report) and by `vmsync status`.
//!
//! The definition baseline is [`crate::desired::domain_xml::definition_hash`] of libvirt's
//! inactive XML read back right after vmsync defined the domain: libvirt adds defaults on
//! define, so "what libvirt made of our XML then" against "the inactive XML now" is the
//! only comparison that sees a `virsh edit` (which keeps vmsync's tag) without false
//! alarms.

use crate::desired::manifest::PowerState;
use crate::host::hypervisor::Listing;
use crate::record::VmRecord;

/// One way a domain differs from the last applied state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// The domain was undefined outside vmsync.
    Undefined,
    /// The domain lost vmsync's tag (redefined by hand without it).
    Untagged,
    /// The definition changed outside vmsync (`virsh edit`, `virsh define`).
    Definition,
    /// The autostart flag was flipped (`virsh autostart`).
    Autostart { now: bool, applied: bool },
    /// The domain was started or stopped by hand against the applied `state`.
    Power { active: bool, applied: PowerState },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on_off = |b: bool| if b { "on" } else { "off" };
        match self {
            Drift::Undefined => write!(f, "domain is not defined"),
            Drift::Untagged => write!(f, "domain has no vmsync metadata"),
            Drift::Definition => write!(f, "definition changed outside vmsync"),
            Drift::Autostart { now, applied } => write!(
                f,
                "autostart is {}, committed {}",
                on_off(*now),
                on_off(*applied)
            ),
            Drift::Power { active, applied } => write!(
                f,
                "domain is {}, committed state {}",
                if *active { "running" } else { "shut off" },
                applied.as_str()
            ),
        }
    }
}

/// What libvirt says now about a domain vmsync applied.
#[derive(Debug, Clone, Copy)]
pub struct Now<'a> {
    /// `None`: no domain of that name.
    pub listing: Option<&'a Listing>,
    /// The fingerprint in vmsync's tag of the inactive definition (`None`: no tag).
    pub tag_fingerprint: Option<&'a str>,
    /// `definition_hash` of the inactive XML now.
    pub definition_hash: Option<&'a str>,
}

/// Drift of one VM; empty when the record has never applied it.
pub fn detect(record: &VmRecord, now: Now) -> Vec<Drift> {
    let mut drift = Vec::new();
    if record.applied_commit.is_none() {
        return drift;
    }
    let Some(listing) = now.listing else {
        drift.push(Drift::Undefined);
        return drift;
    };
    match (now.tag_fingerprint, record.fingerprint.as_deref()) {
        (None, _) => drift.push(Drift::Untagged),
        // The tag is the truth of what vmsync applied; the record is a cache of it. A
        // tag other than the recorded one means vmsync defined it and its record was
        // not saved (a full disk, a crash): no drift, and the recorded baseline belongs
        // to another definition. (A different commit's definition is a change anyway.)
        (Some(tag), Some(applied)) if tag != applied => {}
        _ => {
            if let (Some(base), Some(hash)) = (&record.definition_hash, now.definition_hash)
                && base != hash
            {
                drift.push(Drift::Definition);
            }
        }
    }
    if listing.autostart != record.autostart {
        drift.push(Drift::Autostart {
            now: listing.autostart,
            applied: record.autostart,
        });
    }
    // Records from before `state` existed: autostart meant "running".
    let applied = record.state.unwrap_or(if record.autostart {
        PowerState::Running
    } else {
        PowerState::Defined
    });
    let off_state = match applied {
        PowerState::Running => !listing.active,
        PowerState::Stopped => listing.active,
        PowerState::Defined => false,
    };
    if off_state {
        drift.push(Drift::Power {
            active: listing.active,
            applied,
        });
    }
    drift
}

/// `drift` without what the commit asks for anyway: an autostart flag or a power state
/// that is what the commit says is no divergence from it, whoever set it (vmsync itself,
/// with its record lost, included).
pub fn against_commit(drift: Vec<Drift>, autostart: bool, state: PowerState) -> Vec<Drift> {
    drift
        .into_iter()
        .filter(|d| match d {
            Drift::Autostart { now, .. } => *now != autostart,
            Drift::Power { active, .. } => match state {
                PowerState::Running => !active,
                PowerState::Stopped => *active,
                PowerState::Defined => false,
            },
            _ => true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(active: bool, autostart: bool) -> Listing {
        Listing {
            name: "web".into(),
            uuid: "u".into(),
            active,
            autostart,
            persistent: true,
        }
    }

    fn record(state: PowerState, autostart: bool) -> VmRecord {
        VmRecord {
            applied_commit: Some("c".into()),
            fingerprint: Some("fp".into()),
            autostart,
            ok: true,
            definition_hash: Some("h".into()),
            state: Some(state),
            ..Default::default()
        }
    }

    #[test]
    fn each_kind_of_drift() {
        let rec = record(PowerState::Running, true);
        let l = listing(true, true);
        let now = |listing, tag, hash| Now {
            listing,
            tag_fingerprint: tag,
            definition_hash: hash,
        };
        assert_eq!(detect(&rec, now(Some(&l), Some("fp"), Some("h"))), vec![]);
        assert_eq!(detect(&rec, now(None, None, None)), vec![Drift::Undefined]);
        assert_eq!(
            detect(&rec, now(Some(&l), Some("fp"), Some("edited"))),
            vec![Drift::Definition]
        );
        assert_eq!(
            detect(&rec, now(Some(&l), None, Some("h"))),
            vec![Drift::Untagged]
        );
        // Another tag than the recorded one: vmsync's own define whose record was lost,
        // not drift (whatever the stale baseline says).
        assert_eq!(
            detect(&rec, now(Some(&l), Some("fp2"), Some("other"))),
            vec![]
        );
        let off = listing(false, false);
        let d = detect(&rec, now(Some(&off), Some("fp"), Some("h")));
        assert_eq!(
            d.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec![
                "autostart is off, committed on",
                "domain is shut off, committed state running"
            ]
        );
        let stopped = record(PowerState::Stopped, false);
        let on = listing(true, false);
        assert_eq!(
            detect(&stopped, now(Some(&on), Some("fp"), Some("h")))[0].to_string(),
            "domain is running, committed state stopped"
        );
        let defined = record(PowerState::Defined, false);
        assert!(detect(&defined, now(Some(&on), Some("fp"), Some("h"))).is_empty());
        assert!(detect(&VmRecord::default(), now(None, None, None)).is_empty());
    }

    #[test]
    fn what_the_commit_asks_for_is_not_drift() {
        let autostart = Drift::Autostart {
            now: true,
            applied: false,
        };
        let running = Drift::Power {
            active: true,
            applied: PowerState::Stopped,
        };
        let all = vec![Drift::Definition, autostart.clone(), running.clone()];
        assert_eq!(
            against_commit(all.clone(), true, PowerState::Running),
            vec![Drift::Definition]
        );
        assert_eq!(
            against_commit(all, false, PowerState::Stopped),
            vec![Drift::Definition, autostart, running]
        );
    }
}
