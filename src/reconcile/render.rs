//! A plan for people and machines: the text `vmsync plan` prints, and the JSON object of
//! `vmsync plan --json` and `vmsync --once --dry-run --json`. Rendering only; the
//! planner decides nothing here.

use std::path::PathBuf;

use serde::Serialize;

use crate::desired::resource_xml::ResourceKind;
use crate::reconcile::outcome::{Outcome, ResourceOutcome, VolumeDone};
use crate::reconcile::plan_types::{Action, ActionKind, Plan, ResPlan, ResourcePlan};
use crate::reconcile::{diff, plan_types};

/// Renders a plan for people (`vmsync plan`).
pub fn render(plan: &Plan) -> String {
    let mut out = format!("plan for commit {}\n", plan.commit);
    for dir in &plan.create_directories {
        out += &format!("  create directory '{}'\n", dir.display());
    }
    // Pools, volumes and networks converge before the domains.
    out += &resources_text(&plan.resources);
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
        if let Some(w) = &vm.order.waiting {
            out += &format!(" (restart/stop waiting for {w})");
        }
        out += "\n";
        if !vm.order.after.is_empty() && vm.actions.iter().any(Action::starts_guest) {
            out += &format!(
                "    starts after: {} (each up)\n",
                vm.order.after.join(", ")
            );
        }
        for d in &vm.drift {
            let how = if vm.drift_reported_only {
                "reported only, self_heal is off"
            } else {
                "healed"
            };
            out += &format!("    drift: {d} ({how})\n");
        }
        for w in &vm.warnings {
            out += &format!("    warning: {w}\n");
        }
        if let Some(health) = &vm.health {
            out += &format!("    {}\n", health.line());
        }
        if let Some(diff) = &vm.diff {
            for line in diff.lines() {
                out += &format!("    {line}\n");
            }
        }
    }
    for p in &plan.prune {
        match &p.skipped {
            Some(why) => out += &format!("  {}: {why}\n", p.name),
            None => {
                let what: Vec<_> = p.actions.iter().map(Action::describe).collect();
                out += &format!("  {}: prune: {}\n", p.name, what.join(", "));
            }
        }
        for disk in &p.disks {
            let note = if p.skipped.is_some() {
                "disk"
            } else {
                "orphaned disk (kept)"
            };
            out += &format!("    {note}: {}\n", disk.display());
        }
    }
    if plan.foreign_tagged > 0 {
        out += &format!(
            "  ({} other domain(s) carry vmsync's tag but were not applied by this agent; left alone)\n",
            plan.foreign_tagged
        );
    }
    if let Some(why) = &plan.refused {
        out += &format!("REFUSED: {why}\n");
    } else if plan.is_noop() {
        out += "nothing to do\n";
    }
    out
}

/// The plan as JSON for machines (`vmsync plan --json`).
#[derive(Debug, Serialize)]
pub struct PlanJson<'a> {
    pub commit: &'a str,
    pub create_directories: &'a [PathBuf],
    pub vms: Vec<VmJson<'a>>,
    pub prune: Vec<PruneJson<'a>>,
    /// Disks of the domains pruned by this plan; never deleted.
    pub orphaned_disks: Vec<&'a PathBuf>,
    pub refused: Option<&'a str>,
    pub foreign_tagged: usize,
    pub noop: bool,
    /// Networks, pools and volumes (see `resources_json`).
    pub resources: serde_json::Value,
}

#[derive(Debug, Serialize)]
pub struct ActionJson {
    pub kind: ActionKind,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct VmJson<'a> {
    pub name: &'a str,
    pub actions: Vec<ActionJson>,
    pub diff: Option<&'a str>,
    pub pending_restart: bool,
    pub drift: &'a [String],
    pub drift_healed: bool,
    pub error: Option<&'a str>,
    pub warnings: &'a [String],
    /// `[vm.health]`: last result, last healthy commit, held back commit.
    pub health: Option<&'a plan_types::HealthView>,
    /// `depends_on`: a start waits until each of these is up.
    pub depends_on: &'a [String],
    /// What its restart or stop waits for ("window <start>"); `null`: nothing.
    pub waiting_for: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct PruneJson<'a> {
    pub name: &'a str,
    pub active: bool,
    pub actions: Vec<ActionJson>,
    pub disks: &'a [PathBuf],
    pub skipped: Option<&'a str>,
}

fn action_json(a: &Action) -> ActionJson {
    let (timeout_seconds, from, path) = match a {
        Action::Restart { timeout } | Action::Stop { timeout } => {
            (Some(timeout.as_secs()), None, None)
        }
        Action::Rename { from } => (None, Some(from.clone()), None),
        Action::CreateDisk(spec) => (None, None, Some(spec.path.clone())),
        Action::WriteSeed { seed, .. } => (None, None, Some(seed.path.clone())),
        _ => (None, None, None),
    };
    ActionJson {
        kind: a.kind(),
        description: a.describe(),
        timeout_seconds,
        from,
        path,
    }
}

