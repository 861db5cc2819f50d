//! Reading a secret or a token from its file (`[webhook] secret_file`, `[[notify]]
//! secret_file` and `token_file`, the `https://` token file): the trailing newlines an
//! editor or `echo` leaves (`\n`, `\r\n`) are not part of the secret, and an empty secret
//! is refused. Each caller words its own errors, naming its setting.

use std::path::Path;

/// Why a secret file gave no secret.
#[derive(Debug)]
pub enum SecretFileError {
    /// The file could not be read.
    Unreadable(std::io::Error),
    /// Nothing is left once the trailing newlines are gone.
    Empty,
}

/// The secret in `path`, without its trailing newlines.
pub fn read(path: &Path) -> Result<Vec<u8>, SecretFileError> {
    let mut bytes = std::fs::read(path).map_err(SecretFileError::Unreadable)?;
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(SecretFileError::Empty);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_newlines_are_not_part_of_the_secret_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        for (content, secret) in [
            ("s3cret", "s3cret"),
            ("s3cret\n", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            ("s3cret\n\n", "s3cret"),
            (" s3 cret \n", " s3 cret "),
            ("a\nb\n", "a\nb"),
        ] {
            std::fs::write(&file, content).unwrap();
            assert_eq!(read(&file).unwrap(), secret.as_bytes(), "{content:?}");
        }
        for empty in ["", "\n", "\r\n\n"] {
            std::fs::write(&file, empty).unwrap();
            assert!(
                matches!(read(&file), Err(SecretFileError::Empty)),
                "{empty:?}"
            );
        }
        let missing = read(&dir.path().join("missing")).unwrap_err();
        assert!(
            matches!(&missing, SecretFileError::Unreadable(e) if e.kind() == std::io::ErrorKind::NotFound),
            "{missing:?}"
        );
    }
}
