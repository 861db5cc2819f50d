//! A plan for people and machines: the text `vmsync plan` prints, and the JSON object of
//! `vmsync plan --json` and `vmsync --once --dry-run --json`. Rendering only; the
//! planner decides nothing here.

use std::path::PathBuf;

use serde::Serialize;

use crate::reconcile::plan::{Action, ActionKind, Plan};

/// Renders a plan for people (`vmsync plan`).
pub fn render(plan: &Plan) -> String {
    let mut out = format!("plan for commit {}\n", plan.commit);
    for dir in &plan.create_directories {
        out += &format!("  create directory '{}'\n", dir.display());
    }
    // Pools, volumes and networks converge before the domains.
    out += &crate::reconcile::plan_networks_pools::render_text(&plan.resources);
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
    /// Networks, pools and volumes (see `reconcile::resources::to_json`).
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
    pub health: Option<&'a crate::reconcile::health_rules::HealthView>,
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
            resources: crate::reconcile::plan_networks_pools::to_json(&self.resources),
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
