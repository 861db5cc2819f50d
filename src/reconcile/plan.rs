//! Planning: a pure function from the desired state, what was observed and the record
//! of the last sync to the actions that converge the host. No I/O; table-tested.
//!
//! Rules (docs/design.md, docs/repository-format.md):
//! - a domain with a desired VM's name but without vmsync's tag belongs to someone else:
//!   the VM fails with a conflict and nothing of it is touched;
//! - missing disks are created (a base image they are made from downloaded first when
//!   it is not on the host); an existing disk of another format fails the VM; an
//!   existing disk is never changed (nor rebased when its image entry changes);
//! - a domain is (re)defined if it is missing, its tag's fingerprint differs from the
//!   commit's, or its definition drifted and self-heal is on; the XML keeps the existing
//!   domain's UUID and MACs where the source gives none;
//! - drift (definition, autostart flag, power state changed outside vmsync since the last
//!   sync) is healed when `self_heal` is on, else only reported; a change the commit
//!   makes is always applied;
//! - a running domain whose definition changes keeps running (pending restart) with
//!   `on_change = "defer"`, and is shut down gracefully and started again with
//!   `on_change = "restart"`; `state = "stopped"` shuts it down the same way;
//! - a desired VM whose `<uuid>` belongs to a tagged domain of another name renames it
//!   (shut off first with `on_change = "restart"`; an error for a running "defer" VM);
//! - tagged domains no longer in the manifest for this host are pruned (graceful
//!   shutdown, undefine keeping NVRAM and TPM state, disks kept) only with
//!   `policy.prune`; pruning every managed domain or more than `policy.max_prune` is
//!   refused without `--allow-mass-prune`. Untagged domains are never touched.

use crate::desired::cloud_init_spec::SeedOnChange;
use crate::desired::desired_state::{Desired, DesiredVm};
use crate::desired::domain_xml::{self, Tag};
use crate::desired::manifest::{OnChange, PowerState};
use crate::desired::seed_spec;
use crate::host::disk::check_existing;
use crate::host::observe_domains::{Observed, SeenDomain};
use crate::reconcile::drift::{self, Drift};
use crate::reconcile::plan_types::{Action, Plan, PrunePlan, VmPlan};
use crate::reconcile::policy::ChangePolicy;
use crate::reconcile::{adopt, health_rules, plan_networks_pools, plan_types};
use crate::record::Record;

/// What the planner needs besides the desired and observed state.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub policy: &'a ChangePolicy,
    /// The record of the last sync (the drift baseline).
    pub record: &'a Record,
}

/// Plans the actions that bring the host from `observed` to `desired` at `commit`.
pub fn plan(desired: &Desired, observed: &Observed, commit: &str, ctx: &Context) -> Plan {
    let create_directories = desired
        .directories
        .iter()
        .filter(|d| !observed.directories.get(*d).copied().unwrap_or(false))
        .cloned()
        .collect();
    let mut claimed = Vec::new();
    let vms = desired
        .vms
        .iter()
        .map(|vm| {
            let mut p = plan_vm(vm, observed, commit, ctx, &mut claimed);
            // A definition reverted by a health check is not tried again (see `health`).
            let rec = ctx.record.vms.get(&vm.name);
            health_rules::hold_back(&mut p, rec);
            p.health = rec.and_then(plan_types::HealthView::of);
            if p.health.is_none() && vm.health.is_some() {
                p.health = Some(Default::default());
            }
            if let (Some(view), Some(spec)) = (p.health.as_mut(), vm.health.as_ref()) {
                view.check = Some(spec.describe());
            }
            p.order.after = vm.order.depends_on.clone();
            p.order.up_check = vm.health.clone();
            p.order.shutdown_timeout = vm.shutdown_timeout;
            p
        })
        .collect();
    let prune = plan_prune(observed, ctx, &claimed);
    let resources = plan_networks_pools::plan(desired, observed, commit, ctx.record, ctx.policy);
    // Networks and pools count towards the mass-prune guard.
    let pruning = prune.iter().filter(|p| !p.actions.is_empty()).count() + resources.pruning();
    let foreign_tagged = observed
        .others
        .keys()
        .filter(|name| !ctx.record.vms.contains_key(*name) && !claimed.contains(name))
        .count();
    // This agent's domains on the host: the desired ones it tagged, and the others its
    // record says it applied.
    let managed = observed
        .domains
        .values()
        .filter(|d| d.inactive.as_ref().is_some_and(|s| s.tag.is_some()))
        .count()
        + prune.len()
        + resources.managed();
    let refused = (pruning > 0
        && !ctx.policy.allow_mass_prune
        && (pruning == managed || pruning > ctx.policy.max_prune))
        .then(|| {
            // Networks and pools count too: the message says so when they are in it.
            let with_resources = resources.managed() > 0;
            let why = match (pruning == managed, with_resources) {
                (true, false) => format!("every managed domain on this host ({managed})"),
                (true, true) => format!(
                    "every managed domain, network and pool on this host ({managed})"
                ),
                (false, false) => format!(
                    "{pruning} domains, more than policy.max_prune = {}",
                    ctx.policy.max_prune
                ),
                (false, true) => format!(
                    "{pruning} domains, networks and pools, more than policy.max_prune = {}",
                    ctx.policy.max_prune
                ),
            };
            format!(
                "the commit would prune {why}; refused (check the manifest, or run `vmsync --once --allow-mass-prune`)"
            )
        });
    Plan {
        commit: commit.to_string(),
        create_directories,
        vms,
        prune,
        refused,
        foreign_tagged,
        resources,
        next_window: None,
    }
}

fn plan_prune(observed: &Observed, ctx: &Context, claimed: &[String]) -> Vec<PrunePlan> {
    observed
        .others
        .values()
        .filter(|d| !claimed.contains(&d.listing.name))
        // Only what this agent applied: a domain tagged by another vmsync (another
        // repository or state directory) is never pruned.
        .filter(|d| ctx.record.vms.contains_key(&d.listing.name))
        .map(|d| {
            let disks = d
                .inactive_xml
                .as_deref()
                .map(domain_xml::disk_sources)
                .unwrap_or_default();
            let skipped = if !d.listing.persistent {
                Some("transient domain; vmsync only prunes persistent domains".to_string())
            } else if !ctx.policy.prune {
                Some("not in the manifest for this host; left alone (policy.prune is off)".into())
            } else {
                None
            };
            let mut actions = Vec::new();
            if skipped.is_none() {
                if d.listing.active {
                    actions.push(Action::Stop {
                        timeout: ctx.policy.shutdown_timeout,
                    });
                }
                actions.push(Action::Undefine);
            }
            PrunePlan {
                name: d.listing.name.clone(),
                active: d.listing.active,
                actions,
                disks,
                skipped,
            }
        })
        .collect()
}

