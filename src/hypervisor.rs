//! The libvirt seam: the few hypervisor operations vmsync needs, behind a trait, and
//! their implementation with the `virt` crate. Tests point the same implementation at
//! libvirt's in-process `test:///default` driver or at a real libvirtd.
//!
//! Also the schema checker used by validation: libvirt's own RNG validation, run by
//! defining the domain into a private, empty test-driver connection (never the host's).

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

/// A libvirt call that failed, with libvirt's message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct HvError(pub String);

impl From<virt::error::Error> for HvError {
    fn from(e: virt::error::Error) -> Self {
        HvError(e.message().trim().to_string())
    }
}

/// One domain as listed by libvirt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub name: String,
    pub uuid: String,
    pub active: bool,
    pub autostart: bool,
    pub persistent: bool,
}

/// What vmsync asks of a hypervisor.
pub trait Hypervisor {
    /// Every domain, with state and autostart flag.
    fn list(&self) -> Result<Vec<Listing>, HvError>;
    /// The definition libvirt holds: the persistent (inactive) one, or the live one.
    fn xml(&self, name: &str, inactive: bool) -> Result<String, HvError>;
    /// Defines (or redefines in place) a domain, with libvirt's schema validation.
    fn define(&self, xml: &str) -> Result<(), HvError>;
    fn set_autostart(&self, name: &str, autostart: bool) -> Result<(), HvError>;
    fn start(&self, name: &str) -> Result<(), HvError>;
}

/// A libvirt connection.
pub struct Libvirt {
    conn: Connect,
    uri: String,
}

impl Libvirt {
    /// Connects to `uri` (e.g. `qemu:///system`, `test:///default`).
    pub fn connect(uri: &str) -> Result<Self, HvError> {
        // libvirt's default error handler prints every error to stderr; vmsync reports
        // errors itself.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| {
            HvError(format!(
                "failed to connect to libvirt at '{uri}': {}",
                e.message().trim()
            ))
        })?;
        Ok(Self {
            conn,
            uri: uri.to_string(),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the connection still works (libvirtd may have restarted).
    pub fn alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    fn lookup(&self, name: &str) -> Result<Domain, HvError> {
        Ok(self.conn.lookup_domain_by_name(name)?)
    }
}

impl Hypervisor for Libvirt {
    fn list(&self) -> Result<Vec<Listing>, HvError> {
        let domains = self.conn.list_all_domains(0)?;
        domains
            .iter()
            .map(|d| {
                Ok(Listing {
                    name: d.name()?,
                    uuid: d.uuid_string()?,
                    active: d.is_active()?,
                    autostart: d.autostart()?,
                    persistent: d.is_persistent()?,
                })
            })
            .collect()
    }

    fn xml(&self, name: &str, inactive: bool) -> Result<String, HvError> {
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        Ok(self.lookup(name)?.xml_desc(flags)?)
    }

    fn define(&self, xml: &str) -> Result<(), HvError> {
        self.conn
            .define_domain_xml_flags(xml, sys::VIR_DOMAIN_DEFINE_VALIDATE)?;
        Ok(())
    }

    fn set_autostart(&self, name: &str, autostart: bool) -> Result<(), HvError> {
        self.lookup(name)?.set_autostart(autostart)?;
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), HvError> {
        self.lookup(name)?.create()?;
        Ok(())
    }
}

/// Checks a domain XML against libvirt's schema without touching any host.
pub trait SchemaChecker {
    fn check(&self, xml: &str) -> Result<(), String>;
}

/// libvirt's schema validation through a private, empty `test:///` driver connection:
/// the XML is defined there with `VIR_DOMAIN_DEFINE_VALIDATE` and undefined again.
pub struct TestDriverSchema {
    conn: Connect,
    _node_file: tempfile::NamedTempFile,
}

impl TestDriverSchema {
    pub fn new() -> Result<Self, HvError> {
        virt::error::clear_error_callback();
        let mut node_file = tempfile::Builder::new()
            .prefix("vmsync-schema-")
            .suffix(".xml")
            .tempfile()
            .map_err(|e| {
                HvError(format!(
                    "failed to create the schema checker's node file: {e}"
                ))
            })?;
        std::io::Write::write_all(&mut node_file, b"<node/>\n").map_err(|e| {
            HvError(format!(
                "failed to write the schema checker's node file: {e}"
            ))
        })?;
        let uri = format!("test://{}", node_file.path().display());
        let conn = Connect::open(Some(&uri)).map_err(|e| {
            HvError(format!(
                "failed to open libvirt's test driver for schema checks: {}",
                e.message().trim()
            ))
        })?;
        Ok(Self {
            conn,
            _node_file: node_file,
        })
    }
}

impl SchemaChecker for TestDriverSchema {
    fn check(&self, xml: &str) -> Result<(), String> {
        let domain = self
            .conn
            .define_domain_xml_flags(xml, sys::VIR_DOMAIN_DEFINE_VALIDATE)
            .map_err(|e| e.message().trim().to_string())?;
        domain
            .undefine()
            .map_err(|e| e.message().trim().to_string())?;
        Ok(())
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
        assert!(err.contains("schema"), "{err}");
    }

    #[test]
    fn test_driver_round_trip() {
        let hv = Libvirt::connect("test:///default").unwrap();
        let xml = "<domain type='test'><name>vmsync-unit</name><memory>131072</memory><os><type>hvm</type></os></domain>";
        hv.define(xml).unwrap();
        let listed = hv.list().unwrap();
        let d = listed.iter().find(|d| d.name == "vmsync-unit").unwrap();
        assert!(!d.active && !d.autostart && d.persistent);
        hv.set_autostart("vmsync-unit", true).unwrap();
        hv.start("vmsync-unit").unwrap();
        let d = hv
            .list()
            .unwrap()
            .into_iter()
            .find(|d| d.name == "vmsync-unit")
            .unwrap();
        assert!(d.active && d.autostart);
        assert!(
            hv.xml("vmsync-unit", true)
                .unwrap()
                .contains("<name>vmsync-unit</name>")
        );
        assert!(hv.xml("nope", true).is_err());
    }
}
