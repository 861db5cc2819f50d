//! The push webhook (`[webhook] listen`, daemon mode only): an HTTP listener on the
//! daemon's tokio runtime (hyper) that turns a signed push to the followed branch into
//! "sync now", and serves `GET /healthz` and `GET /metrics` beside it.
//!
//! What a request may do is decided by one pure function, [`verify`]: headers, body,
//! secret and branch in, a [`Decision`] out (fuzzed in `fuzz/fuzz_targets/webhook.rs`).
//! The signature is checked before the body is parsed: GitHub and Forgejo/Gitea sign the
//! body with HMAC-SHA256 (`X-Hub-Signature-256: sha256=HEX`, `X-Gitea-Signature: HEX`),
//! GitLab sends the secret itself (`X-Gitlab-Token`); both are compared in constant time.
//!
//! A request never runs a sync itself: it wakes the daemon's loop ([`Hub::request_sync`],
//! a [`tokio::sync::Notify`]), which runs at most one sync at a time and keeps at most one
//! more queued, however many pushes arrive. What bounds misbehaving clients (idle and
//! slowloris connections, replayed deliveries) is in [`super::webhook_guard`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

use crate::agent::webhook_guard;
use crate::util::secret_file::{self, SecretFileError};

/// The path push events are posted to.
pub const PUSH_PATH: &str = "/hooks/push";

/// Largest request body accepted (1 MiB); a larger one is answered 413 unread.
pub const BODY_LIMIT: usize = 1 << 20;

/// Connections that may wait for request headers at once (new ones, and kept-alive ones
/// between requests); when all are taken, a new connection closes the one that waited
/// longest ([`webhook_guard::Waiting`]).
const MAX_WAITING: usize = 256;

/// Request bodies read at once; a push beyond them is answered 503 at once.
const MAX_BODIES: usize = 64;

/// Time a client has to send its request headers (each request, the first included).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a client has to send its request body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long, and how many, signed push deliveries are remembered: a repeat of one (the
/// same body, or the same delivery id) starts no sync.
const REPLAY_WINDOW: Duration = Duration::from_secs(600);
const REPLAY_MEMORY: usize = 1024;

/// Headers naming a delivery, per forge (not signed: the body digest is what stops a
/// replay; the id catches a forge's redelivery).
const DELIVERY_HEADERS: [&str; 4] = [
    "x-github-delivery",
    "x-gitea-delivery",
    "x-forgejo-delivery",
    "x-gitlab-event-uuid",
];

/// Longest a connection is kept, requests and idle keep-alive included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The shared secret of the webhook: the content of `secret_file` without its trailing
/// newline. Never printed (`Debug` shows its length only).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret from its bytes (tests, fuzzing); files go through [`read_secret`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// `[webhook]` of the agent config, checked (see docs/webhook.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    /// `[webhook] listen`: address and port of the listener; no default (off).
    pub listen: SocketAddr,
    /// `[webhook] secret_file`: the shared secret (required with `listen`). The daemon
    /// reads it at start and on every reload (SIGHUP), with [`read_secret`]; other
    /// commands never read it (so `vmsync validate` checks a config on a machine that
    /// does not have the host's secret).
    pub secret_file: PathBuf,
}

/// Reads the secret from `path`: trailing newlines (`\n`, `\r\n`) are not part of it, an
/// empty secret is refused, and a file that group or others may read is warned about.
pub fn read_secret(path: &Path) -> Result<Secret, String> {
    let bytes = secret_file::read(path).map_err(|e| match e {
        SecretFileError::Unreadable(e) => format!(
            "failed to read [webhook] secret_file '{}': {e}",
            path.display()
        ),
        SecretFileError::Empty => format!(
            "invalid [webhook] secret_file '{}': the secret is empty",
            path.display()
        ),
    })?;
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o044 != 0 {
            warn!(
                file = %path.display(),
                mode = format!("{mode:04o}"),
                "the webhook secret file is readable by group or others: chmod 600 it"
            );
        }
    }
    Ok(Secret(bytes))
}

