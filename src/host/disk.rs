//! Disk images: inspecting and creating them with `qemu-img`, behind the [`DiskProvisioner`]
//! seam (the real [`QemuImg`] shells out; tests of other modules can use a fake).
//!
//! This module owns the on-host image files named by a manifest: it creates missing ones,
//! reports on existing ones, and parses manifest sizes ([`parse_size`]).
//!
//! # The never-overwrite guarantee
//!
//! A disk that exists is never overwritten, recreated, resized or shrunk. Nothing here ever
//! writes to an existing image: [`DiskProvisioner::create`] refuses with [`DiskError::Exists`]
//! when anything (file, directory, symlink, even a dangling one) is at the path, and
//! [`check_existing`] only compares and warns. A new image is made by `qemu-img` under a
//! temporary name in the same directory (`.<filename>.vmsync-tmp`), fsynced, then linked into
//! place with `link(2)`, which fails instead of replacing anything; so a crash leaves at most
//! a stale temporary file (removed by the next `create`), never a half-made image at the real
//! path.

use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::{fs, io};

use tracing::{debug, info, warn};

use crate::desired::disk_spec::{DiskFormat, DiskImage, DiskSpec, InvalidDiskSpec};
use crate::desired::values::human_size;
use crate::host::image_store::ImageStore;

/// Suffix of the temporary file a disk is created under: `.<filename>.vmsync-tmp`.
const TMP_SUFFIX: &str = ".vmsync-tmp";

/// What `qemu-img info` says about an existing image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Format name as `qemu-img` reports it (`"qcow2"`, `"raw"`, `"vmdk"`, ...).
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Backing file as recorded in the image (possibly relative).
    pub backing_filename: Option<String>,
}

/// The fields of `qemu-img info --output=json` vmsync uses.
#[derive(serde::Deserialize)]
struct RawImageInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
}

fn parse_image_info(json: &str) -> Result<ImageInfo, String> {
    let raw: RawImageInfo = serde_json::from_str(json)
        .map_err(|e| format!("unexpected output of qemu-img info: {e}"))?;
    Ok(ImageInfo {
        format: raw.format,
        virtual_size: raw.virtual_size,
        backing_filename: raw.backing_filename,
    })
}

/// Why a disk could not be inspected or created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    #[error("invalid disk '{}': {message}", .path.display())]
    InvalidSpec { path: PathBuf, message: String },
    #[error("disk '{}' already exists; refusing to overwrite it", .path.display())]
    Exists { path: PathBuf },
    #[error("disk '{}' is {found}, but the manifest says {expected}; it is left as is", .path.display())]
    FormatMismatch {
        path: PathBuf,
        expected: DiskFormat,
        found: String,
    },
    #[error("backing file '{}' of disk '{}' does not exist", .backing.display(), .path.display())]
    BackingMissing { path: PathBuf, backing: PathBuf },
    #[error("'{}' exists but is not a directory", .path.display())]
    NotADirectory { path: PathBuf },
    #[error("qemu-img not found at '{}' (is qemu-utils installed?)", .binary.display())]
    QemuImgMissing { binary: PathBuf },
    /// `qemu-img` failed; `action` says what vmsync was doing (e.g. "create disk").
    #[error("failed to {action} '{}': {message}", .path.display())]
    QemuImg {
        action: &'static str,
        path: PathBuf,
        message: String,
    },
    /// A filesystem operation failed; `action` says what vmsync was doing.
    #[error("failed to {action} '{}': {message}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        message: String,
    },
    /// A base image could not be downloaded or checked; the message names the image,
    /// its URL and, for a mismatch, the expected and received sha256.
    #[error("{message}")]
    Image { message: String },
}

impl From<InvalidDiskSpec> for DiskError {
    fn from(e: InvalidDiskSpec) -> Self {
        DiskError::InvalidSpec {
            path: e.path,
            message: e.message,
        }
    }
}

impl DiskError {
    fn io(action: &'static str, path: &Path, err: &io::Error) -> Self {
        DiskError::Io {
            action,
            path: path.to_path_buf(),
            message: err.to_string(),
        }
    }
}

/// The seam: the real one shells out to qemu-img; tests of other modules use a fake.
pub trait DiskProvisioner: Sync {
    /// Creates `path` and parents (mode 0755) if missing; Ok(true) if it created it. A
    /// non-directory at `path` is an error.
    fn ensure_dir(&self, path: &Path) -> Result<bool, DiskError>;
    /// Ok(None) if nothing is at `path`; Ok(Some(info)) from
    /// `qemu-img info --output=json -U` (force-share, so it works on images of running VMs)
    /// if it exists.
    fn inspect(&self, path: &Path) -> Result<Option<ImageInfo>, DiskError>;
    /// Creates the image. Fails with DiskError::Exists (touching nothing) if anything is
    /// already at spec.path.
    fn create(&self, spec: &DiskSpec) -> Result<(), DiskError>;
    /// Whether a base image is in the image directory (a file there is complete and
    /// matched its sha256: it is only renamed into place after that).
    fn has_image(&self, file: &Path) -> bool {
        fs::symlink_metadata(file).is_ok()
    }
    /// Downloads a base image into the image directory unless it is there.
    fn fetch_image(&self, image: &DiskImage) -> Result<(), DiskError> {
        Err(DiskError::Image {
            message: format!(
                "image '{}': this disk provisioner cannot download images",
                image.image.name
            ),
        })
    }
}

