//! The `https://` transport of the git fetch, and the one place TLS is set up.
//!
//! libgit2 with its own OpenSSL stream sets OpenSSL up when the library initialises: it
//! parses the whole CA bundle (about 20 to 28 ms of CPU) in every process that opens a
//! repository, even one that fetches from a local path or over SSH and never speaks TLS.
//! vmsync therefore builds libgit2 without a TLS stream (git2 without its `https`
//! feature) and registers [`register`] this transport for `https://` URLs instead: git's
//! smart HTTP protocol (`GET info/refs?service=git-upload-pack`, then
//! `POST git-upload-pack`), spoken by libgit2's smart protocol code over ureq with
//! native-tls, the TLS stack the change probe uses too ([`tls_config`]). The fetch's
//! agent here and the probe's each build their TLS context, which reads the CA bundle
//! (`SSL_CERT_FILE`, else the system's), on their first `https://` connection and keep
//! it for the rest of the process; a sync over a local path, `file://`, `ssh://`,
//! `git://` or `http://` (with no probe or an `http://` one) never reads it. `http://`
//! stays with libgit2's own HTTP client.
//!
//! Credentials: a `401` is answered once, with the token of `[source] token_file` as the
//! password (user name from the URL, else `x-access-token`), else with the password
//! embedded in the URL; a second `401` is a refusal. What went wrong is handed back to
//! the fetch through [`with_token_file`]. Like libgit2's transport: no proxy, redirects
//! followed on the first request only, and no push.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};

use base64::Engine as _;
use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
use git2::{ErrorClass, ErrorCode};
use tracing::{debug, warn};
use ureq::ResponseExt as _;

use crate::util::redact::redact;
use crate::util::secret_file::{self, SecretFileError};

const REFS: &str = "/info/refs?service=git-upload-pack";
const ADVERTISEMENT: &str = "application/x-git-upload-pack-advertisement";
const REQUEST: &str = "application/x-git-upload-pack-request";
const RESULT: &str = "application/x-git-upload-pack-result";

/// Registers this transport for `https://` with libgit2, once per process. Every fetch
/// calls it before it creates a remote.
pub fn register() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: libgit2's list of custom transports must not change while another
        // thread looks a transport up. Every transport vmsync creates comes from
        // `source::fetch`, which calls this first; `Once` makes a second thread wait
        // until the registration is done, so no lookup runs beside it.
        let registered = unsafe {
            git2::transport::register("https", |remote| {
                Transport::smart(remote, true, Https::default())
            })
        };
        if let Err(e) = registered {
            warn!(error = %e.message(), "failed to register the https transport");
        }
    });
}

/// TLS as vmsync speaks it, to the git server and to the probe: OpenSSL through
/// native-tls, checking against `SSL_CERT_FILE` or else the system's CAs.
pub fn tls_config() -> ureq::tls::TlsConfig {
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::NativeTls)
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build()
}

/// The agent of every `https://` git request of this process: its TLS context (and so
/// the CA bundle) is built on its first https connection and kept.
fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(5)
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .proxy(None)
            .user_agent(concat!("git/2.0 (vmsync ", env!("CARGO_PKG_VERSION"), ")"))
            .tls_config(tls_config())
            .build();
        ureq::Agent::new_with_config(config)
    })
}

/// What the fetch running on this thread hands the transport, and what it hands back.
#[derive(Default)]
struct FetchAuth {
    token_file: Option<PathBuf>,
    /// Why the credentials failed (a token file that cannot be read, a refusal).
    error: Option<String>,
}

thread_local! {
    static FETCH: RefCell<FetchAuth> = RefCell::new(FetchAuth::default());
}

/// Runs `fetch` (libgit2 calls the transport on the calling thread) with `token_file`
/// as the answer to a `401`; returns its result and the credential error, if one ended
/// the fetch.
pub fn with_token_file<T>(
    token_file: Option<&Path>,
    fetch: impl FnOnce() -> T,
) -> (T, Option<String>) {
    FETCH.with(|f| {
        *f.borrow_mut() = FetchAuth {
            token_file: token_file.map(Path::to_path_buf),
            error: None,
        }
    });
    let result = fetch();
    let error = FETCH.with(|f| std::mem::take(&mut *f.borrow_mut()).error);
    (result, error)
}

