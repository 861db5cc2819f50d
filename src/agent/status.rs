//! `vmsync status`: the record joined with what libvirt says now about each managed VM.

use serde::Serialize;

use crate::desired::domain_xml;
use crate::desired::resource_xml::{self, ResourceKind};
use crate::host::hypervisor::{HvError, Hypervisor};
use crate::reconcile::plan_networks_pools::recorded;
use crate::reconcile::{drift, plan_types};
use crate::record::{Record, SyncResult, healthy_file};
use crate::util::commit_id;

/// One managed VM in the status view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmStatus {
    /// What a VM shares with a network or pool (its JSON keys sit beside the others).
    #[serde(flatten)]
    pub entry: EntryStatus,
    /// The last health check's result, the last healthy commit and a held back commit
    /// (`null` for a VM never checked: no `[vm.health]`).
    pub health: Option<plan_types::HealthView>,
    /// Damaged local state of this VM (its last healthy definition), with what to do;
    /// left out when there is none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub state_problems: Vec<String>,
    /// What its restart, stop or prune waits for at the last sync: "window <start>"
    /// (the next start of a maintenance window, UTC); `null` when nothing waits.
    pub waiting_for: Option<String>,
}

/// The whole status view (`vmsync status --json` prints it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub last_applied_commit: Option<String>,
    pub last_applied_at: Option<String>,
    pub last_attempted_commit: Option<String>,
    pub last_attempt_at: Option<String>,
    pub last_result: Option<SyncResult>,
    pub last_error: Option<String>,
    /// Set when libvirt could not be reached; VM fields from libvirt are then null.
    pub libvirt_error: Option<String>,
    pub vms: Vec<VmStatus>,
    /// Disks of pruned domains (never deleted by vmsync), path → former domain.
    pub orphaned_disks: std::collections::BTreeMap<String, String>,
    /// Networks vmsync manages.
    pub networks: Vec<EntryStatus>,
    /// Storage pools vmsync manages.
    pub pools: Vec<EntryStatus>,
}

/// Adds to `status` what is wrong with the local state of each VM: a last healthy
/// definition the record names that is missing or damaged.
pub fn check_local_state(status: &mut Status, record: &Record, state_dir: &std::path::Path) {
    for vm in &mut status.vms {
        let Some(fingerprint) = record
            .vms
            .get(&vm.entry.name)
            .and_then(|r| r.healthy_fingerprint.as_deref())
        else {
            continue;
        };
        if let Err(why) = healthy_file::read(state_dir, &vm.entry.name, fingerprint) {
            vm.state_problems.push(why);
        }
    }
}

