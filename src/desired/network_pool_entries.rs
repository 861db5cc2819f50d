//! Whole-commit validation of `[[network]]`, `[[pool]]` and pool-volume disks, and of
//! what the domains of the commit name of them.
//!
//! Checks: each targeted entry's XML (readable inside the repository, well-formed, root
//! and `<name>` right, accepted by libvirt's network or storage-pool schema and parser),
//! unique names and UUIDs per kind, what each asks of the host (`host_access`: pool
//! targets, sources and devices, dnsmasq options, TFTP roots), one `[[vm.disk]]` per pool volume,
//! backing images below the roots. A domain's `<source network=…>` and
//! `<source pool=… volume=…>`, and a `[[vm.disk]]`'s `pool`, that the commit does not
//! make for this host are kept as [`ExternalRef`]s: the host must have them, which is
//! checked once the host is observed (exit 3 otherwise).

use std::collections::{BTreeMap, BTreeSet};

use crate::desired::desired_state::{
    DesiredResource, DesiredResources, DesiredVm, DesiredVolume, ExternalRef, Policy, Target,
};
use crate::desired::domain_xml::fingerprint;
use crate::desired::manifest::{MANIFEST_FILE, Manifest, Problem, ResourceEntry, XmlSource};
use crate::desired::resource_xml::{self, ResourceKind};
use crate::desired::schema_check::SchemaChecker;
use crate::desired::{host_access, host_policy_settings, path_rule};
use crate::repo::files::RepoFiles;

/// Validates the networks, pools and pool volumes of `manifest` for `policy.host`;
/// `vms`: the commit's valid domains for this host. Problems are added to `problems`.
pub fn validate(
    manifest: &Manifest,
    files: &dyn RepoFiles,
    policy: &Policy,
    schema: &dyn SchemaChecker,
    vms: &[DesiredVm],
    problems: &mut Vec<Problem>,
) -> DesiredResources {
    let check = EntryCheck {
        files,
        policy,
        schema,
    };
    let mut out = DesiredResources::default();
    for (kind, entries) in [
        (ResourceKind::Pool, &manifest.pools),
        (ResourceKind::Network, &manifest.networks),
    ] {
        duplicate_names(kind, entries, problems);
        let valid = check.targeted(kind, entries, problems);
        match kind {
            ResourceKind::Network => out.networks = valid,
            ResourceKind::Pool => out.pools = valid,
        }
    }
    let networks: BTreeSet<&str> = out.networks.iter().map(|n| n.name.as_str()).collect();
    let pools: BTreeSet<&str> = out.pools.iter().map(|p| p.name.as_str()).collect();
    let volumes = pool_volumes(manifest, vms, policy, &pools, problems);
    let refs = domain_refs(vms, &networks, &volumes.taken);
    out.volumes = volumes.volumes;
    out.external = volumes.external;
    out.external.extend(refs);
    out
}

/// A name used twice among the entries of one kind.
fn duplicate_names(kind: ResourceKind, entries: &[ResourceEntry], problems: &mut Vec<Problem>) {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for e in entries {
        if let Some(first) = names.insert(&e.name, e.line) {
            problems.push(entry_problem(
                e,
                MANIFEST_FILE,
                Some(e.line),
                "name",
                format!("duplicate {kind} name (first used on line {first})"),
            ));
        }
    }
}

/// The pool volumes of the commit's domains for this host.
struct PoolVolumes {
    volumes: Vec<DesiredVolume>,
    /// Pools they are in that the commit does not make.
    external: Vec<ExternalRef>,
    /// (pool, volume) → the vm whose disk it is.
    taken: BTreeMap<(String, String), String>,
}

