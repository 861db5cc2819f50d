//! Whole-commit validation: every VM this host applies must be valid before anything on
//! the host changes. Produces the desired state, or every problem found.
//!
//! Checks: the manifest (see `manifest`), each targeted VM's XML (readable inside the
//! repository, well-formed, `<name>` equal to the manifest's `name`, accepted by libvirt's
//! schema), unique VM names, UUIDs and disk paths, and disk, backing and directory paths
//! under `policy.disk_roots`, and what each XML asks of the host (`host_policy`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::desired::desired_state::{Desired, DesiredVm, Policy};
use crate::desired::domain_xml::DomainSummary;
use crate::desired::manifest::{self, MANIFEST_FILE, Problem, VmEntry, XmlSource};
use crate::desired::schema_check::SchemaChecker;
use crate::desired::{
    domain_xml, health_spec, host_access, host_policy, image_spec, network_pool_entries, path_rule,
    seed_cache, seed_spec, start_order, template_render,
};
use crate::repo::files::RepoFiles;

fn under_roots(path: &Path, roots: &[PathBuf]) -> bool {
    roots
        .iter()
        .any(|root| path.starts_with(root) && path != root)
}

/// Validates the commit in `files`. Returns all problems, so one run shows every mistake.
pub fn validate(
    files: &dyn RepoFiles,
    policy: &Policy,
    schema: &dyn SchemaChecker,
) -> Result<Desired, Vec<Problem>> {
    let text = files.read_text(MANIFEST_FILE).map_err(|e| {
        vec![Problem {
            file: MANIFEST_FILE.into(),
            line: None,
            vm: None,
            field: None,
            message: e.to_string(),
        }]
    })?;
    let manifest = manifest::parse(&text)?;
    let mut check = Validation {
        files,
        policy,
        schema,
        renderer: template_render::Renderer::new(files),
        text_renderer: template_render::Renderer::for_text(files, policy.secrets.clone()),
        no_params: template_render::Params::new(),
        template_host: policy.host.as_deref().or(policy.render_host.as_deref()),
        identity: std::cell::OnceCell::new(),
        content_ids: Default::default(),
        problems: Vec::new(),
        uuids: BTreeMap::new(),
        disk_paths: BTreeMap::new(),
        vms: Vec::new(),
    };
    check.check_directories(&manifest);
    check.check_unique_names(&manifest);
    for vm in manifest
        .vms
        .iter()
        .filter(|vm| policy.host.as_deref().is_none_or(|h| vm.targets(h)))
    {
        check.check_vm(vm);
    }
    let Validation {
        mut problems, vms, ..
    } = check;

    shared_name_clashes(&manifest, &vms, policy, &mut problems);
    start_order::check(&manifest.vms, policy.host.as_deref(), &mut problems);
    let resources =
        network_pool_entries::validate(&manifest, files, policy, schema, &vms, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Desired {
        directories: manifest.directories,
        vms: mark_graph(vms),
        resources,
        windows: manifest.windows,
    })
}

/// What the checks of one commit share: the inputs, the problems found so far, the UUIDs
/// and disk paths already claimed, and the VMs accepted.
struct Validation<'a> {
    files: &'a dyn RepoFiles,
    policy: &'a Policy,
    schema: &'a dyn SchemaChecker,
    renderer: template_render::Renderer<'a>,
    /// Renders cloud-init templates (no escaping, `secret()`).
    text_renderer: template_render::Renderer<'a>,
    /// What a cloud-init template of a VM without `template` sees as `params`.
    no_params: template_render::Params,
    /// The host name templates see.
    template_host: Option<&'a str>,
    /// `Secrets::version`, read once (the seed cache's key).
    identity: std::cell::OnceCell<Option<String>>,
    /// Content ids of the cloud-init files and secrets, looked up once.
    content_ids: std::cell::RefCell<std::collections::HashMap<String, Option<String>>>,
    problems: Vec<Problem>,
    /// UUID -> the VM that uses it.
    uuids: BTreeMap<String, String>,
    /// Disk path -> the VM that uses it.
    disk_paths: BTreeMap<PathBuf, String>,
    vms: Vec<DesiredVm>,
}

