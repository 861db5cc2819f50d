//! The seed cache: a VM's seed hash remembered across syncs, so that an unchanged seed
//! is not rendered, decrypted, hashed or placed in its domain XML again on every sync.
//!
//! The key is everything a seed is made of: the cache format and vmsync's version, the
//! VM's name, the host name templates see, the VM's params, the seed directory, the path
//! and blob id of each of its cloud-init files, the identity and its version (a replaced
//! host key decrypts again, so a secret the new key cannot open fails validation as
//! before), and the content of the domain XML (where the CD-ROM goes). The entry holds
//! the seed's hash, whether it holds a secret, where the CD-ROM goes ([`Slot`]), and the
//! blob id of every other file the renders had loaded (includes, imports, the secrets
//! read): it holds while each of them is unchanged.
//!
//! Never the content: a seed taken from the cache has none ([`SeedSpec::content`]), which
//! is enough to plan and to tell an unchanged seed on the host. A sync that must write
//! such a seed validates the commit again without the cache (`agent::sync`).

use std::cell::RefCell;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::desired::cloud_init_spec::CloudInitSpec;
use crate::desired::domain_xml;
use crate::desired::manifest::MANIFEST_FILE;
use crate::desired::seed_spec::{self, SeedInputs, SeedProblem, SeedSpec, Slot};
use crate::repo::files::RepoFiles;

/// Bumped when what a seed is made of changes, so entries of another vmsync are not used.
const SEED_CACHE_FORMAT: &str = "vmsync-seed-cache-1";

/// A seed remembered: no content, only what planning needs and what it depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedDigest {
    pub hash: String,
    pub has_secret: bool,
    pub slot: Slot,
    /// `domain_xml::fingerprint` of the domain XML with the seed's CD-ROM.
    pub fingerprint: String,
    /// Content id of each file (besides the VM's own cloud-init files, which are in the
    /// key) the renders had loaded, found missing or read as a secret.
    pub deps: Vec<(String, Option<String>)>,
}

/// Where seeds are remembered across syncs (the schema cache of the state directory).
pub trait SeedCache {
    fn seed(&self, key: &str) -> Option<SeedDigest>;
    fn remember_seed(&self, key: &str, digest: &SeedDigest);
}

/// What a lookup needs besides the seed's inputs.
pub struct CacheUse<'a> {
    pub cache: &'a dyn SeedCache,
    /// The domain XML's content id (blob id, or the id of the rendered text); `None`:
    /// the XML's fingerprint stands for it.
    pub xml_id: Option<&'a str>,
    /// `Secrets::version`: the identity and its version (`None`: format only).
    pub identity: Option<&'a str>,
    /// Content ids looked up so far in this validation (many VMs share their
    /// cloud-init files and secrets).
    pub ids: &'a RefCell<HashMap<String, Option<String>>>,
}

impl CacheUse<'_> {
    /// The content id of `path` in `files`, looked up once per validation.
    fn id(&self, files: &dyn RepoFiles, path: &str) -> Option<String> {
        if let Some(id) = self.ids.borrow().get(path) {
            return id.clone();
        }
        let id = files.content_id(path);
        self.ids.borrow_mut().insert(path.to_string(), id.clone());
        id
    }
}

/// The VM's cloud-init files as named in `[vm.cloud_init]`.
fn spec_files(spec: &CloudInitSpec) -> impl Iterator<Item = &str> {
    std::iter::once(spec.user_data.as_str())
        .chain(spec.meta_data.as_deref())
        .chain(spec.network_config.as_deref())
}

/// The key of the VM's seed; `None` when a cloud-init file has no content id (a
/// checkout on disk, or a file that is missing: that is a problem to report).
fn key(inputs: &SeedInputs, spec: &CloudInitSpec, xml: &str, with: &CacheUse) -> Option<String> {
    let mut hash = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    part(SEED_CACHE_FORMAT.as_bytes());
    part(env!("CARGO_PKG_VERSION").as_bytes());
    part(inputs.vars.vm.as_bytes());
    part(inputs.vars.host.unwrap_or("\u{0}").as_bytes());
    part(&serde_json::to_vec(inputs.vars.params).expect("json values serialize"));
    part(inputs.seed_dir.as_os_str().as_encoded_bytes());
    part(with.identity.unwrap_or("\u{0}").as_bytes());
    match with.xml_id {
        Some(id) => part(id.as_bytes()),
        None => part(domain_xml::fingerprint(xml).as_bytes()),
    }
    for (name, path) in ["user_data", "meta_data", "network_config"]
        .into_iter()
        .zip([
            Some(spec.user_data.as_str()),
            spec.meta_data.as_deref(),
            spec.network_config.as_deref(),
        ])
    {
        part(name.as_bytes());
        if let Some(path) = path {
            part(path.as_bytes());
            part(with.id(inputs.files, path)?.as_bytes());
        }
    }
    Some(format!("seed:{}", hex::encode(hash.finalize())))
}

