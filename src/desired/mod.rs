//! Layer 1, what a commit asks for: the manifest and its values, disk and health specs,
//! the domain, network and pool XML, the host policy, and the validation of the whole
//! commit into a `Desired`. Pure: no I/O except through the `RepoFiles` and
//! `SchemaChecker` ports it is handed.

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
pub mod template_render;
pub mod validate;
pub mod values;