/// What to do with one `POST /hooks/push` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A signed push to the followed branch: sync now (202).
    Sync,
    /// A signed ping (GitHub's first delivery): answered 200, no sync.
    Ping,
    /// Signed, but nothing to do (another branch, a tag, another event): 202, no sync.
    Ignore(String),
    /// No signature or token, or a wrong one: 401, no sync.
    Unauthorized(&'static str),
    /// Signed, but not a push payload (bad JSON, no `ref`): 400, no sync.
    BadRequest(String),
}

impl Decision {
    /// The HTTP status this decision is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Decision::Sync | Decision::Ignore(_) => StatusCode::ACCEPTED,
            Decision::Ping => StatusCode::OK,
            Decision::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Decision::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Headers carrying an HMAC-SHA256 of the body: (name, prefix before the hex digest).
/// Forgejo sends `X-Forgejo-Signature` beside the Gitea one.
const HMAC_HEADERS: [(&str, &str); 3] = [
    ("x-hub-signature-256", "sha256="),
    ("x-gitea-signature", ""),
    ("x-forgejo-signature", ""),
];

/// GitLab's header: the secret itself.
const TOKEN_HEADER: &str = "x-gitlab-token";

/// Headers naming the event, per forge.
const EVENT_HEADERS: [&str; 4] = [
    "x-github-event",
    "x-gitea-event",
    "x-forgejo-event",
    "x-gitlab-event",
];

/// The part of a push payload vmsync reads. GitHub, Gitea, Forgejo and GitLab all send
/// `ref` (`refs/heads/BRANCH`) and `after` (the new head; all zeros when the branch was
/// deleted).
#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    after: Option<String>,
    #[serde(default)]
    deleted: bool,
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8]) -> HmacSha256 {
    <HmacSha256 as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length")
}

/// Whether the request carries a signature or token made with `secret`. Every one it
/// carries must be right, and at least one must be there.
fn authenticated(headers: &HeaderMap, body: &[u8], secret: &[u8]) -> Result<(), &'static str> {
    let mut seen = false;
    let signed = {
        let mut m = mac(secret);
        m.update(body);
        m
    };
    for (name, prefix) in HMAC_HEADERS {
        for value in headers.get_all(name) {
            seen = true;
            let digest = value
                .as_bytes()
                .strip_prefix(prefix.as_bytes())
                .and_then(|hex_text| hex::decode(hex_text.trim_ascii()).ok())
                .ok_or("malformed signature header")?;
            // verify_slice compares in constant time.
            signed
                .clone()
                .verify_slice(&digest)
                .map_err(|_| "wrong signature")?;
        }
    }
    for value in headers.get_all(TOKEN_HEADER) {
        seen = true;
        // The MACs of the token and of the secret under the secret: equal exactly when
        // the two are, compared in constant time and without leaking the length.
        let mut token = mac(secret);
        token.update(value.as_bytes());
        let mut expected = mac(secret);
        expected.update(secret);
        token
            .verify_slice(&expected.finalize().into_bytes())
            .map_err(|_| "wrong token")?;
    }
    if seen {
        Ok(())
    } else {
        Err("no signature (X-Hub-Signature-256, X-Gitea-Signature) or token (X-Gitlab-Token)")
    }
}

/// The event the forge names in its header, lowercased; `None` when no header names one.
fn event(headers: &HeaderMap) -> Option<String> {
    EVENT_HEADERS.iter().find_map(|name| {
        let value = headers.get(*name)?;
        Some(
            String::from_utf8_lossy(value.as_bytes())
                .trim()
                .to_ascii_lowercase(),
        )
    })
}

