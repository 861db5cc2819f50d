//! A cache of libvirt schema checks, so an unchanged domain XML is not validated again
//! on every sync (libvirt's RNG validation costs milliseconds per domain; a no-op sync
//! of hundreds of domains would spend most of its time there).
//!
//! Four maps: schema passes keyed by the sha256 of the XML text, summaries of whole
//! files that validated, keyed by their git blob id (so an unchanged file is not even
//! parsed), rendered templates (`template_render::RenderCache`, so an unchanged
//! templated VM is not rendered again), and cloud-init seeds' hashes
//! (`seed_cache::SeedCache`, so an unchanged seed is not built again; no content), and
//! beside them the seed images as seen at the last sync (so an unchanged image is not
//! read again). The cache is tied to the libvirt library version (a new libvirt may bring a
//! new schema) and to a context string (the validation policy: a file that passed under
//! one policy is checked again under another), and kept in
//! `<state_dir>/schema-cache.bin` (binary: it is read on every sync). Only successes are cached, so a rejected XML is always
//! checked again. The test-driver connection is opened only on a miss.
//!
//! A save that learned something rewrites the file whole, atomically, with only the
//! entries this validation used (so the cache holds about one commit's files, not every
//! version of them). It is not fsynced: a file torn by a crash loads as empty, and
//! everything is checked once more.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::desired::domain_xml::DomainSummary;
use crate::desired::resource_xml::ResourceKind;
use crate::desired::schema_check::{SchemaChecker, SchemaError};
use crate::desired::seed_cache::{SeedCache, SeedDigest};
use crate::desired::template_render::{RenderCache, Rendered};
use crate::host::schema_test_driver;
use crate::host::schema_test_driver::TestDriverSchema;
use crate::host::seed_file::SeenSeeds;
use crate::util::fsio;

pub const CACHE_FILE: &str = "schema-cache.bin";

/// The JSON cache an older vmsync wrote, removed when the binary one is first saved.
const OLD_CACHE_FILE: &str = "schema-cache.json";

/// The cache file starts with this line, then the format as 4 bytes (little-endian),
/// then the entries in `postcard`'s encoding: read on every sync, where JSON cost a
/// 500-VM no-op with cloud-init seeds 3 ms (see docs/performance.md).
const MAGIC: &[u8] = b"vmsync schema cache\n";

/// What the entries mean: bumped when any of them changes shape, so that a cache of
/// another vmsync starts empty (postcard, unlike JSON, cannot skip what it does not
/// know).
const CACHE_FORMAT: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    libvirt_version: u32,
    context: String,
    valid: BTreeSet<String>,
    files: BTreeMap<String, DomainSummary>,
    /// Rendered templates (see `template_render::RenderCache`).
    renders: BTreeMap<String, Rendered>,
    /// Cloud-init seeds' hashes, never their content (see `seed_cache`).
    seeds: BTreeMap<String, SeedDigest>,
    /// The seed images as seen at the last sync (see `seed_file::observed_hash_since`).
    seed_files: SeenSeeds,
}

