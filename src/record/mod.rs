//! Layer 2, what vmsync remembers between runs: the record of the last applied and last
//! attempted commit with per-VM, network and pool results (`state.json`; [`store`] reads
//! and writes it; `reconcile::record_update` decides what goes in).

pub mod healthy_file;
pub mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::desired::manifest::PowerState;

/// How the last sync attempt ended.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::EnumIter, strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum SyncResult {
    /// Every VM converged; the commit is the last applied one.
    Converged,
    /// Some action failed; see the VMs' errors.
    Failed,
    /// The commit did not validate; nothing was applied.
    Invalid,
    /// The source could not be fetched.
    FetchFailed,
    /// The commit would prune too many domains; nothing was applied.
    Refused,
    /// The commit is not trusted (signature, history rewrite); nothing was applied.
    Untrusted,
}

/// Per-VM record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The last commit this VM converged to.
    pub applied_commit: Option<String>,
    /// Fingerprint of the definition applied.
    pub fingerprint: Option<String>,
    /// The autostart setting applied.
    pub autostart: bool,
    /// Whether the last attempt for this VM succeeded.
    pub ok: bool,
    /// The last attempt's error, if it failed.
    pub last_error: Option<String>,
    /// The domain was running with an older definition at the last sync.
    pub pending_restart: bool,
    /// Drift baseline: `domain_xml::definition_hash` of libvirt's inactive XML right
    /// after vmsync defined it (or when first seen converged).
    #[serde(default)]
    pub definition_hash: Option<String>,
    /// The power state applied (`state` in the manifest).
    #[serde(default)]
    pub state: Option<PowerState>,
    /// What differed from the last applied state at the last sync (empty: none).
    #[serde(default)]
    pub drift: Vec<String>,
    /// The last health check's result (`[vm.health]`; none: never checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthResult>,
    /// The commit of the last healthy definition (kept in `healthy/NAME.xml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_commit: Option<String>,
    /// The fingerprint of the last healthy definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_fingerprint: Option<String>,
    /// A reverted definition, not tried again until the commit's definition changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_back: Option<HeldBack>,
    /// What its actions wait for at the last sync ("window 2026-12-06T02:00:00Z").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// `depends_on` at the last sync: `vmsync shutdown` stops it before these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Its own `shutdown_timeout` in seconds at the last sync (none: the agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_seconds: Option<u64>,
}

/// The record in `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub last_applied_commit: Option<String>,
    /// RFC 3339 time the last applied commit converged.
    pub last_applied_at: Option<String>,
    pub last_attempted_commit: Option<String>,
    pub last_attempt_at: Option<String>,
    pub last_result: Option<SyncResult>,
    /// The last attempt's error summary (invalid commit, fetch failure, failed VMs).
    pub last_error: Option<String>,
    /// Consecutive attempts of `last_attempted_commit` that did not converge.
    #[serde(default)]
    pub failed_attempts: u32,
    pub vms: BTreeMap<String, VmRecord>,
    /// Disks of domains vmsync pruned: path → the domain they belonged to. vmsync never
    /// deletes them; they are listed until the file is gone.
    #[serde(default)]
    pub orphaned_disks: BTreeMap<String, String>,
    /// Networks vmsync defined (or adopted), by name.
    #[serde(default)]
    pub networks: BTreeMap<String, ResourceRecord>,
    /// Storage pools vmsync defined (or adopted), by name, with their UUID: pool XML has
    /// no `<metadata>`, so this is how vmsync knows its pools.
    #[serde(default)]
    pub pools: BTreeMap<String, ResourceRecord>,
}

impl SyncResult {
    /// The name in `state.json`, `status --json` and the metrics' `result` label.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl Record {
    /// Whether `commit` already failed `max` times in a row (the daemon then waits for a
    /// newer commit instead of trying it again).
    pub fn gives_up_on(&self, commit: &str, max: u32) -> bool {
        self.last_attempted_commit.as_deref() == Some(commit)
            && self.last_result != Some(SyncResult::Converged)
            && self.failed_attempts >= max
    }
}

/// A VM's health after the last check (`status`, metrics, the record).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::EnumIter, strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum HealthResult {
    /// Passed: its definition is the last healthy one.
    Healthy,
    /// Failed and left as it is (`revert = false`, or no healthy definition yet).
    Unhealthy,
    /// Failed; the last healthy definition was put back and passed.
    Reverted,
    /// Failed, and putting the last healthy definition back failed too.
    RevertFailed,
}

impl HealthResult {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Whether the sync that got this result failed (exit 1).
    pub fn failed(self) -> bool {
        self != HealthResult::Healthy
    }
}

/// A commit's definition of a VM that was reverted: not tried again while the commit's
/// definition of the VM stays the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBack {
    /// The commit that brought the definition.
    pub commit: String,
    /// The definition's fingerprint (what a newer commit must change).
    pub fingerprint: String,
    /// Why it was reverted.
    pub reason: String,
}

/// What the record keeps of a network or pool vmsync defined.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRecord {
    /// The UUID libvirt gave it when vmsync defined it: a pool's ownership (pool XML has
    /// no `<metadata>`), and a network's too.
    pub uuid: Option<String>,
    pub applied_commit: Option<String>,
    pub fingerprint: Option<String>,
    pub autostart: bool,
    pub ok: bool,
    pub last_error: Option<String>,
    pub pending_restart: bool,
    /// Drift baseline: `domain_xml::definition_hash` of libvirt's inactive XML after
    /// vmsync defined it.
    pub definition_hash: Option<String>,
    #[serde(default)]
    pub drift: Vec<String>,
}
