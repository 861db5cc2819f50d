//! Why a sync did not converge, and the exit status of each reason (the table in
//! docs/operations.md): the few errors the program branches on, as one type.

use crate::config::ConfigError;
use crate::desired::manifest::Problem;
use crate::host::hypervisor::HvError;
use crate::record::SyncResult;
use crate::repo::source::FetchError;
use crate::repo::trust::TrustError;
use crate::util::fsio::LockHeld;

/// Why a run did not converge; each kind has its exit status.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("commit {commit} is invalid; nothing was applied:\n{}", list(.problems))]
    Invalid {
        commit: String,
        problems: Vec<Problem>,
    },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Locked(#[from] LockHeld),
    /// The commit is not trusted: unsigned, badly signed, or not descending from what
    /// this host already applied. Nothing was applied.
    #[error("{0}; nothing was applied")]
    Untrusted(#[from] TrustError),
    #[error(
        "{} failed at commit {commit}; the last applied commit is unchanged",
        failed_summary(*failed, *total, resources)
    )]
    ActionsFailed {
        commit: String,
        /// VMs (and prunes) that failed, of `total` VMs.
        failed: usize,
        total: usize,
        /// The networks, pools and volumes that failed: `network 'lab'`.
        resources: Vec<String>,
    },
    #[error(
        "commit {commit} failed {attempts} times in a row; not retrying it until a newer commit arrives (`vmsync --once` retries it now)"
    )]
    GaveUp { commit: String, attempts: u32 },
    #[error(transparent)]
    Libvirt(#[from] HvError),
    #[error("commit {commit} is refused; nothing was applied: {message}")]
    Refused { commit: String, message: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl SyncError {
    /// The documented exit status (docs/operations.md).
    pub fn exit_code(&self) -> u8 {
        match self {
            SyncError::Config(_) => 2,
            SyncError::Invalid { .. } | SyncError::Refused { .. } => 3,
            SyncError::Fetch(_) => 4,
            SyncError::Untrusted(_) => 5,
            SyncError::Locked(_) => 75,
            SyncError::ActionsFailed { .. }
            | SyncError::GaveUp { .. }
            | SyncError::Libvirt(_)
            | SyncError::Other(_) => 1,
        }
    }

    /// How the record remembers an attempt that ended with this error (`None`: the
    /// attempt is not recorded, as when another vmsync holds the lock or the sync gave up
    /// before trying).
    pub fn result(&self) -> Option<SyncResult> {
        match self {
            SyncError::Locked(_) | SyncError::GaveUp { .. } => None,
            SyncError::Invalid { .. } => Some(SyncResult::Invalid),
            SyncError::Refused { .. } => Some(SyncResult::Refused),
            SyncError::Untrusted(_) => Some(SyncResult::Untrusted),
            SyncError::Fetch(_) => Some(SyncResult::FetchFailed),
            SyncError::ActionsFailed { .. }
            | SyncError::Config(_)
            | SyncError::Libvirt(_)
            | SyncError::Other(_) => Some(SyncResult::Failed),
        }
    }
}

/// `1 of 3 vms, network 'lab'`: what failed, VMs counted, networks and pools named.
fn failed_summary(failed: usize, total: usize, resources: &[String]) -> String {
    let mut parts = Vec::new();
    if failed > 0 || resources.is_empty() {
        parts.push(format!("{failed} of {total} vms"));
    }
    parts.extend(resources.iter().cloned());
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_summary_counts_vms_and_names_networks_and_pools() {
        let summary = |failed, total, resources: &[&str]| {
            SyncError::ActionsFailed {
                commit: "c".into(),
                failed,
                total,
                resources: resources.iter().map(|r| r.to_string()).collect(),
            }
            .to_string()
        };
        let tail = " failed at commit c; the last applied commit is unchanged";
        assert_eq!(summary(1, 3, &[]), format!("1 of 3 vms{tail}"));
        assert_eq!(
            summary(0, 3, &["network 'lab'"]),
            format!("network 'lab'{tail}")
        );
        assert_eq!(
            summary(2, 3, &["pool 'p'", "volume 'v' of pool 'p'"]),
            format!("2 of 3 vms, pool 'p', volume 'v' of pool 'p'{tail}")
        );
    }

    #[test]
    fn every_error_has_its_documented_exit_status_and_record() {
        let invalid = SyncError::Invalid {
            commit: "c".into(),
            problems: vec![],
        };
        let failed = SyncError::ActionsFailed {
            commit: "c".into(),
            failed: 1,
            total: 2,
            resources: vec![],
        };
        let cases: Vec<(SyncError, u8, Option<SyncResult>)> = vec![
            (ConfigError("x".into()).into(), 2, Some(SyncResult::Failed)),
            (invalid, 3, Some(SyncResult::Invalid)),
            (
                SyncError::Refused {
                    commit: "c".into(),
                    message: "m".into(),
                },
                3,
                Some(SyncResult::Refused),
            ),
            (
                FetchError::InvalidBranch { branch: "".into() }.into(),
                4,
                Some(SyncResult::FetchFailed),
            ),
            (
                TrustError::Unsigned { commit: "c".into() }.into(),
                5,
                Some(SyncResult::Untrusted),
            ),
            (
                LockHeld(std::path::PathBuf::from("/x/lock")).into(),
                75,
                None,
            ),
            (failed, 1, Some(SyncResult::Failed)),
            (
                SyncError::GaveUp {
                    commit: "c".into(),
                    attempts: 3,
                },
                1,
                None,
            ),
            (
                HvError::new("start", Some("web"), "qemu:///system", "boom").into(),
                1,
                Some(SyncResult::Failed),
            ),
        ];
        for (error, code, result) in cases {
            assert_eq!(error.exit_code(), code, "{error}");
            assert_eq!(error.result(), result, "{error}");
        }
    }
}
