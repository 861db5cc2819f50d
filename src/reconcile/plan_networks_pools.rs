//! Networks, storage pools and pool volumes: the pure plan (table-tested), applying it
//! in order (pools defined, built, started; then volumes; then networks; the domains
//! come after, and pruning of networks and pools after the domains'), and what the
//! record keeps of them.
//!
//! Rules, as for domains:
//! - vmsync touches only networks and pools it defined: a network carries vmsync's tag
//!   in `<metadata>`; a pool (its XML has no `<metadata>`) is vmsync's when the record
//!   holds its name with the UUID it has now. An entry naming one that is not vmsync's
//!   fails (nothing of it is done) unless it says `adopt = true`: it is then redefined in
//!   place with its UUID and from then on managed;
//! - a changed definition is redefined in place (the existing UUID inserted where the
//!   commit gives none); an active one keeps running on its old definition (pending
//!   restart) unless `on_change = "restart"`, which stops and starts it (the running VMs
//!   attached to it lose their link meanwhile, and are named);
//! - drift (definition, autostart flag, active state changed outside vmsync since the
//!   last sync) is healed with `policy.self_heal`, else only reported;
//! - volumes are created when missing, never changed or deleted;
//! - with `policy.prune`, an owned network or pool no longer in the manifest for this
//!   host is stopped and undefined; a pool's storage and volumes are never deleted.

use std::collections::{BTreeMap, BTreeSet};

use crate::desired::desired_state::{Desired, DesiredResource, DesiredVolume};
use crate::desired::domain_xml::Tag;
use crate::desired::manifest::OnChange;
use crate::desired::resource_xml::{self, ResourceKind};
use crate::desired::{disk_spec, values};
use crate::host::observe_domains::Observed;
use crate::host::observe_networks_pools;
use crate::host::observe_networks_pools::ObservedResources;
use crate::reconcile::plan_types::{ResAction, ResPlan, ResourcePlan, VolumePlan};
use crate::reconcile::policy;
use crate::record::{Record, ResourceRecord};

/// The record's entries of `kind`.
pub fn recorded(record: &Record, kind: ResourceKind) -> &BTreeMap<String, ResourceRecord> {
    match kind {
        ResourceKind::Network => &record.networks,
        ResourceKind::Pool => &record.pools,
    }
}

/// Whether vmsync owns what the host has: a tagged network; a pool whose UUID is the one
/// the record holds.
fn owned(
    kind: ResourceKind,
    seen: &observe_networks_pools::SeenResource,
    rec: Option<&ResourceRecord>,
) -> bool {
    match kind {
        ResourceKind::Network => seen.inactive.as_ref().is_some_and(|s| s.tag.is_some()),
        ResourceKind::Pool => rec
            .and_then(|r| r.uuid.as_deref())
            .is_some_and(|u| u.eq_ignore_ascii_case(&seen.listing.uuid)),
    }
}

/// Running desired VMs that use `name` (a network, or a pool through a volume).
fn users(kind: ResourceKind, name: &str, desired: &Desired, observed: &Observed) -> Vec<String> {
    desired
        .vms
        .iter()
        .filter(|vm| {
            observed
                .domains
                .get(&vm.name)
                .is_some_and(|d| d.listing.active)
        })
        .filter(|vm| {
            let refs = &vm.summary.refs;
            match kind {
                ResourceKind::Network => refs.networks.iter().any(|n| n == name),
                ResourceKind::Pool => refs.volumes.iter().any(|(p, _)| p == name),
            }
        })
        .map(|vm| vm.name.clone())
        .collect()
}

fn plan_one(
    r: &DesiredResource,
    desired: &Desired,
    observed: &Observed,
    commit: &str,
    record: &Record,
    heal: bool,
) -> ResPlan {
    let kind = r.kind;
    let obs = &observed.resources;
    let rec = recorded(record, kind).get(&r.name);
    let mut out = ResPlan {
        kind: Some(kind),
        name: r.name.clone(),
        fingerprint: r.fingerprint.clone(),
        autostart: r.autostart,
        pool_type: r.summary.pool_type.clone(),
        ..Default::default()
    };
    let seen = obs.seen.get(&(kind, r.name.clone()));
    let tag = Tag {
        commit: commit.to_string(),
        fingerprint: r.fingerprint.clone(),
    };
    let Some(seen) = seen else {
        return plan_new(r, &tag, out);
    };
    out.active = seen.listing.active;
    out.current_hash = seen.definition_hash.clone();
    out.uuid = Some(seen.listing.uuid.clone());
    let is_owned = match may_touch(r, seen, rec) {
        Ok(is_owned) => is_owned,
        Err(e) => return fail(out, e),
    };
    out.adopted = !is_owned;
    let existing = Existing {
        r,
        seen,
        rec,
        tag,
        is_owned,
        heal,
    };
    match existing.plan(&mut out) {
        Ok(true) => out.affected_vms = users(kind, &r.name, desired, observed),
        Ok(false) => {}
        Err(e) => return fail(out, e),
    }
    out
}

