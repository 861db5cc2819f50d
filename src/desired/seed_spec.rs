//! A VM's cloud-init NoCloud seed as this host should have it: the files (`user-data`,
//! `meta-data`, `network-config`) read or rendered from the commit, their hash (which
//! names the seed and gives the instance-id), where the seed lives on the host, and the
//! read-only CD-ROM that attaches it, added to the domain XML vmsync defines.
//!
//! The content may hold secrets: [`SeedSpec`]'s `Debug` shows no content, and nothing
//! but the image written to the host ever carries it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::desired::cloud_init_spec::{CloudInitSpec, SeedOnChange};
use crate::desired::domain_xml::{self, XmlProblem};
use crate::desired::template_render::{RenderError, Renderer, Vars};
use crate::repo::files::RepoFiles;
use crate::util::iso9660;

/// `[policy] seed_dir` when the host config does not say.
pub const DEFAULT_SEED_DIR: &str = "/var/lib/libvirt/images/vmsync-seeds";

/// A cloud-init file ending in this is a template.
pub const TEMPLATE_SUFFIX: &str = ".j2";

/// The seed's volume label, which cloud-init's NoCloud source looks for.
pub const LABEL: &str = "cidata";

/// The application identifier of a seed image starts with this, then the seed hash.
const APP_PREFIX: &str = "VMSYNC SEED ";

/// The files of a seed. `Debug` shows no content.
#[derive(Clone, PartialEq, Eq)]
pub struct SeedContent {
    pub user_data: Vec<u8>,
    pub meta_data: Vec<u8>,
    pub network_config: Option<Vec<u8>>,
}

impl std::fmt::Debug for SeedContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeedContent(<not shown>)")
    }
}

/// One VM's seed.
#[derive(Clone, PartialEq, Eq)]
pub struct SeedSpec {
    /// The image on the host: `<seed_dir>/<vm>-cidata.iso`.
    pub path: PathBuf,
    /// The CD-ROM's target device (`sda`, …: the first the VM's own disks leave free).
    pub target: String,
    /// The files; `None` when validation took the seed's hash from the seed cache
    /// (`desired::seed_cache`) instead of building it: enough to plan, not to write.
    pub content: Option<SeedContent>,
    /// sha256 (hex) of the content: equal hashes, equal images.
    pub hash: String,
    /// `iid-` and the hash's first 16 digits (unless the repository's meta-data sets one).
    pub instance_id: String,
    pub on_change: SeedOnChange,
    /// Whether a file used `secret()`: its content and its diff are never shown.
    pub has_secret: bool,
}

impl std::fmt::Debug for SeedSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedSpec")
            .field("path", &self.path)
            .field("target", &self.target)
            .field("hash", &self.hash)
            .field("instance_id", &self.instance_id)
            .field("on_change", &self.on_change)
            .field("has_secret", &self.has_secret)
            .field("built", &self.content.is_some())
            .finish_non_exhaustive()
    }
}

/// The seed image's path for VM `vm` in `dir`.
pub fn seed_path(dir: &Path, vm: &str) -> PathBuf {
    dir.join(format!("{vm}-{LABEL}.iso"))
}

/// The instance-id of the seed with hash `hash`: `iid-` and its first 16 digits.
pub fn instance_id(hash: &str) -> String {
    format!("iid-{}", &hash[..16.min(hash.len())])
}

/// The seed hash an image's application identifier names (see [`SeedSpec::image`]).
pub fn hash_of_app_id(app: &str) -> Option<String> {
    let hash = app.strip_prefix(APP_PREFIX)?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hash.to_ascii_lowercase())
}

impl SeedSpec {
    /// The ISO 9660 image: label `cidata`, the files, and the hash in the application
    /// identifier (what observation reads back to tell an unchanged seed). `None` when
    /// the content was not built (a seed taken from the seed cache).
    pub fn image(&self) -> Option<Vec<u8>> {
        let content = self.content.as_ref()?;
        let mut files = vec![
            iso9660::IsoFile {
                name: "user-data",
                data: &content.user_data,
            },
            iso9660::IsoFile {
                name: "meta-data",
                data: &content.meta_data,
            },
        ];
        if let Some(net) = &content.network_config {
            files.push(iso9660::IsoFile {
                name: "network-config",
                data: net,
            });
        }
        let app = format!("{APP_PREFIX}{}", self.hash.to_ascii_uppercase());
        Some(iso9660::build(
            &files,
            &iso9660::IsoLabels {
                volume: LABEL,
                application: &app,
            },
        ))
    }

