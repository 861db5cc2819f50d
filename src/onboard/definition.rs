//! The definition of an existing domain as `vmsync import` writes it, and the test that
//! decides how `adopt = true` takes a domain over.
//!
//! Import starts from libvirt's inactive XML (`VIR_DOMAIN_XML_INACTIVE`, without
//! `VIR_DOMAIN_XML_SECURE`: secrets such as graphics passwords are not written) and
//! removes only what would churn: a vmsync tag left by another agent, and a `<metadata>`
//! element with nothing else in it (libvirt leaves `<metadata/>` behind when metadata is
//! removed). Everything libvirt generated on define is kept,
//! because it is the guest's identity or its ABI and a redefine without it could change
//! what the guest sees: UUID and MACs, PCI addresses (a NIC on another slot gets another
//! name in the guest), the expanded machine type (`pc-q35-7.2`, not `q35`), controllers,
//! the NVRAM path. The inactive XML holds no runtime-only data (aliases, `vnet` target
//! devices, dynamic security labels, VNC ports): those are only in the live XML.
//!
//! Adopting compares the commit's XML with the host's definition after the same cleaning,
//! both pretty-printed by [`domain_xml::canonical`] (whitespace, quoting and attribute
//! layout do not count). Equal: the definition did not change, and only the tag is added
//! (`virDomainSetMetadata`, no redefine). Different: the commit's XML is defined in place.

use crate::desired::domain_xml::{self, NAMESPACE, Tag, XmlProblem};

/// The element prefix of vmsync's tag (`<vmsync:sync>`), as `render` writes it.
pub const TAG_PREFIX: &str = "vmsync";

