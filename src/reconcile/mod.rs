//! From desired and observed state to a converged host: the pure planner, drift and
//! the plan's rendering, and `apply`, which carries a plan out through the host's seams.

pub mod apply;
pub mod diff;
pub mod drift;
pub mod health;
pub mod plan;
pub mod render;
pub mod resources;
