//! libvirt's calls for networks, storage pools and volumes: the `Hypervisor` methods of
//! [`Libvirt`] for them forward here.

use std::collections::HashSet;

use virt::network::Network;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

use crate::desired::resource_xml::ResourceKind;
use crate::host::hypervisor::{HvError, Libvirt, Listing, ResOp};

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
