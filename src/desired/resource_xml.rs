//! Network and storage-pool XML: what vmsync reads from a definition (name, UUID, its
//! ownership tag, a pool's target path), what it renders for libvirt (the existing UUID
//! inserted where the source gives none, and for networks vmsync's tag in `<metadata>`),
//! and the networks, pools and volumes a domain XML refers to.
//!
//! Network XML keeps a `<metadata>` element (libvirt 9.0), so a network carries the same
//! tag as a domain. Pool XML has no `<metadata>`: a pool's ownership is its name and
//! UUID in the state file (see `record::ResourceRecord`).

use crate::desired::domain_xml::{
    self, NAMESPACE, Tag, XmlProblem, child, parse_doc as parse, text_of as text,
};
use crate::desired::path_rule;

/// Networks or storage pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Network,
    Pool,
}

impl ResourceKind {
    /// The XML root element and the manifest's table name.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Network => "network",
            ResourceKind::Pool => "pool",
        }
    }
}

impl std::fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What vmsync reads from a network or pool definition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceSummary {
    pub name: String,
    pub uuid: Option<String>,
    /// vmsync's tag (networks only: pool XML has no `<metadata>`).
    pub tag: Option<Tag>,
    /// `<forward mode=…>` of a network.
    pub forward_mode: Option<String>,
    /// Whether a network sets `<mtu>`.
    pub mtu: bool,
    /// A pool's `type` (dir, logical, …).
    pub pool_type: Option<String>,
    /// A pool's `<target><path>`.
    pub target_path: Option<String>,
}

fn problem(line: Option<usize>, field: &str, message: impl Into<String>) -> XmlProblem {
    XmlProblem {
        line,
        field: Some(field.into()),
        message: message.into(),
    }
}

/// A UUID as libvirt reads it (`virUUIDParse`: 32 hex digits, with `-` or spaces
/// between the byte pairs anywhere, e.g. without dashes), in the 8-4-4-4-12 form.
pub fn libvirt_uuid(text: &str) -> Option<String> {
    let mut hex = String::with_capacity(32);
    let mut chars = text.trim().chars().peekable();
    while hex.len() < 32 {
        match chars.next()? {
            '-' | ' ' => continue,
            a if a.is_ascii_hexdigit() => {
                let b = chars.next().filter(char::is_ascii_hexdigit)?;
                hex.push(a.to_ascii_lowercase());
                hex.push(b.to_ascii_lowercase());
            }
            _ => return None,
        }
    }
    if chars.next().is_some() {
        return None;
    }
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// Reads a `<network>` or `<pool>` definition.
pub fn summarize(kind: ResourceKind, xml: &str) -> Result<ResourceSummary, XmlProblem> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let line = |n: roxmltree::Node| Some(doc.text_pos_at(n.range().start).row as usize);
    if root.tag_name().name() != kind.as_str() || root.tag_name().namespace().is_some() {
        return Err(problem(
            line(root),
            kind.as_str(),
            format!(
                "root element is <{}>, expected <{}>",
                root.tag_name().name(),
                kind.as_str()
            ),
        ));
    }
    // A logical pool without <name> is named after its volume group, as libvirt does.
    let source_name = || {
        (kind == ResourceKind::Pool && root.attribute("type") == Some("logical"))
            .then(|| child(root, "source").and_then(|s| child(s, "name")))
            .flatten()
            .map(text)
    };
    let name = child(root, "name")
        .map(text)
        .or_else(source_name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| problem(line(root), "name", format!("the {kind} has no <name>")))?;
    let uuid = match child(root, "uuid") {
        None => None,
        Some(node) => {
            let raw = text(node);
            let Some(uuid) = libvirt_uuid(&raw) else {
                return Err(problem(
                    line(node),
                    "uuid",
                    format!(
                        "'{}' is not a uuid (32 hex digits, dashes optional)",
                        path_rule::shown(&raw, 80)
                    ),
                ));
            };
            Some(uuid)
        }
    };
    let tag = child(root, "metadata")
        .and_then(|m| {
            m.children()
                .find(|c| c.is_element() && c.tag_name().namespace() == Some(NAMESPACE))
        })
        .map(|node| {
            let field = |name: &str| {
                node.children()
                    .find(|c| c.is_element() && c.tag_name().name() == name)
                    .map(text)
                    .unwrap_or_default()
            };
            Tag {
                commit: field("commit"),
                fingerprint: field("fingerprint"),
            }
        });
    Ok(ResourceSummary {
        name,
        uuid,
        tag,
        forward_mode: child(root, "forward")
            .map(|f| f.attribute("mode").unwrap_or("nat").to_string()),
        mtu: child(root, "mtu").is_some(),
        pool_type: (kind == ResourceKind::Pool)
            .then(|| root.attribute("type").map(str::to_string))
            .flatten(),
        target_path: child(root, "target")
            .and_then(|t| child(t, "path"))
            .map(text),
    })
}

