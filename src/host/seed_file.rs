//! Cloud-init seed images on the host: written atomically (temporary file, fsync,
//! rename) with mode 0600 into `[policy] seed_dir` (created with mode 0711: QEMU may pass
//! through it but not list it), and read back just far enough to tell which seed a file
//! holds. libvirt's DAC driver hands a read-only CD-ROM's image to the QEMU user when the
//! domain starts (and does not hand it back at shutdown), so only root and QEMU read it.

use std::os::unix::fs::{DirBuilderExt, FileExt, PermissionsExt};
use std::path::Path;

use crate::desired::seed_spec::{self, SeedSpec};
use crate::util::{fsio, iso9660};

/// Writes `seed`'s image to its path, creating the seed directory when missing. A seed
/// whose content was not built (taken from the seed cache) is refused before anything
/// is touched: the sync builds the content of every seed it writes.
pub fn write(seed: &SeedSpec) -> anyhow::Result<()> {
    let image = seed.image().ok_or_else(|| {
        anyhow::anyhow!(
            "the content of seed '{}' was not built (a seed taken from the seed cache cannot be written)",
            seed.path.display()
        )
    })?;
    if let Some(dir) = seed.path.parent()
        && !dir.is_dir()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(|e| {
                anyhow::anyhow!("failed to create seed directory '{}': {e}", dir.display())
            })?;
        // The mode the umask may have narrowed.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| anyhow::anyhow!("failed to set the mode of '{}': {e}", dir.display()))?;
    }
    fsio::write_atomic_with(&seed.path, |file| {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        std::io::Write::write_all(file, &image)
    })
}

/// A seed image as seen at an earlier sync: its inode's identity and times, and the
/// seed hash it held. While a file's device, inode, size, modification and change times
/// are the same, its content is: the kernel moves the change time on every write (and
/// no one can set it back), and a file replaced by a rename is another inode.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeenSeed {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub hash: Option<String>,
}

/// What was seen of each seed image at the last sync, by path.
pub type SeenSeeds = std::collections::HashMap<std::path::PathBuf, SeenSeed>;

/// A change time this close to the moment a file was seen may be followed by a write
/// in the same clock tick (a coarse file-system clock): such a file is read again at
/// the next sync rather than trusted (git's "racily clean" rule).
const RACY_NS: i128 = 2_000_000_000;

/// The hash of the vmsync seed at `path` ([`observed_hash`]), without reading the file
/// when `known` says what it held and the file has not changed since; also what to
/// remember of it for the next sync (`None`: no file, or seen too soon after a change).
pub fn observed_hash_since(
    path: &Path,
    known: Option<&SeenSeed>,
    now: std::time::SystemTime,
) -> (Option<String>, Option<SeenSeed>) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return (None, None);
    };
    let ns = |secs: i64, nsec: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsec);
    let mut seen = SeenSeed {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        hash: None,
    };
    let hash = match known {
        Some(k)
            if SeenSeed {
                hash: None,
                ..k.clone()
            } == seen =>
        {
            k.hash.clone()
        }
        _ => observed_hash(path),
    };
    seen.hash = hash.clone();
    let now_ns = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let settled = now_ns - seen.ctime_ns >= RACY_NS;
    (hash, settled.then_some(seen))
}

/// The hash of the vmsync seed at `path`; `None` when there is no file, or it is not a
/// seed vmsync wrote. Reads one sector (the primary volume descriptor).
pub fn observed_hash(path: &Path) -> Option<String> {
    let mut pvd = vec![0u8; iso9660::SECTOR];
    std::fs::File::open(path)
        .ok()?
        .read_exact_at(&mut pvd, iso9660::PVD_OFFSET)
        .ok()?;
    let (label, app) = iso9660::read_label_and_app(&pvd)?;
    if label != seed_spec::LABEL {
        return None;
    }
    seed_spec::hash_of_app_id(&app)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::cloud_init_spec::SeedOnChange;
    use crate::desired::seed_spec::SeedContent;

    #[test]
    fn a_seed_without_content_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut seed = SeedSpec {
            path: dir.path().join("seeds/web-cidata.iso"),
            target: "sda".into(),
            content: None,
            hash: "ab".repeat(32),
            instance_id: seed_spec::instance_id(&"ab".repeat(32)),
            on_change: SeedOnChange::NextBoot,
            has_secret: false,
        };
        let err = write(&seed).unwrap_err().to_string();
        assert!(err.contains("was not built"), "{err}");
        assert!(!dir.path().join("seeds").exists());
        seed.content = Some(SeedContent {
            user_data: b"#cloud-config\n".to_vec(),
            meta_data: b"instance-id: x\n".to_vec(),
            network_config: None,
        });
        write(&seed).unwrap();
        assert_eq!(observed_hash(&seed.path), Some(seed.hash.clone()));
    }

    #[test]
    fn a_seed_seen_before_and_unchanged_is_not_read_again() {
        use std::time::{Duration, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-cidata.iso");
        let hash = "cd".repeat(32);
        let seed = SeedSpec {
            path: path.clone(),
            target: "sda".into(),
            content: Some(SeedContent {
                user_data: b"#cloud-config\n".to_vec(),
                meta_data: b"instance-id: x\n".to_vec(),
                network_config: None,
            }),
            instance_id: seed_spec::instance_id(&hash),
            hash: hash.clone(),
            on_change: SeedOnChange::NextBoot,
            has_secret: false,
        };
        write(&seed).unwrap();
        let later = SystemTime::now() + Duration::from_secs(10);
        // Just written: read, and not remembered (its change time is too recent).
        let (read, remembered) = observed_hash_since(&path, None, SystemTime::now());
        assert_eq!((read, remembered), (Some(hash.clone()), None));
        let (read, seen) = observed_hash_since(&path, None, later);
        assert_eq!(read, Some(hash.clone()));
        let seen = seen.unwrap();
        // Unchanged: what was remembered is taken, the file is not read (a planted hash
        // shows it).
        let planted = SeenSeed {
            hash: Some("planted".into()),
            ..seen.clone()
        };
        let (read, again) = observed_hash_since(&path, Some(&planted), later);
        assert_eq!(read.as_deref(), Some("planted"));
        assert_eq!(again, Some(planted.clone()));
        // Changed in place (same size, mtime set back): the change time moved, read.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", 0).unwrap();
        file.set_modified(mtime).unwrap();
        drop(file);
        let (read, _) = observed_hash_since(&path, Some(&planted), later);
        assert_eq!(read, Some(hash.clone()));
        // Gone: nothing, and nothing to remember.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(observed_hash_since(&path, Some(&seen), later), (None, None));
    }
}
