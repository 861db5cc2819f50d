//! Observation: what the host has now, for the VMs, disks and directories the desired
//! state names. Read-only; one `list` call plus one inactive-XML read per named domain
//! (and a live-XML read for running ones, to tell a pending restart).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::disk::{DiskProvisioner, ImageInfo};
use crate::domain_xml::{self, DomainSummary, Tag};
use crate::hypervisor::{HvError, Hypervisor, Listing};
use crate::validate::Desired;

/// A domain with the same name as a desired VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenDomain {
    pub listing: Listing,
    /// Read from the persistent (inactive) definition; `None` if it could not be parsed.
    pub inactive: Option<DomainSummary>,
    /// vmsync's tag in the running definition (only for active domains).
    pub live_tag: Option<Tag>,
}

/// What exists on the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub domains: BTreeMap<String, SeenDomain>,
    /// Per disk path: `Ok(None)` missing, `Ok(Some(info))` present, `Err` could not inspect.
    pub disks: BTreeMap<PathBuf, Result<Option<ImageInfo>, String>>,
    /// Per directory: whether it exists.
    pub directories: BTreeMap<PathBuf, bool>,
}

/// Parallel libvirt calls while observing.
pub const THREADS: usize = 4;

/// Observes the host for `desired`. Fails only if libvirt cannot be asked at all.
pub fn observe(
    desired: &Desired,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
) -> Result<Observed, HvError> {
    let wanted: BTreeMap<&str, ()> = desired
        .vms
        .iter()
        .map(|vm| (vm.name.as_str(), ()))
        .collect();
    let listed: Vec<Listing> = hv
        .list()?
        .into_iter()
        .filter(|l| wanted.contains_key(l.name.as_str()))
        .collect();
    // One inactive-XML read per managed domain (and the live XML of running ones), on a
    // few threads: libvirt serves concurrent calls on one connection.
    let seen = crate::par::map(listed, THREADS, |listing| {
        let inactive = hv
            .xml(&listing.name, true)
            .ok()
            .and_then(|xml| domain_xml::summarize(&xml).ok());
        let live_tag = if listing.active {
            hv.xml(&listing.name, false)
                .ok()
                .and_then(|xml| domain_xml::read_tag(&xml))
        } else {
            None
        };
        SeenDomain {
            listing,
            inactive,
            live_tag,
        }
    });
    let domains = seen
        .into_iter()
        .map(|d| (d.listing.name.clone(), d))
        .collect();
    let disks = desired
        .vms
        .iter()
        .flat_map(|vm| vm.disks.iter())
        .map(|disk| {
            (
                disk.path.clone(),
                disks.inspect(&disk.path).map_err(|e| e.to_string()),
            )
        })
        .collect();
    let directories = desired
        .directories
        .iter()
        .map(|d| (d.clone(), d.is_dir()))
        .collect();
    Ok(Observed {
        domains,
        disks,
        directories,
    })
}
