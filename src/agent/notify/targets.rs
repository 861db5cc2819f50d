//! `[[notify]]` entries of the host's config, checked once into [`Target`]s. The files
//! they name (webhook secret, forge token) are only read when a request is made, so no
//! secret sits in the settings (which are `Debug`) or reaches a log.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::event::EventKind;

/// One `[[notify]]` table as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    kind: Option<String>,
    url: Option<String>,
    secret_file: Option<PathBuf>,
    forge: Option<String>,
    api_url: Option<String>,
    repository: Option<String>,
    token_file: Option<PathBuf>,
    target_url: Option<String>,
    command: Option<Vec<String>>,
    events: Option<Vec<String>>,
    timeout: Option<String>,
}

/// A forge's commit-status API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    /// `POST /repos/{owner}/{repo}/statuses/{sha}`, `Authorization: Bearer`.
    GitHub,
    /// Gitea and Forgejo: `POST /repos/{owner}/{repo}/statuses/{sha}`, `Authorization: token`.
    Gitea,
    /// `POST /projects/{id}/statuses/{sha}`, `PRIVATE-TOKEN`.
    GitLab,
}

/// Where an event goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// JSON POST, signed with HMAC-SHA256 when `secret_file` is set.
    Webhook {
        url: String,
        secret_file: Option<PathBuf>,
    },
    /// A commit status with context `vmsync/<host>` on the event's commit.
    CommitStatus {
        forge: Forge,
        api_url: String,
        repository: String,
        token_file: PathBuf,
        target_url: Option<String>,
    },
    /// A program run without a shell, the event JSON on its stdin.
    Command { argv: Vec<String> },
}

/// One checked `[[notify]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    /// `events`: which events it gets; default: all.
    pub events: Vec<EventKind>,
    /// `timeout`: one request or command run; default 10s.
    pub timeout: Duration,
}

/// A request or command's default time limit.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl Target {
    /// How logs and the state directory name this target: no secret, no query string, no
    /// path of a webhook URL (chat webhooks carry their secret in the path).
    pub fn id(&self) -> String {
        match &self.kind {
            Kind::Webhook { url, .. } => format!("webhook {}", origin(url)),
            Kind::CommitStatus {
                forge,
                api_url,
                repository,
                ..
            } => format!(
                "commit-status {} {} {repository}",
                forge_name(*forge),
                origin(api_url)
            ),
            Kind::Command { argv } => format!("command {}", argv[0]),
        }
    }

    pub fn wants(&self, kind: EventKind) -> bool {
        self.events.contains(&kind)
    }
}

pub fn forge_name(forge: Forge) -> &'static str {
    match forge {
        Forge::GitHub => "github",
        Forge::Gitea => "gitea",
        Forge::GitLab => "gitlab",
    }
}

/// `https://host:port` of a URL, without user, path or query.
pub fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    format!("{scheme}://{host}")
}

fn check_http_url(url: &str, what: &str, entry: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(()),
        _ => Err(format!(
            "invalid {entry}: {what} '{}' must be an http:// or https:// URL with a host",
            origin(url)
        )),
    }
}

/// Checks every `[[notify]]` entry; errors name the entry (1-based) and the key.
pub fn check(raw: Vec<RawNotify>) -> Result<Vec<Target>, String> {
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| check_one(r, i + 1))
        .collect()
}

fn check_one(raw: RawNotify, n: usize) -> Result<Target, String> {
    let kind_name = raw.kind.clone().unwrap_or_default();
    let entry = Entry(format!("[[notify]] entry {n} (kind = \"{kind_name}\")"));
    let kind = match kind_name.as_str() {
        "webhook" => webhook_kind(&raw, &entry)?,
        "commit-status" => commit_status_kind(&raw, &entry)?,
        "command" => command_kind(&raw, &entry)?,
        "" => return Err(entry.missing("kind")),
        other => {
            return Err(format!(
                "invalid [[notify]] entry {n}: kind '{other}': one of \"webhook\", \"commit-status\", \"command\""
            ));
        }
    };
    Ok(Target {
        kind,
        events: events(raw.events.as_deref(), &entry)?,
        timeout: timeout(raw.timeout.as_deref(), &entry)?,
    })
}

/// How errors name a `[[notify]]` entry: its number and kind.
struct Entry(String);

impl Entry {
    fn missing(&self, key: &str) -> String {
        format!("invalid {}: `{key}` is required", self.0)
    }

