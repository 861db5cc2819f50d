//! Layer 5, the effects: carrying a plan out through the host's seams (domains, disks,
//! networks and pools) and the health stage that checks, and reverts, what was applied.

pub mod health_stage;
pub mod networks_pools;
pub mod ordered_start;
pub mod vms;
