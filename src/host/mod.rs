//! The host: the libvirt seam (`Hypervisor`), disk images (`DiskProvisioner`), libvirt's
//! schema and its cache, and the read-only observation of what the host has now.

pub mod disk;
pub mod health_probe;
pub mod hypervisor;
pub mod observe_domains;
pub mod observe_networks_pools;
pub mod power;
pub mod schema_cache;
pub mod schema_rng;
pub mod schema_test_driver;