/// One VM's XML as read or rendered.
struct VmXml<'v> {
    /// The file the XML came from (the manifest for inline XML, the template for a
    /// template).
    file: String,
    xml: String,
    /// The template and its variables, for a template.
    vars: Option<(&'v str, template_render::Vars<'v>)>,
    /// A render that is new and may be remembered.
    fresh_render: Option<(String, template_render::Rendered)>,
}

/// A problem of VM `vm` at `file`, `line`, `field`.
fn vm_problem(
    vm: &VmEntry,
    file: &str,
    line: Option<usize>,
    field: &str,
    message: String,
) -> Problem {
    Problem {
        file: file.to_string(),
        line,
        vm: Some(vm.name.clone()),
        field: Some(field.to_string()),
        message,
    }
}

impl<'a> Validation<'a> {
    /// The disk roots as listed in messages.
    fn roots_text(&self) -> String {
        path_rule::roots_text(&self.policy.disk_roots)
    }

    /// Every `[[directory]]` is below a disk root.
    fn check_directories(&mut self, manifest: &manifest::Manifest) {
        for (i, dir) in manifest.directories.iter().enumerate() {
            if !under_roots(dir, &self.policy.disk_roots) {
                let message = format!(
                    "'{}' is not below a disk root ({})",
                    dir.display(),
                    self.roots_text()
                );
                self.problems.push(Problem {
                    file: MANIFEST_FILE.into(),
                    line: None,
                    vm: None,
                    field: Some(format!("directory[{i}].path")),
                    message,
                });
            }
        }
    }

    /// No two `[[vm]]` entries share a name.
    fn check_unique_names(&mut self, manifest: &manifest::Manifest) {
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for vm in &manifest.vms {
            if let Some(first) = names.insert(&vm.name, vm.line) {
                self.problems.push(Problem {
                    file: MANIFEST_FILE.into(),
                    line: Some(vm.line),
                    vm: Some(vm.name.clone()),
                    field: Some("name".into()),
                    message: format!("duplicate vm name (first used on line {first})"),
                });
            }
        }
    }

    /// Checks one VM this host applies and, when it has no problem, accepts it.
    fn check_vm(&mut self, vm: &VmEntry) {
        let before = self.problems.len();
        self.check_disks(vm);
        let Some(loaded) = self.load_xml(vm) else {
            return;
        };
        // A file validated before (same blob id, same policy) is not parsed or checked
        // against libvirt's schema again.
        let content_id = match &vm.xml {
            XmlSource::File(path) => self.files.content_id(path),
            XmlSource::Inline(_) => None,
            // Rendered text validated before under this policy.
            XmlSource::Template { .. } => {
                Some(format!("rendered:{}", domain_xml::fingerprint(&loaded.xml)))
            }
        };
        let cached = content_id.as_deref().and_then(|id| self.schema.known(id));
        let was_cached = cached.is_some();
        let Some(summary) = self.summarize(vm, &loaded, cached) else {
            return;
        };
        self.check_name_and_uuid(vm, &loaded, &summary);
        // A cached file passed the host policy too: the cache is keyed by the policy.
        if !was_cached {
            self.check_host_policy(vm, &loaded);
        }
        if self.problems.len() == before
            && !was_cached
            && let Err(message) = self.schema.check(&loaded.xml)
        {
            self.problems.push(vm_problem(
                vm,
                &loaded.file,
                None,
                "xml",
                message.to_string(),
            ));
        }
        let health = self.allowed_health(vm);
        let seeded = if self.problems.len() == before {
            self.seed(vm, &loaded.xml, content_id.as_deref())
        } else {
            None
        };
        if self.problems.len() == before {
            if let (Some(id), false) = (&content_id, was_cached) {
                self.schema.remember(id, &summary);
            }
            self.accept(vm, loaded, summary, (health, seeded));
        }
    }