/// Builds the status view; `hv` is `Err` when libvirt could not be reached.
pub fn status(record: &Record, hv: Result<&dyn Hypervisor, HvError>) -> Status {
    let hv_ok = hv.as_ref().ok().copied();
    let networks = resource_status(record, hv_ok, resource_xml::ResourceKind::Network);
    let pools = resource_status(record, hv_ok, resource_xml::ResourceKind::Pool);
    let (listing, libvirt_error) = match hv.and_then(|hv| hv.list().map(|l| (hv, l))) {
        Ok((hv, listing)) => (Some((hv, listing)), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let vms = record
        .vms
        .iter()
        .map(|(name, rec)| {
            let mut vm = VmStatus {
                entry: EntryStatus::recorded(
                    name,
                    &rec.applied_commit,
                    rec.pending_restart,
                    &rec.last_error,
                ),
                health: plan_types::HealthView::of(rec),
                state_problems: Vec::new(),
                waiting_for: rec.waiting_for.clone(),
            };
            if let Some((hv, listing)) = &listing {
                let seen = listing.iter().find(|d| &d.name == name);
                vm.entry.seen(seen.map(|d| (d.active, d.autostart)));
                match seen {
                    None => {
                        vm.entry.drift = drift::detect(
                            rec,
                            drift::Now {
                                listing: None,
                                tag_fingerprint: None,
                                definition_hash: None,
                            },
                        )
                        .iter()
                        .map(ToString::to_string)
                        .collect()
                    }
                    Some(d) => {
                        let xml = hv.xml(name, true).ok();
                        let tag = xml.as_deref().and_then(domain_xml::read_tag);
                        vm.entry.drift = drift::detect(
                            rec,
                            drift::Now {
                                listing: Some(d),
                                tag_fingerprint: tag.as_ref().map(|t| t.fingerprint.as_str()),
                                definition_hash: xml
                                    .as_deref()
                                    .and_then(|x| {
                                        domain_xml::definition_hash_against(
                                            x,
                                            rec.definition_hash.as_deref(),
                                        )
                                    })
                                    .as_deref(),
                            },
                        )
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                        if d.active {
                            let live = hv
                                .xml(name, false)
                                .ok()
                                .and_then(|xml| domain_xml::read_tag(&xml));
                            vm.entry.pending_restart = live
                                .zip(rec.fingerprint.as_ref())
                                .is_none_or(|(t, fp)| &t.fingerprint != fp);
                        } else {
                            vm.entry.pending_restart = false;
                        }
                    }
                }
            }
            vm
        })
        .collect();
    Status {
        last_applied_commit: record.last_applied_commit.clone(),
        last_applied_at: record.last_applied_at.clone(),
        last_attempted_commit: record.last_attempted_commit.clone(),
        last_attempt_at: record.last_attempt_at.clone(),
        last_result: record.last_result,
        last_error: record.last_error.clone(),
        libvirt_error,
        vms,
        orphaned_disks: record
            .orphaned_disks
            .iter()
            .filter(|(path, _)| std::path::Path::new(path).exists())
            .map(|(p, v)| (p.clone(), v.clone()))
            .collect(),
        networks,
        pools,
    }
}

fn opt(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
}

/// The human-readable status.
pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    out += &format!(
        "last applied commit: {} (at {})\n",
        opt(&s.last_applied_commit),
        opt(&s.last_applied_at)
    );
    let result = s.last_result.map(|r| {
        serde_json::to_value(r)
            .unwrap()
            .as_str()
            .unwrap_or("")
            .to_string()
    });
    out += &format!(
        "last attempt:        {} (at {}): {}\n",
        opt(&s.last_attempted_commit),
        opt(&s.last_attempt_at),
        opt(&result)
    );
    if let Some(e) = &s.last_error {
        out += &format!("last error:          {e}\n");
    }
    if let Some(e) = &s.libvirt_error {
        out += &format!("libvirt:             unreachable: {e}\n");
    }
    out += &format!(
        "\n{:<24} {:<8} {:<7} {:<10} {:<13} {:<16} {}\n",
        "VM", "DEFINED", "ACTIVE", "AUTOSTART", "APPLIED", "PENDING-RESTART", "DRIFT / ERROR"
    );
    for vm in &s.vms {
        let applied = vm
            .entry
            .applied_commit
            .as_deref()
            .map(commit_id::short)
            .unwrap_or("-");
        let mut notes = vm.entry.drift.clone();
        notes.extend(vm.entry.last_error.iter().map(|e| format!("error: {e}")));
        notes.extend(vm.state_problems.iter().cloned());
        notes.extend(vm.waiting_for.iter().map(|w| format!("waiting for {w}")));
        out += &format!(
            "{:<24} {:<8} {:<7} {:<10} {:<13} {:<16} {}\n",
            vm.entry.name,
            yes_no(vm.entry.defined),
            yes_no(vm.entry.active),
            yes_no(vm.entry.autostart),
            applied,
            if vm.entry.pending_restart {
                "yes"
            } else {
                "no"
            },
            if notes.is_empty() {
                "-".to_string()
            } else {
                notes.join("; ")
            }
        );
        if let Some(health) = &vm.health {
            out += &format!("{:<24} {}\n", "", health.line());
        }
    }
    for (disk, vm) in &s.orphaned_disks {
        out += &format!("orphaned disk (kept): {disk} (was vm '{vm}')\n");
    }
    out += &resource_status_text(&s.networks, &s.pools);
    out
}

/// One managed network or pool in `vmsync status`, and the part a VM's status shares
/// with them ([`VmStatus::entry`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryStatus {
    pub name: String,
    /// `None` when libvirt could not be asked.
    pub defined: Option<bool>,
    pub active: Option<bool>,
    pub autostart: Option<bool>,
    pub applied_commit: Option<String>,
    pub pending_restart: bool,
    /// What differs between the host and the last applied definition (empty: none).
    pub drift: Vec<String>,
    pub last_error: Option<String>,
}

