//! Domain XML: reading what vmsync needs from a definition, and rendering the XML that
//! vmsync hands to libvirt.
//!
//! vmsync edits the operator's XML as little as possible, by inserting text at positions
//! found with a real XML parser (roxmltree), so everything else reaches libvirt byte for
//! byte. It adds, when missing, the `<uuid>` and interface `<mac>` addresses that libvirt
//! already gave the existing domain (so identity never churns), and its ownership tag: a
//! `<metadata>` child in vmsync's own namespace holding the commit and the fingerprint.

use sha2::{Digest, Sha256};

/// vmsync's XML namespace for the ownership tag in `<metadata>`.
pub const NAMESPACE: &str = "https://github.com/vmsync/vmsync/xmlns/domain/1";

/// What vmsync records in a domain it defines.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tag {
    /// Full id of the commit that defined this definition.
    pub commit: String,
    /// [`fingerprint`] of the source XML.
    pub fingerprint: String,
}

/// What vmsync reads from a domain definition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomainSummary {
    pub name: String,
    pub uuid: Option<String>,
    /// MAC address of each `<interface>`, in document order (`None` where not given).
    pub macs: Vec<Option<String>>,
    pub tag: Option<Tag>,
    /// The networks and storage volumes its devices name.
    pub refs: DomainRefs,
}

/// The libvirt resources a domain's devices name (checked against the commit's networks
/// and pools; kept in the summary so that an unchanged file is not parsed for them).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomainRefs {
    /// `<interface type='network'><source network=…/>`.
    pub networks: Vec<String>,
    /// `<disk type='volume'><source pool=… volume=…/>`.
    pub volumes: Vec<(String, String)>,
}

/// The networks and volumes the devices of the domain `root` name.
fn refs_of(root: roxmltree::Node) -> DomainRefs {
    let mut refs = DomainRefs::default();
    let Some(devices) = child(root, "devices") else {
        return refs;
    };
    for dev in devices.children().filter(|c| c.is_element()) {
        let source = child(dev, "source");
        match (dev.tag_name().name(), dev.attribute("type"), source) {
            ("interface", Some("network"), Some(s)) => {
                if let Some(n) = s.attribute("network") {
                    refs.networks.push(n.to_string());
                }
            }
            ("disk", Some("volume"), Some(s)) => {
                if let (Some(p), Some(v)) = (s.attribute("pool"), s.attribute("volume")) {
                    refs.volumes.push((p.to_string(), v.to_string()));
                }
            }
            _ => {}
        }
    }
    refs
}

/// A problem in a domain XML, with its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlProblem {
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

fn problem(line: Option<usize>, field: &str, message: impl Into<String>) -> XmlProblem {
    XmlProblem {
        line,
        field: Some(field.into()),
        message: message.into(),
    }
}

/// The fingerprint of a source definition: what decides whether a domain must be
/// redefined. The version prefix changes when the way vmsync renders XML changes.
pub fn fingerprint(source_xml: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"vmsync-fingerprint-v1\0");
    hasher.update(source_xml.as_bytes());
    hex::encode(hasher.finalize())
}

/// Parses libvirt or committed XML without DTDs (no entity expansion).
pub(crate) fn parse_doc(xml: &str) -> Result<roxmltree::Document<'_>, XmlProblem> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(xml, options).map_err(|e| XmlProblem {
        line: Some(e.pos().row as usize),
        field: None,
        message: format!("malformed xml: {e}"),
    })
}

/// The first child element `name` in no namespace.
pub(crate) fn child<'a, 'i>(
    node: roxmltree::Node<'a, 'i>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none()
    })
}

/// An element's text, trimmed.
pub(crate) fn text_of(node: roxmltree::Node) -> String {
    node.text().unwrap_or("").trim().to_string()
}