impl CacheFile {
    /// The file's bytes: [`MAGIC`], the format, the entries.
    fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend(CACHE_FORMAT.to_le_bytes());
        postcard::to_extend(self, out).expect("cache entries serialize")
    }

    /// The entries of a cache file: `Ok(None)` for a file of another format (or not a
    /// cache at all), `Err` for a damaged one.
    fn decode(bytes: &[u8]) -> Result<Option<Self>, postcard::Error> {
        let Some(rest) = bytes.strip_prefix(MAGIC) else {
            return Ok(None);
        };
        match rest.split_first_chunk::<4>() {
            Some((format, entries)) if u32::from_le_bytes(*format) == CACHE_FORMAT => {
                postcard::from_bytes(entries).map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// A [`SchemaChecker`] that remembers what passed.
pub struct CachedSchema {
    path: Option<PathBuf>,
    version: u32,
    context: String,
    valid: RefCell<BTreeSet<String>>,
    files: Entries<DomainSummary>,
    renders: Entries<Rendered>,
    seeds: Entries<SeedDigest>,
    seed_files: RefCell<SeenSeeds>,
    /// Whether validation may take seeds from `seeds` (see [`CachedSchema::building_seeds`]).
    seeds_usable: bool,
    added: RefCell<usize>,
    /// Keys of `valid` that this validation looked up or added.
    used_valid: RefCell<BTreeSet<String>>,
    inner: RefCell<Option<TestDriverSchema>>,
    /// With [`CachedSchema::deferring`]: the XML whose check was put off.
    deferred: Option<RefCell<Vec<String>>>,
}

/// One map of the cache, and the keys this validation looked up or added: a save keeps
/// only those.
struct Entries<T> {
    map: RefCell<BTreeMap<String, T>>,
    used: RefCell<BTreeSet<String>>,
}

impl<T: Clone> Entries<T> {
    fn new(map: BTreeMap<String, T>) -> Self {
        Self {
            map: RefCell::new(map),
            used: RefCell::default(),
        }
    }

    fn get(&self, key: &str) -> Option<T> {
        self.used.borrow_mut().insert(key.to_string());
        self.map.borrow().get(key).cloned()
    }

    fn insert(&self, key: &str, value: &T) {
        self.used.borrow_mut().insert(key.to_string());
        self.map.borrow_mut().insert(key.to_string(), value.clone());
    }

    /// The entries this validation used.
    fn kept(&self) -> BTreeMap<String, T> {
        let used = self.used.borrow();
        self.map
            .borrow()
            .iter()
            .filter(|(key, _)| used.contains(*key))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }
}

fn key(xml: &str) -> String {
    hex::encode(Sha256::digest(xml.as_bytes()))
}

impl CachedSchema {
    /// Loads the cache from `state_dir` (`None`: no cache file, e.g. `vmsync validate`).
    /// A missing, unreadable, torn, other-format, other-version or other-context cache
    /// starts empty.
    pub fn load(state_dir: Option<&Path>, context: &str) -> Self {
        let version = virt::connect::Connect::version().unwrap_or(0);
        let path = state_dir.map(|d| d.join(CACHE_FILE));
        let file = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok().map(|bytes| (p, bytes)))
            .and_then(|(p, bytes)| {
                // Damaged: said, and rebuilt (a cache: what it held is checked again).
                CacheFile::decode(&bytes)
                    .map_err(|e| {
                        tracing::warn!(path = %p.display(), error = %e, "the schema cache is damaged; starting it again (a cache: nothing to do)");
                    })
                    .ok()
                    .flatten()
            })
            .filter(|c| c.libvirt_version == version && c.context == context)
            .unwrap_or_default();
        Self {
            path,
            version,
            context: context.to_string(),
            valid: RefCell::new(file.valid),
            files: Entries::new(file.files),
            renders: Entries::new(file.renders),
            seeds: Entries::new(file.seeds),
            seed_files: RefCell::new(file.seed_files),
            seeds_usable: true,
            added: RefCell::new(0),
            used_valid: RefCell::default(),
            inner: RefCell::new(None),
            deferred: None,
        }
    }

    /// A cache whose misses are not checked but collected, for the caller to check
    /// elsewhere ([`check_all`], on another thread) and report with
    /// [`CachedSchema::passed`] before the cache is saved. A file remembered meanwhile
    /// is saved only if the caller saves, which it must not do when a check failed.
    pub fn deferring(mut self) -> Self {
        self.deferred = Some(RefCell::default());
        self
    }

    /// A cache that takes no seed from its file: validation builds the content of every
    /// seed (and remembers their hashes again), for a sync that must write one.
    pub fn building_seeds(mut self) -> Self {
        self.seeds_usable = false;
        self
    }

    /// The seed images as seen at the last sync.
    pub fn seen_seeds(&self) -> std::cell::Ref<'_, SeenSeeds> {
        self.seed_files.borrow()
    }

    /// Remembers the seed images as seen by this sync (saved with the cache when they
    /// changed).
    pub fn saw_seeds(&self, seen: SeenSeeds) {
        if *self.seed_files.borrow() != seen {
            *self.seed_files.borrow_mut() = seen;
            *self.added.borrow_mut() += 1;
        }
    }

    /// The XML whose check was put off, in the order asked.
    pub fn take_deferred(&self) -> Vec<String> {
        self.deferred.as_ref().map(|d| d.take()).unwrap_or_default()
    }

    /// Records that `xml` passed a check made elsewhere ([`check_all`]).
    pub fn passed(&self, xml: &str) {
        let key = key(xml);
        self.used_valid.borrow_mut().insert(key.clone());
        self.valid.borrow_mut().insert(key);
        *self.added.borrow_mut() += 1;
    }

    /// Rewrites the cache file with what this validation used, if it learned anything.
    /// Failures are only logged: a cache that cannot be written costs time, not safety.
    pub fn save(&self) {
        let Some(path) = &self.path else {
            return;
        };
        if *self.added.borrow() == 0 {
            return;
        }
        let (valid, used_valid) = (self.valid.borrow(), self.used_valid.borrow());
        let file = CacheFile {
            libvirt_version: self.version,
            context: self.context.clone(),
            valid: valid.intersection(&used_valid).cloned().collect(),
            files: self.files.kept(),
            renders: self.renders.kept(),
            seeds: self.seeds.kept(),
            seed_files: self.seed_files.borrow().clone(),
        };
        let bytes = file.encode();
        let result = fsio::write_cache_with(path, |out| std::io::Write::write_all(out, &bytes));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "failed to save the schema cache");
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_file(dir.join(OLD_CACHE_FILE));
        }
    }

    /// How many checks ran against libvirt, and files were summarized, since load.
    pub fn misses(&self) -> usize {
        *self.added.borrow()
    }
}

