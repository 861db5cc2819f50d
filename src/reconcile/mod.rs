//! From desired and observed state to a converged host: the pure planner, drift and
//! the plan's rendering, and `apply`, which carries a plan out through the host's seams.

pub mod adopt;
pub mod diff;
pub mod drift;
pub mod health_rules;
pub mod outcome;
pub mod plan;
pub mod plan_networks_pools;
pub mod plan_types;
pub mod policy;
pub mod record_update;
pub mod render;