/// The real provisioner: runs the `qemu-img` binary.
///
/// Creation is "create under a temporary name, then link into place": `qemu-img create`
/// writes `.<filename>.vmsync-tmp` in the image's directory, the file is fsynced, then
/// [`std::fs::hard_link`] puts it at the real path. `link(2)` never replaces an existing
/// entry (it fails with `EEXIST`, even for a dangling symlink), so something that appeared at
/// the real path in the meantime is left alone and `create` returns [`DiskError::Exists`].
/// Then the temporary name is removed and the directory fsynced.
///
/// Why `link` rather than `renameat2(RENAME_NOREPLACE)`: it needs only `std` (no `libc`
/// dependency, no fallback path for filesystems or kernels without `RENAME_NOREPLACE`) and
/// gives the same no-replace guarantee. Its cost is a moment in which the finished image has
/// two names: a crash right there leaves `.<filename>.vmsync-tmp` as a second name of the
/// complete image (no extra space while the image exists; removed by the next `create` of
/// that path, i.e. only after an operator deleted the image). Filesystems
/// without hard links (vfat, some FUSE) are not supported for images.
///
/// One vmsync process per host is assumed: two concurrent `create` calls for the same path
/// would share the temporary name (the real path stays safe either way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuImg {
    /// The `qemu-img` executable; a bare name is looked up on `PATH`.
    pub binary: PathBuf,
    /// Base images: where they are kept and may come from, and this sync's downloads.
    pub images: ImageStore,
}

impl Default for QemuImg {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-img"),
            images: ImageStore::default(),
        }
    }
}

impl QemuImg {
    /// Runs qemu-img with `args`; returns stdout, or a [`DiskError::QemuImg`] naming `path`
    /// and carrying qemu-img's stderr.
    fn run(
        &self,
        action: &'static str,
        path: &Path,
        args: &[OsString],
    ) -> Result<String, DiskError> {
        debug!(binary = %self.binary.display(), ?args, "running qemu-img");
        let output = Command::new(&self.binary)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|err| {
                if err.kind() == io::ErrorKind::NotFound {
                    DiskError::QemuImgMissing {
                        binary: self.binary.clone(),
                    }
                } else {
                    DiskError::QemuImg {
                        action,
                        path: path.to_path_buf(),
                        message: format!("cannot run '{}': {err}", self.binary.display()),
                    }
                }
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
            let message = if stderr.is_empty() {
                format!("qemu-img exited with {}", output.status)
            } else {
                stderr
            };
            return Err(DiskError::QemuImg {
                action,
                path: path.to_path_buf(),
                message,
            });
        }
        String::from_utf8(output.stdout).map_err(|_| DiskError::QemuImg {
            action,
            path: path.to_path_buf(),
            message: "qemu-img printed invalid UTF-8".into(),
        })
    }

    /// `qemu-img info` of a path known to exist.
    fn info(&self, action: &'static str, path: &Path) -> Result<ImageInfo, DiskError> {
        let stdout = self.run(
            action,
            path,
            &[
                "info".into(),
                "--output=json".into(),
                "-U".into(),
                path.into(),
            ],
        )?;
        parse_image_info(&stdout).map_err(|message| DiskError::QemuImg {
            action,
            path: path.to_path_buf(),
            message,
        })
    }

    /// Finds the backing file and its format (probing it if the spec does not say).
    fn backing_args(&self, spec: &DiskSpec) -> Result<Option<(PathBuf, DiskFormat)>, DiskError> {
        let (Some(backing), Some(location)) = (&spec.backing, spec.backing_location()) else {
            return Ok(None);
        };
        match fs::metadata(&location) {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(DiskError::BackingMissing {
                    path: spec.path.clone(),
                    backing: location,
                });
            }
            Err(err) => return Err(DiskError::io("access backing file", &location, &err)),
        }
        let format = match spec.backing_format {
            Some(format) => format,
            None => {
                let info = self.info("inspect backing file", &location)?;
                let format = info.format.parse().map_err(|_| DiskError::InvalidSpec {
                    path: spec.path.clone(),
                    message: format!(
                        "backing file '{}' has format '{}'; only qcow2 and raw are supported",
                        location.display(),
                        info.format
                    ),
                })?;
                debug!(backing = %location.display(), format = %format, "probed backing file format");
                format
            }
        };
        Ok(Some((backing.clone(), format)))
    }
}

