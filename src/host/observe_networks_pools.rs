//! Networks, storage pools and volumes on the host: libvirt's calls for them (the
//! `Hypervisor` methods of `Libvirt` forward here), libvirt's schema and parser check of
//! a network or pool XML, and the observation of the networks, pools and volumes a
//! commit names.
//!
//! Observation costs, when the commit or the record names any network or pool: three
//! list calls per kind (all, active, autostart: names and UUIDs are known locally), one
//! inactive-XML read per network or pool the commit or the record names (and the live
//! XML of an active one, to tell a pending restart), and one volume listing per pool the
//! commit's volumes use. Hand-made networks and pools the commit does not name are never
//! read. A commit without networks, pools or volumes costs nothing more.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};

use virt::connect::Connect;
use virt::network::Network;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

use crate::desired::network_pool_entries::{DesiredResources, ExternalRef, Target};
use crate::desired::resource_xml::{self, ResourceKind, ResourceSummary};
use crate::desired::schema_check::SchemaError;
use crate::host::hypervisor::{HvError, Hypervisor, Libvirt, Listing};

fn err(e: virt::error::Error) -> SchemaError {
    SchemaError::Rejected(e.message().trim().into())
}

/// A private, empty test-driver connection and libvirt's compiled network and pool
/// schemas, per thread (validation runs on one thread).
struct Checker {
    conn: Connect,
    _node: tempfile::NamedTempFile,
    schemas: BTreeMap<ResourceKind, Result<crate::host::schema_rng::Schema, SchemaError>>,
}

thread_local! {
    static CHECKER: RefCell<Option<Checker>> = const { RefCell::new(None) };
}

fn schema_file(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Network => "network.rng",
        ResourceKind::Pool => "storagepool.rng",
    }
}

/// libvirt's check of a network or pool XML, without touching any host: its RNG schema
/// (`network.rng`, `storagepool.rng`), then its parser, by defining the XML into a
/// private test-driver connection and undefining it.
pub fn check_xml(kind: ResourceKind, xml: &str) -> Result<(), SchemaError> {
    CHECKER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            virt::error::clear_error_callback();
            let node = tempfile::Builder::new()
                .prefix("vmsync-schema-")
                .suffix(".xml")
                .tempfile()
                .and_then(|mut f| {
                    std::io::Write::write_all(&mut f, b"<node/>\n")?;
                    Ok(f)
                })
                .map_err(|e| {
                    SchemaError::Unavailable(format!(
                        "failed to write the test driver's node file: {e}"
                    ))
                })?;
            let uri = format!("test://{}", node.path().display());
            let conn = Connect::open(Some(&uri)).map_err(|e| {
                SchemaError::Unavailable(format!("failed to open '{uri}': {}", e.message()))
            })?;
            *cell = Some(Checker {
                conn,
                _node: node,
                schemas: BTreeMap::new(),
            });
        }
        let checker = cell.as_mut().expect("just made");
        let schema = checker.schemas.entry(kind).or_insert_with(|| {
            let file = schema_file(kind);
            let path = crate::host::schema_rng::SCHEMA_DIRS
                .iter()
                .map(|d| std::path::Path::new(d).join(file))
                .find(|p| p.is_file())
                .ok_or_else(|| SchemaError::Unavailable(format!("libvirt's {file} not found")))?;
            crate::host::schema_rng::Schema::compile(&path)
        });
        match schema {
            Ok(schema) => schema.validate(xml)?,
            Err(e) => return Err(e.clone()),
        }
        match kind {
            ResourceKind::Network => {
                let n = checker.conn.define_network_xml(xml).map_err(err)?;
                n.undefine().map_err(err)
            }
            ResourceKind::Pool => {
                let p = checker.conn.define_storage_pool_xml(xml, 0).map_err(err)?;
                p.undefine().map_err(err)
            }
        }
    })
}

/// Network and pool handles by name from the last listing, so that reading a listed
/// one's XML costs one call, not a lookup and a read.
#[derive(Default)]
pub struct Handles {
    networks: std::sync::Mutex<std::collections::HashMap<String, Network>>,
    pools: std::sync::Mutex<std::collections::HashMap<String, StoragePool>>,
}

