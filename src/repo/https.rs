//! The `https://` fetch, and the one place TLS is set up.
//!
//! libgit2 with its own OpenSSL stream sets OpenSSL up when the library initialises: it
//! parses the whole CA bundle (about 20 to 28 ms of CPU) in every process that opens a
//! repository, even one that fetches from a local path or over SSH and never speaks TLS.
//! vmsync therefore builds libgit2 without a TLS stream (git2 without its `https`
//! feature) and fetches `https://` URLs itself, with no transport registered in libgit2:
//! git's smart HTTP protocol (v0, stateless RPC) over ureq with native-tls, the TLS
//! stack the change probe uses too ([`tls_config`]):
//! 1. `GET <url>/info/refs?service=git-upload-pack`: the advertisement (pkt-lines,
//!    [`super::pkt_line`], at most [`MAX_ADVERTISEMENT`] bytes) names the branch's tip;
//! 2. if the local clone lacks that commit, `POST <url>/git-upload-pack` with one
//!    `want`, a `have` for each of the clone's newest commits (at most [`MAX_HAVES`]) and
//!    `done`; no thin pack, `side-band-64k` when offered (else `side-band`, else a raw
//!    pack);
//! 3. the pack goes into the clone through libgit2's pack writer (`Odb::packwriter`,
//!    which indexes and checks it); the caller then points the tracking ref at the tip.
//!
//! The agent here and the probe's each build their TLS context, which reads the CA
//! bundle (`SSL_CERT_FILE`, else the system's), on their first `https://` connection and
//! keep it for the rest of the process; a sync over a local path, `file://`, `ssh://`,
//! `git://` or `http://` (with no probe or an `http://` one) never reads it. `http://`
//! stays with libgit2's own HTTP client.
//!
//! Credentials: a `401` is answered once, with the token of `[source] token_file` as the
//! password (user name from the URL, else `x-access-token`), else with the password
//! embedded in the URL; a second `401` is a refusal. Neither the token nor a password is
//! ever logged; URLs in logs and errors are redacted. Like libgit2's transport: no proxy,
//! redirects followed on the first request only (at most 5), no timeout beyond the
//! operating system's, and no push.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::OnceLock;

use base64::Engine as _;
use git2::{Oid, Repository};
use tracing::{debug, warn};
use ureq::ResponseExt as _;

use crate::repo::pkt_line::{self, Next, Packet};
use crate::util::redact::redact;
use crate::util::secret_file::{self, SecretFileError};

const REFS: &str = "/info/refs?service=git-upload-pack";
const ADVERTISEMENT: &str = "application/x-git-upload-pack-advertisement";
const REQUEST: &str = "application/x-git-upload-pack-request";
const RESULT: &str = "application/x-git-upload-pack-result";

/// The largest advertisement read; a larger one fails the fetch.
pub const MAX_ADVERTISEMENT: u64 = 16 << 20;

/// The most `have` lines sent: the clone's newest commits, enough for the server to
/// find what the clone holds after any ordinary history.
pub const MAX_HAVES: usize = 256;

/// Why an https fetch failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpsError {
    /// The remote asked for credentials and refused (or none could be offered).
    Credentials(String),
    /// Anything else: the connection, TLS, the server's answer, the pack.
    Fetch(String),
}

/// What a fetch found and brought in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The tip of the branch the remote advertised (`None`: no such branch).
    pub advertised: Option<Oid>,
    /// Objects and bytes of the pack received (zero when the clone had the tip).
    pub received_objects: usize,
    pub received_bytes: usize,
}