impl SchemaChecker for CachedSchema {
    fn check(&self, xml: &str) -> Result<(), SchemaError> {
        let key = key(xml);
        self.used_valid.borrow_mut().insert(key.clone());
        if self.valid.borrow().contains(&key) {
            return Ok(());
        }
        if let Some(deferred) = &self.deferred {
            deferred.borrow_mut().push(xml.to_string());
            return Ok(());
        }
        let mut inner = self.inner.borrow_mut();
        if inner.is_none() {
            *inner =
                Some(TestDriverSchema::new().map_err(|e| SchemaError::Unavailable(e.to_string()))?);
        }
        inner.as_ref().expect("just created").check(xml)?;
        self.valid.borrow_mut().insert(key);
        *self.added.borrow_mut() += 1;
        Ok(())
    }

    fn check_resource(&self, kind: ResourceKind, xml: &str) -> Result<(), SchemaError> {
        schema_test_driver::check_xml(kind, xml)
    }

    fn known(&self, content_id: &str) -> Option<DomainSummary> {
        self.files.get(content_id)
    }

    fn remember(&self, content_id: &str, summary: &DomainSummary) {
        self.files.insert(content_id, summary);
        *self.added.borrow_mut() += 1;
    }

    fn render_cache(&self) -> Option<&dyn RenderCache> {
        Some(self)
    }

    fn seed_cache(&self) -> Option<&dyn SeedCache> {
        Some(self)
    }
}

/// Seeds are remembered like renders: saved when this validation used them.
impl SeedCache for CachedSchema {
    fn seed(&self, key: &str) -> Option<SeedDigest> {
        self.seeds.get(key).filter(|_| self.seeds_usable)
    }

    fn remember_seed(&self, key: &str, digest: &SeedDigest) {
        self.seeds.insert(key, digest);
        *self.added.borrow_mut() += 1;
    }
}

/// Renders are remembered like file summaries: saved with the cache when this validation
/// used them, dropped otherwise.
impl RenderCache for CachedSchema {
    fn rendered(&self, key: &str) -> Option<Rendered> {
        self.renders.get(key)
    }

    fn remember_rendered(&self, key: &str, rendered: &Rendered) {
        self.renders.insert(key, rendered);
        *self.added.borrow_mut() += 1;
    }
}