fn plan_vm(
    vm: &DesiredVm,
    observed: &Observed,
    commit: &str,
    ctx: &Context,
    claimed: &mut Vec<String>,
) -> VmPlan {
    let mut out = VmPlan::new(&vm.name, &vm.fingerprint, vm.libvirt_autostart(), vm.state);
    let heal = vm.self_heal.unwrap_or(ctx.policy.self_heal);
    let timeout = vm.shutdown_timeout.unwrap_or(ctx.policy.shutdown_timeout);

    let (seen, rename_from) = find_domain(vm, observed, claimed);
    if let Some(seen) = seen {
        if let Err(e) = may_touch(vm, seen) {
            return fail(out, e);
        }
        out.current_hash = seen.definition_hash.clone();
    }
    let drift = vm_drift(vm, ctx, seen, rename_from.is_some());
    out.drift = drift.iter().map(ToString::to_string).collect();
    out.drift_reported_only = !drift.is_empty() && !heal;
    let mut planner = VmPlanner {
        vm,
        seen,
        rename_from,
        drift,
        heal,
        timeout,
        out,
    };
    if planner.has(|d| matches!(d, Drift::Undefined)) && !heal {
        return planner.out;
    }
    match planner.plan_actions(observed, commit) {
        Ok(()) => planner.out,
        Err(e) => fail(planner.out, e),
    }
}

/// The domain by name, or a tagged domain of another name with the VM's UUID (then
/// claimed, and the name it is renamed from).
fn find_domain<'o>(
    vm: &DesiredVm,
    observed: &'o Observed,
    claimed: &mut Vec<String>,
) -> (Option<&'o SeenDomain>, Option<String>) {
    let seen = observed.domains.get(&vm.name);
    if seen.is_none()
        && let Some(uuid) = &vm.summary.uuid
        && let Some(other) = observed
            .others
            .values()
            .find(|o| o.listing.uuid.eq_ignore_ascii_case(uuid))
    {
        claimed.push(other.listing.name.clone());
        return (Some(other), Some(other.listing.name.clone()));
    }
    (seen, None)
}

