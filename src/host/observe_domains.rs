//! Observation: what the host has now, for the VMs, disks and directories the desired
//! state names, plus the tagged domains that matter for renames (a desired VM's UUID)
//! and pruning (domains this agent's record says it applied). Read-only; one listing
//! (four calls) plus one inactive-XML read per such domain (and a live-XML read for
//! running ones, to tell a pending restart). Other domains are never read.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::desired::desired_state::Desired;
use crate::desired::domain_xml::{self, DomainSummary, Tag};
use crate::host::disk::{DiskProvisioner, ImageInfo};
use crate::host::hypervisor::{HvError, Hypervisor, Listing};
use crate::host::{observe_networks_pools, seed_file};
use crate::util::par;

/// A domain with the same name as a desired VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenDomain {
    pub listing: Listing,
    /// Read from the persistent (inactive) definition; `None` if it could not be parsed.
    pub inactive: Option<DomainSummary>,
    /// vmsync's tag in the running definition (only for active domains).
    pub live_tag: Option<Tag>,
    /// libvirt's inactive XML as read.
    pub inactive_xml: Option<String>,
    /// `domain_xml::definition_hash` of it (the drift comparison).
    pub definition_hash: Option<String>,
}

/// What exists on the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub domains: BTreeMap<String, SeenDomain>,
    /// Domains with vmsync's tag that no desired VM names (rename sources, prunable).
    pub others: BTreeMap<String, SeenDomain>,
    /// Per disk path: `Ok(None)` missing, `Ok(Some(info))` present, `Err` could not inspect.
    pub disks: BTreeMap<PathBuf, Result<Option<ImageInfo>, String>>,
    /// Per directory: whether it exists.
    pub directories: BTreeMap<PathBuf, bool>,
    /// Per base image a missing disk is made from: whether it is in the image directory.
    pub images: BTreeMap<PathBuf, bool>,
    /// Per cloud-init seed path: the hash of the seed there (`None`: no file, or not a
    /// seed vmsync wrote). Hashed: a `Path` compares component by component, and a
    /// no-op sync looks up every seed twice.
    pub seeds: std::collections::HashMap<PathBuf, Option<String>>,
    /// What to remember of the seed images for the next sync (see
    /// `seed_file::observed_hash_since`).
    pub seed_files: seed_file::SeenSeeds,
    /// Networks, pools and volumes (filled in by `host::observe_networks_pools::observe`).
    pub resources: observe_networks_pools::ObservedResources,
}

impl Observed {
    /// The hash of the seed at `seed`'s path on the host (`None`: no file, or not a
    /// seed vmsync wrote).
    pub fn seed_on_host(&self, seed: &crate::desired::seed_spec::SeedSpec) -> Option<&str> {
        self.seeds.get(&seed.path).and_then(|h| h.as_deref())
    }
}

/// Parallel libvirt calls while observing.
pub const THREADS: usize = 4;

