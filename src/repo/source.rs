//! Fetching the VM repository with git2 and pinning one commit.
//!
//! This module owns the local clone at `<state_dir>/repo`: a bare repository with one
//! remote, `origin`. [`fetch`] creates it on the first run, keeps the remote URL in step
//! with the configuration, fetches exactly one branch
//! (`+refs/heads/<branch>:refs/remotes/origin/<branch>`, no tags) and returns the commit
//! the branch points to as a [`FetchedCommit`]. Files are read from that commit's tree
//! (git objects), never from a working copy, so uncommitted changes in a local remote
//! are invisible and the revision that was validated is the one that gets applied.
//!
//! Transports: `ssh://`, `https://`, `http://`, `git://`, `file://` and plain local
//! paths (relative paths are made absolute before being stored as the remote URL; a
//! plain path and `file://` both use libgit2's local transport). `https://` is fetched
//! by vmsync's own smart-HTTP client ([`super::https`], which keeps TLS out of
//! processes that do not need it) and the tracking ref set here; every other URL by
//! libgit2 with the refspec below.
//!
//! Credentials: for SSH, the configured private key ([`SourceSettings::ssh_key`], no
//! passphrase) or else the ssh-agent; for HTTP(S), the token in
//! [`SourceSettings::token_file`] as the password, with the user name from the URL or
//! `x-access-token`. A refused credential, or a key or token file that cannot be read,
//! is a [`FetchError::Credentials`] naming the file. libgit2 may ask again after a
//! refusal (HTTP does, every time), so the callback gives up after [`MAX_AUTH_ATTEMPTS`]
//! offers; the `https://` client offers the token once.
//! Passwords embedded in a URL are masked in logs and errors.
//!
//! SSH host keys are checked by libgit2 itself, against `$HOME/.ssh/known_hosts`; this
//! module installs no certificate callback and so never weakens that check. An unknown
//! or changed host key fails the fetch ("invalid or unknown remote ssh hostkey"). Notes:
//! libgit2 reads `HOME` once, when it initialises in the process, so changing `HOME`
//! later has no effect; if `HOME` is unset no known_hosts file is found and every SSH
//! host is refused; a host on a non-default port must be listed as `[host]:port`.

mod clone_repair;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use git2::{AutotagOption, CredentialType, FetchOptions, Oid, RemoteCallbacks, Repository};
use tracing::{debug, info, warn};

use crate::repo::files::{FileError, MAX_FILE_BYTES, RepoFiles, check_repo_path, decode};
use crate::repo::https;
use crate::util::commit_id;
use crate::util::redact::redact;

/// Name of the only remote of the local clone.
const REMOTE: &str = "origin";

/// How many times a credential is offered before the fetch gives up.
pub const MAX_AUTH_ATTEMPTS: u32 = 3;

/// Where and how to fetch the VM repository.
#[derive(Debug, Clone)]
pub struct SourceSettings {
    /// `ssh://`, `https://`, `http://`, `file://`, or a local path (relative or absolute).
    pub url: String,
    /// Branch whose tip is deployed.
    pub branch: String,
    /// Private key file for `ssh://` (no passphrase); without it the ssh-agent is used.
    pub ssh_key: Option<PathBuf>,
    /// File holding an HTTPS token (surrounding whitespace is trimmed); used as the
    /// password, with the user name from the URL or `x-access-token`.
    pub token_file: Option<PathBuf>,
}

/// Why the VM repository could not be fetched or a commit of it opened.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The local clone under the state directory could not be created or opened.
    #[error("failed to open local clone '{path}': {message}")]
    Repository { path: String, message: String },
    /// The configured URL cannot be used as a remote URL.
    #[error("invalid repository url '{url}': {message}")]
    InvalidUrl { url: String, message: String },
    /// The configured branch name is not a valid git branch name.
    #[error("invalid branch name '{branch}'")]
    InvalidBranch { branch: String },
    /// The fetch failed; `message` is libgit2's.
    #[error("failed to fetch branch '{branch}' from '{url}': {message}")]
    Fetch {
        url: String,
        branch: String,
        message: String,
    },
    /// The remote has no such branch.
    #[error("branch '{branch}' does not exist in '{url}'")]
    BranchMissing { url: String, branch: String },
    /// A key or token file could not be read, or the remote refused the credential.
    #[error("failed to authenticate to '{url}': {message}")]
    Credentials { url: String, message: String },
    /// A commit id is malformed or the commit is not in the local clone.
    #[error("commit '{id}' is not in local clone '{path}': {message}")]
    CommitMissing {
        path: String,
        id: String,
        message: String,
    },
}

/// One pinned commit of the VM repository; reads files from its tree (git objects),
/// never from a working copy.
pub struct FetchedCommit {
    repo: Repository,
    commit: Oid,
    tree: Oid,
    /// The entries of each tree read so far, by tree id: a `vms/` directory of hundreds
    /// of files is read once per sync, not once per file it holds.
    trees: RefCell<HashMap<Oid, Rc<TreeEntries>>>,
}

/// A tree's entries by name: file mode and object id.
type TreeEntries = HashMap<String, (i32, Oid)>;

impl std::fmt::Debug for FetchedCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchedCommit")
            .field("repo", &self.repo.path())
            .field("commit", &self.commit)
            .finish()
    }
}

impl FetchedCommit {
    /// The full 40-hex commit id.
    pub fn id(&self) -> String {
        self.commit.to_string()
    }

    /// The commit's object id.
    pub fn oid(&self) -> Oid {
        self.commit
    }

    /// The local clone the commit is in (for signature and ancestry checks).
    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// The first 12 hex digits of the commit id, for messages.
    pub fn short(&self) -> String {
        commit_id::short(&self.id()).to_string()
    }