/// Decides what a `POST /hooks/push` request does: authenticate, then read the event and
/// the pushed ref. Pure: no I/O, no clock.
pub fn verify(headers: &HeaderMap, body: &[u8], secret: &Secret, branch: &str) -> Decision {
    if let Err(reason) = authenticated(headers, body, secret.as_bytes()) {
        return Decision::Unauthorized(reason);
    }
    match event(headers).as_deref() {
        None | Some("push" | "push hook") => {}
        Some("ping") => return Decision::Ping,
        Some(other) => return Decision::Ignore(format!("event '{other}' is not a push")),
    }
    // JSON is UTF-8; serde_json would not check the strings of fields it skips.
    let Ok(body) = std::str::from_utf8(body) else {
        return Decision::BadRequest("the body is not a push payload: not UTF-8".into());
    };
    let payload: PushPayload = match serde_json::from_str(body) {
        Ok(p) => p,
        Err(e) => return Decision::BadRequest(format!("the body is not a push payload: {e}")),
    };
    let Some(git_ref) = payload.git_ref else {
        return Decision::BadRequest("the push payload has no 'ref'".into());
    };
    let Some(pushed) = git_ref.strip_prefix("refs/heads/") else {
        return Decision::Ignore(format!("'{git_ref}' is not a branch"));
    };
    if pushed != branch {
        return Decision::Ignore(format!(
            "push to branch '{pushed}'; this host follows '{branch}'"
        ));
    }
    let zeros = payload
        .after
        .as_deref()
        .is_some_and(|a| !a.is_empty() && a.bytes().all(|b| b == b'0'));
    if payload.deleted || zeros {
        return Decision::Ignore(format!("the push deleted branch '{pushed}'"));
    }
    Decision::Sync
}

/// What the listener shares with the daemon's loop.
pub struct Hub {
    /// Secret and followed branch; replaced on reload.
    auth: RwLock<(Secret, String)>,
    /// Wakes the daemon's loop. `Notify` keeps at most one wake-up while nobody waits,
    /// so pushes during a sync coalesce into one queued sync.
    trigger: Notify,
    /// The metrics text of the last sync (the figures of the metrics file).
    metrics: Mutex<String>,
    /// Requests answered, by status code (for `/metrics`).
    answered: Mutex<std::collections::BTreeMap<u16, u64>>,
    /// Pushes that asked for a sync.
    requested: AtomicU64,
    /// Connections waiting for request headers.
    waiting: Arc<webhook_guard::Waiting>,
    /// Request bodies being read.
    bodies: Arc<Semaphore>,
    /// Signed push deliveries seen lately.
    recent: Mutex<webhook_guard::Recent>,
}

impl Hub {
    pub fn new(secret: Secret, branch: &str, metrics: String) -> Arc<Self> {
        Arc::new(Self {
            auth: RwLock::new((secret, branch.to_string())),
            trigger: Notify::new(),
            metrics: Mutex::new(metrics),
            answered: Mutex::default(),
            requested: AtomicU64::new(0),
            waiting: webhook_guard::Waiting::new(MAX_WAITING),
            bodies: Arc::new(Semaphore::new(MAX_BODIES)),
            recent: Mutex::new(webhook_guard::Recent::new(REPLAY_MEMORY, REPLAY_WINDOW)),
        })
    }

    /// A reloaded config: new secret and branch for the next requests; the deliveries
    /// seen are forgotten.
    pub fn reload(&self, secret: Secret, branch: &str) {
        *self.auth.write().expect("lock") = (secret, branch.to_string());
        self.recent.lock().expect("lock").clear();
    }

    /// Replaces the metrics text (after every sync).
    pub fn set_metrics(&self, text: String) {
        *self.metrics.lock().expect("lock") = text;
    }

    /// Asks the daemon's loop for a sync: starts one now if it is idle, or queues one
    /// (only one) behind the sync in flight.
    pub fn request_sync(&self) {
        self.requested.fetch_add(1, Ordering::Relaxed);
        self.trigger.notify_one();
    }

    /// Resolves when a sync was requested (consumes the request).
    pub async fn sync_requested(&self) {
        self.trigger.notified().await
    }

    fn count(&self, status: StatusCode) {
        *self
            .answered
            .lock()
            .expect("lock")
            .entry(status.as_u16())
            .or_default() += 1;
    }