/// The temporary name `path` is created under: `.<filename>.vmsync-tmp` in the same directory.
fn tmp_path(path: &Path) -> Option<PathBuf> {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name()?);
    name.push(TMP_SUFFIX);
    Some(path.with_file_name(name))
}

/// Whether anything (including a dangling symlink) is at `path`.
fn exists_no_follow(path: &Path, action: &'static str) -> Result<bool, DiskError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(DiskError::io(action, path, &err)),
    }
}

fn fsync(path: &Path, action: &'static str) -> Result<(), DiskError> {
    fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|err| DiskError::io(action, path, &err))
}

/// Removes `tmp`, logging (not returning) a failure: used on error paths.
fn discard_tmp(tmp: &Path) {
    if let Err(err) = fs::remove_file(tmp)
        && err.kind() != io::ErrorKind::NotFound
    {
        warn!(tmp = %tmp.display(), error = %err, "failed to remove temporary disk image");
    }
}

impl DiskProvisioner for QemuImg {
    fn ensure_dir(&self, path: &Path) -> Result<bool, DiskError> {
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => return Ok(false),
            Ok(_) => {
                return Err(DiskError::NotADirectory {
                    path: path.to_path_buf(),
                });
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(DiskError::io("access directory", path, &err)),
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .map_err(|err| DiskError::io("create directory", path, &err))?;
        debug!(dir = %path.display(), "created directory");
        Ok(true)
    }

    fn inspect(&self, path: &Path) -> Result<Option<ImageInfo>, DiskError> {
        if !exists_no_follow(path, "inspect disk")? {
            return Ok(None);
        }
        self.info("inspect disk", path).map(Some)
    }

    fn create(&self, spec: &DiskSpec) -> Result<(), DiskError> {
        spec.validate()?;
        let path = &spec.path;
        if exists_no_follow(path, "create disk")? {
            return Err(DiskError::Exists { path: path.clone() });
        }
        let base = self.base(spec)?;
        if let Some(dir) = path.parent() {
            self.ensure_dir(dir)?;
        }
        let tmp = tmp_path(path).expect("validated: the path has a file name");
        if exists_no_follow(&tmp, "create disk")? {
            fs::remove_file(&tmp)
                .map_err(|err| DiskError::io("remove stale temporary disk image", &tmp, &err))?;
            warn!(disk = %path.display(), tmp = %tmp.display(), "removed stale temporary disk image from an interrupted create");
        }
        let made = self
            .make(spec, &base, &tmp)
            .and_then(|_| fsync(&tmp, "sync new disk image"));
        if let Err(err) = made {
            discard_tmp(&tmp);
            return Err(err);
        }
        crate::crash_point("disk-temp-created");

        // Link into place: fails instead of replacing anything that appeared meanwhile.
        if let Err(err) = fs::hard_link(&tmp, path) {
            discard_tmp(&tmp);
            if err.kind() == io::ErrorKind::AlreadyExists {
                return Err(DiskError::Exists { path: path.clone() });
            }
            return Err(DiskError::io(
                "move new disk image into place at",
                path,
                &err,
            ));
        }
        crate::crash_point("disk-linked");
        // The image is complete at the real path from here on; cleanup failures are reported
        // so the operator knows, but the image stays (the next run sees it exists).
        fs::remove_file(&tmp)
            .map_err(|err| DiskError::io("remove temporary disk image", &tmp, &err))?;
        if let Some(dir) = path.parent() {
            fsync(dir, "sync directory")?;
        }
        info!(
            disk = %path.display(),
            format = %spec.format,
            size = base.size(spec),
            base = %base,
            "created disk"
        );
        Ok(())
    }

    fn fetch_image(&self, image: &DiskImage) -> Result<(), DiskError> {
        let verify = |tmp: &Path| self.verify_image(image, tmp);
        self.images
            .fetch(image, &verify)
            .map_err(|message| DiskError::Image { message })
    }
}

/// What a new disk is made on.
enum Base {
    /// An empty disk.
    Empty,
    /// A qcow2 overlay on `[[vm.disk]] backing`.
    Backing(PathBuf, DiskFormat),
    /// An overlay on, or a full copy of, a base image of `virtual_size` bytes.
    Image { image: DiskImage, virtual_size: u64 },
}

impl Base {
    /// The new disk's size: the manifest's, or the image's when that is larger (a disk
    /// made from an image is grown to `size`, never shrunk below the image).
    fn size(&self, spec: &DiskSpec) -> u64 {
        match self {
            Base::Image { virtual_size, .. } => spec.size_bytes.max(*virtual_size),
            _ => spec.size_bytes,
        }
    }
}

impl std::fmt::Display for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Base::Empty => f.write_str("empty"),
            Base::Backing(b, fmt) => write!(f, "overlay on '{}' ({fmt})", b.display()),
            Base::Image { image, .. } => {
                let how = if image.copy { "copy of" } else { "overlay on" };
                write!(
                    f,
                    "{how} image '{}' ({})",
                    image.image.name,
                    image.file.display()
                )
            }
        }
    }
}