    /// Opens the commit `id` (full id or an unambiguous prefix of at least 4 hex digits)
    /// that is already in the local clone under `state_dir` (used later for diffs and
    /// ancestry). Nothing is fetched.
    pub fn open(state_dir: &Path, id: &str) -> Result<FetchedCommit, FetchError> {
        let path = state_dir.join("repo");
        let repo = Repository::open_bare(&path).map_err(|e| FetchError::Repository {
            path: path.display().to_string(),
            message: e.message().to_string(),
        })?;
        let missing = |message: String| FetchError::CommitMissing {
            path: path.display().to_string(),
            id: id.to_string(),
            message,
        };
        if id.len() < 4 || id.len() > 40 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(missing("not a hexadecimal commit id".to_string()));
        }
        let (commit, tree) = {
            let commit = repo
                .find_commit_by_prefix(id)
                .map_err(|e| missing(e.message().to_string()))?;
            (commit.id(), commit.tree_id())
        };
        Ok(FetchedCommit::new(repo, commit, tree))
    }

    fn new(repo: Repository, commit: Oid, tree: Oid) -> Self {
        Self {
            repo,
            commit,
            tree,
            trees: RefCell::default(),
        }
    }

    /// The entries of the tree `id` (read while looking up `path`).
    fn entries(&self, id: Oid, path: &str) -> Result<Rc<TreeEntries>, FileError> {
        if let Some(entries) = self.trees.borrow().get(&id) {
            return Ok(entries.clone());
        }
        let tree = self
            .repo
            .find_tree(id)
            .map_err(|e| git_file_error(path, &e))?;
        let entries: Rc<TreeEntries> = Rc::new(
            tree.iter()
                .filter_map(|e| Some((e.name().ok()?.to_string(), (e.filemode(), e.id()))))
                .collect(),
        );
        self.trees.borrow_mut().insert(id, entries.clone());
        Ok(entries)
    }
}

fn git_file_error(path: &str, e: &git2::Error) -> FileError {
    FileError::Io {
        path: path.to_string(),
        message: e.message().to_string(),
    }
}

/// Git file modes of tree entries.
const MODE_TREE: i32 = 0o040000;
const MODE_BLOB: i32 = 0o100644;
const MODE_BLOB_EXECUTABLE: i32 = 0o100755;

impl FetchedCommit {
    /// The id of the blob at `path`, walking the tree without following symlinks or
    /// submodules and without reading the blob.
    fn blob_id(&self, path: &str) -> Result<git2::Oid, FileError> {
        let parts = check_repo_path(path)?;
        let (last, dirs) = parts
            .split_last()
            .expect("check_repo_path never returns empty");
        let mut tree = self.entries(self.tree, path)?;
        for dir in dirs {
            let Some(&(mode, oid)) = tree.get(dir.as_str()) else {
                return Err(FileError::NotFound(path.to_string()));
            };
            tree = match mode {
                MODE_TREE => self.entries(oid, path)?,
                // A regular file where a directory was expected: nothing below it.
                MODE_BLOB | MODE_BLOB_EXECUTABLE => {
                    return Err(FileError::NotFound(path.to_string()));
                }
                // Symlinks and submodules are never followed.
                _ => return Err(FileError::NotAFile(path.to_string())),
            };
        }
        let Some(&(mode, oid)) = tree.get(last.as_str()) else {
            return Err(FileError::NotFound(path.to_string()));
        };
        if mode != MODE_BLOB && mode != MODE_BLOB_EXECUTABLE {
            return Err(FileError::NotAFile(path.to_string()));
        }
        Ok(oid)
    }
}

impl RepoFiles for FetchedCommit {
    /// The blob id: equal ids mean equal content, so validation can skip unchanged files.
    fn content_id(&self, path: &str) -> Option<String> {
        // Hex by hand: `Oid`'s `Display` goes through libgit2, a cost per file per sync.
        self.blob_id(path).ok().map(|oid| {
            let mut id = String::with_capacity(45);
            id.push_str("blob:");
            id.push_str(&hex::encode(oid.as_bytes()));
            id
        })
    }

    fn read_text(&self, path: &str) -> Result<String, FileError> {
        decode(path, self.read_bytes(path)?)
    }

    fn read_bytes(&self, path: &str) -> Result<Vec<u8>, FileError> {
        let oid = self.blob_id(path)?;
        // Check the size from the object header before loading the content.
        let odb = self.repo.odb().map_err(|e| git_file_error(path, &e))?;
        let (size, _) = odb.read_header(oid).map_err(|e| git_file_error(path, &e))?;
        if size as u64 > MAX_FILE_BYTES {
            return Err(FileError::TooLarge {
                path: path.to_string(),
                size: size as u64,
                limit: MAX_FILE_BYTES,
            });
        }
        let blob = self
            .repo
            .find_blob(oid)
            .map_err(|e| git_file_error(path, &e))?;
        Ok(blob.content().to_vec())
    }

    fn revision(&self) -> String {
        self.short()
    }
}

/// Clones (first run) or fetches (later runs) `settings.branch` into `<state_dir>/repo`
/// (a bare repository, created if missing) and returns the commit the branch points to.
/// A damaged clone is moved aside and cloned again once ([`clone_repair`]).
pub fn fetch(settings: &SourceSettings, state_dir: &Path) -> Result<FetchedCommit, FetchError> {
    clone_repair::recovering(state_dir, || fetch_once(settings, state_dir))
}

/// [`fetch`] without the repair.
fn fetch_once(settings: &SourceSettings, state_dir: &Path) -> Result<FetchedCommit, FetchError> {
    let url = remote_url(&settings.url)?;
    // For logs and errors: never show a password embedded in the URL.
    let shown = redact(&url);
    let branch = settings.branch.as_str();
    if branch.is_empty() || !git2::Reference::is_valid_name(&format!("refs/heads/{branch}")) {
        return Err(FetchError::InvalidBranch {
            branch: branch.to_string(),
        });
    }
    let fetch_error = |e: &git2::Error| FetchError::Fetch {
        url: shown.clone(),
        branch: branch.to_string(),
        message: e.message().to_string(),
    };

    let repo = open_or_init(&state_dir.join("repo"))?;
    let remote = origin(&repo, &url, &shown).map_err(|e| fetch_error(&e))?;
    let tracking = format!("refs/remotes/{REMOTE}/{branch}");
    debug!(url = %shown, branch = %branch, "fetching");
    let transfer = if url.starts_with("https://") {
        drop(remote);
        fetch_https(&repo, settings, (&url, &shown), &tracking)?
    } else {
        fetch_libgit2(remote, settings, &shown, &tracking)?
    };
    let (received_objects, received_bytes) = (transfer.received_objects, transfer.received_bytes);

    // The advertisement says whether the branch still exists on the remote; without
    // this, a branch deleted upstream would leave a stale tracking ref behind.
    let Some(advertised) = transfer.advertised else {
        if let Ok(mut stale) = repo.find_reference(&tracking)
            && let Err(e) = stale.delete()
        {
            warn!(reference = %tracking, error = %e.message(), "failed to delete stale tracking ref");
        }
        return Err(FetchError::BranchMissing {
            url: shown,
            branch: branch.to_string(),
        });
    };

    let (commit, tree) = repo
        .find_reference(&tracking)
        .and_then(|r| r.peel_to_commit())
        .map(|c| (c.id(), c.tree_id()))
        .map_err(|e| fetch_error(&e))?;
    if commit != advertised {
        return Err(FetchError::Fetch {
            url: shown,
            branch: branch.to_string(),
            message: format!("'{tracking}' is at {commit} but the remote advertised {advertised}"),
        });
    }
    // The pinned commit's files must all be there: a clone that lost objects would
    // otherwise fail later, at validation, as if the commit were invalid.
    clone_repair::pinned_tree_readable(&repo, tree).map_err(|message| FetchError::Repository {
        path: state_dir.join("repo").display().to_string(),
        message: format!("the files of commit {commit} cannot be read: {message}"),
    })?;
    let fetched = FetchedCommit::new(repo, commit, tree);
    info!(
        url = %shown,
        branch = %branch,
        commit = %fetched.short(),
        received_objects,
        received_bytes,
        "fetched"
    );
    Ok(fetched)
}

