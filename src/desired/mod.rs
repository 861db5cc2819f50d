//! What a commit asks for: the manifest, the domain XML, the host policy, and the
//! validation of the whole commit. Pure: no I/O except through the `RepoFiles` and
//! `SchemaChecker` it is handed.

pub mod domain_xml;
pub mod host_access;
pub mod host_policy;
pub mod manifest;
pub mod path_rule;
pub mod resource_xml;
pub mod resources;
pub mod template_render;
pub mod validate;