/// Checks a UUID's form (libvirt accepts hex with or without dashes; vmsync wants the
/// canonical 8-4-4-4-12 form so that duplicates can be compared).
pub fn is_canonical_uuid(uuid: &str) -> bool {
    let groups: Vec<&str> = uuid.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Reads a domain definition: well-formed, root `<domain>`, a `<name>`, an optional UUID
/// in canonical form, interface MACs and vmsync's tag.
pub fn summarize(xml: &str) -> Result<DomainSummary, XmlProblem> {
    summarize_doc(&parse_doc(xml)?)
}

fn summarize_doc(doc: &roxmltree::Document) -> Result<DomainSummary, XmlProblem> {
    let root = doc.root_element();
    let line = |n: roxmltree::Node| Some(doc.text_pos_at(n.range().start).row as usize);
    if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
        return Err(problem(
            line(root),
            "domain",
            format!(
                "root element is <{}>, expected <domain>",
                root.tag_name().name()
            ),
        ));
    }
    let name = child(root, "name")
        .map(text_of)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| problem(line(root), "name", "the domain has no <name>"))?;
    let uuid = match child(root, "uuid") {
        None => None,
        Some(node) => {
            let uuid = text_of(node).to_ascii_lowercase();
            if !is_canonical_uuid(&uuid) {
                return Err(problem(
                    line(node),
                    "uuid",
                    format!("'{uuid}' is not a uuid like 8-4-4-4-12 hex digits"),
                ));
            }
            Some(uuid)
        }
    };
    let macs = interfaces(root)
        .map(|iface| {
            child(iface, "mac")
                .and_then(|m| m.attribute("address"))
                .map(str::to_ascii_lowercase)
        })
        .collect();
    let tag = tag_node(root).map(|node| Tag {
        commit: ns_child_text(node, "commit"),
        fingerprint: ns_child_text(node, "fingerprint"),
    });
    Ok(DomainSummary {
        name,
        uuid,
        macs,
        tag,
        refs: refs_of(root),
    })
}

fn interfaces<'a, 'i>(
    root: roxmltree::Node<'a, 'i>,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    child(root, "devices")
        .into_iter()
        .flat_map(|d| d.children())
        .filter(|c| c.is_element() && c.tag_name().name() == "interface")
}

fn tag_node<'a, 'i>(root: roxmltree::Node<'a, 'i>) -> Option<roxmltree::Node<'a, 'i>> {
    child(root, "metadata")?
        .children()
        .find(|c| c.is_element() && c.tag_name().namespace() == Some(NAMESPACE))
}

fn ns_child_text(node: roxmltree::Node, name: &str) -> String {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
        .map(text_of)
        .unwrap_or_default()
}

/// Reads only vmsync's tag from a definition libvirt returned (`None` if untagged or
/// unparsable).
pub fn read_tag(xml: &str) -> Option<Tag> {
    summarize(xml).ok()?.tag
}

/// Renders the XML vmsync defines: the source with `uuid` and `macs` filled in where the
/// source gives none (from the existing domain), any stale vmsync tag removed, and `tag`
/// added to `<metadata>`. The source must have passed [`summarize`].
pub fn render(
    source: &str,
    uuid: Option<&str>,
    macs: &[Option<String>],
    tag: &Tag,
) -> Result<String, XmlProblem> {
    let doc = parse_doc(source)?;
    let root = doc.root_element();
    // (position, text to insert) and (range to delete); applied back to front.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();

    if child(root, "uuid").is_none()
        && let Some(uuid) = uuid
    {
        let name = child(root, "name").expect("summarize checked <name>");
        edits.push((
            name.range().end..name.range().end,
            format!("\n  <uuid>{uuid}</uuid>"),
        ));
    }

    for (iface, mac) in interfaces(root).zip(macs.iter()) {
        if child(iface, "mac").is_some() {
            continue;
        }
        let Some(mac) = mac else { continue };
        let element = format!("<mac address='{mac}'/>");
        edits.push(insert_first_child(source, iface, &element));
    }

    let tag_xml = format!(
        "<vmsync:sync xmlns:vmsync=\"{NAMESPACE}\"><vmsync:commit>{}</vmsync:commit><vmsync:fingerprint>{}</vmsync:fingerprint></vmsync:sync>",
        tag.commit, tag.fingerprint
    );
    match child(root, "metadata") {
        Some(metadata) => {
            if let Some(stale) = tag_node(root) {
                edits.push((stale.range(), String::new()));
            }
            edits.push(insert_first_child(source, metadata, &tag_xml));
        }
        None => {
            let name = child(root, "name").expect("summarize checked <name>");
            edits.push((
                name.range().end..name.range().end,
                format!("\n  <metadata>{tag_xml}</metadata>"),
            ));
        }
    }

    edits.sort_by_key(|(range, _)| std::cmp::Reverse((range.start, range.end)));
    let mut out = source.to_string();
    for (range, text) in edits {
        out.replace_range(range, &text);
    }
    Ok(out)
}