/// The clone's remote `origin`, created or pointed at `url` if it is not already.
fn origin<'r>(
    repo: &'r Repository,
    url: &str,
    shown: &str,
) -> Result<git2::Remote<'r>, git2::Error> {
    match repo.find_remote(REMOTE) {
        Ok(remote) if remote.url_bytes() == url.as_bytes() => Ok(remote),
        Ok(remote) => {
            let old = redact(&String::from_utf8_lossy(remote.url_bytes()));
            drop(remote);
            info!(old = %old, new = %shown, "remote url changed, updating local clone");
            repo.remote_set_url(REMOTE, url)?;
            repo.find_remote(REMOTE)
        }
        Err(e) if e.code() == git2::ErrorCode::NotFound => {
            debug!(url = %shown, "adding remote to local clone");
            repo.remote(REMOTE, url)
        }
        Err(e) => Err(e),
    }
}

/// Fetches `(url, shown)` (the URL and its redacted form) over vmsync's own
/// smart-HTTP client ([`https::fetch`]) and points `tracking` at the advertised tip.
fn fetch_https(
    repo: &Repository,
    settings: &SourceSettings,
    (url, shown): (&str, &str),
    tracking: &str,
) -> Result<https::Transfer, FetchError> {
    let branch = settings.branch.as_str();
    let fetch_error = |message: String| FetchError::Fetch {
        url: shown.to_string(),
        branch: branch.to_string(),
        message,
    };
    let transfer =
        https::fetch(repo, url, branch, settings.token_file.as_deref()).map_err(|e| match e {
            https::HttpsError::Credentials(message) => FetchError::Credentials {
                url: shown.to_string(),
                message,
            },
            https::HttpsError::Fetch(message) => fetch_error(message),
        })?;
    if let Some(tip) = transfer.advertised {
        repo.reference(tracking, tip, true, "fetch: https")
            .map_err(|e| fetch_error(e.message().to_string()))?;
    }
    Ok(transfer)
}

/// Fetches over libgit2's transports (local, `file://`, `ssh://`, `git://`, `http://`)
/// with the refspec `+refs/heads/<branch>:<tracking>`.
fn fetch_libgit2(
    mut remote: git2::Remote<'_>,
    settings: &SourceSettings,
    shown: &str,
    tracking: &str,
) -> Result<https::Transfer, FetchError> {
    let branch = settings.branch.as_str();
    let fetch_error = |e: &git2::Error| FetchError::Fetch {
        url: shown.to_string(),
        branch: branch.to_string(),
        message: e.message().to_string(),
    };
    let refspec = format!("+refs/heads/{branch}:{tracking}");
    let auth = Auth::new(settings, shown);
    let mut callbacks = RemoteCallbacks::new();
    callbacks.credentials(|_url, username, allowed| auth.credential(username, allowed));
    let mut options = FetchOptions::new();
    options
        .remote_callbacks(callbacks)
        .download_tags(AutotagOption::None)
        // Nothing reads FETCH_HEAD: the tracking ref says what was fetched.
        .update_fetchhead(false);
    let fetched = remote.fetch(&[refspec.as_str()], Some(&mut options), None);
    drop(options);
    if let Err(e) = fetched {
        return Err(auth
            .take_error()
            .or_else(|| auth.refused(&e))
            .unwrap_or_else(|| fetch_error(&e)));
    }
    let wanted = format!("refs/heads/{branch}");
    let advertised = remote
        .list()
        .map_err(|e| fetch_error(&e))?
        .iter()
        .find(|head| head.name() == wanted)
        .map(|head| head.oid());
    Ok(https::Transfer {
        advertised,
        // What the fetch transferred: nothing when the branch did not move.
        received_objects: remote.stats().received_objects(),
        received_bytes: remote.stats().received_bytes(),
    })
}

/// Packs in the local clone beyond which [`tidy`] writes them into one. libgit2 writes
/// one pack per fetch that received objects and never repacks; every object lookup
/// searches every pack's index, and a daemon that fetched a commit a day would hold
/// hundreds after a year.
pub const MAX_PACKS: usize = 16;

/// The pack files (`*.pack`) of the local clone under `state_dir`.
pub fn packs(state_dir: &Path) -> Vec<PathBuf> {
    let dir = state_dir.join("repo/objects/pack");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut packs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    packs.sort();
    packs
}

