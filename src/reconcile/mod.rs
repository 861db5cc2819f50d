//! Layer 4, the pure planner: from desired and observed state (and the record) to a plan
//! (`plan_types`, `plan`, `plan_networks_pools`, `adopt`, `drift`, `diff`, `policy`), the
//! health rules, what applying a plan did (`outcome`), every update of the record after
//! it (`record_update`), and the rendering of plans and outcomes. No I/O; `apply` carries
//! a plan out.

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
pub mod window_gate;
