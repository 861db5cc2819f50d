//! The image directory (`[policy] image_dir`): base images named by content
//! (`<sha256>.<format>`), each downloaded once per host and never changed.
//!
//! A download goes to `.<sha256>.<format>.vmsync-tmp` in the image directory (mode 0600),
//! is hashed while it streams (`host::image_fetch`), fsynced, checked (the sha256 of the
//! served bytes; then the image itself, by the caller's `verify`: `qemu-img info` says
//! it is the declared format and a qcow2 names no backing or data file), made read-only
//! (0444) and only then renamed to its name, and the directory fsynced. So a file at the
//! final name is complete and matched its hash: its presence is the proof, and an image
//! already there is never fetched (nor read) again. A mismatch, a cut or stalled download
//! removes the temporary file and leaves nothing at the final name.
//!
//! Within one sync each image is fetched at most once, even when several VMs on several
//! threads need it: the others wait for that download and share its result (a failure
//! fails every VM that uses the image, and only those).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::{info, warn};

use crate::desired::disk_spec::DiskImage;
use crate::desired::host_policy_settings::ImagePolicy;
use crate::host::image_fetch;

/// The result of one image's fetch, shared by the VMs that need it.
type Once = Arc<OnceLock<Result<(), String>>>;

/// The image directory's fetches for one sync.
#[derive(Default)]
pub struct ImageStore {
    pub policy: ImagePolicy,
    pub allow_link_local: bool,
    fetched: Mutex<HashMap<PathBuf, Once>>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("policy", &self.policy)
            .field("allow_link_local", &self.allow_link_local)
            .finish_non_exhaustive()
    }
}

impl Clone for ImageStore {
    /// The same settings, no fetches yet.
    fn clone(&self) -> Self {
        Self::new(self.policy.clone(), self.allow_link_local)
    }
}

impl PartialEq for ImageStore {
    fn eq(&self, other: &Self) -> bool {
        self.policy == other.policy && self.allow_link_local == other.allow_link_local
    }
}

impl Eq for ImageStore {}

/// The temporary name of `file` while it downloads.
fn tmp_path(file: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(file.file_name().unwrap_or_default());
    name.push(".vmsync-tmp");
    file.with_file_name(name)
}

/// Removes `tmp`, logging (not returning) a failure.
fn discard(tmp: &Path) {
    if let Err(e) = fs::remove_file(tmp)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(tmp = %tmp.display(), error = %e, "failed to remove a partial image download");
    }
}

impl ImageStore {
    pub fn new(policy: ImagePolicy, allow_link_local: bool) -> Self {
        Self {
            policy,
            allow_link_local,
            fetched: Mutex::default(),
        }
    }

    /// Makes sure `image.file` is in place: nothing to do when it is; else downloads it
    /// (once per sync, whichever VM asks first), checks it and renames it into place.
    /// `verify(tmp)` checks the downloaded image before it gets its name.
    pub fn fetch(
        &self,
        image: &DiskImage,
        verify: &dyn Fn(&Path) -> Result<(), String>,
    ) -> Result<(), String> {
        let once = {
            let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
            fetched.entry(image.file.clone()).or_default().clone()
        };
        once.get_or_init(|| self.fetch_now(image, verify)).clone()
    }

