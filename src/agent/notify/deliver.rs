//! Sending one event to one target: an HTTP POST (webhook, commit status) with a time
//! limit, or a program run without a shell with the event on stdin. Errors never carry a
//! secret: no token, no webhook path, no request header.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::event::Event;
use super::forge;
use super::targets::{Kind, Target, origin};
use crate::repo::https;
use crate::util::secret_file::{self, SecretFileError};

/// The header of a signed webhook.
pub const SIGNATURE_HEADER: &str = "X-Vmsync-Signature-256";

/// Why a delivery failed; `permanent`: trying again cannot help (a 4xx answer other
/// than 408/429, a missing token file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub permanent: bool,
    pub message: String,
}

fn transient(message: String) -> Failure {
    Failure {
        permanent: false,
        message,
    }
}

fn permanent(message: String) -> Failure {
    Failure {
        permanent: true,
        message,
    }
}

/// `sha256=<hex HMAC-SHA256 of body>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A secret or token file's content, without its trailing newline.
pub fn read_secret(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    secret_file::read(path).map_err(|e| match e {
        SecretFileError::Unreadable(e) => {
            format!("failed to read {what} '{}': {e}", path.display())
        }
        SecretFileError::Empty => format!("{what} '{}' is empty", path.display()),
    })
}

/// Sends `event` to `target`.
pub fn deliver(target: &Target, event: &Event) -> Result<(), Failure> {
    let body = serde_json::to_vec(event).expect("events serialize");
    match &target.kind {
        Kind::Webhook { url, secret_file } => {
            let mut headers = vec![("Content-Type".to_string(), "application/json".to_string())];
            headers.push(("X-Vmsync-Event".into(), event.event.as_str().into()));
            if let Some(file) = secret_file {
                let secret = read_secret(file, "[[notify]] secret_file").map_err(permanent)?;
                headers.push((SIGNATURE_HEADER.into(), signature(&secret, &body)));
            }
            post(url, &headers, body, target.timeout)
        }
        Kind::CommitStatus {
            forge: which,
            api_url,
            repository,
            token_file,
            target_url,
        } => {
            let token = read_secret(token_file, "[[notify]] token_file").map_err(permanent)?;
            let token = String::from_utf8(token)
                .map_err(|_| permanent("[[notify]] token_file is not UTF-8".into()))?;
            let Some(request) = forge::request(
                *which,
                api_url,
                repository,
                token.trim(),
                target_url.as_deref(),
                event,
            ) else {
                return Ok(());
            };
            let mut headers = vec![
                ("Content-Type".to_string(), "application/json".to_string()),
                (request.auth.0.to_string(), request.auth.1),
            ];
            headers.extend(
                request
                    .extra_headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            );
            let body = serde_json::to_vec(&request.body).expect("json");
            post(&request.url, &headers, body, target.timeout)
        }
        Kind::Command { argv } => run(argv, &body, target.timeout),
    }
}

fn post(
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(), Failure> {
    // One agent per process: its TLS context (and so the CA bundle) is built on the
    // first https request and kept.
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    let agent = AGENT.get_or_init(|| {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .user_agent(concat!("vmsync/", env!("CARGO_PKG_VERSION")))
            .tls_config(https::tls_config())
            .build();
        ureq::Agent::new_with_config(config)
    });
    let mut request = agent
        .post(url)
        .config()
        .timeout_global(Some(timeout))
        .build();
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let shown = origin(url);
    let response = request.send(&body[..]).map_err(|e| {
        transient(format!(
            "POST to {shown} failed: {}",
            scrub(&e.to_string(), url)
        ))
    })?;
    let status = response.status().as_u16();
    match status {
        200..=299 => Ok(()),
        408 | 429 | 500..=599 => Err(transient(format!("{shown} answered HTTP {status}"))),
        _ => Err(permanent(format!("{shown} answered HTTP {status}"))),
    }
}

/// An error text without the URL (whose path or query may hold a secret).
fn scrub(text: &str, url: &str) -> String {
    text.replace(url, &origin(url))
}

fn run(argv: &[String], body: &[u8], timeout: Duration) -> Result<(), Failure> {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| transient(format!("failed to run '{}': {e}", argv[0])))?;
    // The event is small (a pipe buffer holds it), so writing does not wait for a reader.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(body);
        let _ = stdin.write_all(b"\n");
    }
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.by_ref().take(1000).read_to_string(&mut err);
                }
                let first = err.lines().next().unwrap_or("").trim().to_string();
                return Err(transient(format!(
                    "'{}' exited with {status}{}",
                    argv[0],
                    if first.is_empty() {
                        String::new()
                    } else {
                        format!(": {first}")
                    }
                )));
            }
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(transient(format!(
                    "'{}' did not finish within {}s; killed",
                    argv[0],
                    timeout.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(transient(format!("failed to wait for '{}': {e}", argv[0]))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn secrets_lose_their_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(read_secret(&file, "x").unwrap(), b"s3cret");
        std::fs::write(&file, "\n").unwrap();
        assert!(read_secret(&file, "x").unwrap_err().contains("empty"));
    }

    #[test]
    fn errors_do_not_carry_the_url_path() {
        let url = "https://hooks.example.org/services/T0/B0/SECRET";
        assert_eq!(
            scrub(&format!("connect {url}: refused"), url),
            "connect https://hooks.example.org: refused"
        );
    }
}
