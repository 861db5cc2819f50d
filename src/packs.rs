//! Keeping the packs of the local clone (`<state_dir>/repo`) few.
//!
//! libgit2 stores what each fetch brings as a pack of its own and never repacks (it has
//! no `git gc`), so a host that follows a busy repository gathers a pack per commit, and
//! every later sync pays for looking through all of them (about 0.08 ms per pack and
//! sync here: 10 ms at 122 packs with 1000 domains, see docs/performance.md).
//! When a sync ends with more than [`MAX_PACKS`] packs, the small ones are written into
//! one: every pack but the largest, or all of them (loose objects too) once the others
//! hold half as many objects as the largest. So a pack count stays small and each object
//! is rewritten only a few times, as with git's geometric repacking.
//!
//! Nothing is dropped: every object of a merged pack goes into the new pack, reachable or
//! not, so the ancestry checks (the last applied commit, the commits in the domains'
//! tags) see the same history as before. The new pack and its
//! index are complete and synced before any old pack is deleted; an interruption leaves
//! at worst objects in two packs. A pack with a `.keep` file is left alone (git's
//! convention). It runs in a short-lived child (`vmsync pack-clone DIR`, hidden), as the
//! schema checks do, so that packing a long history (a few MiB of index and delta
//! window) never raises the daemon's memory; the sync's lock is held meanwhile.

use std::path::{Path, PathBuf};
use std::process::Command;

use git2::{Oid, Repository};

/// Packs above which a sync merges them.
pub const MAX_PACKS: usize = 8;

/// The hidden subcommand of the child.
pub const SUBCOMMAND: &str = "pack-clone";

/// The pack directory of the clone at `repo_dir`.
fn pack_dir(repo_dir: &Path) -> PathBuf {
    repo_dir.join("objects").join("pack")
}

/// The packs of the clone at `repo_dir` (`pack-<hash>`, without extension) that may be
/// merged: each has its index, none has a `.keep` file.
pub fn packs(repo_dir: &Path) -> Vec<String> {
    let dir = pack_dir(repo_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| name.strip_suffix(".pack").map(str::to_string))
        .filter(|stem| {
            dir.join(format!("{stem}.idx")).exists() && !dir.join(format!("{stem}.keep")).exists()
        })
        .collect();
    names.sort();
    names
}

/// The object ids listed in a pack index (version 2: magic, version, 256 fan-out
/// entries, then the sorted 20-byte ids), or `None` for another format.
fn index_ids(idx: &Path) -> Option<Vec<Oid>> {
    let bytes = std::fs::read(idx).ok()?;
    if bytes.get(..8)? != b"\xfftOc\0\0\0\x02" {
        return None;
    }
    let count = u32::from_be_bytes(bytes.get(8 + 255 * 4..8 + 256 * 4)?.try_into().ok()?);
    let names = bytes.get(8 + 256 * 4..8 + 256 * 4 + count as usize * 20)?;
    names
        .chunks_exact(20)
        .map(|id| Oid::from_bytes(id).ok())
        .collect()
}

/// What [`consolidate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// Packs merged (deleted after the new one was written).
    pub packs: usize,
    /// Objects in the new pack.
    pub objects: usize,
}