/// libvirt's verdict on each of `xmls`, in order, from a private test driver made here:
/// for a sync to check the XML a [`CachedSchema::deferring`] validation put off, on a
/// thread of its own while the host is observed.
pub fn check_all(xmls: &[String]) -> Result<Vec<Result<(), SchemaError>>, SchemaError> {
    if xmls.is_empty() {
        return Ok(Vec::new());
    }
    let schema = TestDriverSchema::new().map_err(|e| SchemaError::Unavailable(e.to_string()))?;
    Ok(xmls.iter().map(|xml| schema.check(xml)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "<domain type='kvm'><name>c</name><memory>131072</memory><os><type>hvm</type></os></domain>";

    #[test]
    fn passes_are_remembered_across_loads_and_failures_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CachedSchema::load(Some(dir.path()), "policy");
        cache.check(GOOD).unwrap();
        let bad = GOOD
            .replace("<memory>", "<memroy>")
            .replace("</memory>", "</memroy>");
        assert!(cache.check(&bad).is_err());
        assert_eq!(cache.misses(), 1);
        cache.save();

        let again = CachedSchema::load(Some(dir.path()), "policy");
        again.check(GOOD).unwrap();
        assert_eq!(again.misses(), 0, "served from the cache");
        assert!(
            again.inner.borrow().is_none(),
            "no libvirt connection needed"
        );
        assert!(
            again.check(&bad).is_err(),
            "a failure is checked again, never cached"
        );
    }

    #[test]
    fn file_summaries_are_remembered_per_context() {
        let dir = tempfile::tempdir().unwrap();
        let summary = crate::desired::domain_xml::summarize(GOOD).unwrap();
        let cache = CachedSchema::load(Some(dir.path()), "policy");
        assert_eq!(cache.known("blob:1"), None);
        cache.remember("blob:1", &summary);
        cache.save();
        assert_eq!(
            CachedSchema::load(Some(dir.path()), "policy").known("blob:1"),
            Some(summary)
        );
        assert_eq!(
            CachedSchema::load(Some(dir.path()), "other policy").known("blob:1"),
            None
        );
    }

    #[test]
    fn a_save_keeps_only_what_this_validation_used() {
        let dir = tempfile::tempdir().unwrap();
        let summary = crate::desired::domain_xml::summarize(GOOD).unwrap();
        let first = CachedSchema::load(Some(dir.path()), "policy");
        for id in ["blob:old", "blob:kept"] {
            assert_eq!(first.known(id), None);
            first.remember(id, &summary);
        }
        first.check(GOOD).unwrap();
        first.save();

        // The next commit changed one file: "blob:old" is gone, "blob:new" arrived.
        let second = CachedSchema::load(Some(dir.path()), "policy");
        assert!(second.known("blob:kept").is_some());
        assert_eq!(second.known("blob:new"), None);
        second.remember("blob:new", &summary);
        second.save();

        let third = CachedSchema::load(Some(dir.path()), "policy");
        let saved = CacheFile::decode(&std::fs::read(dir.path().join(CACHE_FILE)).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            saved.files.keys().collect::<Vec<_>>(),
            ["blob:kept", "blob:new"]
        );
        assert!(
            saved.valid.is_empty(),
            "GOOD was not checked again: {saved:?}"
        );
        assert!(third.known("blob:old").is_none());
    }

    #[test]
    fn a_torn_or_empty_cache_file_starts_empty() {
        // The cache is not fsynced: after a crash it may be empty or cut short.
        let dir = tempfile::tempdir().unwrap();
        let cache = CachedSchema::load(Some(dir.path()), "policy");
        cache.check(GOOD).unwrap();
        cache.save();
        let path = dir.path().join(CACHE_FILE);
        let full = std::fs::read(&path).unwrap();
        for torn in [&full[..0], &full[..full.len() / 2]] {
            std::fs::write(&path, torn).unwrap();
            let again = CachedSchema::load(Some(dir.path()), "policy");
            again.check(GOOD).unwrap();
            assert_eq!(again.misses(), 1, "checked again");
        }
    }

    #[test]
    fn a_cache_of_another_format_starts_empty_and_the_json_one_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = CacheFile {
            libvirt_version: virt::connect::Connect::version().unwrap_or(0),
            context: "policy".into(),
            valid: [key(GOOD)].into(),
            ..Default::default()
        };
        let current = file.encode();
        let mut other = current.clone();
        other[MAGIC.len()] ^= 0xff;
        for (bytes, misses) in [(other, 1), (current, 0)] {
            std::fs::write(dir.path().join(CACHE_FILE), &bytes).unwrap();
            let cache = CachedSchema::load(Some(dir.path()), "policy");
            cache.check(GOOD).unwrap();
            assert_eq!(cache.misses(), misses);
        }
        // The JSON cache of an older vmsync goes at the first save.
        let old = dir.path().join(OLD_CACHE_FILE);
        std::fs::write(&old, "{}").unwrap();
        let cache = CachedSchema::load(Some(dir.path()), "policy");
        cache.remember(
            "blob:1",
            &crate::desired::domain_xml::summarize(GOOD).unwrap(),
        );
        cache.save();
        assert!(!old.exists());
    }

    #[test]
    fn another_libvirt_version_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let stale = CacheFile {
            libvirt_version: 1,
            valid: [key(GOOD)].into(),
            ..Default::default()
        };
        std::fs::write(dir.path().join(CACHE_FILE), stale.encode()).unwrap();
        let cache = CachedSchema::load(Some(dir.path()), "policy");
        cache.check(GOOD).unwrap();
        assert_eq!(cache.misses(), 1);
    }
}