/// After a sync, under its lock: once the local clone holds more than [`MAX_PACKS`]
/// packs, writes every object of the clone, reachable or not (so the rewind checks see
/// the same history), into one new pack through libgit2's pack builder and indexer,
/// makes it durable, then deletes the old packs.
/// A failure is only logged: the clone still works, with more packs.
pub fn tidy(state_dir: &Path) {
    let old = packs(state_dir);
    if old.len() <= MAX_PACKS {
        return;
    }
    let result = (|| -> Result<(), git2::Error> {
        let repo = Repository::open_bare(state_dir.join("repo"))?;
        let odb = repo.odb()?;
        let mut ids = Vec::new();
        odb.foreach(|id| {
            ids.push(*id);
            true
        })?;
        let mut builder = repo.packbuilder()?;
        for id in ids {
            builder.insert_object(id, None)?;
        }
        let mut buf = git2::Buf::new();
        builder.write_buf(&mut buf)?;
        let mut writer = odb.packwriter()?;
        std::io::Write::write_all(&mut writer, &buf)
            .map_err(|e| git2::Error::from_str(&e.to_string()))?;
        writer.commit()?;
        Ok(())
    })();
    if let Err(e) = result {
        warn!(error = %e.message(), "failed to pack the local clone; keeping its packs");
        return;
    }
    let new: Vec<PathBuf> = packs(state_dir)
        .into_iter()
        .filter(|p| !old.contains(p))
        .collect();
    let durable = new.iter().all(|pack| {
        [pack.clone(), pack.with_extension("idx")]
            .iter()
            .all(|f| std::fs::File::open(f).and_then(|f| f.sync_all()).is_ok())
    }) && std::fs::File::open(state_dir.join("repo/objects/pack"))
        .and_then(|d| d.sync_all())
        .is_ok();
    if new.len() != 1 || !durable {
        warn!(
            new = new.len(),
            "the new pack of the local clone is not durable; keeping the old packs"
        );
        return;
    }
    for pack in &old {
        for ext in ["pack", "idx", "rev"] {
            let _ = std::fs::remove_file(pack.with_extension(ext));
        }
    }
    info!(packs = old.len(), "packed the local clone into one pack");
}

/// Turns the configured URL into the remote URL: URLs (`scheme://…`) and scp-like
/// `user@host:path` are kept, local paths are made absolute (canonical if they exist).
fn remote_url(configured: &str) -> Result<String, FetchError> {
    let invalid = |message: &str| FetchError::InvalidUrl {
        url: configured.to_string(),
        message: message.to_string(),
    };
    if configured.trim().is_empty() {
        return Err(invalid("the url is empty"));
    }
    if configured.contains("://") || is_scp_like(configured) {
        return Ok(configured.to_string());
    }
    // Canonical when it exists (no '..' left in the stored URL), else just absolute.
    let absolute = std::fs::canonicalize(configured)
        .or_else(|_| std::path::absolute(configured))
        .map_err(|e| invalid(&format!("not a usable path: {e}")))?;
    absolute
        .to_str()
        .map(str::to_string)
        .ok_or_else(|| invalid("the path is not valid UTF-8"))
}

/// `host:path` or `user@host:path` (git's scp-like SSH syntax): a ':' before any '/'.
fn is_scp_like(url: &str) -> bool {
    if url.starts_with('/') || url.starts_with('.') {
        return false;
    }
    match (url.find(':'), url.find('/')) {
        (Some(colon), Some(slash)) => colon < slash,
        (Some(_), None) => true,
        _ => false,
    }
}

fn open_or_init(path: &Path) -> Result<Repository, FetchError> {
    let error = |e: String| FetchError::Repository {
        path: path.display().to_string(),
        message: e,
    };
    if path.exists() {
        return Repository::open_bare(path).map_err(|e| error(e.message().to_string()));
    }
    info!(path = %path.display(), "creating local clone");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| error(e.to_string()))?;
    }
    Repository::init_bare(path).map_err(|e| error(e.message().to_string()))
}

/// State of the credentials callback for one fetch.
struct Auth<'a> {
    settings: &'a SourceSettings,
    url: &'a str,
    attempts: Cell<u32>,
    /// What was offered last ("ssh key '/path'"), for messages.
    offered: RefCell<Option<String>>,
    error: RefCell<Option<FetchError>>,
}

impl<'a> Auth<'a> {
    fn new(settings: &'a SourceSettings, url: &'a str) -> Self {
        Self {
            settings,
            url,
            attempts: Cell::new(0),
            offered: RefCell::new(None),
            error: RefCell::new(None),
        }
    }

    /// The error the callback gave up with, if any.
    fn take_error(&self) -> Option<FetchError> {
        self.error.borrow_mut().take()
    }

    /// A [`FetchError::Credentials`] if the fetch failed because the remote refused
    /// what the callback offered (libgit2's `GIT_EAUTH`).
    fn refused(&self, e: &git2::Error) -> Option<FetchError> {
        if e.code() != git2::ErrorCode::Auth {
            return None;
        }
        let offered = self.offered.borrow().clone()?;
        Some(FetchError::Credentials {
            url: self.url.to_string(),
            message: format!("{offered} was refused: {}", e.message()),
        })
    }

    /// Answers libgit2's credentials request; on failure remembers a
    /// [`FetchError::Credentials`] and returns a git2 error to stop the fetch.
    fn credential(
        &self,
        username: Option<&str>,
        allowed: CredentialType,
    ) -> Result<git2::Cred, git2::Error> {
        self.try_credential(username, allowed).map_err(|message| {
            warn!(url = %self.url, error = %message, "authentication failed");
            let error = git2::Error::from_str(&message);
            *self.error.borrow_mut() = Some(FetchError::Credentials {
                url: self.url.to_string(),
                message,
            });
            error
        })
    }

    fn try_credential(
        &self,
        username: Option<&str>,
        allowed: CredentialType,
    ) -> Result<git2::Cred, String> {
        let libgit2 = |e: git2::Error| e.message().to_string();
        if allowed.contains(CredentialType::SSH_KEY) {
            let user = username.unwrap_or("git");
            self.count_attempt(match &self.settings.ssh_key {
                Some(key) => format!("ssh key '{}'", key.display()),
                None => "the ssh-agent keys".to_string(),
            })?;
            return match &self.settings.ssh_key {
                Some(key) => {
                    std::fs::File::open(key)
                        .map_err(|e| format!("cannot read ssh key '{}': {e}", key.display()))?;
                    debug!(user = %user, key = %key.display(), "offering ssh key");
                    git2::Cred::ssh_key(user, None, key, None).map_err(libgit2)
                }
                None => {
                    debug!(user = %user, "offering ssh-agent keys");
                    git2::Cred::ssh_key_from_agent(user).map_err(|e| {
                        format!(
                            "no ssh_key configured and ssh-agent failed: {}",
                            e.message()
                        )
                    })
                }
            };
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            let Some(file) = &self.settings.token_file else {
                return Err(
                    "the remote asks for credentials but no token_file is configured".to_string(),
                );
            };
            self.count_attempt(format!("token from '{}'", file.display()))?;
            let token = https::read_token(file)?;
            let user = username.unwrap_or("x-access-token");
            debug!(user = %user, token_file = %file.display(), "offering token");
            return git2::Cred::userpass_plaintext(user, &token).map_err(libgit2);
        }
        if allowed.contains(CredentialType::USERNAME) {
            return git2::Cred::username(username.unwrap_or("git")).map_err(libgit2);
        }
        Err(format!(
            "the remote asks for an unsupported kind of credential ({allowed:?})"
        ))
    }

