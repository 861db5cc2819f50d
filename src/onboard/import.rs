//! `vmsync import [--connect URI] DIR [NAME...]`: writes a VM repository from the
//! domains, networks and storage pools a host has now, ready for review,
//! `vmsync validate DIR` and a first commit with `adopt = true` on every entry.
//!
//! It only reads: the lists, each one's inactive XML (domains without the secure flag,
//! see [`definition`]) and `qemu-img info -U` of each file-backed disk. It never
//! changes the host, a domain, a network, a pool or an image. What it writes, in DIR
//! (empty unless `--force`):
//!
//! - `vms/NAME.xml`: the domain's definition as [`definition::clean`] leaves it;
//!   `networks/NAME.xml`, `pools/NAME.xml` the same ([`definition::clean_pool`] for
//!   pools);
//! - `vmsync.toml`: one `[[pool]]`, `[[network]]`, `[[vm]]` per pool, network and
//!   domain with `autostart` as libvirt has it, `adopt = true`, and for a domain a `[[vm.disk]]` per existing qcow2 or raw image (path, size,
//!   format, backing as `qemu-img info` reports them);
//! - `README.md`: what to review before the first commit.
//!
//! The result is validated with the host's policy as `vmsync validate DIR` does; an
//! entry the policy refuses (a disk outside the disk roots, a host device, …) is written
//! commented out, under a comment with the reason, so the repository validates and the
//! operator decides.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::agent::sync::{self, SyncError};
use crate::config::{ConfigError, Settings};
use crate::desired::manifest;
use crate::desired::manifest::MANIFEST_FILE;
use crate::desired::resource_xml::ResourceKind;
use crate::host::disk::{DiskProvisioner, ImageInfo, QemuImg};
use crate::host::hypervisor::{Hypervisor, Libvirt, Listing};
use crate::onboard::{definition, output};

/// What `vmsync import` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Imported {
    /// Entries written active: domains by name, networks and pools as `network NAME`,
    /// `pool NAME`.
    pub entries: Vec<String>,
    /// Entries written commented out, with the reasons.
    pub commented: Vec<(String, Vec<String>)>,
    /// What was not written, with the reason (transient domains, networks, pools).
    pub skipped: Vec<(String, String)>,
    /// Notes for the operator (also in README.md).
    pub notes: Vec<String>,
}

/// One file-backed disk of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Disk {
    path: PathBuf,
    /// `qemu-img info`, or why it is not listed.
    info: Result<ImageInfo, String>,
}

/// One domain, network or pool to write.
#[derive(Debug, Clone)]
struct Entry {
    /// The manifest table: `vm`, `network` or `pool`.
    table: &'static str,
    name: String,
    file: String,
    xml: String,
    autostart: bool,
    disks: Vec<Disk>,
    /// Why the entry is commented out (empty: active).
    refused: Vec<String>,
}

/// Runs `vmsync import`: reads the host at `settings.libvirt_uri` and writes the
/// repository into `dir`.
pub fn import(
    settings: &Settings,
    dir: &Path,
    names: &[String],
    force: bool,
) -> Result<Imported, SyncError> {
    check_dir(dir, force)?;
    let hv = Libvirt::connect(&settings.libvirt_uri)?;
    let listed = hv.list()?;
    let mut imported = Imported::default();
    let mut resources = resources(&hv, &mut imported)?;
    let wanted = |name: &str| names.is_empty() || names.iter().any(|n| n == name);
    if let Some(missing) = names
        .iter()
        .find(|n| !listed.iter().any(|l| &&l.name == n) && !resources.iter().any(|r| &&r.name == n))
    {
        return Err(SyncError::Config(ConfigError(format!(
            "no domain, network or pool named '{missing}' at '{}'",
            settings.libvirt_uri
        ))));
    }
    resources.retain(|r| wanted(&r.name));
    imported
        .skipped
        .retain(|(name, _)| wanted(name.rsplit(' ').next().unwrap_or(name)));
    let mut chosen: Vec<Listing> = listed.into_iter().filter(|l| wanted(&l.name)).collect();
    chosen.sort_by(|a, b| a.name.cmp(&b.name));

    let mut entries = domain_entries(&hv, chosen, &mut imported)?;
    entries.extend(resources);
    write_definitions(dir, &entries)?;
    comment_out_refused(settings, dir, &mut entries)?;
    summarize(&entries, &mut imported);
    output::write_file(dir, "README.md", &readme(settings, &imported))?;
    info!(
        dir = %dir.display(),
        vms = imported.entries.len(),
        commented = imported.commented.len(),
        "imported"
    );
    Ok(imported)
}

