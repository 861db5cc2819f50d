//! The agent's settings: `/etc/vmsync/config.toml` (or `--config PATH`) merged with
//! command-line flags (flags win), then defaults, then checked once into [`Settings`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::agent::notify::targets;
use crate::agent::webhook;
use crate::desired::{host_policy_settings, manifest, seed_spec, values};
use crate::host::secret_identity;
use crate::reconcile::policy::ChangePolicy;
use crate::repo::source::SourceSettings;
use crate::repo::{probe, trust};

/// Where the config file is read from when `--config` is not given (it may be absent).
pub const DEFAULT_CONFIG: &str = "/etc/vmsync/config.toml";

/// The daemon's default schedule: every five minutes, at second 0.
pub const DEFAULT_SCHEDULE: &str = "0 */5 * * * *";

/// `[agent] tick_timeout`'s default.
pub const DEFAULT_TICK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Parses a cron schedule with a seconds field (`sec min hour dom month dow [year]`).
pub fn parse_schedule(text: &str) -> Result<cron::Schedule, ConfigError> {
    text.parse().map_err(|e| {
        ConfigError(format!(
            "invalid [agent] schedule '{text}': {e} (cron with seconds: \"0 */5 * * * *\")"
        ))
    })
}

/// An agent configuration problem: exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    source: RawSource,
    #[serde(default)]
    libvirt: RawLibvirt,
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    trust: RawTrust,
    #[serde(default)]
    webhook: RawWebhook,
    #[serde(default)]
    notify: Vec<targets::RawNotify>,
    #[serde(default)]
    secrets: RawSecrets,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecrets {
    identity: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    listen: Option<String>,
    secret_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    allowed_signers: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    url: Option<String>,
    branch: Option<String>,
    ssh_key: Option<PathBuf>,
    token_file: Option<PathBuf>,
    probe_url: Option<String>,
    probe_max_skip: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLibvirt {
    uri: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    state_dir: Option<PathBuf>,
    host: Option<String>,
    schedule: Option<String>,
    jitter_seconds: Option<u64>,
    max_attempts: Option<u32>,
    backoff_max_seconds: Option<u64>,
    metrics_file: Option<PathBuf>,
    tick_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    disk_roots: Option<Vec<PathBuf>>,
    self_heal: Option<bool>,
    prune: Option<bool>,
    max_prune: Option<usize>,
    shutdown_timeout: Option<String>,
    allowed_paths: Option<Vec<PathBuf>>,
    allow_hostdev: Option<bool>,
    allow_direct_interfaces: Option<bool>,
    allow_block_devices: Option<bool>,
    allow_qemu_commandline: Option<bool>,
    allow_unconfined: Option<bool>,
    health_commands: Option<Vec<PathBuf>>,
    allow_link_local_hosts: Option<bool>,
    allow_open_listeners: Option<bool>,
    image_dir: Option<PathBuf>,
    image_urls: Option<Vec<String>>,
    image_timeout: Option<String>,
    seed_dir: Option<PathBuf>,
}

/// Values given on the command line; each overrides the config file's key.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub url: Option<String>,
    pub branch: Option<String>,
    pub ssh_key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub connect: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub host: Option<String>,
    pub disk_roots: Vec<PathBuf>,
    pub self_heal: Option<bool>,
    pub prune: Option<bool>,
    pub max_prune: Option<usize>,
    pub shutdown_timeout: Option<String>,
    /// `--allow-mass-prune` (flag only, with `--once`).
    pub allow_mass_prune: bool,
    /// `--ignore-windows` (flag only, with `--once` or `plan`).
    pub ignore_windows: bool,
    pub allowed_signers: Option<PathBuf>,
    /// `--probe-url`.
    pub probe_url: Option<String>,
}