/// A network or pool not on the host: defined (a pool built), and started with
/// autostart.
fn plan_new(r: &DesiredResource, tag: &Tag, mut out: ResPlan) -> ResPlan {
    let kind = r.kind;
    match resource_xml::render(kind, &r.xml, None, tag) {
        Ok(xml) => out.actions.push(ResAction::Define {
            xml,
            redefine: false,
        }),
        Err(e) => {
            return fail(
                out,
                format!("failed to render the {kind} xml: {}", e.message),
            );
        }
    }
    if kind == ResourceKind::Pool {
        out.actions.push(ResAction::Build);
    }
    if r.autostart {
        out.actions.push(ResAction::SetAutostart(true));
        out.actions.push(ResAction::Start);
    }
    out.source_xml = r.xml.clone();
    out
}

/// Whether vmsync may touch the existing network or pool: its definition is readable,
/// it is persistent, and it is vmsync's or adopted. `Ok`: whether vmsync owns it.
fn may_touch(
    r: &DesiredResource,
    seen: &observe_networks_pools::SeenResource,
    rec: Option<&ResourceRecord>,
) -> Result<bool, String> {
    let kind = r.kind;
    if seen.inactive.is_none() {
        return Err(format!(
            "could not read the definition of existing {kind} '{}'; not touching it",
            r.name
        ));
    }
    if !seen.listing.persistent {
        return Err(format!(
            "{kind} '{}' is transient; refusing to touch it",
            r.name
        ));
    }
    let is_owned = owned(kind, seen, rec);
    if !is_owned && !r.adopt {
        let how = match kind {
            ResourceKind::Network => "no vmsync metadata",
            ResourceKind::Pool => "its uuid is not the one vmsync recorded",
        };
        return Err(format!(
            "exists but was not defined by vmsync ({how}); refusing to touch it (set adopt = true on the [[{kind}]] entry to take it over)"
        ));
    }
    Ok(is_owned)
}

/// An existing network or pool vmsync may touch, and what planning it needs.
struct Existing<'a> {
    r: &'a DesiredResource,
    seen: &'a observe_networks_pools::SeenResource,
    rec: Option<&'a ResourceRecord>,
    tag: Tag,
    is_owned: bool,
    heal: bool,
}

