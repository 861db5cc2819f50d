//! A cache of libvirt schema checks, so an unchanged domain XML is not validated again
//! on every sync (libvirt's RNG validation costs milliseconds per domain; a no-op sync
//! of hundreds of domains would spend most of its time there).
//!
//! Two maps: schema passes keyed by the sha256 of the XML text, and summaries of whole
//! files that validated, keyed by their git blob id (so an unchanged file is not even
//! parsed). The cache is tied to the libvirt library version (a new libvirt may bring a
//! new schema) and to a context string (the validation policy: a file that passed under
//! one policy is checked again under another), and kept in
//! `<state_dir>/schema-cache.json`. Only successes are cached, so a rejected XML is always
//! checked again. The test-driver connection is opened only on a miss.
//!
//! The file is one JSON object, then one line per later save with what that save
//! learned (a sync that changed one VM appends two entries instead of rewriting a
//! thousand). A save rewrites the file whole, with only the entries the last validation
//! used (so the cache holds about one commit's files, not every version of them), when
//! there is none yet, after [`MAX_APPENDS`] appended lines, or once the entries the
//! validation did not use outnumber a quarter of those it did. Nothing is fsynced: a
//! line cut short by a crash is skipped on load, a cut first line empties the cache.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain_xml::DomainSummary;
use crate::hypervisor::{SchemaChecker, TestDriverSchema};

pub const CACHE_FILE: &str = "schema-cache.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    libvirt_version: u32,
    #[serde(default)]
    context: String,
    valid: BTreeSet<String>,
    #[serde(default)]
    files: BTreeMap<String, DomainSummary>,
}

/// What one save learned: a line appended to the cache file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheLine {
    #[serde(default)]
    valid: BTreeSet<String>,
    #[serde(default)]
    files: BTreeMap<String, DomainSummary>,
}

/// Appended lines after which a save rewrites the cache file whole.
pub const MAX_APPENDS: usize = 32;

/// A [`SchemaChecker`] that remembers what passed.
pub struct CachedSchema {
    path: Option<PathBuf>,
    version: u32,
    context: String,
    valid: RefCell<BTreeSet<String>>,
    files: RefCell<BTreeMap<String, DomainSummary>>,
    added: RefCell<usize>,
    /// What this validation learned (the line a save appends).
    learned: RefCell<CacheLine>,
    /// Lines appended to the file after its first; `None`: no usable file.
    appended: std::cell::Cell<Option<usize>>,
    /// Keys of `valid` and `files` that this validation looked up or added.
    used_valid: RefCell<BTreeSet<String>>,
    used_files: RefCell<BTreeSet<String>>,
    inner: RefCell<Option<TestDriverSchema>>,
}

fn key(xml: &str) -> String {
    hex::encode(Sha256::digest(xml.as_bytes()))
}

impl CachedSchema {
    /// Loads the cache from `state_dir` (`None`: no cache file, e.g. `vmsync validate`).
    /// A missing, unreadable, other-version or other-context cache starts empty.
    pub fn load(state_dir: Option<&Path>, context: &str) -> Self {
        let version = virt::connect::Connect::version().unwrap_or(0);
        let path = state_dir.map(|d| d.join(CACHE_FILE));
        let bytes = path.as_ref().and_then(|p| std::fs::read(p).ok());
        let mut lines = bytes.iter().flat_map(|b| b.split(|&c| c == b'\n'));
        let first = lines
            .next()
            .and_then(|line| serde_json::from_slice::<CacheFile>(line).ok())
            .filter(|c| c.libvirt_version == version && c.context == context);
        let appended = first.as_ref().map(|_| lines.clone().count());
        let mut file = first.unwrap_or_default();
        if appended.is_some() {
            // Lines cut short (a crash while appending) are skipped.
            for line in lines.filter_map(|l| serde_json::from_slice::<CacheLine>(l).ok()) {
                file.valid.extend(line.valid);
                file.files.extend(line.files);
            }
        }
        Self {
            path,
            version,
            context: context.to_string(),
            valid: RefCell::new(file.valid),
            files: RefCell::new(file.files),
            added: RefCell::new(0),
            learned: RefCell::default(),
            appended: std::cell::Cell::new(appended),
            used_valid: RefCell::default(),
            used_files: RefCell::default(),
            inner: RefCell::new(None),
        }
    }

