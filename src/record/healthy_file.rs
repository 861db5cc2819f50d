//! Reading a VM's last healthy definition (`healthy/NAME.xml` in the state directory)
//! back, for a revert and for `vmsync status`. The file is only used when it is what the
//! record says it is: UTF-8 domain XML of that VM, carrying vmsync's tag with the
//! fingerprint recorded as the last healthy one. Anything else (missing, truncated,
//! edited, another VM's) is damage: it is reported with what to do, never defined.

use std::path::Path;

use crate::desired::domain_xml;
use crate::record::store;

/// What to do about a damaged healthy definition (in the log, status and the VM's error).
pub const WHAT_TO_DO: &str = "restore it from a backup, or delete it: vmsync then keeps the next definition that runs healthy (until then a failed check is not reverted)";

/// `vm`'s last healthy definition, when it is the one with `fingerprint`; why not
/// otherwise (the message names the file and says what to do).
pub fn read(state_dir: &Path, vm: &str, fingerprint: &str) -> Result<String, String> {
    let path = store::healthy_file(state_dir, vm);
    let damaged = |why: String| {
        format!(
            "the last healthy definition '{}' is damaged ({why}); it is not used: {WHAT_TO_DO}",
            path.display()
        )
    };
    let bytes = std::fs::read(&path).map_err(|e| damaged(format!("cannot be read: {e}")))?;
    let xml = String::from_utf8(bytes).map_err(|_| damaged("not UTF-8".into()))?;
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&xml, options)
        .map_err(|e| damaged(format!("not XML: {e}")))?;
    let root = doc.root_element();
    let name = root
        .children()
        .find(|c| c.is_element() && c.tag_name().name() == "name")
        .and_then(|n| n.text());
    if root.tag_name().name() != "domain" || name != Some(vm) {
        return Err(damaged(format!("not the domain definition of '{vm}'")));
    }
    match domain_xml::read_tag(&xml) {
        Some(tag) if tag.fingerprint == fingerprint => Ok(xml),
        Some(_) => Err(damaged(
            "its vmsync tag is not the recorded healthy definition's".into(),
        )),
        None => Err(damaged("it has no vmsync tag".into())),
    }
}