    /// One fetch, not shared.
    fn fetch_now(
        &self,
        image: &DiskImage,
        verify: &dyn Fn(&Path) -> Result<(), String>,
    ) -> Result<(), String> {
        let file = &image.file;
        if fs::symlink_metadata(file).is_ok() {
            return Ok(());
        }
        let dir = file.parent().unwrap_or(Path::new("/"));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| format!("cannot create the image directory '{}': {e}", dir.display()))?;
        let tmp = tmp_path(file);
        discard(&tmp);
        let result = self.download_to(image, &tmp, verify);
        if result.is_err() {
            discard(&tmp);
        }
        result
    }

    /// Downloads into `tmp`, checks, and renames into place.
    fn download_to(
        &self,
        image: &DiskImage,
        tmp: &Path,
        verify: &dyn Fn(&Path) -> Result<(), String>,
    ) -> Result<(), String> {
        let spec = &image.image;
        let io_err =
            |what: &str, e: io::Error| format!("failed to {what} '{}': {e}", tmp.display());
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
            .map_err(|e| io_err("create", e))?;
        let download = image_fetch::Download {
            image: spec,
            policy: &self.policy,
            allow_link_local: self.allow_link_local,
        };
        let received = image_fetch::download(&download, &mut out)?;
        if received.sha256 != spec.sha256 {
            return Err(format!(
                "image '{}' from '{}' does not match its sha256: expected {}, received {} ({} bytes); nothing was kept",
                spec.name, spec.url, spec.sha256, received.sha256, received.served
            ));
        }
        out.sync_all().map_err(|e| io_err("sync", e))?;
        drop(out);
        verify(tmp).map_err(|e| format!("image '{}' from '{}': {e}", spec.name, spec.url))?;
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o444))
            .map_err(|e| io_err("make read-only", e))?;
        fs::rename(tmp, &image.file).map_err(|e| io_err("rename into place", e))?;
        if let Some(dir) = image.file.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("failed to sync '{}': {e}", dir.display()))?;
        }
        info!(image = %spec.name, file = %image.file.display(), "image in place");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::disk_spec::{Compression, DiskFormat, ImageSpec};
    use crate::host::disk::{DiskError, DiskProvisioner, QemuImg};
    use crate::testing::{Reply, http_server};
    use sha2::{Digest, Sha256};
    use std::io::Write;
    use std::time::Duration;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// A small qcow2 image made by qemu-img (with `extra` options).
    fn qcow2(dir: &Path, extra: &[&str]) -> Vec<u8> {
        let path = dir.join("made.qcow2");
        let _ = fs::remove_file(&path);
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .args(extra)
            .arg(&path)
            .arg("4M")
            .status()
            .unwrap();
        assert!(status.success());
        fs::read(&path).unwrap()
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn xz(bytes: &[u8]) -> Vec<u8> {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn image(url: String, sha256: String, format: DiskFormat) -> ImageSpec {
        let compression = match url.rsplit('.').next() {
            Some("gz") => Compression::Gzip,
            Some("xz") => Compression::Xz,
            _ => Compression::None,
        };
        ImageSpec {
            name: "base".into(),
            line: 1,
            url,
            sha256,
            format,
            compression,
        }
    }

    fn store(dir: &Path, base: &str) -> QemuImg {
        let policy = ImagePolicy {
            dir: dir.to_path_buf(),
            urls: vec![base.to_string()],
            timeout: Duration::from_secs(1),
        };
        QemuImg {
            images: ImageStore::new(policy, false),
            ..Default::default()
        }
    }

    /// Names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn plain_gz_and_xz_images_are_hashed_decompressed_and_kept_read_only() {
        let work = tempfile::tempdir().unwrap();
        let img = qcow2(work.path(), &[]);
        let raw: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let server = http_server(vec![
            ("/a.qcow2", Reply::Body(img.clone())),
            ("/a.qcow2.gz", Reply::Body(gz(&img))),
            ("/b.raw.xz", Reply::Body(xz(&raw))),
        ]);
        let cases = [
            ("/a.qcow2", sha(&img), DiskFormat::Qcow2, &img),
            ("/a.qcow2.gz", sha(&gz(&img)), DiskFormat::Qcow2, &img),
            ("/b.raw.xz", sha(&xz(&raw)), DiskFormat::Raw, &raw),
        ];
        for (path, sum, format, content) in cases {
            let dir = tempfile::tempdir().unwrap();
            let spec = image(format!("{}{path}", server.base), sum, format);
            let disk = DiskImage::new(spec, false).placed(dir.path());
            store(dir.path(), &server.base).fetch_image(&disk).unwrap();
            assert_eq!(&fs::read(&disk.file).unwrap(), content, "{path}");
            let mode = fs::metadata(&disk.file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o444, "{path}");
            assert_eq!(
                names(dir.path()),
                vec![disk.image.file_name()],
                "no temporary file"
            );
            // In place: a new sync neither asks the server nor reads it.
            let hits = server.hits.lock().unwrap().len();
            store(dir.path(), &server.base).fetch_image(&disk).unwrap();
            assert_eq!(server.hits.lock().unwrap().len(), hits, "{path}");
        }
    }

    #[test]
    fn one_download_per_sync_however_many_vms_ask() {
        let work = tempfile::tempdir().unwrap();
        let img = qcow2(work.path(), &[]);
        let server = http_server(vec![("/a.qcow2", Reply::Body(img.clone()))]);
        let dir = tempfile::tempdir().unwrap();
        let spec = image(
            format!("{}/a.qcow2", server.base),
            sha(&img),
            DiskFormat::Qcow2,
        );
        let disk = DiskImage::new(spec, false).placed(dir.path());
        let qemu = store(dir.path(), &server.base);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| qemu.fetch_image(&disk).unwrap());
            }
        });
        assert_eq!(server.hits.lock().unwrap().len(), 1);
    }

    /// Fetches `reply` as an image with `sum` (default: the body's); returns the error.
    fn refused(reply: Reply, sum: Option<String>, format: DiskFormat) -> String {
        let body = match &reply {
            Reply::Body(b) | Reply::Cut { body: b, .. } | Reply::Stall { body: b, .. } => b.clone(),
            Reply::Redirect(_) => Vec::new(),
        };
        let server = http_server(vec![("/x.img", reply)]);
        let dir = tempfile::tempdir().unwrap();
        let spec = image(
            format!("{}/x.img", server.base),
            sum.unwrap_or_else(|| sha(&body)),
            format,
        );
        let disk = DiskImage::new(spec, false).placed(&dir.path().join("images"));
        let err = store(&dir.path().join("images"), &server.base)
            .fetch_image(&disk)
            .unwrap_err();
        assert!(matches!(err, DiskError::Image { .. }), "{err:?}");
        assert!(!disk.file.exists());
        assert!(
            names(&dir.path().join("images")).is_empty(),
            "nothing left behind"
        );
        let message = err.to_string();
        assert!(message.contains("image 'base'"), "{message}");
        assert!(message.contains("/x.img"), "{message}");
        message
    }

    #[test]
    fn a_bad_download_leaves_nothing() {
        let work = tempfile::tempdir().unwrap();
        let img = qcow2(work.path(), &[]);
        // One byte changed: the hash names what was expected and what came.
        let mut tampered = img.clone();
        tampered[img.len() / 2] ^= 1;
        let expected = sha(&img);
        let m = refused(
            Reply::Body(tampered.clone()),
            Some(expected.clone()),
            DiskFormat::Qcow2,
        );
        assert!(
            m.contains(&format!("expected {expected}, received {}", sha(&tampered))),
            "{m}"
        );
        let cut = Reply::Cut {
            body: img.clone(),
            after: 1000,
        };
        let m = refused(cut, None, DiskFormat::Qcow2);
        assert!(m.contains("cut") || m.contains("closed"), "{m}");
        let stall = Reply::Stall {
            body: img.clone(),
            after: 1000,
        };
        let m = refused(stall, None, DiskFormat::Qcow2);
        assert!(m.contains("timeout") || m.contains("timed out"), "{m}");
        // The image itself: the declared format, standing alone.
        let m = refused(Reply::Body(img.clone()), None, DiskFormat::Raw);
        assert!(
            m.contains("the image is qcow2, but its entry says raw"),
            "{m}"
        );
        let backed = qcow2(work.path(), &["-b", "/etc/shadow", "-F", "raw"]);
        let m = refused(Reply::Body(backed), None, DiskFormat::Qcow2);
        assert!(m.contains("names a backing file ('/etc/shadow')"), "{m}");
        let m = refused(
            Reply::Redirect("http://169.254.169.254/x".into()),
            None,
            DiskFormat::Qcow2,
        );
        assert!(m.contains("redirect refused"), "{m}");
    }
}