impl Existing<'_> {
    /// Plans the definition, the autostart flag, starting and restarting. `Ok(true)`:
    /// a restart is planned (the VMs using it are affected); `Err`: it fails.
    fn plan(&self, out: &mut ResPlan) -> Result<bool, String> {
        let (r, seen, heal) = (self.r, self.seen, self.heal);
        let kind = r.kind;
        let drift = self.drift();
        out.drift_reported_only = !drift.is_empty() && !heal;
        let definition_drift = drift.iter().any(|d| d.starts_with("definition"));
        let autostart_drift = drift.iter().any(|d| d.starts_with("autostart"));
        let active_drift = drift.iter().any(|d| d.starts_with("stopped"));
        out.drift = drift;

        let uuid = seen
            .inactive
            .as_ref()
            .and_then(|s| s.uuid.clone())
            .unwrap_or_else(|| seen.listing.uuid.clone());
        let same_definition = self.same_definition(&uuid);
        let redefine = self.changed(same_definition) || (definition_drift && heal);
        if redefine {
            let xml = resource_xml::render(kind, &r.xml, Some(&uuid), &self.tag)
                .map_err(|e| format!("failed to render the {kind} xml: {}", e.message))?;
            out.actions.push(ResAction::Define {
                xml,
                redefine: true,
            });
            out.source_xml = r.xml.clone();
            out.current_xml = seen.inactive_xml.clone();
        }
        if r.autostart != seen.listing.autostart && (heal || !autostart_drift) {
            out.actions.push(ResAction::SetAutostart(r.autostart));
        }
        let mut active = seen.listing.active;
        if r.autostart && !active && (heal || !active_drift) {
            if kind == ResourceKind::Pool {
                out.actions.push(ResAction::Build);
            }
            out.actions.push(ResAction::Start);
            active = true;
        }
        let live_differs = self.live_differs(redefine, same_definition);
        if live_differs && active && r.on_change == OnChange::Restart {
            out.actions.push(ResAction::Restart);
            return Ok(true);
        }
        out.pending_restart = live_differs && active;
        Ok(false)
    }

    /// Drift against the record of the last sync (only of an owned one).
    fn drift(&self) -> Vec<String> {
        let seen = self.seen;
        let mut drift = Vec::new();
        if let Some(rec) = self.rec.filter(|_| self.is_owned) {
            if rec.definition_hash.is_some() && rec.definition_hash != seen.definition_hash {
                drift.push("definition changed outside vmsync".to_string());
            }
            if rec.autostart != seen.listing.autostart {
                drift.push(format!(
                    "autostart flag changed outside vmsync (now {})",
                    if seen.listing.autostart { "on" } else { "off" }
                ));
            }
            if rec.autostart && !seen.listing.active {
                drift.push("stopped outside vmsync".to_string());
            }
        }
        drift
    }

    /// Whether the commit's definition with the host's UUID, hashed as libvirt's is,
    /// equals the host's: so when an adopted network or pool is what the commit says
    /// (`vmsync import`'s output), adopting it changes nothing that runs. Both sides
    /// tagged alike, so an empty `<metadata>` left by the tag compares equal.
    fn same_definition(&self, uuid: &str) -> bool {
        let kind = self.r.kind;
        let tagged_hash = |xml: &str| {
            resource_xml::render(kind, xml, Some(uuid), &self.tag)
                .ok()
                .and_then(|xml| resource_xml::definition_hash(kind, &xml))
        };
        let commit_hash = tagged_hash(&self.r.xml);
        commit_hash.is_some()
            && commit_hash == self.seen.inactive_xml.as_deref().and_then(tagged_hash)
    }

    /// Whether the commit changes the definition vmsync applied (or, for one being
    /// adopted, whether adopting it is a redefine).
    fn changed(&self, same_definition: bool) -> bool {
        let kind = self.r.kind;
        if self.is_owned {
            let applied_fingerprint = match kind {
                ResourceKind::Network => self
                    .seen
                    .inactive
                    .as_ref()
                    .and_then(|s| s.tag.as_ref())
                    .map(|t| t.fingerprint.clone()),
                ResourceKind::Pool => self.rec.and_then(|r| r.fingerprint.clone()),
            };
            applied_fingerprint.as_deref() != Some(self.r.fingerprint.as_str())
        } else {
            // A network carries vmsync's tag in its definition (libvirt 9.0 has no
            // metadata call for networks), so adopting one is a redefine; a pool's
            // ownership is the record, so an unchanged pool is adopted without touching
            // it.
            kind == ResourceKind::Network || !same_definition
        }
    }

    /// Whether it runs on an older definition (checked on the host's active state).
    fn live_differs(&self, redefine: bool, same_definition: bool) -> bool {
        let seen = self.seen;
        seen.listing.active
            && match self.r.kind {
                ResourceKind::Network => {
                    match &seen.live_fingerprint {
                        // Runs a definition vmsync applied: the commit's, or an older one.
                        Some(live) => live != &self.r.fingerprint,
                        // Runs an untagged definition (adopted now or before): pending
                        // when this plan changes what it says, or it already differs
                        // from the persistent one.
                        None => (redefine && !same_definition) || !seen.live_is_persistent,
                    }
                }
                ResourceKind::Pool => redefine || self.rec.is_some_and(|rec| rec.pending_restart),
            }
    }
}

fn fail(mut out: ResPlan, error: String) -> ResPlan {
    out.error = Some(error);
    out.actions.clear();
    out
}

/// Plans the networks, pools and volumes of `desired`, and the pruning of owned ones
/// that left the manifest.
pub fn plan(
    desired: &Desired,
    observed: &Observed,
    commit: &str,
    record: &Record,
    policy: &policy::ChangePolicy,
) -> ResourcePlan {
    let heal = policy.self_heal;
    let res = &desired.resources;
    let obs: &ObservedResources = &observed.resources;
    let pools: Vec<ResPlan> = res
        .pools
        .iter()
        .map(|r| plan_one(r, desired, observed, commit, record, heal))
        .collect();
    let networks = res
        .networks
        .iter()
        .map(|r| plan_one(r, desired, observed, commit, record, heal))
        .collect();
    let volumes = res
        .volumes
        .iter()
        .map(|v| plan_volume(v, &pools, obs))
        .collect();
    let mut prune = Vec::new();
    for kind in [ResourceKind::Network, ResourceKind::Pool] {
        let wanted: BTreeSet<&str> = res.of(kind).iter().map(|r| r.name.as_str()).collect();
        for (name, rec) in recorded(record, kind) {
            if wanted.contains(name.as_str()) {
                continue;
            }
            let Some(seen) = obs.seen.get(&(kind, name.clone())) else {
                continue;
            };
            if !owned(kind, seen, Some(rec)) {
                continue;
            }
            let mut p = ResPlan {
                kind: Some(kind),
                name: name.clone(),
                active: seen.listing.active,
                current_hash: seen.definition_hash.clone(),
                uuid: Some(seen.listing.uuid.clone()),
                ..Default::default()
            };
            if !seen.listing.persistent {
                p.skipped = Some(format!(
                    "transient {kind}; vmsync only prunes persistent ones"
                ));
            } else if !policy.prune {
                p.skipped = Some(
                    "not in the manifest for this host; left alone (policy.prune is off)".into(),
                );
            } else {
                if seen.listing.active {
                    p.actions.push(ResAction::Stop);
                    p.affected_vms = users(kind, name, desired, observed);
                }
                p.actions.push(ResAction::Undefine);
            }
            prune.push(p);
        }
    }
    ResourcePlan {
        pools,
        volumes,
        networks,
        prune,
    }
}

