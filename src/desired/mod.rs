//! Layer 1, what a commit asks for: the manifest and its values, disk, health and
//! cloud-init specs, the domain, network and pool XML, the host policy, the cloud-init
//! seeds and the secrets they use, and the validation of the whole commit into a
//! `Desired`. Pure: no I/O except through the `RepoFiles`, `SchemaChecker` and
//! `SecretOpener` ports it is handed.

pub mod cloud_init_spec;
pub mod desired_state;
pub mod disk_spec;
pub mod domain_xml;
pub mod health_spec;
pub mod host_access;
pub mod host_policy;
pub mod host_policy_settings;
pub mod image_spec;
pub mod manifest;
pub mod network_pool_entries;
pub mod path_rule;
pub mod resource_xml;
pub mod schema_check;
pub mod secret_port;
pub mod seed_cache;
pub mod seed_spec;
pub mod start_order;
pub mod template_render;
pub mod template_secrets;
pub mod validate;
pub mod values;
pub mod window_spec;
