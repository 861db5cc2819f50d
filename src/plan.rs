//! Planning: a pure function from the desired state and what was observed to the actions
//! that converge the host. No I/O; table-tested.
//!
//! Rules (DESIGN.md):
//! - a domain with a desired VM's name but without vmsync's tag belongs to someone else:
//!   the VM fails with a conflict and nothing of it is touched;
//! - missing disks are created; an existing disk of another format fails the VM; an
//!   existing disk is never changed;
//! - a domain is (re)defined only if it is missing or its tag's fingerprint differs; the
//!   XML keeps the existing domain's UUID and MACs where the source gives none;
//! - a running domain whose definition changes keeps running: pending restart;
//! - `autostart = true`: flag set, domain started if not running; `false`: flag cleared,
//!   never started or stopped.

use std::path::PathBuf;

use crate::disk::{DiskSpec, check_existing};
use crate::domain_xml::{self, Tag};
use crate::observe::Observed;
use crate::validate::{Desired, DesiredVm};

/// One step of converging a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    CreateDisk(DiskSpec),
    /// Define a new domain, or redefine an existing one in place.
    Define {
        xml: String,
        redefine: bool,
    },
    SetAutostart(bool),
    Start,
}

impl Action {
    /// The action's kind, for metrics (`vmsync_last_sync_actions{kind=…}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Action::CreateDisk(_) => "create_disk",
            Action::Define {
                redefine: false, ..
            } => "define",
            Action::Define { redefine: true, .. } => "redefine",
            Action::SetAutostart(_) => "set_autostart",
            Action::Start => "start",
        }
    }

    /// Short description for logs and plans.
    pub fn describe(&self) -> String {
        match self {
            Action::CreateDisk(spec) => {
                format!(
                    "create {} disk '{}' ({})",
                    spec.format,
                    spec.path.display(),
                    crate::disk::human_size(spec.size_bytes)
                )
            }
            Action::Define {
                redefine: false, ..
            } => "define".into(),
            Action::Define { redefine: true, .. } => "redefine in place".into(),
            Action::SetAutostart(true) => "set autostart".into(),
            Action::SetAutostart(false) => "clear autostart".into(),
            Action::Start => "start".into(),
        }
    }
}

/// What to do for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPlan {
    pub name: String,
    pub fingerprint: String,
    pub autostart: bool,
    pub actions: Vec<Action>,
    /// The VM cannot be converged (conflict, disk format mismatch); nothing of it is done.
    pub error: Option<String>,
    /// Notes that are not errors (an existing disk of another size).
    pub warnings: Vec<String>,
    /// Running with an older definition, after this plan is applied.
    pub pending_restart: bool,
    /// The domain is running now (before the plan is applied).
    pub active: bool,
}

/// The whole plan for one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub commit: String,
    pub create_directories: Vec<PathBuf>,
    pub vms: Vec<VmPlan>,
}

impl Plan {
    /// Whether applying the plan changes nothing.
    pub fn is_noop(&self) -> bool {
        self.create_directories.is_empty() && self.vms.iter().all(|vm| vm.actions.is_empty())
    }
}

/// Plans the actions that bring the host from `observed` to `desired` at `commit`.
pub fn plan(desired: &Desired, observed: &Observed, commit: &str) -> Plan {
    let create_directories = desired
        .directories
        .iter()
        .filter(|d| !observed.directories.get(*d).copied().unwrap_or(false))
        .cloned()
        .collect();
    let vms = desired
        .vms
        .iter()
        .map(|vm| plan_vm(vm, observed, commit))
        .collect();
    Plan {
        commit: commit.to_string(),
        create_directories,
        vms,
    }
}

