//! What vmsync remembers between runs, in its state directory: the record of the last
//! applied and last attempted commit with per-VM results (`state.json`, written
//! atomically: temp file, fsync, rename, fsync of the directory), and the lock that keeps
//! two vmsync processes from syncing at once.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::reconcile::apply::Outcome;

pub const STATE_FILE: &str = "state.json";
pub const LOCK_FILE: &str = "lock";
/// The directory of the VMs' last healthy definitions (`healthy/NAME.xml`).
pub const HEALTHY_DIR: &str = "healthy";

/// The file of `vm`'s last healthy definition (libvirt's inactive XML, with vmsync's tag).
pub fn healthy_file(state_dir: &Path, vm: &str) -> PathBuf {
    state_dir.join(HEALTHY_DIR).join(format!("{vm}.xml"))
}

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
    pub state: Option<crate::desired::manifest::PowerState>,
    /// What differed from the last applied state at the last sync (empty: none).
    #[serde(default)]
    pub drift: Vec<String>,
    /// The last health check's result (`[vm.health]`; none: never checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::reconcile::health::HealthResult>,
    /// The commit of the last healthy definition (kept in `healthy/NAME.xml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_commit: Option<String>,
    /// The fingerprint of the last healthy definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_fingerprint: Option<String>,
    /// A reverted definition, not tried again until the commit's definition changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_back: Option<crate::reconcile::health::HeldBack>,
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
    pub networks: BTreeMap<String, crate::reconcile::resources::ResourceRecord>,
    /// Storage pools vmsync defined (or adopted), by name, with their UUID: pool XML has
    /// no `<metadata>`, so this is how vmsync knows its pools.
    #[serde(default)]
    pub pools: BTreeMap<String, crate::reconcile::resources::ResourceRecord>,
}

impl SyncResult {
    /// The name in `state.json`, `status --json` and the metrics' `result` label.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl Record {
    /// Notes an attempt of `commit` that did not converge.
    pub fn count_failure(&mut self, commit: &str) {
        if self.last_attempted_commit.as_deref() == Some(commit) {
            self.failed_attempts = self.failed_attempts.saturating_add(1);
        } else {
            self.failed_attempts = 1;
        }
    }

    /// Whether `commit` already failed `max` times in a row (the daemon then waits for a
    /// newer commit instead of trying it again).
    pub fn gives_up_on(&self, commit: &str, max: u32) -> bool {
        self.last_attempted_commit.as_deref() == Some(commit)
            && self.last_result != Some(SyncResult::Converged)
            && self.failed_attempts >= max
    }

    /// Records an attempt that ended before anything was applied (`commit` is `None`
    /// when nothing was fetched): the last applied commit and the VMs' records stay.
    pub fn record_failure(
        &mut self,
        commit: Option<&str>,
        result: SyncResult,
        message: &str,
        now: &str,
    ) {
        if let Some(commit) = commit {
            self.count_failure(commit);
            self.last_attempted_commit = Some(commit.to_string());
        }
        self.last_attempt_at = Some(now.to_string());
        self.last_result = Some(result);
        self.last_error = Some(message.to_string());
    }