/// An edit that makes `element` the first child of `node`, turning `<x .../>` into
/// `<x ...>element</x>` when needed.
fn insert_first_child(
    source: &str,
    node: roxmltree::Node,
    element: &str,
) -> (std::ops::Range<usize>, String) {
    let range = node.range();
    let text = &source[range.clone()];
    if text.ends_with("/>") && node.first_child().is_none() {
        let name = node.tag_name().name();
        let open = text[..text.len() - 2].trim_end();
        return (range, format!("{open}>{element}</{name}>"));
    }
    // The start tag ends at the first '>' outside quotes.
    let mut quote = None;
    let mut end = 0;
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => {
                end = i + 1;
                break;
            }
            _ => {}
        }
    }
    let pos = range.start + end;
    (pos..pos, element.to_string())
}

/// Top-level elements libvirt adds with defaults; ignored in diffs when the source has none.
const GENERATED_TOP: &[&str] = &[
    "uuid",
    "currentMemory",
    "resource",
    "seclabel",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "clock",
    "cpu",
    "pm",
    "sysinfo",
    "idmap",
];

/// `<os>` children libvirt adds (boot order, NVRAM path); ignored when the source has none.
const GENERATED_OS: &[&str] = &["boot", "nvram", "loader"];

/// Devices libvirt's QEMU driver adds by itself; ignored when the source has none of
/// the kind (controllers are matched by type and index).
const GENERATED_DEVICES: &[&str] = &[
    "emulator",
    "controller",
    "input",
    "audio",
    "video",
    "memballoon",
    "console",
    "serial",
    "channel",
    "watchdog",
];

/// Machine type aliases libvirt expands on define (`pc` → `pc-i440fx-7.2`).
const MACHINE_ALIASES: &[(&str, &str)] = &[("pc", "pc-i440fx-"), ("q35", "pc-q35-")];

/// libvirt's inactive XML pretty-printed, with vmsync's tag removed and the controllers
/// in a fixed order ([`Projection::Canonical`]): what the drift baseline is taken of.
/// `None` if it does not parse.
pub fn canonical(libvirt_xml: &str) -> Option<String> {
    Some(canonical_doc(
        &parse_doc(libvirt_xml).ok()?,
        Projection::Canonical,
    ))
}

fn canonical_doc(doc: &roxmltree::Document, projection: Projection) -> String {
    let mut out = String::with_capacity(doc.input_text().len());
    write_node(doc.root_element(), None, 0, projection, &mut out);
    out
}

/// The hash of [`canonical`]: equal before and after a sync unless someone changed the
/// definition outside vmsync (`virsh edit`, `virsh define`).
pub fn definition_hash(libvirt_xml: &str) -> Option<String> {
    Some(hash_doc(&parse_doc(libvirt_xml).ok()?))
}

fn hash_doc(doc: &roxmltree::Document) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"vmsync-definition-v2\0");
    hasher.update(canonical_doc(doc, Projection::Canonical).as_bytes());
    hex::encode(hasher.finalize())
}

/// The hash vmsync 0.1 recorded as the drift baseline: of the XML in libvirt's order
/// (which libvirt changes for controllers when a domain starts).
fn legacy_hash_doc(doc: &roxmltree::Document) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"vmsync-definition-v1\0");
    hasher.update(canonical_doc(doc, Projection::Off).as_bytes());
    hex::encode(hasher.finalize())
}

/// [`definition_hash`] to compare with the recorded `baseline`: a baseline recorded by an
/// older vmsync ([`legacy_hash_doc`]) is returned as is when the definition still hashes
/// to it (unchanged), so an upgrade reports no drift; the next define records the new one.
fn hash_against(doc: &roxmltree::Document, baseline: Option<&str>) -> String {
    let hash = hash_doc(doc);
    match baseline {
        Some(base) if base != hash && legacy_hash_doc(doc) == base => base.to_string(),
        _ => hash,
    }
}

/// [`definition_hash`] of libvirt's XML as compared with the recorded `baseline`
/// (see [`summarize_and_hash`]).
pub fn definition_hash_against(libvirt_xml: &str, baseline: Option<&str>) -> Option<String> {
    Some(hash_against(&parse_doc(libvirt_xml).ok()?, baseline))
}