/// Merges the packs of the clone at `repo_dir` (see the module's notes for which), then
/// deletes the packs merged. Does nothing with fewer than two packs.
pub fn consolidate(repo_dir: &Path) -> Result<Packed, String> {
    let git = |what: &str, e: git2::Error| format!("{what}: {}", e.message());
    let dir = pack_dir(repo_dir);
    let old = packs(repo_dir);
    if old.len() < 2 {
        return Ok(Packed {
            packs: 0,
            objects: 0,
        });
    }
    let listed: Option<Vec<Vec<Oid>>> = old
        .iter()
        .map(|stem| index_ids(&dir.join(format!("{stem}.idx"))))
        .collect();
    let repo = Repository::open_bare(repo_dir).map_err(|e| git("failed to open the clone", e))?;
    // The merge: every pack but the largest while those are small against it; else all
    // packs and the loose objects (as when an index cannot be read).
    let (merge, ids): (Vec<&String>, Vec<Oid>) = match listed {
        Some(mut listed) => {
            let largest = (0..listed.len())
                .max_by_key(|&i| listed[i].len())
                .expect("two packs or more");
            let rest: usize = listed.iter().map(Vec::len).sum::<usize>() - listed[largest].len();
            if rest * 2 < listed[largest].len() {
                listed.remove(largest);
                let merge = old.iter().enumerate().filter(|(i, _)| *i != largest);
                (merge.map(|(_, s)| s).collect(), listed.concat())
            } else {
                (old.iter().collect(), all_objects(&repo)?)
            }
        }
        None => (old.iter().collect(), all_objects(&repo)?),
    };
    let mut builder = repo
        .packbuilder()
        .map_err(|e| git("failed to start a pack", e))?;
    for id in &ids {
        builder
            .insert_object(*id, None)
            .map_err(|e| git(&format!("failed to add object {id} to the pack"), e))?;
    }
    let objects = builder.object_count();
    builder
        .write(&dir, 0o444)
        .map_err(|e| git("failed to write the pack", e))?;
    let new = format!(
        "pack-{}",
        builder
            .name()
            .ok()
            .flatten()
            .ok_or("the new pack has no name")?
    );
    for ext in ["pack", "idx"] {
        let path = dir.join(format!("{new}.{ext}"));
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("failed to sync {}: {e}", path.display()))?;
    }
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("failed to sync {}: {e}", dir.display()))?;
    let mut merged = 0;
    for stem in merge.into_iter().filter(|stem| **stem != new) {
        // The index first: a pack without its index is invisible to readers.
        for ext in ["idx", "pack", "rev"] {
            let path = dir.join(format!("{stem}.{ext}"));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("failed to delete {}: {e}", path.display())),
            }
        }
        merged += 1;
    }
    Ok(Packed {
        packs: merged,
        objects,
    })
}

/// Every object of the clone: in packs and loose.
fn all_objects(repo: &Repository) -> Result<Vec<Oid>, String> {
    let odb = repo
        .odb()
        .map_err(|e| format!("failed to open the object database: {}", e.message()))?;
    let mut ids = Vec::new();
    odb.foreach(|id| {
        ids.push(*id);
        true
    })
    .map_err(|e| format!("failed to list the objects: {}", e.message()))?;
    Ok(ids)
}

/// The child's side: consolidates the clone at `repo_dir`, prints nothing on success.
pub fn serve(repo_dir: &Path) -> u8 {
    match consolidate(repo_dir) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("vmsync {SUBCOMMAND}: {e}");
            1
        }
    }
}