/// Fetches `refs/heads/<branch>` of the `https://` repository `url` into `repo`'s object
/// database; the tracking ref is left to the caller. `token_file` answers a `401`.
pub fn fetch(
    repo: &Repository,
    url: &str,
    branch: &str,
    token_file: Option<&Path>,
) -> Result<Transfer, HttpsError> {
    let session = Session::open(url, token_file)?;
    let advertisement = Advertisement::parse(&session.advertisement).map_err(|e| {
        HttpsError::Fetch(format!(
            "malformed advertisement from '{}': {e}",
            redact(url)
        ))
    })?;
    let Some(tip) = advertisement.tip(branch) else {
        return Ok(Transfer {
            advertised: None,
            received_objects: 0,
            received_bytes: 0,
        });
    };
    let odb = repo
        .odb()
        .map_err(|e| HttpsError::Fetch(e.message().to_string()))?;
    if odb.exists(tip) {
        debug!(url = %redact(url), tip = %tip, "https: the clone holds the tip");
        return Ok(Transfer {
            advertised: Some(tip),
            received_objects: 0,
            received_bytes: 0,
        });
    }
    let caps = advertisement.request_caps();
    let body = upload_request(tip, &haves(repo), &caps);
    let response = session.upload_pack(body).map_err(HttpsError::Fetch)?;
    let (received_objects, received_bytes) = receive_pack(&odb, response).map_err(|e| {
        HttpsError::Fetch(format!(
            "failed to receive the pack from '{}': {e}",
            redact(url)
        ))
    })?;
    Ok(Transfer {
        advertised: Some(tip),
        received_objects,
        received_bytes,
    })
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
) -> Result<(), String> {
    let status = response.status().as_u16();
    if status != 200 {
        return Err(format!(
            "unexpected http status code {status} from '{}'",
            redact(url)
        ));
    }
    let found = content_type(response);
    if found != expected {
        return Err(format!(
            "invalid content-type '{found}' from '{}': not a smart git server",
            redact(url)
        ));
    }
    Ok(())
}

fn send_error(url: &str, e: &ureq::Error) -> String {
    format!("request to '{}' failed: {e}", redact(url))
}

/// The answer to the first request, and what the pack request needs of it.
struct Session {
    /// The repository URL (after redirects, without user info).
    base: String,
    /// The `Authorization` header the server accepted, if it asked for one.
    authorization: Option<String>,
    advertisement: Vec<u8>,
}

impl Session {
    /// `GET info/refs`, answering one `401`; the advertisement, bounded.
    fn open(url: &str, token_file: Option<&Path>) -> Result<Session, HttpsError> {
        let (base, user, password) = split_userinfo(url);
        let base = base.trim_end_matches('/').to_string();
        let refs = format!("{base}{REFS}");
        let get = |authorization: Option<&str>| {
            let mut request = agent().get(&refs).header("Pragma", "no-cache");
            if let Some(value) = authorization {
                request = request.header("Authorization", value);
            }
            request
                .call()
                .map_err(|e| HttpsError::Fetch(send_error(&refs, &e)))
        };
        debug!(url = %redact(url), "https: asking for the advertisement");
        let mut response = get(None)?;
        let mut authorization = None;
        if response.status().as_u16() == 401 {
            let (header, offered) = credentials(user.as_deref(), password.as_deref(), token_file)
                .map_err(|m| refuse(url, m))?;
            response = get(Some(&header))?;
            if response.status().as_u16() == 401 {
                return Err(refuse(url, format!("{offered} was refused: HTTP 401")));
            }
            authorization = Some(header);
        }
        check(&response, &refs, ADVERTISEMENT).map_err(HttpsError::Fetch)?;
        let landed = response.get_uri().to_string();
        let base = landed
            .strip_suffix(REFS)
            .map_or(base, |b| split_userinfo(b).0);
        let mut advertisement = Vec::new();
        response
            .body_mut()
            .as_reader()
            .take(MAX_ADVERTISEMENT + 1)
            .read_to_end(&mut advertisement)
            .map_err(|e| {
                HttpsError::Fetch(format!(
                    "failed to read the advertisement from '{}': {e}",
                    redact(&refs)
                ))
            })?;
        if advertisement.len() as u64 > MAX_ADVERTISEMENT {
            return Err(HttpsError::Fetch(format!(
                "the advertisement from '{}' is larger than {MAX_ADVERTISEMENT} bytes",
                redact(&refs)
            )));
        }
        Ok(Session {
            base,
            authorization,
            advertisement,
        })
    }

