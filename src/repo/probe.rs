//! The change probe: one cheap HTTP(S) request before the git fetch, so that a tick
//! with nothing new costs the git server a conditional GET instead of an SSH handshake.
//!
//! `[source] probe_url` names a file whose text gives the branch tip: git's dumb-HTTP
//! `info/refs` (what `git update-server-info` writes, served by any static web server or
//! CDN: lines `<sha>\trefs/heads/<branch>`), or a smart-HTTP advertisement
//! (`info/refs?service=git-upload-pack`, pkt-lines). The request is conditional
//! (`If-None-Match` / `If-Modified-Since` from the last answer), so an unchanged file is a
//! `304` of a few hundred bytes.
//!
//! The probe only decides whether to fetch; it is never trusted for what is applied:
//! - it names the tip the local clone already holds (and the last real fetch, of the
//!   same URL and branch, is younger than `probe_max_skip`): no fetch; the sync goes on
//!   with the commit the last real fetch pinned, checked (signature, ancestry) and
//!   validated as on every sync;
//! - anything else (another tip, no such branch, an error, a timeout, a malformed
//!   answer, no local clone yet, `probe_max_skip` elapsed): the normal fetch over the
//!   configured transport, whose commit is what is checked and applied.
//!
//! A probe that lies can so only delay a change (until `probe_max_skip`), never bring
//! one in. What the last answer said (validators, tip) and when the last real fetch was
//! are kept in `<state_dir>/probe.json`.

use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use git2::{Oid, Repository};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::repo::https;
use crate::repo::pkt_line::{self, Packet};
use crate::repo::source::{self, FetchError, FetchedCommit, SourceSettings};
use crate::util::fsio;
use crate::util::redact::redact;

/// Default of `[source] probe_max_skip`: a real fetch at least this often, whatever the
/// probe says, so a stale cache only delays a change.
pub const DEFAULT_MAX_SKIP: Duration = Duration::from_secs(3600);

/// How long the probe request may take, connect and answer together.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The largest probe answer read; a larger one is malformed (and the fetch runs).
pub const MAX_BODY: u64 = 1 << 20;

/// Where the probe's record lives under the state directory.
const RECORD: &str = "probe.json";

/// Set by [`force_next_fetch`]: the next sync fetches whatever the probe says.
static FORCE: AtomicBool = AtomicBool::new(false);

/// A probe failure was logged at WARN; later ones go to DEBUG until one succeeds.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Makes the next sync of this process fetch without asking the probe (a push
/// notification knows better than a cached file).
pub fn force_next_fetch() {
    FORCE.store(true, Ordering::SeqCst);
}

/// The probe's settings (`[source] probe_url`, `probe_max_skip`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSettings {
    /// `http://` or `https://` URL of an `info/refs` file or advertisement.
    pub url: String,
    /// A real fetch at least this often.
    pub max_skip: Duration,
}

/// Checks a probe URL at the edge: http or https, and a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let shown = redact(url);
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            format!("invalid [source] probe_url '{shown}': must be http:// or https://")
        })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("invalid [source] probe_url '{shown}': no host"));
    }
    Ok(())
}

/// What `<state_dir>/probe.json` keeps between syncs.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// The probe URL the validators below belong to.
    pub probe_url: Option<String>,
    /// `ETag` of the last 200 answer.
    pub etag: Option<String>,
    /// `Last-Modified` of the last 200 answer.
    pub last_modified: Option<String>,
    /// The tip the last 200 answer named (what a 304 means).
    pub tip: Option<String>,
    /// Source URL and branch of the last real fetch.
    pub fetched_url: Option<String>,
    pub fetched_branch: Option<String>,
    /// When the last real fetch succeeded (seconds since the epoch).
    pub fetched_at: Option<u64>,
}

impl ProbeRecord {
    /// The record in `state_dir`; empty if missing or unreadable (the fetch then runs).
    pub fn load(state_dir: &Path) -> Self {
        std::fs::read(state_dir.join(RECORD))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn save(&self, state_dir: &Path) {
        let bytes = serde_json::to_vec_pretty(self).expect("the probe record serializes");
        if let Err(e) = fsio::write_atomic(&state_dir.join(RECORD), &bytes) {
            warn!(error = %e, "failed to write the probe record");
        }
    }
}

/// What the probe answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The branch's tip, as the probe names it.
    Tip(Oid),
    /// The probe does not list the branch.
    NoBranch,
    /// The request failed, timed out, or the answer was malformed.
    Failed(String),
}

/// Whether this sync fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The probe names the tip the clone holds: use it.
    Skip(Oid),
    /// Fetch, and why.
    Fetch(String),
}