/// The checked settings every command runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--ignore-windows` (flag only): restarts, stops and prunes do not wait for a
    /// maintenance window (`[[window]]` in the VM repository).
    pub ignore_windows: bool,
    /// `[source] url` / `--url`: the VM repository; no default (required to sync).
    pub url: Option<String>,
    /// `[source] branch` / `--branch`; default "main".
    pub branch: String,
    /// `[source] ssh_key` / `--ssh-key`: private key for `ssh://` URLs; default: ssh-agent.
    pub ssh_key: Option<PathBuf>,
    /// `[source] token_file` / `--token-file`: HTTPS token; default none.
    pub token_file: Option<PathBuf>,
    /// `[libvirt] uri` / `--connect`; default "qemu:///system".
    pub libvirt_uri: String,
    /// `[agent] state_dir` / `--state-dir`; default "/var/lib/vmsync".
    pub state_dir: PathBuf,
    /// `[agent] host` / `--host`: the name matched against a VM's `hosts`; default: the hostname.
    pub host: String,
    /// `[agent] schedule`: daemon cron schedule (with seconds); default "0 */5 * * * *".
    pub schedule: cron::Schedule,
    /// `[agent] jitter_seconds`: the daemon delays each tick by a per-host amount in
    /// 0..=jitter_seconds, so a fleet does not fetch at the same second; default 30.
    pub jitter_seconds: u64,
    /// `[agent] max_attempts`: the daemon stops retrying a commit that failed this many
    /// times in a row until a newer commit arrives; default 5.
    pub max_attempts: u32,
    /// `[agent] backoff_max_seconds`: cap of the daemon's retry backoff; default 3600.
    pub backoff_max_seconds: u64,
    /// `[agent] metrics_file`: Prometheus textfile written after every sync; default none.
    pub metrics_file: Option<PathBuf>,
    /// `[policy] disk_roots` / `--disk-root`: disks and directories must live below one
    /// of these; default ["/var/lib/libvirt/images"].
    pub disk_roots: Vec<PathBuf>,
    /// `[policy]` change handling: self-heal, pruning and its guards, shutdown timeout.
    pub changes: ChangePolicy,
    /// `[policy] allow_*` and `allowed_paths`: what domain XML may ask of this host
    /// (see `host_policy`); default: nothing beyond disk images under `disk_roots`.
    pub host_policy: host_policy_settings::HostPolicy,
    /// `[trust] allowed_signers` / `--allowed-signers`: when set, only commits with a valid
    /// SSH signature by a key in this file (git's `gpg.ssh.allowedSignersFile` format) are
    /// applied; default none (signatures are not checked).
    pub allowed_signers: Option<PathBuf>,
    /// `[source] probe_url` / `--probe-url`: an http(s) URL naming the branch tip (git's
    /// `info/refs`), asked before each fetch; the fetch is skipped when it names the tip
    /// already fetched. Default none (every sync fetches).
    pub probe_url: Option<String>,
    /// `[source] probe_max_skip`: with a probe, a real fetch at least this often; default "1h".
    pub probe_max_skip: std::time::Duration,
    /// `[webhook] listen` and `secret_file`: the daemon's push webhook (with `/healthz` and
    /// `/metrics`); default none (no listener).
    pub webhook: Option<webhook::WebhookSettings>,
    /// `[[notify]]`: where events go (docs/notifications.md); default none.
    pub notify: Vec<targets::Target>,
    /// `[policy] seed_dir`: where vmsync writes the VMs' cloud-init seed images (one file
    /// per VM, `<vm>-cidata.iso`); default "/var/lib/libvirt/images/vmsync-seeds".
    pub seed_dir: PathBuf,
    /// `[secrets] identity`: the key that decrypts the repository's `.age` files (an SSH
    /// private key or an age identity file); default "/etc/ssh/ssh_host_ed25519_key".
    pub secrets_identity: PathBuf,
    /// `[agent] tick_timeout`: the daemon's watchdog stops pinging systemd when one sync
    /// runs longer than this (a hung libvirt call or fetch), so that systemd restarts
    /// it; default "1h".
    pub tick_timeout: std::time::Duration,
}

impl Settings {
    /// The change probe's settings, when `probe_url` is set.
    pub fn probe(&self) -> Option<probe::ProbeSettings> {
        self.probe_url.as_ref().map(|url| probe::ProbeSettings {
            url: url.clone(),
            max_skip: self.probe_max_skip,
        })
    }

    /// Source settings for fetching; an error if no URL is configured.
    pub fn source(&self) -> Result<SourceSettings, ConfigError> {
        let url = self.url.clone().ok_or_else(|| {
            ConfigError(format!(
                "no VM repository configured: set [source] url in {DEFAULT_CONFIG} or pass --url"
            ))
        })?;
        Ok(SourceSettings {
            url,
            branch: self.branch.clone(),
            ssh_key: self.ssh_key.clone(),
            token_file: self.token_file.clone(),
        })
    }
}