    /// `POST git-upload-pack` with `body`: the answer, once its status and type are checked.
    fn upload_pack(&self, body: Vec<u8>) -> Result<impl Read + use<>, String> {
        let url = format!("{}/git-upload-pack", self.base);
        let mut request = agent()
            .post(url.as_str())
            .header("Content-Type", REQUEST)
            .header("Accept", RESULT);
        if let Some(value) = &self.authorization {
            request = request.header("Authorization", value.as_str());
        }
        debug!(url = %redact(&url), bytes = body.len(), "https: asking for the pack");
        let response = request.send(&body[..]).map_err(|e| send_error(&url, &e))?;
        check(&response, &url, RESULT)?;
        Ok(response.into_body().into_reader())
    }
}

/// The `Authorization` header answering a `401`, and what it offers (for messages):
/// the token file's token, else the password in the URL.
fn credentials(
    user: Option<&str>,
    password: Option<&str>,
    token_file: Option<&Path>,
) -> Result<(String, String), String> {
    match (token_file, password) {
        (Some(file), _) => {
            let token = read_token(file)?;
            let user = user.unwrap_or("x-access-token");
            debug!(user = %user, token_file = %file.display(), "offering token");
            Ok((
                basic(user, &token),
                format!("token from '{}'", file.display()),
            ))
        }
        (None, Some(password)) => Ok((
            basic(user.unwrap_or(""), password),
            "the password in the url".to_string(),
        )),
        (None, None) => {
            Err("the remote asks for credentials but no token_file is configured".into())
        }
    }
}

/// A credential error, logged (never the secret) and returned.
fn refuse(url: &str, message: String) -> HttpsError {
    warn!(url = %redact(url), error = %message, "authentication failed");
    HttpsError::Credentials(message)
}

/// The refs and capabilities of a smart-HTTP advertisement (protocol v0).
#[derive(Debug, Default, PartialEq, Eq)]
struct Advertisement {
    refs: Vec<(String, Oid)>,
    caps: Vec<String>,
}

impl Advertisement {
    /// Parses `# service=git-upload-pack`, a flush, then `<sha> <ref>` lines (the first
    /// with the capabilities after a NUL) up to a flush. Object ids are SHA-1.
    fn parse(body: &[u8]) -> Result<Advertisement, String> {
        let packets = pkt_line::split(body)?;
        let mut packets = packets.into_iter().peekable();
        if let Some(Packet::Data(line)) = packets.peek()
            && line.starts_with(b"# service=")
        {
            if line.trim_ascii_end() != b"# service=git-upload-pack" {
                return Err(format!("unexpected service line '{}'", line.escape_ascii()));
            }
            packets.next();
            if packets.next() != Some(Packet::Flush) {
                return Err("no flush after the service line".into());
            }
        }
        let mut advertisement = Advertisement::default();
        let mut ended = false;
        for packet in packets.by_ref() {
            let Packet::Data(line) = packet else {
                ended = true;
                break;
            };
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            if line == b"version 1" {
                continue;
            }
            let (line, caps) = match line.iter().position(|&b| b == 0) {
                Some(nul) => (&line[..nul], Some(&line[nul + 1..])),
                None => (line, None),
            };
            if let Some(caps) = caps {
                let caps = std::str::from_utf8(caps).map_err(|_| "capabilities are not UTF-8")?;
                advertisement.caps = caps.split_ascii_whitespace().map(str::to_string).collect();
            }
            let text = std::str::from_utf8(line)
                .map_err(|_| format!("malformed line '{}'", line.escape_ascii()))?;
            let (sha, name) = text
                .split_once(' ')
                .ok_or_else(|| format!("malformed line '{}'", text.escape_default()))?;
            let oid = object_id(sha)?;
            if name != "capabilities^{}" {
                advertisement.refs.push((name.to_string(), oid));
            }
        }
        if !ended {
            return Err("the ref list does not end with a flush".into());
        }
        if packets.next().is_some() {
            return Err("more after the ref list".into());
        }
        Ok(advertisement)
    }

    /// The object `refs/heads/<branch>` points to.
    fn tip(&self, branch: &str) -> Option<Oid> {
        let wanted = format!("refs/heads/{branch}");
        self.refs
            .iter()
            .find(|(name, _)| *name == wanted)
            .map(|(_, oid)| *oid)
    }