/// Each `[[vm.disk]]` in a pool, of the domains in `vms`: one domain per volume, backing
/// below the disk roots, its pool made by the commit (`pools`) or external.
fn pool_volumes(
    manifest: &Manifest,
    vms: &[DesiredVm],
    policy: &Policy,
    pools: &BTreeSet<&str>,
    problems: &mut Vec<Problem>,
) -> PoolVolumes {
    let mut out = PoolVolumes {
        volumes: Vec::new(),
        external: Vec::new(),
        taken: BTreeMap::new(),
    };
    let wanted: BTreeSet<&str> = vms.iter().map(|vm| vm.name.as_str()).collect();
    for entry in manifest
        .vms
        .iter()
        .filter(|vm| wanted.contains(vm.name.as_str()))
    {
        for (i, v) in entry.volumes.iter().enumerate() {
            let field = |f: &str| format!("disk[{i}].{f}");
            let at = |field: String, message: String| Problem {
                file: MANIFEST_FILE.into(),
                line: Some(entry.line),
                vm: Some(entry.name.clone()),
                field: Some(field),
                message,
            };
            if let Some(other) = out
                .taken
                .insert((v.pool.clone(), v.name.clone()), entry.name.clone())
            {
                problems.push(at(
                    field("volume"),
                    format!(
                        "volume '{}' of pool '{}' is also a disk of vm '{other}'",
                        v.name, v.pool
                    ),
                ));
            }
            if let Some(b) = &v.backing
                && !path_rule::strictly_below(b, &policy.disk_roots)
            {
                problems.push(at(
                    field("backing"),
                    format!(
                        "'{}' is not below a disk root ({})",
                        b.display(),
                        path_rule::roots_text(&policy.disk_roots)
                    ),
                ));
            }
            if !pools.contains(v.pool.as_str()) {
                out.external.push(ExternalRef {
                    vm: entry.name.clone(),
                    file: MANIFEST_FILE.into(),
                    field: field("pool"),
                    target: Target::Pool(v.pool.clone()),
                });
            }
            out.volumes.push(DesiredVolume {
                vm: entry.name.clone(),
                spec: v.clone(),
            });
        }
    }
    out
}

/// The networks and pool volumes the domains' XML names that the commit does not make.
fn domain_refs(
    vms: &[DesiredVm],
    networks: &BTreeSet<&str>,
    volumes: &BTreeMap<(String, String), String>,
) -> Vec<ExternalRef> {
    let mut external = Vec::new();
    for vm in vms {
        let refs = vm.summary.refs.clone();
        for n in refs.networks {
            if !networks.contains(n.as_str()) {
                external.push(ExternalRef {
                    vm: vm.name.clone(),
                    file: vm.xml_file.clone(),
                    field: "devices/interface/source".into(),
                    target: Target::Network(n),
                });
            }
        }
        for (pool, volume) in refs.volumes {
            if !volumes.contains_key(&(pool.clone(), volume.clone())) {
                external.push(ExternalRef {
                    vm: vm.name.clone(),
                    file: vm.xml_file.clone(),
                    field: "devices/disk/source".into(),
                    target: Target::Volume { pool, volume },
                });
            }
        }
    }
    external
}

fn entry_problem(
    e: &ResourceEntry,
    file: &str,
    line: Option<usize>,
    field: &str,
    message: String,
) -> Problem {
    Problem {
        file: file.to_string(),
        line,
        vm: None,
        field: Some(format!("{}.{field}", e.kind)),
        message: format!("{} '{}': {message}", e.kind, e.name),
    }
}

/// What a `[[network]]` or `[[pool]]` entry is checked with.
struct EntryCheck<'a> {
    files: &'a dyn RepoFiles,
    policy: &'a Policy,
    schema: &'a dyn SchemaChecker,
}

