//! What vmsync trusts before it lets a commit near the host: the commit's SSH signature
//! (checked against a `gpg.ssh.allowedSignersFile`-format file) and its history (it must
//! descend from every commit this host already applied, so a force-push can neither roll
//! the fleet back nor replace history without an operator saying so).
//!
//! Both checks are pure functions of the local clone and a few inputs; `sync` calls them
//! between fetch and validation (signature, ancestry against the record) and after
//! connecting to libvirt (ancestry against the commits recorded in managed domains' tags),
//! always before anything on the host changes. A refusal is a [`TrustError`]: exit 5.
//!
//! allowed_signers format (one key per line, `#` comments and blank lines ignored):
//! `principals [options] keytype base64 [comment]`. Principals are comma-separated
//! (optionally in double quotes); they only name the signer in logs. Options honoured:
//! `namespaces="git,…"` (the key is trusted only if "git" is listed), `valid-after` and
//! `valid-before` (`YYYYMMDD[HHMM[SS]][Z]`, compared with the commit's committer time, as
//! git does; without `Z` the host's local time zone). `cert-authority` (certificate
//! signatures) and any other option are refused explicitly: such a line makes the file
//! invalid (exit 2), so a restriction vmsync cannot honour is never silently dropped.

use std::path::Path;

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use git2::{Oid, Repository};
use ssh_key::{PublicKey, SshSig};

/// The SSH signature namespace git uses for commits and tags.
pub const GIT_NAMESPACE: &str = "git";

/// Why a commit is not trusted (exit status 5).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("commit {commit} is not signed, and [trust] allowed_signers requires a signature")]
    Unsigned { commit: String },
    #[error("commit {commit} has a signature that is not an SSH signature ({kind})")]
    UnsupportedSignature { commit: String, kind: String },
    #[error("commit {commit} has a bad signature: {reason}")]
    BadSignature { commit: String, reason: String },
    #[error("commit {commit} is signed by key {fingerprint}, which is not in '{file}'{why}")]
    UnknownSigner {
        commit: String,
        fingerprint: String,
        file: String,
        /// Why a listed key did not count (namespaces or validity), or empty.
        why: String,
    },
    #[error(
        "commit {commit} does not descend from commit {floor} ({source_of_floor}): the branch was rewound or its history replaced; refusing it (run `vmsync --once --allow-rewind` to accept it)"
    )]
    Rewind {
        commit: String,
        floor: String,
        /// Where the floor comes from: "the last applied commit", "the tag of domain 'x'".
        source_of_floor: String,
    },
    #[error(
        "commit {floor} ({source_of_floor}) is not in the fetched history, so commit {commit} cannot be shown to descend from it: the branch history was replaced; refusing it (run `vmsync --once --allow-rewind` to accept it)"
    )]
    UnknownFloor {
        commit: String,
        floor: String,
        source_of_floor: String,
    },
}

/// A problem with the allowed signers file itself (an agent config error, exit 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid allowed signers file '{file}{at}': {message}", at = line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct SignersFileError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

/// A validity bound of a key, compared with the committer time (seconds since the epoch).
type Bound = i64;

/// One line of an allowed signers file.
#[derive(Debug, Clone)]
pub struct AllowedSigner {
    pub line: usize,
    pub principals: String,
    pub key: PublicKey,
    /// `namespaces="…"`: `None` means every namespace.
    pub namespaces: Option<Vec<String>>,
    pub valid_after: Option<Bound>,
    pub valid_before: Option<Bound>,
}

/// The parsed allowed signers file.
#[derive(Debug, Clone)]
pub struct AllowedSigners {
    pub file: String,
    pub signers: Vec<AllowedSigner>,
}

/// Splits off the next whitespace-separated token, keeping double-quoted runs whole.
fn next_token(text: &str) -> Option<(&str, &str)> {
    let text = text.trim_start();
    if text.is_empty() {
        return None;
    }
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return Some((&text[..i], &text[i..])),
            _ => {}
        }
    }
    Some((text, ""))
}