    /// Records what applying `commit` did. `left_in_place`: managed domains the plan
    /// would prune; those not pruned (pruning off, or failed) keep their records: they
    /// are still this agent's, and may be pruned later. The commit becomes the last
    /// applied one only if everything succeeded.
    pub fn record_outcome<'a>(
        &mut self,
        commit: &str,
        left_in_place: impl IntoIterator<Item = &'a str>,
        outcome: &Outcome,
        now: &str,
    ) {
        let mut vms = BTreeMap::new();
        for vm in &outcome.vms {
            let old = self.vms.get(&vm.name).cloned().unwrap_or_default();
            vms.insert(vm.name.clone(), vm.record(commit, old));
        }
        for name in left_in_place {
            let pruned = outcome
                .pruned
                .iter()
                .any(|o| o.name == name && o.error.is_none());
            if !pruned && let Some(old) = self.vms.get(name) {
                vms.insert(name.to_string(), old.clone());
            }
        }
        self.vms = vms;
        if outcome.all_ok() {
            self.failed_attempts = 0;
        } else {
            self.count_failure(commit);
        }
        for p in &outcome.pruned {
            for disk in &p.orphaned_disks {
                self.orphaned_disks
                    .insert(disk.display().to_string(), p.name.clone());
            }
        }
        self.orphaned_disks
            .retain(|path, _| std::path::Path::new(path).exists());
        self.last_attempted_commit = Some(commit.to_string());
        self.last_attempt_at = Some(now.to_string());
        let mut errors = outcome.directory_errors.clone();
        errors.extend(outcome.resources.errors());
        errors.extend(
            outcome
                .vms
                .iter()
                .filter_map(|vm| vm.error.as_ref().map(|e| format!("vm '{}': {e}", vm.name))),
        );
        errors.extend(
            outcome
                .pruned
                .iter()
                .filter_map(|p| p.error.as_ref().map(|e| format!("prune '{}': {e}", p.name))),
        );
        if errors.is_empty() {
            self.last_applied_commit = Some(commit.to_string());
            self.last_applied_at = Some(now.to_string());
            self.last_result = Some(SyncResult::Converged);
            self.last_error = None;
        } else {
            self.last_result = Some(SyncResult::Failed);
            self.last_error = Some(errors.join("; "));
        }
    }
}

/// Now, as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Reads the record; a missing file is an empty record.
pub fn load(state_dir: &Path) -> anyhow::Result<Record> {
    let path = state_dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "state file '{}' is corrupt: {e}; vmsync does not guess what it held: move it aside (mv {} {}.damaged) and run again: the domains' and networks' vmsync tags keep what was applied (pools vmsync defined then need `adopt = true` once)",
                path.display(),
                path.display(),
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
        Err(e) => Err(anyhow::anyhow!(
            "failed to read state file '{}': {e}",
            path.display()
        )),
    }
}

/// Writes the record atomically: a reader (or a crash) sees the old or the new file.
/// Streamed into the file: a thousand VMs' records are not held a second time as text.
pub fn save(state_dir: &Path, record: &Record) -> anyhow::Result<()> {
    // The record's write is lost (a full disk, a crash): tests/faults.rs.
    crate::crash_point("record-write");
    write_atomic_with(&state_dir.join(STATE_FILE), |file| {
        let mut out = std::io::BufWriter::new(file);
        serde_json::to_writer_pretty(&mut out, record)?;
        out.write_all(b"\n")?;
        out.flush()
    })
}

/// Writes `bytes` to `path` atomically: temp file in the same directory, write, fsync,
/// rename over `path`, fsync of the directory. A reader (or a crash) sees the old or the
/// new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// [`write_atomic`] with the content written by `write` into the temporary file.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    replace(path, write, true)
}

/// For a cache: replaced atomically (a reader sees the old or the new content), but not
/// fsynced. After a crash the file may hold the old content, or be empty or torn, which
/// a cache must read as empty; the fsyncs cost more than the write (3.8 ms of a sync at
/// 1000 domains for the schema cache).
pub fn write_cache_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    replace(path, write, false)
}

/// Temp file in the same directory, `write`, (fsync,) rename over `path`, (fsync of the
/// directory).
fn replace(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
    durable: bool,
) -> anyhow::Result<()> {
    let context = |e: std::io::Error| anyhow::anyhow!("failed to write '{}': {e}", path.display());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempfile_in(dir)
        .map_err(context)?;
    write(tmp.as_file_mut()).map_err(context)?;
    if durable {
        tmp.as_file().sync_all().map_err(context)?;
    }
    crate::crash_point("before-rename");
    tmp.persist(path).map_err(|e| context(e.error))?;
    if durable {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(context)?;
    }
    Ok(())
}

/// Another vmsync holds the lock (exit status 75).
#[derive(Debug, thiserror::Error)]
#[error("another vmsync is running (lock '{}' is held)", .0.display())]
pub struct LockHeld(pub PathBuf);

/// The state directory's lock, held until dropped.
#[derive(Debug)]
pub struct Lock {
    file: File,
}