    /// Whether the image must be written, given the hash of the seed on the host
    /// (`None`: no file, or not a seed vmsync wrote): when it is missing, or when its
    /// content changed (not with `on_change = "never"`: the first seed is kept).
    pub fn must_write(&self, on_host: Option<&str>) -> bool {
        match on_host {
            None => true,
            Some(hash) if hash == self.hash => false,
            Some(_) => self.on_change != SeedOnChange::Never,
        }
    }

    /// The part of the VM's fingerprint that stands for the seed: a changed seed is a
    /// changed definition (redefined in place, so the running definition tells a pending
    /// restart), except with `on_change = "never"`.
    pub fn fingerprint_part(&self) -> String {
        match self.on_change {
            SeedOnChange::Never => "+seed".into(),
            _ => format!("+seed-{}", &self.hash[..16]),
        }
    }

    /// The `<disk>` element that attaches the seed: a SCSI CD-ROM. Not SATA: Debian's
    /// cloud kernel (linux-image-cloud-amd64, that of its genericcloud images) has no
    /// AHCI driver, so its guests never see a SATA CD-ROM; every cloud kernel has
    /// virtio-scsi (see [`insert_device`]).
    pub fn device_xml(&self) -> String {
        let mut path = String::new();
        for c in self.path.to_string_lossy().chars() {
            match c {
                '&' => path.push_str("&amp;"),
                '<' => path.push_str("&lt;"),
                '>' => path.push_str("&gt;"),
                '\'' => path.push_str("&apos;"),
                '"' => path.push_str("&quot;"),
                c => path.push(c),
            }
        }
        format!(
            "<disk type='file' device='cdrom'>\n      <driver name='qemu' type='raw'/>\n      <source file='{path}'/>\n      <target dev='{}' bus='scsi'/>\n      <readonly/>\n    </disk>",
            self.target
        )
    }
}

/// A VM's fingerprint split into the definition's and the seed's part.
pub fn split_fingerprint(fingerprint: &str) -> (&str, &str) {
    match fingerprint.find('+') {
        Some(i) => fingerprint.split_at(i),
        None => (fingerprint, ""),
    }
}

/// The first `sd?` target no disk of the domain uses.
fn free_target(doc: &roxmltree::Document) -> Option<String> {
    let used: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("target") && n.parent().is_some_and(|p| p.has_tag_name("disk")))
        .filter_map(|n| n.attribute("dev").map(str::to_string))
        .collect();
    (b'a'..=b'z')
        .map(|c| format!("sd{}", c as char))
        .find(|t| !used.contains(t))
}

/// Where a seed's CD-ROM goes in one domain XML: the first `sd?` target its own disks
/// leave free, and the edit that adds the device as the last of `<devices>` (after a
/// virtio-scsi controller when the domain has no SCSI controller). Found by one parse,
/// then applied by [`place`] with string edits only; remembered by the seed cache, keyed
/// by the XML's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub target: String,
    /// The byte range of `xml` replaced (empty: an insertion at `at`).
    pub at: usize,
    pub remove: usize,
    /// Text before and after the device.
    pub before: String,
    pub after: String,
    /// Whether a virtio-scsi controller comes first.
    pub controller: bool,
}