/// The XML vmsync defines for a network or pool: the source with the existing `uuid`
/// inserted where it gives none, and (networks) vmsync's `tag` in `<metadata>`.
pub fn render(
    kind: ResourceKind,
    source: &str,
    uuid: Option<&str>,
    tag: &Tag,
) -> Result<String, XmlProblem> {
    match kind {
        // A network has no <devices>: the domain renderer only inserts the UUID and the tag.
        ResourceKind::Network => domain_xml::render(source, uuid, &[], tag),
        ResourceKind::Pool => {
            let doc = parse(source)?;
            let root = doc.root_element();
            match (child(root, "uuid"), uuid) {
                (None, Some(uuid)) => {
                    // After <name>, or (a logical pool named by its volume group)
                    // after the root's start tag.
                    let at = match child(root, "name") {
                        Some(name) => name.range().end,
                        None => {
                            let start = root.range().start;
                            start + source[start..].find('>').map_or(0, |i| i + 1)
                        }
                    };
                    let mut out = source.to_string();
                    out.insert_str(at, &format!("\n  <uuid>{uuid}</uuid>"));
                    Ok(out)
                }
                _ => Ok(source.to_string()),
            }
        }
    }
}

/// What a network's or pool's drift is judged on: `domain_xml::definition_hash` of
/// libvirt's inactive XML, without what a pool reports of its storage (`<capacity>`,
/// `<allocation>`, `<available>`: they change as volumes are written). `None` if it does
/// not parse.
pub fn definition_hash(kind: ResourceKind, libvirt_xml: &str) -> Option<String> {
    if kind == ResourceKind::Network {
        return domain_xml::definition_hash(libvirt_xml);
    }
    let doc = parse(libvirt_xml).ok()?;
    let mut ranges: Vec<std::ops::Range<usize>> = doc
        .root_element()
        .children()
        .filter(|c| {
            c.is_element() && matches!(c.tag_name().name(), "capacity" | "allocation" | "available")
        })
        .map(|c| c.range())
        .collect();
    ranges.sort_by_key(|r| std::cmp::Reverse(r.start));
    let mut text = libvirt_xml.to_string();
    for r in ranges {
        text.replace_range(r, "");
    }
    domain_xml::definition_hash(&text)
}

