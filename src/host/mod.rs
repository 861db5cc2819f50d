//! Layer 3, the host's seams: libvirt (`Hypervisor`, `Libvirt`), disk images
//! (`DiskProvisioner`), libvirt's schema checks and their cache, the read-only
//! observation of what the host has now, powering a domain off, the health probes, the
//! cloud-init seed images and this host's age identity for secrets.

pub mod disk;
pub mod health_probe;
pub mod hypervisor;
pub mod image_fetch;
pub mod image_store;
pub mod observe_domains;
pub mod observe_networks_pools;
pub mod power;
pub mod schema_cache;
pub mod schema_rng;
pub mod schema_test_driver;
pub mod secret_identity;
pub mod seed_file;
