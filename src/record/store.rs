//! The record on disk, in the state directory: `state.json` (written atomically: temp
//! file, fsync, rename, fsync of the directory) and the VMs' last healthy definitions.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::record::Record;
use crate::util::fsio::write_atomic_with;

pub const STATE_FILE: &str = "state.json";

/// The directory of the VMs' last healthy definitions (`healthy/NAME.xml`).
pub const HEALTHY_DIR: &str = "healthy";

/// The file of `vm`'s last healthy definition (libvirt's inactive XML, with vmsync's tag).
pub fn healthy_file(state_dir: &Path, vm: &str) -> PathBuf {
    state_dir.join(HEALTHY_DIR).join(format!("{vm}.xml"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SyncResult;
    use crate::record::VmRecord;

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

    /// A state.json as vmsync 2375f90 (before the source was layered) wrote it, with
    /// VMs (failed, pending restart, healthy, reverted and held back), an orphaned disk,
    /// a network and a pool: it loads, and is written back byte for byte.
    #[test]
    fn a_record_of_2375f90_loads_and_is_written_back_unchanged() {
        let fixture = include_str!("../../tests/fixtures/state-2375f90.json");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), fixture).unwrap();
        let record = load(dir.path()).unwrap();
        assert_eq!(record.vms.len(), 4);
        assert_eq!(record.networks.len(), 1);
        assert_eq!(record.pools.len(), 1);
        assert_eq!(
            record.vms["web"]
                .held_back
                .as_ref()
                .map(|h| h.commit.as_str()),
            Some("9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c")
        );
        save(dir.path(), &record).unwrap();
        let written = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(written, fixture);
    }
}
