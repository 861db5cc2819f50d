//! Prometheus metrics in the node_exporter textfile format, rendered from the record and
//! the last sync's report, and written atomically (`util::fsio::write_atomic`) to
//! `[agent] metrics_file` after every sync, by `--once` and the daemon alike.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use strum::IntoEnumIterator;

use crate::agent::report::Report;
use crate::agent::{notify, suspend};
use crate::reconcile::plan_types::ActionKind;
use crate::record::{HealthResult, Record, SyncResult};

/// Escapes a label value (backslash, double quote, newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn parse_time(text: &Option<String>) -> Option<f64> {
    let t = humantime::parse_rfc3339(text.as_deref()?).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64())
}

/// The figures kept beside the record in the state directory: suspensions in force
/// (`vmsync suspend`) and `vmsync_notify_failures_total`.
pub fn agent_extras(state_dir: &std::path::Path) -> String {
    suspend::in_force(state_dir).metrics()
        + &notify::metrics(notify::load_file(state_dir).failures_total)
}

/// Renders the metrics. `report` is the last sync's, when it got as far as applying.
pub fn render(record: &Record, report: Option<&Report>, duration: Duration) -> String {
    let mut out = Gauges(String::new());
    sync_gauges(&mut out, record, duration);
    vm_gauges(&mut out, record, report);
    resource_gauges(&mut out, record);
    health_gauges(&mut out, record);
    action_gauges(&mut out, report);
    out.0
}

/// The text written so far.
struct Gauges(String);

impl Gauges {
    /// Writes one gauge: its help, its type and its samples (labels, value).
    fn gauge(&mut self, name: &str, help: &str, samples: &[(String, f64)]) {
        let out = &mut self.0;
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    }
}

/// The last sync's time, result, duration and commit.
fn sync_gauges(out: &mut Gauges, record: &Record, duration: Duration) {
    let attempt = parse_time(&record.last_attempt_at).unwrap_or(0.0);
    out.gauge(
        "vmsync_last_sync_timestamp_seconds",
        "When the last sync attempt ended.",
        &[(String::new(), attempt)],
    );
    let converged = record.last_result == Some(SyncResult::Converged);
    out.gauge(
        "vmsync_last_sync_success",
        "1 if the last sync converged, 0 otherwise.",
        &[(String::new(), if converged { 1.0 } else { 0.0 })],
    );
    let samples: Vec<_> = SyncResult::iter()
        .map(|r| {
            let on = record.last_result == Some(r);
            (
                format!("{{result=\"{}\"}}", r.as_str()),
                if on { 1.0 } else { 0.0 },
            )
        })
        .collect();
    out.gauge(
        "vmsync_last_sync_result",
        "The last sync's result (1 for the current one).",
        &samples,
    );
    out.gauge(
        "vmsync_last_sync_duration_seconds",
        "How long the last sync took.",
        &[(
            String::new(),
            (duration.as_secs_f64() * 1000.0).round() / 1000.0,
        )],
    );
    out.gauge(
        "vmsync_failed_attempts",
        "Consecutive attempts of the last attempted commit that did not converge.",
        &[(String::new(), f64::from(record.failed_attempts))],
    );
    let applied: Vec<_> = record
        .last_applied_commit
        .iter()
        .map(|c| (format!("{{commit=\"{}\"}}", label(c)), 1.0))
        .collect();
    out.gauge(
        "vmsync_last_applied_commit_info",
        "The last applied commit, as a label.",
        &applied,
    );
    out.gauge(
        "vmsync_last_success_timestamp_seconds",
        "When the last sync that converged ended (the watchdog's figure: alert when it grows old).",
        &[(
            String::new(),
            parse_time(&record.last_applied_at).unwrap_or(0.0),
        )],
    );
    out.gauge(
        "vmsync_last_applied_timestamp_seconds",
        "When the last applied commit converged.",
        &[(
            String::new(),
            parse_time(&record.last_applied_at).unwrap_or(0.0),
        )],
    );
}

