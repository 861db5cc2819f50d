//! vmsync: a git-ops pull agent for libvirt hosts.
//!
//! The pipeline (see DESIGN.md), one module per stage; only `apply` and `state` change
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
pub mod files;
pub mod hypervisor;
pub mod manifest;
pub mod metrics;
pub mod observe;
pub mod par;
pub mod plan;
pub mod rng;
pub mod schema_cache;
pub mod source;
pub mod state;
pub mod status;
pub mod sync;
pub mod validate;