/// [`summarize`] and [`definition_hash`] of a definition libvirt returned, parsed once
/// (observing a host reads every managed domain's XML on every sync). The hash is the
/// one to compare with the recorded `baseline`: a baseline of an older vmsync that the
/// unchanged definition still hashes to is returned as is.
pub fn summarize_and_hash(
    libvirt_xml: &str,
    baseline: Option<&str>,
) -> (Option<DomainSummary>, Option<String>) {
    match parse_doc(libvirt_xml) {
        Ok(doc) => (summarize_doc(&doc).ok(), Some(hash_against(&doc, baseline))),
        Err(_) => (None, None),
    }
}

/// libvirt's XML pretty-printed for a readable diff against the committed `source`:
/// vmsync's tag removed, and what libvirt generates where the source gives none left
/// out (UUID, MACs, device addresses, aliases, default controllers and devices, the
/// expanded machine type, `<os>` defaults, top-level defaults). Both sides of a diff
/// go through this with the same source. Unparsable input is returned as is.
pub fn normalize_for_diff(libvirt_xml: &str, source: &str) -> String {
    let Ok(doc) = parse_doc(libvirt_xml) else {
        return libvirt_xml.to_string();
    };
    let Ok(src) = parse_doc(source) else {
        return canonical_doc(&doc, Projection::Off);
    };
    let mut out = String::new();
    write_node(
        doc.root_element(),
        Some(src.root_element()),
        0,
        Projection::Root,
        &mut out,
    );
    out
}

/// The image files and block devices of a definition's `<disk device='disk'>` elements
/// (not CD-ROMs or floppies), for reporting orphaned disks.
pub fn disk_sources(xml: &str) -> Vec<std::path::PathBuf> {
    let Ok(doc) = parse_doc(xml) else {
        return Vec::new();
    };
    child(doc.root_element(), "devices")
        .into_iter()
        .flat_map(|d| d.children())
        .filter(|d| d.is_element() && d.tag_name().name() == "disk")
        .filter(|d| d.attribute("device").is_none_or(|v| v == "disk"))
        .filter_map(|d| child(d, "source"))
        .filter_map(|s| s.attribute("file").or(s.attribute("dev")))
        .map(std::path::PathBuf::from)
        .collect()
}

/// Where in the document the printer is, for the diff projection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Projection {
    /// Print everything except vmsync's tag and aliases.
    Off,
    /// As `Off`, with the controllers of `<devices>` sorted by type and index (the
    /// definition hash): libvirt identifies a controller by type and index, its place
    /// among the devices means nothing, and libvirt moves controllers when a domain
    /// starts (a q35 domain's `virtio-serial` goes behind the PCIe root ports). Other
    /// devices keep libvirt's order: disks without `<boot order>` boot in theirs, and
    /// interfaces and disks get their PCI slots and guest names in theirs.
    Canonical,
    /// The `<domain>` element.
    Root,
    /// A direct child of `<domain>` (its source counterpart known).
    Top,
    /// A device in `<devices>` (its source counterpart, if any, known).
    Device,
}

fn is_vmsync_tag(node: roxmltree::Node) -> bool {
    node.is_element() && node.tag_name().namespace() == Some(NAMESPACE)
}

fn elements<'a, 'i>(
    node: roxmltree::Node<'a, 'i>,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    node.children().filter(|c| c.is_element())
}

fn has_child(node: Option<roxmltree::Node>, name: &str) -> bool {
    node.is_some_and(|n| child(n, name).is_some())
}

/// The source counterpart of a libvirt device: controllers by type and index, other
/// devices by position among the devices of the same kind.
fn device_counterpart<'a, 'i>(
    device: roxmltree::Node,
    position: usize,
    src_devices: Option<roxmltree::Node<'a, 'i>>,
) -> Option<roxmltree::Node<'a, 'i>> {
    let src_devices = src_devices?;
    let name = device.tag_name().name();
    let mut same = elements(src_devices).filter(|c| c.tag_name().name() == name);
    if name == "controller" {
        return same.find(|c| {
            c.attribute("type") == device.attribute("type")
                && c.attribute("index").unwrap_or("0") == device.attribute("index").unwrap_or("0")
        });
    }
    same.nth(position)
}

