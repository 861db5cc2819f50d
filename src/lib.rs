//! vmsync: a git-ops pull agent for libvirt hosts.
//!
//! The source is a stack of layers. A module imports only from its own layer or the
//! layers below it, and the modules of one layer form no import cycle; `tests/layering.rs`
//! checks both on every `cargo test` (docs/design.md, "Source layout"). Bottom up:
//!
//! | L | modules | what they hold | effects |
//! | - | ------- | -------------- | ------- |
//! | 0 | [`util`] (`fsio`, `clock`, `commit_id`, `par`), [`repo::files`] | atomic file writes and the state directory's lock, the clock, the short commit id, a bounded parallel map; the `RepoFiles` port the desired state is read through | files |
//! | 1 | [`desired`], [`onboard::definition`] | what a commit asks for: manifest, values, disk and health specs, domain/network/pool XML, host policy, whole-commit validation, and the ports validation is handed (`schema_check`) | none |
//! | 2 | [`record`], [`repo`] (`source`, `https`, `probe`, `trust`) | what vmsync remembers (`record`, and `record::store` for `state.json`); the git fetch (and its `https://` transport), the change probe, the trust checks | state files, git |
//! | 3 | [`host`] | the seams to the host: libvirt (`hypervisor`), disks (`disk`), libvirt's schema (`schema_*`), observation (`observe_*`), power (`power`), health probes (`health_probe`) | libvirt, qemu-img |
//! | 4 | [`reconcile`] | the pure planner: plan types, plans for domains and for networks/pools, adopt, drift, diff, health rules, outcome types, every record update, rendering | none |
//! | 5 | [`apply`] | carrying a plan out through the seams (`vms`, `networks_pools`) and the health stage after it (`health_stage`) | libvirt, disks, files |
//! | 6 | [`agent`], [`config`], [`error`], [`cli`], [`onboard::import`] | one sync stage after stage, the daemon, the webhook, status and metrics; the configuration; the errors that decide the exit status; the command line; `vmsync import` | all |
//!
//! The modules are declared below in that order.

// Layer 0.
pub mod util;

// Layer 1 (with `onboard::definition`; `repo::files` is layer 0).
pub mod desired;

// Layer 2.
pub mod record;
pub mod repo;

// Layer 3.
pub mod host;

// Layer 4.
pub mod reconcile;

// Layer 5.
pub mod apply;

// Layer 6 (with `onboard::import`).
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
