//! A disk as the manifest asks for it (`[[vm.disk]]`): path, size, format, backing file
//! or base image (`[[image]]`, the entry itself here, its parsing in `image_spec`),
//! checked without touching the filesystem. `host::disk` creates and inspects the images.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A disk spec that cannot be created as written (say why, naming the disk).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid disk '{}': {message}", .path.display())]
pub struct InvalidDiskSpec {
    pub path: PathBuf,
    pub message: String,
}

/// Image sizes must be a multiple of this; `qemu-img` silently rounds other sizes up.
pub const SECTOR_SIZE: u64 = 512;

/// The image formats vmsync creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// The name `qemu-img` uses for the format (`"qcow2"`, `"raw"`).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DiskFormat {
    type Err = String;

    /// Parses `"qcow2"` or `"raw"` (exact, lowercase, like the manifest and `qemu-img`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qcow2" => Ok(DiskFormat::Qcow2),
            "raw" => Ok(DiskFormat::Raw),
            other => Err(format!(
                "unknown disk format '{other}': expected 'qcow2' or 'raw'"
            )),
        }
    }
}

/// A disk as the manifest wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Absolute path of the image.
    pub path: PathBuf,
    /// Virtual size in bytes: greater than zero, a multiple of [`SECTOR_SIZE`].
    pub size_bytes: u64,
    pub format: DiskFormat,
    /// Optional backing file (qcow2 only). A relative path is relative to the image's
    /// directory, as `qemu-img` resolves it, and is recorded in the image as given.
    pub backing: Option<PathBuf>,
    /// Format of the backing file; if `None` and `backing` is set, it is probed with
    /// `qemu-img info`.
    pub backing_format: Option<DiskFormat>,
    /// `image`: the disk is made from a base image (an overlay, or a full copy), once.
    pub image: Option<DiskImage>,
}

impl DiskSpec {
    /// Checks the spec without touching the filesystem: absolute path with a file name,
    /// size > 0 and a multiple of [`SECTOR_SIZE`], backing only with qcow2.
    pub fn validate(&self) -> Result<(), InvalidDiskSpec> {
        let invalid = |message: String| InvalidDiskSpec {
            path: self.path.clone(),
            message,
        };
        if !self.path.is_absolute() {
            return Err(invalid("the path must be absolute".into()));
        }
        if self.path.file_name().is_none() {
            return Err(invalid("the path has no file name".into()));
        }
        if self.size_bytes == 0 {
            return Err(invalid("the size must be greater than zero".into()));
        }
        if !self.size_bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(invalid(format!(
                "the size {} bytes is not a multiple of {SECTOR_SIZE} bytes",
                self.size_bytes
            )));
        }
        if self.backing.is_some() && self.format != DiskFormat::Qcow2 {
            return Err(invalid(format!(
                "a backing file needs format qcow2, not {}",
                self.format
            )));
        }
        if self.backing.is_none() && self.backing_format.is_some() {
            return Err(invalid(
                "backing_format is set without a backing file".into(),
            ));
        }
        if let Some(backing) = &self.backing
            && backing.as_os_str().is_empty()
        {
            return Err(invalid("the backing file path is empty".into()));
        }
        if let Some(image) = &self.image {
            if self.backing.is_some() {
                return Err(invalid("set either 'image' or 'backing', not both".into()));
            }
            if !image.copy && self.format != DiskFormat::Qcow2 {
                return Err(invalid(format!(
                    "an overlay on image '{}' is a qcow2 disk, not {}; set format = \"qcow2\" or copy = true",
                    image.image.name, self.format
                )));
            }
        }
        Ok(())
    }

    /// Where the backing file is on this host: relative paths are resolved against the
    /// image's directory, like `qemu-img` does.
    pub fn backing_location(&self) -> Option<PathBuf> {
        let backing = self.backing.as_ref()?;
        Some(match self.path.parent() {
            Some(dir) if backing.is_relative() => dir.join(backing),
            _ => backing.clone(),
        })
    }
}

/// How the served bytes are compressed, told by the URL's path (`.gz`, `.xz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Xz,
}

/// One `[[image]]` entry, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub name: String,
    /// Line of the entry's `name` in `vmsync.toml`.
    pub line: usize,
    /// `http://` or `https://`, no credentials.
    pub url: String,
    /// The sha256 of the bytes the URL serves (before decompression), 64 lowercase hex
    /// digits: what a `SHA256SUMS` file next to the image says.
    pub sha256: String,
    /// The image's format after decompression: `format`, else `raw` for a URL path
    /// ending in `.raw` (before `.gz`/`.xz`), else `qcow2`.
    pub format: DiskFormat,
    pub compression: Compression,
}

impl ImageSpec {
    /// The image's file name in the image directory: `<sha256>.<format>`.
    pub fn file_name(&self) -> String {
        format!("{}.{}", self.sha256, self.format)
    }
}

/// A disk's image: the entry it names, whether the disk is a full copy (`copy = true`)
/// rather than a qcow2 overlay, and where the image is on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskImage {
    pub image: ImageSpec,
    pub copy: bool,
    /// `image_dir/<sha256>.<format>` once validation placed it (the bare file name
    /// before).
    pub file: PathBuf,
}

impl DiskImage {
    pub fn new(image: ImageSpec, copy: bool) -> Self {
        let file = PathBuf::from(image.file_name());
        Self { image, copy, file }
    }

    /// The same image placed in `dir`.
    pub fn placed(&self, dir: &Path) -> Self {
        Self {
            file: dir.join(self.image.file_name()),
            ..self.clone()
        }
    }
}