fn plan_vm(vm: &DesiredVm, observed: &Observed, commit: &str) -> VmPlan {
    let mut out = VmPlan {
        name: vm.name.clone(),
        fingerprint: vm.fingerprint.clone(),
        autostart: vm.autostart,
        actions: Vec::new(),
        error: None,
        warnings: Vec::new(),
        pending_restart: false,
        active: false,
    };
    let seen = observed.domains.get(&vm.name);
    if let Some(seen) = seen {
        match &seen.inactive {
            None => {
                out.error = Some(format!(
                    "could not read the definition of existing domain '{}'; not touching it",
                    vm.name
                ));
                return out;
            }
            Some(summary) if summary.tag.is_none() => {
                out.error = Some(format!(
                    "domain '{}' exists but was not defined by vmsync (no vmsync metadata); refusing to touch it",
                    vm.name
                ));
                return out;
            }
            Some(_) if !seen.listing.persistent => {
                out.error = Some(format!(
                    "domain '{}' is transient; refusing to touch it",
                    vm.name
                ));
                return out;
            }
            Some(_) => {}
        }
    }

    for disk in &vm.disks {
        match observed.disks.get(&disk.path) {
            Some(Ok(None)) => out.actions.push(Action::CreateDisk(disk.clone())),
            Some(Ok(Some(info))) => match check_existing(disk, info) {
                Ok(None) => {}
                Ok(Some(warning)) => out.warnings.push(warning),
                Err(e) => {
                    out.error = Some(e.to_string());
                    out.actions.clear();
                    return out;
                }
            },
            Some(Err(e)) => {
                out.error = Some(e.clone());
                out.actions.clear();
                return out;
            }
            None => {
                out.error = Some(format!("disk '{}' was not observed", disk.path.display()));
                out.actions.clear();
                return out;
            }
        }
    }

    let summary = seen.and_then(|s| s.inactive.as_ref());
    let current = summary.and_then(|s| s.tag.as_ref());
    let changed = current.is_none_or(|tag| tag.fingerprint != vm.fingerprint);
    if changed {
        let tag = Tag {
            commit: commit.to_string(),
            fingerprint: vm.fingerprint.clone(),
        };
        let uuid = summary.and_then(|s| s.uuid.as_deref());
        let macs = summary.map(|s| s.macs.clone()).unwrap_or_default();
        match domain_xml::render(&vm.xml, uuid, &macs, &tag) {
            Ok(xml) => out.actions.push(Action::Define {
                xml,
                redefine: seen.is_some(),
            }),
            Err(e) => {
                out.error = Some(format!("failed to render the domain xml: {}", e.message));
                out.actions.clear();
                return out;
            }
        }
    }

    let active = seen.is_some_and(|s| s.listing.active);
    out.active = active;
    let autostart_now = seen.is_some_and(|s| s.listing.autostart);
    if vm.autostart != autostart_now {
        out.actions.push(Action::SetAutostart(vm.autostart));
    }
    if vm.autostart && !active {
        out.actions.push(Action::Start);
    }
    if active {
        let live = seen.and_then(|s| s.live_tag.as_ref());
        out.pending_restart = live.is_none_or(|tag| tag.fingerprint != vm.fingerprint);
    }
    out
}