/// Observes the host for `desired`. Fails only if libvirt cannot be asked at all.
pub fn observe(
    desired: &Desired,
    applied: &BTreeMap<String, Option<String>>,
    hv: &dyn Hypervisor,
    disks: &dyn DiskProvisioner,
    seen_seeds: &seed_file::SeenSeeds,
) -> Result<Observed, HvError> {
    // Desired VMs by name, with the fingerprint they should carry.
    let wanted: BTreeMap<&str, &str> = desired
        .vms
        .iter()
        .map(|vm| (vm.name.as_str(), vm.fingerprint.as_str()))
        .collect();
    let listed = relevant_domains(desired, applied, hv, &wanted)?;
    // One inactive-XML read per such domain (and the live XML of running ones), on a
    // few threads: libvirt serves concurrent calls on one connection. The cloud-init
    // seeds are looked at meanwhile, on a thread of their own: a seed image unchanged
    // since the last sync (same inode, size and times) is not read again.
    let seed_paths: Vec<&PathBuf> = desired
        .vms
        .iter()
        .filter_map(|vm| vm.seed.as_ref().map(|s| &s.path))
        .collect();
    let read_seeds = || {
        let now = std::time::SystemTime::now();
        let mut hashes = std::collections::HashMap::with_capacity(seed_paths.len());
        let mut files = seed_file::SeenSeeds::with_capacity(seed_paths.len());
        for path in &seed_paths {
            let (hash, seen) = seed_file::observed_hash_since(path, seen_seeds.get(*path), now);
            hashes.insert((*path).clone(), hash);
            if let Some(seen) = seen {
                files.insert((*path).clone(), seen);
            }
        }
        (hashes, files)
    };
    let (seen, seeds) = std::thread::scope(|scope| {
        let seeds = (!seed_paths.is_empty()).then(|| scope.spawn(read_seeds));
        let seen = par::map(listed, THREADS, |(is_wanted, listing)| {
            read_domain(hv, &wanted, applied, is_wanted, listing)
        });
        let seeds = seeds
            .map(|h| h.join().expect("reading seeds does not panic"))
            .unwrap_or_default();
        (seen, seeds)
    });
    let mut domains = BTreeMap::new();
    let mut others = BTreeMap::new();
    for (is_wanted, seen) in seen.into_iter().flatten() {
        let into = if is_wanted { &mut domains } else { &mut others };
        into.insert(seen.listing.name.clone(), seen);
    }
    // One `qemu-img info` process per existing disk: on the same threads as the reads.
    let paths: Vec<&PathBuf> = desired
        .vms
        .iter()
        .flat_map(|vm| vm.disks.iter().map(|d| &d.path))
        .collect();
    let disks_seam = disks;
    let disks = par::map(paths, THREADS, |path| {
        (path.clone(), disks.inspect(path).map_err(|e| e.to_string()))
    })
    .into_iter()
    .collect();
    let directories = desired
        .directories
        .iter()
        .map(|d| (d.clone(), d.is_dir()))
        .collect();
    let images = missing_disk_images(desired, &disks, disks_seam);
    let (seeds, seed_files) = seeds;
    Ok(Observed {
        domains,
        others,
        disks,
        directories,
        images,
        seeds,
        seed_files,
        resources: Default::default(),
    })
}

/// Whether each base image of a disk that is missing is in the image directory (a
/// disk that exists needs no image: a no-op sync looks at none).
fn missing_disk_images(
    desired: &Desired,
    observed: &BTreeMap<PathBuf, Result<Option<ImageInfo>, String>>,
    disks: &dyn DiskProvisioner,
) -> BTreeMap<PathBuf, bool> {
    desired
        .vms
        .iter()
        .flat_map(|vm| &vm.disks)
        .filter(|d| matches!(observed.get(&d.path), Some(Ok(None))))
        .filter_map(|d| d.image.as_ref())
        .map(|i| (i.file.clone(), disks.has_image(&i.file)))
        .collect()
}

/// The listed domains that can matter, each with whether it is desired: the desired
/// domains, the ones this agent applied before (prune candidates) and domains with a
/// desired VM's UUID (renames). Other domains are never read.
fn relevant_domains(
    desired: &Desired,
    applied: &BTreeMap<String, Option<String>>,
    hv: &dyn Hypervisor,
    wanted: &BTreeMap<&str, &str>,
) -> Result<Vec<(bool, Listing)>, HvError> {
    let uuids: std::collections::BTreeSet<String> = desired
        .vms
        .iter()
        .filter_map(|vm| vm.summary.uuid.as_ref().map(|u| u.to_ascii_lowercase()))
        .collect();
    Ok(hv
        .list()?
        .into_iter()
        .filter_map(|l| {
            let is_wanted = wanted.contains_key(l.name.as_str());
            let relevant = is_wanted
                || applied.contains_key(&l.name)
                || uuids.contains(&l.uuid.to_ascii_lowercase());
            relevant.then_some((is_wanted, l))
        })
        .collect())
}