/// The token in `file` ([`secret_file::read`]), surrounding whitespace trimmed too; an
/// unreadable or empty file is an error naming it.
pub fn read_token(file: &Path) -> Result<String, String> {
    let unreadable =
        |e: &dyn std::fmt::Display| format!("cannot read token file '{}': {e}", file.display());
    let empty = || format!("token file '{}' is empty", file.display());
    let bytes = secret_file::read(file).map_err(|e| match e {
        SecretFileError::Unreadable(e) => unreadable(&e),
        SecretFileError::Empty => empty(),
    })?;
    let token = String::from_utf8(bytes).map_err(|e| unreadable(&e))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(empty());
    }
    Ok(token.to_string())
}

/// A credential error: remembered for the fetch, returned to libgit2 as `GIT_EAUTH`.
fn refuse(url: &str, message: String) -> git2::Error {
    warn!(url = %redact(url), error = %message, "authentication failed");
    let error = git2::Error::new(ErrorCode::Auth, ErrorClass::Http, &message);
    FETCH.with(|f| f.borrow_mut().error = Some(message));
    error
}

fn http_error(message: String) -> git2::Error {
    git2::Error::new(ErrorCode::GenericError, ErrorClass::Http, &message)
}

/// `https://user:password@host/path` as (`https://host/path`, user, password), user and
/// password percent-decoded.
fn split_userinfo(url: &str) -> (String, Option<String>, Option<String>) {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return (url.to_string(), None, None);
    };
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let Some(at) = url[start..end].rfind('@').map(|i| start + i) else {
        return (url.to_string(), None, None);
    };
    let userinfo = &url[start..at];
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (userinfo, None),
    };
    let bare = format!("{}{}", &url[..start], &url[at + 1..]);
    (
        bare,
        Some(percent_decode(user)),
        password.map(percent_decode),
    )
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn basic(user: &str, password: &str) -> String {
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// The media type of a response, without parameters.
fn content_type(response: &ureq::http::Response<ureq::Body>) -> String {
    let value = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    value.split(';').next().unwrap_or("").trim().to_string()
}

/// Checks a git response: status 200 and the expected content type.
fn check(
    response: &ureq::http::Response<ureq::Body>,
    url: &str,
    expected: &str,
) -> Result<(), git2::Error> {
    let status = response.status().as_u16();
    if status != 200 {
        return Err(http_error(format!(
            "unexpected http status code {status} from '{}'",
            redact(url)
        )));
    }
    let found = content_type(response);
    if found != expected {
        return Err(http_error(format!(
            "invalid content-type '{found}' from '{}': not a smart git server",
            redact(url)
        )));
    }
    Ok(())
}

fn send_error(url: &str, e: &ureq::Error) -> git2::Error {
    http_error(format!("request to '{}' failed: {e}", redact(url)))
}

/// One connection of libgit2's smart protocol to an `https://` remote.
#[derive(Default)]
struct Https {
    /// After the advertisement: the repository URL (after redirects, no user info) and
    /// the `Authorization` header that was accepted, for the `POST`s that follow.
    session: RefCell<Option<(String, Option<String>)>>,
}

impl Https {
    /// `GET info/refs`, answering one `401`.
    fn advertisement(&self, url: &str) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let (base, user, password) = split_userinfo(url);
        let base = base.trim_end_matches('/').to_string();
        let refs = format!("{base}{REFS}");
        let get = |authorization: Option<&str>| {
            let mut request = agent().get(&refs).header("Pragma", "no-cache");
            if let Some(value) = authorization {
                request = request.header("Authorization", value);
            }
            request.call().map_err(|e| send_error(&refs, &e))
        };
        debug!(url = %redact(url), "https: asking for the advertisement");
        let mut response = get(None)?;
        let mut authorization = None;
        if response.status().as_u16() == 401 {
            let token_file = FETCH.with(|f| f.borrow().token_file.clone());
            let (header, offered) = match (token_file, password) {
                (Some(file), _) => {
                    let token = read_token(&file).map_err(|m| refuse(url, m))?;
                    let user = user.as_deref().unwrap_or("x-access-token");
                    debug!(user = %user, token_file = %file.display(), "offering token");
                    (
                        basic(user, &token),
                        format!("token from '{}'", file.display()),
                    )
                }
                (None, Some(password)) => (
                    basic(user.as_deref().unwrap_or(""), &password),
                    "the password in the url".to_string(),
                ),
                (None, None) => {
                    return Err(refuse(
                        url,
                        "the remote asks for credentials but no token_file is configured".into(),
                    ));
                }
            };
            response = get(Some(&header))?;
            if response.status().as_u16() == 401 {
                return Err(refuse(url, format!("{offered} was refused: HTTP 401")));
            }
            authorization = Some(header);
        }
        check(&response, &refs, ADVERTISEMENT)?;
        let landed = response.get_uri().to_string();
        let base = landed
            .strip_suffix(REFS)
            .map_or(base, |b| split_userinfo(b).0);
        *self.session.borrow_mut() = Some((base, authorization));
        Ok(Box::new(Stream::Reading(
            response.into_body().into_reader(),
        )))
    }
}