/// Reads the config file (explicit path must exist; the default one may be absent) and
/// merges the flags over it.
pub fn load(flags: &Overrides) -> Result<Settings, ConfigError> {
    let raw = match &flags.config {
        Some(path) => read(path)?,
        None if Path::new(DEFAULT_CONFIG).exists() => read(Path::new(DEFAULT_CONFIG))?,
        None => RawConfig::default(),
    };
    merge(raw, flags)
}

fn read(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("failed to read config '{}': {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| manifest::line_of(&text, s.start));
        let at = line.map(|l| format!(":{l}")).unwrap_or_default();
        ConfigError(format!(
            "invalid config '{}{at}': {}",
            path.display(),
            e.message().trim()
        ))
    })
}

fn merge(raw: RawConfig, flags: &Overrides) -> Result<Settings, ConfigError> {
    let host = host_name(flags, raw.agent.host.clone())?;
    let disk_roots = disk_roots(flags, raw.policy.disk_roots.clone())?;
    let host_policy = host_policy(&raw.policy)?;
    let allowed_signers = allowed_signers(flags, raw.trust)?;
    let state_dir = flags
        .state_dir
        .clone()
        .or(raw.agent.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from("/var/lib/vmsync"));
    let changes = change_policy(flags, &raw.policy)?;
    let webhook = webhook(raw.webhook)?;
    let url = flags.url.clone().or(raw.source.url.clone());
    let (probe_url, probe_max_skip) = probe_settings(flags, &raw.source)?;
    let notify = targets::check(raw.notify).map_err(ConfigError)?;
    let tick_timeout = tick_timeout(raw.agent.tick_timeout.as_deref())?;
    if url.as_deref() == Some("") {
        return Err(ConfigError("the source url is empty".into()));
    }
    let schedule = parse_schedule(raw.agent.schedule.as_deref().unwrap_or(DEFAULT_SCHEDULE))?;
    let max_attempts = max_attempts(raw.agent.max_attempts)?;
    Ok(Settings {
        ignore_windows: flags.ignore_windows,
        url,
        branch: flags
            .branch
            .clone()
            .or(raw.source.branch)
            .unwrap_or_else(|| "main".into()),
        ssh_key: flags.ssh_key.clone().or(raw.source.ssh_key),
        token_file: flags.token_file.clone().or(raw.source.token_file),
        libvirt_uri: flags
            .connect
            .clone()
            .or(raw.libvirt.uri)
            .unwrap_or_else(|| "qemu:///system".into()),
        state_dir,
        host,
        schedule,
        jitter_seconds: raw.agent.jitter_seconds.unwrap_or(30),
        max_attempts,
        backoff_max_seconds: raw.agent.backoff_max_seconds.unwrap_or(3600),
        metrics_file: raw.agent.metrics_file,
        disk_roots,
        changes,
        host_policy,
        allowed_signers,
        probe_url,
        probe_max_skip,
        webhook,
        notify,
        seed_dir: absolute_or(
            raw.policy.seed_dir,
            "policy.seed_dir",
            seed_spec::DEFAULT_SEED_DIR,
        )?,
        secrets_identity: absolute_or(
            raw.secrets.identity,
            "secrets.identity",
            secret_identity::DEFAULT_IDENTITY,
        )?,
        tick_timeout,
    })
}

/// A path setting: absolute and normalized, or `default`.
fn absolute_or(value: Option<PathBuf>, key: &str, default: &str) -> Result<PathBuf, ConfigError> {
    match value {
        None => Ok(PathBuf::from(default)),
        Some(path) => values::absolute_path(&path.to_string_lossy())
            .map_err(|e| ConfigError(format!("invalid {key}: {e}"))),
    }
}

/// `--host`, `[agent] host`, else the hostname; never empty.
fn host_name(flags: &Overrides, configured: Option<String>) -> Result<String, ConfigError> {
    let host = match flags.host.clone().or(configured) {
        Some(host) => host,
        None => gethostname::gethostname().into_string().map_err(|_| {
            ConfigError("the hostname is not valid UTF-8; set [agent] host or pass --host".into())
        })?,
    };
    if host.is_empty() {
        return Err(ConfigError(
            "the host name is empty; set [agent] host or pass --host".into(),
        ));
    }
    Ok(host)
}

/// Each entry of a `[policy]` path list must be absolute.
fn absolute_paths(paths: &[PathBuf], key: &str) -> Result<(), ConfigError> {
    for path in paths {
        values::absolute_path(&path.to_string_lossy())
            .map_err(|e| ConfigError(format!("invalid policy.{key} entry: {e}")))?;
    }
    Ok(())
}

