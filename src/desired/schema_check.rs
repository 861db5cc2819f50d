//! The ports whole-commit validation is handed: a check of a domain, network or pool
//! XML against libvirt's schema, and the normalization of a domain XML for plan diffs.
//! The host implements them (`host::schema_test_driver::TestDriverSchema`, `host::schema_cache`);
//! validation itself stays pure.

use crate::desired::domain_xml::DomainSummary;
use crate::desired::resource_xml::ResourceKind;
use crate::desired::template_render;

/// Why libvirt's check of a domain XML did not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// libvirt's schema or parser refused the XML (libvirt's or libxml2's message).
    #[error("rejected by libvirt: {0}")]
    Rejected(String),
    /// The check could not run (no test driver, no schema file).
    #[error("could not be checked against libvirt's schema: {0}")]
    Unavailable(String),
}

/// Checks a domain XML against libvirt's schema without touching any host.
pub trait SchemaChecker {
    fn check(&self, xml: &str) -> Result<(), SchemaError>;
    /// The summary of a file already validated, by `RepoFiles::content_id` (a cache).
    fn known(&self, _content_id: &str) -> Option<DomainSummary> {
        None
    }
    /// Remembers that the file with `content_id` validated, with its summary.
    fn remember(&self, _content_id: &str, _summary: &DomainSummary) {}
    /// Where rendered templates are remembered across syncs (none by default).
    fn render_cache(&self) -> Option<&dyn template_render::RenderCache> {
        None
    }
    /// Where cloud-init seeds are remembered across syncs (none by default).
    fn seed_cache(&self) -> Option<&dyn crate::desired::seed_cache::SeedCache> {
        None
    }
    /// Checks a network or pool XML against libvirt's schema and parser (the host's
    /// checkers do it in a private test-driver connection).
    fn check_resource(&self, kind: ResourceKind, xml: &str) -> Result<(), SchemaError>;
}

/// Turns a domain XML into the inactive XML libvirt makes of it, without touching any
/// host (for plan diffs of definitions not applied yet).
pub trait Normalizer {
    fn normalize(&self, xml: &str) -> Result<String, SchemaError>;
}
