//! vmsync: a git-ops pull agent for libvirt hosts.
//!
//! The pipeline, one stage per module, data flowing one way; the folders separate the
//! pure part from the parts with effects (docs/design.md, "Source layout"):
//!
//! ```text
//! config ─► repo::source ─► desired::{manifest, validate} ─► host::observe
//!        ─► reconcile::plan ─► reconcile::apply ─► agent::state
//! ```
//!
//! - [`repo`]: where the desired state comes from (git fetch, one pinned commit, its
//!   files, its signature and ancestry).
//! - [`desired`]: what the commit asks for (manifest, domain XML, host policy, whole-commit
//!   validation). Pure, apart from the schema check it is handed.
//! - [`host`]: what the host has and the seams that change it (libvirt, `qemu-img`),
//!   libvirt's schema and its cache.
//! - [`reconcile`]: the pure planner, drift and rendering, and `apply`, which carries a
//!   plan out through the seams.
//! - [`agent`]: one sync stage after stage, the daemon, the record and its lock, status
//!   and metrics.
//! - [`onboard`]: `vmsync import` and what `adopt = true` needs to take a domain over.
//! - [`cli`], [`config`], [`error`]: the command line, the agent's configuration, and the
//!   errors that decide the exit status.

pub mod util;

pub mod desired;

pub mod record;
pub mod repo;

pub mod host;

pub mod reconcile;

pub mod apply;

pub mod agent;
pub mod cli;
pub mod config;
pub mod error;
pub mod onboard;

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