/// Where the seed's CD-ROM goes in `xml` (parsed once).
pub fn slot(xml: &str) -> Result<Slot, XmlProblem> {
    let doc = domain_xml::parse_doc(xml)?;
    let target = free_target(&doc).ok_or_else(|| XmlProblem {
        line: None,
        field: Some("cloud_init".into()),
        message: "no free sd? target for the cloud-init CD-ROM (sda…sdz are all used)".into(),
    })?;
    let root = doc.root_element();
    let controller = !doc
        .descendants()
        .any(|n| n.has_tag_name("controller") && n.attribute("type") == Some("scsi"));
    let (at, remove, before, after) = match domain_xml::child(root, "devices") {
        Some(devices) => {
            let range = devices.range();
            let text = &xml[range.clone()];
            if text.ends_with("/>") && devices.first_child().is_none() {
                let open = text[..text.len() - 2].trim_end();
                (
                    range.start,
                    range.len(),
                    format!("{open}>\n    "),
                    "\n  </devices>".to_string(),
                )
            } else {
                let close = range.start + text.rfind("</").expect("a closed element");
                (close, 0, "  ".to_string(), "\n  ".to_string())
            }
        }
        None => {
            let range = root.range();
            let text = &xml[range.clone()];
            let close = range.start + text.rfind("</").unwrap_or(text.len());
            (
                close,
                0,
                "  <devices>\n    ".to_string(),
                "\n  </devices>\n".to_string(),
            )
        }
    };
    Ok(Slot {
        target,
        at,
        remove,
        before,
        after,
        controller,
    })
}

/// `xml` with the seed's CD-ROM (at `seed.target`) where `slot` says; `None` when the
/// slot does not fit `xml` (it was found in another text).
pub fn place(xml: &str, slot: &Slot, seed: &SeedSpec) -> Option<String> {
    let end = slot.at.checked_add(slot.remove)?;
    let (head, tail) = (xml.get(..slot.at)?, xml.get(end..)?);
    let device = seed.device_xml();
    let mut out = String::with_capacity(xml.len() + 400);
    out.push_str(head);
    out.push_str(&slot.before);
    if slot.controller {
        out.push_str(SCSI_CONTROLLER);
        out.push_str("\n    ");
    }
    out.push_str(&device);
    out.push_str(&slot.after);
    out.push_str(tail);
    Some(out)
}

/// `xml` with the seed's CD-ROM as the last device, its target the first `sd?` the
/// VM's own disks leave free (set in `seed`), and where it went.
pub fn attach(xml: &str, seed: &mut SeedSpec) -> Result<(String, Slot), XmlProblem> {
    let slot = slot(xml)?;
    seed.target = slot.target.clone();
    let placed = place(xml, &slot, seed).expect("a slot fits the text it was found in");
    Ok((placed, slot))
}

/// A SCSI controller for the seed's CD-ROM when the domain has none (libvirt's default
/// model on x86, lsilogic, is missing from cloud kernels as AHCI is).
const SCSI_CONTROLLER: &str = "<controller type='scsi' model='virtio-scsi'/>";

/// `xml` with the seed's CD-ROM (at its target already chosen) as the last device, after
/// a virtio-scsi controller when the domain has no SCSI controller of its own.
pub fn with_device(xml: &str, seed: &SeedSpec) -> Result<String, XmlProblem> {
    let slot = slot(xml)?;
    Ok(place(xml, &slot, seed).expect("a slot fits the text it was found in"))
}

/// What building a VM's seed needs.
pub struct SeedInputs<'a> {
    pub files: &'a dyn RepoFiles,
    /// The text renderer (`Renderer::for_text`) of this commit.
    pub renderer: &'a Renderer<'a>,
    pub vars: Vars<'a>,
    pub seed_dir: &'a Path,
}

/// Why a seed could not be built: the field and file, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedProblem {
    pub field: String,
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

/// One cloud-init file's content: read, or rendered when it ends in `.j2`. Also says
/// whether it used a secret.
fn content(inputs: &SeedInputs, field: &str, path: &str) -> Result<(Vec<u8>, bool), SeedProblem> {
    let problem = |file: &str, line, message| SeedProblem {
        field: format!("cloud_init.{field}"),
        file: file.to_string(),
        line,
        message,
    };
    if path.ends_with(TEMPLATE_SUFFIX) {
        return match inputs.renderer.render_text(path, &inputs.vars) {
            Ok((text, secret)) => Ok((text.into_bytes(), secret)),
            Err(RenderError::Unreadable(e)) => Err(problem(
                crate::desired::manifest::MANIFEST_FILE,
                None,
                e.to_string(),
            )),
            Err(RenderError::Failed(p)) => Err(problem(&p.file, p.line, p.message)),
        };
    }
    inputs
        .files
        .read_bytes(path)
        .map(|bytes| (bytes, false))
        .map_err(|e| problem(crate::desired::manifest::MANIFEST_FILE, None, e.to_string()))
}

