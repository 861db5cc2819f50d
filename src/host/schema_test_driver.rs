//! libvirt's schema and parser check, run in a private, empty `test:///` driver
//! connection that touches no host: [`TestDriverSchema`] for domain XML (and its
//! normalization for plan diffs), [`check_xml`] for network and pool XML.

use std::cell::RefCell;
use std::collections::BTreeMap;

use virt::connect::Connect;
use virt::sys;

use crate::desired::resource_xml::ResourceKind;
use crate::desired::schema_check::{Normalizer, SchemaChecker, SchemaError};
use crate::host::hypervisor::HvError;
use crate::host::schema_rng;

fn err(e: virt::error::Error) -> SchemaError {
    SchemaError::Rejected(e.message().trim().into())
}

/// A private, empty test-driver connection and libvirt's compiled network and pool
/// schemas, per thread (validation runs on one thread).
struct Checker {
    conn: Connect,
    _node: tempfile::NamedTempFile,
    schemas: BTreeMap<ResourceKind, Result<schema_rng::Schema, SchemaError>>,
}

thread_local! {
    static CHECKER: RefCell<Option<Checker>> = const { RefCell::new(None) };
}

fn schema_file(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Network => "network.rng",
        ResourceKind::Pool => "storagepool.rng",
    }
}

/// libvirt's check of a network or pool XML, without touching any host: its RNG schema
/// (`network.rng`, `storagepool.rng`), then its parser, by defining the XML into a
/// private test-driver connection and undefining it.
pub fn check_xml(kind: ResourceKind, xml: &str) -> Result<(), SchemaError> {
    CHECKER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            virt::error::clear_error_callback();
            let node = tempfile::Builder::new()
                .prefix("vmsync-schema-")
                .suffix(".xml")
                .tempfile()
                .and_then(|mut f| {
                    std::io::Write::write_all(&mut f, b"<node/>\n")?;
                    Ok(f)
                })
                .map_err(|e| {
                    SchemaError::Unavailable(format!(
                        "failed to write the test driver's node file: {e}"
                    ))
                })?;
            let uri = format!("test://{}", node.path().display());
            let conn = Connect::open(Some(&uri)).map_err(|e| {
                SchemaError::Unavailable(format!("failed to open '{uri}': {}", e.message()))
            })?;
            *cell = Some(Checker {
                conn,
                _node: node,
                schemas: BTreeMap::new(),
            });
        }
        let checker = cell.as_mut().expect("just made");
        let schema = checker.schemas.entry(kind).or_insert_with(|| {
            let file = schema_file(kind);
            let path = schema_rng::SCHEMA_DIRS
                .iter()
                .map(|d| std::path::Path::new(d).join(file))
                .find(|p| p.is_file())
                .ok_or_else(|| SchemaError::Unavailable(format!("libvirt's {file} not found")))?;
            schema_rng::Schema::compile(&path)
        });
        match schema {
            Ok(schema) => schema.validate(xml)?,
            Err(e) => return Err(e.clone()),
        }
        match kind {
            ResourceKind::Network => {
                let n = checker.conn.define_network_xml(xml).map_err(err)?;
                n.undefine().map_err(err)
            }
            ResourceKind::Pool => {
                let p = checker.conn.define_storage_pool_xml(xml, 0).map_err(err)?;
                p.undefine().map_err(err)
            }
        }
    })
}

/// libvirt's schema validation through a private, empty `test:///` driver connection:
/// the XML is defined there with `VIR_DOMAIN_DEFINE_VALIDATE` and undefined again.
pub struct TestDriverSchema {
    conn: Connect,
    _node_file: tempfile::NamedTempFile,
    /// libvirt's RNG schema compiled on the first check (`None` until then; `Some(Err)`
    /// without the schema file, and libvirt validates instead).
    schema: std::cell::OnceCell<Result<schema_rng::Schema, SchemaError>>,
}

