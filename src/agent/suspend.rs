//! `vmsync suspend` and `vmsync resume`: an operator stops a host (or one VM) from being
//! applied to, with a reason, optionally until a time. Kept in `<state_dir>/suspend.json`
//! (written atomically), read again by every sync, so the daemon picks a change up at its
//! next tick without a restart. A suspended host or VM is still fetched, validated and
//! planned; its changes (drift repair included) are held back and reported. An entry
//! whose `until` has passed is ignored, and dropped at the next write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::reconcile::plan_types;
use crate::util::{clock, fsio};

/// The file in the state directory.
pub const SUSPEND_FILE: &str = "suspend.json";

/// The longest reason kept (characters); a longer one is cut.
pub const MAX_REASON: usize = 200;

/// One suspension: who, why, since and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// The user who ran `vmsync suspend` (`SUDO_USER`, else `USER`, else `uid N`).
    pub by: String,
    pub reason: String,
    /// RFC 3339.
    pub since: String,
    /// RFC 3339; `None`: until `vmsync resume`.
    pub until: Option<String>,
}

impl Suspension {
    /// Whether it is still in force at `now`.
    pub fn active_at(&self, now: SystemTime) -> bool {
        match self.until.as_deref().map(humantime::parse_rfc3339) {
            None => true,
            Some(Ok(until)) => now < until,
            // A broken time never suspends forever by mistake.
            Some(Err(_)) => false,
        }
    }

    /// `by alice until 2026-12-06T18:00:00Z: kernel upgrade` (for logs, plan, status).
    pub fn describe(&self) -> String {
        let until = self
            .until
            .as_deref()
            .map(|u| format!(" until {u}"))
            .unwrap_or_else(|| " until resumed".into());
        format!("by {}{until}: {}", self.by, self.reason)
    }

    /// When it ends, in seconds since the epoch (`None`: until resumed).
    pub fn until_seconds(&self) -> Option<f64> {
        let until = humantime::parse_rfc3339(self.until.as_deref()?).ok()?;
        Some(
            until
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()?
                .as_secs_f64(),
        )
    }
}

/// What `suspend.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suspensions {
    #[serde(default = "one")]
    pub version: u32,
    /// The whole host.
    #[serde(default)]
    pub host: Option<Suspension>,
    /// Single VMs, by name.
    #[serde(default)]
    pub vms: BTreeMap<String, Suspension>,
}

fn one() -> u32 {
    1
}

impl Suspensions {
    /// Only the entries in force at `now`.
    pub fn active(&self, now: SystemTime) -> Suspensions {
        Suspensions {
            version: 1,
            host: self.host.clone().filter(|s| s.active_at(now)),
            vms: self
                .vms
                .iter()
                .filter(|(_, s)| s.active_at(now))
                .map(|(n, s)| (n.clone(), s.clone()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_none() && self.vms.is_empty()
    }

    /// The suspension that holds `vm` back: the host's, else the VM's own.
    pub fn of_vm(&self, vm: &str) -> Option<&Suspension> {
        self.host.as_ref().or_else(|| self.vms.get(vm))
    }

    /// Lines for `vmsync plan` and `vmsync status`: empty when nothing is suspended.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if let Some(s) = &self.host {
            out += &format!(
                "host suspended {}: changes are planned, not applied\n",
                s.describe()
            );
        }
        for (vm, s) in &self.vms {
            out += &format!(
                "vm '{vm}' suspended {}: its changes are planned, not applied\n",
                s.describe()
            );
        }
        out
    }

    /// The JSON value added as `suspended` to `status --json` and `plan --json`
    /// (`null` when nothing is suspended).
    pub fn to_json(&self) -> serde_json::Value {
        if self.is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::json!({ "host": self.host, "vms": self.vms })
    }

    /// Prometheus lines: `vmsync_suspended` (1 per suspension, labels `vm` (empty for the
    /// host), `by`, `reason`) and `vmsync_suspended_until_timestamp_seconds` (0: until
    /// resumed).
    pub fn metrics(&self) -> String {
        let mut rows: Vec<(&str, &Suspension)> = Vec::new();
        if let Some(s) = &self.host {
            rows.push(("", s));
        }
        rows.extend(self.vms.iter().map(|(n, s)| (n.as_str(), s)));
        let label = |v: &str| {
            v.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        };
        let mut out = String::from(
            "# HELP vmsync_suspended 1 for each suspension in force (vm=\"\": the whole host), with who and why.\n# TYPE vmsync_suspended gauge\n",
        );
        for (vm, s) in &rows {
            out += &format!(
                "vmsync_suspended{{vm=\"{}\",by=\"{}\",reason=\"{}\"}} 1\n",
                label(vm),
                label(&s.by),
                label(&s.reason)
            );
        }
        out += "# HELP vmsync_suspended_until_timestamp_seconds When a suspension ends (0: until resumed).\n# TYPE vmsync_suspended_until_timestamp_seconds gauge\n";
        for (vm, s) in &rows {
            out += &format!(
                "vmsync_suspended_until_timestamp_seconds{{vm=\"{}\"}} {}\n",
                label(vm),
                s.until_seconds().unwrap_or(0.0)
            );
        }
        out
    }
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(SUSPEND_FILE)
}

/// Reads `suspend.json` (missing: nothing suspended).
pub fn load(state_dir: &Path) -> anyhow::Result<Suspensions> {
    let file = path(state_dir);
    match std::fs::read_to_string(&file) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid suspend file '{}': {e}", file.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Suspensions::default()),
        Err(e) => Err(anyhow::anyhow!(
            "failed to read suspend file '{}': {e}",
            file.display()
        )),
    }
}