    /// An error for the first key set that the kind does not take.
    fn unused(&self, keys: &[(&str, bool)]) -> Result<(), String> {
        match keys.iter().find(|(_, set)| *set) {
            Some((key, _)) => Err(format!(
                "invalid {}: `{key}` does not go with this kind",
                self.0
            )),
            None => Ok(()),
        }
    }
}

/// `kind = "webhook"`: `url`, optionally `secret_file`.
fn webhook_kind(raw: &RawNotify, entry: &Entry) -> Result<Kind, String> {
    entry.unused(&[
        ("forge", raw.forge.is_some()),
        ("api_url", raw.api_url.is_some()),
        ("repository", raw.repository.is_some()),
        ("token_file", raw.token_file.is_some()),
        ("target_url", raw.target_url.is_some()),
        ("command", raw.command.is_some()),
    ])?;
    let url = raw.url.clone().ok_or_else(|| entry.missing("url"))?;
    check_http_url(&url, "url", &entry.0)?;
    Ok(Kind::Webhook {
        url,
        secret_file: raw.secret_file.clone(),
    })
}

/// `kind = "commit-status"`: `forge`, `api_url` (a default for GitHub and GitLab),
/// `repository`, `token_file`, optionally `target_url`.
fn commit_status_kind(raw: &RawNotify, entry: &Entry) -> Result<Kind, String> {
    entry.unused(&[
        ("url", raw.url.is_some()),
        ("secret_file", raw.secret_file.is_some()),
        ("command", raw.command.is_some()),
    ])?;
    let forge = match raw.forge.as_deref() {
        Some("github") => Forge::GitHub,
        Some("gitea") | Some("forgejo") => Forge::Gitea,
        Some("gitlab") => Forge::GitLab,
        Some(other) => {
            return Err(format!(
                "invalid {}: forge '{other}': one of \"github\", \"gitea\" (also Forgejo), \"gitlab\"",
                entry.0
            ));
        }
        None => return Err(entry.missing("forge")),
    };
    let api_url = match (raw.api_url.clone(), forge) {
        (Some(url), _) => url,
        (None, Forge::GitHub) => "https://api.github.com".into(),
        (None, Forge::GitLab) => "https://gitlab.com/api/v4".into(),
        (None, Forge::Gitea) => return Err(entry.missing("api_url")),
    };
    check_http_url(&api_url, "api_url", &entry.0)?;
    let repository = raw
        .repository
        .clone()
        .ok_or_else(|| entry.missing("repository"))?;
    check_repository(&repository, forge, entry)?;
    if let Some(t) = &raw.target_url {
        check_http_url(t, "target_url", &entry.0)?;
    }
    Ok(Kind::CommitStatus {
        forge,
        api_url: api_url.trim_end_matches('/').to_string(),
        repository,
        token_file: raw
            .token_file
            .clone()
            .ok_or_else(|| entry.missing("token_file"))?,
        target_url: raw.target_url.clone(),
    })
}

/// A forge's repository: "owner/name"; on GitLab a project id or a path with groups.
fn check_repository(repository: &str, forge: Forge, entry: &Entry) -> Result<(), String> {
    let parts: Vec<&str> = repository.split('/').collect();
    let ok = match forge {
        // GitLab: a numeric project id, or a path with groups and subgroups.
        Forge::GitLab => parts.iter().all(|p| !p.is_empty()),
        _ => parts.len() == 2 && parts.iter().all(|p| !p.is_empty()),
    };
    if ok {
        return Ok(());
    }
    Err(format!(
        "invalid {}: repository '{repository}': {}",
        entry.0,
        match forge {
            Forge::GitLab => "a project id or path like \"group/project\"",
            _ => "\"owner/name\"",
        }
    ))
}

/// `kind = "command"`: `command`, an absolute program path and its arguments.
fn command_kind(raw: &RawNotify, entry: &Entry) -> Result<Kind, String> {
    entry.unused(&[
        ("url", raw.url.is_some()),
        ("secret_file", raw.secret_file.is_some()),
        ("forge", raw.forge.is_some()),
        ("api_url", raw.api_url.is_some()),
        ("repository", raw.repository.is_some()),
        ("token_file", raw.token_file.is_some()),
        ("target_url", raw.target_url.is_some()),
    ])?;
    let argv = raw
        .command
        .clone()
        .ok_or_else(|| entry.missing("command"))?;
    match argv.first() {
        Some(program) if program.starts_with('/') => Ok(Kind::Command { argv }),
        _ => Err(format!(
            "invalid {}: command must start with an absolute program path (it runs without a shell)",
            entry.0
        )),
    }
}

