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
    /// Whether the domain runs now.
    fn is_active(&self, name: &str) -> Result<bool, HvError>;
    /// Asks the guest to shut down (ACPI power button); returns at once.
    fn shutdown(&self, name: &str) -> Result<(), HvError>;
    /// Powers the domain off at once (the hard way; only after a shutdown timed out).
    fn destroy(&self, name: &str) -> Result<(), HvError>;
    /// Undefines a shut-off domain, keeping its UEFI NVRAM and TPM state (and its disks:
    /// libvirt never deletes those on undefine).
    fn undefine_keep_state(&self, name: &str) -> Result<(), HvError>;
    /// Renames a shut-off domain; UUID, NVRAM and TPM state stay.
    fn rename(&self, name: &str, new_name: &str) -> Result<(), HvError>;
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

    fn lookup(&self, name: &str) -> Result<Domain, HvError> {
        Ok(self.conn.lookup_domain_by_name(name)?)
    }
}

impl Hypervisor for Libvirt {
    fn list(&self) -> Result<Vec<Listing>, HvError> {
        let domains = self.conn.list_all_domains(0)?;
        let mut out = Vec::with_capacity(domains.len());
        for d in &domains {
            let listing = (|| {
                Ok::<_, virt::error::Error>(Listing {
                    name: d.name()?,
                    uuid: d.uuid_string()?,
                    active: d.is_active()?,
                    autostart: d.autostart()?,
                    persistent: d.is_persistent()?,
                })
            })();
            match listing {
                Ok(listing) => out.push(listing),
                // Undefined between the listing and the question (someone else is
                // changing the host): it is not there any more.
                Err(e) if e.code() == virt::error::ErrorNumber::NoDomain.into() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
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

    fn is_active(&self, name: &str) -> Result<bool, HvError> {
        Ok(self.lookup(name)?.is_active()?)
    }

    fn shutdown(&self, name: &str) -> Result<(), HvError> {
        self.lookup(name)?.shutdown()?;
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<(), HvError> {
        self.lookup(name)?.destroy()?;
        Ok(())
    }

    fn undefine_keep_state(&self, name: &str) -> Result<(), HvError> {
        // Both flags exist since libvirt 8.9 (KEEP_TPM); an older libvirt refuses the
        // call instead of deleting anything. libvirt's test driver keeps no NVRAM files
        // or TPM state and rejects both flags: only there are they left out.
        let flags = if self.uri.starts_with("test:") {
            0
        } else {
            sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | sys::VIR_DOMAIN_UNDEFINE_KEEP_TPM
        };
        self.lookup(name)?.undefine_flags(flags)?;
        Ok(())
    }

    fn rename(&self, name: &str, new_name: &str) -> Result<(), HvError> {
        self.lookup(name)?.rename(new_name, 0)?;
        Ok(())
    }
}

/// Checks a domain XML against libvirt's schema without touching any host.
pub trait SchemaChecker {
    fn check(&self, xml: &str) -> Result<(), String>;
}

/// Turns a domain XML into the inactive XML libvirt makes of it, without touching any
/// host (for plan diffs of definitions not applied yet).
pub trait Normalizer {
    fn normalize(&self, xml: &str) -> Result<String, String>;
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

/// Defines the XML in the private test driver, reads its inactive XML back, undefines it.
/// The test driver fills in libvirt's generic defaults (units, placement, on_* actions)
/// but not the QEMU driver's (machine type, controllers, PCI addresses), which the diff
/// normalization in `domain_xml` ignores where the source gives none.
impl Normalizer for TestDriverSchema {
    fn normalize(&self, xml: &str) -> Result<String, String> {
        let domain = self
            .conn
            .define_domain_xml_flags(xml, sys::VIR_DOMAIN_DEFINE_VALIDATE)
            .map_err(|e| e.message().trim().to_string())?;
        let out = domain.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE);
        let undefined = domain.undefine();
        let out = out.map_err(|e| e.message().trim().to_string())?;
        undefined.map_err(|e| e.message().trim().to_string())?;
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

        // Graceful shutdown works at once on the test driver; rename and undefine too.
        assert!(hv.is_active("vmsync-unit").unwrap());
        hv.shutdown("vmsync-unit").unwrap();
        assert!(!hv.is_active("vmsync-unit").unwrap());
        hv.start("vmsync-unit").unwrap();
        hv.destroy("vmsync-unit").unwrap();
        assert!(!hv.is_active("vmsync-unit").unwrap());
        hv.rename("vmsync-unit", "vmsync-unit2").unwrap();
        assert!(hv.xml("vmsync-unit", true).is_err());
        hv.undefine_keep_state("vmsync-unit2").unwrap();
        assert!(hv.xml("vmsync-unit2", true).is_err());
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