/// A series per VM: up, pending restart, failed.
fn vm_gauges(out: &mut Gauges, record: &Record, report: Option<&Report>) {
    let vm_label = |name: &str| format!("{{vm=\"{}\"}}", label(name));
    let up: Vec<_> = report
        .map(|r| {
            r.outcome
                .vms
                .iter()
                .map(|vm| (vm_label(&vm.name), if vm.up { 1.0 } else { 0.0 }))
                .collect()
        })
        .unwrap_or_default();
    out.gauge(
        "vmsync_vm_up",
        "1 if the managed domain is running after the last sync.",
        &up,
    );
    let pending: Vec<_> = record
        .vms
        .iter()
        .map(|(name, vm)| (vm_label(name), if vm.pending_restart { 1.0 } else { 0.0 }))
        .collect();
    out.gauge(
        "vmsync_vm_pending_restart",
        "1 if the domain runs an older definition.",
        &pending,
    );
    let waiting: Vec<_> = record
        .vms
        .iter()
        .map(|(name, vm)| {
            let start = vm
                .waiting_for
                .as_deref()
                .and_then(crate::reconcile::window_gate::start_of);
            (vm_label(name), start.map_or(0.0, |t| t.timestamp() as f64))
        })
        .collect();
    out.gauge(
        "vmsync_vm_waiting_for_window_timestamp_seconds",
        "When the maintenance window opens that the vm's restart, stop or prune waits for (unix time); 0 when nothing waits.",
        &waiting,
    );
    let failed: Vec<_> = record
        .vms
        .iter()
        .map(|(name, vm)| (vm_label(name), if vm.ok { 0.0 } else { 1.0 }))
        .collect();
    out.gauge(
        "vmsync_vm_failed",
        "1 if the last sync failed for this vm.",
        &failed,
    );
}

/// Networks and pools: failed and pending restart, per name (as for vms).
fn resource_gauges(out: &mut Gauges, record: &Record) {
    for (kind, recs) in [("network", &record.networks), ("pool", &record.pools)] {
        let lbl = |name: &str| format!("{{{kind}=\"{}\"}}", label(name));
        let failed: Vec<_> = recs
            .iter()
            .map(|(n, r)| (lbl(n), if r.ok { 0.0 } else { 1.0 }))
            .collect();
        out.gauge(
            &format!("vmsync_{kind}_failed"),
            &format!("1 if the last sync failed for this {kind}."),
            &failed,
        );
        let pending: Vec<_> = recs
            .iter()
            .map(|(n, r)| (lbl(n), if r.pending_restart { 1.0 } else { 0.0 }))
            .collect();
        out.gauge(
            &format!("vmsync_{kind}_pending_restart"),
            &format!("1 if this {kind} is active on an older definition."),
            &pending,
        );
    }
}

/// Health (`[vm.health]`): one series per result for each checked vm, the current 1;
/// held back; the last healthy commit.
fn health_gauges(out: &mut Gauges, record: &Record) {
    let vm_label = |name: &str| format!("{{vm=\"{}\"}}", label(name));
    let checked = || record.vms.iter().filter(|(_, vm)| vm.health.is_some());
    let health: Vec<_> = checked()
        .flat_map(|(name, vm)| {
            HealthResult::iter().map(move |r| {
                (
                    format!("{{vm=\"{}\",result=\"{}\"}}", label(name), r.as_str()),
                    if vm.health == Some(r) { 1.0 } else { 0.0 },
                )
            })
        })
        .collect();
    out.gauge(
        "vmsync_vm_health",
        "The last health check's result of the vm (1 for the current one).",
        &health,
    );
    let held: Vec<_> = record
        .vms
        .iter()
        .filter(|(_, vm)| vm.health.is_some() || vm.held_back.is_some())
        .map(|(name, vm)| {
            (
                vm_label(name),
                if vm.held_back.is_some() { 1.0 } else { 0.0 },
            )
        })
        .collect();
    out.gauge(
        "vmsync_vm_held_back",
        "1 if a reverted definition of the vm is held back until a newer commit changes it.",
        &held,
    );
    let healthy: Vec<_> = record
        .vms
        .iter()
        .filter_map(|(name, vm)| {
            let commit = vm.healthy_commit.as_ref()?;
            Some((
                format!("{{vm=\"{}\",commit=\"{}\"}}", label(name), label(commit)),
                1.0,
            ))
        })
        .collect();
    out.gauge(
        "vmsync_vm_last_healthy_commit_info",
        "The commit of the vm's last healthy definition, as a label.",
        &healthy,
    );
}