impl EntryCheck<'_> {
    /// The valid entries of one kind that target this host, each UUID used once.
    fn targeted(
        &self,
        kind: ResourceKind,
        entries: &[ResourceEntry],
        problems: &mut Vec<Problem>,
    ) -> Vec<DesiredResource> {
        let host = self.policy.host.as_deref();
        let mut valid = Vec::new();
        let mut uuids: BTreeMap<String, String> = BTreeMap::new();
        for e in entries.iter().filter(|e| host.is_none_or(|h| e.targets(h))) {
            let Some(r) = self.entry(e, problems) else {
                continue;
            };
            if let Some(u) = &r.summary.uuid
                && let Some(other) = uuids.insert(u.clone(), e.name.clone())
            {
                problems.push(entry_problem(
                    e,
                    &r.xml_file,
                    None,
                    "uuid",
                    format!("uuid {u} is also used by {kind} '{other}'"),
                ));
                continue;
            }
            valid.push(r);
        }
        valid
    }

    /// One entry: its XML (readable, well-formed, named as the entry), what it asks of
    /// the host, and libvirt's schema; `None` when a problem was found.
    fn entry(&self, e: &ResourceEntry, problems: &mut Vec<Problem>) -> Option<DesiredResource> {
        let (kind, policy) = (e.kind, self.policy);
        let (xml_file, xml) = self.entry_xml(e, problems)?;
        let inline = matches!(e.xml, XmlSource::Inline(_));
        let line = |l: Option<usize>| if inline { Some(e.line) } else { l };
        let summary = match resource_xml::summarize(kind, &xml) {
            Ok(s) => s,
            Err(p) => {
                problems.push(entry_problem(
                    e,
                    &xml_file,
                    line(p.line),
                    p.field.as_deref().unwrap_or("xml"),
                    p.message,
                ));
                return None;
            }
        };
        let before = problems.len();
        if summary.name != e.name {
            problems.push(entry_problem(
                e,
                &xml_file,
                None,
                "name",
                format!(
                    "the xml's <name> is '{}' but the manifest says '{}'",
                    summary.name, e.name
                ),
            ));
        }
        let hp = &policy.host_policy;
        if kind == ResourceKind::Network
            && let Some((what, flag)) = refused_forward(summary.forward_mode.as_deref(), hp)
        {
            problems.push(entry_problem(
                e,
                &xml_file,
                None,
                "forward",
                format!(
                    "{what} is refused by this host's policy (set [policy] {flag} = true to allow it)"
                ),
            ));
        }
        // Paths, devices, namespaces and addresses (`host_access`).
        let violations = match kind {
            ResourceKind::Pool => host_access::check_pool(&xml, hp, &policy.disk_roots),
            ResourceKind::Network => host_access::check_network(&xml, hp, &policy.disk_roots),
        };
        for v in violations {
            problems.push(entry_problem(
                e,
                &xml_file,
                line(v.line),
                &v.field,
                v.message,
            ));
        }
        if problems.len() == before
            && let Err(err) = self.schema.check_resource(kind, &xml)
        {
            problems.push(entry_problem(e, &xml_file, None, "xml", err.to_string()));
        }
        (problems.len() == before).then(|| DesiredResource {
            kind,
            name: e.name.clone(),
            xml_file,
            fingerprint: fingerprint(&xml),
            xml,
            summary,
            autostart: e.autostart,
            adopt: e.adopt,
            on_change: e.on_change,
        })
    }

    /// The entry's XML and the file it is in (the manifest when inline).
    fn entry_xml(
        &self,
        e: &ResourceEntry,
        problems: &mut Vec<Problem>,
    ) -> Option<(String, String)> {
        match &e.xml {
            XmlSource::Inline(xml) => Some((MANIFEST_FILE.to_string(), xml.clone())),
            XmlSource::File(path) => match self.files.read_text(path) {
                Ok(xml) => Some((path.clone(), xml)),
                Err(err) => {
                    problems.push(entry_problem(
                        e,
                        MANIFEST_FILE,
                        Some(e.line),
                        "xml",
                        err.to_string(),
                    ));
                    None
                }
            },
            // `template` is a key of [[vm]] only: a network or pool never has one.
            XmlSource::Template { .. } => None,
        }
    }
}

