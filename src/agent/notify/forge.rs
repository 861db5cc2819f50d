//! Commit-status requests, as each forge documents them (pure: no I/O, table-tested).
//!
//! - GitHub: `POST {api}/repos/{owner}/{repo}/statuses/{sha}`, `Authorization: Bearer
//!   TOKEN`, JSON `state` (`pending`, `success`, `failure`, `error`), `target_url`,
//!   `description`, `context`.
//! - Gitea and Forgejo: the same path under `/api/v1`, `Authorization: token TOKEN`, the
//!   same fields and states.
//! - GitLab: `POST {api}/projects/{id}/statuses/{sha}`, the id numeric or the URL-encoded
//!   path, `PRIVATE-TOKEN: TOKEN`, JSON `state` (`pending`, `running`, `success`,
//!   `failed`, `canceled`), `name` (the context), `target_url`, `description`. GitLab
//!   refuses a transition to the state a status already has, so applying is `running`
//!   and a suspension `pending`: the two never follow each other with the same state.

use super::event::{Event, EventKind, shorten};
use super::targets::Forge;

/// The longest description sent: GitHub documents none but cuts at 140; GitLab allows 255.
pub fn max_description(forge: Forge) -> usize {
    match forge {
        Forge::GitHub | Forge::Gitea => 140,
        Forge::GitLab => 255,
    }
}

/// The forge's state for an event (`None`: the event sets no status).
pub fn state(forge: Forge, kind: EventKind) -> Option<&'static str> {
    use EventKind::*;
    let gitlab = forge == Forge::GitLab;
    Some(match kind {
        Applying if gitlab => "running",
        Applying | Suspended => "pending",
        Applied | Recovered => "success",
        Failed | Reverted if gitlab => "failed",
        Failed | Reverted => "failure",
        Invalid | Refused | Untrusted if gitlab => "failed",
        Invalid | Refused | Untrusted => "error",
        FetchFailed => return None,
    })
}

/// One HTTP request, ready to send. `token` goes into the header named by `auth` and
/// nowhere else; [`Request`]'s `Debug` leaves it out.
pub struct Request {
    pub url: String,
    pub auth: (&'static str, String),
    pub extra_headers: Vec<(&'static str, &'static str)>,
    pub body: serde_json::Value,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("url", &self.url)
            .field("auth", &self.auth.0)
            .field("body", &self.body)
            .finish()
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The context (GitLab: `name`) of this host's statuses.
pub fn context(host: &str) -> String {
    format!("vmsync/{host}")
}

/// The commit-status request for `event`, or `None` when it sets no status (no commit,
/// or an event without a state).
pub fn request(
    forge: Forge,
    api_url: &str,
    repository: &str,
    token: &str,
    target_url: Option<&str>,
    event: &Event,
) -> Option<Request> {
    let sha = event.commit.as_deref()?;
    let state = state(forge, event.event)?;
    let description = shorten(&event.summary, max_description(forge));
    let api = api_url.trim_end_matches('/');
    let mut body = serde_json::json!({ "state": state, "description": description });
    let (url, auth, extra_headers) = match forge {
        Forge::GitHub | Forge::Gitea => {
            let (owner, repo) = repository.split_once('/')?;
            body["context"] = context(&event.host).into();
            let url = format!(
                "{api}/repos/{}/{}/statuses/{}",
                encode(owner),
                encode(repo),
                encode(sha)
            );
            if forge == Forge::GitHub {
                (
                    url,
                    ("Authorization", format!("Bearer {token}")),
                    vec![
                        ("Accept", "application/vnd.github+json"),
                        ("X-GitHub-Api-Version", "2022-11-28"),
                    ],
                )
            } else {
                (url, ("Authorization", format!("token {token}")), vec![])
            }
        }
        Forge::GitLab => {
            body["name"] = context(&event.host).into();
            let url = format!(
                "{api}/projects/{}/statuses/{}",
                encode(repository),
                encode(sha)
            );
            (url, ("PRIVATE-TOKEN", token.to_string()), vec![])
        }
    };
    if let Some(t) = target_url {
        body["target_url"] = t.into();
    }
    Some(Request {
        url,
        auth,
        extra_headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, summary: &str) -> Event {
        Event::new(
            kind,
            "hv1",
            Some("0123456789abcdef0123456789abcdef01234567"),
            summary.into(),
        )
    }

    #[test]
    fn each_forge_gets_its_documented_path_header_and_fields() {
        let e = event(EventKind::Failed, "failed: vm 'web'");
        let gh = request(
            Forge::GitHub,
            "https://api.github.com/",
            "infra/vms",
            "T",
            None,
            &e,
        )
        .unwrap();
        assert_eq!(
            gh.url,
            "https://api.github.com/repos/infra/vms/statuses/0123456789abcdef0123456789abcdef01234567"
        );
        assert_eq!(gh.auth, ("Authorization", "Bearer T".to_string()));
        assert_eq!(
            gh.body,
            serde_json::json!({"state": "failure", "description": "failed: vm 'web'", "context": "vmsync/hv1"})
        );
        let gitea = request(
            Forge::Gitea,
            "https://git.example.org/api/v1",
            "infra/vms",
            "T",
            Some("https://grafana.example.org/d/vmsync"),
            &e,
        )
        .unwrap();
        assert_eq!(gitea.auth, ("Authorization", "token T".to_string()));
        assert_eq!(
            gitea.body["target_url"],
            "https://grafana.example.org/d/vmsync"
        );
        let gl = request(
            Forge::GitLab,
            "https://gitlab.example.org/api/v4",
            "infra/sub group/vms",
            "T",
            None,
            &e,
        )
        .unwrap();
        assert_eq!(
            gl.url,
            "https://gitlab.example.org/api/v4/projects/infra%2Fsub%20group%2Fvms/statuses/0123456789abcdef0123456789abcdef01234567"
        );
        assert_eq!(gl.auth, ("PRIVATE-TOKEN", "T".to_string()));
        assert_eq!(
            gl.body,
            serde_json::json!({"state": "failed", "description": "failed: vm 'web'", "name": "vmsync/hv1"})
        );
        assert!(!format!("{gl:?}").contains("\"T\""), "no token in Debug");
    }

    #[test]
    fn states_follow_each_forge_and_descriptions_fit() {
        use EventKind::*;
        let table = [
            (Applying, "pending", "running"),
            (Suspended, "pending", "pending"),
            (Applied, "success", "success"),
            (Recovered, "success", "success"),
            (Failed, "failure", "failed"),
            (Reverted, "failure", "failed"),
            (Invalid, "error", "failed"),
            (Refused, "error", "failed"),
            (Untrusted, "error", "failed"),
        ];
        for (kind, github, gitlab) in table {
            assert_eq!(state(Forge::GitHub, kind), Some(github), "{kind:?}");
            assert_eq!(state(Forge::Gitea, kind), Some(github), "{kind:?}");
            assert_eq!(state(Forge::GitLab, kind), Some(gitlab), "{kind:?}");
        }
        assert_eq!(state(Forge::GitHub, FetchFailed), None);
        let mut e = event(Invalid, &"x".repeat(400));
        let gh = request(Forge::GitHub, "https://a", "o/r", "T", None, &e).unwrap();
        assert_eq!(
            gh.body["description"].as_str().unwrap().chars().count(),
            140
        );
        let gl = request(Forge::GitLab, "https://a", "7", "T", None, &e).unwrap();
        assert_eq!(
            gl.body["description"].as_str().unwrap().chars().count(),
            255
        );
        e.commit = None;
        assert!(request(Forge::GitHub, "https://a", "o/r", "T", None, &e).is_none());
    }
}