    /// `/metrics`: the metrics file's figures, then the listener's own counters.
    fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = self.metrics.lock().expect("lock").clone();
        let _ = writeln!(
            out,
            "# HELP vmsync_webhook_requests_total Webhook requests answered since the daemon started, by HTTP status."
        );
        let _ = writeln!(out, "# TYPE vmsync_webhook_requests_total counter");
        for (code, n) in self.answered.lock().expect("lock").iter() {
            let _ = writeln!(out, "vmsync_webhook_requests_total{{code=\"{code}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP vmsync_webhook_syncs_requested_total Pushes that asked for a sync (coalesced into at most one queued sync)."
        );
        let _ = writeln!(out, "# TYPE vmsync_webhook_syncs_requested_total counter");
        let _ = writeln!(
            out,
            "vmsync_webhook_syncs_requested_total {}",
            self.requested.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP vmsync_webhook_connections_evicted_total Connections closed while waiting for request headers, to make room for newer ones."
        );
        let _ = writeln!(
            out,
            "# TYPE vmsync_webhook_connections_evicted_total counter"
        );
        let _ = writeln!(
            out,
            "vmsync_webhook_connections_evicted_total {}",
            self.waiting.evicted()
        );
        out
    }
}

/// Binds the listener (at daemon start, so a taken port is a start-up error).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("failed to listen on {addr} for [webhook] listen: {e}"))
}

