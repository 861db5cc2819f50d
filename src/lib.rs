//! vmsync: a git-ops pull agent for libvirt hosts.
//!
//! The source is a stack of layers. A module imports only from its own layer or the
//! layers below it, and the modules of one layer form no import cycle; `tests/layering.rs`
//! checks both on every `cargo test` (docs/design.md, "Source layout"). Bottom up:
//!
//! | L | modules | what they hold | effects |
//! | - | ------- | -------------- | ------- |
//! | 0 | [`util`] (`fsio`, `clock`, `commit_id`, `par`, `redact`, `secret_file`, `iso9660`), [`repo::files`] | atomic file writes and the state directory's lock, the clock, the short commit id, a bounded parallel map, URL redaction, a secret read from its file, an ISO 9660 writer; the `RepoFiles` port the desired state is read through (and `MemoryFiles`, its in-memory fake for tests) | files |
//! | 1 | [`desired`], [`onboard::definition`] | what a commit asks for: manifest, values, disk, health and cloud-init specs, seeds, domain/network/pool XML, host policy, whole-commit validation, and the ports validation is handed (`schema_check`, `secret_port`) | none |
//! | 2 | [`record`], [`repo`] (`source`, `https`, `pkt_line`, `probe`, `trust`) | what vmsync remembers (`record`, and `record::store` for `state.json`); the git fetch (and its own `https://` client), the change probe, the trust checks | state files, git |
//! | 3 | [`host`], `testing` | the seams to the host: libvirt (`hypervisor`), disks (`disk`), libvirt's schema (`schema_*`), observation (`observe_*`), power (`power`), health probes (`health_probe`), seed images (`seed_file`), the host's age identity (`secret_identity`); the fake host of the tests (`testing`, test builds only) | libvirt, qemu-img, seed images |
//! | 4 | [`reconcile`] | the pure planner: plan types, plans for domains and for networks/pools, adopt, drift, diff, health rules, outcome types, every record update, rendering | none |
//! | 5 | [`apply`] | carrying a plan out through the seams (`vms`, `networks_pools`) and the health stage after it (`health_stage`) | libvirt, disks, files |
//! | 6 | [`agent`], [`config`], [`error`], [`cli`], [`onboard::import`] | one sync stage after stage, the daemon, the webhook, status and metrics; the configuration; the errors that decide the exit status; the command line; `vmsync import` | all |
//!
//! The modules are declared below in that order. No function outside the tests is over
//! 100 lines: `cargo clippy` checks it (`clippy::too_many_lines`, clippy.toml).

#![cfg_attr(not(test), warn(clippy::too_many_lines))]

// Layer 0.
pub mod util;

// Layer 1 (with `onboard::definition`; `repo::files` is layer 0).
pub mod desired;

// Layer 2.
pub mod record;
pub mod repo;

// Layer 3 (with `testing`, declared at the end).
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

/// The fake host shared by unit and integration tests (layer 3, beside the seams it
/// fakes); compiled for `cargo test` only (the `test-support` feature).
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