    /// Counts one offer of a credential; refuses once [`MAX_AUTH_ATTEMPTS`] were made.
    fn count_attempt(&self, what: String) -> Result<(), String> {
        let attempts = self.attempts.get();
        if attempts >= MAX_AUTH_ATTEMPTS {
            return Err(format!("{what} was refused after {attempts} attempts"));
        }
        self.attempts.set(attempts + 1);
        *self.offered.borrow_mut() = Some(what);
        Ok(())
    }
}

/// A real `sshd` on loopback serving git over SSH, for tests.
///
/// libgit2 reads `HOME` only once per process, so instead of changing `HOME` every
/// server's host key is added to one process-wide known_hosts file whose home directory
/// is handed to libgit2 with `GIT_OPT_SET_HOMEDIR` ([`libgit2_home`]).
#[cfg(test)]
pub(crate) mod test_sshd {
    use std::ffi::{CString, c_int};
    use std::io::Write;
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};

    /// The OpenSSH server binary (Debian package `openssh-server`).
    pub(crate) const SSHD: &str = "/usr/sbin/sshd";

    /// `GIT_OPT_SET_HOMEDIR` in libgit2's `git_libgit2_opt_t` (libgit2 >= 1.7; the
    /// vendored libgit2 of libgit2-sys 0.18 is 1.9). git2 does not wrap this option.
    const GIT_OPT_SET_HOMEDIR: c_int = 38;

    unsafe extern "C" {
        fn git_libgit2_opts(option: c_int, ...) -> c_int;
    }

    /// A running `sshd -D`; killed when dropped.
    pub(crate) struct SshServer {
        child: Child,
        dir: tempfile::TempDir,
        /// The port on 127.0.0.1.
        pub(crate) port: u16,
        /// The login user (the user running the tests).
        pub(crate) user: String,
        /// A private key (no passphrase) in the server's authorized_keys.
        pub(crate) client_key: PathBuf,
        /// The host public key line (`ssh-ed25519 AAAA…`).
        pub(crate) host_key: String,
    }

    impl SshServer {
        /// Starts a server whose host key is trusted (in libgit2's known_hosts).
        pub(crate) fn start() -> SshServer {
            let server = SshServer::start_untrusted();
            trust(&server);
            server
        }

        /// Starts a server whose host key is NOT in known_hosts.
        pub(crate) fn start_untrusted() -> SshServer {
            assert!(
                Path::new(SSHD).exists(),
                "{SSHD} is missing: install the Debian package openssh-server to run the ssh tests"
            );
            std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
            let dir = tempfile::tempdir().unwrap();
            let host_key = keygen(&dir.path().join("host_ed25519"));
            let client_key = dir.path().join("client_ed25519");
            let client_pub = keygen(&client_key);
            std::fs::write(
                dir.path().join("authorized_keys"),
                format!("{client_pub}\n"),
            )
            .unwrap();
            let user = current_user();
            let port = free_port();
            let d = dir.path().display();
            let config = format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n\
                 StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nAllowUsers {user}\nLogLevel VERBOSE\n"
            );
            let config_path = dir.path().join("sshd_config");
            std::fs::write(&config_path, config).unwrap();
            let log = std::fs::File::create(dir.path().join("sshd.log")).unwrap();
            let child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("failed to start {SSHD}: {e}"));
            let mut server = SshServer {
                child,
                dir,
                port,
                user,
                client_key,
                host_key,
            };
            server.wait_listening();
            server
        }

        fn wait_listening(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                    return;
                }
                if let Some(status) = self.child.try_wait().unwrap() {
                    panic!("sshd exited with {status}: {}", self.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "sshd does not listen on port {}: {}",
                    self.port,
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        /// sshd's log so far (for assertion messages).
        pub(crate) fn log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
        }

        /// `ssh://user@127.0.0.1:PORT/<absolute repo path>`.
        pub(crate) fn url(&self, repo: &Path) -> String {
            format!(
                "ssh://{}@127.0.0.1:{}{}",
                self.user,
                self.port,
                repo.display()
            )
        }

        /// A directory that lives as long as the server, for keys and repos.
        pub(crate) fn dir(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for SshServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Generates an ed25519 key pair without passphrase at `path` (and `path.pub`) and
    /// returns the public key line without its comment.
    pub(crate) fn keygen(path: &Path) -> String {
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "vmsync-test", "-f"])
            .arg(path)
            .output()
            .expect("run ssh-keygen (Debian package openssh-client)");
        assert!(out.status.success(), "ssh-keygen: {out:?}");
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Adds the server's host key to libgit2's known_hosts as `[127.0.0.1]:PORT`.
    pub(crate) fn trust(server: &SshServer) {
        static LOCK: Mutex<()> = Mutex::new(());
        let _guard = LOCK.lock().unwrap();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(libgit2_home().join(".ssh/known_hosts"))
            .unwrap();
        writeln!(file, "[127.0.0.1]:{} {}", server.port, server.host_key).unwrap();
    }

    /// The home directory libgit2 uses in this test process (holding
    /// `.ssh/known_hosts`); set once with `GIT_OPT_SET_HOMEDIR`.
    pub(crate) fn libgit2_home() -> &'static Path {
        static HOME: OnceLock<PathBuf> = OnceLock::new();
        HOME.get_or_init(|| {
            let home = tempfile::Builder::new()
                .prefix("vmsync-test-home")
                .tempdir()
                .unwrap()
                .keep();
            std::fs::create_dir_all(home.join(".ssh")).unwrap();
            // Initialise libgit2 first: its initialisation would overwrite the setting.
            let _ = git2::Version::get();
            let _ = unsafe { git2::opts::get_search_path(git2::ConfigLevel::Global) };
            let c_home = CString::new(home.to_str().unwrap()).unwrap();
            let rc = unsafe { git_libgit2_opts(GIT_OPT_SET_HOMEDIR, c_home.as_ptr()) };
            assert_eq!(rc, 0, "git_libgit2_opts(GIT_OPT_SET_HOMEDIR) failed");
            home
        })
    }

    fn current_user() -> String {
        let out = Command::new("id").arg("-un").output().expect("run id -un");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn free_port() -> u16 {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

/// The git CLI for tests.
#[cfg(test)]
pub(crate) mod test_git {
    use std::path::Path;
    use std::process::Command;

    /// Runs the git CLI in `dir`, isolated from the user's and system configuration.
    pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "init.defaultBranch=main", "-c", "core.symlinks=true"])
            .args(args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "test")
            .env("GIT_AUTHOR_EMAIL", "test@example.com")
            .env("GIT_COMMITTER_NAME", "test")
            .env("GIT_COMMITTER_EMAIL", "test@example.com")
            .output()
            .expect("run git");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::test_git::git;
    use super::test_sshd::{SshServer, keygen};
    use super::*;
    use std::time::Duration;

    /// A non-bare repository at `dir` with `vmsync.toml` committed on `main`.
    fn remote_repo(dir: &Path, toml: &str) -> String {
        std::fs::create_dir_all(dir).unwrap();
        git(dir, &["init", "-q"]);
        commit_file(dir, "vmsync.toml", toml)
    }

    /// Writes and commits one file; returns the new commit id.
    fn commit_file(dir: &Path, path: &str, content: &str) -> String {
        let full = dir.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
        git(dir, &["add", path]);
        git(dir, &["commit", "-q", "-m", &format!("update {path}")]);
        git(dir, &["rev-parse", "HEAD"])
    }

    fn settings(url: &str, branch: &str) -> SourceSettings {
        SourceSettings {
            url: url.to_string(),
            branch: branch.to_string(),
            ssh_key: None,
            token_file: None,
        }
    }

    /// `path` (absolute) relative to the current directory, e.g. `../../tmp/x/vms`.
    fn relative_to_cwd(path: &Path) -> PathBuf {
        let cwd = std::env::current_dir().unwrap();
        let mut relative = PathBuf::new();
        for _ in cwd.components().skip(1) {
            relative.push("..");
        }
        relative.join(path.strip_prefix("/").unwrap())
    }

    fn stored_url(state: &Path) -> String {
        let repo = Repository::open_bare(state.join("repo")).unwrap();
        let remote = repo.find_remote("origin").unwrap();
        remote.url().unwrap().to_string()
    }

    #[test]
    fn local_path_fetches_committed_state_only() {
        let tmp = tempfile::tempdir().unwrap();
        let remote = tmp.path().join("vms");
        let first = remote_repo(&remote, "version = 1\n");
        let state = tmp.path().join("state");

        // A relative path is stored as an absolute remote URL.
        let relative = relative_to_cwd(&remote);
        assert!(relative.is_relative());
        let s = settings(relative.to_str().unwrap(), "main");
        let fetched = fetch(&s, &state).unwrap();
        assert_eq!(fetched.id(), first);
        assert_eq!(fetched.short(), first[..12]);
        assert_eq!(fetched.revision(), first[..12]);
        assert_eq!(fetched.read_text("vmsync.toml").unwrap(), "version = 1\n");
        let canonical = remote.canonicalize().unwrap();
        assert_eq!(stored_url(&state), canonical.to_str().unwrap());
        let repo = Repository::open_bare(state.join("repo")).unwrap();
        assert!(repo.is_bare());
        assert!(repo.tag_names(None).unwrap().is_empty());

        // A new commit is seen by the next fetch.
        let second = commit_file(&remote, "vmsync.toml", "version = 2\n");
        let fetched = fetch(&s, &state).unwrap();
        assert_eq!(fetched.id(), second);
        assert_ne!(second, first);
        assert_eq!(fetched.read_text("vmsync.toml").unwrap(), "version = 2\n");

        // Uncommitted changes in the remote's working tree are not.
        std::fs::write(remote.join("vmsync.toml"), "version = 3\n").unwrap();
        std::fs::write(remote.join("new.toml"), "x = 1\n").unwrap();
        let fetched = fetch(&s, &state).unwrap();
        assert_eq!(fetched.id(), second);
        assert_eq!(fetched.read_text("vmsync.toml").unwrap(), "version = 2\n");
        assert_eq!(
            fetched.read_text("new.toml"),
            Err(FileError::NotFound("new.toml".into()))
        );

        // An older commit can be reopened from the clone.
        let old = FetchedCommit::open(&state, &first).unwrap();
        assert_eq!(old.id(), first);
        assert_eq!(old.read_text("vmsync.toml").unwrap(), "version = 1\n");
        assert_eq!(
            FetchedCommit::open(&state, &first[..8]).unwrap().id(),
            first
        );
        for bad in ["0123456789abcdef0123456789abcdef01234567", "xyz", "ab"] {
            assert!(
                matches!(
                    FetchedCommit::open(&state, bad),
                    Err(FetchError::CommitMissing { .. })
                ),
                "{bad}"
            );
        }

        // file:// works too, into a fresh state directory.
        let url = format!("file://{}", remote.display());
        let other_state = tmp.path().join("state2");
        let fetched = fetch(&settings(&url, "main"), &other_state).unwrap();
        assert_eq!(fetched.id(), second);
        assert_eq!(fetched.read_text("vmsync.toml").unwrap(), "version = 2\n");
        assert_eq!(stored_url(&other_state), url);
    }

    #[test]
    fn branch_selection() {
        let tmp = tempfile::tempdir().unwrap();
        let remote = tmp.path().join("vms");
        let main = remote_repo(&remote, "env = 'prod'\n");
        git(&remote, &["checkout", "-q", "-b", "staging"]);
        let staging = commit_file(&remote, "vmsync.toml", "env = 'staging'\n");
        git(&remote, &["checkout", "-q", "main"]);
        let state = tmp.path().join("state");
        let url = remote.to_str().unwrap();

        let fetched = fetch(&settings(url, "main"), &state).unwrap();
        assert_eq!(fetched.id(), main);
        assert_eq!(fetched.read_text("vmsync.toml").unwrap(), "env = 'prod'\n");
        let fetched = fetch(&settings(url, "staging"), &state).unwrap();
        assert_eq!(fetched.id(), staging);
        assert_eq!(
            fetched.read_text("vmsync.toml").unwrap(),
            "env = 'staging'\n"
        );

        let err = fetch(&settings(url, "nope"), &state).unwrap_err();
        assert!(
            matches!(&err, FetchError::BranchMissing { branch, url: u } if branch == "nope" && u == url),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("branch 'nope' does not exist in '{url}'")
        );

        // A branch deleted upstream is missing, even though it was fetched before.
        git(&remote, &["branch", "-q", "-D", "staging"]);
        let err = fetch(&settings(url, "staging"), &state).unwrap_err();
        assert!(matches!(err, FetchError::BranchMissing { .. }), "{err:?}");

        let err = fetch(&settings(url, "bad..name"), &state).unwrap_err();
        assert!(matches!(err, FetchError::InvalidBranch { .. }), "{err:?}");
    }

    #[test]
    fn fetch_errors_carry_libgit2_message() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("does-not-exist");
        let err = fetch(&settings(missing.to_str().unwrap(), "main"), tmp.path()).unwrap_err();
        let FetchError::Fetch {
            url,
            branch,
            message,
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(url, missing.to_str().unwrap());
        assert_eq!(branch, "main");
        assert!(!message.is_empty());
        assert!(
            err.to_string()
                .starts_with(&format!("failed to fetch branch 'main' from '{url}': ")),
            "{err}"
        );
    }

    #[test]
    fn read_text_checks_tree_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let remote = tmp.path().join("vms");
        remote_repo(&remote, "ok = true\n");
        commit_file(&remote, "vms/a.xml", "<domain/>");
        commit_file(&remote, "run.sh", "#!/bin/sh\n");
        git(&remote, &["update-index", "--chmod=+x", "run.sh"]);
        std::os::unix::fs::symlink("vmsync.toml", remote.join("link.toml")).unwrap();
        std::os::unix::fs::symlink("vms", remote.join("linkdir")).unwrap();
        std::fs::write(
            remote.join("big.xml"),
            vec![b'a'; MAX_FILE_BYTES as usize + 1],
        )
        .unwrap();
        std::fs::write(
            remote.join("limit.xml"),
            vec![b'a'; MAX_FILE_BYTES as usize],
        )
        .unwrap();
        std::fs::write(remote.join("bin.xml"), [0xff, 0xfe, 0x00]).unwrap();
        git(&remote, &["add", "."]);
        // A submodule entry (gitlink) pointing at some commit.
        let head = git(&remote, &["rev-parse", "HEAD"]);
        git(
            &remote,
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("160000,{head},sub"),
            ],
        );
        git(&remote, &["commit", "-q", "-m", "entries"]);

        let state = tmp.path().join("state");
        let files = fetch(&settings(remote.to_str().unwrap(), "main"), &state).unwrap();
        assert_eq!(files.read_text("vmsync.toml").unwrap(), "ok = true\n");
        assert_eq!(files.read_text("./vms/a.xml").unwrap(), "<domain/>");
        assert_eq!(files.read_text("run.sh").unwrap(), "#!/bin/sh\n");
        assert_eq!(
            files.read_text("limit.xml").unwrap().len() as u64,
            MAX_FILE_BYTES
        );
        let cases: Vec<(&str, FileError)> = vec![
            ("nope.toml", FileError::NotFound("nope.toml".into())),
            ("vms/nope.xml", FileError::NotFound("vms/nope.xml".into())),
            ("nope/a.xml", FileError::NotFound("nope/a.xml".into())),
            ("vmsync.toml/a", FileError::NotFound("vmsync.toml/a".into())),
            ("../x", FileError::InvalidPath("../x".into())),
            (
                "/vmsync.toml",
                FileError::InvalidPath("/vmsync.toml".into()),
            ),
            ("link.toml", FileError::NotAFile("link.toml".into())),
            ("linkdir/a.xml", FileError::NotAFile("linkdir/a.xml".into())),
            ("vms", FileError::NotAFile("vms".into())),
            ("sub", FileError::NotAFile("sub".into())),
            ("sub/x", FileError::NotAFile("sub/x".into())),
            (
                "big.xml",
                FileError::TooLarge {
                    path: "big.xml".into(),
                    size: MAX_FILE_BYTES + 1,
                    limit: MAX_FILE_BYTES,
                },
            ),
            ("bin.xml", FileError::NotUtf8("bin.xml".into())),
        ];
        for (path, expected) in cases {
            assert_eq!(files.read_text(path), Err(expected), "{path}");
        }
    }

    #[test]
    fn changed_url_updates_remote() {
        let tmp = tempfile::tempdir().unwrap();
        let first = tmp.path().join("first");
        remote_repo(&first, "from = 'first'\n");
        let second = tmp.path().join("second");
        git(
            tmp.path(),
            &[
                "clone",
                "-q",
                first.to_str().unwrap(),
                second.to_str().unwrap(),
            ],
        );
        let moved = commit_file(&second, "vmsync.toml", "from = 'second'\n");
        let state = tmp.path().join("state");

        let fetched = fetch(&settings(first.to_str().unwrap(), "main"), &state).unwrap();
        assert_eq!(
            fetched.read_text("vmsync.toml").unwrap(),
            "from = 'first'\n"
        );
        assert_eq!(stored_url(&state), first.to_str().unwrap());

        let fetched = fetch(&settings(second.to_str().unwrap(), "main"), &state).unwrap();
        assert_eq!(fetched.id(), moved);
        assert_eq!(
            fetched.read_text("vmsync.toml").unwrap(),
            "from = 'second'\n"
        );
        assert_eq!(stored_url(&state), second.to_str().unwrap());
        let repo = Repository::open_bare(state.join("repo")).unwrap();
        assert_eq!(repo.remotes().unwrap().len(), 1);
    }

    #[test]
    fn local_paths_become_absolute() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            remote_url("./vms").unwrap(),
            cwd.join("vms").to_str().unwrap()
        );
        assert_eq!(remote_url("/srv/vms").unwrap(), "/srv/vms");
        for kept in [
            "ssh://git@example.com/vms.git",
            "https://example.com/vms.git",
            "file:///srv/vms",
            "git@example.com:vms.git",
        ] {
            assert_eq!(remote_url(kept).unwrap(), kept);
        }
        assert!(matches!(
            remote_url(" "),
            Err(FetchError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn passwords_in_urls_are_not_shown() {
        assert_eq!(
            redact("https://bot:hunter2@example.com/vms.git"),
            "https://bot:***@example.com/vms.git"
        );
        for kept in [
            "https://bot@example.com/vms.git",
            "ssh://git@example.com:2222/vms.git",
            "https://example.com/a:b@c",
            "/srv/vms",
        ] {
            assert_eq!(redact(kept), kept);
        }
        let tmp = tempfile::tempdir().unwrap();
        let url = "http://bot:hunter2@127.0.0.1:1/vms.git";
        let err = fetch(&settings(url, "main"), tmp.path()).unwrap_err();
        assert!(matches!(err, FetchError::Fetch { .. }), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    /// Runs `f` on a thread and fails the test if it takes longer than `limit`.
    fn with_timeout<T: Send + 'static>(
        limit: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("timed out after {limit:?} (libgit2 hanging?)"))
    }

    fn fetch_with_timeout(settings: SourceSettings, state: PathBuf) -> Result<String, FetchError> {
        with_timeout(Duration::from_secs(60), move || {
            fetch(&settings, &state).map(|c| c.read_text("vmsync.toml").unwrap())
        })
    }

    #[test]
    fn ssh_with_key_against_real_sshd() {
        let server = SshServer::start();
        let remote = server.dir().join("vms.git");
        let work = server.dir().join("work");
        remote_repo(&work, "over = 'ssh'\n");
        git(
            server.dir(),
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().unwrap(),
                remote.to_str().unwrap(),
            ],
        );
        let url = server.url(&remote);
        let with_key = |key: &Path| SourceSettings {
            ssh_key: Some(key.to_path_buf()),
            ..settings(&url, "main")
        };

        let state = server.dir().join("state");
        let text = fetch_with_timeout(with_key(&server.client_key), state.clone())
            .unwrap_or_else(|e| panic!("{e}\nsshd log:\n{}", server.log()));
        assert_eq!(text, "over = 'ssh'\n");

        // A key the server does not know: refused, after a bounded number of attempts.
        let wrong = server.dir().join("wrong_ed25519");
        keygen(&wrong);
        let err =
            fetch_with_timeout(with_key(&wrong), server.dir().join("state-wrong")).unwrap_err();
        assert!(matches!(err, FetchError::Credentials { .. }), "{err:?}");
        assert!(err.to_string().contains("wrong_ed25519"), "{err}");

        // A key file that does not exist: a clear error naming it.
        let missing = server.dir().join("missing_key");
        let err =
            fetch_with_timeout(with_key(&missing), server.dir().join("state-missing")).unwrap_err();
        assert!(matches!(err, FetchError::Credentials { .. }), "{err:?}");
        assert!(err.to_string().contains("missing_key"), "{err}");

        // Host key checking stays on: a server not in known_hosts is refused.
        let untrusted = SshServer::start_untrusted();
        let untrusted_url = untrusted.url(&remote);
        let err = fetch_with_timeout(
            SourceSettings {
                ssh_key: Some(server.client_key.clone()),
                ..settings(&untrusted_url, "main")
            },
            server.dir().join("state-untrusted"),
        )
        .unwrap_err();
        assert!(matches!(err, FetchError::Fetch { .. }), "{err:?}");
        assert!(err.to_string().contains("hostkey"), "{err}");
    }

    /// A plain-HTTP server on loopback that answers every request with
    /// `401 Basic` and records the `Authorization` headers it was sent.
    fn start_401_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    if let Some(value) = line.strip_prefix("Authorization: ") {
                        record.lock().unwrap().push(value.trim().to_string());
                    }
                    line.clear();
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"vms\"\r\n\
                      Content-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        (port, seen)
    }

    #[test]
    fn https_token_is_offered_a_bounded_number_of_times() {
        let tmp = tempfile::tempdir().unwrap();
        let (port, seen) = start_401_server();
        let token = tmp.path().join("token");
        std::fs::write(&token, "  s3cret \n").unwrap();
        let with_token = |url: &str, file: &Path| SourceSettings {
            token_file: Some(file.to_path_buf()),
            ..settings(url, "main")
        };

        // Refused token: offered MAX_AUTH_ATTEMPTS times, trimmed, as x-access-token.
        let url = format!("http://127.0.0.1:{port}/vms.git");
        let err = fetch_with_timeout(with_token(&url, &token), tmp.path().join("s1")).unwrap_err();
        assert!(matches!(err, FetchError::Credentials { .. }), "{err:?}");
        assert!(err.to_string().contains(token.to_str().unwrap()), "{err}");
        let sent = std::mem::take(&mut *seen.lock().unwrap());
        assert_eq!(
            sent,
            vec!["Basic eC1hY2Nlc3MtdG9rZW46czNjcmV0"; MAX_AUTH_ATTEMPTS as usize]
        );

        // The user name from the URL is kept.
        let url_with_user = format!("http://deploy@127.0.0.1:{port}/vms.git");
        let err = fetch_with_timeout(with_token(&url_with_user, &token), tmp.path().join("s2"))
            .unwrap_err();
        assert!(matches!(err, FetchError::Credentials { .. }), "{err:?}");
        // (libgit2 itself first tries the URL's user with an empty password, "deploy:".)
        let sent = std::mem::take(&mut *seen.lock().unwrap());
        let from_callback: Vec<_> = sent.iter().filter(|h| *h != "Basic ZGVwbG95Og==").collect();
        assert_eq!(
            from_callback,
            vec!["Basic ZGVwbG95OnMzY3JldA=="; MAX_AUTH_ATTEMPTS as usize],
            "{sent:?}"
        );

        // A missing token file, or none configured: clear credential errors.
        let missing = tmp.path().join("no-such-token");
        let err =
            fetch_with_timeout(with_token(&url, &missing), tmp.path().join("s3")).unwrap_err();
        assert!(matches!(err, FetchError::Credentials { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-token"), "{err}");
        let err = fetch_with_timeout(settings(&url, "main"), tmp.path().join("s4")).unwrap_err();
        assert!(matches!(err, FetchError::Credentials { .. }), "{err:?}");
        assert!(err.to_string().contains("token_file"), "{err}");
    }
}