/// The suspensions in force now. A file that cannot be read suspends the whole host: an
/// operator asked for a pause, and a broken file must not silently lift it.
pub fn in_force(state_dir: &Path) -> Suspensions {
    match load(state_dir) {
        Ok(s) => s.active(SystemTime::now()),
        Err(e) => {
            tracing::error!(error = %e, "treating the host as suspended; fix or remove the file, or run `vmsync resume`");
            Suspensions {
                version: 1,
                host: Some(Suspension {
                    by: "vmsync".into(),
                    reason: format!("{e}"),
                    since: clock::now_rfc3339(),
                    until: None,
                }),
                vms: BTreeMap::new(),
            }
        }
    }
}

fn save(state_dir: &Path, s: &Suspensions) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| anyhow::anyhow!("failed to create '{}': {e}", state_dir.display()))?;
    let text = serde_json::to_string_pretty(s).expect("suspensions serialize");
    fsio::write_atomic(&path(state_dir), format!("{text}\n").as_bytes())
}

/// The invoking user: `SUDO_USER` (the person behind sudo), else `USER`, else `uid N`.
pub fn invoking_user(env: impl Fn(&str) -> Option<String>, uid: u32) -> String {
    ["SUDO_USER", "USER"]
        .iter()
        .filter_map(|k| env(k))
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| format!("uid {uid}"))
}

fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// `--until`: a duration from now (`2h`, `30m`, `1d 12h`), an RFC 3339 time
/// (`2026-12-06T18:00:00Z`), or a local date and time (`2026-12-06 18:00`). It must lie
/// in the future.
pub fn parse_until(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    let text = text.trim();
    let at = if let Ok(d) = humantime::parse_duration(text) {
        now + d
    } else if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        SystemTime::from(t)
    } else {
        local_time(text)?
    };
    if at <= now {
        return Err(format!("invalid --until '{text}': it is not in the future"));
    }
    Ok(at)
}

fn local_time(text: &str) -> Result<SystemTime, String> {
    use chrono::TimeZone;
    let naive = ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(text, f).ok())
        .ok_or_else(|| {
            format!(
                "invalid --until '{text}': a duration (\"2h\", \"30m\"), an RFC 3339 time (\"2026-12-06T18:00:00Z\") or a local time (\"2026-12-06 18:00\")"
            )
        })?;
    let local = chrono::Local
        .from_local_datetime(&naive)
        .earliest()
        .ok_or_else(|| format!("invalid --until '{text}': no such local time"))?;
    Ok(SystemTime::from(local))
}

/// Checks and shortens a reason: not empty, one line, at most [`MAX_REASON`] characters.
pub fn clean_reason(reason: &str) -> Result<String, String> {
    let one_line = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return Err(
            "--reason is empty: say why (it is shown in status, metrics and the commit status)"
                .into(),
        );
    }
    Ok(one_line.chars().take(MAX_REASON).collect())
}

