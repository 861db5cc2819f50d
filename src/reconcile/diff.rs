//! Readable diffs of domain definitions: a unified line diff of libvirt's normalized
//! inactive XML before and after, with what libvirt generates where the source gives
//! none left out (see `domain_xml::normalize_for_diff`), and how a sync logs one.

use crate::desired::domain_xml;
use crate::desired::schema_check::Normalizer;
use crate::reconcile::plan_types::Plan;

/// A unified diff of two texts (empty when equal).
pub fn unified(before: &str, after: &str, before_label: &str, after_label: &str) -> String {
    if before == after {
        return String::new();
    }
    similar::TextDiff::from_lines(before, after)
        .unified_diff()
        .context_radius(3)
        .header(before_label, after_label)
        .to_string()
}

/// Logs a definition diff one line per event, each with the VM and commit: under
/// journald every line of the log stream is an entry of its own, so a multi-line
/// message would leave all but one line without the fields.
pub fn log(vm: &str, commit: &str, diff: &str) {
    for line in diff.lines() {
        tracing::info!(vm = %vm, commit = %commit, line = %line, "definition diff");
    }
}

/// The diff between two libvirt definitions of a VM whose committed XML is `source`;
/// `before` is `None` for a domain that does not exist yet.
pub fn definition_diff(name: &str, before: Option<&str>, after: &str, source: &str) -> String {
    let before = before
        .map(|xml| domain_xml::normalize_for_diff(xml, source))
        .unwrap_or_default();
    let after = domain_xml::normalize_for_diff(after, source);
    unified(
        &before,
        &after,
        &format!("{name} (defined now)"),
        &format!("{name} (commit)"),
    )
}

/// Fills in each VM's diff for `vmsync plan`: the current inactive XML against what
/// libvirt makes of the XML vmsync would define, normalized through the private
/// test-driver connection (`normalizer`): libvirt's generic defaults are filled in the
/// same way as on the host, the QEMU driver's own ones are left out of both sides.
pub fn annotate(plan: &mut Plan, normalizer: &dyn Normalizer) {
    for vm in &mut plan.vms {
        let Some(rendered) = vm.rendered() else {
            continue;
        };
        let after = normalizer
            .normalize(rendered)
            .unwrap_or_else(|_| rendered.to_string());
        let text = definition_diff(&vm.name, vm.current_xml.as_deref(), &after, &vm.source_xml);
        vm.diff = (!text.is_empty()).then_some(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_diff_marks_changed_lines() {
        let d = unified("a\nb\nc\n", "a\nB\nc\n", "x (defined now)", "x (commit)");
        assert!(
            d.starts_with("--- x (defined now)\n+++ x (commit)\n"),
            "{d}"
        );
        assert!(d.contains("-b\n+B\n"), "{d}");
        assert_eq!(unified("a\n", "a\n", "l", "r"), "");
    }

    #[test]
    fn generated_values_do_not_show_but_changes_do() {
        let source = "<domain type='kvm'><name>w</name><memory unit='MiB'>128</memory><os><type arch='x86_64' machine='pc'>hvm</type></os><devices><interface type='user'/></devices></domain>";
        let host = "<domain type='kvm'>\n  <name>w</name>\n  <uuid>6a3f4c1e-0b2d-4e5f-8a9b-0c1d2e3f4a5b</uuid>\n  <metadata>\n    <vmsync:sync xmlns:vmsync='https://github.com/vmsync/vmsync/xmlns/domain/1'><vmsync:commit>c</vmsync:commit></vmsync:sync>\n  </metadata>\n  <memory unit='KiB'>131072</memory>\n  <os>\n    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>\n    <boot dev='hd'/>\n  </os>\n  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n    <controller type='usb' index='0'/>\n    <interface type='user'>\n      <mac address='52:54:00:12:34:56'/>\n      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>\n    </interface>\n    <memballoon model='virtio'/>\n  </devices>\n</domain>\n";
        let test_driver = "<domain type='kvm'>\n  <name>w</name>\n  <uuid>00000000-0b2d-4e5f-8a9b-0c1d2e3f4a5b</uuid>\n  <memory unit='KiB'>131072</memory>\n  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n  </os>\n  <devices>\n    <interface type='user'/>\n  </devices>\n</domain>\n";
        assert_eq!(definition_diff("w", Some(host), test_driver, source), "");
        let bigger = test_driver.replace("131072", "262144");
        let d = definition_diff("w", Some(host), &bigger, source);
        assert!(
            d.contains(
                "-  <memory unit='KiB'>131072</memory>\n+  <memory unit='KiB'>262144</memory>"
            ),
            "{d}"
        );
        assert_eq!(
            d.lines().filter(|l| l.starts_with(['+', '-'])).count(),
            4,
            "{d}"
        );
        let new = definition_diff("w", None, test_driver, source);
        assert!(new.contains("+  <name>w</name>"), "{new}");
    }
}