/// `--disk-root` (any) replaces `[policy] disk_roots`.
fn disk_roots(
    flags: &Overrides,
    configured: Option<Vec<PathBuf>>,
) -> Result<Vec<PathBuf>, ConfigError> {
    let disk_roots = if flags.disk_roots.is_empty() {
        configured.unwrap_or_else(|| vec![PathBuf::from("/var/lib/libvirt/images")])
    } else {
        flags.disk_roots.clone()
    };
    absolute_paths(&disk_roots, "disk_roots")?;
    Ok(disk_roots)
}

/// `[policy] allow_*`, `allowed_paths` and `health_commands`: what domain XML may ask of
/// this host.
fn host_policy(raw: &RawPolicy) -> Result<host_policy_settings::HostPolicy, ConfigError> {
    let allowed_paths = raw.allowed_paths.clone().unwrap_or_default();
    absolute_paths(&allowed_paths, "allowed_paths")?;
    let health_commands = raw.health_commands.clone().unwrap_or_default();
    absolute_paths(&health_commands, "health_commands")?;
    Ok(host_policy_settings::HostPolicy {
        allow_hostdev: raw.allow_hostdev.unwrap_or(false),
        allow_direct_interfaces: raw.allow_direct_interfaces.unwrap_or(false),
        allow_block_devices: raw.allow_block_devices.unwrap_or(false),
        allow_qemu_commandline: raw.allow_qemu_commandline.unwrap_or(false),
        allow_unconfined: raw.allow_unconfined.unwrap_or(false),
        allowed_paths,
        health_commands,
        allow_link_local_hosts: raw.allow_link_local_hosts.unwrap_or(false),
        allow_open_listeners: raw.allow_open_listeners.unwrap_or(false),
        images: image_policy(raw)?,
    })
}

/// `[policy] image_dir` (absolute), `image_urls` (each `http://` or `https://`) and
/// `image_timeout`, with their defaults.
fn image_policy(raw: &RawPolicy) -> Result<host_policy_settings::ImagePolicy, ConfigError> {
    let mut images = host_policy_settings::ImagePolicy::default();
    if let Some(dir) = &raw.image_dir {
        images.dir = values::absolute_path(&dir.to_string_lossy())
            .map_err(|e| ConfigError(format!("invalid policy.image_dir: {e}")))?;
    }
    if let Some(urls) = &raw.image_urls {
        for url in urls {
            let lower = url.to_ascii_lowercase();
            if !lower.starts_with("https://") && !lower.starts_with("http://") {
                return Err(ConfigError(format!(
                    "invalid policy.image_urls entry '{url}': it must start with https:// or http://"
                )));
            }
        }
        images.urls = urls.clone();
    }
    if let Some(text) = &raw.image_timeout {
        images.timeout = values::parse_timeout(text)
            .map_err(|e| ConfigError(format!("invalid policy.image_timeout: {e}")))?;
        if images.timeout.is_zero() {
            return Err(ConfigError(
                "invalid policy.image_timeout: it must be more than 0".into(),
            ));
        }
    }
    Ok(images)
}

/// `--allowed-signers` or `[trust] allowed_signers`, its file checked now.
fn allowed_signers(flags: &Overrides, raw: RawTrust) -> Result<Option<PathBuf>, ConfigError> {
    let allowed_signers = flags.allowed_signers.clone().or(raw.allowed_signers);
    if let Some(path) = &allowed_signers {
        // Checked now so a broken file is a config error at start (and on SIGHUP), and
        // read again at every sync so edits take effect without a restart.
        trust::AllowedSigners::load(path).map_err(|e| ConfigError(e.to_string()))?;
    }
    Ok(allowed_signers)
}

/// `[policy]` change handling: self-heal, pruning and its guards, shutdown timeout.
fn change_policy(flags: &Overrides, raw: &RawPolicy) -> Result<ChangePolicy, ConfigError> {
    let defaults = ChangePolicy::default();
    let shutdown_timeout = match flags
        .shutdown_timeout
        .clone()
        .or(raw.shutdown_timeout.clone())
    {
        None => defaults.shutdown_timeout,
        Some(text) => values::parse_timeout(&text)
            .map_err(|e| ConfigError(format!("invalid policy.shutdown_timeout: {e}")))?,
    };
    Ok(ChangePolicy {
        self_heal: flags
            .self_heal
            .or(raw.self_heal)
            .unwrap_or(defaults.self_heal),
        prune: flags.prune.or(raw.prune).unwrap_or(defaults.prune),
        max_prune: flags
            .max_prune
            .or(raw.max_prune)
            .unwrap_or(defaults.max_prune),
        shutdown_timeout,
        allow_mass_prune: flags.allow_mass_prune,
    })
}