/// Splits an options field on commas outside double quotes.
fn split_options(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// Parses `YYYYMMDD[HHMM[SS]][Z]` as ssh-keygen does (without `Z`: local time).
fn parse_time(value: &str) -> Result<Bound, String> {
    let (digits, utc) = match value.strip_suffix(['Z', 'z']) {
        Some(d) => (d, true),
        None => (value, false),
    };
    let bad = || format!("invalid time '{value}' (expected YYYYMMDD[HHMM[SS]][Z])");
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let naive = match digits.len() {
        8 => NaiveDate::parse_from_str(digits, "%Y%m%d")
            .map_err(|_| bad())?
            .and_hms_opt(0, 0, 0)
            .ok_or_else(bad)?,
        12 => NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M").map_err(|_| bad())?,
        14 => NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M%S").map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    if utc {
        Ok(Utc.from_utc_datetime(&naive).timestamp())
    } else {
        chrono::Local
            .from_local_datetime(&naive)
            .earliest()
            .map(|t: DateTime<chrono::Local>| t.timestamp())
            .ok_or_else(bad)
    }
}

impl AllowedSigners {
    /// Parses the text of an allowed signers file; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, SignersFileError> {
        let mut signers = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| SignersFileError {
                file: file.to_string(),
                line: Some(line),
                message,
            };
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let (principals, rest) = next_token(content).expect("not empty");
            let principals = unquote(principals).to_string();
            let rest = rest.trim_start();
            // Either the key follows directly, or an options field comes first.
            let (options, key) = match PublicKey::from_openssh(rest) {
                Ok(key) => (None, key),
                Err(_) => {
                    let Some((options, key_text)) = next_token(rest) else {
                        return Err(err("no public key after the principals".into()));
                    };
                    let key = PublicKey::from_openssh(key_text.trim()).map_err(|e| {
                        err(format!(
                            "cannot parse the public key after '{options}': {e}"
                        ))
                    })?;
                    (Some(options), key)
                }
            };
            let mut signer = AllowedSigner {
                line,
                principals,
                key,
                namespaces: None,
                valid_after: None,
                valid_before: None,
            };
            for option in options.map(split_options).unwrap_or_default() {
                let (name, value) = match option.split_once('=') {
                    Some((n, v)) => (n.to_ascii_lowercase(), Some(unquote(v))),
                    None => (option.to_ascii_lowercase(), None),
                };
                match (name.as_str(), value) {
                    ("namespaces", Some(v)) => {
                        signer.namespaces = Some(v.split(',').map(|n| n.trim().into()).collect())
                    }
                    ("valid-after", Some(v)) => {
                        signer.valid_after = Some(parse_time(v).map_err(err)?)
                    }
                    ("valid-before", Some(v)) => {
                        signer.valid_before = Some(parse_time(v).map_err(err)?)
                    }
                    ("cert-authority", None) => {
                        return Err(err(
                            "option 'cert-authority' is not supported: vmsync verifies plain keys only; list the signing keys themselves".into(),
                        ));
                    }
                    _ => {
                        return Err(err(format!(
                            "unsupported option '{option}' (vmsync honours namespaces, valid-after and valid-before)"
                        )));
                    }
                }
            }
            signers.push(signer);
        }
        Ok(Self {
            file: file.to_string(),
            signers,
        })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, SignersFileError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SignersFileError {
            file: file.clone(),
            line: None,
            message: format!("failed to read it: {e}"),
        })?;
        Self::parse(&file, &text)
    }
}

/// Who signed a trusted commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    pub principals: String,
    /// SHA256 fingerprint of the key (`SHA256:…`).
    pub fingerprint: String,
}

/// Checks that `commit` carries a valid SSH signature (namespace "git") by a key of
/// `signers` that is valid at the commit's committer time.
pub fn verify_commit(
    repo: &Repository,
    commit: Oid,
    signers: &AllowedSigners,
) -> Result<Signer, TrustError> {
    let id = commit.to_string();
    let (signature, payload) = match repo.extract_signature(&commit, None) {
        Ok(pair) => pair,
        Err(e) if e.code() == git2::ErrorCode::NotFound => {
            return Err(TrustError::Unsigned { commit: id });
        }
        Err(e) => {
            return Err(TrustError::BadSignature {
                commit: id,
                reason: e.message().to_string(),
            });
        }
    };
    let signature = String::from_utf8_lossy(&signature).into_owned();
    if !signature
        .trim_start()
        .starts_with("-----BEGIN SSH SIGNATURE-----")
    {
        let kind = signature
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('-')
            .to_string();
        return Err(TrustError::UnsupportedSignature { commit: id, kind });
    }
    let sig = SshSig::from_pem(signature.trim()).map_err(|e| TrustError::BadSignature {
        commit: id.clone(),
        reason: format!("cannot parse the SSH signature: {e}"),
    })?;
    let fingerprint = sig
        .public_key()
        .fingerprint(ssh_key::HashAlg::Sha256)
        .to_string();
    if sig.namespace() != GIT_NAMESPACE {
        return Err(TrustError::BadSignature {
            commit: id,
            reason: format!(
                "signature namespace is '{}', expected '{GIT_NAMESPACE}'",
                sig.namespace()
            ),
        });
    }
    let time = repo
        .find_commit(commit)
        .map(|c| c.committer().when().seconds())
        .map_err(|e| TrustError::BadSignature {
            commit: id.clone(),
            reason: e.message().to_string(),
        })?;
    let mut why = String::new();
    for signer in signers
        .signers
        .iter()
        .filter(|s| s.key.key_data() == sig.public_key())
    {
        if let Some(namespaces) = &signer.namespaces
            && !namespaces.iter().any(|n| n == GIT_NAMESPACE)
        {
            why = format!(
                " (line {} lists it for namespaces {} only)",
                signer.line,
                namespaces.join(",")
            );
            continue;
        }
        if signer.valid_after.is_some_and(|t| time < t)
            || signer.valid_before.is_some_and(|t| time > t)
        {
            why = format!(
                " (line {} limits its validity, and the commit time is outside it)",
                signer.line
            );
            continue;
        }
        signer
            .key
            .verify(GIT_NAMESPACE, &payload, &sig)
            .map_err(|e| TrustError::BadSignature {
                commit: id.clone(),
                reason: format!("verification with key {fingerprint} failed: {e}"),
            })?;
        return Ok(Signer {
            principals: signer.principals.clone(),
            fingerprint,
        });
    }
    Err(TrustError::UnknownSigner {
        commit: id,
        fingerprint,
        file: signers.file.clone(),
        why,
    })
}

