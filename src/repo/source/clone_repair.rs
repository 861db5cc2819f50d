//! A damaged local clone recovers on its own. The clone under `<state_dir>/repo` is a
//! cache of the VM repository: a disk error, a full disk during a fetch or a hand edit
//! can leave it with a truncated pack, missing objects or a garbage `HEAD`, and then
//! every fetch fails the same way.
//!
//! After a fetch fails, or when the commit it pinned cannot be read whole, [`damage`]
//! looks at the clone without the network (open it, read its references, walk the
//! history and the pinned tree). A clone that is sound means the failure was the
//! network's or the server's, and it is reported as it was. A damaged clone is moved
//! aside to `repo.damaged` (one such copy is kept, for a post-mortem; delete it at
//! will) and cloned once more; if that fails too, the error says what to do.

use std::path::{Path, PathBuf};

use git2::{ObjectType, Oid, Repository};
use tracing::{error, warn};

use super::FetchError;

/// Where a damaged clone is moved.
pub const DAMAGED: &str = "repo.damaged";

/// Why the clone at `clone` cannot be used, or `None` when it can (or does not exist).
/// Reads only the local clone.
pub fn damage(clone: &Path) -> Option<String> {
    if !clone.exists() {
        return None;
    }
    let repo = match Repository::open_bare(clone) {
        Ok(repo) => repo,
        Err(e) => return Some(format!("it cannot be opened: {}", e.message())),
    };
    if let Err(e) = repo.head()
        && !matches!(
            e.code(),
            git2::ErrorCode::UnbornBranch | git2::ErrorCode::NotFound
        )
    {
        return Some(format!("its HEAD cannot be read: {}", e.message()));
    }
    let refs = match repo.references() {
        Ok(refs) => refs,
        Err(e) => return Some(format!("its references cannot be read: {}", e.message())),
    };
    let mut tips = Vec::new();
    for reference in refs {
        let reference = match reference {
            Ok(r) => r,
            Err(e) => return Some(format!("a reference cannot be read: {}", e.message())),
        };
        let name = reference.name().unwrap_or("?").to_string();
        match reference.peel_to_commit() {
            Ok(commit) => tips.push((name, commit.id(), commit.tree_id())),
            Err(e) => {
                return Some(format!(
                    "reference '{name}' names a commit that cannot be read: {}",
                    e.message()
                ));
            }
        }
    }
    // Every commit of the history (the ancestry checks read them), then each tip's tree.
    let walked = (|| -> Result<(), git2::Error> {
        let mut walk = repo.revwalk()?;
        for (_, id, _) in &tips {
            walk.push(*id)?;
        }
        for id in walk {
            repo.find_commit(id?)?;
        }
        Ok(())
    })();
    if let Err(e) = walked {
        return Some(format!("its history cannot be read: {}", e.message()));
    }
    for (name, commit, tree) in &tips {
        if let Err(e) = whole_tree(&repo, *tree) {
            return Some(format!(
                "the files of commit {commit} ('{name}') cannot be read: {}",
                e.message()
            ));
        }
    }
    None
}

/// Reads the tree `id` and everything below it (blobs by their header: present and
/// readable, without inflating them whole).
fn whole_tree(repo: &Repository, id: Oid) -> Result<(), git2::Error> {
    let odb = repo.odb()?;
    let mut todo = vec![id];
    while let Some(id) = todo.pop() {
        let tree = repo.find_tree(id)?;
        for entry in tree.iter() {
            match entry.kind() {
                Some(ObjectType::Tree) => todo.push(entry.id()),
                Some(ObjectType::Blob) => {
                    odb.read_header(entry.id())?;
                }
                // Submodule commits are not in the clone; vmsync refuses them anyway.
                _ => {}
            }
        }
    }
    Ok(())
}

/// Whether the tree of `commit` in `repo` can be read whole; the error otherwise.
pub fn pinned_tree_readable(repo: &Repository, tree: Oid) -> Result<(), String> {
    whole_tree(repo, tree).map_err(|e| e.message().to_string())
}

/// Runs `fetch`; when it fails and the clone is damaged, moves the clone aside and runs
/// `fetch` once more. A sound clone's failure is returned as it was.
pub fn recovering<T>(
    state_dir: &Path,
    fetch: impl Fn() -> Result<T, FetchError>,
) -> Result<T, FetchError> {
    let first = fetch();
    let Err(failure) = first else {
        return first;
    };
    let clone = state_dir.join("repo");
    let Some(why) = damage(&clone) else {
        return Err(failure);
    };
    let aside = state_dir.join(DAMAGED);
    warn!(
        clone = %clone.display(),
        damage = %why,
        moved_to = %aside.display(),
        error = %failure,
        "the local clone is damaged; moving it aside and cloning again"
    );
    if let Err(e) = move_aside(&clone, &aside) {
        error!(clone = %clone.display(), error = %e, "failed to move the damaged local clone aside");
        return Err(FetchError::Repository {
            path: clone.display().to_string(),
            message: format!(
                "the local clone is damaged ({why}) and could not be moved aside ({e}); delete '{}' (a cache: the next run clones again)",
                clone.display()
            ),
        });
    }
    match fetch() {
        Ok(done) => {
            warn!(
                clone = %clone.display(),
                moved_to = %aside.display(),
                "cloned again; the damaged clone is kept for inspection (delete it at will)"
            );
            Ok(done)
        }
        Err(e) => Err(FetchError::Repository {
            path: clone.display().to_string(),
            message: format!(
                "the local clone was damaged ({why}) and moved to '{}'; cloning again failed too: {e}. Check the source url and the state directory's disk (space, errors), then run vmsync again",
                aside.display()
            ),
        }),
    }
}

/// Moves `clone` to `aside`, replacing an older damaged copy there.
fn move_aside(clone: &Path, aside: &PathBuf) -> std::io::Result<()> {
    if aside.exists() {
        std::fs::remove_dir_all(aside)?;
    }
    std::fs::rename(clone, aside)
}
