//! The dependency graph of a host's VMs (`depends_on`): its validation (a cycle, a
//! name the manifest does not have, a dependency another host runs) and the order it
//! gives, as waves: every VM of a wave depends only on VMs of earlier waves, so the VMs
//! of one wave start in parallel, and `vmsync shutdown` stops the waves in reverse.
//! Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use crate::desired::manifest::{MANIFEST_FILE, Problem, VmEntry};

/// One VM's place in the dependency graph.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmOrder {
    /// `depends_on`: VMs that must be up before this one starts.
    pub depends_on: Vec<String>,
    /// It depends on a VM or a VM depends on it: vmsync starts it (at boot too), in
    /// order, and libvirt's autostart flag stays off.
    pub in_graph: bool,
}

/// The VMs of one host and what each depends on (names), in manifest order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Graph {
    /// VM name -> the names it depends on (each a VM of this graph).
    pub deps: BTreeMap<String, Vec<String>>,
}

impl Graph {
    /// The graph of `(name, depends_on)` pairs. Dependencies on names not in it are
    /// dropped (validation reports them first).
    pub fn new<'a>(vms: impl IntoIterator<Item = (&'a str, &'a [String])>) -> Graph {
        let vms: Vec<(&str, &[String])> = vms.into_iter().collect();
        let names: BTreeSet<&str> = vms.iter().map(|(n, _)| *n).collect();
        let deps = vms
            .iter()
            .map(|(name, deps)| {
                let known = deps
                    .iter()
                    .filter(|d| names.contains(d.as_str()))
                    .cloned()
                    .collect();
                (name.to_string(), known)
            })
            .collect();
        Graph { deps }
    }

    /// Whether `name` depends on another VM or another VM depends on it: its start
    /// (at boot too) is vmsync's, not libvirt's autostart.
    pub fn in_graph(&self, name: &str) -> bool {
        self.deps.get(name).is_some_and(|d| !d.is_empty())
            || self.deps.values().any(|d| d.iter().any(|x| x == name))
    }

    /// Every VM for which [`Graph::in_graph`] holds, in one pass over the graph (asking
    /// `in_graph` of each VM looks at the whole graph each time: quadratic in the VMs).
    pub fn members(&self) -> BTreeSet<&str> {
        let mut members = BTreeSet::new();
        for (name, deps) in &self.deps {
            if !deps.is_empty() {
                members.insert(name.as_str());
                members.extend(deps.iter().map(String::as_str));
            }
        }
        members
    }

    /// What `name` depends on.
    pub fn of(&self, name: &str) -> &[String] {
        self.deps.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The VMs that depend on `name`, directly.
    pub fn dependents(&self, name: &str) -> Vec<&str> {
        self.deps
            .iter()
            .filter(|(_, d)| d.iter().any(|x| x == name))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// The start order: wave 0 holds the VMs without dependencies, wave n the VMs whose
    /// dependencies are all in earlier waves. VMs on a cycle (validation refuses those)
    /// come last, in one wave.
    pub fn waves(&self) -> Vec<Vec<String>> {
        let mut placed: BTreeSet<&str> = BTreeSet::new();
        let mut waves = Vec::new();
        while placed.len() < self.deps.len() {
            let wave: Vec<String> = self
                .deps
                .iter()
                .filter(|(n, _)| !placed.contains(n.as_str()))
                .filter(|(_, d)| d.iter().all(|x| placed.contains(x.as_str())))
                .map(|(n, _)| n.clone())
                .collect();
            if wave.is_empty() {
                let rest = self
                    .deps
                    .keys()
                    .filter(|n| !placed.contains(n.as_str()))
                    .cloned()
                    .collect();
                waves.push(rest);
                break;
            }
            placed.extend(
                self.deps
                    .keys()
                    .filter(|n| wave.contains(n))
                    .map(String::as_str),
            );
            waves.push(wave);
        }
        waves
    }

    /// The shutdown order: wave 0 holds the VMs nothing depends on (independent ones
    /// too, at once), wave n the VMs whose dependents are all in earlier waves.
    pub fn shutdown_waves(&self) -> Vec<Vec<String>> {
        let mut reversed: BTreeMap<String, Vec<String>> =
            self.deps.keys().map(|n| (n.clone(), Vec::new())).collect();
        for (name, deps) in &self.deps {
            for d in deps {
                if let Some(r) = reversed.get_mut(d) {
                    r.push(name.clone());
                }
            }
        }
        Graph { deps: reversed }.waves()
    }

    /// A cycle, as the path `a -> b -> … -> a`, if the graph has one (the first found,
    /// from the smallest name).
    pub fn cycle(&self) -> Option<Vec<String>> {
        // 0 unvisited, 1 on the current path, 2 done.
        let mut mark: BTreeMap<&str, u8> = BTreeMap::new();
        for start in self.deps.keys() {
            let mut path = Vec::new();
            if let Some(c) = self.visit(start, &mut mark, &mut path) {
                return Some(c);
            }
        }
        None
    }

    fn visit<'a>(
        &'a self,
        name: &'a str,
        mark: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match mark.get(name) {
            Some(2) => return None,
            Some(1) => {
                let from = path.iter().position(|n| *n == name).unwrap_or(0);
                let mut cycle: Vec<String> = path[from..].iter().map(|s| s.to_string()).collect();
                cycle.push(name.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        mark.insert(name, 1);
        path.push(name);
        for dep in self.of(name) {
            if let Some(c) = self.visit(dep, mark, path) {
                return Some(c);
            }
        }
        path.pop();
        mark.insert(name, 2);
        None
    }
}

/// Checks the `depends_on` of the manifest's VMs that `host` runs (every VM when `host`
/// is `None`): each name is a VM of the manifest, run wherever the dependent runs (on
/// `host`; or, validating for every host, on every host in the dependent's `hosts`),
/// not the VM itself, and the graph has no cycle.
pub fn check(vms: &[VmEntry], host: Option<&str>, problems: &mut Vec<Problem>) {
    let by_name: BTreeMap<&str, &VmEntry> = vms.iter().map(|v| (v.name.as_str(), v)).collect();
    let here: Vec<&VmEntry> = vms
        .iter()
        .filter(|v| host.is_none_or(|h| v.targets(h)))
        .collect();
    for vm in &here {
        for dep in &vm.depends_on {
            let problem = |message: String| Problem {
                file: MANIFEST_FILE.into(),
                line: Some(vm.depends_on_line.unwrap_or(vm.line)),
                vm: Some(vm.name.clone()),
                field: Some("depends_on".into()),
                message,
            };
            let Some(target) = by_name.get(dep.as_str()) else {
                problems.push(problem(format!(
                    "depends on '{dep}', which is not a [[vm]] of the manifest"
                )));
                continue;
            };
            if dep == &vm.name {
                problems.push(problem("depends on itself".into()));
            } else if let Some(missing) = runs_without(vm, target, host) {
                problems.push(problem(format!(
                    "depends on '{dep}', which host '{missing}' does not run (not in the hosts of '{dep}')"
                )));
            }
        }
    }
    let graph = Graph::new(
        here.iter()
            .map(|v| (v.name.as_str(), v.depends_on.as_slice())),
    );
    if let Some(cycle) = graph.cycle().filter(|c| c.len() > 2) {
        let first = by_name.get(cycle[0].as_str());
        problems.push(Problem {
            file: MANIFEST_FILE.into(),
            line: first.map(|v| v.depends_on_line.unwrap_or(v.line)),
            vm: Some(cycle[0].clone()),
            field: Some("depends_on".into()),
            message: format!(
                "depends_on forms a cycle: {}; nothing could start first",
                cycle.join(" -> ")
            ),
        });
    }
}

/// A host that runs `vm` but not its dependency `dep`: `host` itself, or (validating
/// for every host) one of `vm`'s hosts, or "every host" when `vm` runs everywhere.
fn runs_without(vm: &VmEntry, dep: &VmEntry, host: Option<&str>) -> Option<String> {
    if let Some(h) = host {
        return (!dep.targets(h)).then(|| h.to_string());
    }
    match (&vm.hosts, &dep.hosts) {
        (_, None) => None,
        (None, Some(_)) => Some("(any host not in its hosts)".into()),
        (Some(mine), Some(_)) => mine.iter().find(|h| !dep.targets(h)).cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> Graph {
        let owned: Vec<(String, Vec<String>)> = edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect();
        Graph::new(owned.iter().map(|(n, d)| (n.as_str(), d.as_slice())))
    }

    #[test]
    fn waves_start_dependencies_first_and_independent_vms_together() {
        let g = graph(&[
            ("app", &["db"]),
            ("db", &["router"]),
            ("router", &[]),
            ("other", &[]),
            ("web", &["db", "router"]),
        ]);
        assert_eq!(
            g.waves(),
            vec![
                vec!["other".to_string(), "router".into()],
                vec!["db".into()],
                vec!["app".into(), "web".into()],
            ]
        );
        assert_eq!(
            g.shutdown_waves(),
            vec![
                vec!["app".to_string(), "other".into(), "web".into()],
                vec!["db".into()],
                vec!["router".into()],
            ]
        );
        assert!(g.in_graph("router") && g.in_graph("app"));
        assert!(!g.in_graph("other"));
        let members = g.members();
        for name in g.deps.keys() {
            assert_eq!(members.contains(name.as_str()), g.in_graph(name), "{name}");
        }
        assert_eq!(g.dependents("db"), ["app", "web"]);
        assert_eq!(g.cycle(), None);
    }

    #[test]
    fn a_cycle_is_found_and_named() {
        let g = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]);
        assert_eq!(
            g.cycle(),
            Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        // Still an order for everything (the cycle last), never a hang.
        assert_eq!(g.waves().concat().len(), 4);
    }
}