/// `vmsync suspend`: records a suspension of the host, or of `vm`; returns it.
pub fn suspend(
    state_dir: &Path,
    vm: Option<&str>,
    reason: &str,
    until: Option<&str>,
) -> Result<Suspension, String> {
    let now = SystemTime::now();
    let reason = clean_reason(reason)?;
    let until = until
        .map(|u| parse_until(u, now))
        .transpose()?
        .map(|t| humantime::format_rfc3339_seconds(t).to_string());
    let user = invoking_user(|k| std::env::var(k).ok(), current_uid());
    let entry = Suspension {
        by: user,
        reason,
        since: humantime::format_rfc3339_seconds(now).to_string(),
        until,
    };
    let mut all = load(state_dir).map_err(|e| e.to_string())?.active(now);
    match vm {
        Some(vm) => {
            all.vms.insert(vm.to_string(), entry.clone());
        }
        None => all.host = Some(entry.clone()),
    }
    save(state_dir, &all).map_err(|e| e.to_string())?;
    Ok(entry)
}

/// `vmsync resume`: lifts the host's suspension, or `vm`'s; returns what was lifted
/// (`None`: it was not suspended) and what stays in force.
pub fn resume(
    state_dir: &Path,
    vm: Option<&str>,
) -> Result<(Option<Suspension>, Suspensions), String> {
    let now = SystemTime::now();
    let mut all = load(state_dir).map_err(|e| e.to_string())?.active(now);
    let lifted = match vm {
        Some(vm) => all.vms.remove(vm),
        None => all.host.take(),
    };
    save(state_dir, &all).map_err(|e| e.to_string())?;
    Ok((lifted, all))
}

/// What a sync held back because of suspensions: the host's (all of the plan), or the
/// VMs' whose planned changes were cleared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub host: Option<Suspension>,
    pub vms: BTreeMap<String, Suspension>,
    /// Planned actions not applied.
    pub changes: usize,
}

/// The planned actions of `plan`.
pub fn changes(plan: &plan_types::Plan) -> usize {
    let r = &plan.resources;
    plan.create_directories.len()
        + plan.vms.iter().map(|v| v.actions.len()).sum::<usize>()
        + plan.prune.iter().map(|p| p.actions.len()).sum::<usize>()
        + r.pools
            .iter()
            .chain(&r.networks)
            .chain(&r.prune)
            .map(|p| p.actions.len())
            .sum::<usize>()
        + r.volumes.iter().filter(|v| v.create.is_some()).count()
}

/// Holds back what `s` suspends: with the host suspended and something to do, the whole
/// plan (the caller then applies nothing); else the actions of each suspended VM
/// (its drift stays reported, not healed), its prune included.
pub fn hold(plan: &mut plan_types::Plan, s: &Suspensions) -> Held {
    let mut held = Held::default();
    if let Some(host) = &s.host {
        let n = changes(plan);
        if n > 0 {
            held.host = Some(host.clone());
            held.changes = n;
        }
        return held;
    }
    for vm in plan.vms.iter_mut() {
        if let Some(sv) = s.vms.get(&vm.name)
            && !vm.actions.is_empty()
        {
            held.changes += vm.actions.len();
            vm.actions.clear();
            vm.drift_reported_only = !vm.drift.is_empty();
            held.vms.insert(vm.name.clone(), sv.clone());
        }
    }
    for p in plan.prune.iter_mut() {
        if let Some(sv) = s.vms.get(&p.name)
            && p.skipped.is_none()
            && !p.actions.is_empty()
        {
            held.changes += p.actions.len();
            p.actions.clear();
            p.skipped = Some(format!("suspended {}", sv.describe()));
            held.vms.insert(p.name.clone(), sv.clone());
        }
    }
    held
}

/// The sync's step: holds back what the suspensions in force in `state_dir` suspend,
/// with a log line for each.
pub fn held_back(state_dir: &Path, plan: &mut plan_types::Plan, commit: &str) -> Held {
    let held = hold(plan, &in_force(state_dir));
    if let Some(host) = &held.host {
        tracing::warn!(
            commit,
            changes = held.changes,
            "host suspended {}: planned, not applied",
            host.describe()
        );
    }
    for (vm, s) in &held.vms {
        tracing::warn!(vm = %vm, commit, "vm suspended {}: its changes are planned, not applied", s.describe());
    }
    held
}