/// The pure decision: skip only when the probe names the locally held tip and the last
/// real fetch (of this URL and branch) is younger than `max_skip`.
pub fn decide(
    answer: &Answer,
    local: Option<Oid>,
    since_fetch: Option<Duration>,
    max_skip: Duration,
) -> Decision {
    let Some(local) = local else {
        return Decision::Fetch("no fetched commit yet".into());
    };
    let Some(since) = since_fetch else {
        return Decision::Fetch("no record of a real fetch".into());
    };
    if since >= max_skip {
        return Decision::Fetch(format!(
            "last real fetch {}s ago (probe_max_skip {}s)",
            since.as_secs(),
            max_skip.as_secs()
        ));
    }
    match answer {
        Answer::Tip(tip) if *tip == local => Decision::Skip(local),
        Answer::Tip(tip) => Decision::Fetch(format!("the probe names {tip}")),
        Answer::NoBranch => Decision::Fetch("the probe does not list the branch".into()),
        Answer::Failed(e) => Decision::Fetch(format!("probe failed: {e}")),
    }
}

/// Finds `refs/heads/<branch>` in a probe answer: a dumb `info/refs` file (lines
/// `<sha>\t<ref>`) or a smart-HTTP advertisement (pkt-lines, `<sha> <ref>[\0caps]`).
pub fn parse(body: &[u8], branch: &str) -> Result<Option<Oid>, String> {
    let wanted = format!("refs/heads/{branch}");
    let text = std::str::from_utf8(body).map_err(|_| "the answer is not UTF-8".to_string())?;
    let lines: Vec<&str> = if looks_like_pkt_lines(text) {
        pkt_lines(text)?
    } else {
        text.lines().collect()
    };
    for line in lines {
        let line = line.trim_end_matches('\n');
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let line = line.split('\0').next().unwrap_or_default();
        let (sha, name) = line
            .split_once(['\t', ' '])
            .ok_or_else(|| format!("malformed line '{}'", line.escape_default()))?;
        // Every line must start with an object id: an HTML error page is malformed.
        if !matches!(sha.len(), 40 | 64) || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "malformed object id in line '{}'",
                line.escape_default()
            ));
        }
        if name.trim_end() == wanted {
            return Oid::from_str(sha)
                .map(Some)
                .map_err(|_| format!("malformed object id '{sha}' for '{wanted}'"));
        }
    }
    Ok(None)
}

fn looks_like_pkt_lines(text: &str) -> bool {
    let head = text.as_bytes();
    head.len() >= 4
        && head[..4].iter().all(u8::is_ascii_hexdigit)
        && !(head.len() > 40 && head[40] == b'\t')
}

/// The payloads of the pkt-lines in `text` (flush packets skipped).
fn pkt_lines(text: &str) -> Result<Vec<&str>, String> {
    let packets = pkt_line::split(text.as_bytes())?;
    packets
        .into_iter()
        .filter_map(|packet| match packet {
            Packet::Data(line) => Some(line),
            Packet::Flush => None,
        })
        .map(|line| std::str::from_utf8(line).map_err(|_| "malformed pkt-line".to_string()))
        .collect()
}

/// Asks the probe, conditionally on the validators in `record` (updated from a 200).
fn ask(probe: &ProbeSettings, branch: &str, record: &mut ProbeRecord) -> Answer {
    let same_url = record.probe_url.as_deref() == Some(probe.url.as_str());
    // One agent per process: its TLS context, and so the CA bundle, is built on the
    // first https probe and kept (an http:// probe never builds it).
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    let agent = AGENT.get_or_init(|| {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            .max_redirects(3)
            .user_agent(concat!("vmsync/", env!("CARGO_PKG_VERSION")))
            .tls_config(https::tls_config())
            .build();
        ureq::Agent::new_with_config(config)
    });
    let mut request = agent.get(&probe.url);
    let cached = if same_url { record.tip.clone() } else { None };
    if cached.is_some() {
        if let Some(etag) = &record.etag {
            request = request.header("If-None-Match", etag);
        }
        if let Some(date) = &record.last_modified {
            request = request.header("If-Modified-Since", date);
        }
    }
    let mut response = match request.call() {
        Ok(response) => response,
        Err(e) => return Answer::Failed(e.to_string()),
    };
    let status = response.status().as_u16();
    if status == 304 {
        return match cached.as_deref().map(Oid::from_str) {
            Some(Ok(tip)) => Answer::Tip(tip),
            _ => Answer::Failed("304 Not Modified without a remembered tip".into()),
        };
    }
    if status != 200 {
        return Answer::Failed(format!("HTTP status {status}"));
    }
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (etag, last_modified) = (header("etag"), header("last-modified"));
    let mut body = Vec::new();
    if let Err(e) = response
        .body_mut()
        .as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
    {
        return Answer::Failed(format!("failed to read the answer: {e}"));
    }
    if body.len() as u64 > MAX_BODY {
        return Answer::Failed(format!("the answer is larger than {MAX_BODY} bytes"));
    }
    match parse(&body, branch) {
        Ok(tip) => {
            *record = ProbeRecord {
                probe_url: Some(probe.url.clone()),
                etag,
                last_modified,
                tip: tip.map(|t| t.to_string()),
                ..record.clone()
            };
            tip.map_or(Answer::NoBranch, Answer::Tip)
        }
        Err(e) => Answer::Failed(format!("malformed answer: {e}")),
    }
}