/// Whether vmsync may touch the existing domain `seen`: its definition is readable, it
/// is vmsync's (or adopted), persistent, and its UUID does not clash.
fn may_touch(vm: &DesiredVm, seen: &SeenDomain) -> Result<(), String> {
    match &seen.inactive {
        None => {
            return Err(format!(
                "could not read the definition of existing domain '{}'; not touching it",
                seen.listing.name
            ));
        }
        Some(summary) if summary.tag.is_none() && !vm.adopt => {
            return Err(format!(
                "domain '{}' exists but was not defined by vmsync (no vmsync metadata); refusing to touch it (set adopt = true on its entry to take it over)",
                vm.name
            ));
        }
        Some(_) if !seen.listing.persistent => {
            return Err(format!(
                "domain '{}' is transient; refusing to touch it",
                seen.listing.name
            ));
        }
        Some(_) => {}
    }
    match adopt::uuid_conflict(vm, seen) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Drift against the record of the last sync (not for a domain being renamed: its
/// record is under its old name), less what the commit changes anyway.
fn vm_drift(
    vm: &DesiredVm,
    ctx: &Context,
    seen: Option<&SeenDomain>,
    renaming: bool,
) -> Vec<Drift> {
    let current = seen
        .and_then(|s| s.inactive.as_ref())
        .and_then(|s| s.tag.as_ref());
    let drift = match ctx.record.vms.get(&vm.name) {
        Some(rec) if !renaming => drift::detect(
            rec,
            drift::Now {
                listing: seen.map(|s| &s.listing),
                tag_fingerprint: current.map(|t| t.fingerprint.as_str()),
                definition_hash: seen.and_then(|s| s.definition_hash.as_deref()),
            },
        ),
        _ => Vec::new(),
    };
    drift::against_commit(drift, vm.libvirt_autostart(), vm.state)
}

/// What the steps of planning one VM share, once its domain is found and may be touched.
struct VmPlanner<'a> {
    vm: &'a DesiredVm,
    /// The VM's domain, when one exists.
    seen: Option<&'a SeenDomain>,
    /// The domain's name when it has this VM's UUID under another name.
    rename_from: Option<String>,
    drift: Vec<Drift>,
    /// Whether drift is healed.
    heal: bool,
    /// The graceful shutdown's limit.
    timeout: std::time::Duration,
    out: VmPlan,
}

impl VmPlanner<'_> {
    /// Whether some drift is of this kind.
    fn has(&self, pred: fn(&Drift) -> bool) -> bool {
        self.drift.iter().any(pred)
    }

    /// The inactive definition's summary, when a domain exists.
    fn summary(&self) -> Option<&domain_xml::DomainSummary> {
        self.seen.and_then(|s| s.inactive.as_ref())
    }

    /// Plans the disks, the rename, the definition, the autostart flag and the power
    /// state, in that order. `Err`: the VM fails.
    fn plan_actions(&mut self, observed: &Observed, commit: &str) -> Result<(), String> {
        self.plan_disks(observed)?;
        self.plan_seed(observed);
        let was_active = self.seen.is_some_and(|s| s.listing.active);
        let active = self.plan_rename(was_active)?;
        let adopted_live = self.plan_definition(commit)?;

        let autostart_now = self.seen.is_some_and(|s| s.listing.autostart);
        let autostart_drift = self.has(|d| matches!(d, Drift::Autostart { .. }));
        let autostart = self.vm.libvirt_autostart();
        if autostart != autostart_now && (self.heal || !autostart_drift) {
            self.out.actions.push(Action::SetAutostart(autostart));
        }
        self.plan_power(active, was_active, adopted_live);
        Ok(())
    }

    /// Missing disks are created; an existing one is checked, never changed.
    fn plan_disks(&mut self, observed: &Observed) -> Result<(), String> {
        for disk in &self.vm.disks {
            match observed.disks.get(&disk.path) {
                Some(Ok(None)) => {
                    if let Some(image) = &disk.image
                        && !observed.images.get(&image.file).copied().unwrap_or(false)
                        && !self
                            .out
                            .actions
                            .contains(&Action::DownloadImage(image.clone()))
                    {
                        self.out.actions.push(Action::DownloadImage(image.clone()));
                    }
                    self.out.actions.push(Action::CreateDisk(disk.clone()));
                }
                Some(Ok(Some(info))) => match check_existing(disk, info) {
                    Ok(None) => {}
                    Ok(Some(warning)) => self.out.warnings.push(warning),
                    Err(e) => return Err(e.to_string()),
                },
                Some(Err(e)) => return Err(e.clone()),
                None => {
                    return Err(format!("disk '{}' was not observed", disk.path.display()));
                }
            }
        }
        Ok(())
    }

    /// The cloud-init seed is written when it is missing, or when its content changed
    /// (not with `on_change = "never"`: the first seed is kept). An unchanged seed is
    /// left alone, file and all.
    fn plan_seed(&mut self, observed: &Observed) {
        let Some(seed) = &self.vm.seed else {
            return;
        };
        let on_host = observed.seed_on_host(seed);
        if seed.must_write(on_host) {
            self.out.actions.push(Action::WriteSeed {
                seed: Box::new(seed.clone()),
                replaces: on_host.is_some(),
            });
        }
    }

    /// Whether a running domain whose definition differs is restarted: for a change of
    /// the definition by the VM's `on_change`, for a changed seed by the seed's.
    fn restarts(&self) -> bool {
        let vm = self.vm;
        let Some(live) = self.seen.and_then(|s| s.live_tag.as_ref()) else {
            return vm.on_change == OnChange::Restart;
        };
        let (live_def, live_seed) = seed_spec::split_fingerprint(&live.fingerprint);
        let (def, seed) = seed_spec::split_fingerprint(&vm.fingerprint);
        (live_def != def && vm.on_change == OnChange::Restart)
            || (live_seed != seed
                && vm
                    .seed
                    .as_ref()
                    .is_some_and(|s| s.on_change == SeedOnChange::Restart))
    }

    /// A domain with this VM's UUID under another name is renamed (shut down first with
    /// `on_change = "restart"`). Returns whether the domain is still active.
    fn plan_rename(&mut self, active: bool) -> Result<bool, String> {
        let Some(from) = &self.rename_from else {
            return Ok(active);
        };
        let restart = self.vm.on_change == OnChange::Restart;
        if active && !restart {
            return Err(format!(
                "domain '{from}' has this vm's uuid and is running; libvirt renames only shut-off domains: shut it down, or set on_change = \"restart\""
            ));
        }
        if active {
            self.out.actions.push(Action::Stop {
                timeout: self.timeout,
            });
        }
        self.out.actions.push(Action::Rename { from: from.clone() });
        Ok(false)
    }

    /// Renders the definition when it changed or drifted, and defines or adopts it.
    /// Returns whether an adoption tags the running definition too.
    fn plan_definition(&mut self, commit: &str) -> Result<bool, String> {
        let vm = self.vm;
        let seen = self.seen;
        // An untagged domain here is one `adopt = true` takes over (others failed before).
        let adopting = self.summary().is_some_and(|s| s.tag.is_none());
        let current = self.summary().and_then(|s| s.tag.as_ref());
        let definition_drift = self.has(|d| matches!(d, Drift::Definition | Drift::Untagged));
        let changed = current.is_none_or(|tag| tag.fingerprint != vm.fingerprint);
        let redefine = changed || self.rename_from.is_some() || (definition_drift && self.heal);
        if !(redefine || definition_drift) {
            return Ok(false);
        }
        let tag = Tag {
            commit: commit.to_string(),
            fingerprint: vm.fingerprint.clone(),
        };
        let uuid = self.summary().and_then(|s| s.uuid.as_deref());
        let macs = self.summary().map(|s| s.macs.clone()).unwrap_or_default();
        let xml = domain_xml::render(&vm.xml, uuid, &macs, &tag)
            .map_err(|e| format!("failed to render the domain xml: {}", e.message))?;
        let out = &mut self.out;
        // The diff's inputs, only for a definition that is rendered.
        out.source_xml = vm.xml.clone();
        out.current_xml = seen.and_then(|s| s.inactive_xml.clone());
        let mut adopted_live = false;
        // One copy: a planned define carries it (see `VmPlan::rendered`).
        if adopting && definition_drift && !self.heal {
            // Applied before, then redefined by hand without the tag: drift, only
            // reported with self-heal off.
            out.rendered_xml = Some(xml);
        } else if adopting {
            let adopt = adopt::action(seen, tag.clone(), xml);
            if matches!(
                adopt,
                Action::Adopt {
                    xml: None,
                    live: true,
                    ..
                }
            ) {
                // The running definition gets the tag too: no pending restart.
                adopted_live = true;
            }
            out.actions.push(adopt);
        } else if redefine {
            out.actions.push(Action::Define {
                xml,
                redefine: seen.is_some(),
            });
        } else {
            out.rendered_xml = Some(xml);
        }
        Ok(adopted_live)
    }

    /// Starts, stops or restarts the domain for its `state` and `on_change`, and notes a
    /// pending restart.
    fn plan_power(&mut self, mut active: bool, was_active: bool, adopted_live: bool) {
        let vm = self.vm;
        let timeout = self.timeout;
        let heal = self.heal;
        let restart = self.restarts();
        self.out.active = active;
        let power_drift = self.has(|d| matches!(d, Drift::Power { .. }));
        // The running definition is older than the commit's.
        let live_differs = active
            && !adopted_live
            && self
                .seen
                .and_then(|s| s.live_tag.as_ref())
                .is_none_or(|tag| tag.fingerprint != vm.fingerprint);
        // vmsync is the autostart of a VM in a dependency graph: found shut off (after a
        // boot), it is started even with self-heal off.
        let ordered_autostart = vm.autostart && vm.order.in_graph;
        let actions = &mut self.out.actions;
        match vm.state {
            // Drift in the power state is only reported when self-heal is off.
            PowerState::Running if !active && (heal || !power_drift || ordered_autostart) => {
                actions.push(Action::Start);
            }
            PowerState::Stopped if active && (heal || !power_drift) => {
                actions.push(Action::Stop { timeout });
                active = false;
            }
            PowerState::Running if !active => {}
            PowerState::Stopped if active => {}
            PowerState::Defined if !active && was_active && self.rename_from.is_some() => {
                // Shut down only to be renamed: back up as it was.
                actions.push(Action::Start);
            }
            PowerState::Running | PowerState::Defined if live_differs && restart => {
                actions.push(Action::Restart { timeout });
                active = false;
            }
            _ => {}
        }
        self.out.pending_restart = active && live_differs;
    }
}

