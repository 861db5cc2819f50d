//! libvirt's domain schema (`domain.rng`, shipped with libvirt) compiled once with
//! libxml2's RELAX NG validator, which libvirt itself uses for
//! `VIR_DOMAIN_DEFINE_VALIDATE`.
//!
//! libvirt compiles the whole schema again for every validated define (about 6 ms), which
//! made validating hundreds of domains slow; compiled once per validation run, checking a
//! domain costs well under a millisecond. The compiled schema (a few MiB) is freed with
//! its owner, so a daemon does not keep it between syncs. The few libxml2 calls are declared here (libxml2 is already a
//! dependency of libvirt, and its development files come with `libvirt-dev`).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};

use crate::desired::schema_check::SchemaError;

#[repr(C)]
struct XmlError {
    domain: c_int,
    code: c_int,
    message: *const c_char,
    level: c_int,
    file: *const c_char,
    line: c_int,
    str1: *const c_char,
    str2: *const c_char,
    str3: *const c_char,
    int1: c_int,
    int2: c_int,
    ctxt: *mut c_void,
    node: *mut c_void,
}

type StructuredErrorFunc = unsafe extern "C" fn(user: *mut c_void, error: *const XmlError);

#[link(name = "xml2")]
unsafe extern "C" {
    fn xmlInitParser();
    fn xmlRelaxNGNewParserCtxt(url: *const c_char) -> *mut c_void;
    fn xmlRelaxNGSetParserStructuredErrors(
        ctxt: *mut c_void,
        f: Option<StructuredErrorFunc>,
        user: *mut c_void,
    );
    fn xmlRelaxNGParse(ctxt: *mut c_void) -> *mut c_void;
    fn xmlRelaxNGFree(schema: *mut c_void);
    fn xmlRelaxNGFreeParserCtxt(ctxt: *mut c_void);
    fn xmlRelaxNGNewValidCtxt(schema: *mut c_void) -> *mut c_void;
    fn xmlRelaxNGSetValidStructuredErrors(
        ctxt: *mut c_void,
        f: Option<StructuredErrorFunc>,
        user: *mut c_void,
    );
    fn xmlRelaxNGValidateDoc(ctxt: *mut c_void, doc: *mut c_void) -> c_int;
    fn xmlRelaxNGFreeValidCtxt(ctxt: *mut c_void);
    fn xmlReadMemory(
        buffer: *const c_char,
        size: c_int,
        url: *const c_char,
        encoding: *const c_char,
        options: c_int,
    ) -> *mut c_void;
    fn xmlFreeDoc(doc: *mut c_void);
}

/// XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING: no network, no entity
/// substitution, errors collected instead of printed.
const PARSE_OPTIONS: c_int = (1 << 11) | (1 << 5) | (1 << 6);

/// Collects libxml2's messages for one validation.
unsafe extern "C" fn collect(user: *mut c_void, error: *const XmlError) {
    // SAFETY: `user` is the `Vec<String>` passed by the caller for this call only;
    // `error` is valid for the duration of the callback.
    unsafe {
        let messages = &mut *(user as *mut Vec<String>);
        if let Some(e) = error.as_ref()
            && !e.message.is_null()
        {
            messages.push(
                CStr::from_ptr(e.message)
                    .to_string_lossy()
                    .trim()
                    .to_string(),
            );
        }
    }
}

/// A compiled RELAX NG schema.
pub struct Schema {
    ptr: *mut c_void,
    path: PathBuf,
}

impl Drop for Schema {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from xmlRelaxNGParse and is freed exactly once.
        unsafe { xmlRelaxNGFree(self.ptr) }
    }
}