    /// The VM's cloud-init seed, built from its files, and the XML with its CD-ROM
    /// (`None`: it has none, or a problem was recorded).
    fn seed(
        &mut self,
        vm: &VmEntry,
        xml: &str,
        xml_id: Option<&str>,
    ) -> Option<seed_cache::Seeded> {
        let spec = vm.cloud_init.as_ref()?;
        let params = match &vm.xml {
            XmlSource::Template { params, .. } => params,
            _ => &self.no_params,
        };
        let default_dir = PathBuf::from(seed_spec::DEFAULT_SEED_DIR);
        let inputs = seed_spec::SeedInputs {
            files: self.files,
            renderer: &self.text_renderer,
            vars: template_render::Vars {
                vm: &vm.name,
                host: self.template_host,
                params,
            },
            seed_dir: self.policy.seed_dir.as_deref().unwrap_or(&default_dir),
        };
        let identity = self
            .identity
            .get_or_init(|| self.policy.secrets.version())
            .as_deref();
        let cached = self.schema.seed_cache().map(|cache| seed_cache::CacheUse {
            cache,
            xml_id,
            identity,
            ids: &self.content_ids,
        });
        match seed_cache::seed(&inputs, spec, xml, cached.as_ref()) {
            Ok(seeded) => Some(seeded),
            Err(p) => {
                let line = p.line.or((p.file == MANIFEST_FILE).then_some(vm.line));
                self.problems
                    .push(vm_problem(vm, &p.file, line, &p.field, p.message));
                None
            }
        }
    }

    /// Disk and backing paths below a disk root, and no disk path shared with another VM.
    fn check_disks(&mut self, vm: &VmEntry) {
        for (i, disk) in vm.disks.iter().enumerate() {
            if !under_roots(&disk.path, &self.policy.disk_roots) {
                let message = format!(
                    "'{}' is not below a disk root ({})",
                    disk.path.display(),
                    self.roots_text()
                );
                self.problems.push(vm_problem(
                    vm,
                    MANIFEST_FILE,
                    Some(vm.line),
                    &format!("disk[{i}].path"),
                    message,
                ));
            }
            if let Some(backing) = &disk.backing
                && !under_roots(backing, &self.policy.disk_roots)
            {
                let message = format!(
                    "'{}' is not below a disk root ({})",
                    backing.display(),
                    self.roots_text()
                );
                self.problems.push(vm_problem(
                    vm,
                    MANIFEST_FILE,
                    Some(vm.line),
                    &format!("disk[{i}].backing"),
                    message,
                ));
            }
            if let Some(image) = &disk.image {
                self.check_image(vm, &image.image);
            }
            if let Some(other) = self.disk_paths.insert(disk.path.clone(), vm.name.clone()) {
                self.problems.push(vm_problem(
                    vm,
                    MANIFEST_FILE,
                    Some(vm.line),
                    &format!("disk[{i}].path"),
                    format!("'{}' is also a disk of vm '{other}'", disk.path.display()),
                ));
            }
        }
    }