    /// The capabilities the `want` line asks for: a side band (the wider one) and
    /// `ofs-delta` and `no-progress` when offered, and vmsync's agent to one that names
    /// its own.
    fn request_caps(&self) -> Vec<String> {
        let offered = |cap: &str| self.caps.iter().any(|c| c == cap);
        let mut caps: Vec<String> = ["side-band-64k", "side-band"]
            .into_iter()
            .find(|cap| offered(cap))
            .into_iter()
            .chain(
                ["ofs-delta", "no-progress"]
                    .into_iter()
                    .filter(|cap| offered(cap)),
            )
            .map(str::to_string)
            .collect();
        if self.caps.iter().any(|c| c.starts_with("agent=")) {
            caps.push(concat!("agent=vmsync/", env!("CARGO_PKG_VERSION")).to_string());
        }
        caps
    }
}

/// A 40-digit hex SHA-1 object id.
fn object_id(sha: &str) -> Result<Oid, String> {
    if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the remote is a SHA-256 repository, which vmsync does not fetch".into());
    }
    if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("malformed object id '{}'", sha.escape_default()));
    }
    Oid::from_str(sha).map_err(|_| format!("malformed object id '{sha}'"))
}

/// The newest commits the clone holds (every ref's history, newest first), at most
/// [`MAX_HAVES`]; none if they cannot be walked (the server then sends everything).
fn haves(repo: &Repository) -> Vec<Oid> {
    let Ok(mut walk) = repo.revwalk() else {
        return Vec::new();
    };
    let Ok(references) = repo.references() else {
        return Vec::new();
    };
    for reference in references.flatten() {
        if let Ok(commit) = reference.peel_to_commit() {
            let _ = walk.push(commit.id());
        }
    }
    let _ = walk.set_sorting(git2::Sort::TIME);
    walk.map_while(Result::ok).take(MAX_HAVES).collect()
}

/// The body of the pack request: one `want` with the capabilities, a flush, the
/// `have`s, `done`.
fn upload_request(want: Oid, haves: &[Oid], caps: &[String]) -> Vec<u8> {
    let mut body = pkt_line::encode(&format!("want {want} {}\n", caps.join(" ")));
    body.push_str("0000");
    for have in haves {
        body.push_str(&pkt_line::encode(&format!("have {have}\n")));
    }
    body.push_str(&pkt_line::encode("done\n"));
    body.into_bytes()
}

/// Reads the answer to the pack request (`ACK`/`NAK` lines, then the pack, in side-band
/// packets or raw) into `odb`'s pack writer and commits it: (objects, pack bytes).
fn receive_pack(odb: &git2::Odb<'_>, answer: impl Read) -> Result<(usize, usize), String> {
    let libgit2 = |e: git2::Error| e.message().to_string();
    let mut writer = odb.packwriter().map_err(libgit2)?;
    let mut pack = PackCount::default();
    let mut packets = pkt_line::Reader::new(answer);
    let mut raw = None;
    loop {
        let line = match packets.read()? {
            Next::Packet(Packet::Data(line)) => line,
            Next::Packet(Packet::Flush) | Next::End => break,
            Next::Raw(head) => {
                raw = Some(head);
                break;
            }
        };
        if line.starts_with(b"ACK ") || line.starts_with(b"NAK") {
            continue;
        }
        if let Some(message) = line.strip_prefix(b"ERR ") {
            return Err(format!(
                "the remote said: {}",
                message.trim_ascii().escape_ascii()
            ));
        }
        match line.split_first() {
            Some((1, data)) => pack.write(&mut writer, data)?,
            Some((2, progress)) => {
                debug!(remote = %progress.trim_ascii().escape_ascii(), "https: remote")
            }
            Some((3, message)) => {
                return Err(format!(
                    "the remote failed: {}",
                    message.trim_ascii().escape_ascii()
                ));
            }
            _ => return Err(format!("unexpected line '{}'", line.escape_ascii())),
        }
    }
    if let Some(head) = raw {
        if head != *b"PACK" {
            return Err(format!("unexpected bytes '{}'", head.escape_ascii()));
        }
        pack.write(&mut writer, &head)?;
        let mut rest = packets.into_inner();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rest.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => pack.write(&mut writer, &buf[..n])?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("failed to read the pack: {e}")),
            }
        }
    }
    if pack.bytes == 0 {
        return Err("the answer holds no pack".into());
    }
    writer.commit().map_err(libgit2)?;
    Ok((pack.objects(), pack.bytes))
}

