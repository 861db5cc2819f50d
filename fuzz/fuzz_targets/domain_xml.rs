//! Fuzzes the domain XML reader, renderer and host policy (also the network and pool
//! checks, and the path and name rule on the text): any text is summarized or refused
//! without a panic; what is summarized renders, and the rendered XML reads back
//! with the same name and uuid and vmsync's tag.
#![no_main]

use libfuzzer_sys::fuzz_target;

use vmsync::desired::domain_xml::{Tag, fingerprint, render, summarize};

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    let _ = vmsync::desired::host_policy::check(
        xml,
        &vmsync::desired::host_policy_settings::HostPolicy::default(),
        &["/var/lib/libvirt/images".into()],
    );
    let roots = [std::path::PathBuf::from("/var/lib/libvirt/images")];
    let policy = vmsync::desired::host_policy_settings::HostPolicy::default();
    let _ = vmsync::desired::host_access::check_pool(xml, &policy, &roots);
    let _ = vmsync::desired::host_access::check_network(xml, &policy, &roots);
    if let Err(e) = vmsync::desired::path_rule::absolute(xml) {
        assert!(!e.chars().any(vmsync::desired::path_rule::is_forbidden_char));
    }
    let _ = vmsync::desired::path_rule::check_name("vm", xml);
    let Ok(summary) = summarize(xml) else {
        return;
    };
    let tag = Tag {
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        fingerprint: fingerprint(xml),
    };
    let uuid = "0f7e1b9c-4a44-4a8e-9b0e-2b1f4a3c5d6e";
    let macs = vec![Some("52:54:00:00:00:01".to_string()); summary.macs.len()];
    let out = render(xml, Some(uuid), &macs, &tag).expect("a summarized XML renders");
    let again = summarize(&out).expect("rendered XML reads back");
    assert_eq!(again.name, summary.name);
    assert_eq!(again.uuid.as_deref(), Some(summary.uuid.as_deref().unwrap_or(uuid)));
    assert_eq!(again.tag, Some(tag));
});
