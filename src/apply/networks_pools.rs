//! Applying the networks, pools and volumes of a plan through the `Hypervisor` seam:
//! defined, started and built before the domains that use them, pruned after.

use tracing::{error, info, warn};

use crate::desired::resource_xml;
use crate::host::hypervisor::{Hypervisor, ResOp};
use crate::reconcile::outcome::{ResOutcome, ResourceOutcome, VolumeDone, VolumeOutcome};
use crate::reconcile::plan_types::{ResAction, ResPlan, ResourcePlan};

fn apply_one(p: &ResPlan, hv: &dyn Hypervisor, short: &str) -> ResOutcome {
    let kind = p.kind();
    let mut out = ResOutcome {
        kind: p.kind,
        name: p.name.clone(),
        error: p.error.clone(),
        pending_restart: p.pending_restart,
        drift: p.drift.clone(),
        fingerprint: p.fingerprint.clone(),
        autostart: p.autostart,
        previous_uuid: p.uuid.clone(),
        previous_hash: p.current_hash.clone(),
        skipped: p.skipped.is_some(),
        ..Default::default()
    };
    for d in &p.drift {
        if p.drift_reported_only {
            warn!(kind = %kind, name = %p.name, drift = %d, "drift (self_heal is off: reported only)");
        } else {
            warn!(kind = %kind, name = %p.name, drift = %d, "drift: putting it back to the commit");
        }
    }
    if let Some(e) = &p.error {
        error!(kind = %kind, name = %p.name, commit = %short, error = %e, "not converged");
        return out;
    }
    for action in &p.actions {
        let what = action.describe(kind);
        let op = |op| hv.resource_op(kind, &p.name, op);
        let done = match action {
            ResAction::Define { xml, .. } => hv.define_resource(kind, xml).map(|()| {
                out.defined = true;
            }),
            // A dir pool's build only makes its directory (libvirt refuses the
            // no-overwrite flag there); any other type is built without overwriting.
            ResAction::Build => op(ResOp::Build {
                no_overwrite: p.pool_type.as_deref() != Some("dir"),
            }),
            ResAction::SetAutostart(on) => op(ResOp::Autostart(*on)),
            ResAction::Start => op(ResOp::Start),
            ResAction::Restart => {
                if !p.affected_vms.is_empty() {
                    warn!(kind = %kind, name = %p.name, vms = %p.affected_vms.join(", "), "restarting: these running vms lose their link until they are reattached or restarted");
                }
                op(ResOp::Stop).and_then(|()| op(ResOp::Start))
            }
            ResAction::Stop => op(ResOp::Stop),
            ResAction::Undefine => op(ResOp::Undefine),
        };
        match done {
            Ok(()) => {
                info!(kind = %kind, name = %p.name, commit = %short, action = %what, "done");
                out.done.push(what);
                out.kinds.push(action.kind(kind));
                if matches!(action, ResAction::Restart) {
                    out.pending_restart = false;
                }
            }
            Err(e) => {
                error!(kind = %kind, name = %p.name, commit = %short, action = %what, error = %e, "failed");
                out.error = Some(e.to_string());
                break;
            }
        }
    }
    // The new drift baseline and UUID, once built and started (a pool's XML gains its
    // permissions then).
    if out.defined
        && let Ok(after) = hv.resource_xml(kind, &p.name, true)
    {
        out.definition_hash = resource_xml::definition_hash(kind, &after);
        out.uuid = resource_xml::summarize(kind, &after)
            .ok()
            .and_then(|s| s.uuid);
    }
    out
}

/// Applies the pools, then the volumes, then the networks (before the domains).
pub fn apply_before_domains(
    plan: &ResourcePlan,
    hv: &dyn Hypervisor,
    short: &str,
) -> ResourceOutcome {
    let mut out = ResourceOutcome {
        pools: plan.pools.iter().map(|p| apply_one(p, hv, short)).collect(),
        ..Default::default()
    };
    for v in &plan.volumes {
        let pool_failed = out
            .pools
            .iter()
            .find(|p| p.name == v.pool)
            .and_then(|p| p.error.clone());
        let result = match (&v.error, pool_failed, &v.create) {
            (Some(e), _, _) => Err(e.clone()),
            (None, Some(e), _) => Err(format!("pool '{}' failed: {e}", v.pool)),
            (None, None, None) => Ok(VolumeDone::Exists),
            (None, None, Some(xml)) => hv
                .create_volume(&v.pool, xml)
                .map(|()| VolumeDone::Created(v.description.clone()))
                .map_err(|e| e.to_string()),
        };
        match &result {
            Ok(VolumeDone::Created(what)) => {
                info!(vm = %v.vm, pool = %v.pool, volume = %v.name, commit = %short, "{what}")
            }
            Ok(_) => {}
            Err(e) => {
                error!(vm = %v.vm, pool = %v.pool, volume = %v.name, error = %e, "volume not converged")
            }
        }
        out.volumes.push(VolumeOutcome {
            vm: v.vm.clone(),
            pool: v.pool.clone(),
            name: v.name.clone(),
            result,
        });
    }
    out.networks = plan
        .networks
        .iter()
        .map(|p| apply_one(p, hv, short))
        .collect();
    out
}

/// Prunes owned networks, then pools (after the domains' pruning).
pub fn apply_prune(
    plan: &ResourcePlan,
    hv: &dyn Hypervisor,
    short: &str,
    out: &mut ResourceOutcome,
) {
    for p in plan.prune.iter().filter(|p| p.skipped.is_none()) {
        if !p.affected_vms.is_empty() {
            warn!(kind = %p.kind(), name = %p.name, vms = %p.affected_vms.join(", "), "pruning: these running vms lose their link");
        }
        let mut o = apply_one(p, hv, short);
        o.pruned = o.error.is_none();
        out.pruned.push(o);
    }
}