/// Whether YAML text sets a top-level `instance-id`.
fn sets_instance_id(meta: &[u8]) -> bool {
    String::from_utf8_lossy(meta)
        .lines()
        .any(|l| l.starts_with("instance-id:") || l.starts_with("\"instance-id\":"))
}

/// Builds the seed of `vm` from its `[vm.cloud_init]` (its target is chosen by
/// [`attach`]).
pub fn build(inputs: &SeedInputs, spec: &CloudInitSpec) -> Result<SeedSpec, SeedProblem> {
    let vm = inputs.vars.vm;
    let (user_data, s1) = content(inputs, "user_data", &spec.user_data)?;
    let meta = match &spec.meta_data {
        Some(path) => Some(content(inputs, "meta_data", path)?),
        None => None,
    };
    let net = match &spec.network_config {
        Some(path) => Some(content(inputs, "network_config", path)?),
        None => None,
    };
    let mut hasher = Sha256::new();
    hasher.update(b"vmsync-seed-v1\0");
    for part in [
        Some(vm.as_bytes()),
        Some(&user_data[..]),
        meta.as_ref().map(|m| &m.0[..]),
        net.as_ref().map(|n| &n.0[..]),
    ] {
        match part {
            Some(bytes) => {
                hasher.update([1]);
                hasher.update((bytes.len() as u64).to_le_bytes());
                hasher.update(bytes);
            }
            None => hasher.update([0]),
        }
    }
    let hash = hex::encode(hasher.finalize());
    let instance_id = instance_id(&hash);
    let has_secret = s1 || meta.as_ref().is_some_and(|m| m.1) || net.as_ref().is_some_and(|n| n.1);
    let meta_data = match meta {
        None => format!("instance-id: {instance_id}\nlocal-hostname: {vm}\n").into_bytes(),
        Some((given, _)) if sets_instance_id(&given) => given,
        Some((given, _)) => {
            let mut out = format!("instance-id: {instance_id}\n").into_bytes();
            out.extend(given);
            out
        }
    };
    Ok(SeedSpec {
        path: seed_path(inputs.seed_dir, vm),
        target: String::new(),
        content: Some(SeedContent {
            user_data,
            meta_data,
            network_config: net.map(|n| n.0),
        }),
        hash,
        instance_id,
        on_change: spec.on_change,
        has_secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::secret_port::Secrets;
    use crate::repo::files::MemoryFiles;

    const XML: &str = "<domain type='kvm'>\n  <name>web</name>\n  <devices>\n    <disk type='file' device='disk'><source file='/x'/><target dev='sda' bus='sata'/></disk>\n  </devices>\n</domain>\n";

    fn build_with(files: &[(&str, &str)], spec: &CloudInitSpec) -> Result<SeedSpec, SeedProblem> {
        let files = MemoryFiles::new(files.iter().copied());
        let renderer = Renderer::for_text(&files, Secrets::default());
        let params = Default::default();
        let inputs = SeedInputs {
            files: &files,
            renderer: &renderer,
            vars: Vars {
                vm: "web",
                host: Some("hv1"),
                params: &params,
            },
            seed_dir: Path::new("/seeds"),
        };
        let mut seed = build(&inputs, spec)?;
        let (placed, slot) = attach(XML, &mut seed).unwrap();
        assert_eq!(place(XML, &slot, &seed).unwrap(), placed);
        Ok(seed)
    }

    fn spec(user_data: &str) -> CloudInitSpec {
        CloudInitSpec {
            user_data: user_data.into(),
            meta_data: None,
            network_config: None,
            on_change: SeedOnChange::NextBoot,
        }
    }

    #[test]
    fn instance_id_changes_exactly_with_the_content() {
        let a = build_with(&[("u", "#cloud-config\n")], &spec("u")).unwrap();
        let again = build_with(&[("u", "#cloud-config\n")], &spec("u")).unwrap();
        let b = build_with(&[("u", "#cloud-config\nx: 1\n")], &spec("u")).unwrap();
        assert_eq!(a.instance_id, again.instance_id);
        assert_eq!(a.image(), again.image());
        assert!(a.image().is_some());
        assert_ne!(a.instance_id, b.instance_id);
        assert_eq!(
            String::from_utf8(a.content.as_ref().unwrap().meta_data.clone()).unwrap(),
            format!("instance-id: {}\nlocal-hostname: web\n", a.instance_id)
        );
        assert_eq!(a.path, PathBuf::from("/seeds/web-cidata.iso"));
        // sda is the VM's own disk.
        assert_eq!(a.target, "sdb");
        let image = a.image().unwrap();
        let pvd = &image[iso9660::PVD_OFFSET as usize..];
        let (label, app) = iso9660::read_label_and_app(pvd).unwrap();
        assert_eq!(label, "cidata");
        assert_eq!(hash_of_app_id(&app), Some(a.hash.clone()));
    }

    #[test]
    fn templates_render_without_escaping_and_meta_data_keeps_its_instance_id() {
        let mut s = spec("u.yaml.j2");
        s.meta_data = Some("m".into());
        let seed = build_with(
            &[
                ("u.yaml.j2", "hostname: {{ vm.name }} <&> {{ host }}\n"),
                ("m", "instance-id: mine\n"),
            ],
            &s,
        )
        .unwrap();
        let content = seed.content.unwrap();
        assert_eq!(content.user_data, b"hostname: web <&> hv1\n");
        assert_eq!(content.meta_data, b"instance-id: mine\n");
        assert!(!seed.has_secret);
    }

    #[test]
    fn problems_name_field_and_file() {
        let p = build_with(&[], &spec("missing.yaml")).unwrap_err();
        assert_eq!(p.field, "cloud_init.user_data");
        assert!(p.message.contains("missing.yaml"), "{}", p.message);
        let p = build_with(&[("u.j2", "{{ nope }}")], &spec("u.j2")).unwrap_err();
        assert_eq!((p.file.as_str(), p.line), ("u.j2", Some(1)));
    }

    #[test]
    fn device_goes_into_devices_and_fingerprint_parts_split() {
        let seed = build_with(&[("u", "x")], &spec("u")).unwrap();
        let xml = with_device(XML, &seed).unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let cdrom = doc
            .descendants()
            .find(|n| n.attribute("device") == Some("cdrom"))
            .unwrap();
        assert!(cdrom.children().any(|c| c.has_tag_name("readonly")));
        let bus = cdrom
            .children()
            .find(|c| c.has_tag_name("target"))
            .and_then(|t| t.attribute("bus"));
        assert_eq!(bus, Some("scsi"));
        assert_eq!(xml.matches(SCSI_CONTROLLER).count(), 1, "{xml}");
        // A domain with a SCSI controller of its own gets no second one.
        let own = XML.replace(
            "  </devices>",
            "    <controller type='scsi' index='0' model='virtio-scsi'/>\n  </devices>",
        );
        assert!(!with_device(&own, &seed).unwrap().contains(SCSI_CONTROLLER));
        let bare = with_device("<domain><name>web</name><devices/></domain>", &seed).unwrap();
        assert!(
            bare.contains("<source file='/seeds/web-cidata.iso'/>"),
            "{bare}"
        );
        let none = with_device("<domain><name>web</name></domain>", &seed).unwrap();
        assert!(roxmltree::Document::parse(&none).is_ok(), "{none}");
        let fp = format!("abc{}", seed.fingerprint_part());
        assert_eq!(split_fingerprint(&fp).0, "abc");
        assert_eq!(split_fingerprint("abc"), ("abc", ""));
        let dbg = format!("{seed:?}");
        assert!(!dbg.contains("user_data"), "{dbg}");
    }
}