/// The commit the clone's tracking ref for `branch` points to, if any.
fn local_tip(state_dir: &Path, branch: &str) -> Option<Oid> {
    let repo = Repository::open_bare(state_dir.join("repo")).ok()?;
    let tracking = format!("refs/remotes/origin/{branch}");
    let commit = repo.find_reference(&tracking).ok()?.peel_to_commit().ok()?;
    Some(commit.id())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// [`source::fetch`], unless the probe (when configured) names the tip the local clone
/// already holds: then that commit, opened from the clone, with nothing fetched.
pub fn fetch(
    settings: &SourceSettings,
    probe: Option<&ProbeSettings>,
    state_dir: &Path,
) -> Result<FetchedCommit, FetchError> {
    let Some(probe) = probe else {
        return source::fetch(settings, state_dir);
    };
    // For logs: never show a password embedded in the URL.
    let shown = redact(&probe.url);
    let mut record = ProbeRecord::load(state_dir);
    let before = record.clone();
    let forced = FORCE.swap(false, Ordering::SeqCst);
    let same_source = record.fetched_url.as_deref() == Some(settings.url.as_str())
        && record.fetched_branch.as_deref() == Some(settings.branch.as_str());
    let local = if same_source && !forced {
        local_tip(state_dir, &settings.branch)
    } else {
        None
    };
    let decision = if forced {
        Decision::Fetch("a push notification asked for it".into())
    } else if local.is_none() {
        Decision::Fetch("no fetched commit of this url and branch yet".into())
    } else {
        let since = record.fetched_at.map(|at| {
            // A clock that went back counts as "long ago".
            Duration::from_secs(now_secs().checked_sub(at).unwrap_or(u64::MAX))
        });
        let answer = ask(probe, &settings.branch, &mut record);
        if let Answer::Failed(e) = &answer {
            if WARNED.swap(true, Ordering::SeqCst) {
                debug!(probe = %shown, error = %e, "probe failed; fetching");
            } else {
                warn!(probe = %shown, error = %e, "probe failed; fetching (further failures are logged at debug)");
            }
        } else {
            WARNED.store(false, Ordering::SeqCst);
        }
        decide(&answer, local, since, probe.max_skip)
    };
    let result = match decision {
        Decision::Skip(tip) => match FetchedCommit::open(state_dir, &tip.to_string()) {
            Ok(fetched) => {
                debug!(probe = %shown, commit = %fetched.short(), "the probe names the fetched tip; fetch skipped");
                Ok(fetched)
            }
            Err(e) => {
                debug!(error = %e, "the fetched tip cannot be opened; fetching");
                fetch_and_record(settings, state_dir, &mut record)
            }
        },
        Decision::Fetch(reason) => {
            info!(probe = %shown, reason = %reason, "fetching");
            fetch_and_record(settings, state_dir, &mut record)
        }
    };
    if record != before {
        record.save(state_dir);
    }
    result
}

fn fetch_and_record(
    settings: &SourceSettings,
    state_dir: &Path,
    record: &mut ProbeRecord,
) -> Result<FetchedCommit, FetchError> {
    let fetched = source::fetch(settings, state_dir)?;
    record.fetched_url = Some(settings.url.clone());
    record.fetched_branch = Some(settings.branch.clone());
    record.fetched_at = Some(now_secs());
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    fn oid(s: &str) -> Oid {
        Oid::from_str(s).unwrap()
    }

    #[test]
    fn parses_dumb_info_refs() {
        let body = format!("{B}\trefs/heads/dev\n{A}\trefs/heads/main\n{B}\trefs/tags/v1\n");
        assert_eq!(parse(body.as_bytes(), "main"), Ok(Some(oid(A))));
        assert_eq!(parse(body.as_bytes(), "dev"), Ok(Some(oid(B))));
        assert_eq!(parse(body.as_bytes(), "prod"), Ok(None));
        assert_eq!(parse(b"", "main"), Ok(None));
    }

    #[test]
    fn parses_smart_advertisements() {
        fn pkt(s: &str) -> String {
            format!("{:04x}{s}", s.len() + 4)
        }
        let body = format!(
            "{}0000{}{}{}0000",
            pkt("# service=git-upload-pack\n"),
            pkt(&format!("{B} HEAD\0multi_ack side-band-64k\n")),
            pkt(&format!("{A} refs/heads/main\n")),
            pkt(&format!("{B} refs/heads/dev\n")),
        );
        assert_eq!(parse(body.as_bytes(), "main"), Ok(Some(oid(A))));
        assert_eq!(parse(body.as_bytes(), "dev"), Ok(Some(oid(B))));
        assert_eq!(parse(body.as_bytes(), "x"), Ok(None));
        // The branch on the first line, with capabilities after NUL.
        let first = format!("{}0000", pkt(&format!("{A} refs/heads/main\0caps\n")));
        assert_eq!(parse(first.as_bytes(), "main"), Ok(Some(oid(A))));
    }

    #[test]
    fn malformed_answers_are_errors() {
        assert!(parse(b"<html>not found</html>", "main").is_err());
        assert!(parse(b"xyz\trefs/heads/main\n", "main").is_err());
        assert!(parse(b"0009abc", "main").is_err());
        assert!(parse(&[0xff, 0xfe], "main").is_err());
    }

    #[test]
    fn decides_skip_only_for_the_held_tip_within_max_skip() {
        let hour = Duration::from_secs(3600);
        let recent = Some(Duration::from_secs(60));
        let same = Answer::Tip(oid(A));
        assert_eq!(
            decide(&same, Some(oid(A)), recent, hour),
            Decision::Skip(oid(A))
        );
        let fetches = |d: Decision| matches!(d, Decision::Fetch(_));
        assert!(fetches(decide(
            &Answer::Tip(oid(B)),
            Some(oid(A)),
            recent,
            hour
        )));
        assert!(fetches(decide(
            &Answer::NoBranch,
            Some(oid(A)),
            recent,
            hour
        )));
        assert!(fetches(decide(
            &Answer::Failed("timeout".into()),
            Some(oid(A)),
            recent,
            hour
        )));
        assert!(fetches(decide(&same, None, recent, hour)));
        assert!(fetches(decide(&same, Some(oid(A)), None, hour)));
        assert!(fetches(decide(&same, Some(oid(A)), Some(hour), hour)));
    }

    /// Serves `body` (with an ETag) to every request on a loopback port; the URL.
    fn serve(body: String) -> String {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/info/refs", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        url
    }

    #[test]
    fn a_stale_probe_skips_until_a_push_forces_the_fetch() {
        use crate::repo::source::test_git::git;
        let remote = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        git(remote.path(), &["init", "-q"]);
        git(
            remote.path(),
            &["commit", "-q", "--allow-empty", "-m", "one"],
        );
        let first = git(remote.path(), &["rev-parse", "HEAD"]);
        let settings = SourceSettings {
            url: remote.path().display().to_string(),
            branch: "main".into(),
            ssh_key: None,
            token_file: None,
        };
        let probe = ProbeSettings {
            url: serve(format!("{first}\trefs/heads/main\n")),
            max_skip: DEFAULT_MAX_SKIP,
        };
        assert_eq!(
            fetch(&settings, Some(&probe), state.path()).unwrap().id(),
            first
        );
        let record = ProbeRecord::load(state.path());
        assert_eq!(record.fetched_branch.as_deref(), Some("main"));
        assert!(record.fetched_at.is_some());

        // The branch moves; the probe still names the old tip: skipped.
        git(
            remote.path(),
            &["commit", "-q", "--allow-empty", "-m", "two"],
        );
        let second = git(remote.path(), &["rev-parse", "HEAD"]);
        assert_eq!(
            fetch(&settings, Some(&probe), state.path()).unwrap().id(),
            first
        );
        assert_eq!(
            ProbeRecord::load(state.path()).tip.as_deref(),
            Some(first.as_str())
        );
        // A push notification: fetched, whatever the probe says; then skipped again.
        force_next_fetch();
        assert_eq!(
            fetch(&settings, Some(&probe), state.path()).unwrap().id(),
            second
        );
        // Without a probe, always the fetch.
        assert_eq!(fetch(&settings, None, state.path()).unwrap().id(), second);
    }

    #[test]
    fn probe_urls_are_checked() {
        assert!(check_url("https://git.example.org/vms.git/info/refs").is_ok());
        assert!(check_url("http://127.0.0.1:8080/info/refs").is_ok());
        assert!(check_url("ssh://git@example.org/vms.git").is_err());
        assert!(check_url("https:///x").is_err());
        let err = check_url("ftp://user:secret@example.org/info/refs").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
    }
}