/// libvirt's inactive XML of a domain as `vmsync import` writes it: unchanged except that
/// a vmsync tag is removed, with the `<metadata>` element when nothing else is in it
/// (libvirt leaves an empty `<metadata/>` behind when metadata is removed).
pub fn clean(libvirt_xml: &str) -> Result<String, XmlProblem> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        ..Default::default()
    };
    let doc =
        roxmltree::Document::parse_with_options(libvirt_xml, options).map_err(|e| XmlProblem {
            line: Some(e.pos().row as usize),
            field: None,
            message: format!("malformed xml: {e}"),
        })?;
    let root = doc.root_element();
    let mut cuts: Vec<std::ops::Range<usize>> = Vec::new();
    for metadata in root
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "metadata")
        .filter(|c| c.tag_name().namespace().is_none())
    {
        let tags: Vec<_> = metadata
            .children()
            .filter(|c| c.is_element() && c.tag_name().namespace() == Some(NAMESPACE))
            .collect();
        let others = metadata
            .children()
            .any(|c| c.is_element() && c.tag_name().namespace() != Some(NAMESPACE));
        if tags.is_empty() && others {
            continue;
        }
        if others {
            cuts.extend(tags.iter().map(|t| with_indent(libvirt_xml, t.range())));
        } else {
            cuts.push(with_indent(libvirt_xml, metadata.range()));
        }
    }
    cuts.sort_by_key(|r| std::cmp::Reverse(r.start));
    let mut out = libvirt_xml.to_string();
    for range in cuts {
        out.replace_range(range, "");
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// libvirt's inactive XML of a storage pool as `vmsync import` writes it: [`clean`], and
/// without what the pool reports of its storage (`<capacity>`, `<allocation>`,
/// `<available>`), which changes as volumes are written and which libvirt does not take
/// from a definition.
pub fn clean_pool(libvirt_xml: &str) -> Result<String, XmlProblem> {
    let cleaned = clean(libvirt_xml)?;
    let doc = roxmltree::Document::parse(&cleaned).map_err(|e| XmlProblem {
        line: Some(e.pos().row as usize),
        field: None,
        message: format!("malformed xml: {e}"),
    })?;
    let mut cuts: Vec<std::ops::Range<usize>> = doc
        .root_element()
        .children()
        .filter(|c| {
            c.is_element() && matches!(c.tag_name().name(), "capacity" | "allocation" | "available")
        })
        .map(|c| with_indent(&cleaned, c.range()))
        .collect();
    cuts.sort_by_key(|r| std::cmp::Reverse(r.start));
    let mut out = cleaned.clone();
    for range in cuts {
        out.replace_range(range, "");
    }
    Ok(out)
}

/// `range` widened to its line's indentation and end of line, when the element stands
/// on lines of its own (as in libvirt's output), so no blank line is left behind.
fn with_indent(text: &str, range: std::ops::Range<usize>) -> std::ops::Range<usize> {
    let line_start = text[..range.start].rfind('\n').map_or(0, |i| i + 1);
    let before_blank = text[line_start..range.start].trim().is_empty();
    let rest = &text[range.end..];
    let line_end = rest.find('\n').map_or(text.len(), |i| range.end + i + 1);
    let after_blank = text[range.end..line_end].trim().is_empty();
    if before_blank && after_blank {
        line_start..line_end
    } else {
        range
    }
}

/// What a definition compares as: [`clean`], then [`domain_xml::canonical`].
fn comparable(xml: &str) -> Option<String> {
    domain_xml::canonical(&clean(xml).ok()?)
}

/// Whether the commit's `source` XML is the host's definition `libvirt_xml` (read with
/// `VIR_DOMAIN_XML_INACTIVE`) as import writes it: then adopting only adds the tag.
pub fn same_definition(libvirt_xml: &str, source: &str) -> bool {
    match (comparable(libvirt_xml), comparable(source)) {
        (Some(host), Some(commit)) => host == commit,
        _ => false,
    }
}

/// The element `virDomainSetMetadata` stores as vmsync's tag (libvirt puts it and its
/// children in [`NAMESPACE`] with the prefix [`TAG_PREFIX`]; `summarize` reads it back).
pub fn tag_element(tag: &Tag) -> String {
    format!(
        "<sync><commit>{}</commit><fingerprint>{}</fingerprint></sync>",
        tag.commit, tag.fingerprint
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What libvirt 9.0's QEMU driver returned for a hand-defined UEFI guest (shortened).
    const HOST: &str = "<domain type='qemu'>
  <name>web</name>
  <uuid>e20621b8-1d5a-4b53-bfeb-7b52ee652cef</uuid>
  <memory unit='KiB'>262144</memory>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader secure='yes'/>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='user'>
      <mac address='52:54:00:80:3c:2b'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
  </devices>
</domain>
";

    fn tagged(xml: &str, other_metadata: bool) -> String {
        let other = if other_metadata {
            "\n    <app:x xmlns:app='urn:app'>keep</app:x>"
        } else {
            ""
        };
        xml.replace(
            "  <memory",
            &format!(
                "  <metadata>{other}\n    <vmsync:sync xmlns:vmsync=\"{NAMESPACE}\">\n      <vmsync:commit>c</vmsync:commit>\n      <vmsync:fingerprint>f</vmsync:fingerprint>\n    </vmsync:sync>\n  </metadata>\n  <memory"
            ),
        )
    }

    #[test]
    fn clean_keeps_identity_and_abi_byte_for_byte() {
        // Nothing to remove: the text is libvirt's, unchanged.
        assert_eq!(clean(HOST).unwrap(), HOST);
        let out = clean(HOST).unwrap();
        for kept in [
            "<uuid>e20621b8-1d5a-4b53-bfeb-7b52ee652cef</uuid>",
            "<mac address='52:54:00:80:3c:2b'/>",
            "machine='pc-q35-7.2'",
            "<address type='pci' domain='0x0000' bus='0x01'",
        ] {
            assert!(out.contains(kept), "{kept} kept");
        }
    }

    #[test]
    fn clean_removes_a_vmsync_tag_and_the_metadata_it_leaves_empty() {
        assert_eq!(clean(&tagged(HOST, false)).unwrap(), HOST);
        let empty = HOST.replace("  <memory", "  <metadata/>\n  <memory");
        assert_eq!(clean(&empty).unwrap(), HOST);
        let out = clean(&tagged(HOST, true)).unwrap();
        assert!(
            out.contains("<app:x xmlns:app='urn:app'>keep</app:x>"),
            "{out}"
        );
        assert!(!out.contains("vmsync"), "{out}");
        assert!(domain_xml::summarize(&out).unwrap().tag.is_none());
        assert!(clean("<domain").is_err());
    }

    #[test]
    fn clean_pool_drops_what_the_pool_reports_of_its_storage() {
        let pool = "<pool type='dir'>\n  <name>vmpool</name>\n  <uuid>11111111-2222-3333-4444-555555555555</uuid>\n  <capacity unit='bytes'>1000</capacity>\n  <allocation unit='bytes'>10</allocation>\n  <available unit='bytes'>990</available>\n  <source>\n  </source>\n  <target>\n    <path>/var/lib/libvirt/images/vmpool</path>\n  </target>\n</pool>\n";
        let out = clean_pool(pool).unwrap();
        assert_eq!(
            out,
            "<pool type='dir'>\n  <name>vmpool</name>\n  <uuid>11111111-2222-3333-4444-555555555555</uuid>\n  <source>\n  </source>\n  <target>\n    <path>/var/lib/libvirt/images/vmpool</path>\n  </target>\n</pool>\n"
        );
    }

    #[test]
    fn same_definition_ignores_the_tag_and_layout_but_not_a_change() {
        let written = clean(HOST).unwrap();
        assert!(same_definition(HOST, &written));
        assert!(same_definition(&tagged(HOST, false), &written));
        // Layout and quoting do not count.
        let relaid = written.replace("'", "\"").replace("\n  ", "\n\t");
        assert!(same_definition(HOST, &relaid));
        // A changed value, a removed PCI address or a removed MAC does.
        assert!(!same_definition(HOST, &written.replace("262144", "524288")));
        let no_address = written.replace(
            "      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>\n",
            "",
        );
        assert!(!same_definition(HOST, &no_address));
        let no_mac = written.replace("      <mac address='52:54:00:80:3c:2b'/>\n", "");
        assert!(!same_definition(HOST, &no_mac));
        assert!(!same_definition(HOST, "<domain"));
    }

    #[test]
    fn the_tag_element_reads_back_as_the_tag() {
        let tag = Tag {
            commit: "c0ffee".into(),
            fingerprint: "f00d".into(),
        };
        // As libvirt stores it: the element and its children in vmsync's namespace.
        let element = tag_element(&tag)
            .replace(
                "<sync>",
                &format!("<{TAG_PREFIX}:sync xmlns:{TAG_PREFIX}='{NAMESPACE}'>"),
            )
            .replace("<commit>", "<vmsync:commit>")
            .replace("</commit>", "</vmsync:commit>")
            .replace("<fingerprint>", "<vmsync:fingerprint>")
            .replace("</fingerprint>", "</vmsync:fingerprint>")
            .replace("</sync>", "</vmsync:sync>");
        let xml = HOST.replace(
            "  <memory",
            &format!("  <metadata>{element}</metadata>\n  <memory"),
        );
        assert_eq!(domain_xml::read_tag(&xml), Some(tag));
    }
}