impl SmartSubtransport for Https {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        match action {
            Service::UploadPackLs => self.advertisement(url),
            Service::UploadPack => {
                let (base, authorization) = match self.session.borrow().clone() {
                    Some(session) => session,
                    None => (
                        split_userinfo(url).0.trim_end_matches('/').to_string(),
                        None,
                    ),
                };
                Ok(Box::new(Stream::Request {
                    url: format!("{base}/git-upload-pack"),
                    authorization,
                    body: Vec::new(),
                }))
            }
            Service::ReceivePackLs | Service::ReceivePack => Err(http_error(
                "vmsync only fetches: pushing over https is not supported".into(),
            )),
        }
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

/// A stream of the smart protocol: an answer being read, or a `POST` whose body libgit2
/// is still writing (sent on the first read).
enum Stream {
    Reading(ureq::BodyReader<'static>),
    Request {
        url: String,
        authorization: Option<String>,
        body: Vec<u8>,
    },
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Stream::Request {
            url,
            authorization,
            body,
        } = self
        {
            let mut request = agent()
                .post(url.as_str())
                .header("Content-Type", REQUEST)
                .header("Accept", RESULT);
            if let Some(value) = authorization {
                request = request.header("Authorization", value.as_str());
            }
            let response = request
                .send(&body[..])
                .map_err(|e| std::io::Error::other(send_error(url, &e).message().to_string()))?;
            check(&response, url, RESULT)
                .map_err(|e| std::io::Error::other(e.message().to_string()))?;
            *self = Stream::Reading(response.into_body().into_reader());
        }
        match self {
            Stream::Reading(reader) => reader.read(buf),
            Stream::Request { .. } => unreachable!("the request was sent above"),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Request { body, .. } => {
                body.extend_from_slice(data);
                Ok(data.len())
            }
            Stream::Reading(_) => Err(std::io::Error::other("git wrote after the answer began")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_taken_off_the_url_and_decoded() {
        assert_eq!(
            split_userinfo("https://bot:p%40ss@example.com:8443/a/vms.git"),
            (
                "https://example.com:8443/a/vms.git".to_string(),
                Some("bot".to_string()),
                Some("p@ss".to_string())
            )
        );
        assert_eq!(
            split_userinfo("https://deploy@example.com/vms.git"),
            (
                "https://example.com/vms.git".to_string(),
                Some("deploy".to_string()),
                None
            )
        );
        // An '@' in the path is not user info.
        assert_eq!(
            split_userinfo("https://example.com/a@b"),
            ("https://example.com/a@b".to_string(), None, None)
        );
        assert_eq!(
            basic("x-access-token", "s3cret"),
            "Basic eC1hY2Nlc3MtdG9rZW46czNjcmV0"
        );
    }

    #[test]
    fn a_token_file_is_trimmed_and_must_hold_a_token() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("token");
        std::fs::write(&file, " s3cret \n").unwrap();
        assert_eq!(read_token(&file).unwrap(), "s3cret");
        std::fs::write(&file, " \n").unwrap();
        assert!(read_token(&file).unwrap_err().contains("is empty"));
        let missing = tmp.path().join("missing");
        assert!(read_token(&missing).unwrap_err().contains("missing"));
    }
}