impl Plan {
    pub fn to_json(&self) -> PlanJson<'_> {
        PlanJson {
            commit: &self.commit,
            create_directories: &self.create_directories,
            vms: self
                .vms
                .iter()
                .map(|vm| VmJson {
                    name: &vm.name,
                    actions: vm.actions.iter().map(action_json).collect(),
                    diff: vm.diff.as_deref(),
                    pending_restart: vm.pending_restart,
                    drift: &vm.drift,
                    drift_healed: !vm.drift.is_empty() && !vm.drift_reported_only,
                    error: vm.error.as_deref(),
                    warnings: &vm.warnings,
                    health: vm.health.as_ref(),
                    depends_on: &vm.order.after,
                    waiting_for: vm.order.waiting.as_deref(),
                })
                .collect(),
            prune: self
                .prune
                .iter()
                .map(|p| PruneJson {
                    name: &p.name,
                    active: p.active,
                    actions: p.actions.iter().map(action_json).collect(),
                    disks: &p.disks,
                    skipped: p.skipped.as_deref(),
                })
                .collect(),
            orphaned_disks: self
                .prune
                .iter()
                .filter(|p| p.skipped.is_none())
                .flat_map(|p| p.disks.iter())
                .collect(),
            refused: self.refused.as_deref(),
            foreign_tagged: self.foreign_tagged,
            noop: self.is_noop(),
            resources: resources_json(&self.resources),
        }
    }
}

/// The plan as text, or as one JSON object.
pub fn output(plan: &Plan, json: bool) -> String {
    if json {
        let mut s = serde_json::to_string_pretty(&plan.to_json()).expect("plan serializes");
        s.push('\n');
        s
    } else {
        render(plan)
    }
}

/// Lines for `vmsync --once` about pruned domains, orphaned disks and reported drift.
pub fn render_extra(outcome: &Outcome) -> String {
    let mut out = resources_outcome(&outcome.resources);
    for vm in outcome.vms.iter().filter(|vm| vm.drift_reported_only) {
        out += &format!(
            "  {}: drift (self_heal is off, left as is): {}\n",
            vm.name,
            vm.drift.join("; ")
        );
    }
    for p in &outcome.pruned {
        match &p.error {
            None => out += &format!("  {}: pruned: {}\n", p.name, p.done.join(", ")),
            Some(e) => out += &format!("  {}: prune failed: {e}\n", p.name),
        }
        for disk in &p.orphaned_disks {
            out += &format!("    orphaned disk (kept): {}\n", disk.display());
        }
    }
    out
}

/// Lines for `vmsync --once` and `vmsync plan` about networks, pools and volumes.
pub fn resources_text(plan: &ResourcePlan) -> String {
    let mut out = String::new();
    for p in plan.pools.iter().chain(&plan.networks) {
        let kind = p.kind();
        if let Some(e) = &p.error {
            out += &format!("  {kind} {}: error: {e}\n", p.name);
            continue;
        }
        for a in &p.actions {
            out += &format!("  {kind} {}: {}\n", p.name, a.describe(kind));
        }
        if !p.affected_vms.is_empty() {
            out += &format!(
                "  {kind} {}: running vms that lose their link while it restarts: {}\n",
                p.name,
                p.affected_vms.join(", ")
            );
        }
        if p.pending_restart {
            out += &format!(
                "  {kind} {}: pending restart (active on its old definition)\n",
                p.name
            );
        }
        if !p.drift.is_empty() {
            let how = if p.drift_reported_only {
                "reported only"
            } else {
                "healed"
            };
            out += &format!(
                "  {kind} {}: drift ({how}): {}\n",
                p.name,
                p.drift.join("; ")
            );
        }
        if let Some(diff) = &p.diff {
            for line in diff.lines() {
                out += &format!("    {line}\n");
            }
        }
    }
    for v in &plan.volumes {
        match (&v.error, &v.create) {
            (Some(e), _) => {
                out += &format!(
                    "  vm {}: volume '{}' of pool '{}': error: {e}\n",
                    v.vm, v.name, v.pool
                )
            }
            (None, Some(_)) => out += &format!("  vm {}: {}\n", v.vm, v.description),
            _ => {}
        }
    }
    for p in &plan.prune {
        let kind = p.kind();
        match &p.skipped {
            Some(why) => out += &format!("  {kind} {}: {why}\n", p.name),
            None => {
                let what: Vec<String> = p.actions.iter().map(|a| a.describe(kind)).collect();
                out += &format!("  {kind} {}: prune: {}\n", p.name, what.join(", "));
                if !p.affected_vms.is_empty() {
                    out += &format!(
                        "  {kind} {}: running vms that lose their link: {}\n",
                        p.name,
                        p.affected_vms.join(", ")
                    );
                }
            }
        }
    }
    out
}