impl EntryStatus {
    /// What the record says of a VM, network or pool, before libvirt is asked.
    fn recorded(
        name: &str,
        applied_commit: &Option<String>,
        pending_restart: bool,
        last_error: &Option<String>,
    ) -> Self {
        EntryStatus {
            name: name.to_string(),
            defined: None,
            active: None,
            autostart: None,
            applied_commit: applied_commit.clone(),
            pending_restart,
            drift: Vec::new(),
            last_error: last_error.clone(),
        }
    }

    /// What libvirt's listing says: `(active, autostart)` when it is defined.
    fn seen(&mut self, seen: Option<(bool, bool)>) {
        self.defined = Some(seen.is_some());
        self.active = Some(seen.is_some_and(|(active, _)| active));
        self.autostart = Some(seen.is_some_and(|(_, autostart)| autostart));
    }
}

/// The record's networks and pools joined with what libvirt says now: one listing per
/// kind and one XML read per defined one (the drift baseline, and a network's live tag).
pub fn resource_status(
    record: &Record,
    hv: Option<&dyn Hypervisor>,
    kind: ResourceKind,
) -> Vec<EntryStatus> {
    let recs = recorded(record, kind);
    let listing = match (hv, recs.is_empty()) {
        (Some(hv), false) => hv.list_resources(kind).ok(),
        _ => None,
    };
    recs.iter()
        .map(|(name, rec)| {
            let mut s = EntryStatus::recorded(
                name,
                &rec.applied_commit,
                rec.pending_restart,
                &rec.last_error,
            );
            let (Some(hv), Some(listing)) = (hv, &listing) else {
                return s;
            };
            let seen = listing.iter().find(|l| &l.name == name);
            s.seen(seen.map(|l| (l.active, l.autostart)));
            match seen {
                None => s.drift.push("undefined outside vmsync".into()),
                Some(l) => {
                    let xml = hv.resource_xml(kind, name, true).ok();
                    let hash = xml
                        .as_deref()
                        .and_then(|x| resource_xml::definition_hash(kind, x));
                    if rec.definition_hash.is_some() && hash != rec.definition_hash {
                        s.drift.push("definition changed outside vmsync".into());
                    }
                    if rec.autostart != l.autostart {
                        s.drift.push("autostart flag changed outside vmsync".into());
                    }
                    if rec.autostart && !l.active {
                        s.drift.push("stopped outside vmsync".into());
                    }
                    if kind == ResourceKind::Network {
                        let live = if l.active {
                            hv.resource_xml(kind, name, false).ok()
                        } else {
                            None
                        };
                        let tag = live
                            .as_deref()
                            .and_then(|x| resource_xml::summarize(kind, x).ok())
                            .and_then(|s| s.tag);
                        s.pending_restart = l.active
                            && match (tag, rec.fingerprint.as_ref()) {
                                (Some(t), Some(fp)) => &t.fingerprint != fp,
                                // Runs an untagged (adopted) definition: pending when it
                                // is not the persistent one.
                                _ => {
                                    let h = |x: Option<&str>| {
                                        x.and_then(|x| resource_xml::live_hash(kind, x))
                                    };
                                    let live = h(live.as_deref());
                                    live.is_none() || live != h(xml.as_deref())
                                }
                            };
                    } else {
                        s.pending_restart = l.active && rec.pending_restart;
                    }
                }
            }
            s
        })
        .collect()
}