impl Schema {
    /// Compiles the schema at `path`.
    pub fn compile(path: &Path) -> Result<Schema, SchemaError> {
        let unavailable = SchemaError::Unavailable;
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| unavailable(e.to_string()))?;
        let mut messages: Vec<String> = Vec::new();
        // One compile at a time: libxml2 registers its datatype libraries on the first
        // RELAX NG parse without a lock, and two first parses at once (the domain schema
        // on one thread, a network's or pool's on another) failed with "Error type
        // 'unsignedInt' is not exported by type library" (seen in the unit tests).
        // Compiles are rare (once per schema and process), so the lock costs nothing.
        static COMPILING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = COMPILING.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: plain libxml2 calls with valid pointers; the parser context is freed
        // before returning and `messages` outlives it.
        let ptr = unsafe {
            xmlInitParser();
            let ctxt = xmlRelaxNGNewParserCtxt(c_path.as_ptr());
            if ctxt.is_null() {
                return Err(unavailable(format!(
                    "failed to read schema '{}'",
                    path.display()
                )));
            }
            xmlRelaxNGSetParserStructuredErrors(
                ctxt,
                Some(collect),
                &mut messages as *mut _ as *mut c_void,
            );
            let schema = xmlRelaxNGParse(ctxt);
            xmlRelaxNGFreeParserCtxt(ctxt);
            schema
        };
        if ptr.is_null() {
            return Err(unavailable(format!(
                "failed to compile schema '{}': {}",
                path.display(),
                messages.join("; ")
            )));
        }
        Ok(Schema {
            ptr,
            path: path.to_path_buf(),
        })
    }

    /// Validates `xml`; the error lists libxml2's messages, like libvirt's own
    /// "XML document failed to validate against schema" error.
    pub fn validate(&self, xml: &str) -> Result<(), SchemaError> {
        let rejected = |m: &str| SchemaError::Rejected(m.into());
        let len = c_int::try_from(xml.len()).map_err(|_| rejected("document too large"))?;
        let mut messages: Vec<String> = Vec::new();
        // SAFETY: `xml` outlives the parse; the document and the validation context are
        // freed before returning; `messages` outlives the context.
        let rc = unsafe {
            let doc = xmlReadMemory(
                xml.as_ptr() as *const c_char,
                len,
                c"domain.xml".as_ptr(),
                std::ptr::null(),
                PARSE_OPTIONS,
            );
            if doc.is_null() {
                return Err(rejected("malformed xml"));
            }
            let ctxt = xmlRelaxNGNewValidCtxt(self.ptr);
            if ctxt.is_null() {
                xmlFreeDoc(doc);
                return Err(SchemaError::Unavailable(
                    "failed to create a validation context".into(),
                ));
            }
            xmlRelaxNGSetValidStructuredErrors(
                ctxt,
                Some(collect),
                &mut messages as *mut _ as *mut c_void,
            );
            let rc = xmlRelaxNGValidateDoc(ctxt, doc);
            xmlRelaxNGFreeValidCtxt(ctxt);
            xmlFreeDoc(doc);
            rc
        };
        match rc {
            0 => Ok(()),
            _ => Err(SchemaError::Rejected(format!(
                "XML document failed to validate against schema {}: {}",
                self.path.display(),
                if messages.is_empty() {
                    "invalid".to_string()
                } else {
                    messages.join("; ")
                }
            ))),
        }
    }
}

/// Where libvirt keeps its schemas (the same files it validates against).
pub const SCHEMA_DIRS: &[&str] = &[
    "/usr/share/libvirt/schemas",
    "/usr/local/share/libvirt/schemas",
];

/// Compiles libvirt's domain schema (about 10 ms).
pub fn domain_schema() -> Result<Schema, SchemaError> {
    let path = SCHEMA_DIRS
        .iter()
        .map(|d| Path::new(d).join("domain.rng"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            SchemaError::Unavailable(format!(
                "libvirt's domain.rng not found in {}",
                SCHEMA_DIRS.join(", ")
            ))
        })?;
    Schema::compile(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_like_libvirt() {
        let schema = domain_schema().unwrap();
        let good = "<domain type='kvm'><name>a</name><memory>131072</memory><os><type arch='x86_64'>hvm</type></os></domain>";
        schema.validate(good).unwrap();
        let bad = good.replace(
            "<memory>131072</memory>",
            "<memory>131072</memory><vcpux>1</vcpux>",
        );
        let err = schema.validate(&bad).unwrap_err().to_string();
        assert!(
            err.contains("failed to validate against schema") && err.contains("vcpux"),
            "{err}"
        );
        assert!(schema.validate("<domain").is_err());
    }
}