/// Renders a plan for people (`vmsync plan`).
pub fn render(plan: &Plan) -> String {
    let mut out = format!("plan for commit {}\n", plan.commit);
    for dir in &plan.create_directories {
        out += &format!("  create directory '{}'\n", dir.display());
    }
    for vm in &plan.vms {
        let what = match (&vm.error, vm.actions.is_empty()) {
            (Some(e), _) => format!("error: {e}"),
            (None, true) => "nothing to do".to_string(),
            (None, false) => vm
                .actions
                .iter()
                .map(Action::describe)
                .collect::<Vec<_>>()
                .join(", "),
        };
        out += &format!("  {}: {what}", vm.name);
        if vm.pending_restart {
            out += " (pending restart)";
        }
        out += "\n";
        for w in &vm.warnings {
            out += &format!("    warning: {w}\n");
        }
    }
    if plan.is_noop() {
        out += "nothing to do\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{DiskFormat, ImageInfo};
    use crate::domain_xml::fingerprint;
    use crate::hypervisor::Listing;
    use crate::observe::SeenDomain;

    const UUID: &str = "6a3f4c1e-0b2d-4e5f-8a9b-0c1d2e3f4a5b";

    fn source(name: &str, memory: u32) -> String {
        format!(
            "<domain type='kvm'><name>{name}</name><memory>{memory}</memory><devices><interface type='user'/></devices></domain>"
        )
    }

    fn desired_vm(name: &str, memory: u32, autostart: bool, disks: Vec<DiskSpec>) -> DesiredVm {
        let xml = source(name, memory);
        DesiredVm {
            name: name.into(),
            xml_file: format!("vms/{name}.xml"),
            summary: domain_xml::summarize(&xml).unwrap(),
            fingerprint: fingerprint(&xml),
            xml,
            autostart,
            disks,
        }
    }

    fn disk(path: &str) -> DiskSpec {
        DiskSpec {
            path: path.into(),
            size_bytes: 1 << 30,
            format: DiskFormat::Qcow2,
            backing: None,
            backing_format: None,
        }
    }

    /// A domain as libvirt would report it after vmsync defined `memory` at "old".
    fn seen(name: &str, memory: u32, active: bool, autostart: bool, tagged: bool) -> SeenDomain {
        let tag = Tag {
            commit: "old".into(),
            fingerprint: fingerprint(&source(name, memory)),
        };
        let xml = if tagged {
            domain_xml::render(
                &source(name, memory),
                Some(UUID),
                &[Some("52:54:00:12:34:56".into())],
                &tag,
            )
            .unwrap()
        } else {
            source(name, memory).replace(
                "<interface type='user'/>",
                "<interface type='user'><mac address='52:54:00:12:34:56'/></interface>",
            )
        };
        let summary = domain_xml::summarize(&xml).unwrap();
        SeenDomain {
            listing: Listing {
                name: name.into(),
                uuid: UUID.into(),
                active,
                autostart,
                persistent: true,
            },
            live_tag: if active { summary.tag.clone() } else { None },
            inactive: Some(summary),
        }
    }

    fn observed(domains: Vec<SeenDomain>, disks: Vec<(&str, Option<&str>)>) -> Observed {
        Observed {
            domains: domains
                .into_iter()
                .map(|d| (d.listing.name.clone(), d))
                .collect(),
            disks: disks
                .into_iter()
                .map(|(p, fmt)| {
                    let info = fmt.map(|f| ImageInfo {
                        format: f.into(),
                        virtual_size: 1 << 30,
                        backing_filename: None,
                    });
                    (PathBuf::from(p), Ok(info))
                })
                .collect(),
            directories: Default::default(),
        }
    }

    fn kinds(plan: &VmPlan) -> Vec<String> {
        plan.actions.iter().map(Action::describe).collect()
    }

    #[test]
    fn planner_table() {
        struct Case {
            what: &'static str,
            want: DesiredVm,
            have: Vec<SeenDomain>,
            disks: Vec<(&'static str, Option<&'static str>)>,
            actions: Vec<&'static str>,
            pending_restart: bool,
            error: Option<&'static str>,
        }
        let d = "/srv/images/web.qcow2";
        let cases = vec![
            Case {
                what: "new vm, autostart: disk, define, autostart, start",
                want: desired_vm("web", 1024, true, vec![disk(d)]),
                have: vec![],
                disks: vec![(d, None)],
                actions: vec![
                    "create qcow2 disk '/srv/images/web.qcow2' (1 GiB)",
                    "define",
                    "set autostart",
                    "start",
                ],
                pending_restart: false,
                error: None,
            },
            Case {
                what: "new vm without autostart: define only",
                want: desired_vm("web", 1024, false, vec![]),
                have: vec![],
                disks: vec![],
                actions: vec!["define"],
                pending_restart: false,
                error: None,
            },
            Case {
                what: "unchanged and running: nothing",
                want: desired_vm("web", 1024, true, vec![disk(d)]),
                have: vec![seen("web", 1024, true, true, true)],
                disks: vec![(d, Some("qcow2"))],
                actions: vec![],
                pending_restart: false,
                error: None,
            },
            Case {
                what: "changed while running: redefine, pending restart, no start",
                want: desired_vm("web", 2048, true, vec![]),
                have: vec![seen("web", 1024, true, true, true)],
                disks: vec![],
                actions: vec!["redefine in place"],
                pending_restart: true,
                error: None,
            },
            Case {
                what: "changed while stopped, autostart: redefine then start",
                want: desired_vm("web", 2048, true, vec![]),
                have: vec![seen("web", 1024, false, true, true)],
                disks: vec![],
                actions: vec!["redefine in place", "start"],
                pending_restart: false,
                error: None,
            },
            Case {
                what: "autostart turned off: clear flag, never stop",
                want: desired_vm("web", 1024, false, vec![]),
                have: vec![seen("web", 1024, true, true, true)],
                disks: vec![],
                actions: vec!["clear autostart"],
                pending_restart: false,
                error: None,
            },
            Case {
                what: "stopped by hand, autostart: start again",
                want: desired_vm("web", 1024, true, vec![]),
                have: vec![seen("web", 1024, false, true, true)],
                disks: vec![],
                actions: vec!["start"],
                pending_restart: false,
                error: None,
            },
            Case {
                what: "domain made by hand with the same name: conflict, nothing done",
                want: desired_vm("web", 1024, true, vec![disk(d)]),
                have: vec![seen("web", 1024, false, false, false)],
                disks: vec![(d, None)],
                actions: vec![],
                pending_restart: false,
                error: Some("not defined by vmsync"),
            },
            Case {
                what: "existing disk of another format: error, nothing done",
                want: desired_vm("web", 1024, true, vec![disk(d)]),
                have: vec![],
                disks: vec![(d, Some("raw"))],
                actions: vec![],
                pending_restart: false,
                error: Some("is raw, but the manifest says qcow2"),
            },
        ];
        for case in cases {
            let desired = Desired {
                directories: vec![],
                vms: vec![case.want],
            };
            let p = plan(&desired, &observed(case.have, case.disks), "new");
            let vm = &p.vms[0];
            assert_eq!(kinds(vm), case.actions, "{}", case.what);
            assert_eq!(vm.pending_restart, case.pending_restart, "{}", case.what);
            match case.error {
                None => assert_eq!(vm.error, None, "{}", case.what),
                Some(text) => assert!(
                    vm.error.as_deref().unwrap_or("").contains(text),
                    "{}: {:?}",
                    case.what,
                    vm.error
                ),
            }
        }
    }

    #[test]
    fn redefine_keeps_uuid_and_macs_and_tags_the_commit() {
        let desired = Desired {
            directories: vec![],
            vms: vec![desired_vm("web", 2048, false, vec![])],
        };
        let p = plan(
            &desired,
            &observed(vec![seen("web", 1024, false, false, true)], vec![]),
            "c2",
        );
        let Action::Define {
            xml,
            redefine: true,
        } = &p.vms[0].actions[0]
        else {
            panic!("{:?}", p.vms[0].actions)
        };
        let s = domain_xml::summarize(xml).unwrap();
        assert_eq!(s.uuid.as_deref(), Some(UUID));
        assert_eq!(s.macs, vec![Some("52:54:00:12:34:56".to_string())]);
        assert_eq!(
            s.tag,
            Some(Tag {
                commit: "c2".into(),
                fingerprint: desired.vms[0].fingerprint.clone()
            })
        );
    }

    #[test]
    fn missing_directories_are_created_and_noop_is_detected() {
        let desired = Desired {
            directories: vec!["/srv/images/ISOs".into()],
            vms: vec![desired_vm("web", 1024, false, vec![])],
        };
        let mut obs = observed(vec![seen("web", 1024, false, false, true)], vec![]);
        let p = plan(&desired, &obs, "c");
        assert_eq!(
            p.create_directories,
            vec![PathBuf::from("/srv/images/ISOs")]
        );
        assert!(!p.is_noop());
        obs.directories.insert("/srv/images/ISOs".into(), true);
        assert!(plan(&desired, &obs, "c").is_noop());
    }
}