/// `--probe-url` or `[source] probe_url` (checked), and `[source] probe_max_skip`.
fn probe_settings(
    flags: &Overrides,
    raw: &RawSource,
) -> Result<(Option<String>, std::time::Duration), ConfigError> {
    let probe_url = flags.probe_url.clone().or(raw.probe_url.clone());
    if let Some(probe) = &probe_url {
        probe::check_url(probe).map_err(ConfigError)?;
    }
    let probe_max_skip = match &raw.probe_max_skip {
        None => probe::DEFAULT_MAX_SKIP,
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            ConfigError(format!(
                "invalid [source] probe_max_skip '{text}': {e} (a duration: \"1h\", \"30m\")"
            ))
        })?,
    };
    Ok((probe_url, probe_max_skip))
}

/// `[agent] tick_timeout`: a non-zero duration.
fn tick_timeout(text: Option<&str>) -> Result<std::time::Duration, ConfigError> {
    match text {
        None => Ok(DEFAULT_TICK_TIMEOUT),
        Some(text) => humantime::parse_duration(text)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                ConfigError(format!(
                    "invalid [agent] tick_timeout '{text}': a duration (\"1h\", \"30m\")"
                ))
            }),
    }
}

/// `[agent] max_attempts`: at least 1; default 5.
fn max_attempts(configured: Option<u32>) -> Result<u32, ConfigError> {
    match configured {
        Some(0) => Err(ConfigError(
            "invalid [agent] max_attempts 0: must be at least 1".into(),
        )),
        other => Ok(other.unwrap_or(5)),
    }
}

