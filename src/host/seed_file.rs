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
}