/// After a sync: consolidates the clone in `state_dir` when it has more than
/// [`MAX_PACKS`] packs, in a child `exe pack-clone` (in this process when `exe` is
/// `None`). Returns the packs before and after; failures are only logged (the next sync
/// tries again), they never fail the sync.
pub fn tidy(state_dir: &Path, exe: Option<&Path>) -> Option<(usize, usize)> {
    let repo_dir = state_dir.join("repo");
    let before = packs(&repo_dir).len();
    if before <= MAX_PACKS {
        return None;
    }
    let started = std::time::Instant::now();
    let result = match exe {
        Some(exe) => Command::new(exe)
            .arg(SUBCOMMAND)
            .arg(&repo_dir)
            .status()
            .map_err(|e| format!("failed to start '{} {SUBCOMMAND}': {e}", exe.display()))
            .and_then(|status| match status.success() {
                true => Ok(()),
                false => Err(format!("'{SUBCOMMAND}' failed ({status})")),
            }),
        None => consolidate(&repo_dir).map(|_| ()),
    };
    let after = packs(&repo_dir).len();
    match result {
        Ok(()) => tracing::info!(
            packs_before = before,
            packs_after = after,
            ms = started.elapsed().as_millis() as u64,
            "packed the local clone"
        ),
        Err(e) => tracing::warn!(error = %e, packs = after, "failed to pack the local clone"),
    }
    Some((before, after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::test_git::git;

    /// A clone with one pack per fetch, as libgit2 leaves it (the first with `base`
    /// extra files); the commits fetched, including one that a force push made
    /// unreachable.
    fn clone_with_packs(fetches: usize, base: usize) -> (tempfile::TempDir, PathBuf, Vec<String>) {
        let tmp = tempfile::tempdir().unwrap();
        let remote = tmp.path().join("remote");
        std::fs::create_dir_all(&remote).unwrap();
        git(&remote, &["init", "-q"]);
        for i in 0..base {
            std::fs::write(remote.join(format!("base-{i}.txt")), format!("base {i}\n")).unwrap();
        }
        let clone = tmp.path().join("clone");
        let repo = Repository::init_bare(&clone).unwrap();
        let mut remote_handle = repo.remote("origin", remote.to_str().unwrap()).unwrap();
        let mut commits = Vec::new();
        for i in 0..fetches {
            std::fs::write(remote.join("f.txt"), format!("version {i}\n")).unwrap();
            git(&remote, &["add", "-A"]);
            git(&remote, &["commit", "-q", "-m", &format!("c{i}")]);
            if i == 1 {
                // Fetched, then rewritten away.
                commits.push(git(&remote, &["rev-parse", "HEAD"]));
                remote_handle
                    .fetch(&["+refs/heads/main:refs/remotes/origin/main"], None, None)
                    .unwrap();
                git(&remote, &["commit", "-q", "--amend", "-m", "c1 again"]);
            }
            commits.push(git(&remote, &["rev-parse", "HEAD"]));
            remote_handle
                .fetch(&["+refs/heads/main:refs/remotes/origin/main"], None, None)
                .unwrap();
        }
        (tmp, clone, commits)
    }

    fn readable(clone: &Path, commits: &[String]) {
        let repo = Repository::open_bare(clone).unwrap();
        for id in commits {
            let commit = repo.find_commit(Oid::from_str(id).unwrap()).unwrap();
            // Trees and blobs too, of reachable and unreachable commits alike.
            let tree = commit.tree().unwrap();
            let blob = tree.get_name("f.txt").unwrap().to_object(&repo).unwrap();
            assert!(blob.as_blob().unwrap().content().starts_with(b"version "));
        }
    }

    #[test]
    fn consolidation_keeps_every_object_in_one_pack() {
        let (_tmp, clone, commits) = clone_with_packs(6, 0);
        assert_eq!(packs(&clone).len(), 7, "one pack per fetch");
        let listed: usize = packs(&clone)
            .iter()
            .map(|p| {
                index_ids(&pack_dir(&clone).join(format!("{p}.idx")))
                    .unwrap()
                    .len()
            })
            .sum();
        let packed = consolidate(&clone).unwrap();
        assert_eq!(packed.packs, 7);
        assert_eq!(packs(&clone).len(), 1);
        readable(&clone, &commits);
        assert_eq!(packed.objects, listed, "{packed:?}");
        // One pack: nothing left to do.
        assert_eq!(consolidate(&clone).unwrap().packs, 0);
    }

    #[test]
    fn small_packs_are_merged_apart_from_a_large_one() {
        let (_tmp, clone, commits) = clone_with_packs(4, 60);
        let before = packs(&clone);
        assert_eq!(before.len(), 5);
        let sizes: Vec<usize> = before
            .iter()
            .map(|p| {
                index_ids(&pack_dir(&clone).join(format!("{p}.idx")))
                    .unwrap()
                    .len()
            })
            .collect();
        let largest = sizes.iter().max().unwrap();
        assert!(*largest > 60, "{sizes:?}");
        let packed = consolidate(&clone).unwrap();
        assert_eq!(packed.packs, 4, "{sizes:?}");
        assert_eq!(packed.objects, sizes.iter().sum::<usize>() - largest);
        let after = packs(&clone);
        assert_eq!(after.len(), 2);
        let kept = &before[sizes.iter().position(|s| s == largest).unwrap()];
        assert!(after.contains(kept), "the large pack is not rewritten");
        readable(&clone, &commits);
    }

    #[test]
    fn a_kept_pack_is_left_alone_and_tidy_waits_for_the_limit() {
        let (tmp, clone, _) = clone_with_packs(3, 0);
        let first = packs(&clone)[0].clone();
        let keep = pack_dir(&clone).join(format!("{first}.keep"));
        std::fs::write(&keep, "").unwrap();
        consolidate(&clone).unwrap();
        assert!(pack_dir(&clone).join(format!("{first}.pack")).exists());
        assert_eq!(packs(&clone).len(), 1, "the others merged");

        // tidy() works on <state_dir>/repo and only above MAX_PACKS.
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::rename(&clone, state.join("repo")).unwrap();
        assert_eq!(tidy(&state, None), None);
    }
}