    /// Writes what the cache learned since it was loaded or last saved, if anything:
    /// one line appended, or the file rewritten whole (atomically) with only what this
    /// validation used. Failures are only logged.
    pub fn save(&self) {
        let Some(path) = &self.path else {
            return;
        };
        let mut learned = self.learned.borrow_mut();
        if learned.valid.is_empty() && learned.files.is_empty() {
            return;
        }
        let (valid, files) = (self.valid.borrow(), self.files.borrow());
        let (used_valid, used_files) = (self.used_valid.borrow(), self.used_files.borrow());
        let used = valid.iter().filter(|k| used_valid.contains(*k)).count()
            + files.keys().filter(|k| used_files.contains(*k)).count();
        let unused = valid.len() + files.len() - used;
        if let Some(appended) = self.appended.get()
            && appended < MAX_APPENDS
            && unused <= used / 4
        {
            let mut line = b"\n".to_vec();
            let written = serde_json::to_writer(&mut line, &*learned)
                .map_err(std::io::Error::from)
                .and_then(|()| {
                    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
                    std::io::Write::write_all(&mut file, &line)
                });
            match written {
                Ok(()) => {
                    self.appended.set(Some(appended + 1));
                    *learned = CacheLine::default();
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "failed to append to the schema cache"),
            }
        }
        let file = CacheFile {
            libvirt_version: self.version,
            context: self.context.clone(),
            valid: valid.intersection(&used_valid).cloned().collect(),
            files: files
                .iter()
                .filter(|(id, _)| used_files.contains(*id))
                .map(|(id, summary)| (id.clone(), summary.clone()))
                .collect(),
        };
        let result = crate::state::write_cache_with(path, |out| {
            let mut out = std::io::BufWriter::new(out);
            serde_json::to_writer(&mut out, &file)?;
            std::io::Write::flush(&mut out)
        });
        match result {
            Ok(()) => {
                self.appended.set(Some(0));
                *learned = CacheLine::default();
            }
            Err(e) => tracing::warn!(error = %e, "failed to save the schema cache"),
        }
    }

    /// Records that `xml` passed a check made elsewhere (`schema_check`), and the
    /// summary of its file.
    pub fn record_pass(&self, xml: &str, content_id: Option<&str>, summary: &DomainSummary) {
        self.learn_pass(key(xml));
        if let Some(id) = content_id {
            self.remember(id, summary);
        }
    }

    fn learn_pass(&self, key: String) {
        self.valid.borrow_mut().insert(key.clone());
        self.used_valid.borrow_mut().insert(key.clone());
        self.learned.borrow_mut().valid.insert(key);
        *self.added.borrow_mut() += 1;
    }

    /// How many checks ran against libvirt (misses) since load.
    pub fn misses(&self) -> usize {
        *self.added.borrow()
    }
}

impl SchemaChecker for CachedSchema {
    fn check(&self, xml: &str) -> Result<(), String> {
        let key = key(xml);
        self.used_valid.borrow_mut().insert(key.clone());
        if self.valid.borrow().contains(&key) {
            return Ok(());
        }
        let mut inner = self.inner.borrow_mut();
        if inner.is_none() {
            *inner = Some(TestDriverSchema::new().map_err(|e| e.to_string())?);
        }
        inner.as_ref().expect("just created").check(xml)?;
        self.learn_pass(key);
        Ok(())
    }

    fn passed(&self, xml: &str) -> bool {
        let key = key(xml);
        self.used_valid.borrow_mut().insert(key.clone());
        self.valid.borrow().contains(&key)
    }

    fn known(&self, content_id: &str) -> Option<DomainSummary> {
        self.used_files.borrow_mut().insert(content_id.to_string());
        self.files.borrow().get(content_id).cloned()
    }

    fn remember(&self, content_id: &str, summary: &DomainSummary) {
        self.used_files.borrow_mut().insert(content_id.to_string());
        self.files
            .borrow_mut()
            .insert(content_id.to_string(), summary.clone());
        self.learned
            .borrow_mut()
            .files
            .insert(content_id.to_string(), summary.clone());
        *self.added.borrow_mut() += 1;
    }
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
        let summary = crate::domain_xml::summarize(GOOD).unwrap();
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
        let summary = crate::domain_xml::summarize(GOOD).unwrap();
        let first = CachedSchema::load(Some(dir.path()), "policy");
        for id in ["blob:old", "blob:kept"] {
            assert_eq!(first.known(id), None);
            first.remember(id, &summary);
        }
        first.record_pass(GOOD, None, &summary);
        first.save();

        // The next commit changed one file: "blob:old" is gone, "blob:new" arrived.
        let second = CachedSchema::load(Some(dir.path()), "policy");
        assert!(second.known("blob:kept").is_some());
        assert_eq!(second.known("blob:new"), None);
        second.remember("blob:new", &summary);
        assert!(!second.passed("<domain/>"), "looked up, never passed");
        second.save();