    /// Reads the VM's XML file, takes its inline XML or renders its template. `None`
    /// (with a problem recorded) when that fails.
    fn load_xml<'v>(&mut self, vm: &'v VmEntry) -> Option<VmXml<'v>>
    where
        'a: 'v,
    {
        let vars = match &vm.xml {
            XmlSource::Template { path, params } => Some((
                path.as_str(),
                template_render::Vars {
                    vm: &vm.name,
                    host: self.template_host,
                    params,
                },
            )),
            _ => None,
        };
        let mut fresh_render = None;
        let (file, xml) = match &vm.xml {
            XmlSource::Inline(xml) => (MANIFEST_FILE.to_string(), xml.clone()),
            XmlSource::Template { path, .. } => {
                let vars = &vars.as_ref().expect("a template has vars").1;
                match self
                    .renderer
                    .render_cached(self.schema.render_cache(), path, vars)
                {
                    Ok(rendered) => {
                        fresh_render = rendered.fresh;
                        (path.clone(), rendered.xml)
                    }
                    Err(template_render::RenderError::Unreadable(e)) => {
                        self.problems.push(vm_problem(
                            vm,
                            MANIFEST_FILE,
                            Some(vm.line),
                            "template",
                            e.to_string(),
                        ));
                        return None;
                    }
                    Err(template_render::RenderError::Failed(p)) => {
                        self.problems
                            .push(vm_problem(vm, &p.file, p.line, "template", p.message));
                        return None;
                    }
                }
            }
            XmlSource::File(path) => match self.files.read_text(path) {
                Ok(xml) => (path.clone(), xml),
                Err(e) => {
                    self.problems.push(vm_problem(
                        vm,
                        MANIFEST_FILE,
                        Some(vm.line),
                        "xml",
                        e.to_string(),
                    ));
                    return None;
                }
            },
        };
        Some(VmXml {
            file,
            xml,
            vars,
            fresh_render,
        })
    }

    /// Where a problem at `line` of the VM's XML is reported: for a template, at the
    /// template line that wrote it (or the rendered line, when no template text did);
    /// lines inside inline XML are not lines of vmsync.toml: the entry's line.
    fn place(
        &self,
        vm: &VmEntry,
        loaded: &VmXml,
        line: Option<usize>,
        message: String,
    ) -> (String, Option<usize>, String) {
        match (&loaded.vars, line) {
            (Some((template, vars)), Some(line)) => {
                match self.renderer.locate(template, vars, line) {
                    Some((file, line)) => (file, Some(line), message),
                    None => (
                        loaded.file.clone(),
                        None,
                        format!("rendered line {line}: {message}"),
                    ),
                }
            }
            _ => {
                let line = if matches!(vm.xml, XmlSource::Inline(_)) {
                    Some(vm.line)
                } else {
                    line
                };
                (loaded.file.clone(), line, message)
            }
        }
    }

    /// The XML's summary, from the cache or parsed. `None` (with a problem recorded) when
    /// the XML does not parse.
    fn summarize(
        &mut self,
        vm: &VmEntry,
        loaded: &VmXml,
        cached: Option<DomainSummary>,
    ) -> Option<DomainSummary> {
        match cached
            .map(Ok)
            .unwrap_or_else(|| domain_xml::summarize(&loaded.xml))
        {
            Ok(summary) => Some(summary),
            Err(e) => {
                let (file, line, message) = self.place(vm, loaded, e.line, e.message);
                self.problems.push(vm_problem(
                    vm,
                    &file,
                    line,
                    e.field.as_deref().unwrap_or("xml"),
                    message,
                ));
                None
            }
        }
    }

    /// The XML's `<name>` is the manifest's, and its UUID is no other VM's.
    fn check_name_and_uuid(&mut self, vm: &VmEntry, loaded: &VmXml, summary: &DomainSummary) {
        if summary.name != vm.name {
            self.problems.push(vm_problem(
                vm,
                &loaded.file,
                None,
                "name",
                format!(
                    "the xml's <name> is '{}' but the manifest says '{}'",
                    summary.name, vm.name
                ),
            ));
        }
        if let Some(uuid) = &summary.uuid
            && let Some(other) = self.uuids.insert(uuid.clone(), vm.name.clone())
        {
            self.problems.push(vm_problem(
                vm,
                &loaded.file,
                None,
                "uuid",
                format!("uuid {uuid} is also used by vm '{other}'"),
            ));
        }
    }

    /// What the XML asks of the host is allowed by the host's policy.
    fn check_host_policy(&mut self, vm: &VmEntry, loaded: &VmXml) {
        for v in host_policy::check(
            &loaded.xml,
            &self.policy.host_policy,
            &self.policy.disk_roots,
        ) {
            let (file, line, message) = self.place(vm, loaded, v.line, v.message);
            self.problems
                .push(vm_problem(vm, &file, line, &v.field, message));
        }
    }

    /// The VM's health check, its command resolved to a program the host's policy allows
    /// (a check command runs on the host).
    fn allowed_health(&mut self, vm: &VmEntry) -> Option<health_spec::HealthSpec> {
        vm.health.clone().map(|mut spec| {
            if let Some(command) = spec.command.as_mut() {
                match host_access::health_program(
                    &command[0],
                    &self.policy.host_policy.health_commands,
                ) {
                    Ok(program) => command[0] = program.to_string_lossy().into_owned(),
                    Err(message) => self.problems.push(vm_problem(
                        vm,
                        MANIFEST_FILE,
                        Some(vm.line),
                        "health.command",
                        message,
                    )),
                }
            }
            spec
        })
    }

    /// Records a VM without problems: remembers a fresh render and adds it to the
    /// desired state.
    /// An image a disk of `vm` is made from may be downloaded on this host (its URL
    /// under `[policy] image_urls`, no link-local host).
    fn check_image(&mut self, vm: &VmEntry, image: &crate::desired::disk_spec::ImageSpec) {
        let policy = &self.policy.host_policy;
        if let Err(message) =
            image_spec::check_allowed(&image.url, &policy.images, policy.allow_link_local_hosts)
        {
            let message = format!("image '{}': {message}", image.name);
            self.problems.push(vm_problem(
                vm,
                MANIFEST_FILE,
                Some(image.line),
                "image.url",
                message,
            ));
        }
    }

    fn accept(
        &mut self,
        vm: &VmEntry,
        loaded: VmXml,
        summary: DomainSummary,
        (health, seeded): (Option<health_spec::HealthSpec>, Option<seed_cache::Seeded>),
    ) {
        if let (Some((key, rendered)), Some(cache)) =
            (&loaded.fresh_render, self.schema.render_cache())
        {
            cache.remember_rendered(key, rendered);
        }
        // The seed's CD-ROM is part of the definition vmsync defines, and the seed's hash
        // part of its fingerprint.
        let (xml, fingerprint, seed) = match seeded {
            Some(seeded) => {
                let fingerprint = seeded.fingerprint + &seeded.seed.fingerprint_part();
                (seeded.xml, fingerprint, Some(seeded.seed))
            }
            None => {
                let fingerprint = domain_xml::fingerprint(&loaded.xml);
                (loaded.xml, fingerprint, None)
            }
        };
        self.vms.push(DesiredVm {
            name: vm.name.clone(),
            fingerprint,
            xml_file: loaded.file,
            xml,
            seed,
            summary,
            autostart: vm.autostart,
            disks: vm
                .disks
                .iter()
                .map(|d| image_spec::placed(d, &self.policy.host_policy.images.dir))
                .collect(),
            on_change: vm.on_change,
            state: vm.state,
            shutdown_timeout: vm.shutdown_timeout,
            self_heal: vm.self_heal,
            adopt: vm.adopt,
            health,
            order: start_order::VmOrder {
                depends_on: vm.depends_on.clone(),
                in_graph: false,
            },
        });
    }
}