/// An entry per persistent domain of `chosen`; transient ones are skipped.
fn domain_entries(
    hv: &Libvirt,
    chosen: Vec<Listing>,
    imported: &mut Imported,
) -> Result<Vec<Entry>, SyncError> {
    let disks = QemuImg::default();
    let mut entries = Vec::new();
    for listing in chosen {
        if !listing.persistent {
            let why = "transient domain (no persistent definition to adopt)".to_string();
            warn!(vm = %listing.name, "not imported: {why}");
            imported.skipped.push((listing.name, why));
            continue;
        }
        entries.push(domain_entry(hv, &disks, listing, imported)?);
    }
    Ok(entries)
}

/// One domain's entry: its cleaned definition (the values of `<qemu:env>` redacted) and
/// its file-backed disks as `qemu-img info` sees them.
fn domain_entry(
    hv: &Libvirt,
    disks: &QemuImg,
    listing: Listing,
    imported: &mut Imported,
) -> Result<Entry, SyncError> {
    let xml = hv.xml(&listing.name, true)?;
    let xml = definition::clean(&xml).map_err(|e| {
        SyncError::Other(anyhow::anyhow!(
            "failed to read the definition of domain '{}': {}",
            listing.name,
            e.message
        ))
    })?;
    let (xml, env_names) = output::redact_qemu_env(&xml);
    if !env_names.is_empty() {
        warn!(vm = %listing.name, variables = %env_names.join(", "), "the values of <qemu:env> were not imported");
        imported.notes.push(format!(
            "'{}': the values of <qemu:env> {} were not imported (they often hold secrets): the XML has '{}' instead; put the values back (or drop them) before applying",
            listing.name,
            env_names.join(", "),
            output::ENV_PLACEHOLDER
        ));
    }
    let disks = file_disks(&xml)
        .into_iter()
        .map(|path| {
            let info = match disks.inspect(&path) {
                Ok(Some(info)) => Ok(info),
                Ok(None) => Err("the image does not exist on this host".to_string()),
                Err(e) => Err(e.to_string()),
            };
            Disk { path, info }
        })
        .collect();
    if listing.autostart && !listing.active {
        imported.notes.push(format!(
            "'{}' has autostart set but is shut off: the first sync starts it (as the host would at its next boot); set autostart = false to leave it off",
            listing.name
        ));
    }
    Ok(Entry {
        table: "vm",
        file: format!("vms/{}.xml", file_name(&listing.name)),
        name: listing.name,
        xml,
        autostart: listing.autostart,
        disks,
        refused: Vec::new(),
    })
}

/// Writes each entry's XML file; nothing is written through a link: every target
/// (with the manifest and README.md) is checked before the first file is written.
fn write_definitions(dir: &Path, entries: &[Entry]) -> Result<(), SyncError> {
    for rel in entries
        .iter()
        .map(|e| e.file.as_str())
        .chain([MANIFEST_FILE, "README.md"])
    {
        output::check_target(dir, rel)?;
    }
    for e in entries {
        output::write_file(dir, &e.file, &e.xml)?;
    }
    Ok(())
}

