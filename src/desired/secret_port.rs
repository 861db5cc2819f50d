//! Secrets of a commit: repository files ending in `.age`, decrypted on the host with its
//! own identity. Validation is handed a [`Secrets`]: with an opener (a sync or `plan` on
//! the host, see `host::secret_identity`) a secret is decrypted, and one this host cannot
//! decrypt is a problem of the VMs that use it; without one (`vmsync validate DIR`) only
//! the age format is checked, nothing is decrypted.
//!
//! Plaintext lives only in [`Plaintext`] values and in the seed built from them: its
//! `Debug` shows no content, it has no `Display`, and nothing here logs it.

use std::sync::Arc;

/// The repository files `secret()` reads end in this.
pub const SECRET_SUFFIX: &str = ".age";

/// Decrypted bytes. `Debug` shows the length only.
#[derive(Clone, PartialEq, Eq)]
pub struct Plaintext(pub Vec<u8>);

impl std::fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plaintext(<{} bytes, not shown>)", self.0.len())
    }
}

/// Decrypts a secret with this host's identity.
pub trait SecretOpener: Send + Sync {
    /// The plaintext of the repository file `file` whose bytes are `ciphertext`; the
    /// error names the file and the identity tried (never any plaintext).
    fn open(&self, file: &str, ciphertext: &[u8]) -> Result<Plaintext, String>;
    /// The identity used, for messages and the validation cache's key.
    fn identity(&self) -> String;
    /// What changes when the identity is replaced (the seed cache's key: a seed that
    /// read a secret is decrypted again under a new host key).
    fn version(&self) -> String {
        self.identity()
    }
}

/// How validation treats secrets: decrypt with an opener, or check the format only.
#[derive(Clone, Default)]
pub struct Secrets(Option<Arc<dyn SecretOpener>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(opener) => write!(f, "Secrets(identity {})", opener.identity()),
            None => write!(f, "Secrets(format only)"),
        }
    }
}

/// What [`Secrets::open`] gives: the plaintext, or (format only) nothing to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    Plain(Plaintext),
    /// The format is right; this run does not decrypt (`vmsync validate DIR`).
    FormatOnly,
}

impl Secrets {
    /// Decrypting with `opener`.
    pub fn with(opener: Arc<dyn SecretOpener>) -> Self {
        Self(Some(opener))
    }

    /// The identity and its version (see [`SecretOpener::version`]); `None` when only
    /// the format is checked.
    pub fn version(&self) -> Option<String> {
        self.0
            .as_ref()
            .map(|o| format!("{}\0{}", o.identity(), o.version()))
    }

    /// Whether secrets are decrypted (else only their format is checked).
    pub fn decrypts(&self) -> bool {
        self.0.is_some()
    }

    /// The secret in repository file `file` (bytes `ciphertext`): checked for the age
    /// format, then decrypted when there is an opener.
    pub fn open(&self, file: &str, ciphertext: &[u8]) -> Result<Opened, String> {
        if !file.ends_with(SECRET_SUFFIX) {
            return Err(format!(
                "'{file}' is not a secret: secret() reads repository files ending in '{SECRET_SUFFIX}'"
            ));
        }
        check_format(file, ciphertext)?;
        match &self.0 {
            Some(opener) => opener.open(file, ciphertext).map(Opened::Plain),
            None => Ok(Opened::FormatOnly),
        }
    }
}

/// Whether `bytes` is an age file (binary or ASCII-armored) with a well-formed header;
/// nothing is decrypted.
pub fn check_format(file: &str, bytes: &[u8]) -> Result<(), String> {
    let reader = age::armor::ArmoredReader::new(bytes);
    age::Decryptor::new(reader)
        .map(|_| ())
        .map_err(|e| format!("'{file}' is not a valid age file: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encrypted(plain: &[u8]) -> (age::x25519::Identity, Vec<u8>) {
        let key = age::x25519::Identity::generate();
        let recipient = key.to_public();
        let bytes = age::encrypt(&recipient, plain).unwrap();
        (key, bytes)
    }

    #[test]
    fn format_only_accepts_age_and_refuses_other_bytes() {
        let (_, bytes) = encrypted(b"pw");
        assert_eq!(
            Secrets::default().open("secrets/a.age", &bytes),
            Ok(Opened::FormatOnly)
        );
        let err = Secrets::default()
            .open("secrets/b.age", b"not age at all")
            .unwrap_err();
        assert!(
            err.contains("'secrets/b.age' is not a valid age file"),
            "{err}"
        );
        let err = Secrets::default()
            .open("secrets/c.txt", &bytes)
            .unwrap_err();
        assert!(err.contains("ending in '.age'"), "{err}");
    }

    #[test]
    fn plaintext_debug_shows_no_content() {
        let shown = format!("{:?}", Plaintext(b"hunter2".to_vec()));
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("7 bytes"));
    }
}
