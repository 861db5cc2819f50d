//! The host: the libvirt seam (`Hypervisor`), disk images (`DiskProvisioner`), libvirt's
//! schema and its cache, and the read-only observation of what the host has now.

pub mod disk;
pub mod health;
pub mod hypervisor;
pub mod observe;
pub mod par;
pub mod resources;
pub mod rng;
pub mod schema_cache;