impl Libvirt {
    fn names_of(&self, kind: ResourceKind, flags: u32) -> Result<HashSet<String>, HvError> {
        let conn = self.connection();
        let names: Result<HashSet<String>, virt::error::Error> = match kind {
            ResourceKind::Network => self
                .counted("list networks", None, || conn.list_all_networks(flags))?
                .iter()
                .map(Network::name)
                .collect(),
            ResourceKind::Pool => self
                .counted("list storage pools", None, || {
                    conn.list_all_storage_pools(flags)
                })?
                .iter()
                .map(StoragePool::name)
                .collect(),
        };
        names.map_err(|e| HvError::new("list", None, self.uri(), e.message()))
    }

    /// Four calls whatever the number, as for domains: all of `kind`, then the active,
    /// autostart and persistent ones by filter (names and UUIDs are known locally).
    pub(crate) fn res_list(&self, kind: ResourceKind) -> Result<Vec<Listing>, HvError> {
        let conn = self.connection();
        let listed = |e: virt::error::Error| HvError::new("list", None, self.uri(), e.message());
        let all: Vec<(String, String)> = match kind {
            ResourceKind::Network => {
                let all = self.counted("list networks", None, || conn.list_all_networks(0))?;
                let mut handles = self.resource_handles.networks.lock().expect("handles lock");
                handles.clear();
                let mut out = Vec::with_capacity(all.len());
                for n in all {
                    let name = n.name().map_err(listed)?;
                    out.push((name.clone(), n.uuid_string().map_err(listed)?));
                    handles.insert(name, n);
                }
                out
            }
            ResourceKind::Pool => {
                let all = self.counted("list storage pools", None, || {
                    conn.list_all_storage_pools(0)
                })?;
                let mut handles = self.resource_handles.pools.lock().expect("handles lock");
                handles.clear();
                let mut out = Vec::with_capacity(all.len());
                for p in all {
                    let name = p.name().map_err(listed)?;
                    out.push((name.clone(), p.uuid_string().map_err(listed)?));
                    handles.insert(name, p);
                }
                out
            }
        };
        let (active, autostart, persistent) = match kind {
            ResourceKind::Network => (
                sys::VIR_CONNECT_LIST_NETWORKS_ACTIVE,
                sys::VIR_CONNECT_LIST_NETWORKS_AUTOSTART,
                sys::VIR_CONNECT_LIST_NETWORKS_PERSISTENT,
            ),
            ResourceKind::Pool => (
                sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE,
                sys::VIR_CONNECT_LIST_STORAGE_POOLS_AUTOSTART,
                sys::VIR_CONNECT_LIST_STORAGE_POOLS_PERSISTENT,
            ),
        };
        let active = self.names_of(kind, active)?;
        let autostart = self.names_of(kind, autostart)?;
        let persistent = self.names_of(kind, persistent)?;
        Ok(all
            .into_iter()
            .map(|(name, uuid)| Listing {
                active: active.contains(&name),
                autostart: autostart.contains(&name),
                persistent: persistent.contains(&name),
                uuid,
                name,
            })
            .collect())
    }

    fn network(&self, name: &str) -> Result<Network, HvError> {
        let known = self.resource_handles.networks.lock().expect("handles lock");
        if let Some(n) = known.get(name) {
            return Ok(n.clone());
        }
        drop(known);
        self.counted("look up network", None, || {
            self.connection().lookup_network_by_name(name)
        })
    }

    fn pool(&self, name: &str) -> Result<StoragePool, HvError> {
        let known = self.resource_handles.pools.lock().expect("handles lock");
        if let Some(p) = known.get(name) {
            return Ok(p.clone());
        }
        drop(known);
        self.counted("look up storage pool", None, || {
            self.connection().lookup_storage_pool_by_name(name)
        })
    }