/// Marks the VM failed: nothing of it is done.
fn fail(mut out: VmPlan, error: String) -> VmPlan {
    out.error = Some(error);
    out.actions.clear();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::disk_spec::DiskFormat;
    use crate::desired::disk_spec::DiskSpec;
    use crate::desired::domain_xml::fingerprint;
    use crate::host::disk::ImageInfo;
    use crate::host::hypervisor::Listing;
    use crate::host::observe_domains::SeenDomain;
    use crate::reconcile::plan_types::ActionKind;
    use crate::record::VmRecord;
    use std::path::PathBuf;
    use std::time::Duration;

    const UUID: &str = "6a3f4c1e-0b2d-4e5f-8a9b-0c1d2e3f4a5b";
    const OTHER_UUID: &str = "11111111-2222-3333-4444-555555555555";

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
            on_change: OnChange::Defer,
            state: if autostart {
                PowerState::Running
            } else {
                PowerState::Defined
            },
            shutdown_timeout: None,
            self_heal: None,
            adopt: false,
            health: None,
            order: Default::default(),
            seed: None,
        }
    }

    /// A seed whose content is `content`.
    fn seed_of(content: &str, on_change: SeedOnChange) -> seed_spec::SeedSpec {
        let hash = format!("{:0<64}", hex::encode(content));
        seed_spec::SeedSpec {
            path: "/seeds/web-cidata.iso".into(),
            target: "sda".into(),
            content: Some(seed_spec::SeedContent {
                user_data: content.as_bytes().to_vec(),
                meta_data: Vec::new(),
                network_config: None,
            }),
            instance_id: format!("iid-{}", &hash[..16]),
            hash,
            on_change,
            has_secret: true,
        }
    }

    /// `vm` with a seed of `content`.
    fn seeded(mut vm: DesiredVm, content: &str, on_change: SeedOnChange) -> DesiredVm {
        let seed = seed_of(content, on_change);
        vm.fingerprint = fingerprint(&vm.xml) + &seed.fingerprint_part();
        vm.seed = Some(seed);
        vm
    }

    /// A desired VM whose XML gives `uuid`.
    fn with_uuid(mut vm: DesiredVm, uuid: &str) -> DesiredVm {
        vm.xml = vm
            .xml
            .replace("</name>", &format!("</name><uuid>{uuid}</uuid>"));
        vm.summary = domain_xml::summarize(&vm.xml).unwrap();
        vm.fingerprint = fingerprint(&vm.xml);
        vm
    }

    fn restart(mut vm: DesiredVm) -> DesiredVm {
        vm.on_change = OnChange::Restart;
        vm.shutdown_timeout = Some(Duration::from_secs(3));
        vm
    }

    fn state(mut vm: DesiredVm, state: PowerState) -> DesiredVm {
        vm.state = state;
        vm
    }

    fn disk(path: &str) -> DiskSpec {
        DiskSpec {
            path: path.into(),
            size_bytes: 1 << 30,
            format: DiskFormat::Qcow2,
            backing: None,
            backing_format: None,
            image: None,
        }
    }

    /// A domain as libvirt would report it after vmsync defined `memory` at "old".
    fn seen(name: &str, memory: u32, active: bool, autostart: bool, tagged: bool) -> SeenDomain {
        seen_with(name, UUID, memory, active, autostart, tagged)
    }

    fn seen_with(
        name: &str,
        uuid: &str,
        memory: u32,
        active: bool,
        autostart: bool,
        tagged: bool,
    ) -> SeenDomain {
        let tag = Tag {
            commit: "old".into(),
            fingerprint: fingerprint(&source(name, memory)),
        };
        let xml = if tagged {
            domain_xml::render(
                &source(name, memory).replace(
                    "<interface type='user'/>",
                    "<disk type='file' device='disk'><source file='/srv/images/old.qcow2'/></disk><interface type='user'/>",
                ),
                Some(uuid),
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
                uuid: uuid.into(),
                active,
                autostart,
                persistent: true,
            },
            live_tag: if active { summary.tag.clone() } else { None },
            inactive: Some(summary),
            definition_hash: Some("baseline".into()),
            inactive_xml: Some(xml),
        }
    }

    /// A domain an operator defined by hand from `source(name, memory)`: libvirt's
    /// inactive XML with its UUID and a MAC, no tag.
    fn hand_made(name: &str, memory: u32, active: bool, autostart: bool) -> SeenDomain {
        let xml = source(name, memory)
            .replace("</name>", &format!("</name><uuid>{UUID}</uuid>"))
            .replace(
                "<interface type='user'/>",
                "<interface type='user'><mac address='52:54:00:12:34:56'/></interface>",
            );
        let mut d = seen(name, memory, active, autostart, false);
        d.inactive = Some(domain_xml::summarize(&xml).unwrap());
        d.inactive_xml = Some(xml);
        d
    }

    fn adopting(mut vm: DesiredVm) -> DesiredVm {
        vm.adopt = true;
        vm
    }

    /// `seen` after someone edited the definition (`virsh edit` keeps the tag).
    fn edited(mut d: SeenDomain) -> SeenDomain {
        d.definition_hash = Some("edited".into());
        d
    }

    /// The record of a sync that applied `vm` as it is now.
    fn applied(vm: &DesiredVm) -> VmRecord {
        VmRecord {
            applied_commit: Some("old".into()),
            fingerprint: Some(vm.fingerprint.clone()),
            autostart: vm.autostart,
            ok: true,
            definition_hash: Some("baseline".into()),
            state: Some(vm.state),
            ..Default::default()
        }
    }

    fn observed(
        domains: Vec<SeenDomain>,
        others: Vec<SeenDomain>,
        disks: Vec<(&str, Option<&str>)>,
    ) -> Observed {
        let by_name =
            |v: Vec<SeenDomain>| v.into_iter().map(|d| (d.listing.name.clone(), d)).collect();
        Observed {
            domains: by_name(domains),
            others: by_name(others),
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
            images: Default::default(),
            seeds: Default::default(),
            seed_files: Default::default(),
            resources: Default::default(),
        }
    }

    fn kinds(actions: &[Action]) -> Vec<String> {
        actions.iter().map(Action::describe).collect()
    }

    struct Case {
        what: &'static str,
        want: DesiredVm,
        have: Vec<SeenDomain>,
        others: Vec<SeenDomain>,
        disks: Vec<(&'static str, Option<&'static str>)>,
        /// Whether the record says the VM was applied as wanted, but at "old".
        record: Option<VmRecord>,
        self_heal: bool,
        actions: Vec<&'static str>,
        pending_restart: bool,
        drift: Vec<&'static str>,
        error: Option<&'static str>,
    }

    fn case(what: &'static str, want: DesiredVm) -> Case {
        Case {
            what,
            want,
            have: vec![],
            others: vec![],
            disks: vec![],
            record: None,
            self_heal: true,
            actions: vec![],
            pending_restart: false,
            drift: vec![],
            error: None,
        }
    }

    #[test]
    fn planner_table() {
        let d = "/srv/images/web.qcow2";
        let stop3 = "stop (graceful shutdown, destroy after 3s)";
        let restart3 = "restart (graceful shutdown, destroy after 3s)";
        let web = |memory, autostart| desired_vm("web", memory, autostart, vec![]);
        let cases = vec![
            Case {
                have: vec![],
                disks: vec![(d, None)],
                actions: vec![
                    "create qcow2 disk '/srv/images/web.qcow2' (1 GiB)",
                    "define",
                    "set autostart",
                    "start",
                ],
                ..case(
                    "new vm, autostart: disk, define, autostart, start",
                    desired_vm("web", 1024, true, vec![disk(d)]),
                )
            },
            Case {
                actions: vec!["define"],
                ..case("new vm without autostart: define only", web(1024, false))
            },
            Case {
                actions: vec!["define", "start"],
                ..case(
                    "new vm, state running without autostart: define, start",
                    state(web(1024, false), PowerState::Running),
                )
            },
            Case {
                actions: vec!["define"],
                ..case(
                    "new vm, state stopped: define only",
                    state(web(1024, false), PowerState::Stopped),
                )
            },
            Case {
                have: vec![seen("web", 1024, true, true, true)],
                disks: vec![(d, Some("qcow2"))],
                ..case(
                    "unchanged and running: nothing",
                    desired_vm("web", 1024, true, vec![disk(d)]),
                )
            },
            Case {
                have: vec![seen("web", 1024, true, true, true)],
                actions: vec!["redefine in place"],
                pending_restart: true,
                ..case(
                    "changed while running, defer: redefine, pending restart",
                    web(2048, true),
                )
            },
            Case {
                have: vec![seen("web", 1024, true, true, true)],
                actions: vec!["redefine in place", restart3],
                ..case(
                    "changed while running, restart: redefine, graceful restart",
                    restart(web(2048, true)),
                )
            },
            Case {
                have: vec![seen("web", 1024, true, false, true)],
                actions: vec!["redefine in place", restart3],
                ..case(
                    "changed while running, state defined, restart: restart too",
                    restart(web(2048, false)),
                )
            },
            Case {
                have: vec![seen("web", 1024, false, true, true)],
                actions: vec!["redefine in place", "start"],
                ..case(
                    "changed while stopped, autostart: redefine then start",
                    restart(web(2048, true)),
                )
            },
            Case {
                have: vec![seen("web", 1024, true, true, true)],
                actions: vec!["clear autostart"],
                ..case(
                    "autostart turned off: clear flag, never stop",
                    web(1024, false),
                )
            },
            Case {
                have: vec![seen("web", 1024, false, false, true)],
                actions: vec!["set autostart", "start"],
                ..case("autostart turned on: set flag, start", web(1024, true))
            },
            Case {
                have: vec![seen("web", 1024, true, false, true)],
                actions: vec![stop3],
                ..case(
                    "state stopped while running: graceful stop",
                    restart(state(web(1024, false), PowerState::Stopped)),
                )
            },
            Case {
                have: vec![seen("web", 2048, true, false, true)],
                actions: vec!["redefine in place", stop3],
                ..case(
                    "changed and state stopped: redefine, stop (no restart)",
                    restart(state(web(1024, false), PowerState::Stopped)),
                )
            },
            Case {
                have: vec![seen("web", 1024, false, true, true)],
                actions: vec!["start"],
                ..case("stopped, never applied before: start", web(1024, true))
            },
            Case {
                have: vec![seen("web", 1024, false, true, true)],
                record: Some(applied(&web(1024, true))),
                actions: vec!["start"],
                drift: vec!["domain is shut off, committed state running"],
                ..case("stopped by hand, self-heal: start again", web(1024, true))
            },
            Case {
                have: vec![seen("web", 1024, false, true, true)],
                record: Some(applied(&web(1024, true))),
                self_heal: false,
                drift: vec!["domain is shut off, committed state running"],
                ..case(
                    "stopped by hand, no self-heal: report only",
                    web(1024, true),
                )
            },
            Case {
                have: vec![seen("web", 1024, true, false, true)],
                record: Some(applied(&web(1024, true))),
                self_heal: false,
                drift: vec!["autostart is off, committed on"],
                ..case(
                    "autostart cleared by hand, no self-heal: report",
                    web(1024, true),
                )
            },
            Case {
                have: vec![seen("web", 1024, true, false, true)],
                record: Some(applied(&web(1024, true))),
                actions: vec!["set autostart"],
                drift: vec!["autostart is off, committed on"],
                ..case(
                    "autostart cleared by hand, self-heal: set again",
                    web(1024, true),
                )
            },
            Case {
                have: vec![edited(seen("web", 1024, true, true, true))],
                record: Some(applied(&web(1024, true))),
                actions: vec!["redefine in place"],
                drift: vec!["definition changed outside vmsync"],
                ..case(
                    "virsh edit, self-heal: redefine (running one keeps the committed live definition)",
                    web(1024, true),
                )
            },
            Case {
                have: vec![edited(seen("web", 1024, true, true, true))],
                record: Some(applied(&web(1024, true))),
                self_heal: false,
                drift: vec!["definition changed outside vmsync"],
                ..case("virsh edit, no self-heal: report only", web(1024, true))
            },
            Case {
                have: vec![edited(seen("web", 1024, true, true, true))],
                record: Some(applied(&web(1024, true))),
                self_heal: false,
                actions: vec!["redefine in place"],
                pending_restart: true,
                drift: vec!["definition changed outside vmsync"],
                ..case(
                    "virsh edit and a new commit, no self-heal: the commit still applies",
                    web(2048, true),
                )
            },
            Case {
                record: Some(applied(&web(1024, true))),
                actions: vec!["define", "set autostart", "start"],
                drift: vec!["domain is not defined"],
                ..case(
                    "undefined by hand, self-heal: define again",
                    web(1024, true),
                )
            },
            Case {
                record: Some(applied(&web(1024, true))),
                self_heal: false,
                drift: vec!["domain is not defined"],
                ..case(
                    "undefined by hand, no self-heal: report only",
                    web(1024, true),
                )
            },
            Case {
                others: vec![seen_with("old-web", UUID, 1024, false, false, true)],
                actions: vec!["rename from 'old-web'", "redefine in place"],
                ..case(
                    "renamed in the manifest, same uuid, shut off: rename, redefine",
                    with_uuid(web(1024, false), UUID),
                )
            },
            Case {
                others: vec![seen_with("old-web", UUID, 1024, true, true, true)],
                actions: vec![stop3, "rename from 'old-web'", "redefine in place", "start"],
                ..case(
                    "renamed while running, restart: stop, rename, redefine, start",
                    restart(with_uuid(web(1024, true), UUID)),
                )
            },
            Case {
                others: vec![seen_with("old-web", UUID, 1024, true, true, true)],
                error: Some("libvirt renames only shut-off domains"),
                ..case(
                    "renamed while running, defer: error, nothing done",
                    with_uuid(web(1024, true), UUID),
                )
            },
            Case {
                others: vec![seen_with("old-web", OTHER_UUID, 1024, false, false, true)],
                actions: vec!["define"],
                ..case(
                    "another uuid: not a rename, a new domain",
                    with_uuid(web(1024, false), UUID),
                )
            },
            Case {
                have: vec![seen("web", 1024, false, false, false)],
                disks: vec![(d, None)],
                error: Some("not defined by vmsync"),
                ..case(
                    "domain made by hand with the same name: conflict, nothing done",
                    desired_vm("web", 1024, true, vec![disk(d)]),
                )
            },
            Case {
                have: vec![hand_made("web", 1024, false, false)],
                actions: vec!["adopt (tag only: the definition is the commit's)"],
                ..case(
                    "adopt, the commit's xml is the domain's: the tag only",
                    adopting(web(1024, false)),
                )
            },
            Case {
                have: vec![hand_made("web", 1024, true, true)],
                actions: vec!["adopt (tag only: the definition is the commit's)"],
                ..case(
                    "adopt a running domain unchanged: tagged live too, no pending restart",
                    adopting(web(1024, true)),
                )
            },
            Case {
                have: vec![hand_made("web", 512, true, true)],
                actions: vec!["adopt (redefine in place)"],
                pending_restart: true,
                ..case(
                    "adopt with a changed definition: redefined in place, pending restart",
                    adopting(web(1024, true)),
                )
            },
            Case {
                have: vec![hand_made("web", 1024, false, false)],
                error: Some(
                    "domain 'web' has uuid 6a3f4c1e-0b2d-4e5f-8a9b-0c1d2e3f4a5b, but the commit's xml says 11111111-2222-3333-4444-555555555555; not adopted",
                ),
                ..case(
                    "adopt with another uuid in the commit: error, nothing done",
                    adopting(with_uuid(web(1024, false), OTHER_UUID)),
                )
            },
            Case {
                have: vec![hand_made("web", 1024, false, false)],
                record: Some(applied(&web(1024, false))),
                self_heal: false,
                drift: vec!["domain has no vmsync metadata"],
                ..case(
                    "adopted before, redefined by hand untagged, self-heal off: reported only",
                    adopting(web(1024, false)),
                )
            },
            Case {
                have: vec![hand_made("web", 1024, false, false)],
                record: Some(applied(&web(1024, false))),
                actions: vec!["adopt (tag only: the definition is the commit's)"],
                drift: vec!["domain has no vmsync metadata"],
                ..case(
                    "adopted before, redefined by hand untagged, self-heal on: adopted again",
                    adopting(web(1024, false)),
                )
            },
            Case {
                have: vec![seen("web", 1024, false, false, true)],
                record: Some(applied(&web(1024, false))),
                actions: vec![],
                ..case(
                    "adopt left in the manifest once adopted: nothing to do",
                    adopting(web(1024, false)),
                )
            },
            Case {
                disks: vec![(d, Some("raw"))],
                error: Some("is raw, but the manifest says qcow2"),
                ..case(
                    "existing disk of another format: error, nothing done",
                    desired_vm("web", 1024, true, vec![disk(d)]),
                )
            },
        ];
        for case in cases {
            let desired = Desired {
                directories: vec![],
                vms: vec![case.want],
                resources: Default::default(),
                windows: Vec::new(),
            };
            let mut record = Record::default();
            if let Some(rec) = case.record {
                record.vms.insert("web".into(), rec);
            }
            let policy = ChangePolicy {
                self_heal: case.self_heal,
                ..Default::default()
            };
            let ctx = Context {
                policy: &policy,
                record: &record,
            };
            let obs = observed(case.have, case.others, case.disks);
            let p = plan(&desired, &obs, "new", &ctx);
            let vm = &p.vms[0];
            assert_eq!(kinds(&vm.actions), case.actions, "{}", case.what);
            assert_eq!(vm.pending_restart, case.pending_restart, "{}", case.what);
            assert_eq!(vm.drift, case.drift, "{}", case.what);
            match case.error {
                None => assert_eq!(vm.error, None, "{}", case.what),
                Some(text) => assert!(
                    vm.error.as_deref().unwrap_or("").contains(text),
                    "{}: {:?}",
                    case.what,
                    vm.error
                ),
            }
            assert!(p.refused.is_none(), "{}", case.what);
            if !p.prune.is_empty() {
                assert!(
                    p.prune.iter().all(|p| p.actions.is_empty()),
                    "{}",
                    case.what
                );
            }
        }
    }

    fn prune_ctx(prune: bool, max_prune: usize, allow: bool) -> ChangePolicy {
        ChangePolicy {
            prune,
            max_prune,
            allow_mass_prune: allow,
            shutdown_timeout: Duration::from_secs(3),
            ..Default::default()
        }
    }

    fn plan_with(desired: &Desired, obs: &Observed, policy: &ChangePolicy) -> Plan {
        // The agent applied every domain observed.
        let mut record = Record::default();
        for name in obs.domains.keys().chain(obs.others.keys()) {
            record.vms.insert(name.clone(), VmRecord::default());
        }
        plan(
            desired,
            obs,
            "new",
            &Context {
                policy,
                record: &record,
            },
        )
    }

    #[test]
    fn pruning_only_tagged_domains_with_guards() {
        let desired = Desired {
            directories: vec![],
            vms: vec![desired_vm("web", 1024, false, vec![])],
            resources: Default::default(),
            windows: Vec::new(),
        };
        let gone = |name: &str, active| seen_with(name, OTHER_UUID, 512, active, false, true);
        let obs = observed(
            vec![seen("web", 1024, false, false, true)],
            vec![gone("old-a", true), gone("old-b", false)],
            vec![],
        );

        // Off (the default): listed, left alone.
        let p = plan_with(&desired, &obs, &prune_ctx(false, 5, false));
        assert!(p.is_noop() && p.refused.is_none());
        assert_eq!(p.prune.len(), 2);
        assert!(
            p.prune[0]
                .skipped
                .as_deref()
                .unwrap()
                .contains("policy.prune is off")
        );

        // On: running ones stopped gracefully first; disks reported, never deleted.
        let p = plan_with(&desired, &obs, &prune_ctx(true, 5, false));
        assert_eq!(p.refused, None);
        assert_eq!(
            kinds(&p.prune[0].actions),
            vec![
                "stop (graceful shutdown, destroy after 3s)",
                "undefine (keeping NVRAM, TPM state and disks)"
            ]
        );
        assert_eq!(p.prune[0].actions[1].kind(), ActionKind::Undefine);
        assert_eq!(
            kinds(&p.prune[1].actions),
            vec!["undefine (keeping NVRAM, TPM state and disks)"]
        );
        assert_eq!(
            p.prune[1].disks,
            vec![PathBuf::from("/srv/images/old.qcow2")]
        );
        let json = serde_json::to_value(p.to_json()).unwrap();
        assert_eq!(json["orphaned_disks"].as_array().unwrap().len(), 2);
        assert_eq!(json["prune"][0]["actions"][0]["kind"], "stop");
        assert_eq!(json["prune"][0]["actions"][0]["timeout_seconds"], 3);

        // More than max_prune: refused unless allowed.
        let p = plan_with(&desired, &obs, &prune_ctx(true, 1, false));
        assert!(
            p.refused.as_deref().unwrap().contains("max_prune = 1"),
            "{:?}",
            p.refused
        );
        assert!(crate::reconcile::render::render(&p).contains("REFUSED"));
        assert!(
            plan_with(&desired, &obs, &prune_ctx(true, 1, true))
                .refused
                .is_none()
        );

        // Every managed domain: refused even under max_prune.
        let empty = Desired::default();
        let obs = observed(vec![], vec![gone("old-a", false)], vec![]);
        let p = plan_with(&empty, &obs, &prune_ctx(true, 5, false));
        assert!(
            p.refused
                .as_deref()
                .unwrap()
                .contains("every managed domain"),
            "{:?}",
            p.refused
        );
        assert!(
            plan_with(&empty, &obs, &prune_ctx(true, 5, true))
                .refused
                .is_none()
        );

        // A tagged domain this agent never applied (another repository or state
        // directory) is never pruned, nor counted.
        let obs = observed(
            vec![seen("web", 1024, false, false, true)],
            vec![gone("old-a", false), gone("foreign", false)],
            vec![],
        );
        let mut record = Record::default();
        record.vms.insert("web".into(), VmRecord::default());
        record.vms.insert("old-a".into(), VmRecord::default());
        let policy = prune_ctx(true, 5, false);
        let p = plan(
            &desired,
            &obs,
            "new",
            &Context {
                policy: &policy,
                record: &record,
            },
        );
        assert_eq!(p.prune.len(), 1);
        assert_eq!(p.prune[0].name, "old-a");
        assert_eq!(p.foreign_tagged, 1);
        assert!(
            p.refused.is_none(),
            "1 of 2 managed domains: {:?}",
            p.refused
        );
        assert!(
            crate::reconcile::render::render(&p).contains("1 other domain(s) carry vmsync's tag")
        );

        // A renamed domain is claimed, not pruned.
        let renamed = Desired {
            directories: vec![],
            vms: vec![with_uuid(
                desired_vm("web", 1024, false, vec![]),
                OTHER_UUID,
            )],
            resources: Default::default(),
            windows: Vec::new(),
        };
        let obs = observed(vec![], vec![gone("old-a", false)], vec![]);
        let p = plan_with(&renamed, &obs, &prune_ctx(true, 5, false));
        assert!(p.prune.is_empty());
        assert_eq!(p.vms[0].actions[0].kind(), ActionKind::Rename);
    }

    #[test]
    fn redefine_keeps_uuid_and_macs_and_tags_the_commit() {
        let desired = Desired {
            directories: vec![],
            vms: vec![desired_vm("web", 2048, false, vec![])],
            resources: Default::default(),
            windows: Vec::new(),
        };
        let p = plan_with(
            &desired,
            &observed(vec![seen("web", 1024, false, false, true)], vec![], vec![]),
            &ChangePolicy::default(),
        );
        let Action::Define {
            xml,
            redefine: true,
        } = &p.vms[0].actions[0]
        else {
            panic!("{:?}", p.vms[0].actions)
        };
        assert_eq!(p.vms[0].actions[0].kind(), ActionKind::Redefine);
        let s = domain_xml::summarize(xml).unwrap();
        assert_eq!(s.uuid.as_deref(), Some(UUID));
        assert_eq!(s.macs, vec![Some("52:54:00:12:34:56".to_string())]);
        assert_eq!(
            s.tag,
            Some(Tag {
                commit: "new".into(),
                fingerprint: desired.vms[0].fingerprint.clone()
            })
        );
    }

    #[test]
    fn a_held_back_definition_is_not_planned_again() {
        let obs = observed(vec![seen("web", 1024, true, true, true)], vec![], vec![]);
        let policy = ChangePolicy::default();
        let plan_for = |memory: u32, record: &Record| {
            let desired = Desired {
                directories: vec![],
                vms: vec![restart(desired_vm("web", memory, true, vec![]))],
                resources: Default::default(),
                windows: Vec::new(),
            };
            plan(
                &desired,
                &obs,
                "new",
                &Context {
                    policy: &policy,
                    record,
                },
            )
        };
        let mut rec = applied(&desired_vm("web", 1024, true, vec![]));
        rec.held_back = Some(crate::record::HeldBack {
            commit: "bad".into(),
            fingerprint: desired_vm("web", 2048, true, vec![]).fingerprint,
            reason: "health command exited with status 1".into(),
        });
        let mut record = Record::default();
        record.vms.insert("web".into(), rec);

        // The reverted definition: nothing planned, said why, shown in the health view.
        let p = plan_for(2048, &record);
        assert!(p.vms[0].actions.is_empty());
        assert!(
            p.vms[0].error.as_deref().unwrap().starts_with("held back:"),
            "{:?}",
            p.vms[0].error
        );
        let health = p.vms[0].health.as_ref().unwrap();
        assert_eq!(health.held_back.as_deref(), Some("bad"));
        assert!(crate::reconcile::render::render(&p).contains("held back: commit bad"));
        // A newer definition: planned as usual.
        let p = plan_for(4096, &record);
        assert_eq!(
            kinds(&p.vms[0].actions),
            vec![
                "redefine in place",
                "restart (graceful shutdown, destroy after 3s)"
            ]
        );
        assert_eq!(p.vms[0].error, None);
    }

    #[test]
    fn the_plan_shows_what_a_health_check_runs() {
        let mut vm = desired_vm("web", 1024, true, vec![]);
        vm.health = Some(crate::desired::health_spec::HealthSpec {
            settle: std::time::Duration::from_secs(30),
            command: Some(vec![
                "/usr/local/lib/vmsync/checks/web".into(),
                "--timeout".into(),
                "5\nx".into(),
            ]),
            timeout: std::time::Duration::from_secs(300),
            revert: true,
            guest_agent: false,
        });
        let desired = Desired {
            directories: vec![],
            vms: vec![vm],
            resources: Default::default(),
            windows: Vec::new(),
        };
        let obs = observed(vec![], vec![], vec![]);
        let p = plan_with(&desired, &obs, &ChangePolicy::default());
        let text = crate::reconcile::render::render(&p);
        assert!(
            text.contains("health: not checked; check: settle 30s, command '/usr/local/lib/vmsync/checks/web' '--timeout' '5\\nx' (no shell), timeout 5m, revert"),
            "{text}"
        );
    }

    #[test]
    fn missing_directories_are_created_and_noop_is_detected() {
        let desired = Desired {
            directories: vec!["/srv/images/ISOs".into()],
            vms: vec![desired_vm("web", 1024, false, vec![])],
            resources: Default::default(),
            windows: Vec::new(),
        };
        let mut obs = observed(vec![seen("web", 1024, false, false, true)], vec![], vec![]);
        let p = plan_with(&desired, &obs, &ChangePolicy::default());
        assert_eq!(
            p.create_directories,
            vec![PathBuf::from("/srv/images/ISOs")]
        );
        assert!(!p.is_noop());
        obs.directories.insert("/srv/images/ISOs".into(), true);
        let p = plan_with(&desired, &obs, &ChangePolicy::default());
        assert!(p.is_noop());
        assert!(crate::reconcile::render::render(&p).contains("web: nothing to do"));
        let json = serde_json::to_value(p.to_json()).unwrap();
        assert_eq!(json["noop"], true);
        assert_eq!(json["vms"][0]["actions"], serde_json::json!([]));
    }

    #[test]
    fn seeds_are_written_when_missing_or_changed_and_restart_as_their_on_change_says() {
        use SeedOnChange::{Never, NextBoot, Restart};
        // (on_change, seed applied before, seed on disk, planned kinds, pending restart)
        type Case<'a> = (
            SeedOnChange,
            &'a str,
            Option<&'a str>,
            &'a [ActionKind],
            bool,
        );
        let cases: &[Case] = &[
            // Unchanged: the file is left alone, nothing to do.
            (NextBoot, "pw-a", Some("pw-a"), &[], false),
            // A lost seed file is written again, nothing else.
            (NextBoot, "pw-a", None, &[ActionKind::WriteSeed], false),
            // Changed: rebuilt in place and redefined (same XML, new tag), never recreated.
            (
                NextBoot,
                "pw-a",
                Some("pw-a"),
                &[ActionKind::WriteSeed, ActionKind::Redefine],
                true,
            ),
            (
                Restart,
                "pw-a",
                Some("pw-a"),
                &[
                    ActionKind::WriteSeed,
                    ActionKind::Redefine,
                    ActionKind::Restart,
                ],
                false,
            ),
            // "never": the first seed is kept.
            (Never, "pw-a", Some("pw-a"), &[], false),
        ];
        for (i, (on_change, before, on_disk, kinds, pending)) in cases.iter().enumerate() {
            // Case 3 on: the commit's seed is "b".
            let now = if i >= 2 { "pw-b" } else { *before };
            let vm = seeded(desired_vm("web", 1024, true, vec![]), now, *on_change);
            let applied_vm = seeded(desired_vm("web", 1024, true, vec![]), before, *on_change);
            let mut d = seen("web", 1024, true, true, true);
            let tag = Tag {
                commit: "old".into(),
                fingerprint: applied_vm.fingerprint.clone(),
            };
            d.inactive.as_mut().unwrap().tag = Some(tag.clone());
            d.live_tag = Some(tag);
            let mut o = observed(vec![d], vec![], vec![]);
            if let Some(content) = on_disk {
                let disk_seed = seed_of(content, *on_change);
                o.seeds.insert(disk_seed.path.clone(), Some(disk_seed.hash));
            }
            let mut record = Record::default();
            record.vms.insert("web".into(), applied(&applied_vm));
            let policy = ChangePolicy::default();
            let ctx = Context {
                policy: &policy,
                record: &record,
            };
            let p = plan(
                &Desired {
                    vms: vec![vm],
                    ..Default::default()
                },
                &o,
                "new",
                &ctx,
            );
            let got: Vec<_> = p.vms[0].actions.iter().map(Action::kind).collect();
            assert_eq!(&got, kinds, "case {i}");
            assert_eq!(p.vms[0].pending_restart, *pending, "case {i}");
            if let Some(Action::WriteSeed { seed, replaces }) = p.vms[0].actions.first() {
                let shown = p.vms[0].actions[0].describe();
                assert_eq!(*replaces, on_disk.is_some(), "case {i}");
                assert!(shown.contains("secret, not shown"), "{shown}");
                let user_data = &seed.content.as_ref().unwrap().user_data;
                assert!(!shown.contains(&String::from_utf8_lossy(user_data).to_string()));
            }
        }
    }

    #[test]
    fn every_action_kind_has_one_name_for_json_and_metrics() {
        let image = crate::desired::disk_spec::ImageSpec {
            name: "debian".into(),
            line: 1,
            url: "https://example.org/debian.qcow2".into(),
            sha256: "0".repeat(64),
            format: DiskFormat::Qcow2,
            compression: crate::desired::disk_spec::Compression::None,
        };
        let all = [
            Action::DownloadImage(crate::desired::disk_spec::DiskImage::new(image, false)),
            Action::CreateDisk(disk("/srv/images/x.qcow2")),
            Action::WriteSeed {
                seed: Box::new(seed_of("a", SeedOnChange::NextBoot)),
                replaces: false,
            },
            Action::Rename { from: "a".into() },
            Action::Adopt {
                tag: Tag {
                    commit: "c".into(),
                    fingerprint: "f".into(),
                },
                xml: None,
                live: false,
            },
            Action::Define {
                xml: String::new(),
                redefine: false,
            },
            Action::Define {
                xml: String::new(),
                redefine: true,
            },
            Action::SetAutostart(true),
            Action::SetAutostart(false),
            Action::Start,
            Action::Restart {
                timeout: Duration::from_secs(120),
            },
            Action::Stop {
                timeout: Duration::from_secs(120),
            },
            Action::Undefine,
        ];
        // One action of each kind, in plan order: every kind but the directories'.
        let kinds: Vec<_> = all.iter().map(Action::kind).collect();
        let every: Vec<_> = <ActionKind as strum::IntoEnumIterator>::iter()
            .filter(|k| {
                // A network's, a pool's or a volume's kind is not an `Action`'s.
                let name = k.as_str();
                *k != ActionKind::CreateDirectory
                    && !["network", "pool", "volume"]
                        .iter()
                        .any(|r| name.contains(r))
            })
            .collect();
        assert_eq!(kinds, every);
        for kind in <ActionKind as strum::IntoEnumIterator>::iter() {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.as_str()),
                "the JSON name is the metrics label"
            );
        }
        assert_eq!(ActionKind::ClearAutostart.as_str(), "clear_autostart");
        assert_eq!(
            all.iter()
                .find(|a| matches!(a, Action::Restart { .. }))
                .map(Action::describe)
                .unwrap(),
            "restart (graceful shutdown, destroy after 2m)"
        );
    }
}