/// The seed a cache entry stands for (without content).
fn from_digest(inputs: &SeedInputs, spec: &CloudInitSpec, digest: SeedDigest) -> SeedSpec {
    SeedSpec {
        path: seed_spec::seed_path(inputs.seed_dir, inputs.vars.vm),
        target: digest.slot.target,
        content: None,
        instance_id: seed_spec::instance_id(&digest.hash),
        hash: digest.hash,
        on_change: spec.on_change,
        has_secret: digest.has_secret,
    }
}

/// A VM's seed and the domain XML vmsync defines for it.
#[derive(Debug)]
pub struct Seeded {
    pub seed: SeedSpec,
    /// The domain XML with the seed's CD-ROM.
    pub xml: String,
    /// `domain_xml::fingerprint` of `xml`.
    pub fingerprint: String,
}

/// The VM's seed and its domain XML with the seed's CD-ROM: from the cache when its entry
/// still holds, else built, placed, and remembered.
pub fn seed(
    inputs: &SeedInputs,
    spec: &CloudInitSpec,
    xml: &str,
    cached: Option<&CacheUse>,
) -> Result<Seeded, SeedProblem> {
    let key = cached.and_then(|with| Some((with, key(inputs, spec, xml, with)?)));
    if let Some((with, key)) = &key
        && let Some(digest) = with.cache.seed(key)
        && digest
            .deps
            .iter()
            .all(|(path, id)| with.id(inputs.files, path) == *id)
    {
        let slot = digest.slot.clone();
        let fingerprint = digest.fingerprint.clone();
        let seed = from_digest(inputs, spec, digest);
        if let Some(placed) = seed_spec::place(xml, &slot, &seed) {
            return Ok(Seeded {
                seed,
                xml: placed,
                fingerprint,
            });
        }
    }
    let mut seed = seed_spec::build(inputs, spec)?;
    let (placed, slot) = seed_spec::attach(xml, &mut seed).map_err(|e| seed_spec::SeedProblem {
        field: "cloud_init".into(),
        file: MANIFEST_FILE.into(),
        line: None,
        message: e.message,
    })?;
    let fingerprint = domain_xml::fingerprint(&placed);
    if let Some((with, key)) = key {
        let own: Vec<&str> = spec_files(spec).collect();
        let deps = inputs
            .renderer
            .deps()
            .into_iter()
            .filter(|(path, _)| !own.contains(&path.as_str()))
            .collect();
        with.cache.remember_seed(
            &key,
            &SeedDigest {
                hash: seed.hash.clone(),
                has_secret: seed.has_secret,
                slot,
                fingerprint: fingerprint.clone(),
                deps,
            },
        );
    }
    Ok(Seeded {
        seed,
        xml: placed,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::desired::cloud_init_spec::SeedOnChange;
    use crate::desired::secret_port::{Plaintext, SecretOpener, Secrets};
    use crate::desired::template_render::{Params, Renderer, Vars};
    use crate::repo::files::MemoryFiles;

    #[derive(Default)]
    struct Memory {
        entries: RefCell<BTreeMap<String, SeedDigest>>,
    }

    impl SeedCache for Memory {
        fn seed(&self, key: &str) -> Option<SeedDigest> {
            self.entries.borrow().get(key).cloned()
        }

        fn remember_seed(&self, key: &str, digest: &SeedDigest) {
            self.entries
                .borrow_mut()
                .insert(key.to_string(), digest.clone());
        }
    }

    /// Decrypts with an x25519 key; counts its decryptions.
    struct Opener {
        key: age::x25519::Identity,
        opened: Mutex<usize>,
    }

    impl SecretOpener for Opener {
        fn open(&self, _file: &str, ciphertext: &[u8]) -> Result<Plaintext, String> {
            *self.opened.lock().unwrap() += 1;
            let reader = age::armor::ArmoredReader::new(ciphertext);
            let decryptor = age::Decryptor::new(reader).map_err(|e| e.to_string())?;
            let mut reader = decryptor
                .decrypt(std::iter::once(&self.key as &dyn age::Identity))
                .map_err(|e| e.to_string())?;
            let mut plain = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut plain).map_err(|e| e.to_string())?;
            Ok(Plaintext(plain))
        }

        fn identity(&self) -> String {
            "test-key".into()
        }
    }

    const SECRET: &str = "pw-5f0c1e";
    const XML: &str = "<domain type='kvm'>\n  <name>web</name>\n  <devices>\n    <disk type='file' device='disk'><source file='/x'/><target dev='sda' bus='sata'/></disk>\n  </devices>\n</domain>\n";

    struct Setup {
        files: Vec<(String, String)>,
        params: Params,
        host: &'static str,
        identity: &'static str,
        xml: String,
    }

    impl Setup {
        fn new(opener: &Opener) -> Self {
            let secret =
                age::encrypt_and_armor(&opener.key.to_public(), SECRET.as_bytes()).unwrap();
            Self {
                files: vec![
                    (
                        "u.yaml.j2".into(),
                        "#cloud-config\nhostname: {{ vm.name }}\n{% include 'part.yaml' %}\npw: {{ secret('s/pw.age') }}\n".into(),
                    ),
                    ("part.yaml".into(), "packages: [htop]".into()),
                    ("s/pw.age".into(), secret),
                ],
                params: Params::new(),
                host: "hv1",
                identity: "v1",
                xml: XML.into(),
            }
        }

        /// The seed and placed XML, through `cache`.
        fn seed(&self, opener: &Arc<Opener>, cache: &Memory) -> (SeedSpec, String) {
            self.try_seed(opener, cache).unwrap()
        }

        fn try_seed(
            &self,
            opener: &Arc<Opener>,
            cache: &Memory,
        ) -> Result<(SeedSpec, String), SeedProblem> {
            let files = MemoryFiles::new(self.files.clone());
            let renderer = Renderer::for_text(&files, Secrets::with(opener.clone()));
            let inputs = SeedInputs {
                files: &files,
                renderer: &renderer,
                vars: Vars {
                    vm: "web",
                    host: Some(self.host),
                    params: &self.params,
                },
                seed_dir: Path::new("/seeds"),
            };
            let spec = CloudInitSpec {
                user_data: "u.yaml.j2".into(),
                meta_data: None,
                network_config: None,
                on_change: SeedOnChange::NextBoot,
            };
            let ids = RefCell::default();
            let with = CacheUse {
                cache,
                xml_id: None,
                identity: Some(self.identity),
                ids: &ids,
            };
            seed(&inputs, &spec, &self.xml, Some(&with)).map(|s| {
                assert_eq!(s.fingerprint, domain_xml::fingerprint(&s.xml));
                (s.seed, s.xml)
            })
        }
    }

    /// A change of one input of a seed.
    type Change = Box<dyn Fn(&mut Setup)>;

    fn opener() -> Arc<Opener> {
        Arc::new(Opener {
            key: age::x25519::Identity::generate(),
            opened: Mutex::new(0),
        })
    }

    #[test]
    fn a_hit_gives_the_same_seed_and_xml_without_content_or_decryption() {
        let opener = opener();
        let cache = Memory::default();
        let setup = Setup::new(&opener);
        let (built, built_xml) = setup.seed(&opener, &cache);
        assert!(built.content.is_some());
        assert_eq!(*opener.opened.lock().unwrap(), 1);
        let (hit, hit_xml) = setup.seed(&opener, &cache);
        assert_eq!(*opener.opened.lock().unwrap(), 1, "a hit decrypts nothing");
        assert!(hit.content.is_none());
        assert_eq!(hit_xml, built_xml);
        let without_content = SeedSpec {
            content: None,
            ..built
        };
        assert_eq!(hit, without_content);
        // Nothing of the content is remembered.
        let stored = serde_json::to_string(&*cache.entries.borrow()).unwrap();
        for text in [SECRET, "htop", "hostname"] {
            assert!(!stored.contains(text), "{stored}");
        }
    }

    #[test]
    fn every_input_of_a_seed_is_in_its_key_or_deps() {
        let opener = opener();
        let base = Setup::new(&opener);
        let changes: Vec<(&str, Change)> = vec![
            ("user-data", Box::new(|s| s.files[0].1.push_str("x: 1\n"))),
            (
                "an included file",
                Box::new(|s| s.files[1].1.push_str(", curl")),
            ),
            (
                "the secret",
                Box::new(|s| {
                    let opener_key = age::x25519::Identity::generate();
                    s.files[2].1 =
                        age::encrypt_and_armor(&opener_key.to_public(), b"other").unwrap();
                }),
            ),
            (
                "params",
                Box::new(|s| {
                    s.params.insert("size".into(), 2.into());
                }),
            ),
            ("the host", Box::new(|s| s.host = "hv2")),
            ("the identity", Box::new(|s| s.identity = "v2")),
            (
                "the domain XML",
                Box::new(|s| s.xml = s.xml.replace("dev='sda'", "dev='sdb'")),
            ),
        ];
        for (what, change) in changes {
            let cache = Memory::default();
            base.seed(&opener, &cache);
            let mut changed = Setup::new(&opener);
            changed.files = base.files.clone();
            change(&mut changed);
            match changed.try_seed(&opener, &cache) {
                Ok((seed, xml)) => {
                    assert!(seed.content.is_some(), "{what}: taken from the cache");
                    if what == "the domain XML" {
                        assert_eq!(seed.target, "sda", "{xml}");
                    }
                    // Remembered: the next sync of the changed commit is a hit.
                    let (again, again_xml) = changed.seed(&opener, &cache);
                    assert!(again.content.is_none(), "{what}");
                    assert_eq!((again.hash, again_xml), (seed.hash, xml), "{what}");
                }
                // A secret this key cannot open: decrypted again, and refused.
                Err(p) => {
                    assert_eq!(what, "the secret", "{p:?}");
                    assert_eq!(p.file, "u.yaml.j2", "{p:?}");
                }
            }
        }
    }
}