    pub(crate) fn res_xml(
        &self,
        kind: ResourceKind,
        name: &str,
        inactive: bool,
    ) -> Result<String, HvError> {
        // libvirt's test driver takes no flags (and keeps one definition).
        let inactive = inactive && !self.uri().starts_with("test:");
        match kind {
            ResourceKind::Network => {
                let n = self.network(name)?;
                let flags = if inactive {
                    sys::VIR_NETWORK_XML_INACTIVE
                } else {
                    0
                };
                self.counted("read the XML of network", None, || n.xml_desc(flags))
            }
            ResourceKind::Pool => {
                let p = self.pool(name)?;
                let flags = if inactive {
                    sys::VIR_STORAGE_XML_INACTIVE
                } else {
                    0
                };
                self.counted("read the XML of storage pool", None, || p.xml_desc(flags))
            }
        }
    }

    pub(crate) fn res_define(&self, kind: ResourceKind, xml: &str) -> Result<(), HvError> {
        match kind {
            ResourceKind::Network => self
                .counted("define network", None, || {
                    self.connection().define_network_xml(xml)
                })
                .map(drop),
            ResourceKind::Pool => self
                .counted("define storage pool", None, || {
                    self.connection().define_storage_pool_xml(xml, 0)
                })
                .map(drop),
        }
    }

    pub(crate) fn res_op(&self, kind: ResourceKind, name: &str, op: ResOp) -> Result<(), HvError> {
        match kind {
            ResourceKind::Network => {
                let n = self.network(name)?;
                match op {
                    ResOp::Autostart(on) => {
                        self.counted("set autostart of network", None, || n.set_autostart(on))?;
                    }
                    ResOp::Start => self.counted("start network", None, || n.create())?,
                    ResOp::Build { .. } => {}
                    ResOp::Stop => self.counted("stop network", None, || n.destroy())?,
                    ResOp::Undefine => self.counted("undefine network", None, || n.undefine())?,
                }
            }
            ResourceKind::Pool => {
                let p = self.pool(name)?;
                match op {
                    ResOp::Autostart(on) => {
                        self.counted("set autostart of storage pool", None, || {
                            p.set_autostart(on)
                        })?;
                    }
                    ResOp::Start => self.counted("start storage pool", None, || p.create(0))?,
                    // Never overwrites what is there (a file system, a volume group).
                    // libvirt's test driver takes no flags.
                    ResOp::Build { no_overwrite } => {
                        let flags = if no_overwrite && !self.uri().starts_with("test:") {
                            sys::VIR_STORAGE_POOL_BUILD_NO_OVERWRITE
                        } else {
                            0
                        };
                        self.counted("build storage pool", None, || p.build(flags))?
                    }
                    // Stops it; its storage and volumes stay.
                    ResOp::Stop => self.counted("stop storage pool", None, || p.destroy())?,
                    ResOp::Undefine => {
                        self.counted("undefine storage pool", None, || p.undefine())?
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn res_volumes(&self, pool: &str) -> Result<Vec<String>, HvError> {
        let p = self.pool(pool)?;
        self.counted("list the volumes of storage pool", None, || {
            p.list_volumes()
        })
    }

    pub(crate) fn res_create_volume(&self, pool: &str, xml: &str) -> Result<(), HvError> {
        let p = self.pool(pool)?;
        self.counted("create a volume in storage pool", None, || {
            StorageVol::create_xml(&p, xml, 0)
        })
        .map(drop)
    }
}

/// A change to a network or pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResOp {
    Autostart(bool),
    /// Make the pool's storage (its directory, …); nothing for a network.
    /// `no_overwrite`: libvirt's flag that refuses to format what is there (a file
    /// system, a volume group); a dir pool's build only makes its directory.
    Build {
        no_overwrite: bool,
    },
    Start,
    /// Stop (libvirt's "destroy": a pool's storage and volumes stay).
    Stop,
    /// Undefine (a pool's storage and volumes stay).
    Undefine,
}

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
            out.seen.insert(
                key,
                SeenResource {
                    listing,
                    inactive,
                    inactive_xml,
                    definition_hash,
                    live_fingerprint,
                    live_is_persistent,
                },
            );
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

/// The references of the commit that neither the commit nor the host has (exit 3).
pub fn missing(
    desired: &DesiredResources,
    observed: &ObservedResources,
) -> Vec<crate::desired::manifest::Problem> {
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
