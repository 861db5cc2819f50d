//! vmsync: a git-ops pull agent for libvirt hosts.
//!
//! The pipeline (see docs/design.md), one module per stage; only `apply` and `state` change
//! the world:
//! `config` → `source` → `manifest` → `validate` → `observe` → `plan` → `apply` → `state`.
//! Seams: `hypervisor` (libvirt through the `virt` crate) and `disk` (`qemu-img`).
//! `sync` strings the stages together; `cli` is the command line; `status` the report.

pub mod apply;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod diff;
pub mod disk;
pub mod domain_xml;
pub mod drift;
pub mod error;
pub mod files;
pub mod host_policy;
pub mod hypervisor;
pub mod manifest;
pub mod metrics;
pub mod observe;
pub mod par;
pub mod plan;
pub mod render;
pub mod rng;
pub mod schema_cache;
pub mod source;
pub mod state;
pub mod status;
pub mod sync;
pub mod trust;
pub mod validate;

/// A named crash point for the fault tests (tests/faults.rs). Built with the `failpoints`
/// feature and run with `FAILPOINTS=<name>=return`, the process aborts right there, like
/// a power cut: no destructor, no cleanup, no record. Without the feature it is nothing.
#[inline(always)]
pub fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("fail point '{name}' reached: aborting");
        std::process::abort();
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Helpers for unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::Path;

    /// Writes an executable shell script at `path`. The file is written by a child
    /// process (`install`), not by the test process: a file this process holds open for
    /// writing is inherited by any child another test thread forks at that moment, and
    /// executing it then fails with "Text file busy" (ETXTBSY).
    pub fn executable_script(path: &Path, body: &str) {
        let source = path.with_extension("script-source");
        std::fs::write(&source, format!("#!/bin/sh\n{body}\n")).unwrap();
        let status = std::process::Command::new("install")
            .args(["-m", "755"])
            .arg(&source)
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "install {}", path.display());
    }
}