/// `events`: known event names; default all.
fn events(names: Option<&[String]>, entry: &Entry) -> Result<Vec<EventKind>, String> {
    let Some(names) = names else {
        return Ok(EventKind::all());
    };
    names
        .iter()
        .map(|name| {
            EventKind::parse(name).ok_or_else(|| {
                format!(
                    "invalid {}: events: unknown event '{name}' (one of {})",
                    entry.0,
                    EventKind::all()
                        .iter()
                        .map(|k| format!("\"{}\"", k.as_str()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
        .collect()
}

/// `timeout`: from 1s to 5m; default [`DEFAULT_TIMEOUT`].
fn timeout(text: Option<&str>, entry: &Entry) -> Result<Duration, String> {
    let Some(text) = text else {
        return Ok(DEFAULT_TIMEOUT);
    };
    humantime::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(300))
        .ok_or_else(|| {
            format!(
                "invalid {}: timeout '{text}': a duration from 1s to 5m",
                entry.0
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Vec<Target>, String> {
        #[derive(Deserialize)]
        struct File {
            notify: Vec<RawNotify>,
        }
        let file: File = toml::from_str(toml_text).unwrap();
        check(file.notify)
    }

    #[test]
    fn entries_are_checked_and_errors_name_the_entry_and_key() {
        let ok = parse(
            r#"
            [[notify]]
            kind = "webhook"
            url = "https://user:pw@hooks.example.org/T0/SECRET?x=1"
            secret_file = "/etc/vmsync/notify-secret"
            events = ["failed", "recovered"]

            [[notify]]
            kind = "commit-status"
            forge = "forgejo"
            api_url = "https://git.example.org/api/v1/"
            repository = "infra/vms"
            token_file = "/etc/vmsync/status-token"

            [[notify]]
            kind = "command"
            command = ["/usr/local/bin/vmsync-mail", "--to", "ops"]
            timeout = "30s"
            "#,
        )
        .unwrap();
        assert_eq!(ok.len(), 3);
        assert_eq!(ok[0].id(), "webhook https://hooks.example.org");
        assert_eq!(ok[0].events, [EventKind::Failed, EventKind::Recovered]);
        assert_eq!(
            ok[1].id(),
            "commit-status gitea https://git.example.org infra/vms"
        );
        assert!(
            matches!(&ok[1].kind, Kind::CommitStatus { api_url, .. } if api_url == "https://git.example.org/api/v1")
        );
        assert_eq!(ok[1].events, EventKind::all());
        assert_eq!(ok[2].timeout, Duration::from_secs(30));

        let err = |text: &str| parse(text).unwrap_err().to_string();
        assert_eq!(
            err("[[notify]]\nkind = \"webhook\"\n"),
            "invalid [[notify]] entry 1 (kind = \"webhook\"): `url` is required"
        );
        assert!(err("[[notify]]\nkind = \"mail\"\n").contains("kind 'mail'"));
        assert!(
            err("[[notify]]\nkind = \"commit-status\"\nforge = \"gitea\"\nrepository = \"a/b\"\ntoken_file = \"/t\"\n")
                .contains("`api_url` is required")
        );
        assert!(
            err("[[notify]]\nkind = \"commit-status\"\nforge = \"github\"\nrepository = \"a\"\ntoken_file = \"/t\"\n")
                .contains("\"owner/name\"")
        );
        assert!(err("[[notify]]\nkind = \"command\"\ncommand = [\"mail\"]\n").contains("absolute"));
        assert!(
            err("[[notify]]\nkind = \"webhook\"\nurl = \"https://x\"\nevents = [\"exploded\"]\n")
                .contains("unknown event 'exploded'")
        );
        assert!(
            err("[[notify]]\nkind = \"webhook\"\nurl = \"https://x\"\ntoken_file = \"/t\"\n")
                .contains("`token_file` does not go with this kind")
        );
        assert!(
            err("[[notify]]\nkind = \"webhook\"\nurl = \"ftp://x\"\n")
                .contains("http:// or https://")
        );
    }
}
