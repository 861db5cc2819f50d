//! The observation of the networks, storage pools and volumes a commit (or the record)
//! names. libvirt's calls for them are in `host::hypervisor::network_pool_calls`, their
//! schema check in `host::schema_test_driver`.
//!
//! Observation costs, when the commit or the record names any network or pool: four
//! list calls per kind (all, active, autostart, persistent: names and UUIDs are known
//! locally), one
//! inactive-XML read per network or pool the commit or the record names (and the live
//! XML of an active one, to tell a pending restart), and one volume listing per pool the
//! commit's volumes use. Hand-made networks and pools the commit does not name are never
//! read. A commit without networks, pools or volumes costs nothing more.

use std::collections::{BTreeMap, BTreeSet};

use crate::desired::desired_state::{DesiredResources, ExternalRef, Target};
use crate::desired::manifest;
use crate::desired::resource_xml::{self, ResourceKind, ResourceSummary};
use crate::host::hypervisor::{HvError, Hypervisor, Listing};

/// One network or pool the commit or the record names, as the host has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenResource {
    pub listing: Listing,
    /// Read from the persistent (inactive) definition; `None` if it could not be read.
    pub inactive: Option<ResourceSummary>,
    /// libvirt's inactive XML.
    pub inactive_xml: Option<String>,
    /// `domain_xml::definition_hash` of it (the drift comparison).
    pub definition_hash: Option<String>,
    /// vmsync's tag in the live definition of an active network.
    pub live_fingerprint: Option<String>,
    /// Whether an active network runs its persistent definition (vmsync's tag aside,
    /// [`resource_xml::live_hash`]); `false` when either could not be read.
    pub live_is_persistent: bool,
}

/// The networks, pools and volumes on the host that matter to a commit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedResources {
    /// By kind and name: the ones the commit or the record names.
    pub seen: BTreeMap<(ResourceKind, String), SeenResource>,
    /// Names of every network and pool on the host (when listed).
    pub names: BTreeSet<(ResourceKind, String)>,
    /// Per pool the commit's volumes or references use: its volumes' names (`Err`: the
    /// pool could not be asked, e.g. it is not active yet).
    pub volumes: BTreeMap<String, Result<BTreeSet<String>, String>>,
}

/// Observes what `desired` and the record (`recorded`: networks and pools this agent
/// applied) name. Asks nothing when neither names a network, pool or volume.
pub fn observe(
    desired: &DesiredResources,
    recorded: &BTreeSet<(ResourceKind, String)>,
    hv: &dyn Hypervisor,
) -> Result<ObservedResources, HvError> {
    let mut out = ObservedResources::default();
    if desired.is_empty() && recorded.is_empty() {
        return Ok(out);
    }
    let mut wanted: BTreeSet<(ResourceKind, String)> = recorded.clone();
    for r in desired.networks.iter().chain(&desired.pools) {
        wanted.insert((r.kind, r.name.clone()));
    }
    let needs = |kind: ResourceKind| {
        wanted.iter().any(|(k, _)| *k == kind)
            || desired.external.iter().any(|e| {
                matches!(
                    (&e.target, kind),
                    (Target::Network(_), ResourceKind::Network)
                        | (Target::Pool(_) | Target::Volume { .. }, ResourceKind::Pool)
                )
            })
            || (kind == ResourceKind::Pool && !desired.volumes.is_empty())
    };
    for kind in [ResourceKind::Pool, ResourceKind::Network] {
        if !needs(kind) {
            continue;
        }
        for listing in hv.list_resources(kind)? {
            out.names.insert((kind, listing.name.clone()));
            let key = (kind, listing.name.clone());
            if !wanted.contains(&key) {
                continue;
            }
            out.seen.insert(key, read_resource(hv, kind, listing));
        }
    }
    // One volume listing per pool a volume of the commit (or a domain) is in, when the
    // pool is active (an inactive or missing pool's volumes are made after it starts).
    let mut pools: BTreeSet<&str> = desired
        .volumes
        .iter()
        .map(|v| v.spec.pool.as_str())
        .collect();
    for e in &desired.external {
        if let Target::Volume { pool, .. } = &e.target {
            pools.insert(pool);
        }
    }
    for pool in pools {
        let active = out
            .seen
            .get(&(ResourceKind::Pool, pool.to_string()))
            .map(|s| s.listing.active)
            .unwrap_or_else(|| out.names.contains(&(ResourceKind::Pool, pool.to_string())));
        if !active {
            continue;
        }
        let volumes = hv
            .pool_volumes(pool)
            .map(|v| v.into_iter().collect())
            .map_err(|e| e.to_string());
        out.volumes.insert(pool.to_string(), volumes);
    }
    Ok(out)
}

/// Reads one listed network or pool: its inactive definition (summary, text, hash) and,
/// for a running network, its live definition's tag and whether that is the persistent
/// one.
fn read_resource(hv: &dyn Hypervisor, kind: ResourceKind, listing: Listing) -> SeenResource {
    let inactive_xml = hv.resource_xml(kind, &listing.name, true).ok();
    let inactive = inactive_xml
        .as_deref()
        .and_then(|x| resource_xml::summarize(kind, x).ok());
    let definition_hash = inactive_xml
        .as_deref()
        .and_then(|x| resource_xml::definition_hash(kind, x));
    let live = if listing.active && kind == ResourceKind::Network {
        hv.resource_xml(kind, &listing.name, false).ok()
    } else {
        None
    };
    let live_fingerprint = live
        .as_deref()
        .and_then(|x| resource_xml::summarize(kind, x).ok())
        .and_then(|s| s.tag)
        .map(|t| t.fingerprint);
    let live_hash = live
        .as_deref()
        .and_then(|x| resource_xml::live_hash(kind, x));
    let live_is_persistent = live_hash.is_some()
        && live_hash
            == inactive_xml
                .as_deref()
                .and_then(|x| resource_xml::live_hash(kind, x));
    SeenResource {
        listing,
        inactive,
        inactive_xml,
        definition_hash,
        live_fingerprint,
        live_is_persistent,
    }
}

/// The references of the commit that neither the commit nor the host has (exit 3).
pub fn missing(desired: &DesiredResources, observed: &ObservedResources) -> Vec<manifest::Problem> {
    let has = |e: &ExternalRef| match &e.target {
        Target::Network(n) => observed.names.contains(&(ResourceKind::Network, n.clone())),
        Target::Pool(p) => {
            desired.pools.iter().any(|d| &d.name == p)
                || observed.names.contains(&(ResourceKind::Pool, p.clone()))
        }
        Target::Volume { pool, volume } => {
            let in_commit_pool = desired.pools.iter().any(|d| &d.name == pool);
            match observed.volumes.get(pool) {
                Some(Ok(names)) => names.contains(volume),
                // A pool the commit makes and that is not active yet: no volume of it
                // exists but those the commit makes (checked in validation).
                None if in_commit_pool => false,
                // An inactive host pool cannot be asked; libvirt says at start.
                None => observed.names.contains(&(ResourceKind::Pool, pool.clone())),
                Some(Err(_)) => true,
            }
        }
    };
    desired
        .external
        .iter()
        .filter(|e| !has(e))
        .map(ExternalRef::problem)
        .collect()
}