/// How long until the next suspension in force ends (for a log line).
pub fn next_expiry(s: &Suspensions, now: SystemTime) -> Option<Duration> {
    s.host
        .iter()
        .chain(s.vms.values())
        .filter_map(|s| humantime::parse_rfc3339(s.until.as_deref()?).ok())
        .filter_map(|t| t.duration_since(now).ok())
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn until_takes_durations_and_times_in_the_future_only() {
        let now = at("2026-12-06T10:00:00Z");
        assert_eq!(parse_until("2h", now).unwrap(), at("2026-12-06T12:00:00Z"));
        assert_eq!(
            parse_until("2026-12-06T18:00:00Z", now).unwrap(),
            at("2026-12-06T18:00:00Z")
        );
        assert!(
            parse_until("2026-12-06T09:00:00Z", now)
                .unwrap_err()
                .contains("not in the future")
        );
        assert!(
            parse_until("tomorrow-ish", now)
                .unwrap_err()
                .contains("a duration")
        );
        // A local time parses (its offset is the machine's).
        assert!(parse_until("2099-01-01 00:00", now).is_ok());
    }

    #[test]
    fn a_suspension_ends_on_its_own() {
        let s = Suspensions {
            version: 1,
            host: Some(Suspension {
                by: "alice".into(),
                reason: "kernel upgrade".into(),
                since: "2026-12-06T10:00:00Z".into(),
                until: Some("2026-12-06T12:00:00Z".into()),
            }),
            vms: BTreeMap::from([(
                "web".to_string(),
                Suspension {
                    by: "bob".into(),
                    reason: "debugging".into(),
                    since: "2026-12-06T10:00:00Z".into(),
                    until: None,
                },
            )]),
        };
        let before = s.active(at("2026-12-06T11:59:59Z"));
        assert!(before.host.is_some());
        assert_eq!(
            before.of_vm("db").unwrap().by,
            "alice",
            "the host's covers every vm"
        );
        let after = s.active(at("2026-12-06T12:00:00Z"));
        assert!(after.host.is_none());
        assert_eq!(after.of_vm("web").unwrap().by, "bob");
        assert!(after.of_vm("db").is_none());
        assert_eq!(
            after.render_text(),
            "vm 'web' suspended by bob until resumed: debugging: its changes are planned, not applied\n"
        );
        let metrics = before.metrics();
        assert!(
            metrics.contains("vmsync_suspended{vm=\"\",by=\"alice\",reason=\"kernel upgrade\"} 1"),
            "{metrics}"
        );
        assert!(metrics.contains("vmsync_suspended_until_timestamp_seconds{vm=\"web\"} 0"));
    }

    #[test]
    fn who_is_the_person_behind_sudo() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            invoking_user(env(&[("SUDO_USER", "alice"), ("USER", "root")]), 0),
            "alice"
        );
        assert_eq!(invoking_user(env(&[("USER", "bob")]), 1000), "bob");
        assert_eq!(invoking_user(env(&[]), 1000), "uid 1000");
    }

    #[test]
    fn suspend_and_resume_write_the_file_and_keep_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let s = suspend(dir.path(), None, "  kernel\nupgrade ", Some("1h")).unwrap();
        assert_eq!(s.reason, "kernel upgrade");
        assert!(s.until.is_some());
        suspend(dir.path(), Some("web"), "debugging", None).unwrap();
        let now = in_force(dir.path());
        assert!(now.host.is_some() && now.vms.contains_key("web"));
        let (lifted, left) = resume(dir.path(), None).unwrap();
        assert_eq!(lifted.unwrap().reason, "kernel upgrade");
        assert!(left.host.is_none() && left.vms.contains_key("web"));
        assert!(resume(dir.path(), Some("db")).unwrap().0.is_none());
        assert!(
            suspend(dir.path(), None, " \n", None)
                .unwrap_err()
                .contains("empty")
        );
        // A broken file suspends the host rather than lifting the pause.
        std::fs::write(dir.path().join(SUSPEND_FILE), "{").unwrap();
        assert!(in_force(dir.path()).host.is_some());
    }
}
