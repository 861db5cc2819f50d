//! Files written so that a reader (or a crash) sees the old or the new content, never a
//! mix, and the state directory's lock that keeps two vmsync processes from syncing at
//! once.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "lock";

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
pub fn lock(state_dir: &Path) -> Result<Lock, LockError> {
    std::fs::create_dir_all(state_dir).map_err(|e| LockError::Io {
        action: "create state directory",
        path: state_dir.to_path_buf(),
        source: e,
    })?;
    let path = state_dir.join(LOCK_FILE);
    let file = match File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) => {
            return Err(LockError::Io {
                action: "open lock",
                path,
                source: e,
            });
        }
    };
    match file.try_lock() {
        Ok(()) => Ok(Lock { file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Held(LockHeld(path))),
        Err(std::fs::TryLockError::Error(e)) => Err(LockError::Io {
            action: "lock",
            path,
            source: e,
        }),
    }
}

/// Why the state directory's lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another vmsync holds it.
    #[error(transparent)]
    Held(LockHeld),
    /// The directory or the lock file could not be made, opened or locked.
    #[error("failed to {action} '{}': {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).unwrap();
        let err = lock(dir.path()).unwrap_err();
        assert!(matches!(err, LockError::Held(_)), "{err}");
        drop(first);
        // A child that another test thread forked while the lock was open holds a copy
        // of it until that child executes its program (close-on-exec): wait that out.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while let Err(e) = lock(dir.path()) {
            assert!(std::time::Instant::now() < deadline, "{e}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
