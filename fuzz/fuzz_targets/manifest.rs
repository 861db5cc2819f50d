//! Fuzzes the manifest loader: any text gives a manifest or problems, never a panic, and
//! every problem names the manifest file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(problems) = vmsync::desired::manifest::parse(text) {
        assert!(!problems.is_empty());
        for p in problems {
            assert_eq!(p.file, vmsync::desired::manifest::MANIFEST_FILE);
            let _ = p.to_string();
        }
    }
});