/// A commit the new one must descend from, and where that requirement comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Floor {
    pub commit: String,
    pub source: String,
}

/// Checks that `commit` is each floor or descends from it. A floor that is not in the
/// local clone cannot be checked and is refused too (history was replaced).
pub fn check_ancestry(repo: &Repository, commit: Oid, floors: &[Floor]) -> Result<(), TrustError> {
    for floor in floors {
        let unknown = || TrustError::UnknownFloor {
            commit: commit.to_string(),
            floor: floor.commit.clone(),
            source_of_floor: floor.source.clone(),
        };
        let Ok(floor_oid) = Oid::from_str(&floor.commit) else {
            return Err(unknown());
        };
        if floor_oid == commit {
            continue;
        }
        if repo.find_commit(floor_oid).is_err() {
            return Err(unknown());
        }
        match repo.graph_descendant_of(commit, floor_oid) {
            Ok(true) => {}
            Ok(false) => {
                return Err(TrustError::Rewind {
                    commit: commit.to_string(),
                    floor: floor.commit.clone(),
                    source_of_floor: floor.source.clone(),
                });
            }
            Err(_) => return Err(unknown()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICDUnkj5ahjMi1pqfiq6G5WWCtm1UeZrUGWKF8N2Nk0X";

    #[test]
    fn allowed_signers_lines_with_and_without_options() {
        let text = format!(
            "# ops team\n\nalice@example.org {KEY} alice\n\"bob@x,carol@y\" namespaces=\"file,git\",valid-after=\"20200101\" {KEY}\n"
        );
        let s = AllowedSigners::parse("f", &text).unwrap();
        assert_eq!(s.signers.len(), 2);
        assert_eq!(s.signers[0].principals, "alice@example.org");
        assert_eq!(s.signers[0].namespaces, None);
        assert_eq!(s.signers[1].principals, "bob@x,carol@y");
        assert_eq!(
            s.signers[1].namespaces,
            Some(vec!["file".to_string(), "git".to_string()])
        );
        assert!(s.signers[1].valid_after.is_some());
    }

    #[test]
    fn unsupported_options_and_bad_keys_are_errors() {
        let e = AllowedSigners::parse("f", &format!("a cert-authority {KEY}\n")).unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(
            e.to_string().contains("'cert-authority' is not supported"),
            "{e}"
        );
        let e = AllowedSigners::parse("f", &format!("\na verify-required {KEY}\n")).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(
            e.message.contains("unsupported option 'verify-required'"),
            "{e}"
        );
        let e = AllowedSigners::parse("f", "a ssh-ed25519 notbase64\n").unwrap_err();
        assert!(e.message.contains("cannot parse the public key"), "{e}");
        let e = AllowedSigners::parse("f", "lonely\n").unwrap_err();
        assert!(e.message.contains("no public key"), "{e}");
        let e =
            AllowedSigners::parse("f", &format!("a valid-before=\"2020\" {KEY}\n")).unwrap_err();
        assert!(e.message.contains("invalid time '2020'"), "{e}");
    }

    #[test]
    fn times_parse_like_ssh_keygen() {
        assert_eq!(parse_time("19700102Z").unwrap(), 86400);
        assert_eq!(parse_time("197001020001Z").unwrap(), 86460);
        assert_eq!(parse_time("19700102000102Z").unwrap(), 86462);
        assert!(parse_time("1970010").is_err());
        assert!(parse_time("19701302Z").is_err());
    }
}