/// Adds a unified diff of each definition that would change (for `vmsync plan`).
pub fn annotate_resources(plan: &mut ResourcePlan) {
    for p in plan.pools.iter_mut().chain(plan.networks.iter_mut()) {
        if p.source_xml.is_empty() {
            continue;
        }
        let before = p.current_xml.clone().unwrap_or_default();
        let diff = diff::unified(&before, &p.source_xml, "host", "commit");
        if !diff.trim().is_empty() {
            p.diff = Some(diff);
        }
    }
}

/// Lines for `vmsync --once` about what was done to networks, pools and volumes.
pub fn resources_outcome(outcome: &ResourceOutcome) -> String {
    let mut out = String::new();
    for o in outcome.pools.iter().chain(&outcome.networks) {
        let kind = o.kind.unwrap_or(ResourceKind::Network);
        if !o.done.is_empty() {
            out += &format!("  {kind} {}: {}\n", o.name, o.done.join(", "));
        }
        if let Some(e) = &o.error {
            out += &format!("  {kind} {}: failed: {e}\n", o.name);
        }
        if o.pending_restart {
            out += &format!(
                "  {kind} {}: pending restart (active on its old definition)\n",
                o.name
            );
        }
        if !o.drift.is_empty() {
            out += &format!("  {kind} {}: drift: {}\n", o.name, o.drift.join("; "));
        }
    }
    for v in &outcome.volumes {
        let (vm, pool, volume) = (&v.vm, &v.pool, &v.name);
        match &v.result {
            Ok(VolumeDone::Created(what)) => out += &format!("  {vm}: {what}\n"),
            Ok(VolumeDone::Exists) => {}
            Err(e) => out += &format!("  {vm}: volume '{volume}' of pool '{pool}' failed: {e}\n"),
        }
    }
    for o in &outcome.pruned {
        let kind = o.kind.unwrap_or(ResourceKind::Network);
        match &o.error {
            None => out += &format!("  {kind} {}: pruned: {}\n", o.name, o.done.join(", ")),
            Some(e) => out += &format!("  {kind} {}: prune failed: {e}\n", o.name),
        }
    }
    out
}

/// The plan's networks, pools and volumes for `vmsync plan --json`.
pub fn resources_json(plan: &ResourcePlan) -> serde_json::Value {
    let one = |p: &ResPlan| {
        let kind = p.kind();
        serde_json::json!({
            "kind": kind,
            "name": p.name,
            "actions": p.actions.iter().map(|a| serde_json::json!({
                "kind": a.kind(kind),
                "description": a.describe(kind),
            })).collect::<Vec<_>>(),
            "error": p.error,
            "pending_restart": p.pending_restart,
            "drift": p.drift,
            "drift_healed": !p.drift.is_empty() && !p.drift_reported_only,
            "adopted": p.adopted,
            "affected_vms": p.affected_vms,
            "skipped": p.skipped,
            "diff": p.diff,
        })
    };
    serde_json::json!({
        "pools": plan.pools.iter().map(one).collect::<Vec<_>>(),
        "volumes": plan.volumes.iter().map(|v| serde_json::json!({
            "vm": v.vm,
            "pool": v.pool,
            "volume": v.name,
            "create": v.create.is_some(),
            "description": v.description,
            "error": v.error,
        })).collect::<Vec<_>>(),
        "networks": plan.networks.iter().map(one).collect::<Vec<_>>(),
        "prune": plan.prune.iter().map(one).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::outcome::PruneOutcome;

    #[test]
    fn outcome_lines_name_prunes_their_failures_and_the_disks_kept() {
        let outcome = Outcome {
            pruned: vec![
                PruneOutcome {
                    name: "old".into(),
                    done: vec!["stop (shut down gracefully)".into(), "undefine".into()],
                    kinds: vec![ActionKind::Stop, ActionKind::Undefine],
                    error: None,
                    orphaned_disks: vec![PathBuf::from("/images/old.qcow2")],
                },
                PruneOutcome {
                    name: "stuck".into(),
                    done: vec![],
                    kinds: vec![],
                    error: Some("failed to shut down".into()),
                    orphaned_disks: vec![],
                },
            ],
            ..Outcome::default()
        };
        assert_eq!(
            render_extra(&outcome),
            "  old: pruned: stop (shut down gracefully), undefine\n    orphaned disk (kept): /images/old.qcow2\n  stuck: prune failed: failed to shut down\n"
        );
        assert_eq!(render_extra(&Outcome::default()), "");
    }
}