impl QemuImg {
    /// What `spec` is made on: its image (which must be in the image directory), its
    /// backing file, or nothing.
    fn base(&self, spec: &DiskSpec) -> Result<Base, DiskError> {
        if let Some(image) = &spec.image {
            if !self.has_image(&image.file) {
                return Err(DiskError::Image {
                    message: format!(
                        "image '{}' is not in the image directory ('{}' is missing)",
                        image.image.name,
                        image.file.display()
                    ),
                });
            }
            let info = self.info("inspect base image", &image.file)?;
            return Ok(Base::Image {
                image: image.clone(),
                virtual_size: info.virtual_size,
            });
        }
        Ok(match self.backing_args(spec)? {
            Some((backing, format)) => Base::Backing(backing, format),
            None => Base::Empty,
        })
    }

    /// Makes the new disk at `tmp`: `qemu-img create` (with `-b` for an overlay), or
    /// `qemu-img convert` of the image and a `resize` up to the size.
    fn make(&self, spec: &DiskSpec, base: &Base, tmp: &Path) -> Result<(), DiskError> {
        let path = &spec.path;
        let qcow2_opts = || -> Vec<OsString> {
            match spec.format {
                DiskFormat::Qcow2 => ["-o", "preallocation=off"].map(OsString::from).into(),
                DiskFormat::Raw => Vec::new(),
            }
        };
        let size = base.size(spec);
        let backing = match base {
            Base::Image { image, .. } if image.copy => {
                let mut args: Vec<OsString> = ["convert", "-q", "-f", image.image.format.as_str()]
                    .map(OsString::from)
                    .into();
                args.extend(["-O".into(), spec.format.as_str().into()]);
                args.extend(qcow2_opts());
                args.extend([image.file.clone().into(), tmp.into()]);
                self.run("copy base image into disk", path, &args)?;
                if self.info("inspect new disk", tmp)?.virtual_size < size {
                    let resize = ["resize", "-q", "-f", spec.format.as_str()].map(OsString::from);
                    let mut args: Vec<OsString> = resize.into();
                    args.extend([tmp.into(), size.to_string().into()]);
                    self.run("grow disk", path, &args)?;
                }
                return Ok(());
            }
            Base::Image { image, .. } => Some((image.file.clone(), image.image.format)),
            Base::Backing(b, fmt) => Some((b.clone(), *fmt)),
            Base::Empty => None,
        };
        let mut args: Vec<OsString> = ["create", "-q", "-f", spec.format.as_str()]
            .map(OsString::from)
            .into();
        args.extend(qcow2_opts());
        if let Some((backing, backing_format)) = backing {
            args.extend([
                "-b".into(),
                backing.into(),
                "-F".into(),
                backing_format.as_str().into(),
            ]);
        }
        args.extend([tmp.into(), size.to_string().into()]);
        self.run("create disk", path, &args).map(|_| ())
    }

    /// A downloaded image is what its entry says: `qemu-img info` probes the declared
    /// format, and a qcow2 names no backing file and no external data file (either would
    /// make QEMU open a host file the repository chose).
    fn verify_image(&self, image: &DiskImage, tmp: &Path) -> Result<(), String> {
        let stdout = self
            .run(
                "inspect downloaded image",
                tmp,
                &["info".into(), "--output=json".into(), tmp.into()],
            )
            .map_err(|e| e.to_string())?;
        let info: serde_json::Value = serde_json::from_str(&stdout)
            .map_err(|e| format!("unexpected output of qemu-img info: {e}"))?;
        let format = info["format"].as_str().unwrap_or("unknown");
        let declared = image.image.format.as_str();
        if format != declared {
            return Err(format!(
                "the image is {format}, but its entry says {declared} (set format = \"{format}\" if that is right); nothing was kept"
            ));
        }
        if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
            return Err(format!(
                "the image names a backing file ('{backing}'); a base image must stand alone; nothing was kept"
            ));
        }
        if let Some(data) = info.pointer("/format-specific/data/data-file") {
            return Err(format!(
                "the image names an external data file ({data}); a base image must stand alone; nothing was kept"
            ));
        }
        Ok(())
    }
}