/// What a domain's interface may not do without the host policy, a network may not do
/// for it either: host NICs passed through, or macvtap on them. The refusal and the
/// `[policy]` flag that allows it.
fn refused_forward(
    mode: Option<&str>,
    hp: &host_policy_settings::HostPolicy,
) -> Option<(&'static str, &'static str)> {
    match mode {
        Some("hostdev") if !hp.allow_hostdev => Some((
            "host network devices passed through (<forward mode='hostdev'>)",
            "allow_hostdev",
        )),
        Some(m @ ("passthrough" | "private" | "vepa")) if !hp.allow_direct_interfaces => Some((
            match m {
                "passthrough" => "macvtap on a host NIC (<forward mode='passthrough'>)",
                "private" => "macvtap on a host NIC (<forward mode='private'>)",
                _ => "macvtap on a host NIC (<forward mode='vepa'>)",
            },
            "allow_direct_interfaces",
        )),
        _ => None,
    }
}

/// Lines for `vmsync validate DIR` about networks, pools and volumes: how many, and
/// what the domains name that the commit does not make (checked against the host at
/// sync time, since `validate` runs offline).
pub fn validate_summary(r: &DesiredResources) -> String {
    if r.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "  {} network(s), {} pool(s), {} pool volume(s)\n",
        r.networks.len(),
        r.pools.len(),
        r.volumes.len()
    );
    for e in &r.external {
        // Names come from the XML: shown escaped, on one line.
        let note = format!(
            "{}: vm '{}': field '{}': {} is not in the commit; the host must have it (checked at sync)",
            e.file, e.vm, e.field, e.target
        );
        out += &format!("  note: {}\n", path_rule::escape(&note));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::schema_check::SchemaError;
    use crate::repo::files::MemoryFiles;

    /// Accepts every domain; networks and pools go through libvirt's real check.
    struct Schema;
    impl SchemaChecker for Schema {
        /// libvirt's own check, in a private test-driver connection (as the host's
        /// checkers do).
        fn check_resource(
            &self,
            kind: crate::desired::resource_xml::ResourceKind,
            xml: &str,
        ) -> Result<(), SchemaError> {
            crate::host::schema_test_driver::check_xml(kind, xml)
        }

        fn check(&self, _xml: &str) -> Result<(), SchemaError> {
            Ok(())
        }
    }

    const VM: &str = "<domain type='kvm'><name>a</name><memory>1</memory><devices><interface type='network'><source network='lab'/></interface><interface type='network'><source network='default'/></interface><disk type='volume'><source pool='vmpool' volume='a.qcow2'/></disk><disk type='volume'><source pool='hostpool' volume='x.img'/></disk></devices></domain>";
    const NET: &str =
        "<network><name>lab</name><forward mode='bridge'/><bridge name='br0'/></network>";
    const POOL: &str =
        "<pool type='dir'><name>vmpool</name><target><path>/srv/images/pool</path></target></pool>";
    const MANIFEST: &str = r#"version = 1
[[network]]
name = "lab"
xml = "lab.xml"
autostart = true
[[pool]]
name = "vmpool"
xml = "pool.xml"
[[vm]]
name = "a"
xml = "a.xml"
  [[vm.disk]]
  pool = "vmpool"
  volume = "a.qcow2"
  size = "1G"
"#;

    fn run(
        manifest: &str,
        files: &[(&str, &str)],
    ) -> Result<crate::desired::desired_state::Desired, Vec<Problem>> {
        let mut map: BTreeMap<String, String> = files
            .iter()
            .map(|(p, x)| (p.to_string(), x.to_string()))
            .collect();
        map.insert(MANIFEST_FILE.into(), manifest.into());
        let policy = Policy {
            host: Some("hv1".into()),
            disk_roots: vec!["/srv/images".into()],
            ..Default::default()
        };
        crate::desired::validate::validate(&MemoryFiles::new(map), &policy, &Schema)
    }

    const GOOD: &[(&str, &str)] = &[("a.xml", VM), ("lab.xml", NET), ("pool.xml", POOL)];

    #[test]
    fn a_valid_commit_gives_networks_pools_volumes_and_what_the_host_must_have() {
        let d = run(MANIFEST, GOOD).unwrap();
        let r = &d.resources;
        assert_eq!(r.networks[0].name, "lab");
        assert!(r.networks[0].autostart);
        assert_eq!(
            r.pools[0].summary.target_path.as_deref(),
            Some("/srv/images/pool")
        );
        assert_eq!(r.volumes[0].spec.name, "a.qcow2");
        let external: Vec<String> = r.external.iter().map(|e| e.target.to_string()).collect();
        assert_eq!(
            external,
            ["network 'default'", "volume 'x.img' of pool 'hostpool'"],
            "lab, vmpool and a.qcow2 are in the commit"
        );
    }

    fn problems(manifest: &str, files: &[(&str, &str)]) -> Vec<String> {
        run(manifest, files)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn each_mistake_is_named() {
        let mtu = NET.replace("</network>", "<mtu size='9000'/></network>");
        let p = problems(
            MANIFEST,
            &[("a.xml", VM), ("lab.xml", &mtu), ("pool.xml", POOL)],
        );
        // libvirt 9.0 refuses it at define already (no rule of vmsync's own).
        assert!(
            p[0].contains("field 'network.xml'") && p[0].contains("mtu size only allowed"),
            "{p:?}"
        );

        let p = problems(
            MANIFEST,
            &[
                ("a.xml", VM),
                ("lab.xml", &NET.replace("lab", "lan")),
                ("pool.xml", POOL),
            ],
        );
        assert!(p[0].contains("the xml's <name> is 'lan'"), "{p:?}");

        let bogus = NET.replace("</network>", "<bogus/></network>");
        let p = problems(
            MANIFEST,
            &[("a.xml", VM), ("lab.xml", &bogus), ("pool.xml", POOL)],
        );
        assert!(
            p[0].contains("rejected by libvirt") && p[0].contains("lab.xml"),
            "{p:?}"
        );

        let p = problems(
            MANIFEST,
            &[
                ("a.xml", VM),
                ("lab.xml", NET),
                ("pool.xml", &POOL.replace("/srv/images/pool", "/srv/images")),
            ],
        );
        assert!(p[0].contains("not below a disk root"), "{p:?}");

        // The host policy holds for networks too.
        let direct = NET
            .replace("mode='bridge'", "mode='passthrough'")
            .replace("<bridge name='br0'/>", "<interface dev='eth0'/>");
        let p = problems(
            MANIFEST,
            &[("a.xml", VM), ("lab.xml", &direct), ("pool.xml", POOL)],
        );
        assert!(
            p[0].contains("field 'network.forward'") && p[0].contains("allow_direct_interfaces"),
            "{p:?}"
        );

        // libvirt's storage-pool schema and parser.
        let bad_pool = POOL.replace("type='dir'", "type='nosuchtype'");
        let p = problems(
            MANIFEST,
            &[("a.xml", VM), ("lab.xml", NET), ("pool.xml", &bad_pool)],
        );
        assert!(
            p[0].contains("pool.xml") && p[0].contains("rejected by libvirt"),
            "{p:?}"
        );

        let twice = format!(
            "{MANIFEST}  [[vm.disk]]\n  pool = \"vmpool\"\n  volume = \"a.qcow2\"\n  size = \"1G\"\n"
        );
        let p = problems(&twice, GOOD);
        assert!(p[0].contains("also a disk of vm 'a'"), "{p:?}");

        let p = problems(&MANIFEST.replace("volume = \"a.qcow2\"\n", ""), GOOD);
        assert!(p[0].contains("needs both 'pool' and 'volume'"), "{p:?}");

        let p = problems(
            &MANIFEST.replace("autostart = true", "autostrat = true"),
            GOOD,
        );
        assert!(p[0].contains("unknown field `autostrat`"), "{p:?}");

        // Another host's network is not read at all.
        let elsewhere = MANIFEST.replace("autostart = true", "hosts = [\"hv2\"]");
        let d = run(&elsewhere, &[("a.xml", VM), ("pool.xml", POOL)]).unwrap();
        assert!(d.resources.networks.is_empty());
        assert!(
            d.resources
                .external
                .iter()
                .any(|e| e.target == Target::Network("lab".into()))
        );
    }
}
