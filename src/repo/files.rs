//! Reading files of a VM repository: from a pinned git commit or from a checkout on disk.
//!
//! Every path a manifest names is checked here: relative, normalized, inside the repo,
//! a regular file (no symlinks), UTF-8, and at most [`MAX_FILE_BYTES`] long.

use std::path::{Component, Path, PathBuf};

/// Largest file vmsync reads from a VM repository (manifest or domain XML).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Why a file of the VM repository could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    #[error("path '{0}' must be relative, without '..', and stay inside the repository")]
    InvalidPath(String),
    #[error("'{0}' does not exist in the repository")]
    NotFound(String),
    #[error("'{0}' is not a regular file (symlinks and directories are refused)")]
    NotAFile(String),
    #[error("'{path}' is {size} bytes, more than the limit of {limit}")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("'{0}' is not valid UTF-8")]
    NotUtf8(String),
    #[error("failed to read '{path}': {message}")]
    Io { path: String, message: String },
}

/// A read-only view of the files of one VM repository revision.
pub trait RepoFiles {
    /// Reads the file at `path` (relative, '/'-separated) as UTF-8 text.
    fn read_text(&self, path: &str) -> Result<String, FileError>;
    /// Reads the file at `path` as bytes (a secret, a cloud-init file), with the same
    /// checks but UTF-8.
    fn read_bytes(&self, path: &str) -> Result<Vec<u8>, FileError> {
        self.read_text(path).map(String::into_bytes)
    }
    /// A short label for messages: the commit id, or the directory.
    fn revision(&self) -> String;
    /// An id that changes whenever the file's content changes (a git blob id), if the
    /// source has one; lets validation skip files it has already checked.
    fn content_id(&self, _path: &str) -> Option<String> {
        None
    }
}

/// Checks that `path` is a plain relative path that stays inside the repository and
/// returns it split into components.
pub fn check_repo_path(path: &str) -> Result<Vec<String>, FileError> {
    let invalid = || FileError::InvalidPath(path.to_string());
    if path.is_empty() || path.contains('\\') || path.contains('\0') {
        return Err(invalid());
    }
    let mut parts = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str().ok_or_else(invalid)?.to_string()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(invalid());
            }
        }
    }
    if parts.is_empty() {
        return Err(invalid());
    }
    Ok(parts)
}

/// Decodes file content, enforcing the size limit and UTF-8.
pub fn decode(path: &str, bytes: Vec<u8>) -> Result<String, FileError> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(FileError::TooLarge {
            path: path.to_string(),
            size: bytes.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    String::from_utf8(bytes).map_err(|_| FileError::NotUtf8(path.to_string()))
}

/// A VM repository checkout on disk, for `vmsync validate DIR`.
pub struct DirFiles {
    root: PathBuf,
}

impl DirFiles {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl RepoFiles for DirFiles {
    fn read_text(&self, path: &str) -> Result<String, FileError> {
        decode(path, self.read_bytes(path)?)
    }

    fn read_bytes(&self, path: &str) -> Result<Vec<u8>, FileError> {
        let parts = check_repo_path(path)?;
        let mut full = self.root.clone();
        for part in &parts {
            full.push(part);
            let meta = std::fs::symlink_metadata(&full).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => FileError::NotFound(path.to_string()),
                _ => FileError::Io {
                    path: path.to_string(),
                    message: e.to_string(),
                },
            })?;
            if meta.file_type().is_symlink() {
                return Err(FileError::NotAFile(path.to_string()));
            }
        }
        let meta = std::fs::metadata(&full).map_err(|e| FileError::Io {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        if !meta.is_file() {
            return Err(FileError::NotAFile(path.to_string()));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(FileError::TooLarge {
                path: path.to_string(),
                size: meta.len(),
                limit: MAX_FILE_BYTES,
            });
        }
        std::fs::read(&full).map_err(|e| FileError::Io {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    fn revision(&self) -> String {
        self.root.display().to_string()
    }
}

/// An in-memory repository revision for tests (`test-support`): paths are checked as a
/// commit's are ([`check_repo_path`]), a path starting with `link` stands for a symlink
/// (refused), reads are counted, and a file's content id is its text's SHA-256 unless
/// turned off (a checkout on disk has none).
#[cfg(any(test, feature = "test-support"))]
#[derive(Debug, Default)]
pub struct MemoryFiles {
    files: std::collections::BTreeMap<String, String>,
    reads: std::cell::Cell<usize>,
    no_content_ids: bool,
}

#[cfg(any(test, feature = "test-support"))]
impl MemoryFiles {
    /// The files `(path, text)`.
    pub fn new<P: Into<String>, T: Into<String>>(files: impl IntoIterator<Item = (P, T)>) -> Self {
        Self {
            files: files
                .into_iter()
                .map(|(p, t)| (p.into(), t.into()))
                .collect(),
            ..Self::default()
        }
    }

    /// The same files without content ids, as a checkout on disk.
    pub fn without_content_ids(mut self) -> Self {
        self.no_content_ids = true;
        self
    }

    /// How many times a file was read.
    pub fn reads(&self) -> usize {
        self.reads.get()
    }
}

#[cfg(any(test, feature = "test-support"))]
impl RepoFiles for MemoryFiles {
    fn read_text(&self, path: &str) -> Result<String, FileError> {
        check_repo_path(path)?;
        if path.starts_with("link") {
            return Err(FileError::NotAFile(path.into()));
        }
        self.reads.set(self.reads.get() + 1);
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| FileError::NotFound(path.into()))
    }

    fn revision(&self) -> String {
        "test".into()
    }

    fn content_id(&self, path: &str) -> Option<String> {
        use sha2::Digest;
        if self.no_content_ids {
            return None;
        }
        self.files
            .get(path)
            .map(|t| hex::encode(sha2::Sha256::digest(t.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_paths_must_stay_inside() {
        assert_eq!(check_repo_path("vms/a.xml").unwrap(), vec!["vms", "a.xml"]);
        assert_eq!(
            check_repo_path("./vms/a.xml").unwrap(),
            vec!["vms", "a.xml"]
        );
        for bad in [
            "",
            "/etc/passwd",
            "../x.xml",
            "vms/../../x",
            "vms\\a.xml",
            ".",
        ] {
            assert_eq!(
                check_repo_path(bad),
                Err(FileError::InvalidPath(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn dir_files_refuse_symlinks_and_big_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.xml"), "<domain/>").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link.xml")).unwrap();
        std::fs::write(
            dir.path().join("big.xml"),
            vec![b'a'; MAX_FILE_BYTES as usize + 1],
        )
        .unwrap();
        std::fs::write(dir.path().join("bin.xml"), [0xff, 0xfe]).unwrap();
        let files = DirFiles::new(dir.path());
        assert_eq!(files.read_text("a.xml").unwrap(), "<domain/>");
        assert_eq!(
            files.read_text("link.xml"),
            Err(FileError::NotAFile("link.xml".into()))
        );
        assert!(matches!(
            files.read_text("big.xml"),
            Err(FileError::TooLarge { .. })
        ));
        assert_eq!(
            files.read_text("bin.xml"),
            Err(FileError::NotUtf8("bin.xml".into()))
        );
        assert_eq!(
            files.read_text("nope.xml"),
            Err(FileError::NotFound("nope.xml".into()))
        );
    }
}