/// `[webhook]`: off without `listen`; with it, `secret_file` is required (the daemon
/// reads it).
fn webhook(raw: RawWebhook) -> Result<Option<webhook::WebhookSettings>, ConfigError> {
    let Some(listen) = raw.listen else {
        if raw.secret_file.is_some() {
            return Err(ConfigError(
                "[webhook] secret_file is set but listen is not: set listen (e.g. \"127.0.0.1:9870\") or remove the [webhook] table".into(),
            ));
        }
        return Ok(None);
    };
    let listen = listen.parse().map_err(|e| {
        ConfigError(format!(
            "invalid [webhook] listen '{listen}': {e} (an address and port: \"127.0.0.1:9870\")"
        ))
    })?;
    let secret_file = raw.secret_file.ok_or_else(|| {
        ConfigError(
            "[webhook] listen is set but secret_file is not: the webhook needs a secret".into(),
        )
    })?;
    Ok(Some(webhook::WebhookSettings {
        listen,
        secret_file,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[source]\nurl = \"ssh://git@example.org/vms.git\"\nbranch = \"prod\"\n[libvirt]\nuri = \"qemu:///system\"\n[agent]\nhost = \"hv1\"\n",
        )
        .unwrap();
        let flags = Overrides {
            config: Some(path),
            branch: Some("test".into()),
            ..Default::default()
        };
        let s = load(&flags).unwrap();
        assert_eq!(s.url.as_deref(), Some("ssh://git@example.org/vms.git"));
        assert_eq!(s.branch, "test");
        assert_eq!(s.host, "hv1");
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/vmsync"));
        assert_eq!(s.disk_roots, vec![PathBuf::from("/var/lib/libvirt/images")]);
        assert_eq!(s.schedule.source(), "0 */5 * * * *");
        assert_eq!(
            (s.jitter_seconds, s.max_attempts, s.backoff_max_seconds),
            (30, 5, 3600)
        );
        assert_eq!(s.metrics_file, None);
    }

    #[test]
    fn schedule_and_attempts_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[agent]\nschedule = \"*/5 * * * *\"\n").unwrap();
        let err = load(&Overrides {
            config: Some(path.clone()),
            host: Some("h".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            err.0.contains("invalid [agent] schedule '*/5 * * * *'"),
            "{err}"
        );
        std::fs::write(&path, "[agent]\nmax_attempts = 0\n").unwrap();
        let err = load(&Overrides {
            config: Some(path.clone()),
            host: Some("h".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.0.contains("max_attempts"), "{err}");
        std::fs::write(&path, "[agent]\nschedule = \"*/2 * * * * *\"\njitter_seconds = 0\nmetrics_file = \"/tmp/v.prom\"\n").unwrap();
        let s = load(&Overrides {
            config: Some(path),
            host: Some("h".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.jitter_seconds, 0);
        assert_eq!(s.metrics_file, Some(PathBuf::from("/tmp/v.prom")));
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[source]\nurl = \"x\"\nbrnach = \"main\"\n").unwrap();
        let err = load(&Overrides {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.0.contains(":3") && err.0.contains("brnach"), "{err}");
        let err = load(&Overrides {
            config: Some(dir.path().join("nope.toml")),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.0.contains("failed to read config"), "{err}");
        let err = load(&Overrides {
            config: Some(path),
            disk_roots: vec!["relative/dir".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.0.contains("brnach"));
    }

    #[test]
    fn relative_disk_roots_are_refused() {
        let flags = |roots: &[&str]| Overrides {
            disk_roots: roots.iter().map(PathBuf::from).collect(),
            host: Some("h".into()),
            ..Default::default()
        };
        // The same settings with an absolute root load: nothing else stops them first.
        let s = merge(RawConfig::default(), &flags(&["/srv/images"])).unwrap();
        assert_eq!(s.disk_roots, vec![PathBuf::from("/srv/images")]);
        // A relative root from a flag is refused by the absolute-path check, by name.
        let err = merge(RawConfig::default(), &flags(&["/srv/images", "images"])).unwrap_err();
        assert_eq!(
            err.0,
            "invalid policy.disk_roots entry: path 'images' must be absolute"
        );
        // And from the config file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[agent]\nhost = \"h\"\n[policy]\ndisk_roots = [\"/srv/images\", \"vm/images\"]\n",
        )
        .unwrap();
        let err = load(&Overrides {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            err.0,
            "invalid policy.disk_roots entry: path 'vm/images' must be absolute"
        );
    }

    #[test]
    fn host_access_keys_from_the_file_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let load_text = |text: &str| {
            std::fs::write(&path, format!("[agent]\nhost = \"h\"\n[policy]\n{text}")).unwrap();
            load(&Overrides {
                config: Some(path.clone()),
                ..Default::default()
            })
        };
        let s = load_text("").unwrap();
        assert!(s.host_policy.health_commands.is_empty());
        assert!(!s.host_policy.allow_link_local_hosts && !s.host_policy.allow_open_listeners);
        let s = load_text(
            "health_commands = [\"/usr/local/lib/vmsync/checks/\"]\nallow_link_local_hosts = true\nallow_open_listeners = true\n",
        )
        .unwrap();
        assert_eq!(
            s.host_policy.health_commands,
            vec![PathBuf::from("/usr/local/lib/vmsync/checks/")]
        );
        assert!(s.host_policy.allow_link_local_hosts && s.host_policy.allow_open_listeners);
        let err = load_text("health_commands = [\"/usr/local/../../bin\"]\n").unwrap_err();
        assert!(
            err.0.starts_with("invalid policy.health_commands entry:") && err.0.contains("'..'"),
            "{err}"
        );
    }

    #[test]
    fn change_policy_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[agent]\nhost = \"h\"\n[policy]\nself_heal = false\nprune = true\nmax_prune = 2\nshutdown_timeout = \"30s\"\n",
        )
        .unwrap();
        let s = load(&Overrides {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.changes,
            ChangePolicy {
                self_heal: false,
                prune: true,
                max_prune: 2,
                shutdown_timeout: std::time::Duration::from_secs(30),
                allow_mass_prune: false,
            }
        );
        let s = load(&Overrides {
            config: Some(path),
            self_heal: Some(true),
            prune: Some(false),
            shutdown_timeout: Some("2m".into()),
            allow_mass_prune: true,
            ..Default::default()
        })
        .unwrap();
        assert!(s.changes.self_heal && !s.changes.prune && s.changes.allow_mass_prune);
        assert_eq!(s.changes.shutdown_timeout.as_secs(), 120);
        let defaults = merge(
            RawConfig::default(),
            &Overrides {
                host: Some("h".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(defaults.changes, ChangePolicy::default());
        let err = merge(
            RawConfig::default(),
            &Overrides {
                host: Some("h".into()),
                shutdown_timeout: Some("never".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.0.contains("policy.shutdown_timeout"), "{err}");
    }

    #[test]
    fn source_needs_a_url() {
        let s = merge(
            RawConfig::default(),
            &Overrides {
                host: Some("h".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(s.source().unwrap_err().0.contains("--url"));
    }
}
