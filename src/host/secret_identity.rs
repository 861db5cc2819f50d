//! This host's age identity (`[secrets] identity`): the host's SSH ed25519 (or RSA) key,
//! the way agenix uses it, or an age identity file (`AGE-SECRET-KEY-1…` lines). Read on
//! first use, so a host whose commit uses no secret never reads it; decrypts the
//! repository's `.age` files for validation (`desired::secret_port`).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::desired::secret_port::{Plaintext, SecretOpener};

/// `[secrets] identity` when the host config does not say.
pub const DEFAULT_IDENTITY: &str = "/etc/ssh/ssh_host_ed25519_key";

/// A parsed identity (both kinds are `Send + Sync`, unlike a boxed `age::Identity`).
enum Keys {
    Ssh(age::ssh::Identity),
    Age(Vec<age::x25519::Identity>),
}

/// The identity file at `path`, loaded once.
pub struct AgeIdentity {
    path: PathBuf,
    keys: OnceLock<Result<Keys, String>>,
}

impl AgeIdentity {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            keys: OnceLock::new(),
        }
    }

    fn load(&self) -> Result<Keys, String> {
        let shown = self.path.display();
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read identity '{shown}': {e}"))?;
        if text.contains("AGE-SECRET-KEY-") {
            let keys = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(age::x25519::Identity::from_str)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    format!("identity '{shown}' has a line that is not an age secret key")
                })?;
            return Ok(Keys::Age(keys));
        }
        match age::ssh::Identity::from_buffer(text.as_bytes(), Some(shown.to_string())) {
            Ok(key @ age::ssh::Identity::Unencrypted(_)) => Ok(Keys::Ssh(key)),
            Ok(age::ssh::Identity::Encrypted(_)) => Err(format!(
                "identity '{shown}' is passphrase-protected; vmsync needs a key without a passphrase"
            )),
            Ok(age::ssh::Identity::Unsupported(_)) => Err(format!(
                "identity '{shown}' is a key type age does not support (use ed25519 or RSA, or an age identity file)"
            )),
            Err(e) => Err(format!(
                "identity '{shown}' is neither an SSH private key nor an age identity file: {e}"
            )),
        }
    }
}

impl SecretOpener for AgeIdentity {
    fn open(&self, file: &str, ciphertext: &[u8]) -> Result<Plaintext, String> {
        let keys = self
            .keys
            .get_or_init(|| self.load())
            .as_ref()
            .map_err(|e| format!("cannot decrypt '{file}': {e}"))?;
        let identities: Vec<&dyn age::Identity> = match keys {
            Keys::Ssh(key) => vec![key],
            Keys::Age(keys) => keys.iter().map(|k| k as &dyn age::Identity).collect(),
        };
        let failed = |e: &dyn std::fmt::Display| {
            format!(
                "cannot decrypt '{file}' with identity '{}': {e}",
                self.path.display()
            )
        };
        let decryptor = age::Decryptor::new(age::armor::ArmoredReader::new(ciphertext))
            .map_err(|e| failed(&e))?;
        let mut reader = decryptor
            .decrypt(identities.into_iter())
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => {
                    failed(&"it is not encrypted to this host's key")
                }
                e => failed(&e),
            })?;
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut plain).map_err(|e| failed(&e))?;
        Ok(Plaintext(plain))
    }

    fn identity(&self) -> String {
        self.path.display().to_string()
    }

    /// The identity file's device, inode, size, modification and change times: a key
    /// replaced, rewritten or moved into place gives another version (without reading
    /// the key).
    fn version(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.path) {
            Ok(m) => format!(
                "{}:{}:{}:{}.{}:{}.{}",
                m.dev(),
                m.ino(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec()
            ),
            Err(e) => format!("unreadable: {}", e.kind()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_identity_file_decrypts_and_a_stranger_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = age::x25519::Identity::generate();
        let path = dir.path().join("id.txt");
        use age::secrecy::ExposeSecret;
        std::fs::write(
            &path,
            format!("# host key\n{}\n", key.to_string().expose_secret()),
        )
        .unwrap();
        let opener = AgeIdentity::new(path.clone());
        let bytes = age::encrypt(&key.to_public(), b"s3cret").unwrap();
        assert_eq!(opener.open("secrets/a.age", &bytes).unwrap().0, b"s3cret");
        let other = age::x25519::Identity::generate();
        let bytes = age::encrypt(&other.to_public(), b"s3cret").unwrap();
        let err = opener.open("secrets/b.age", &bytes).unwrap_err();
        assert!(err.contains("'secrets/b.age'"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(!err.contains("s3cret"));
    }

    #[test]
    fn a_missing_identity_is_named() {
        let opener = AgeIdentity::new("/nonexistent/key".into());
        let err = opener.open("secrets/a.age", b"x").unwrap_err();
        assert!(err.contains("/nonexistent/key"), "{err}");
    }
}