/// The bytes of a pack written so far, and its 12-byte header (which counts its objects).
#[derive(Default)]
struct PackCount {
    header: Vec<u8>,
    bytes: usize,
}

impl PackCount {
    fn write(&mut self, writer: &mut git2::OdbPackwriter<'_>, data: &[u8]) -> Result<(), String> {
        let missing = 12usize.saturating_sub(self.header.len()).min(data.len());
        self.header.extend_from_slice(&data[..missing]);
        self.bytes += data.len();
        writer
            .write_all(data)
            .map_err(|e| format!("failed to write the pack: {e}"))
    }

    fn objects(&self) -> usize {
        self.header.get(8..12).map_or(0, |n| {
            u32::from_be_bytes(n.try_into().expect("4 bytes")) as usize
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    fn pkt(s: &str) -> String {
        pkt_line::encode(s)
    }

    #[test]
    fn parses_an_advertisement() {
        let body = format!(
            "{}0000{}{}{}0000",
            pkt("# service=git-upload-pack\n"),
            pkt(&format!(
                "{B} HEAD\0multi_ack side-band-64k ofs-delta agent=git/2.39\n"
            )),
            pkt(&format!("{A} refs/heads/main\n")),
            pkt(&format!("{B} refs/heads/dev\n")),
        );
        let ad = Advertisement::parse(body.as_bytes()).unwrap();
        assert_eq!(ad.tip("main"), Some(Oid::from_str(A).unwrap()));
        assert_eq!(ad.tip("dev"), Some(Oid::from_str(B).unwrap()));
        assert_eq!(ad.tip("prod"), None);
        assert_eq!(
            ad.request_caps(),
            vec![
                "side-band-64k".to_string(),
                "ofs-delta".to_string(),
                concat!("agent=vmsync/", env!("CARGO_PKG_VERSION")).to_string()
            ]
        );
        // An empty repository: no refs, only the capabilities.
        let zero = "0".repeat(40);
        let empty = format!(
            "{}0000{}0000",
            pkt("# service=git-upload-pack\n"),
            pkt(&format!("{zero} capabilities^{{}}\0side-band\n"))
        );
        let ad = Advertisement::parse(empty.as_bytes()).unwrap();
        assert!(ad.refs.is_empty());
        assert_eq!(ad.request_caps(), vec!["side-band".to_string()]);
    }

    #[test]
    fn a_bad_advertisement_is_an_error() {
        let service = format!("{}0000", pkt("# service=git-upload-pack\n"));
        let bad = [
            // Truncated: the payload, the ref list without its flush.
            format!("{service}{}", &pkt(&format!("{A} refs/heads/main\n"))[..20]),
            format!("{service}{}", pkt(&format!("{A} refs/heads/main\n"))),
            // Oversized length, garbage, an HTML page.
            format!("{service}ffff{A}"),
            format!("{service}zzzz"),
            "<html><body>sign in</body></html>".to_string(),
            // Lines that are not refs; a short or SHA-256 object id; another service.
            format!("{service}{}0000", pkt("hello\n")),
            format!("{service}{}0000", pkt("1234 refs/heads/main\n")),
            format!("{service}{}0000", pkt(&format!("{A}{A} refs/heads/main\n"))),
            format!("{}0000", pkt("# service=git-receive-pack\n")),
            format!("{}{}", pkt("# service=git-upload-pack\n"), pkt("x")),
        ];
        for body in bad {
            assert!(
                Advertisement::parse(body.as_bytes()).is_err(),
                "{}",
                body.escape_default()
            );
        }
        let sha256 = format!(
            "{service}{}0000",
            pkt(&format!("{}{} refs/heads/main\n", A, &A[..24]))
        );
        assert!(
            Advertisement::parse(sha256.as_bytes())
                .unwrap_err()
                .contains("SHA-256")
        );
    }

    #[test]
    fn the_pack_request_wants_the_tip_and_names_what_the_clone_holds() {
        let want = Oid::from_str(A).unwrap();
        let have = Oid::from_str(B).unwrap();
        let body = upload_request(want, &[have], &["side-band-64k".to_string()]);
        let expected = format!(
            "{}0000{}{}",
            pkt(&format!("want {A} side-band-64k\n")),
            pkt(&format!("have {B}\n")),
            pkt("done\n")
        );
        assert_eq!(String::from_utf8(body).unwrap(), expected);
    }

    /// A repository with one commit and a pack of all its objects: (repo dir, tip, pack).
    fn packed_commit() -> (tempfile::TempDir, Oid, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path()).unwrap();
        let blob = repo.blob(b"version = 1\n").unwrap();
        let mut tree = repo.treebuilder(None).unwrap();
        tree.insert("vmsync.toml", blob, 0o100644).unwrap();
        let tree = repo.find_tree(tree.write().unwrap()).unwrap();
        let who = git2::Signature::now("t", "t@t.invalid").unwrap();
        let tip = repo.commit(None, &who, &who, "one", &tree, &[]).unwrap();
        let mut builder = repo.packbuilder().unwrap();
        builder.insert_commit(tip).unwrap();
        let mut buf = git2::Buf::new();
        builder.write_buf(&mut buf).unwrap();
        let pack = buf.to_vec();
        drop((builder, tree));
        (dir, tip, pack)
    }

    /// The pack in side-band-64k packets, after a NAK.
    fn side_band(pack: &[u8]) -> Vec<u8> {
        let mut answer = pkt("NAK\n").into_bytes();
        for chunk in pack.chunks(1000) {
            answer.extend_from_slice(format!("{:04x}\x01", chunk.len() + 5).as_bytes());
            answer.extend_from_slice(chunk);
        }
        answer.extend_from_slice(format!("{}0000", pkt("\x02done\n")).as_bytes());
        answer
    }

    #[test]
    fn a_pack_is_received_in_side_band_or_raw() {
        let (_remote, tip, pack) = packed_commit();
        for answer in [side_band(&pack), [pkt("NAK\n").as_bytes(), &pack].concat()] {
            let clone = tempfile::tempdir().unwrap();
            let repo = Repository::init_bare(clone.path()).unwrap();
            let odb = repo.odb().unwrap();
            assert_eq!(receive_pack(&odb, &answer[..]), Ok((3, pack.len())));
            assert!(repo.find_commit(tip).is_ok());
        }
    }

    #[test]
    fn a_bad_pack_answer_is_an_error_and_stores_nothing() {
        let (_remote, tip, pack) = packed_commit();
        let whole = side_band(&pack);
        let bad: Vec<(Vec<u8>, &str)> = vec![
            // Truncated in a packet, and a pack cut short.
            (whole[..whole.len() - 30].to_vec(), "truncated"),
            (
                [pkt("NAK\n").as_bytes(), &pack[..pack.len() / 2]].concat(),
                "",
            ),
            // Errors from the remote.
            (pkt("ERR access denied\n").into_bytes(), "access denied"),
            (
                format!(
                    "{}{}",
                    pkt("NAK\n"),
                    pkt("\x03upload-pack: out of memory\n")
                )
                .into_bytes(),
                "out of memory",
            ),
            // Garbage and an oversized length.
            (b"<html>oops</html>".to_vec(), "unexpected"),
            (
                format!("{}ffff\x01", pkt("NAK\n")).into_bytes(),
                "larger than",
            ),
            (
                format!("{}{}", pkt("NAK\n"), pkt("\x07what")).into_bytes(),
                "unexpected",
            ),
            // No pack at all.
            (format!("{}0000", pkt("NAK\n")).into_bytes(), "no pack"),
        ];
        for (answer, says) in bad {
            let clone = tempfile::tempdir().unwrap();
            let repo = Repository::init_bare(clone.path()).unwrap();
            let odb = repo.odb().unwrap();
            let err = receive_pack(&odb, &answer[..]).unwrap_err();
            assert!(err.contains(says), "{err}");
            assert!(repo.find_commit(tip).is_err(), "{err}");
        }
    }

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