/// Which children of `node` (in libvirt's XML) the diff shows, each with its source
/// counterpart and the projection to print it with.
fn shown_children<'a, 'i, 's, 't>(
    node: roxmltree::Node<'a, 'i>,
    src: Option<roxmltree::Node<'s, 't>>,
    projection: Projection,
) -> Vec<(
    roxmltree::Node<'a, 'i>,
    Option<roxmltree::Node<'s, 't>>,
    Projection,
)> {
    let name = node.tag_name().name();
    let mut out = Vec::new();
    let mut positions: std::collections::BTreeMap<String, usize> = Default::default();
    for c in elements(node) {
        let cname = c.tag_name().name();
        if cname == "alias" || is_vmsync_tag(c) {
            continue;
        }
        match projection {
            Projection::Off | Projection::Canonical => out.push((c, None, projection)),
            Projection::Root => {
                if c.tag_name().namespace().is_some() {
                    continue;
                }
                if GENERATED_TOP.contains(&cname) && !has_child(src, cname) {
                    continue;
                }
                if cname == "metadata" && !elements(c).any(|m| !is_vmsync_tag(m)) {
                    continue;
                }
                out.push((c, src.and_then(|s| child(s, cname)), Projection::Top));
            }
            Projection::Top if name == "os" => {
                if GENERATED_OS.contains(&cname) && !has_child(src, cname) {
                    continue;
                }
                out.push((c, src.and_then(|s| child(s, cname)), Projection::Off));
            }
            Projection::Top if name == "devices" => {
                let position = positions.entry(cname.to_string()).or_default();
                let counterpart = device_counterpart(c, *position, src);
                *position += 1;
                if GENERATED_DEVICES.contains(&cname)
                    && (!has_child(src, cname) || (cname == "controller" && counterpart.is_none()))
                {
                    continue;
                }
                out.push((c, counterpart, Projection::Device));
            }
            Projection::Top => out.push((c, None, Projection::Off)),
            Projection::Device => {
                // Addresses, MACs and interface target devices libvirt assigns where
                // the source gives none.
                if matches!(cname, "address" | "mac" | "target") && !has_child(src, cname) {
                    continue;
                }
                out.push((c, None, Projection::Off));
            }
        }
    }
    if projection == Projection::Canonical && name == "devices" {
        sort_controllers(&mut out);
    }
    out
}

/// Puts the controllers among `devices` in (type, numeric index) order, in the places
/// the controllers had; every other device stays where it is.
fn sort_controllers<S: Copy>(devices: &mut [(roxmltree::Node, S, Projection)]) {
    let places: Vec<usize> = (0..devices.len())
        .filter(|&i| devices[i].0.tag_name().name() == "controller")
        .collect();
    let mut controllers: Vec<_> = places.iter().map(|&i| devices[i]).collect();
    controllers.sort_by_cached_key(|(n, ..)| {
        let index = n.attribute("index").unwrap_or("0");
        (
            n.attribute("type").unwrap_or("").to_string(),
            index.parse::<u64>().unwrap_or(u64::MAX),
            index.to_string(),
        )
    });
    for (place, device) in places.into_iter().zip(controllers) {
        devices[place] = device;
    }
}

/// Appends `name` with the prefix `node` has in scope for `ns` (none for the default).
fn push_qualified(out: &mut String, node: roxmltree::Node, name: &str, ns: Option<&str>) {
    if let Some(prefix) = ns.and_then(|uri| node.lookup_prefix(uri))
        && !prefix.is_empty()
    {
        out.push_str(prefix);
        out.push(':');
    }
    out.push_str(name);
}

/// Appends `text` escaped for an attribute value in single quotes, or for element text.
fn push_escaped(out: &mut String, text: &str, attribute: bool) {
    let special = |c: char| c == '&' || c == '<' || if attribute { c == '\'' } else { c == '>' };
    let mut rest = text;
    while let Some(at) = rest.find(special) {
        out.push_str(&rest[..at]);
        let c = rest[at..].chars().next().expect("found");
        out.push_str(match c {
            '&' => "&amp;",
            '<' => "&lt;",
            '>' => "&gt;",
            _ => "&apos;",
        });
        rest = &rest[at + c.len_utf8()..];
    }
    out.push_str(rest);
}

/// The text of `node`'s text children, trimmed (borrowed when there is one child).
fn own_text<'a>(node: roxmltree::Node<'a, '_>) -> std::borrow::Cow<'a, str> {
    let mut texts = node
        .children()
        .filter(|c| c.is_text())
        .filter_map(|c| c.text());
    let Some(first) = texts.next() else {
        return "".into();
    };
    match texts.next() {
        None => first.trim().into(),
        Some(second) => {
            let mut all = String::from(first);
            all.push_str(second);
            texts.for_each(|t| all.push_str(t));
            all.trim().to_string().into()
        }
    }
}