/// Actions done by the last sync, by kind (every kind, 0 when none).
fn action_gauges(out: &mut Gauges, report: Option<&Report>) {
    let mut kinds: BTreeMap<ActionKind, f64> = ActionKind::iter().map(|k| (k, 0.0)).collect();
    if let Some(r) = report {
        *kinds.entry(ActionKind::CreateDirectory).or_default() +=
            r.outcome.directories_created as f64;
        for kind in r.outcome.vms.iter().flat_map(|vm| vm.kinds.iter()) {
            *kinds.entry(*kind).or_default() += 1.0;
        }
        for p in &r.outcome.pruned {
            *kinds.entry(ActionKind::Undefine).or_default() += p
                .kinds
                .iter()
                .filter(|k| **k == ActionKind::Undefine)
                .count() as f64;
        }
        for kind in r.outcome.resources.kinds() {
            *kinds.entry(kind).or_default() += 1.0;
        }
    }
    let samples: Vec<_> = kinds
        .iter()
        .map(|(k, v)| (format!("{{kind=\"{}\"}}", k.as_str()), *v))
        .collect();
    out.gauge(
        "vmsync_last_sync_actions",
        "Actions done by the last sync, by kind.",
        &samples,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::VmRecord;

    #[test]
    fn renders_the_record_in_textfile_format() {
        let mut record = Record {
            last_applied_commit: Some("ab\"c".into()),
            last_attempt_at: Some("2026-11-25T20:00:00Z".into()),
            last_result: Some(SyncResult::Failed),
            failed_attempts: 2,
            ..Default::default()
        };
        record.vms.insert(
            "web".into(),
            VmRecord {
                ok: false,
                pending_restart: true,
                ..Default::default()
            },
        );
        record.pools.insert(
            "vmpool".into(),
            crate::record::ResourceRecord {
                ok: false,
                ..Default::default()
            },
        );
        record.networks.insert(
            "lab".into(),
            crate::record::ResourceRecord {
                ok: true,
                pending_restart: true,
                ..Default::default()
            },
        );
        let text = render(&record, None, Duration::from_millis(1500));
        for line in [
            "vmsync_pool_failed{pool=\"vmpool\"} 1",
            "vmsync_network_failed{network=\"lab\"} 0",
            "vmsync_network_pending_restart{network=\"lab\"} 1",
            "vmsync_last_sync_actions{kind=\"create_volume\"} 0",
            "vmsync_last_sync_actions{kind=\"start_network\"} 0",
            "vmsync_last_sync_timestamp_seconds 1795636800",
            "vmsync_last_sync_success 0",
            "vmsync_last_sync_result{result=\"failed\"} 1",
            "vmsync_last_sync_result{result=\"converged\"} 0",
            "vmsync_last_sync_duration_seconds 1.5",
            "vmsync_failed_attempts 2",
            "vmsync_last_applied_commit_info{commit=\"ab\\\"c\"} 1",
            "vmsync_vm_pending_restart{vm=\"web\"} 1",
            "vmsync_vm_failed{vm=\"web\"} 1",
            "vmsync_last_sync_actions{kind=\"define\"} 0",
            "# TYPE vmsync_vm_up gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line is "name{labels} value" with a numeric value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let value = l.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn health_series_per_checked_vm() {
        let mut record = Record::default();
        record.vms.insert(
            "web".into(),
            VmRecord {
                health: Some(HealthResult::Reverted),
                healthy_commit: Some("c1".into()),
                held_back: Some(crate::record::HeldBack {
                    commit: "c2".into(),
                    fingerprint: "f".into(),
                    reason: "r".into(),
                }),
                ..Default::default()
            },
        );
        record.vms.insert("db".into(), VmRecord::default());
        let text = render(&record, None, Duration::ZERO);
        for line in [
            "vmsync_vm_health{vm=\"web\",result=\"reverted\"} 1",
            "vmsync_vm_health{vm=\"web\",result=\"healthy\"} 0",
            "vmsync_vm_health{vm=\"web\",result=\"revert-failed\"} 0",
            "vmsync_vm_held_back{vm=\"web\"} 1",
            "vmsync_vm_last_healthy_commit_info{vm=\"web\",commit=\"c1\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("vm=\"db\",result"), "db was never checked");
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("vmsync_vm_health{"))
                .count(),
            HealthResult::iter().count()
        );
    }

    /// Every result the record can hold has its own series, and only the current one
    /// is 1: refused and untrusted included (a hand-kept list once had no series for
    /// them).
    #[test]
    fn every_result_sets_its_own_series() {
        for current in SyncResult::iter() {
            let record = Record {
                last_result: Some(current),
                ..Default::default()
            };
            let text = render(&record, None, Duration::ZERO);
            let ones: Vec<_> = text
                .lines()
                .filter(|l| l.starts_with("vmsync_last_sync_result{") && l.ends_with(" 1"))
                .collect();
            assert_eq!(
                ones,
                [format!(
                    "vmsync_last_sync_result{{result=\"{}\"}} 1",
                    current.as_str()
                )],
                "{current:?}"
            );
            let series = text
                .lines()
                .filter(|l| l.starts_with("vmsync_last_sync_result{"))
                .count();
            assert_eq!(series, SyncResult::iter().count());
        }
        for (result, name) in [
            (SyncResult::Refused, "refused"),
            (SyncResult::Untrusted, "untrusted"),
            (SyncResult::FetchFailed, "fetch-failed"),
        ] {
            assert_eq!(result.as_str(), name);
            assert_eq!(serde_json::to_value(result).unwrap(), name);
        }
    }
}