impl TestDriverSchema {
    pub fn new() -> Result<Self, HvError> {
        virt::error::clear_error_callback();
        let node_file = tempfile::Builder::new()
            .prefix("vmsync-schema-")
            .suffix(".xml")
            .tempfile()
            .and_then(|mut file| {
                std::io::Write::write_all(&mut file, b"<node/>\n")?;
                Ok(file)
            })
            .map_err(|e| {
                let message = format!("failed to write the test driver's node file: {e}");
                HvError::new("connect to libvirt", None, "test:///", &message)
            })?;
        let uri = format!("test://{}", node_file.path().display());
        let conn = Connect::open(Some(&uri))
            .map_err(|e| HvError::new("connect to libvirt", None, &uri, e.message()))?;
        Ok(Self {
            conn,
            _node_file: node_file,
            schema: std::cell::OnceCell::new(),
        })
    }
}

impl SchemaChecker for TestDriverSchema {
    /// libvirt's RNG schema (compiled once, see `schema_rng`), then libvirt's own parser: the
    /// XML is defined into the private test driver without re-validating, and undefined.
    /// Without the schema file, libvirt validates (slower, same result).
    fn check(&self, xml: &str) -> Result<(), SchemaError> {
        let rejected = |e: virt::error::Error| SchemaError::Rejected(e.message().trim().into());
        let flags = match self.schema.get_or_init(schema_rng::domain_schema) {
            Ok(schema) => {
                schema.validate(xml)?;
                0
            }
            Err(_) => sys::VIR_DOMAIN_DEFINE_VALIDATE,
        };
        let domain = self
            .conn
            .define_domain_xml_flags(xml, flags)
            .map_err(rejected)?;
        domain.undefine().map_err(rejected)?;
        Ok(())
    }

    fn check_resource(&self, kind: ResourceKind, xml: &str) -> Result<(), SchemaError> {
        crate::host::schema_test_driver::check_xml(kind, xml)
    }
}

/// Defines the XML in the private test driver, reads its inactive XML back, undefines it.
/// The test driver fills in libvirt's generic defaults (units, placement, on_* actions)
/// but not the QEMU driver's (machine type, controllers, PCI addresses), which the diff
/// normalization in `domain_xml` ignores where the source gives none.
impl Normalizer for TestDriverSchema {
    fn normalize(&self, xml: &str) -> Result<String, SchemaError> {
        let rejected = |e: virt::error::Error| SchemaError::Rejected(e.message().trim().into());
        let domain = self
            .conn
            .define_domain_xml_flags(xml, sys::VIR_DOMAIN_DEFINE_VALIDATE)
            .map_err(rejected)?;
        let out = domain.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE);
        let undefined = domain.undefine();
        let out = out.map_err(rejected)?;
        undefined.map_err(rejected)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_checker_accepts_good_and_rejects_bad_xml() {
        let schema = TestDriverSchema::new().unwrap();
        let good = "<domain type='kvm'><name>a</name><memory>131072</memory><os><type arch='x86_64'>hvm</type></os></domain>";
        schema.check(good).unwrap();
        // The same name again works: the check leaves nothing defined.
        schema.check(good).unwrap();
        let bad = good
            .replace("<memory>", "<memroy>")
            .replace("</memory>", "</memroy>");
        let err = schema.check(&bad).unwrap_err();
        let SchemaError::Rejected(message) = &err else {
            panic!("{err:?}")
        };
        assert!(
            message.starts_with("XML document failed to validate against schema")
                && message.contains("memroy"),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("rejected by libvirt: "),
            "{err}"
        );
    }

    #[test]
    fn normalizer_returns_libvirts_xml_and_leaves_nothing_defined() {
        let schema = TestDriverSchema::new().unwrap();
        let xml = "<domain type='kvm'><name>n</name><memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>";
        let out = schema.normalize(xml).unwrap();
        assert!(out.contains("<memory unit='KiB'>131072</memory>"), "{out}");
        assert!(out.contains("<vcpu placement='static'>1</vcpu>"), "{out}");
        schema.normalize(xml).unwrap();
        schema.check(xml).unwrap();
    }
}