fn plan_volume(v: &DesiredVolume, pools: &[ResPlan], obs: &ObservedResources) -> VolumePlan {
    let s = &v.spec;
    let mut out = VolumePlan {
        vm: v.vm.clone(),
        pool: s.pool.clone(),
        name: s.name.clone(),
        create: None,
        error: None,
        description: format!(
            "create {} volume '{}' in pool '{}' ({})",
            s.format,
            s.name,
            s.pool,
            values::human_size(s.size_bytes)
        ),
    };
    let pool_plan = pools.iter().find(|p| p.name == s.pool);
    if let Some(p) = pool_plan
        && let Some(e) = &p.error
    {
        out.error = Some(format!("pool '{}' is not converged: {e}", s.pool));
        return out;
    }
    let started = pool_plan.is_some_and(|p| {
        p.active
            || p.actions
                .iter()
                .any(|a| matches!(a, ResAction::Start | ResAction::Restart))
    });
    let xml = || {
        resource_xml::volume_xml(
            &s.name,
            s.size_bytes,
            &s.format.to_string(),
            s.backing.as_ref().map(|b| {
                (
                    b.to_str().unwrap_or_default(),
                    s.backing_format.map(|f| match f {
                        disk_spec::DiskFormat::Qcow2 => "qcow2",
                        disk_spec::DiskFormat::Raw => "raw",
                    }),
                )
            }),
        )
    };
    match obs.volumes.get(&s.pool) {
        Some(Ok(names)) if names.contains(&s.name) => {}
        Some(Ok(_)) => out.create = Some(xml()),
        Some(Err(e)) => out.error = Some(e.clone()),
        None if started => out.create = Some(xml()),
        None => {
            out.error = Some(format!(
                "pool '{}' is not active, so volume '{}' cannot be made (set autostart = true on the pool)",
                s.pool, s.name
            ))
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::desired_state::DesiredResources;
    use crate::desired::disk_spec::DiskFormat;
    use crate::desired::domain_xml::fingerprint;
    use crate::desired::manifest::VolumeSpec;
    use crate::host::hypervisor::Listing;
    use crate::host::observe_networks_pools::SeenResource;
    use crate::reconcile::outcome::ResOutcome;
    use crate::reconcile::outcome::ResourceOutcome;
    use crate::reconcile::policy::ChangePolicy;
    use crate::reconcile::render::{annotate_resources, resources_text};

    const UUID: &str = "6a3f4c1e-0b2d-4e5f-8a9b-0c1d2e3f4a5b";

    fn net_xml(name: &str, extra: &str) -> String {
        format!("<network><name>{name}</name><bridge name='br0'/>{extra}</network>")
    }

    fn pool_xml(name: &str) -> String {
        format!(
            "<pool type='dir'><name>{name}</name><target><path>/srv/images/{name}</path></target></pool>"
        )
    }

    fn want(kind: ResourceKind, xml: &str, autostart: bool) -> DesiredResource {
        let summary = resource_xml::summarize(kind, xml).unwrap();
        DesiredResource {
            kind,
            name: summary.name.clone(),
            xml_file: "x.xml".into(),
            xml: xml.into(),
            summary,
            fingerprint: fingerprint(xml),
            autostart,
            adopt: false,
            on_change: OnChange::Defer,
        }
    }

    /// What the host has: `source` as vmsync (tagged, for a network) or a person
    /// (untagged) defined it.
    fn seen(
        kind: ResourceKind,
        source: &str,
        tagged: bool,
        active: bool,
        autostart: bool,
    ) -> SeenResource {
        let tag = Tag {
            commit: "old".into(),
            fingerprint: fingerprint(source),
        };
        let xml = if tagged {
            resource_xml::render(kind, source, Some(UUID), &tag).unwrap()
        } else {
            source.replace("</name>", &format!("</name><uuid>{UUID}</uuid>"))
        };
        let inactive = resource_xml::summarize(kind, &xml).ok();
        SeenResource {
            listing: Listing {
                name: inactive.as_ref().unwrap().name.clone(),
                uuid: UUID.into(),
                active,
                autostart,
                persistent: true,
            },
            live_fingerprint: (active && tagged && kind == ResourceKind::Network)
                .then(|| fingerprint(source)),
            live_is_persistent: active && kind == ResourceKind::Network,
            inactive,
            definition_hash: Some("baseline".into()),
            inactive_xml: Some(xml),
        }
    }

    fn rec(source: &str, autostart: bool) -> ResourceRecord {
        ResourceRecord {
            uuid: Some(UUID.into()),
            applied_commit: Some("old".into()),
            fingerprint: Some(fingerprint(source)),
            autostart,
            ok: true,
            definition_hash: Some("baseline".into()),
            ..Default::default()
        }
    }

    struct Case {
        what: &'static str,
        want: DesiredResource,
        seen: Option<SeenResource>,
        record: Option<ResourceRecord>,
        self_heal: bool,
        actions: &'static [&'static str],
        error: Option<&'static str>,
        pending: bool,
        drift: usize,
    }

    fn run(case: &Case) -> ResPlan {
        let kind = case.want.kind;
        let mut desired = Desired::default();
        let mut record = Record::default();
        match kind {
            ResourceKind::Network => desired.resources.networks.push(case.want.clone()),
            ResourceKind::Pool => desired.resources.pools.push(case.want.clone()),
        }
        if let Some(r) = &case.record {
            match kind {
                ResourceKind::Network => record.networks.insert(case.want.name.clone(), r.clone()),
                ResourceKind::Pool => record.pools.insert(case.want.name.clone(), r.clone()),
            };
        }
        let mut observed = Observed::default();
        if let Some(s) = &case.seen {
            observed
                .resources
                .seen
                .insert((kind, case.want.name.clone()), s.clone());
        }
        let policy = ChangePolicy {
            self_heal: case.self_heal,
            ..Default::default()
        };
        let p = plan(&desired, &observed, "new", &record, &policy);
        match kind {
            ResourceKind::Network => p.networks[0].clone(),
            ResourceKind::Pool => p.pools[0].clone(),
        }
    }

    fn names(p: &ResPlan) -> Vec<&'static str> {
        p.actions
            .iter()
            .map(|a| a.kind(p.kind()).as_str())
            .collect()
    }

    #[test]
    fn planner_table() {
        use ResourceKind::{Network as N, Pool as P};
        let net = net_xml("lab", "");
        let net2 = net_xml("lab", "<mac address='52:54:00:00:00:01'/>");
        let pool = pool_xml("vmpool");
        let mut adopt = want(N, &net, true);
        adopt.adopt = true;
        let mut restart = want(N, &net2, true);
        restart.on_change = OnChange::Restart;
        let cases = [
            Case {
                what: "missing network, autostart",
                want: want(N, &net, true),
                seen: None,
                record: None,
                self_heal: true,
                actions: &["define_network", "set_network_autostart", "start_network"],
                error: None,
                pending: false,
                drift: 0,
            },
            Case {
                what: "missing pool, autostart: built before start",
                want: want(P, &pool, true),
                seen: None,
                record: None,
                self_heal: true,
                actions: &[
                    "define_pool",
                    "build_pool",
                    "set_pool_autostart",
                    "start_pool",
                ],
                error: None,
                pending: false,
                drift: 0,
            },
            Case {
                what: "missing network, no autostart: defined only",
                want: want(N, &net, false),
                seen: None,
                record: None,
                self_heal: true,
                actions: &["define_network"],
                error: None,
                pending: false,
                drift: 0,
            },
            Case {
                what: "converged network",
                want: want(N, &net, true),
                seen: Some(seen(N, &net, true, true, true)),
                record: Some(rec(&net, true)),
                self_heal: true,
                actions: &[],
                error: None,
                pending: false,
                drift: 0,
            },
            Case {
                what: "converged pool (owned through the record's uuid)",
                want: want(P, &pool, true),
                seen: Some(seen(P, &pool, false, true, true)),
                record: Some(rec(&pool, true)),
                self_heal: true,
                actions: &[],
                error: None,
                pending: false,
                drift: 0,
            },
            Case {
                what: "hand-made network (default included): refused",
                want: want(N, &net, true),
                seen: Some(seen(N, &net, false, true, true)),
                record: None,
                self_heal: true,
                actions: &[],
                error: Some("exists but was not defined by vmsync (no vmsync metadata)"),
                pending: false,
                drift: 0,
            },
            Case {
                what: "hand-made pool (no record): refused",
                want: want(P, &pool, true),
                seen: Some(seen(P, &pool, false, true, true)),
                record: None,
                self_heal: true,
                actions: &[],
                error: Some("its uuid is not the one vmsync recorded"),
                pending: false,
                drift: 0,
            },
            Case {
                what: "pool whose uuid differs from the record's: refused",
                want: want(P, &pool, true),
                seen: Some(seen(P, &pool, false, true, true)),
                record: Some(ResourceRecord {
                    uuid: Some("00000000-0000-0000-0000-000000000000".into()),
                    ..rec(&pool, true)
                }),
                self_heal: true,
                actions: &[],
                error: Some("not defined by vmsync"),
                pending: false,
                drift: 0,
            },
            Case {
                what: "hand-made network with adopt, same definition: tagged in place",
                want: adopt,
                seen: Some(seen(N, &net, false, true, true)),
                record: None,
                self_heal: true,
                actions: &["redefine_network"],
                error: None,
                pending: false,
                drift: 0,
            },
            Case {
                what: "changed active network: pending restart",
                want: want(N, &net2, true),
                seen: Some(seen(N, &net, true, true, true)),
                record: Some(rec(&net, true)),
                self_heal: true,
                actions: &["redefine_network"],
                error: None,
                pending: true,
                drift: 0,
            },
            Case {
                what: "changed active network, on_change = restart",
                want: restart,
                seen: Some(seen(N, &net, true, true, true)),
                record: Some(rec(&net, true)),
                self_heal: true,
                actions: &["redefine_network", "restart_network"],
                error: None,
                pending: false,
                drift: 0,
            },
            Case {
                what: "changed inactive network: no pending restart",
                want: want(N, &net2, false),
                seen: Some(seen(N, &net, true, false, false)),
                record: Some(rec(&net, false)),
                self_heal: true,
                actions: &["redefine_network"],
                error: None,
                pending: false,
                drift: 0,
            },
            Case {
                what: "stopped outside vmsync: started (self-heal)",
                want: want(N, &net, true),
                seen: Some(seen(N, &net, true, false, true)),
                record: Some(rec(&net, true)),
                self_heal: true,
                actions: &["start_network"],
                error: None,
                pending: false,
                drift: 1,
            },
            Case {
                what: "stopped outside vmsync, self-heal off: reported",
                want: want(N, &net, true),
                seen: Some(seen(N, &net, true, false, true)),
                record: Some(rec(&net, true)),
                self_heal: false,
                actions: &[],
                error: None,
                pending: false,
                drift: 1,
            },
            Case {
                what: "autostart cleared outside vmsync: set again",
                want: want(P, &pool, true),
                seen: Some(seen(P, &pool, false, true, false)),
                record: Some(rec(&pool, true)),
                self_heal: true,
                actions: &["set_pool_autostart"],
                error: None,
                pending: false,
                drift: 1,
            },
            Case {
                what: "definition edited outside vmsync: redefined",
                want: want(N, &net, true),
                seen: Some(SeenResource {
                    definition_hash: Some("edited".into()),
                    ..seen(N, &net, true, true, true)
                }),
                record: Some(rec(&net, true)),
                self_heal: true,
                actions: &["redefine_network"],
                error: None,
                pending: false,
                drift: 1,
            },
            Case {
                what: "definition edited, self-heal off: reported",
                want: want(N, &net, true),
                seen: Some(SeenResource {
                    definition_hash: Some("edited".into()),
                    ..seen(N, &net, true, true, true)
                }),
                record: Some(rec(&net, true)),
                self_heal: false,
                actions: &[],
                error: None,
                pending: false,
                drift: 1,
            },
        ];
        for case in &cases {
            let p = run(case);
            assert_eq!(names(&p), case.actions, "{}", case.what);
            match case.error {
                None => assert_eq!(p.error, None, "{}", case.what),
                Some(e) => assert!(
                    p.error.as_deref().unwrap_or("").contains(e),
                    "{}: {:?}",
                    case.what,
                    p.error
                ),
            }
            assert_eq!(p.pending_restart, case.pending, "{}", case.what);
            assert_eq!(p.drift.len(), case.drift, "{}: {:?}", case.what, p.drift);
        }
    }

    /// What `vmsync import` writes is what the host has: adopting it changes nothing
    /// that runs (a pool is not even redefined; a network only gets its tag).
    #[test]
    fn adopting_an_unchanged_definition_changes_nothing_that_runs() {
        for kind in [ResourceKind::Network, ResourceKind::Pool] {
            let source = match kind {
                ResourceKind::Network => net_xml("lab", ""),
                ResourceKind::Pool => {
                    "<pool type='dir'><name>lab</name><target><path>/var/lib/libvirt/images/lab</path></target></pool>".to_string()
                }
            };
            let mut wanted = want(kind, &source, true);
            wanted.adopt = true;
            let host = source.replace("</name>", &format!("</name><uuid>{UUID}</uuid>"));
            let hash = resource_xml::definition_hash(kind, &host);
            let mut wanted_elsewhere = wanted.clone();
            wanted_elsewhere.xml = match kind {
                ResourceKind::Network => net_xml("lab", "<mac address='52:54:00:00:00:09'/>"),
                ResourceKind::Pool => source.replace("/var/lib/libvirt/images/lab", "/srv/lab"),
            };
            let case = |live_is_persistent: bool| Case {
                what: "",
                want: wanted.clone(),
                seen: Some(SeenResource {
                    definition_hash: hash.clone(),
                    inactive_xml: Some(host.clone()),
                    live_fingerprint: None,
                    live_is_persistent,
                    ..seen(kind, &source, false, true, true)
                }),
                record: None,
                self_heal: true,
                actions: &[],
                error: None,
                pending: false,
                drift: 0,
            };
            let p = run(&case(true));
            let expected: &[&str] = match kind {
                ResourceKind::Network => &["redefine_network"],
                ResourceKind::Pool => &[],
            };
            assert_eq!(names(&p), expected, "{kind}");
            assert!(p.error.is_none(), "{kind}: {:?}", p.error);
            assert!(!p.pending_restart, "{kind}: only the tag changed");
            assert!(p.adopted, "{kind}");
            // The commit says something else: redefined, and a network pending restart.
            let p = run(&Case {
                want: wanted_elsewhere.clone(),
                ..case(true)
            });
            let expected: &[&str] = match kind {
                ResourceKind::Network => &["redefine_network"],
                ResourceKind::Pool => &["redefine_pool"],
            };
            assert_eq!(names(&p), expected, "{kind}: changed");
            assert!(p.pending_restart, "{kind}: active on its old definition");
            if kind == ResourceKind::Network {
                // Running something else than its persistent definition: pending.
                let p = run(&case(false));
                assert!(p.pending_restart, "network running an older definition");
            }
        }
    }

    #[test]
    fn a_redefine_keeps_the_existing_uuid_and_tags_networks() {
        let net2 = net_xml("lab", "<mac address='52:54:00:00:00:01'/>");
        let net = net_xml("lab", "");
        let case = Case {
            what: "",
            want: want(ResourceKind::Network, &net2, true),
            seen: Some(seen(ResourceKind::Network, &net, true, true, true)),
            record: Some(rec(&net, true)),
            self_heal: true,
            actions: &[],
            error: None,
            pending: false,
            drift: 0,
        };
        let p = run(&case);
        let ResAction::Define {
            xml,
            redefine: true,
        } = &p.actions[0]
        else {
            panic!("{:?}", p.actions)
        };
        let s = resource_xml::summarize(ResourceKind::Network, xml).unwrap();
        assert_eq!(s.uuid.as_deref(), Some(UUID));
        assert_eq!(s.tag.unwrap().fingerprint, fingerprint(&net2));
    }

    #[test]
    fn plan_shows_a_diff_of_a_changed_definition() {
        let net = net_xml("lab", "");
        let net2 = net_xml("lab", "<domain name='lab.example'/>");
        let mut p = run(&Case {
            what: "",
            want: want(ResourceKind::Network, &net2, true),
            seen: Some(seen(ResourceKind::Network, &net, true, true, true)),
            record: Some(rec(&net, true)),
            self_heal: true,
            actions: &[],
            error: None,
            pending: false,
            drift: 0,
        });
        let mut plan = ResourcePlan {
            networks: vec![p.clone()],
            ..Default::default()
        };
        annotate_resources(&mut plan);
        let diff = plan.networks[0].diff.as_deref().unwrap();
        assert!(diff.contains("lab.example"), "{diff}");
        assert!(resources_text(&plan).contains("network lab: redefine in place"));
        assert!(resources_text(&plan).contains("pending restart"));
        p.source_xml.clear();
        let mut unchanged = ResourcePlan {
            networks: vec![p],
            ..Default::default()
        };
        annotate_resources(&mut unchanged);
        assert_eq!(unchanged.networks[0].diff, None);
    }

    fn volume(pool: &str, name: &str) -> DesiredVolume {
        DesiredVolume {
            vm: "web".into(),
            spec: VolumeSpec {
                pool: pool.into(),
                name: name.into(),
                size_bytes: 1 << 30,
                format: DiskFormat::Qcow2,
                backing: None,
                backing_format: None,
            },
        }
    }

    #[test]
    fn volumes_are_made_when_missing_only() {
        let pool = pool_xml("vmpool");
        let mut desired = Desired {
            resources: DesiredResources {
                pools: vec![want(ResourceKind::Pool, &pool, true)],
                volumes: vec![volume("vmpool", "a.qcow2"), volume("vmpool", "b.qcow2")],
                ..Default::default()
            },
            ..Default::default()
        };
        let mut record = Record::default();
        record.pools.insert("vmpool".into(), rec(&pool, true));
        let mut observed = Observed::default();
        observed.resources.seen.insert(
            (ResourceKind::Pool, "vmpool".into()),
            seen(ResourceKind::Pool, &pool, false, true, true),
        );
        observed
            .resources
            .volumes
            .insert("vmpool".into(), Ok(["a.qcow2".to_string()].into()));
        let p = plan(&desired, &observed, "c", &record, &ChangePolicy::default());
        assert_eq!(p.volumes[0].create, None, "a exists: never touched");
        let xml = p.volumes[1].create.as_deref().unwrap();
        assert!(
            xml.contains("<name>b.qcow2</name>") && xml.contains("qcow2"),
            "{xml}"
        );
        assert!(!p.is_noop());

        // A missing pool that will be started: its volumes are made after it.
        let fresh = plan(
            &desired,
            &Observed::default(),
            "c",
            &Record::default(),
            &ChangePolicy::default(),
        );
        assert!(fresh.volumes.iter().all(|v| v.create.is_some()));
        // A pool that is not started: the volume fails, named.
        desired.resources.pools[0].autostart = false;
        let idle = plan(
            &desired,
            &Observed::default(),
            "c",
            &Record::default(),
            &ChangePolicy::default(),
        );
        assert!(
            idle.volumes[0]
                .error
                .as_deref()
                .unwrap()
                .contains("is not active")
        );
        // A refused pool: its volumes are not made either.
        let mut hand = Observed::default();
        hand.resources.seen.insert(
            (ResourceKind::Pool, "vmpool".into()),
            seen(ResourceKind::Pool, &pool, false, true, true),
        );
        let refused = plan(
            &desired,
            &hand,
            "c",
            &Record::default(),
            &ChangePolicy::default(),
        );
        assert!(
            refused.volumes[0]
                .error
                .as_deref()
                .unwrap()
                .contains("not converged")
        );
    }

    #[test]
    fn pruning_only_owned_ones_and_never_storage() {
        let net = net_xml("old", "");
        let pool = pool_xml("oldpool");
        let mut record = Record::default();
        record.networks.insert("old".into(), rec(&net, true));
        record.pools.insert("oldpool".into(), rec(&pool, true));
        record.networks.insert("gone".into(), rec(&net, true));
        let mut observed = Observed::default();
        observed.resources.seen.insert(
            (ResourceKind::Network, "old".into()),
            seen(ResourceKind::Network, &net, true, true, true),
        );
        observed.resources.seen.insert(
            (ResourceKind::Pool, "oldpool".into()),
            seen(ResourceKind::Pool, &pool, false, false, true),
        );
        let off = plan(
            &Desired::default(),
            &observed,
            "c",
            &record,
            &ChangePolicy::default(),
        );
        assert_eq!(off.prune.len(), 2);
        assert!(
            off.prune
                .iter()
                .all(|p| p.skipped.is_some() && p.actions.is_empty())
        );
        assert_eq!(off.pruning(), 0);
        let on = ChangePolicy {
            prune: true,
            ..Default::default()
        };
        let p = plan(&Desired::default(), &observed, "c", &record, &on);
        let net_plan = p.prune.iter().find(|p| p.name == "old").unwrap();
        assert_eq!(names(net_plan), ["stop_network", "undefine_network"]);
        let pool_plan = p.prune.iter().find(|p| p.name == "oldpool").unwrap();
        assert_eq!(names(pool_plan), ["undefine_pool"]);
        assert_eq!(
            pool_plan.actions[0].describe(ResourceKind::Pool),
            "undefine (keeping its storage and volumes)"
        );
        assert_eq!(p.pruning(), 2);
        // A hand-made network of a recorded name (the record is stale) is never pruned.
        let mut other = observed.clone();
        other.resources.seen.insert(
            (ResourceKind::Network, "old".into()),
            seen(ResourceKind::Network, &net, false, true, true),
        );
        let p = plan(&Desired::default(), &other, "c", &record, &on);
        assert!(p.prune.iter().all(|p| p.name != "old"));
    }

    #[test]
    fn resource_prunes_count_towards_the_mass_prune_guard() {
        let net = net_xml("old", "");
        let mut record = Record::default();
        record.networks.insert("old".into(), rec(&net, true));
        let mut observed = Observed::default();
        observed.resources.seen.insert(
            (ResourceKind::Network, "old".into()),
            seen(ResourceKind::Network, &net, true, true, true),
        );
        let policy = ChangePolicy {
            prune: true,
            ..Default::default()
        };
        let ctx = crate::reconcile::plan::Context {
            policy: &policy,
            record: &record,
        };
        let p = crate::reconcile::plan::plan(&Desired::default(), &observed, "c", &ctx);
        assert!(
            p.refused.is_some(),
            "pruning every managed resource is refused"
        );
    }

    #[test]
    fn the_record_keeps_owned_ones_and_a_pools_uuid() {
        let pool = pool_xml("p");
        let plan = ResourcePlan::default();
        let outcome = ResourceOutcome {
            pools: vec![ResOutcome {
                kind: Some(ResourceKind::Pool),
                name: "p".into(),
                fingerprint: "fp".into(),
                autostart: true,
                defined: true,
                uuid: Some(UUID.into()),
                definition_hash: Some("h".into()),
                error: Some("start failed".into()),
                ..Default::default()
            }],
            networks: vec![ResOutcome {
                kind: Some(ResourceKind::Network),
                name: "hand".into(),
                error: Some("exists but was not defined by vmsync".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut record = Record::default();
        record_one(&mut record, &plan, &outcome);
        let p = &record.pools["p"];
        assert_eq!(
            p.uuid.as_deref(),
            Some(UUID),
            "defined, so owned even though a step failed"
        );
        assert!(!p.ok && p.last_error.is_some());
        assert!(
            !record.networks.contains_key("hand"),
            "never vmsync's: not recorded"
        );
        let _ = pool;
    }

    fn record_one(record: &mut Record, plan: &ResourcePlan, outcome: &ResourceOutcome) {
        crate::reconcile::record_update::record_resources(record, "c", plan, outcome);
    }
}