/// A network's definition hashed for comparing what runs with what is persistent:
/// [`definition_hash`] without the `connections` count libvirt adds to the live XML and
/// without a `<metadata>` that holds nothing but vmsync's tag (an adopted network runs
/// its untagged definition until it restarts). Apply it to both sides.
pub fn live_hash(kind: ResourceKind, xml: &str) -> Option<String> {
    let doc = parse(xml).ok()?;
    let root = doc.root_element();
    let mut cuts: Vec<std::ops::Range<usize>> = root
        .children()
        .filter(|c| {
            c.is_element()
                && c.tag_name().name() == "metadata"
                && c.children()
                    .filter(|m| m.is_element())
                    .all(|m| m.tag_name().namespace() == Some(NAMESPACE))
        })
        .map(|c| c.range())
        .collect();
    if let Some(count) = root.attribute("connections") {
        let start = root.range().start;
        let head = &xml[start..start + xml[start..].find('>')?];
        for quote in ['\'', '"'] {
            let attr = format!(" connections={quote}{count}{quote}");
            if let Some(at) = head.find(&attr) {
                cuts.push(start + at..start + at + attr.len());
            }
        }
    }
    cuts.sort_by_key(|r| std::cmp::Reverse(r.start));
    let mut text = xml.to_string();
    for r in cuts {
        text.replace_range(r, "");
    }
    definition_hash(kind, &text)
}
/// The XML of a volume vmsync creates through libvirt's storage API.
pub fn volume_xml(
    name: &str,
    size_bytes: u64,
    format: &str,
    backing: Option<(&str, Option<&str>)>,
) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('\'', "&apos;")
    };
    let mut xml = format!(
        "<volume>\n  <name>{}</name>\n  <capacity unit='bytes'>{size_bytes}</capacity>\n  <target>\n    <format type='{format}'/>\n  </target>\n",
        esc(name)
    );
    if let Some((path, fmt)) = backing {
        xml += &format!("  <backingStore>\n    <path>{}</path>\n", esc(path));
        if let Some(fmt) = fmt {
            xml += &format!("    <format type='{fmt}'/>\n");
        }
        xml += "  </backingStore>\n";
    }
    xml + "</volume>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: &str = "<network>\n  <name>lab</name>\n  <forward mode='bridge'/>\n  <bridge name='br0'/>\n</network>";
    const POOL: &str = "<pool type='dir'>\n  <name>vmpool</name>\n  <target>\n    <path>/srv/images/pool</path>\n  </target>\n</pool>";

    #[test]
    fn a_logical_pool_without_name_is_named_after_its_volume_group() {
        let xml = "<pool type='logical'>\n  <source>\n    <name>zily</name>\n  </source>\n</pool>";
        let s = summarize(ResourceKind::Pool, xml).unwrap();
        assert_eq!(s.name, "zily");
        let tag = Tag {
            commit: "c".into(),
            fingerprint: "f".into(),
        };
        let uuid = "11111111-2222-3333-4444-555555555555";
        let out = render(ResourceKind::Pool, xml, Some(uuid), &tag).unwrap();
        let s = summarize(ResourceKind::Pool, &out).unwrap();
        assert_eq!(
            (s.name.as_str(), s.uuid.as_deref()),
            ("zily", Some(uuid)),
            "{out}"
        );
        // Other pools still need a <name>.
        let dir = "<pool type='dir'><source><name>x</name></source></pool>";
        assert!(summarize(ResourceKind::Pool, dir).is_err());
    }

    #[test]
    fn uuids_are_read_as_libvirt_reads_them() {
        let canonical = "0123abcd-0000-1111-2222-333344445555";
        for form in [
            canonical,
            "0123ABCD000011112222333344445555",
            " 0123abcd-0000-1111-2222-333344445555 ",
            "01-23-ab-cd-0000-1111-2222-333344445555",
        ] {
            assert_eq!(libvirt_uuid(form).as_deref(), Some(canonical), "{form}");
        }
        for bad in [
            "",
            "0123abcd",
            "0123abcd0000111122223333444455556",
            "g123abcd000011112222333344445555",
            "0-123abcd000011112222333344445555",
        ] {
            assert_eq!(libvirt_uuid(bad), None, "{bad}");
        }
        let net = "<network><name>n</name><uuid>0123abcd000011112222333344445555</uuid></network>";
        let s = summarize(ResourceKind::Network, net).unwrap();
        assert_eq!(s.uuid.as_deref(), Some(canonical));
    }

    #[test]
    fn summarizes_networks_and_pools() {
        let n = summarize(ResourceKind::Network, NET).unwrap();
        assert_eq!(n.name, "lab");
        assert_eq!(n.forward_mode.as_deref(), Some("bridge"));
        assert!(!n.mtu && n.uuid.is_none() && n.tag.is_none());
        let p = summarize(ResourceKind::Pool, POOL).unwrap();
        assert_eq!(p.pool_type.as_deref(), Some("dir"));
        assert_eq!(p.target_path.as_deref(), Some("/srv/images/pool"));
        let e = summarize(ResourceKind::Pool, NET).unwrap_err();
        assert!(e.message.contains("expected <pool>"), "{e:?}");
        let e = summarize(ResourceKind::Network, "<network><name>x</name>").unwrap_err();
        assert!(e.message.contains("malformed"), "{e:?}");
        let e = summarize(ResourceKind::Network, "<network/>").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("name"));
    }

    #[test]
    fn render_inserts_the_uuid_and_tags_networks_only() {
        let tag = Tag {
            commit: "c1".into(),
            fingerprint: "f1".into(),
        };
        let uuid = "11111111-2222-3333-4444-555555555555";
        let n = render(ResourceKind::Network, NET, Some(uuid), &tag).unwrap();
        let s = summarize(ResourceKind::Network, &n).unwrap();
        assert_eq!(s.uuid.as_deref(), Some(uuid));
        assert_eq!(s.tag, Some(tag.clone()));
        let p = render(ResourceKind::Pool, POOL, Some(uuid), &tag).unwrap();
        let s = summarize(ResourceKind::Pool, &p).unwrap();
        assert_eq!(s.uuid.as_deref(), Some(uuid));
        assert_eq!(s.tag, None);
        // A source with its own UUID is kept as is.
        let own = POOL.replace(
            "</name>",
            "</name><uuid>aaaaaaaa-2222-3333-4444-555555555555</uuid>",
        );
        assert_eq!(
            render(ResourceKind::Pool, &own, Some(uuid), &tag).unwrap(),
            own
        );
    }

    #[test]
    fn a_pools_storage_figures_are_no_drift() {
        let a = "<pool type='dir'><name>p</name><capacity unit='bytes'>1</capacity><allocation unit='bytes'>2</allocation><available unit='bytes'>3</available><target><path>/x</path></target></pool>";
        let b = a.replace("'>1<", "'>9<").replace("'>3<", "'>7<");
        let h = |x: &str| definition_hash(ResourceKind::Pool, x);
        assert_eq!(h(a), h(&b));
        assert_ne!(h(a), h(&a.replace("/x", "/y")));
    }

    #[test]
    fn finds_network_and_volume_references() {
        let xml = "<domain><name>a</name><devices><interface type='network'><source network='lab'/></interface><interface type='bridge'><source bridge='br0'/></interface><disk type='volume' device='disk'><source pool='vmpool' volume='a.qcow2'/></disk><disk type='file'><source file='/x'/></disk></devices></domain>";
        let r = domain_xml::summarize(xml).unwrap().refs;
        assert_eq!(r.networks, vec!["lab".to_string()]);
        assert_eq!(
            r.volumes,
            vec![("vmpool".to_string(), "a.qcow2".to_string())]
        );
    }

    #[test]
    fn a_live_network_hashes_as_its_definition_without_the_connections_count_or_tag() {
        let h = |xml: &str| live_hash(ResourceKind::Network, xml);
        let inactive = "<network>\n  <name>n</name>\n  <bridge name='virbr1'/>\n</network>";
        let tagged = format!(
            "<network>\n  <name>n</name>\n  <metadata><vmsync:sync xmlns:vmsync='{NAMESPACE}'><vmsync:commit>c</vmsync:commit></vmsync:sync></metadata>\n  <bridge name='virbr1'/>\n</network>"
        );
        let live =
            "<network connections='2'>\n  <name>n</name>\n  <bridge name='virbr1'/>\n</network>";
        let other =
            "<network connections='2'>\n  <name>n</name>\n  <bridge name='virbr2'/>\n</network>";
        let other_metadata = "<network>\n  <name>n</name>\n  <metadata><x:a xmlns:x='urn:x'/></metadata>\n  <bridge name='virbr1'/>\n</network>";
        assert!(h(inactive).is_some());
        assert_eq!(h(live), h(inactive));
        assert_eq!(h(&tagged), h(inactive));
        assert_ne!(h(other), h(inactive));
        assert_ne!(h(other_metadata), h(inactive));
    }

    #[test]
    fn volume_xml_has_capacity_format_and_backing() {
        let x = volume_xml(
            "a.qcow2",
            1 << 30,
            "qcow2",
            Some(("/b.qcow2", Some("qcow2"))),
        );
        assert!(
            x.contains("<capacity unit='bytes'>1073741824</capacity>"),
            "{x}"
        );
        assert!(
            x.contains("<backingStore>\n    <path>/b.qcow2</path>"),
            "{x}"
        );
        assert!(!volume_xml("r", 1, "raw", None).contains("backingStore"));
    }
}
