//! `vmsync shutdown`: shuts the managed running VMs down at host shutdown, in reverse
//! dependency order (the VMs that depend on others first), the independent ones in
//! parallel, each gracefully (an ACPI request) and destroyed only after its
//! `shutdown_timeout`. Which VMs, what they depend on and their timeouts come from the
//! record of the last sync (`state.json`), so it needs neither the network nor the VM
//! repository; only domains that carry vmsync's tag are touched. It does not take the
//! sync lock: at host shutdown it must run even while a sync is stuck.
//!
//! Exit status: 0 every managed running VM is off (also: none was running); 1 one or
//! more could not be stopped (libvirt refused the request or the destroy), or libvirt
//! could not be reached; 2 an agent config error.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tracing::{error, info};

use crate::desired::domain_xml;
use crate::desired::start_order::Graph;
use crate::host::hypervisor::Hypervisor;
use crate::host::power::graceful_stop;
use crate::record::Record;
use crate::util::par;

/// VMs shut down at the same time within a wave (each mostly waits).
pub const THREADS: usize = 16;

/// One VM to shut down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToStop {
    pub name: String,
    pub timeout: Duration,
}

/// How one VM's shutdown went: "shut down gracefully (3.2s)", or the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub name: String,
    pub result: Result<String, String>,
}

/// The shutdown order of the VMs in `record` that are in `running` (managed, tagged
/// and running now): waves, dependents before their dependencies; `default_timeout`
/// for a VM without its own. Pure.
pub fn waves(record: &Record, running: &[String], default_timeout: Duration) -> Vec<Vec<ToStop>> {
    let graph = Graph::new(
        record
            .vms
            .iter()
            .map(|(name, vm)| (name.as_str(), vm.depends_on.as_slice())),
    );
    graph
        .shutdown_waves()
        .into_iter()
        .map(|wave| {
            wave.into_iter()
                .filter(|n| running.contains(n))
                .map(|name| ToStop {
                    timeout: record
                        .vms
                        .get(&name)
                        .and_then(|v| v.shutdown_timeout_seconds)
                        .map_or(default_timeout, Duration::from_secs),
                    name,
                })
                .collect::<Vec<_>>()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// The VMs of `record` that run now and carry vmsync's tag.
pub fn running_managed(hv: &dyn Hypervisor, record: &Record) -> Result<Vec<String>, String> {
    let listing = hv.list().map_err(|e| e.to_string())?;
    let active: BTreeMap<&str, bool> = listing
        .iter()
        .map(|l| (l.name.as_str(), l.active))
        .collect();
    Ok(record
        .vms
        .keys()
        .filter(|n| active.get(n.as_str()).copied().unwrap_or(false))
        .filter(|n| {
            hv.xml(n, true)
                .ok()
                .and_then(|x| domain_xml::read_tag(&x))
                .is_some()
        })
        .cloned()
        .collect())
}

/// Shuts the waves down one after the other, the VMs of a wave in parallel.
pub fn run(hv: &dyn Hypervisor, waves: &[Vec<ToStop>], cancel: &AtomicBool) -> Vec<Stopped> {
    let mut out = Vec::new();
    for (i, wave) in waves.iter().enumerate() {
        let names: Vec<&str> = wave.iter().map(|v| v.name.as_str()).collect();
        info!(wave = i + 1, vms = %names.join(" "), "shutting down");
        out.extend(par::map(wave.iter().collect(), THREADS, |vm: &ToStop| {
            let started = Instant::now();
            let result = graceful_stop(hv, &vm.name, vm.timeout, cancel)
                .map(|how| format!("{how} ({:.1}s)", started.elapsed().as_secs_f64()))
                .map_err(|e| e.to_string());
            match &result {
                Ok(how) => info!(vm = %vm.name, "{how}"),
                Err(e) => error!(vm = %vm.name, error = %e, "failed to shut down"),
            }
            Stopped {
                name: vm.name.clone(),
                result,
            }
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::VmRecord;

    #[test]
    fn dependents_stop_first_with_their_own_timeouts() {
        let mut record = Record::default();
        let vm = |deps: &[&str], secs: Option<u64>| VmRecord {
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            shutdown_timeout_seconds: secs,
            ..Default::default()
        };
        record.vms.insert("router".into(), vm(&[], None));
        record.vms.insert("db".into(), vm(&["router"], Some(30)));
        record.vms.insert("app".into(), vm(&["db"], None));
        record.vms.insert("web".into(), vm(&["db"], None));
        record.vms.insert("other".into(), vm(&[], None));
        let running: Vec<String> = ["router", "db", "app", "other"].map(String::from).into();
        let waves = waves(&record, &running, Duration::from_secs(120));
        let names: Vec<Vec<&str>> = waves
            .iter()
            .map(|w| w.iter().map(|v| v.name.as_str()).collect())
            .collect();
        // web is not running: left out; other (independent) goes with the first wave.
        assert_eq!(
            names,
            vec![vec!["app", "other"], vec!["db"], vec!["router"]]
        );
        assert_eq!(waves[1][0].timeout, Duration::from_secs(30));
        assert_eq!(waves[0][0].timeout, Duration::from_secs(120));
    }
}