/// Pretty-prints `node` (two spaces per level, attributes as libvirt orders them).
/// The drift baselines in state files are hashes of this text ([`definition_hash`]):
/// it must not change from one version to the next.
fn write_node(
    node: roxmltree::Node,
    src: Option<roxmltree::Node>,
    depth: usize,
    projection: Projection,
    out: &mut String,
) {
    let indent = |out: &mut String| (0..depth).for_each(|_| out.push_str("  "));
    let (name, ns) = (node.tag_name().name(), node.tag_name().namespace());
    indent(out);
    out.push('<');
    push_qualified(out, node, name, ns);
    if let Some(uri) = ns
        && node
            .parent_element()
            .is_none_or(|p| p.lookup_prefix(uri).is_none())
    {
        match node.lookup_prefix(uri) {
            Some(prefix) if !prefix.is_empty() => {
                out.push_str(" xmlns:");
                out.push_str(prefix);
            }
            _ => out.push_str(" xmlns"),
        }
        out.push_str("='");
        push_escaped(out, uri, true);
        out.push('\'');
    }
    let is_os_type = projection == Projection::Off
        && name == "type"
        && node
            .parent_element()
            .is_some_and(|p| p.tag_name().name() == "os");
    for attr in node.attributes() {
        let mut value = attr.value();
        if is_os_type && src.is_some() {
            // Attributes the source leaves to libvirt (arch, machine) are left out; an
            // expanded machine alias is shown as the source wrote it.
            let Some(given) = src.and_then(|s| s.attribute(attr.name())) else {
                continue;
            };
            if attr.name() == "machine"
                && MACHINE_ALIASES
                    .iter()
                    .any(|(alias, prefix)| given == *alias && value.starts_with(prefix))
            {
                value = given;
            }
        }
        out.push(' ');
        push_qualified(out, node, attr.name(), attr.namespace());
        out.push_str("='");
        push_escaped(out, value, true);
        out.push('\'');
    }
    let children = shown_children(node, src, projection);
    let text = own_text(node);
    if children.is_empty() && text.is_empty() {
        out.push_str("/>\n");
        return;
    }
    if children.is_empty() {
        out.push('>');
        push_escaped(out, &text, false);
    } else {
        out.push_str(">\n");
        for (c, csrc, cprojection) in children {
            // `os/type` needs its source counterpart for the machine alias.
            let csrc = if c.tag_name().name() == "type" && name == "os" {
                src.and_then(|s| child(s, "type"))
            } else {
                csrc
            };
            write_node(c, csrc, depth + 1, cprojection, out);
        }
        indent(out);
    }
    out.push_str("</");
    push_qualified(out, node, name, ns);
    out.push_str(">\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"<domain type='kvm'>
  <name>web</name>
  <memory unit='MiB'>512</memory>
  <devices>
    <interface type='network'>
      <source network='default'/>
    </interface>
    <interface type="user"/>
    <interface type='bridge'><mac address='52:54:00:AA:BB:CC'/><source bridge='br0'/></interface>
  </devices>
</domain>"#;

    fn tag() -> Tag {
        Tag {
            commit: "c0ffee".into(),
            fingerprint: fingerprint(SRC),
        }
    }

    /// Escapes, namespaces (prefixed, default, vmsync's), mixed text, CDATA, comments,
    /// an alias and a device address: the corners of the canonical printer.
    const CORNERS: &str = r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>a&amp;b</name>
  <description>x &lt; y &gt; z "q" 'a' &amp; — ü</description>
  <title>one<!-- c -->two <![CDATA[<raw>&]]> three</title>
  <metadata>
    <app:x xmlns:app='urn:a&amp;b'><app:y k='v&apos;"&lt;'>t</app:y></app:x>
    <z xmlns='urn:default'><w a='1'/></z>
    <vmsync:sync xmlns:vmsync='https://github.com/vmsync/vmsync/xmlns/domain/1'><vmsync:commit>c</vmsync:commit><vmsync:fingerprint>f</vmsync:fingerprint></vmsync:sync>
  </metadata>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'><source file='/a b/c&amp;d.qcow2'/><target dev='vda' bus='virtio'/><alias name='x'/><address type='pci' slot='0x04'/></disk>
    <interface type='user'><mac address='52:54:00:00:00:01'/><model type='virtio'/></interface>
    <controller type='usb' index='0'/>
  </devices>
  <qemu:commandline><qemu:arg value='-x'/></qemu:commandline>
</domain>"#;

    #[test]
    fn definition_hash_is_stable_across_versions() {
        // state.json keeps these hashes as drift baselines: a printer that changed its
        // output would report every managed domain as drifted after an upgrade. (The
        // value is the one the printer of vmsync 0.1 gives, then the one with the
        // controllers sorted.)
        let doc = parse_doc(CORNERS).unwrap();
        assert_eq!(
            legacy_hash_doc(&doc),
            "2323d42ee0693d37c02a9765ea84ecd9823bf7d2ec5037047ac7c50d6cffaeed"
        );
        assert_eq!(
            definition_hash(CORNERS).as_deref(),
            Some("2281a112aed066490a90f21e0c1d83ae032ea3d4f5496da85860416349d94437")
        );
        let text = canonical(CORNERS).unwrap();
        assert!(
            text.contains("<title>onetwo &lt;raw&gt;&amp; three</title>"),
            "{text}"
        );
        assert!(
            text.contains("<app:y k='v&apos;\"&lt;'>t</app:y>"),
            "{text}"
        );
        assert!(
            !text.contains("vmsync:sync") && !text.contains("<alias"),
            "{text}"
        );
    }

    /// A q35 domain as libvirt returns it after define: `devices` with the controllers
    /// in the order `order` gives (indexes into `CONTROLLERS`), then `tail`.
    fn q35(order: &[usize], tail: &str) -> String {
        const CONTROLLERS: [&str; 4] = [
            "<controller type='usb' index='0' model='qemu-xhci'/>",
            "<controller type='pci' index='0' model='pcie-root'/>",
            "<controller type='virtio-serial' index='0'><address type='pci' bus='0x02'/></controller>",
            "<controller type='pci' index='10' model='pcie-root-port'><target chassis='10'/></controller>",
        ];
        let controllers: String = order.iter().map(|&i| CONTROLLERS[i]).collect();
        format!(
            "<domain type='qemu'><name>q</name><os><type machine='pc-q35-7.2'>hvm</type></os>\
             <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{controllers}{tail}</devices></domain>"
        )
    }

    #[test]
    fn controller_order_is_no_change_but_their_content_and_other_devices_order_are() {
        let disks = "<disk device='disk'><target dev='vda'/></disk><disk device='disk'><target dev='vdb'/></disk>";
        let defined = q35(&[0, 1, 2, 3], disks);
        // After a start libvirt moves virtio-serial behind the root ports.
        let started = q35(&[0, 1, 3, 2], disks);
        assert_ne!(defined, started);
        assert_eq!(definition_hash(&defined), definition_hash(&started));
        assert_eq!(
            definition_hash(&defined),
            definition_hash(&q35(&[3, 2, 1, 0], disks))
        );
        // Index 10 sorts after index 0 of the same type (numerically, not as text).
        let text = canonical(&started).unwrap();
        let at = |s: &str| text.find(s).unwrap();
        assert!(at("pcie-root'") < at("pcie-root-port'"), "{text}");
        assert!(
            at("<emulator>") < at("<controller") && at("</controller>") < at("<disk"),
            "{text}"
        );
        // No false negatives: a changed, missing or added controller is a change...
        for other in [
            defined.replace("qemu-xhci", "nec-xhci"),
            defined.replace("bus='0x02'", "bus='0x03'"),
            q35(&[0, 1, 3], disks),
            defined.replace(
                "</devices>",
                "<controller type='scsi' index='0'/></devices>",
            ),
        ] {
            assert_ne!(
                definition_hash(&defined),
                definition_hash(&other),
                "{other}"
            );
        }
        // ...and so is the order of disks (their boot order, their slots).
        let swapped = q35(
            &[0, 1, 2, 3],
            "<disk device='disk'><target dev='vdb'/></disk><disk device='disk'><target dev='vda'/></disk>",
        );
        assert_ne!(definition_hash(&defined), definition_hash(&swapped));
    }

    #[test]
    fn a_baseline_of_the_old_hash_matches_only_the_same_definition() {
        let defined = q35(&[0, 1, 2, 3], "");
        let legacy = legacy_hash_doc(&parse_doc(&defined).unwrap());
        let current = definition_hash(&defined).unwrap();
        assert_ne!(legacy, current);
        // Recorded by an older vmsync, definition unchanged: the baseline itself.
        assert_eq!(
            summarize_and_hash(&defined, Some(&legacy)).1,
            Some(legacy.clone())
        );
        assert_eq!(
            definition_hash_against(&defined, Some(&legacy)),
            Some(legacy.clone())
        );
        // Changed since: the current hash, which differs from the baseline.
        let changed = defined.replace("qemu-xhci", "nec-xhci");
        let now = definition_hash_against(&changed, Some(&legacy)).unwrap();
        assert!(now != legacy && Some(now) == definition_hash(&changed));
        // A current baseline, or none: the current hash.
        assert_eq!(
            definition_hash_against(&defined, Some(&current)),
            Some(current.clone())
        );
        assert_eq!(summarize_and_hash(&defined, None).1, Some(current));
    }

    #[test]
    fn summarize_and_hash_parse_once_to_the_same_answers() {
        for xml in [
            CORNERS,
            SRC,
            "<domain><name>x</name></domain>",
            "<vm/>",
            "<domain",
        ] {
            let (summary, hash) = summarize_and_hash(xml, None);
            assert_eq!(summary, summarize(xml).ok(), "{xml}");
            assert_eq!(hash, definition_hash(xml), "{xml}");
        }
    }

    #[test]
    fn summarize_reads_name_uuid_macs() {
        let s = summarize(SRC).unwrap();
        assert_eq!(s.name, "web");
        assert_eq!(s.uuid, None);
        assert_eq!(s.macs, vec![None, None, Some("52:54:00:aa:bb:cc".into())]);
        assert_eq!(s.tag, None);
    }

    #[test]
    fn render_fills_identity_and_tags_and_round_trips() {
        let macs = vec![
            Some("52:54:00:00:00:01".to_string()),
            Some("52:54:00:00:00:02".to_string()),
            Some("52:54:00:99:99:99".to_string()),
        ];
        let uuid = "0f7e1b9c-4a44-4a8e-9b0e-2b1f4a3c5d6e";
        let out = render(SRC, Some(uuid), &macs, &tag()).unwrap();
        let s = summarize(&out).unwrap();
        assert_eq!(s.uuid.as_deref(), Some(uuid));
        // The given MAC wins; missing ones are filled in.
        assert_eq!(
            s.macs,
            vec![
                macs[0].clone(),
                macs[1].clone(),
                Some("52:54:00:aa:bb:cc".into())
            ]
        );
        assert_eq!(s.tag, Some(tag()));
        assert!(
            out.contains("<memory unit='MiB'>512</memory>"),
            "the rest is untouched"
        );
        // Rendering again over the rendered XML replaces the tag instead of adding one.
        let newer = Tag {
            commit: "beef".into(),
            fingerprint: "f".into(),
        };
        let again = render(&out, None, &[], &newer).unwrap();
        assert_eq!(again.matches("vmsync:sync ").count(), 1);
        assert_eq!(read_tag(&again), Some(newer));
    }

    #[test]
    fn render_keeps_existing_metadata() {
        let src = SRC.replace(
            "<name>web</name>",
            "<name>web</name><metadata><x:a xmlns:x='urn:x'/></metadata>",
        );
        let out = render(&src, None, &[], &tag()).unwrap();
        assert!(out.contains("<x:a xmlns:x='urn:x'/>"));
        assert_eq!(read_tag(&out), Some(tag()));
    }

    #[test]
    fn bad_xml_is_reported_with_a_line() {
        let e = summarize("<domain>\n<name>x</name>\n<devices>\n</domain>").unwrap_err();
        assert_eq!(e.line, Some(4));
        assert!(e.message.starts_with("malformed xml"));
        let e = summarize("<network><name>x</name></network>").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("domain"));
        let e = summarize("<domain><uuid>1234</uuid><name>x</name></domain>").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("uuid"));
        let e = summarize("<domain type='kvm'><memory>1</memory></domain>").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("name"));
    }

    #[test]
    fn entity_declarations_are_refused() {
        let xml = "<!DOCTYPE d [<!ENTITY a 'aaaa'>]><domain><name>&a;</name></domain>";
        assert!(summarize(xml).is_err());
    }

    #[test]
    fn fingerprint_depends_on_every_byte() {
        assert_ne!(fingerprint(SRC), fingerprint(&SRC.replace("512", "513")));
        assert_eq!(fingerprint(SRC), fingerprint(SRC));
    }
}
