//! Layer 0, shared utilities with no knowledge of VMs: atomic file writes and the
//! state-directory lock, the short commit id, the clock, a bounded parallel map, URL
//! redaction, reading a secret from its file, and an ISO 9660 image writer (cloud-init
//! seeds).

pub mod clock;
pub mod commit_id;
pub mod fsio;
pub mod iso9660;
pub mod par;
pub mod redact;
pub mod secret_file;
