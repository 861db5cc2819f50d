//! Onboarding: bringing the domains a host already has under vmsync without undefining
//! them (docs/moving-from-the-old-ways.md).
//!
//! - [`definition`]: the XML `vmsync import` writes for a domain, and the comparison that
//!   decides whether adopting it only adds vmsync's tag or redefines it in place. Pure
//!   (layer 1). The planner's part of `adopt = true` is `reconcile::adopt`.
//! - [`import`]: `vmsync import`, which reads the host's domains, networks and pools
//!   (never changes them) and writes a VM repository (layer 6).
//! - [`output`]: how import writes its files (never through a link) and what it leaves
//!   out of them (`<qemu:env>` values) (layer 6).

pub mod definition;
pub mod import;
pub mod output;