/// Serves requests until the runtime ends. The loop accepts every connection at once:
/// what a connection may hold is bounded per connection (header deadline, body limit
/// and deadline, lifetime) and by [`MAX_WAITING`] and [`MAX_BODIES`], never by making
/// new clients queue behind idle ones.
pub async fn serve(listener: TcpListener, hub: Arc<Hub>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: wait a
                // little rather than spin.
                warn!(error = %e, "webhook: failed to accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = Arc::new(hub.waiting.join());
        let hub = hub.clone();
        tokio::spawn(async move {
            let conn_slot = slot.clone();
            let service = hyper::service::service_fn(move |req| {
                let (hub, slot) = (hub.clone(), conn_slot.clone());
                async move {
                    slot.busy();
                    let response = answer(req, &hub, peer).await;
                    slot.waiting();
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A forge's delivery takes milliseconds: a connection kept open longer (idle
            // keep-alive, a trickling client) gives its place back after a minute, or
            // when newer connections need it.
            tokio::select! {
                done = tokio::time::timeout(CONNECTION_LIFETIME, conn) => match done {
                    Ok(Err(e)) => debug!(%peer, error = %e, "webhook: connection ended with an error"),
                    Err(_) => debug!(%peer, "webhook: connection closed after a minute"),
                    Ok(Ok(())) => {}
                },
                _ = slot.evicted() => debug!(%peer, "webhook: idle connection closed for a newer one"),
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut body: String = body.into();
    body.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn answer(req: Request<Incoming>, hub: &Hub, peer: SocketAddr) -> Response<Full<Bytes>> {
    let response = route(req, hub, peer).await;
    hub.count(response.status());
    response
}

async fn route(req: Request<Incoming>, hub: &Hub, peer: SocketAddr) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::POST, PUSH_PATH) => push(req, hub, peer).await,
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let mut response = text(StatusCode::OK, "");
            *response.body_mut() = Full::new(Bytes::from(hub.render_metrics()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (_, PUSH_PATH | "/healthz" | "/metrics") => {
            let allow = if path == PUSH_PATH {
                "POST"
            } else {
                "GET, HEAD"
            };
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            response
                .headers_mut()
                .insert("allow", HeaderValue::from_static(allow));
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

async fn push(req: Request<Incoming>, hub: &Hub, peer: SocketAddr) -> Response<Full<Bytes>> {
    let too_large = || {
        warn!(%peer, limit = BODY_LIMIT, "webhook: body too large; no sync");
        text(StatusCode::PAYLOAD_TOO_LARGE, "body over 1 MiB")
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return too_large();
    }
    let Ok(_reading) = hub.bodies.clone().try_acquire_owned() else {
        warn!(%peer, "webhook: too many bodies being read; answered 503");
        let mut response = text(StatusCode::SERVICE_UNAVAILABLE, "busy; try again");
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("5"));
        return response;
    };
    let (parts, body) = req.into_parts();
    let body =
        match tokio::time::timeout(READ_TIMEOUT, Limited::new(body, BODY_LIMIT).collect()).await {
            Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "timed out reading the body"),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Ok(Err(e)) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("failed to read the body: {e}"),
                );
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
    let decision = {
        let auth = hub.auth.read().expect("lock");
        verify(&parts.headers, &body, &auth.0, &auth.1)
    };
    let status = decision.status();
    match decision {
        Decision::Sync if replayed(hub, &parts.headers, &body) => {
            info!(%peer, "webhook: this delivery was already received; no sync");
            text(status, "ignored: this delivery was already received")
        }
        Decision::Sync => {
            info!(%peer, "webhook: push to the followed branch; sync requested");
            hub.request_sync();
            text(status, "sync requested")
        }
        Decision::Ping => {
            info!(%peer, "webhook: ping");
            text(status, "pong")
        }
        Decision::Ignore(reason) => {
            info!(%peer, %reason, "webhook: ignored");
            text(status, format!("ignored: {reason}"))
        }
        Decision::Unauthorized(reason) => {
            warn!(%peer, %reason, "webhook: refused; no sync");
            text(status, reason)
        }
        Decision::BadRequest(reason) => {
            warn!(%peer, %reason, "webhook: bad request; no sync");
            text(status, reason)
        }
    }
}

/// Whether a signed push repeats one received within [`REPLAY_WINDOW`]: the same body
/// (a replay, or a forge's redelivery) or the same delivery id.
fn replayed(hub: &Hub, headers: &HeaderMap, body: &[u8]) -> bool {
    use sha2::Digest as _;
    let mut keys = vec![format!("body:{}", hex::encode(Sha256::digest(body)))];
    keys.extend(DELIVERY_HEADERS.iter().filter_map(|name| {
        let id = headers.get(*name)?.to_str().ok()?.trim();
        (!id.is_empty()).then(|| format!("{name}:{id}"))
    }));
    hub.recent
        .lock()
        .expect("lock")
        .seen_before(&keys, std::time::Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"s3cret";

    fn sign(body: &[u8]) -> String {
        let mut m = mac(SECRET);
        m.update(body);
        hex::encode(m.finalize().into_bytes())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn decide(pairs: &[(&'static str, &str)], body: &str) -> Decision {
        verify(
            &headers(pairs),
            body.as_bytes(),
            &Secret::new(SECRET),
            "main",
        )
    }

    const PUSH_MAIN: &str =
        r#"{"ref":"refs/heads/main","after":"1111111111111111111111111111111111111111"}"#;

    #[test]
    fn each_forge_signature_kind_is_accepted() {
        let sig = sign(PUSH_MAIN.as_bytes());
        let github = format!("sha256={sig}");
        for pairs in [
            vec![
                ("x-hub-signature-256", github.as_str()),
                ("x-github-event", "push"),
            ],
            vec![
                ("x-gitea-signature", sig.as_str()),
                ("x-gitea-event", "push"),
            ],
            vec![
                ("x-forgejo-signature", sig.as_str()),
                ("x-gitea-signature", sig.as_str()),
                ("x-hub-signature-256", github.as_str()),
                ("x-forgejo-event", "push"),
            ],
            vec![
                ("x-gitlab-token", "s3cret"),
                ("x-gitlab-event", "Push Hook"),
            ],
            // No event header: a push is assumed.
            vec![("x-gitea-signature", &sig.to_uppercase())],
        ] {
            assert_eq!(decide(&pairs, PUSH_MAIN), Decision::Sync, "{pairs:?}");
        }
    }

    #[test]
    fn missing_wrong_or_partial_signatures_are_refused() {
        let sig = sign(PUSH_MAIN.as_bytes());
        let other = sign(b"another body");
        for (pairs, reason) in [
            (vec![], "no signature"),
            (vec![("x-github-event", "push")], "no signature"),
            (vec![("x-hub-signature-256", sig.as_str())], "malformed"),
            (vec![("x-hub-signature-256", "sha256=zz")], "malformed"),
            (
                vec![("x-gitea-signature", other.as_str())],
                "wrong signature",
            ),
            (vec![("x-gitea-signature", &sig[..10])], "wrong signature"),
            (vec![("x-gitlab-token", "s3cre")], "wrong token"),
            (vec![("x-gitlab-token", "s3cret0")], "wrong token"),
            (vec![("x-gitlab-token", "S3CRET")], "wrong token"),
            (vec![("x-gitlab-token", "")], "wrong token"),
            // One right, one wrong: refused.
            (
                vec![
                    ("x-gitea-signature", sig.as_str()),
                    ("x-gitlab-token", "nope"),
                ],
                "wrong token",
            ),
        ] {
            match decide(&pairs, PUSH_MAIN) {
                Decision::Unauthorized(r) => assert!(r.contains(reason), "{pairs:?}: {r}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
        // A signature of the body under another secret.
        let mut m = mac(b"other");
        m.update(PUSH_MAIN.as_bytes());
        let foreign = hex::encode(m.finalize().into_bytes());
        assert_eq!(
            decide(&[("x-gitea-signature", &foreign)], PUSH_MAIN),
            Decision::Unauthorized("wrong signature")
        );
    }

    #[test]
    fn pings_other_branches_tags_deletions_and_other_events_start_nothing() {
        let signed = |body: &str, event: &'static str| {
            let sig = format!("sha256={}", sign(body.as_bytes()));
            verify(
                &headers(&[("x-hub-signature-256", &sig), ("x-github-event", event)]),
                body.as_bytes(),
                &Secret::new(SECRET),
                "main",
            )
        };
        assert_eq!(
            signed(r#"{"zen":"hi","hook_id":1}"#, "ping"),
            Decision::Ping
        );
        let ignored = |d: Decision, what: &str| match d {
            Decision::Ignore(reason) => assert!(reason.contains(what), "{reason}"),
            other => panic!("{what}: {other:?}"),
        };
        ignored(
            signed(r#"{"ref":"refs/heads/dev"}"#, "push"),
            "push to branch 'dev'; this host follows 'main'",
        );
        ignored(signed(r#"{"ref":"refs/tags/v1"}"#, "push"), "not a branch");
        ignored(
            signed(r#"{"ref":"refs/heads/main","deleted":true}"#, "push"),
            "deleted",
        );
        ignored(
            signed(
                r#"{"ref":"refs/heads/main","after":"0000000000000000000000000000000000000000"}"#,
                "push",
            ),
            "deleted",
        );
        ignored(signed(PUSH_MAIN, "issues"), "event 'issues'");
        assert_eq!(signed(PUSH_MAIN, "push"), Decision::Sync);
    }

    #[test]
    fn signed_bodies_that_are_not_push_payloads_are_bad_requests() {
        for body in ["not json", "{\"ref\":", "{}", "[]", "{\"ref\": 5}"] {
            let sig = sign(body.as_bytes());
            match decide(&[("x-gitea-signature", &sig)], body) {
                Decision::BadRequest(_) => {}
                other => panic!("{body}: {other:?}"),
            }
        }
        // Invalid UTF-8 in a field vmsync does not read (found by the fuzzer).
        let body = b"{\"ref\":\"refs/heads/main\",\"x\":\"\x85\"}";
        let sig = sign(body);
        let d = verify(
            &headers(&[("x-gitea-signature", &sig)]),
            body,
            &Secret::new(SECRET),
            "main",
        );
        assert_eq!(
            d,
            Decision::BadRequest("the body is not a push payload: not UTF-8".into())
        );
        // Unsigned bad JSON is refused first: nothing is parsed before authentication.
        assert!(matches!(decide(&[], "not json"), Decision::Unauthorized(_)));
    }

    #[test]
    fn the_secret_file_loses_its_trailing_newline_and_may_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(read_secret(&path).unwrap(), Secret::new(SECRET));
        std::fs::write(&path, "s3cret\r\n").unwrap();
        assert_eq!(read_secret(&path).unwrap(), Secret::new(SECRET));
        std::fs::write(&path, "\n").unwrap();
        let err = read_secret(&path).unwrap_err();
        assert!(
            err.contains("the secret is empty") && err.contains("secret"),
            "{err}"
        );
        let err = read_secret(&dir.path().join("nope")).unwrap_err();
        assert!(
            err.contains("failed to read [webhook] secret_file"),
            "{err}"
        );
        assert_eq!(format!("{:?}", Secret::new(SECRET)), "Secret(6 bytes)");
    }
}