impl Drop for Lock {
    /// Unlocks before the file is closed: a child that another thread forked meanwhile
    /// shares the open file, and with it the lock, until it executes its program; an
    /// unlock frees it for every holder at once, a close only for this one.
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// Creates the state directory if needed and takes its lock without waiting.
pub fn lock(state_dir: &Path) -> anyhow::Result<Lock> {
    std::fs::create_dir_all(state_dir).map_err(|e| {
        anyhow::anyhow!(
            "failed to create state directory '{}': {e}",
            state_dir.display()
        )
    })?;
    let path = state_dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("failed to open lock '{}': {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Lock { file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(LockHeld(path).into()),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::anyhow!("failed to lock '{}': {e}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), Record::default());
        let mut record = Record {
            last_applied_commit: Some("a".repeat(40)),
            last_result: Some(SyncResult::Converged),
            ..Default::default()
        };
        record.vms.insert(
            "web".into(),
            VmRecord {
                ok: true,
                autostart: true,
                ..Default::default()
            },
        );
        save(dir.path(), &record).unwrap();
        assert_eq!(load(dir.path()).unwrap(), record);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(STATE_FILE)],
            "no temp file left behind"
        );
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert!(text.contains("\"last_result\": \"converged\""), "{text}");
    }

    #[test]
    fn records_of_an_older_vmsync_still_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"last_applied_commit":null,"last_applied_at":null,"last_attempted_commit":null,
               "last_attempt_at":null,"last_result":"converged","last_error":null,
               "vms":{"web":{"applied_commit":"c","fingerprint":"f","autostart":true,"ok":true,
               "last_error":null,"pending_restart":false}}}"#,
        )
        .unwrap();
        let record = load(dir.path()).unwrap();
        assert_eq!(record.vms["web"].definition_hash, None);
        assert_eq!(record.vms["web"].state, None);
        assert!(record.orphaned_disks.is_empty());
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), "{not json").unwrap();
        assert!(
            load(dir.path())
                .unwrap_err()
                .to_string()
                .contains("corrupt")
        );
    }

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).unwrap();
        let err = lock(dir.path()).unwrap_err();
        assert!(err.downcast_ref::<LockHeld>().is_some(), "{err}");
        drop(first);
        // A child that another test thread forked while the lock was open holds a copy
        // of it until that child executes its program (close-on-exec): wait that out.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while let Err(e) = lock(dir.path()) {
            assert!(std::time::Instant::now() < deadline, "{e}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn vm_outcome(name: &str, error: Option<&str>) -> crate::reconcile::apply::VmOutcome {
        crate::reconcile::apply::VmOutcome {
            name: name.into(),
            fingerprint: format!("fp-{name}"),
            autostart: true,
            state: crate::desired::manifest::PowerState::Running,
            done: vec!["define".into()],
            error: error.map(Into::into),
            pending_restart: false,
            drift: vec![],
            drift_reported_only: false,
            definition_hash: Some(format!("hash-{name}")),
            previous_hash: None,
            up: true,
            kinds: vec![],
            defined: error.is_none(),
            autostart_set: error.is_none(),
            power_unsettled: false,
        }
    }

    fn applied(commit: &str, vms: &[&str]) -> Record {
        let mut record = Record {
            last_applied_commit: Some(commit.into()),
            last_attempted_commit: Some(commit.into()),
            last_result: Some(SyncResult::Converged),
            ..Default::default()
        };
        for vm in vms {
            record.vms.insert(
                vm.to_string(),
                VmRecord {
                    applied_commit: Some(commit.into()),
                    ok: true,
                    definition_hash: Some(format!("old-{vm}")),
                    ..Default::default()
                },
            );
        }
        record
    }

    /// A failure before anything was applied: per result, what the record says after.
    #[test]
    fn a_failed_attempt_keeps_the_last_applied_commit_and_the_vms() {
        for (commit, result, attempts) in [
            (Some("b"), SyncResult::Invalid, 1),
            (Some("b"), SyncResult::Untrusted, 1),
            (Some("b"), SyncResult::Refused, 1),
            (Some("b"), SyncResult::Failed, 1),
            (None, SyncResult::FetchFailed, 0),
        ] {
            let mut record = applied("a", &["web"]);
            let before = record.vms.clone();
            record.record_failure(commit, result, "why", "2026-11-27T12:00:00Z");
            assert_eq!(
                record.last_applied_commit.as_deref(),
                Some("a"),
                "{result:?}"
            );
            assert_eq!(record.vms, before, "{result:?}");
            assert_eq!(record.last_result, Some(result));
            assert_eq!(record.last_error.as_deref(), Some("why"));
            assert_eq!(record.failed_attempts, attempts, "{result:?}");
            assert_eq!(
                record.last_attempted_commit.as_deref(),
                Some(commit.unwrap_or("a")),
                "{result:?}"
            );
        }
    }

    #[test]
    fn the_same_commit_failing_again_counts_up_and_the_daemon_gives_up_at_the_limit() {
        let mut record = applied("a", &[]);
        for attempt in 1..=3 {
            assert!(!record.gives_up_on("b", 3), "attempt {attempt}");
            record.record_failure(Some("b"), SyncResult::Invalid, "x", "t");
            assert_eq!(record.failed_attempts, attempt);
        }
        assert!(record.gives_up_on("b", 3));
        assert!(!record.gives_up_on("c", 3), "a newer commit is tried");
        record.record_failure(Some("c"), SyncResult::Invalid, "x", "t");
        assert_eq!(
            record.failed_attempts, 1,
            "a new commit starts again at one"
        );
    }

    /// What applying did: per case, the last applied commit, the result and each VM.
    #[test]
    fn an_outcome_is_recorded_per_vm_and_converges_only_when_all_succeeded() {
        // All succeeded: the commit is the last applied one; a VM no longer desired and
        // not pruned keeps its record, one pruned is gone.
        let mut record = applied("a", &["web", "db", "old", "gone"]);
        let outcome = crate::reconcile::apply::Outcome {
            vms: vec![vm_outcome("web", None), vm_outcome("db", None)],
            pruned: vec![crate::reconcile::apply::PruneOutcome {
                name: "gone".into(),
                done: vec!["undefine".into()],
                error: None,
                orphaned_disks: vec![],
            }],
            ..Default::default()
        };
        record.record_outcome("b", ["old", "gone"], &outcome, "now");
        assert_eq!(record.last_applied_commit.as_deref(), Some("b"));
        assert_eq!(record.last_result, Some(SyncResult::Converged));
        assert_eq!(record.last_error, None);
        assert_eq!(record.failed_attempts, 0);
        assert_eq!(
            record.vms.keys().collect::<Vec<_>>(),
            ["db", "old", "web"],
            "kept: not pruned; gone: pruned"
        );
        assert_eq!(record.vms["web"].applied_commit.as_deref(), Some("b"));
        assert_eq!(
            record.vms["web"].definition_hash.as_deref(),
            Some("hash-web")
        );
        assert_eq!(record.vms["old"].applied_commit.as_deref(), Some("a"));

        // One VM failed: the commit is attempted, not applied; the failed VM keeps what
        // was applied before, with the error; the other one moves on.
        let mut record = applied("a", &["web", "db"]);
        let outcome = crate::reconcile::apply::Outcome {
            vms: vec![vm_outcome("web", Some("boom")), vm_outcome("db", None)],
            ..Default::default()
        };
        record.record_outcome("b", [], &outcome, "now");
        assert_eq!(record.last_applied_commit.as_deref(), Some("a"));
        assert_eq!(record.last_attempted_commit.as_deref(), Some("b"));
        assert_eq!(record.last_result, Some(SyncResult::Failed));
        assert_eq!(record.last_error.as_deref(), Some("vm 'web': boom"));
        assert_eq!(record.failed_attempts, 1);
        let web = &record.vms["web"];
        assert!(!web.ok);
        assert_eq!(web.applied_commit.as_deref(), Some("a"));
        assert_eq!(web.definition_hash.as_deref(), Some("old-web"));
        assert_eq!(record.vms["db"].applied_commit.as_deref(), Some("b"));

        // A directory that could not be made fails the sync too.
        let mut record = applied("a", &[]);
        let outcome = crate::reconcile::apply::Outcome {
            directory_errors: vec!["directory '/x': denied".into()],
            ..Default::default()
        };
        record.record_outcome("b", [], &outcome, "now");
        assert_eq!(record.last_result, Some(SyncResult::Failed));
        assert_eq!(record.last_applied_commit.as_deref(), Some("a"));
    }
}