/// Writes the manifest and validates as `vmsync validate DIR` would; comments out what
/// the policy refuses and validates again (a refused entry can hide another's problem,
/// e.g. a shared disk).
fn comment_out_refused(
    settings: &Settings,
    dir: &Path,
    entries: &mut [Entry],
) -> Result<(), SyncError> {
    let header = header(settings);
    for _ in 0..=entries.len() {
        output::write_file(dir, MANIFEST_FILE, &manifest(&header, entries))?;
        match sync::validate_dir(settings, dir) {
            Ok(_) => break,
            Err(SyncError::Invalid { problems, .. }) => {
                let mut blamed = false;
                for p in problems {
                    let (table, name) = blamed_entry(&p);
                    let entry = name.and_then(|name| {
                        entries
                            .iter_mut()
                            .find(|e| e.table == table && e.name == name)
                    });
                    if let Some(e) = entry
                        && !e.refused.contains(&p.to_string())
                    {
                        e.refused.push(p.to_string());
                        blamed = true;
                    }
                }
                if !blamed {
                    return Err(SyncError::Other(anyhow::anyhow!(
                        "the repository written in '{}' does not validate; see `vmsync validate {}`",
                        dir.display(),
                        dir.display()
                    )));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sorts the written entries into active and commented out, and notes the disks that
/// are not listed.
fn summarize(entries: &[Entry], imported: &mut Imported) {
    for e in entries {
        let label = match e.table {
            "vm" => e.name.clone(),
            table => format!("{table} {}", e.name),
        };
        if e.refused.is_empty() {
            imported.entries.push(label);
        } else {
            warn!(entry = %label, reasons = %e.refused.join("; "), "written commented out: this host's policy refuses it");
            imported.commented.push((label, e.refused.clone()));
        }
        for d in &e.disks {
            if let Err(why) = &d.info {
                imported.notes.push(format!(
                    "'{}': disk '{}' is not listed: {why}",
                    e.name,
                    d.path.display()
                ));
            }
        }
    }
}

/// What `vmsync import` prints.
pub fn render(dir: &Path, imported: &Imported) -> String {
    let mut out = format!(
        "imported {} definition(s) into {}: {}\n",
        imported.entries.len(),
        dir.display(),
        imported.entries.join(", ")
    );
    for (name, why) in &imported.commented {
        out += &format!("  {name}: written commented out: {}\n", why.join("; "));
    }
    for (name, why) in &imported.skipped {
        out += &format!("  {name}: not imported: {why}\n");
    }
    for note in &imported.notes {
        out += &format!("  note: {note}\n");
    }
    out += &format!(
        "nothing on the host was changed; review {} before the first commit\n",
        dir.join("README.md").display()
    );
    out
}

/// The host's persistent networks and storage pools, as import writes them (transient
/// ones are noted in `imported.skipped`).
fn resources(hv: &Libvirt, imported: &mut Imported) -> Result<Vec<Entry>, SyncError> {
    let mut out = Vec::new();
    for (kind, table) in [
        (ResourceKind::Network, "network"),
        (ResourceKind::Pool, "pool"),
    ] {
        for listing in hv.list_resources(kind)? {
            let name = listing.name;
            if !listing.persistent {
                let why = format!("transient {table} (no persistent definition to adopt)");
                warn!(entry = %format!("{table} {name}"), "not imported: {why}");
                imported.skipped.push((format!("{table} {name}"), why));
                continue;
            }
            let xml = hv.resource_xml(kind, &name, true)?;
            let cleaned = match kind {
                ResourceKind::Pool => definition::clean_pool(&xml),
                ResourceKind::Network => definition::clean(&xml),
            };
            let xml = cleaned.map_err(|e| {
                SyncError::Other(anyhow::anyhow!(
                    "failed to read the definition of {table} '{name}': {}",
                    e.message
                ))
            })?;
            out.push(Entry {
                table,
                file: format!("{table}s/{}.xml", file_name(&name)),
                name,
                xml,
                autostart: listing.autostart,
                disks: Vec::new(),
                refused: Vec::new(),
            });
        }
    }
    Ok(out)
}

/// The entry a validation problem is about: a VM's (`vm` set), or a network's or pool's
/// (field `network.…`/`pool.…`, message `network 'NAME': …`).
fn blamed_entry(p: &manifest::Problem) -> (&'static str, Option<String>) {
    if let Some(vm) = &p.vm {
        return ("vm", Some(vm.clone()));
    }
    for table in ["network", "pool"] {
        let field = p.field.as_deref().unwrap_or("");
        if field.starts_with(&format!("{table}.")) {
            let name = p
                .message
                .strip_prefix(&format!("{table} '"))
                .and_then(|rest| rest.split_once("': "))
                .map(|(name, _)| name.to_string());
            return (table, name);
        }
    }
    ("", None)
}

/// DIR must be empty or missing, unless `--force`.
fn check_dir(dir: &Path, force: bool) -> Result<(), SyncError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                return Err(SyncError::Config(ConfigError(format!(
                    "'{}' is not empty; refusing to write into it (use --force to write over what is there)",
                    dir.display()
                ))));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SyncError::Config(ConfigError(format!(
            "cannot use '{}' as the import directory: {e}",
            dir.display()
        )))),
    }
}

/// A domain name as a file name (libvirt names may hold characters a path should not).
fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The image files of `<disk type='file' device='disk'>` elements, in document order.
fn file_disks(xml: &str) -> Vec<PathBuf> {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return Vec::new();
    };
    doc.root_element()
        .children()
        .filter(|c| c.has_tag_name("devices"))
        .flat_map(|d| d.children())
        .filter(|d| d.has_tag_name("disk"))
        .filter(|d| d.attribute("type").unwrap_or("file") == "file")
        .filter(|d| d.attribute("device").unwrap_or("disk") == "disk")
        .filter_map(|d| d.children().find(|s| s.has_tag_name("source")))
        .filter_map(|s| s.attribute("file"))
        .map(PathBuf::from)
        .collect()
}

/// A byte count as the manifest writes sizes: the largest binary unit that divides it.
pub fn size_text(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn quoted(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// The `[[vm.disk]]` lines of `disk`, or why it is left out (a comment).
fn disk_lines(disk: &Disk) -> Vec<String> {
    let info = match &disk.info {
        Ok(info) => info,
        Err(why) => {
            return vec![format!(
                "# disk {} not listed: {why}",
                quoted(&disk.path.display().to_string())
            )];
        }
    };
    if info.format != "qcow2" && info.format != "raw" {
        return vec![format!(
            "# disk {} not listed: its format is {}; vmsync manages qcow2 and raw images",
            quoted(&disk.path.display().to_string()),
            info.format
        )];
    }
    let mut lines = vec![
        "[[vm.disk]]".to_string(),
        format!("path = {}", quoted(&disk.path.display().to_string())),
        format!("size = \"{}\"", size_text(info.virtual_size)),
        format!("format = \"{}\"", info.format),
    ];
    if let Some(backing) = &info.backing_filename {
        let backing = Path::new(backing);
        let absolute = if backing.is_absolute() {
            backing.to_path_buf()
        } else {
            disk.path.parent().unwrap_or(Path::new("/")).join(backing)
        };
        lines.push(format!(
            "backing = {}",
            quoted(&absolute.display().to_string())
        ));
    }
    lines
}

fn header(settings: &Settings) -> String {
    format!(
        "# Written by `vmsync import` from {} on {}.\n\
         # Review it (see README.md), then commit. Each entry has adopt = true: the first\n\
         # sync takes the existing domain, network or pool over in place (`vmsync plan`\n\
         # shows what it does).\n\
         version = 1\n",
        settings.libvirt_uri,
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    )
}

/// The manifest text for `entries`: refused ones commented out under their reasons.
fn manifest(header: &str, entries: &[Entry]) -> String {
    let mut out = header.to_string();
    // Pools and networks first: the domains use them.
    let order = |e: &&Entry| ["pool", "network", "vm"].iter().position(|t| *t == e.table);
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by_key(order);
    for e in sorted {
        let what = if e.table == "vm" { "domain" } else { e.table };
        let mut lines = vec![
            format!("[[{}]]", e.table),
            format!("name = {}", quoted(&e.name)),
            format!("xml = {}", quoted(&e.file)),
            format!("autostart = {}", e.autostart),
            format!("adopt = true       # take over the {what} that exists (no-op once adopted)"),
        ];
        for d in &e.disks {
            lines.push(String::new());
            lines.extend(disk_lines(d).into_iter().map(|l| format!("  {l}")));
        }
        out.push('\n');
        if e.refused.is_empty() {
            out += &lines.join("\n");
        } else {
            out += &format!(
                "# Commented out: this host's policy refuses this {} as it is defined now:\n",
                e.table
            );
            for why in &e.refused {
                out += &format!("#   {why}\n");
            }
            let commented: Vec<String> = lines
                .iter()
                .map(|l| {
                    if l.is_empty() {
                        "#".to_string()
                    } else {
                        format!("# {l}")
                    }
                })
                .collect();
            out += &commented.join("\n");
        }
        out.push('\n');
    }
    out
}

fn readme(settings: &Settings, imported: &Imported) -> String {
    let mut out = format!(
        "# VM repository imported from {}\n\n\
         `vmsync import` wrote this from the domains, networks and storage pools the host\n\
         had; it changed nothing on the host.\n\
         Nothing changes there until the first sync of a commit of this repository, and then\n\
         only what `vmsync plan` shows: for a domain whose definition you did not edit, only\n\
         vmsync's tag is added to it (`adopt (tag only …)`, no redefine).\n\n\
         ## Review before the first commit\n\n\
         - `vms/*.xml`: each domain's definition as libvirt holds it. UUID, MAC addresses,\n  \
           PCI addresses and the machine type are kept on purpose: they are the guest's\n  \
           identity and hardware. Secrets are not in these files (libvirt gives a graphics\n  \
           password only with its secure flag, which import does not ask for): if a domain\n  \
           has one, a redefine from this file drops it, so edit such a file only after you\n  \
           added it back.\n\
         - `vmsync.toml`: `autostart` is the host's flag now; `adopt = true` lets the first\n  \
           sync take each existing domain over in place (same UUID, NVRAM and TPM state;\n  \
           never undefined). Each `[[vm.disk]]` is an existing image, as `qemu-img info`\n  \
           reports it: vmsync never overwrites, shrinks or deletes an existing disk.\n\
         - Entries written commented out: this host's policy (`[policy]` in the agent's\n  \
           config) refuses them as they are; the comment above each says why. Allow it in\n  \
           the policy or change the domain, then uncomment.\n\n\
         ## Then\n\n\
         ```\n\
         vmsync validate .\n\
         git init -b main && git add -A && git commit -m 'import from {}'\n\
         vmsync plan --url .      # every domain: adopt (tag only …), or the diff\n\
         vmsync --once --url .\n\
         ```\n",
        settings.libvirt_uri, settings.libvirt_uri
    );
    if !imported.commented.is_empty() {
        out += "\n## Commented out\n\n";
        for (name, why) in &imported.commented {
            out += &format!("- `{name}`: {}\n", why.join("; "));
        }
    }
    if !imported.skipped.is_empty() {
        out += "\n## Not imported\n\n";
        for (name, why) in &imported.skipped {
            out += &format!("- `{name}`: {why}\n");
        }
    }
    if !imported.notes.is_empty() {
        out += "\n## Notes\n\n";
        for note in &imported.notes {
            out += &format!("- {note}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_the_largest_exact_unit() {
        assert_eq!(size_text(64 << 20), "64M");
        assert_eq!(size_text(20 << 30), "20G");
        assert_eq!(size_text(3 << 40), "3T");
        assert_eq!(size_text(1536 << 20), "1536M");
        assert_eq!(size_text(512), "512");
        for bytes in [64u64 << 20, 20 << 30, 1536 << 20, 512, 4096 + 512] {
            assert_eq!(
                crate::desired::values::parse_size(&size_text(bytes)).unwrap(),
                bytes
            );
        }
    }

    #[test]
    fn only_file_backed_disks_are_listed() {
        let xml = "<domain><name>a</name><devices>
          <disk type='file' device='disk'><source file='/i/a.qcow2'/></disk>
          <disk type='file' device='cdrom'><source file='/i/x.iso'/></disk>
          <disk type='block' device='disk'><source dev='/dev/sdb'/></disk>
          <disk type='file' device='disk'><source file='/i/b.raw'/></disk>
        </devices></domain>";
        assert_eq!(
            file_disks(xml),
            [PathBuf::from("/i/a.qcow2"), PathBuf::from("/i/b.raw")]
        );
    }

    fn entry(refused: Vec<String>) -> Entry {
        Entry {
            table: "vm",
            name: "web \"1\"".into(),
            file: "vms/web__1_.xml".into(),
            xml: String::new(),
            autostart: true,
            disks: vec![
                Disk {
                    path: "/var/lib/libvirt/images/web.qcow2".into(),
                    info: Ok(ImageInfo {
                        format: "qcow2".into(),
                        virtual_size: 20 << 30,
                        backing_filename: Some("base/debian.qcow2".into()),
                    }),
                },
                Disk {
                    path: "/var/lib/libvirt/images/web.vmdk".into(),
                    info: Ok(ImageInfo {
                        format: "vmdk".into(),
                        virtual_size: 1 << 30,
                        backing_filename: None,
                    }),
                },
            ],
            refused,
        }
    }

    #[test]
    fn the_manifest_parses_and_a_refused_entry_is_commented_out_with_its_reason() {
        let text = manifest("version = 1\n", &[entry(Vec::new())]);
        let parsed = crate::desired::manifest::parse(&text).unwrap();
        let vm = &parsed.vms[0];
        assert_eq!(vm.name, "web \"1\"");
        assert!(vm.autostart && vm.adopt);
        assert_eq!(vm.disks.len(), 1, "the vmdk is only a comment:\n{text}");
        assert_eq!(vm.disks[0].size_bytes, 20 << 30);
        assert_eq!(
            vm.disks[0].backing.as_deref(),
            Some(Path::new("/var/lib/libvirt/images/base/debian.qcow2"))
        );
        assert!(text.contains("its format is vmdk"), "{text}");

        let text = manifest(
            "version = 1\n",
            &[entry(vec![
                "vms/web.xml: host path '/srv/x' is outside".into(),
            ])],
        );
        let parsed = crate::desired::manifest::parse(&text).unwrap();
        assert!(parsed.vms.is_empty(), "{text}");
        assert!(
            text.contains("#   vms/web.xml: host path '/srv/x' is outside\n# [[vm]]\n"),
            "{text}"
        );
    }
}
