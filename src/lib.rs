//! vmsync: a git-ops pull agent for libvirt hosts.
//!
//! The pipeline (see DESIGN.md): config → source → manifest → validate → observe → plan →
//! apply → state. One module per stage; only `apply` and `state` change the world.

pub mod disk;
pub mod files;
pub mod source;