/// Pure helper: checks an existing image against the spec. Ok if the format matches (size
/// and backing are NOT changed; a smaller/larger existing image is fine — returns a warning
/// in Ok(Some(..)) when the size or the backing file differs).
pub fn check_existing(spec: &DiskSpec, info: &ImageInfo) -> Result<Option<String>, DiskError> {
    if info.format != spec.format.as_str() {
        return Err(DiskError::FormatMismatch {
            path: spec.path.clone(),
            expected: spec.format,
            found: info.format.clone(),
        });
    }
    let mut warnings = Vec::new();
    // A disk made from a larger image is as large as the image.
    if info.virtual_size != spec.size_bytes
        && (spec.image.is_none() || info.virtual_size < spec.size_bytes)
    {
        warnings.push(format!(
            "existing image is {}, manifest says {}; left as is",
            human_size(info.virtual_size),
            human_size(spec.size_bytes)
        ));
    }
    let wanted_backing = match &spec.image {
        Some(image) if !image.copy => Some(image.file.to_string_lossy().into_owned()),
        Some(_) => None,
        None => spec
            .backing
            .as_ref()
            .map(|b| b.to_string_lossy().into_owned()),
    };
    if let Some(image) = spec.image.as_ref().filter(|i| !i.copy)
        && wanted_backing != info.backing_filename
    {
        warnings.push(format!(
            "made on {}; image '{}' is now '{}': a disk made from an image is never rebased or recreated; left as is",
            info.backing_filename
                .as_deref()
                .map_or("no backing file".to_string(), |b| format!("'{b}'")),
            image.image.name,
            image.file.display()
        ));
    } else if wanted_backing != info.backing_filename {
        let describe = |b: &Option<String>| match b {
            Some(b) => format!("backing file '{b}'"),
            None => "no backing file".to_string(),
        };
        warnings.push(format!(
            "existing image has {}, manifest says {}; left as is",
            describe(&info.backing_filename),
            describe(&wanted_backing)
        ));
    }
    Ok(if warnings.is_empty() {
        None
    } else {
        Some(warnings.join("; "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::values::parse_size;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn spec(path: &Path, size: u64, format: DiskFormat) -> DiskSpec {
        DiskSpec {
            path: path.to_path_buf(),
            size_bytes: size,
            format,
            backing: None,
            backing_format: None,
            image: None,
        }
    }

    /// `qemu-img info` run directly, independent of the code under test.
    fn qemu_info(path: &Path) -> serde_json::Value {
        let out = Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(path)
            .output()
            .expect("qemu-img runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Names in `dir`, sorted (hidden ones included).
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn parse_size_table() {
        let good: &[(&str, u64)] = &[
            ("4096", 4096),
            ("1", 1),
            ("512B", 512),
            ("1K", 1024),
            ("1k", 1024),
            ("512M", 512 * MIB),
            ("20G", 20 * GIB),
            ("20g", 20 * GIB),
            ("20GiB", 20 * GIB),
            ("20gib", 20 * GIB),
            ("20GB", 20 * GIB),
            ("1T", 1 << 40),
            ("1TiB", 1 << 40),
            ("020G", 20 * GIB),
            ("16777215T", 16_777_215 << 40),
            ("18446744073709551615", u64::MAX),
        ];
        for (input, want) in good {
            assert_eq!(parse_size(input), Ok(*want), "input {input:?}");
        }
        let bad = [
            "", "G", "0", "0G", "1.5G", "-1G", "+1G", " 20G", "20G ", "20 G", "20X", "20GiBs",
            "20iB", "20P", "1e9", "20Gi", "0x10",
        ];
        for input in bad {
            let err = parse_size(input).expect_err(input);
            assert!(err.contains(&format!("'{input}'")), "{input:?}: {err}");
        }
        // Overflow, both in the number itself and after applying the unit.
        for input in ["18446744073709551616", "16777216T", "99999999999999999999G"] {
            let err = parse_size(input).expect_err(input);
            assert!(err.contains("too large") && err.contains(input), "{err}");
        }
    }

    #[test]
    fn disk_format_display_parse_serde() {
        for f in [DiskFormat::Qcow2, DiskFormat::Raw] {
            assert_eq!(f.to_string().parse::<DiskFormat>(), Ok(f));
            assert_eq!(serde_json::to_string(&f).unwrap(), format!("\"{f}\""));
        }
        let err = "vmdk".parse::<DiskFormat>().unwrap_err();
        assert!(err.contains("'vmdk'") && err.contains("qcow2") && err.contains("raw"));
        assert!("QCOW2".parse::<DiskFormat>().is_err());
    }

    #[test]
    fn create_qcow2_and_raw() {
        let dir = tempfile::tempdir().unwrap();
        for (name, format, size) in [
            ("a.qcow2", DiskFormat::Qcow2, 20 * GIB),
            ("b.img", DiskFormat::Raw, 64 * MIB),
        ] {
            let path = dir.path().join(name);
            QemuImg::default()
                .create(&spec(&path, size, format))
                .unwrap();
            let info = qemu_info(&path);
            assert_eq!(info["format"], format.as_str());
            assert_eq!(info["virtual-size"], size);
            assert!(info.get("backing-filename").is_none());
        }
        assert_eq!(
            names(dir.path()),
            ["a.qcow2", "b.img"],
            "no temporary file left"
        );
    }

    #[test]
    fn create_with_backing_given_and_probed() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = QemuImg::default();
        let base = dir.path().join("base.qcow2");
        qemu.create(&spec(&base, GIB, DiskFormat::Qcow2)).unwrap();
        let raw_base = dir.path().join("base.raw");
        qemu.create(&spec(&raw_base, MIB, DiskFormat::Raw)).unwrap();

        // Format given, absolute backing path.
        let given = dir.path().join("given.qcow2");
        let mut s = spec(&given, 2 * GIB, DiskFormat::Qcow2);
        s.backing = Some(base.clone());
        s.backing_format = Some(DiskFormat::Qcow2);
        qemu.create(&s).unwrap();
        let info = qemu_info(&given);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 2 * GIB);
        assert_eq!(info["backing-filename"], base.to_str().unwrap());
        assert_eq!(info["backing-filename-format"], "qcow2");

        // Format probed (raw), relative backing path resolved against the image's directory.
        let probed = dir.path().join("probed.qcow2");
        let mut s = spec(&probed, GIB, DiskFormat::Qcow2);
        s.backing = Some(PathBuf::from("base.raw"));
        qemu.create(&s).unwrap();
        let info = qemu_info(&probed);
        assert_eq!(info["backing-filename"], "base.raw");
        assert_eq!(info["backing-filename-format"], "raw");
        let got = qemu.inspect(&probed).unwrap().unwrap();
        assert_eq!(got.backing_filename.as_deref(), Some("base.raw"));
        assert_eq!(check_existing(&s, &got), Ok(None));

        assert_eq!(
            names(dir.path()),
            ["base.qcow2", "base.raw", "given.qcow2", "probed.qcow2"]
        );
    }

    #[test]
    fn raw_with_backing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        QemuImg::default()
            .create(&spec(&base, MIB, DiskFormat::Qcow2))
            .unwrap();
        let path = dir.path().join("r.img");
        let mut s = spec(&path, MIB, DiskFormat::Raw);
        s.backing = Some(base);
        let err = QemuImg::default().create(&s).unwrap_err();
        assert!(matches!(err, DiskError::InvalidSpec { .. }), "{err:?}");
        assert!(err.to_string().contains("r.img") && err.to_string().contains("qcow2"));
        assert_eq!(names(dir.path()), ["base.qcow2"]);
    }

    #[test]
    fn missing_backing_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.qcow2");
        let mut s = spec(&path, MIB, DiskFormat::Qcow2);
        s.backing = Some(dir.path().join("nope.qcow2"));
        s.backing_format = Some(DiskFormat::Qcow2);
        let err = QemuImg::default().create(&s).unwrap_err();
        assert_eq!(
            err,
            DiskError::BackingMissing {
                path: path.clone(),
                backing: dir.path().join("nope.qcow2")
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("nope.qcow2") && msg.contains("web.qcow2"),
            "{msg}"
        );
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn create_never_touches_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.qcow2");
        let content = b"precious data, not even an image".to_vec();
        fs::write(&path, &content).unwrap();
        // Back-date the mtime so a rewrite within the same second would still show.
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let before = fs::metadata(&path).unwrap();

        for format in [DiskFormat::Qcow2, DiskFormat::Raw] {
            let err = QemuImg::default()
                .create(&spec(&path, GIB, format))
                .unwrap_err();
            assert_eq!(err, DiskError::Exists { path: path.clone() });
            assert!(err.to_string().contains(&*path.to_string_lossy()));
        }
        let after = fs::metadata(&path).unwrap();
        assert_eq!(fs::read(&path).unwrap(), content);
        assert_eq!(after.modified().unwrap(), old);
        assert_eq!(after.ino(), before.ino());
        assert_eq!(after.len(), before.len());
        assert_eq!(names(dir.path()), ["web.qcow2"]);
    }

    #[test]
    fn create_refuses_dangling_symlink_and_directory() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(dir.path().join("target.qcow2"), &link).unwrap();
        let sub = dir.path().join("sub.qcow2");
        fs::create_dir(&sub).unwrap();
        for path in [&link, &sub] {
            let err = QemuImg::default()
                .create(&spec(path, MIB, DiskFormat::Qcow2))
                .unwrap_err();
            assert_eq!(err, DiskError::Exists { path: path.clone() });
        }
        assert!(
            !dir.path().join("target.qcow2").exists(),
            "symlink not followed"
        );
        assert_eq!(names(dir.path()), ["link.qcow2", "sub.qcow2"]);
    }

    #[test]
    fn stale_temp_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let stale = dir.path().join(".x.vmsync-tmp");
        fs::write(&stale, b"half-written garbage from a crash").unwrap();
        QemuImg::default()
            .create(&spec(&path, 2 * MIB, DiskFormat::Qcow2))
            .unwrap();
        let info = qemu_info(&path);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 2 * MIB);
        assert_eq!(names(dir.path()), ["x"]);
    }

    #[test]
    fn creates_missing_parent_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/disk.raw");
        QemuImg::default()
            .create(&spec(&path, MIB, DiskFormat::Raw))
            .unwrap();
        assert_eq!(qemu_info(&path)["format"], "raw");
        assert_eq!(names(&dir.path().join("a/b")), ["disk.raw"]);
    }

    #[test]
    fn invalid_specs_are_refused_before_anything_happens() {
        let dir = tempfile::tempdir().unwrap();
        let abs = dir.path().join("d.qcow2");
        let mut cases = vec![
            spec(Path::new("relative.qcow2"), MIB, DiskFormat::Qcow2),
            spec(Path::new("/"), MIB, DiskFormat::Qcow2),
            spec(&abs, 0, DiskFormat::Qcow2),
            spec(&abs, 1000, DiskFormat::Qcow2),
        ];
        let mut s = spec(&abs, MIB, DiskFormat::Qcow2);
        s.backing_format = Some(DiskFormat::Raw);
        cases.push(s);
        for s in cases {
            let err = QemuImg::default().create(&s).unwrap_err();
            assert!(
                matches!(err, DiskError::InvalidSpec { .. }),
                "{s:?}: {err:?}"
            );
        }
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn qemu_img_failure_names_the_disk_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // A backing file that is not an image qemu-img accepts as qcow2.
        let base = dir.path().join("base");
        fs::write(&base, b"not a qcow2 image").unwrap();
        let path = dir.path().join("web.qcow2");
        let mut s = spec(&path, MIB, DiskFormat::Qcow2);
        s.backing = Some(base);
        s.backing_format = Some(DiskFormat::Qcow2);
        let err = QemuImg::default().create(&s).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DiskError::QemuImg { .. }), "{err:?}");
        assert!(
            msg.starts_with(&format!("failed to create disk '{}': ", path.display())),
            "{msg}"
        );
        assert!(msg.contains("qemu-img"), "{msg}");
        assert_eq!(names(dir.path()), ["base"]);
    }

    /// A stand-in `qemu-img` (shell script) that runs `body` with `$tmp` set to the file
    /// qemu-img is asked to create (the second-to-last argument).
    fn fake_qemu_img(dir: &Path, body: &str) -> QemuImg {
        let script = dir.join("fake-qemu-img");
        crate::testing::executable_script(
            &script,
            &format!("for a; do tmp=$last; last=$a; done\n{body}"),
        );
        QemuImg {
            binary: script,
            ..Default::default()
        }
    }

    #[test]
    fn something_appearing_during_create_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let path = images.join("web.qcow2");
        // Simulates a race: while qemu-img runs, someone else puts a file at the real path.
        let qemu = fake_qemu_img(
            dir.path(),
            &format!(
                "qemu-img \"$@\" || exit 1\necho theirs > '{}'",
                path.display()
            ),
        );
        let err = qemu
            .create(&spec(&path, MIB, DiskFormat::Qcow2))
            .unwrap_err();
        assert_eq!(err, DiskError::Exists { path: path.clone() });
        assert_eq!(fs::read_to_string(&path).unwrap(), "theirs\n");
        assert_eq!(names(&images), ["web.qcow2"], "temporary file removed");
    }

    #[test]
    fn failed_qemu_img_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let path = images.join("web.qcow2");
        // qemu-img writes part of the image, then fails.
        let qemu = fake_qemu_img(
            dir.path(),
            "echo partial > \"$tmp\"\necho 'qemu-img: disk full' >&2\nexit 1",
        );
        let err = qemu
            .create(&spec(&path, MIB, DiskFormat::Qcow2))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "failed to create disk '{}': qemu-img: disk full",
                path.display()
            )
        );
        assert!(names(&images).is_empty(), "{:?}", names(&images));
    }

    #[test]
    fn qemu_img_missing() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = QemuImg {
            binary: "/nonexistent/qemu-img".into(),
            ..Default::default()
        };
        let path = dir.path().join("web.qcow2");
        let err = qemu
            .create(&spec(&path, MIB, DiskFormat::Qcow2))
            .unwrap_err();
        assert_eq!(
            err,
            DiskError::QemuImgMissing {
                binary: "/nonexistent/qemu-img".into()
            }
        );
        assert!(err.to_string().contains("/nonexistent/qemu-img"));
        assert!(names(dir.path()).is_empty(), "nothing created");

        // inspect of a missing path does not need qemu-img; of an existing one it does.
        assert_eq!(qemu.inspect(&path), Ok(None));
        fs::write(&path, b"x").unwrap();
        assert!(matches!(
            qemu.inspect(&path),
            Err(DiskError::QemuImgMissing { .. })
        ));
    }

    #[test]
    fn qemu_img_not_executable_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("qemu-img");
        fs::write(&fake, b"").unwrap();
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.path().join("web.qcow2");
        let err = QemuImg {
            binary: fake,
            ..Default::default()
        }
        .create(&spec(&path, MIB, DiskFormat::Qcow2))
        .unwrap_err();
        assert!(matches!(err, DiskError::QemuImg { .. }), "{err:?}");
        assert_eq!(names(dir.path()), ["qemu-img"]);
    }

    #[test]
    fn inspect_missing_and_existing() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = QemuImg::default();
        let path = dir.path().join("d.qcow2");
        assert_eq!(qemu.inspect(&path), Ok(None));
        qemu.create(&spec(&path, 3 * GIB, DiskFormat::Qcow2))
            .unwrap();
        assert_eq!(
            qemu.inspect(&path),
            Ok(Some(ImageInfo {
                format: "qcow2".into(),
                virtual_size: 3 * GIB,
                backing_filename: None,
            }))
        );
        // Something that is not an image is reported as raw by qemu-img's probing.
        let junk = dir.path().join("junk");
        fs::write(&junk, vec![0u8; 4096]).unwrap();
        let info = qemu.inspect(&junk).unwrap().unwrap();
        assert_eq!((info.format.as_str(), info.virtual_size), ("raw", 4096));
    }

    #[test]
    fn inspect_error_names_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("dangling.qcow2");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        let err = QemuImg::default().inspect(&link).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("failed to inspect disk '{}': ", link.display())),
            "{err}"
        );
    }

    #[test]
    fn check_existing_format_size_backing() {
        let path = PathBuf::from("/var/lib/libvirt/images/web.qcow2");
        let s = spec(&path, 20 * GIB, DiskFormat::Qcow2);
        let info = |format: &str, size: u64, backing: Option<&str>| ImageInfo {
            format: format.into(),
            virtual_size: size,
            backing_filename: backing.map(String::from),
        };

        assert_eq!(check_existing(&s, &info("qcow2", 20 * GIB, None)), Ok(None));

        let err = check_existing(&s, &info("raw", 20 * GIB, None)).unwrap_err();
        assert_eq!(
            err,
            DiskError::FormatMismatch {
                path: path.clone(),
                expected: DiskFormat::Qcow2,
                found: "raw".into()
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("/var/lib/libvirt/images/web.qcow2")
                && msg.contains("raw")
                && msg.contains("qcow2"),
            "{msg}"
        );

        // Smaller or larger: a warning, never an error.
        assert_eq!(
            check_existing(&s, &info("qcow2", 10 * GIB, None)),
            Ok(Some(
                "existing image is 10 GiB, manifest says 20 GiB; left as is".into()
            ))
        );
        let warning = check_existing(&s, &info("qcow2", 30 * GIB + 512, None))
            .unwrap()
            .unwrap();
        assert!(
            warning.contains("30.0 GiB (32212255232 bytes)"),
            "{warning}"
        );

        // A different backing file is also a warning.
        let warning = check_existing(&s, &info("qcow2", 20 * GIB, Some("base.qcow2")))
            .unwrap()
            .unwrap();
        assert_eq!(
            warning,
            "existing image has backing file 'base.qcow2', manifest says no backing file; left as is"
        );
    }

    #[test]
    fn human_size_examples() {
        assert_eq!(human_size(0), "0 bytes");
        assert_eq!(human_size(1000), "1000 bytes");
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(512 * MIB), "512 MiB");
        assert_eq!(human_size(3 * GIB / 2), "1.5 GiB (1610612736 bytes)");
        assert_eq!(human_size(1 << 40), "1 TiB");
    }

    #[test]
    fn parse_image_info_fields() {
        let json = r#"{"virtual-size": 1024, "filename": "d.qcow2", "format": "qcow2",
            "backing-filename": "a.qcow2", "full-backing-filename": "/x/a.qcow2",
            "dirty-flag": false}"#;
        assert_eq!(
            parse_image_info(json),
            Ok(ImageInfo {
                format: "qcow2".into(),
                virtual_size: 1024,
                backing_filename: Some("a.qcow2".into()),
            })
        );
        assert!(parse_image_info("not json").is_err());
    }

    #[test]
    fn ensure_dir_nested_twice_and_on_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = QemuImg::default();
        let nested = dir.path().join("a/b/c");
        assert_eq!(qemu.ensure_dir(&nested), Ok(true));
        assert!(nested.is_dir());
        let mode = fs::metadata(&nested).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o755, 0, "mode {mode:o} is at most 0755");
        assert_eq!(qemu.ensure_dir(&nested), Ok(false));

        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert_eq!(
            qemu.ensure_dir(&file),
            Err(DiskError::NotADirectory { path: file.clone() })
        );
        // A file in the middle of the path.
        let err = qemu.ensure_dir(&file.join("sub")).unwrap_err();
        assert!(err.to_string().contains("file/sub"), "{err}");
    }

    #[test]
    fn tmp_path_is_hidden_sibling() {
        assert_eq!(
            tmp_path(Path::new("/var/lib/libvirt/images/web.qcow2")),
            Some(PathBuf::from(
                "/var/lib/libvirt/images/.web.qcow2.vmsync-tmp"
            ))
        );
        assert_eq!(tmp_path(Path::new("/")), None);
    }
}
