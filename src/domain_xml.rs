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

fn parse_doc(xml: &str) -> Result<roxmltree::Document<'_>, XmlProblem> {
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

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none()
    })
}

fn text_of(node: roxmltree::Node) -> String {
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
    let doc = parse_doc(xml)?;
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