        let third = CachedSchema::load(Some(dir.path()), "policy");
        let saved: CacheFile =
            serde_json::from_slice(&std::fs::read(dir.path().join(CACHE_FILE)).unwrap()).unwrap();
        assert_eq!(
            saved.files.keys().collect::<Vec<_>>(),
            ["blob:kept", "blob:new"]
        );
        assert!(saved.valid.is_empty(), "GOOD was not looked up: {saved:?}");
        assert!(third.known("blob:old").is_none());
    }

    fn lines(dir: &Path) -> usize {
        std::fs::read(dir.join(CACHE_FILE))
            .unwrap()
            .split(|&c| c == b'\n')
            .count()
    }

    /// A sync that sees every file of the last commit and one new file.
    fn sync_one_new_file(dir: &Path, known: &[String], new: &str, summary: &DomainSummary) {
        let cache = CachedSchema::load(Some(dir), "policy");
        assert!(cache.passed(GOOD));
        for id in known {
            assert!(cache.known(id).is_some(), "{id} remembered");
        }
        assert_eq!(cache.known(new), None);
        cache.remember(new, summary);
        cache.save();
    }

    #[test]
    fn a_change_appends_a_line_and_every_so_often_a_save_rewrites_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let summary = crate::domain_xml::summarize(GOOD).unwrap();
        let mut ids: Vec<String> = (0..8).map(|i| format!("blob:{i}")).collect();
        let first = CachedSchema::load(Some(dir.path()), "policy");
        for id in &ids {
            first.remember(id, &summary);
        }
        first.record_pass(GOOD, None, &summary);
        first.save();
        assert_eq!(lines(dir.path()), 1);

        // One file changed: its new version is appended, the old one stays for now.
        sync_one_new_file(dir.path(), &ids[1..], "blob:new-0", &summary);
        assert_eq!(lines(dir.path()), 2, "appended, not rewritten");
        let text = std::fs::read_to_string(dir.path().join(CACHE_FILE)).unwrap();
        let line: CacheLine = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(line.files.keys().collect::<Vec<_>>(), ["blob:new-0"]);
        ids.push("blob:new-0".into());
        let again = CachedSchema::load(Some(dir.path()), "policy");
        assert!(again.known("blob:0").is_some() && again.known("blob:new-0").is_some());

        // After MAX_APPENDS lines the next save writes the file whole, with only what
        // its validation used.
        for k in 1..MAX_APPENDS {
            sync_one_new_file(dir.path(), &ids, &format!("blob:new-{k}"), &summary);
            ids.push(format!("blob:new-{k}"));
        }
        assert_eq!(lines(dir.path()), 1 + MAX_APPENDS);
        sync_one_new_file(dir.path(), &ids[1..], "blob:last", &summary);
        assert_eq!(lines(dir.path()), 1, "rewritten");
        let cache = CachedSchema::load(Some(dir.path()), "policy");
        assert!(cache.known("blob:0").is_none(), "unused, dropped");
        assert!(cache.known("blob:last").is_some() && cache.passed(GOOD));
    }

    #[test]
    fn a_save_rewrites_when_unused_entries_pile_up() {
        let dir = tempfile::tempdir().unwrap();
        let summary = crate::domain_xml::summarize(GOOD).unwrap();
        let first = CachedSchema::load(Some(dir.path()), "policy");
        let ids: Vec<String> = (0..8).map(|i| format!("blob:{i}")).collect();
        for id in &ids {
            first.remember(id, &summary);
        }
        first.save();
        // Half the files replaced at once: more unused entries than a quarter of the
        // used ones.
        let second = CachedSchema::load(Some(dir.path()), "policy");
        for id in &ids[..4] {
            assert!(second.known(id).is_some());
            second.remember(&format!("{id}-new"), &summary);
        }
        second.save();
        assert_eq!(lines(dir.path()), 1);
        assert!(
            CachedSchema::load(Some(dir.path()), "policy")
                .known("blob:7")
                .is_none()
        );
    }

    #[test]
    fn an_appended_line_cut_short_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let summary = crate::domain_xml::summarize(GOOD).unwrap();
        let ids: Vec<String> = (0..8).map(|i| format!("blob:{i}")).collect();
        let first = CachedSchema::load(Some(dir.path()), "policy");
        for id in &ids {
            first.remember(id, &summary);
        }
        first.record_pass(GOOD, None, &summary);
        first.save();
        sync_one_new_file(dir.path(), &ids, "blob:torn", &summary);
        // A crash in the middle of that append.
        let path = dir.path().join(CACHE_FILE);
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 10]).unwrap();
        let cache = CachedSchema::load(Some(dir.path()), "policy");
        assert!(
            cache.known("blob:torn").is_none(),
            "the cut line is skipped"
        );
        assert!(cache.known("blob:3").is_some() && cache.passed(GOOD));
        // The next append starts on a line of its own and is read.
        sync_one_new_file(dir.path(), &ids, "blob:after", &summary);
        let cache = CachedSchema::load(Some(dir.path()), "policy");
        assert!(cache.known("blob:after").is_some());
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
    fn another_libvirt_version_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let stale = CacheFile {
            libvirt_version: 1,
            valid: [key(GOOD)].into(),
            ..Default::default()
        };
        std::fs::write(
            dir.path().join(CACHE_FILE),
            serde_json::to_vec(&stale).unwrap(),
        )
        .unwrap();
        let cache = CachedSchema::load(Some(dir.path()), "policy");
        cache.check(GOOD).unwrap();
        assert_eq!(cache.misses(), 1);
    }
}