/// The networks and pools rows of `vmsync status`.
pub fn resource_status_text(networks: &[EntryStatus], pools: &[EntryStatus]) -> String {
    if networks.is_empty() && pools.is_empty() {
        return String::new();
    }
    let yn = |v: Option<bool>| match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    };
    let mut out = format!(
        "\n{:<8} {:<24} {:<8} {:<7} {:<10} {:<13} {:<16} {}\n",
        "KIND",
        "NAME",
        "DEFINED",
        "ACTIVE",
        "AUTOSTART",
        "APPLIED",
        "PENDING-RESTART",
        "DRIFT / ERROR"
    );
    for (kind, s) in networks
        .iter()
        .map(|s| ("network", s))
        .chain(pools.iter().map(|s| ("pool", s)))
    {
        let applied = s
            .applied_commit
            .as_deref()
            .map(commit_id::short)
            .unwrap_or("-");
        let mut notes = s.drift.clone();
        notes.extend(s.last_error.iter().map(|e| format!("error: {e}")));
        out += &format!(
            "{:<8} {:<24} {:<8} {:<7} {:<10} {:<13} {:<16} {}\n",
            kind,
            s.name,
            yn(s.defined),
            yn(s.active),
            yn(s.autostart),
            applied,
            if s.pending_restart { "yes" } else { "no" },
            if notes.is_empty() {
                "-".to_string()
            } else {
                notes.join("; ")
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeHost;

    fn fixture() -> Record {
        serde_json::from_str(include_str!("../../tests/fixtures/state-2375f90.json")).unwrap()
    }

    #[test]
    fn status_without_libvirt_shows_the_record_and_why_libvirt_is_missing() {
        let record = fixture();
        let down = HvError::new("connect to libvirt", None, "qemu:///system", "no socket");
        let s = status(&record, Err(down));
        assert!(s.libvirt_error.as_deref().unwrap().contains("no socket"));
        assert_eq!(s.vms.len(), 4);
        assert!(
            s.vms.iter().all(|vm| vm.entry.defined.is_none()),
            "unknown, not false"
        );
        let text = render_text(&s);
        assert!(
            text.contains("libvirt:             unreachable: "),
            "{text}"
        );
        assert!(text.contains("last attempt:        9b8c7d6e5f4a"), "{text}");
        assert!(text.contains("): failed\n"), "{text}");
        assert!(
            text.contains("error: failed to start domain 'db'"),
            "{text}"
        );
        assert!(
            text.contains(
                "health: reverted; last healthy commit 3f2a9c41d0b7; held back: commit 9b8c7d6e5f4a"
            ),
            "{text}"
        );
        assert!(text.contains("pool     images "), "{text}");
        let web = text.lines().find(|l| l.starts_with("web ")).unwrap();
        assert!(web.contains("9b8c7d6e5f4a"), "{web}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["last_result"], "failed");
        assert_eq!(json["vms"][3]["name"], "worker");
        assert_eq!(json["vms"][3]["health"]["result"], "healthy");
    }

    #[test]
    fn status_with_libvirt_says_what_is_defined_and_running() {
        let mut record = Record::default();
        record.vms.insert(
            "web".into(),
            crate::record::VmRecord {
                applied_commit: Some("c1".into()),
                ok: true,
                ..Default::default()
            },
        );
        let host = FakeHost::default();
        let xml = "<domain type='qemu'><name>web</name><memory>1024</memory><os><type>hvm</type></os></domain>";
        host.define(xml).unwrap();
        host.start("web").unwrap();
        let s = status(&record, Ok(&host));
        assert_eq!(s.libvirt_error, None);
        let web = &s.vms[0].entry;
        assert_eq!(
            (web.defined, web.active, web.autostart),
            (Some(true), Some(true), Some(false))
        );
        let line = render_text(&s)
            .lines()
            .find(|l| l.starts_with("web "))
            .unwrap()
            .to_string();
        assert!(line.contains("yes      yes     no"), "{line}");
    }
}