/// Reads one listed domain: its inactive definition (summary, hash, and the text where
/// it is used) and the tag of its running definition. `None`: not vmsync's and not
/// desired.
fn read_domain(
    hv: &dyn Hypervisor,
    wanted: &BTreeMap<&str, &str>,
    applied: &BTreeMap<String, Option<String>>,
    is_wanted: bool,
    listing: Listing,
) -> Option<(bool, SeenDomain)> {
    let inactive_xml = hv.xml(&listing.name, true).ok();
    let baseline = applied.get(&listing.name).and_then(|b| b.as_deref());
    let (inactive, definition_hash) = inactive_xml
        .as_deref()
        .map(|xml| domain_xml::summarize_and_hash(xml, baseline))
        .unwrap_or_default();
    if !is_wanted && inactive.as_ref().is_none_or(|s| s.tag.is_none()) {
        // Not vmsync's: never touched, not even listed.
        return None;
    }
    let live_tag = if listing.active {
        hv.xml(&listing.name, false)
            .ok()
            .and_then(|xml| domain_xml::read_tag(&xml))
    } else {
        None
    };
    // Keep the XML text only where it is used: the diff of a definition the plan
    // renders (the tag's fingerprint differs, or the definition drifted from the
    // recorded baseline) and the disks of a prune candidate. A thousand converged
    // domains would otherwise hold megabytes for nothing.
    let fingerprint_matches = inactive
        .as_ref()
        .and_then(|s| s.tag.as_ref())
        .map(|t| t.fingerprint.as_str())
        == wanted.get(listing.name.as_str()).copied();
    let drifted = matches!(applied.get(&listing.name), Some(Some(base)) if Some(base) != definition_hash.as_ref());
    let converged = is_wanted && fingerprint_matches && !drifted;
    Some((
        is_wanted,
        SeenDomain {
            definition_hash,
            listing,
            inactive,
            live_tag,
            inactive_xml: if converged { None } else { inactive_xml },
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::desired_state::DesiredVm;
    use crate::desired::domain_xml::{definition_hash, fingerprint, render};
    use crate::desired::manifest::{OnChange, PowerState};
    use crate::testing::FakeHost;

    fn committed(name: &str, vcpus: u32) -> String {
        format!(
            "<domain type='qemu'><name>{name}</name><memory>1024</memory><vcpu>{vcpus}</vcpu></domain>"
        )
    }

    fn wanted(name: &str) -> DesiredVm {
        let xml = committed(name, 1);
        DesiredVm {
            name: name.into(),
            xml_file: format!("{name}.xml"),
            summary: domain_xml::summarize(&xml).unwrap(),
            fingerprint: fingerprint(&xml),
            xml,
            autostart: false,
            disks: Vec::new(),
            on_change: OnChange::Defer,
            state: PowerState::Defined,
            shutdown_timeout: None,
            self_heal: None,
            adopt: false,
            health: None,
            order: Default::default(),
            seed: None,
        }
    }

    /// `name` as defined by vmsync from `committed(name, vcpus)`.
    fn defined(name: &str, vcpus: u32) -> (Listing, String) {
        let source = committed(name, vcpus);
        let tag = Tag {
            commit: "c1".into(),
            fingerprint: fingerprint(&source),
        };
        let listing = Listing {
            name: name.into(),
            uuid: format!("00000000-0000-4000-8000-00000000000{vcpus}"),
            active: false,
            autostart: false,
            persistent: true,
        };
        (listing, render(&source, None, &[], &tag).unwrap())
    }

    #[test]
    fn keeps_the_xml_only_where_a_definition_will_be_rendered() {
        let (same, changed, drifted) = (
            defined("same", 1),
            defined("changed", 2),
            defined("drifted", 1),
        );
        let host = FakeHost::with_domains(vec![same, changed, drifted]);
        let desired = Desired {
            directories: Vec::new(),
            vms: ["same", "changed", "drifted"].map(wanted).into(),
            resources: Default::default(),
            windows: Vec::new(),
        };
        let disks = crate::host::disk::QemuImg::default();

        // A cold state (no record): only the domain whose tag differs needs its XML.
        let cold = observe(
            &desired,
            &BTreeMap::new(),
            &host,
            &disks,
            &Default::default(),
        )
        .unwrap();
        let kept = |o: &Observed, name: &str| o.domains[name].inactive_xml.is_some();
        assert!(!kept(&cold, "same") && kept(&cold, "changed") && !kept(&cold, "drifted"));
        assert!(cold.domains.values().all(|d| d.definition_hash.is_some()));

        // With a record whose baseline differs from the definition now (a `virsh edit`).
        let applied = BTreeMap::from([
            (
                "same".to_string(),
                definition_hash(&host.xml("same", true).unwrap()),
            ),
            ("drifted".to_string(), Some("an older baseline".to_string())),
        ]);
        let warm = observe(&desired, &applied, &host, &disks, &Default::default()).unwrap();
        assert!(!kept(&warm, "same") && kept(&warm, "changed") && kept(&warm, "drifted"));
        assert_eq!(
            host.calls(),
            Vec::<String>::new(),
            "observation changes nothing"
        );
    }
}
