//! Layer 0, shared utilities with no knowledge of VMs: atomic file writes and the
//! state-directory lock, the short commit id, the clock, and a bounded parallel map.

pub mod clock;
pub mod commit_id;
pub mod fsio;
pub mod par;
pub mod redact;