/// Marks the VMs that are in the dependency graph of `vms` (see [`VmOrder::in_graph`]).
fn mark_graph(mut vms: Vec<DesiredVm>) -> Vec<DesiredVm> {
    let graph = start_order::Graph::new(
        vms.iter()
            .map(|v| (v.name.as_str(), v.order.depends_on.as_slice())),
    );
    let members = graph.members();
    for vm in &mut vms {
        vm.order.in_graph = members.contains(vm.name.as_str());
    }
    vms
}

/// A VM's own files in libvirt's shared directories are told by its name (`web.agent`,
/// `web-serial0.log`): a VM whose name is another's plus `.`, `-` or `_` (`web-2`) owns
/// files the shorter one could name too. Such a file named by the shorter one is refused.
/// Only VMs with such a longer-named neighbour in the manifest are looked at again.
fn shared_name_clashes(
    manifest: &manifest::Manifest,
    vms: &[DesiredVm],
    policy: &Policy,
    problems: &mut Vec<Problem>,
) {
    use crate::desired::host_access::{clashes, longer_names};
    let names: Vec<&str> = manifest.vms.iter().map(|v| v.name.as_str()).collect();
    for vm in vms {
        let others = longer_names(&vm.name, &names);
        if others.is_empty() {
            continue;
        }
        let (_, claims) =
            host_policy::check_with_claims(&vm.xml, &policy.host_policy, &policy.disk_roots);
        for (claim, other) in clashes(&claims, &others) {
            problems.push(Problem {
                file: vm.xml_file.clone(),
                // Lines of inline XML are not lines of the manifest.
                line: claim.line.filter(|_| vm.xml_file != MANIFEST_FILE),
                vm: Some(vm.name.clone()),
                field: Some(claim.field.clone()),
                message: format!(
                    "host path '{}' in libvirt's directories is a file of vm '{other}' as much as of this one (their names differ only after a '.', '-' or '_'); name another file",
                    claim.path.display()
                ),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::schema_check::SchemaError;
    use crate::repo::files::MemoryFiles;

    /// Rejects XML containing "<bogus", as libvirt's schema would.
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

        fn check(&self, xml: &str) -> Result<(), SchemaError> {
            if xml.contains("<bogus") {
                Err(SchemaError::Rejected(
                    "Element domain has extra content: bogus".into(),
                ))
            } else {
                Ok(())
            }
        }
    }

    fn xml(name: &str, extra: &str) -> String {
        format!("<domain type='kvm'><name>{name}</name>{extra}<memory>1</memory></domain>")
    }

    fn repo(manifest: &str, xmls: &[(&str, String)]) -> MemoryFiles {
        let mut map: BTreeMap<String, String> = xmls
            .iter()
            .map(|(p, x)| (p.to_string(), x.clone()))
            .collect();
        map.insert(MANIFEST_FILE.into(), manifest.into());
        MemoryFiles::new(map)
    }

    const MANIFEST: &str = r#"version = 1
[[directory]]
path = "/srv/images/ISOs"
[[vm]]
name = "a"
xml = "vms/a.xml"
autostart = true
  [[vm.disk]]
  path = "/srv/images/a.qcow2"
  size = "1G"
[[vm]]
name = "b"
xml = "vms/b.xml"
hosts = ["hv2"]
"#;

    fn policy() -> Policy {
        Policy {
            host: Some("hv1".into()),
            disk_roots: vec!["/srv/images".into()],
            ..Default::default()
        }
    }

    fn run(manifest: &str, xmls: &[(&str, String)]) -> Result<Desired, Vec<Problem>> {
        validate(&repo(manifest, xmls), &policy(), &Schema)
    }

    #[test]
    fn valid_commit_gives_this_hosts_vms() {
        let d = run(
            MANIFEST,
            &[("vms/a.xml", xml("a", "")), ("vms/b.xml", xml("b", ""))],
        )
        .unwrap();
        assert_eq!(d.directories, vec![PathBuf::from("/srv/images/ISOs")]);
        assert_eq!(d.vms.len(), 1, "b is for hv2 only");
        assert_eq!(d.vms[0].name, "a");
        assert!(d.vms[0].autostart);
        assert_eq!(d.vms[0].fingerprint, domain_xml::fingerprint(&xml("a", "")));
        // Another host's VM is not even read: a broken b does not stop hv1.
        run(MANIFEST, &[("vms/a.xml", xml("a", ""))]).unwrap();
    }

    fn single(result: Result<Desired, Vec<Problem>>) -> Problem {
        let problems = result.unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        problems.into_iter().next().unwrap()
    }

    #[test]
    fn each_kind_of_problem_names_file_vm_and_field() {
        let p = single(run(MANIFEST, &[]));
        assert_eq!(
            (p.file.as_str(), p.vm.as_deref(), p.field.as_deref()),
            ("vmsync.toml", Some("a"), Some("xml"))
        );
        assert!(p.message.contains("does not exist"), "{p}");

        let p = single(run(MANIFEST, &[("vms/a.xml", xml("other", ""))]));
        assert_eq!(
            (p.file.as_str(), p.field.as_deref()),
            ("vms/a.xml", Some("name"))
        );
        assert!(
            p.to_string().contains("vm 'a'") && p.message.contains("'other'"),
            "{p}"
        );

        let p = single(run(
            MANIFEST,
            &[(
                "vms/a.xml",
                "<domain><name>a</name>\n<devices></domain>".into(),
            )],
        ));
        assert_eq!((p.file.as_str(), p.line), ("vms/a.xml", Some(2)));

        let p = single(run(MANIFEST, &[("vms/a.xml", xml("a", "<bogus/>"))]));
        assert_eq!(p.field.as_deref(), Some("xml"));
        assert!(
            p.message.contains("rejected by libvirt") && p.message.contains("bogus"),
            "{p}"
        );

        let p = single(run(
            &MANIFEST.replace("/srv/images/a.qcow2", "/etc/a.qcow2"),
            &[("vms/a.xml", xml("a", ""))],
        ));
        assert_eq!(p.field.as_deref(), Some("disk[0].path"));
        assert!(p.message.contains("not below a disk root"), "{p}");

        let p = single(run(
            &MANIFEST.replace("/srv/images/ISOs", "/tmp/ISOs"),
            &[("vms/a.xml", xml("a", ""))],
        ));
        assert_eq!(p.field.as_deref(), Some("directory[0].path"));

        let p = single(run(&MANIFEST.replace("vms/a.xml", "../a.xml"), &[]));
        assert!(p.message.contains("inside the repository"), "{p}");
    }

    #[test]
    fn duplicates_are_refused() {
        let m = MANIFEST
            .replace("name = \"b\"", "name = \"a\"")
            .replace("hosts = [\"hv2\"]\n", "");
        let problems = run(
            &m,
            &[("vms/a.xml", xml("a", "")), ("vms/b.xml", xml("a", ""))],
        )
        .unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.field.as_deref() == Some("name") && p.message.contains("duplicate")),
            "{problems:#?}"
        );

        let m = MANIFEST.replace("hosts = [\"hv2\"]\n", "");
        let uuid = "<uuid>11111111-2222-3333-4444-555555555555</uuid>";
        let p = single(run(
            &m,
            &[("vms/a.xml", xml("a", uuid)), ("vms/b.xml", xml("b", uuid))],
        ));
        assert_eq!(
            (p.vm.as_deref(), p.field.as_deref()),
            (Some("b"), Some("uuid"))
        );

        let m = format!(
            "{}  [[vm.disk]]\n  path = \"/srv/images/a.qcow2\"\n  size = \"1G\"\n",
            MANIFEST.replace("hosts = [\"hv2\"]\n", "")
        );
        let p = single(run(
            &m,
            &[("vms/a.xml", xml("a", "")), ("vms/b.xml", xml("b", ""))],
        ));
        assert!(p.message.contains("also a disk of vm 'a'"), "{p}");
    }

    #[test]
    fn inline_xml_is_validated_too() {
        let m =
            "version = 1\n[[vm]]\nname = \"c\"\nxml_inline = \"<domain><name>d</name></domain>\"\n";
        let p = single(run(m, &[]));
        assert_eq!(
            (p.file.as_str(), p.field.as_deref()),
            ("vmsync.toml", Some("name"))
        );
    }

    #[test]
    fn validating_for_every_host_reads_every_vm() {
        let files = repo(MANIFEST, &[("vms/a.xml", xml("a", ""))]);
        let all = Policy {
            host: None,
            ..policy()
        };
        let p = single(validate(&files, &all, &Schema));
        assert_eq!(p.vm.as_deref(), Some("b"));
    }

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    /// A manifest with an image at `url` and a disk of vm `a` from `image` (`disk_extra`
    /// added to the disk table).
    fn image_manifest(url: &str, image: &str, disk_extra: &str) -> String {
        format!(
            "version = 1\n[[image]]\nname = \"debian\"\nurl = \"{url}\"\nsha256 = \"{SHA}\"\n\
             [[vm]]\nname = \"a\"\nxml = \"vms/a.xml\"\n  [[vm.disk]]\n  path = \"/srv/images/a.qcow2\"\n  \
             size = \"1G\"\n  image = \"{image}\"\n{disk_extra}"
        )
    }

    #[test]
    fn image_disks_are_placed_in_the_image_dir_and_checked_against_the_policy() {
        let xmls = [("vms/a.xml", xml("a", ""))];
        let ok = image_manifest("https://example.org/d.qcow2", "debian", "");
        let d = run(&ok, &xmls).unwrap();
        let image = d.vms[0].disks[0].image.as_ref().unwrap();
        assert!(!image.copy);
        assert_eq!(
            image.file,
            PathBuf::from(format!("/var/lib/libvirt/images/vmsync-images/{SHA}.qcow2"))
        );
        let copy = image_manifest("https://example.org/d.raw.xz", "debian", "  copy = true\n");
        let d = run(&copy, &xmls).unwrap();
        let image = d.vms[0].disks[0].image.as_ref().unwrap();
        assert!(image.copy);
        assert!(image.file.to_string_lossy().ends_with(".raw"));

        // The policy: https:// only by default; the problem names the image's line.
        let http = image_manifest("http://127.0.0.1:8000/d.qcow2", "debian", "");
        let p = single(run(&http, &xmls));
        assert_eq!(p.vm.as_deref(), Some("a"));
        assert_eq!(p.field.as_deref(), Some("image.url"));
        assert_eq!(p.line, Some(3));
        assert!(p.message.contains("[policy] image_urls"), "{}", p.message);
        let mut local = policy();
        local.host_policy.images.urls = vec!["http://127.0.0.1".into()];
        validate(&repo(&http, &xmls), &local, &Schema).unwrap();
        let meta = image_manifest("https://169.254.169.254/d.qcow2", "debian", "");
        let p = single(run(&meta, &xmls));
        assert!(
            p.message.contains("allow_link_local_hosts"),
            "{}",
            p.message
        );
    }

    #[test]
    fn bad_image_references_name_vm_and_field() {
        let xmls = [("vms/a.xml", xml("a", ""))];
        let url = "https://example.org/d.qcow2";
        let cases = [
            ("nope", "", "disk[0].image", "no [[image]] is named 'nope'"),
            (
                "debian",
                "  format = \"raw\"\n",
                "disk[0].format",
                "copy = true",
            ),
            (
                "debian",
                "  backing = \"/srv/images/b.qcow2\"\n",
                "disk[0].backing",
                "not both",
            ),
        ];
        for (image, extra, field, message) in cases {
            let p = single(run(&image_manifest(url, image, extra), &xmls));
            assert_eq!(p.vm.as_deref(), Some("a"));
            assert_eq!(p.field.as_deref(), Some(field), "{p}");
            assert!(p.message.contains(message), "{p}");
        }
        let copy_alone = "version = 1\n[[vm]]\nname = \"a\"\nxml = \"vms/a.xml\"\n[[vm.disk]]\npath = \"/srv/images/a.qcow2\"\nsize = \"1G\"\ncopy = true\n";
        let p = single(run(copy_alone, &xmls));
        assert_eq!(p.field.as_deref(), Some("disk[0].copy"));
        let bad_sha = image_manifest(url, "debian", "").replace(SHA, "abc");
        let p = single(run(&bad_sha, &xmls));
        assert_eq!(p.field.as_deref(), Some("image[0].sha256"), "{p}");
        assert!(p.message.starts_with("image 'debian': "), "{p}");
        let unknown_key =
            image_manifest(url, "debian", "").replace("sha256 =", "sha = \"x\"\nsha256 =");
        let p = single(run(&unknown_key, &xmls));
        assert!(p.message.contains("unknown field `sha`"), "{p}");
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use crate::desired::domain_xml::DomainSummary;
    use crate::desired::schema_check::SchemaError;
    use crate::repo::files::MemoryFiles;
    use std::cell::{Cell, RefCell};

    /// Remembers summaries by content id and counts schema checks.
    #[derive(Default)]
    struct Remembering {
        checks: Cell<usize>,
        files: RefCell<BTreeMap<String, DomainSummary>>,
    }

    impl SchemaChecker for Remembering {
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
            self.checks.set(self.checks.get() + 1);
            Ok(())
        }
        fn known(&self, id: &str) -> Option<DomainSummary> {
            self.files.borrow().get(id).cloned()
        }
        fn remember(&self, id: &str, summary: &DomainSummary) {
            self.files.borrow_mut().insert(id.into(), summary.clone());
        }
    }

    #[test]
    fn a_file_validated_before_under_this_policy_is_not_checked_again() {
        let strict = Policy::default();
        let permissive = Policy {
            host_policy: crate::desired::host_policy_settings::HostPolicy {
                allow_hostdev: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let hostdev = MemoryFiles::new([
            (
                MANIFEST_FILE,
                "version = 1\n[[vm]]\nname = \"a\"\nxml = \"a.xml\"\n",
            ),
            (
                "a.xml",
                "<domain type='kvm'><name>a</name><memory>1</memory><devices><hostdev mode='subsystem' type='pci'/></devices></domain>",
            ),
        ]);
        // Not cached: the host policy refuses it.
        assert!(validate(&hostdev, &strict, &Remembering::default()).is_err());
        // Passed once under the permissive policy: remembered, then neither parsed,
        // policy-checked nor schema-checked again (a cache is only ever loaded for the
        // policy it was filled under, see `schema_cache`).
        let cache = Remembering::default();
        validate(&hostdev, &permissive, &cache).unwrap();
        assert_eq!(cache.checks.get(), 1);
        let again = validate(&hostdev, &permissive, &cache).unwrap();
        assert_eq!(cache.checks.get(), 1);
        assert_eq!(again.vms[0].name, "a");
        // Nothing of the file is looked at again, not even by a stricter policy: that is
        // why `CachedSchema::load` starts empty for any other policy.
        assert!(validate(&hostdev, &strict, &cache).is_ok());
    }
}
