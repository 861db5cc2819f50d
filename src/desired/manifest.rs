//! The VM repository's manifest, `vmsync.toml`: parsing and per-field checks.
//!
//! Parsing is strict (`deny_unknown_fields`): a mistyped key is an error naming the file,
//! the line, the VM and the key, never a silent default. Values are turned into meaningful
//! types here, once: sizes into bytes, formats into [`DiskFormat`], paths into absolute,
//! normalized [`PathBuf`]s. Checks that need more than one VM, the XML or the host policy
//! live in `validate`.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::desired::disk_spec::{DiskFormat, DiskSpec};
use crate::desired::values::{absolute_path, parse_size, parse_timeout};
use crate::desired::{
    cloud_init_spec, health_spec, image_spec, path_rule, resource_xml, template_render, window_spec,
};

/// The manifest's file name at the root of the VM repository.
pub const MANIFEST_FILE: &str = "vmsync.toml";

/// One thing wrong with a commit: where it is (file, line), which VM and field, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub line: Option<usize>,
    pub vm: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every part escaped: a name or path with a newline or ESC is shown, not obeyed.
        let esc = path_rule::escape;
        write!(f, "{}", esc(&self.file))?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(vm) = &self.vm {
            write!(f, ": vm '{}'", path_rule::shown(vm, 80))?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field '{}'", esc(field))?;
        }
        write!(f, ": {}", esc(&self.message))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    version: Spanned<i64>,
    #[serde(default)]
    directory: Vec<RawDirectory>,
    #[serde(default)]
    vm: Vec<RawVm>,
    #[serde(default)]
    network: Vec<RawResource>,
    #[serde(default)]
    pool: Vec<RawResource>,
    /// `[[window]]`: when running guests may be interrupted.
    #[serde(default)]
    window: Vec<window_spec::RawWindow>,
    /// `[[image]]`: base images disks are made from.
    #[serde(default)]
    image: Vec<image_spec::RawImage>,
    /// Defaults for every VM's template parameters.
    params: Option<Spanned<toml::Table>>,
}

/// A `[[network]]` or `[[pool]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: Spanned<String>,
    xml: Option<Spanned<String>>,
    xml_inline: Option<Spanned<String>>,
    #[serde(default)]
    autostart: bool,
    hosts: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    adopt: bool,
    on_change: Option<OnChange>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirectory {
    path: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: Spanned<String>,
    xml: Option<Spanned<String>>,
    xml_inline: Option<Spanned<String>>,
    /// A template rendered into the domain XML, instead of `xml`/`xml_inline`.
    template: Option<Spanned<String>>,
    params: Option<Spanned<toml::Table>>,
    #[serde(default)]
    autostart: bool,
    hosts: Option<Spanned<Vec<String>>>,
    on_change: Option<OnChange>,
    state: Option<Spanned<PowerState>>,
    shutdown_timeout: Option<Spanned<String>>,
    self_heal: Option<bool>,
    health: Option<health_spec::RawHealth>,
    cloud_init: Option<Spanned<cloud_init_spec::RawCloudInit>>,
    #[serde(default)]
    adopt: bool,
    #[serde(default)]
    disk: Vec<RawDisk>,
    /// VMs started before this one (`depends_on`).
    depends_on: Option<Spanned<Vec<String>>>,
}

/// What to do with a running domain whose definition changes (`on_change`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnChange {
    /// Keep it running; report it as pending restart until it is power-cycled (default).
    #[default]
    Defer,
    /// Graceful ACPI shutdown (destroy only after the shutdown timeout), then start.
    Restart,
}

/// The power state vmsync keeps a domain in (`state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    /// Started when not running.
    Running,
    /// Shut down gracefully when running.
    Stopped,
    /// Defined only; vmsync neither starts nor stops it.
    Defined,
}

impl PowerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Running => "running",
            PowerState::Stopped => "stopped",
            PowerState::Defined => "defined",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    /// A disk image file; or `pool` and `volume` (a volume of a libvirt storage pool).
    path: Option<Spanned<String>>,
    pool: Option<Spanned<String>>,
    volume: Option<Spanned<String>>,
    size: Spanned<String>,
    #[serde(default = "default_format")]
    format: DiskFormat,
    backing: Option<Spanned<String>>,
    backing_format: Option<DiskFormat>,
    /// The name of an `[[image]]` the disk is made from (files only).
    image: Option<Spanned<String>>,
    /// With `image`: a full copy instead of a qcow2 overlay.
    copy: Option<Spanned<bool>>,
}

/// A `[[vm.disk]]` with a `path` (an image file vmsync creates with `qemu-img`).
struct FileDisk {
    path: Spanned<String>,
    size: Spanned<String>,
    format: DiskFormat,
    backing: Option<Spanned<String>>,
    backing_format: Option<DiskFormat>,
    image: Option<Spanned<String>>,
    copy: Option<Spanned<bool>>,
}

type ProblemAt<'a> = dyn Fn(std::ops::Range<usize>, Option<&str>, &str, String) -> Problem + 'a;

/// Sorts a `[[vm.disk]]` into a pool volume (`Ok`: the volume, `None` after problems)
/// or an image file (`Err`).
fn volume_disk(
    disk: RawDisk,
    field: &dyn Fn(&str) -> String,
    vm: Option<&str>,
    problem: &ProblemAt,
    problems: &mut Vec<Problem>,
) -> Result<Option<VolumeSpec>, Box<FileDisk>> {
    let (pool, volume) = match (disk.path, disk.pool, disk.volume) {
        (Some(path), None, None) => {
            return Err(Box::new(FileDisk {
                path,
                size: disk.size,
                format: disk.format,
                backing: disk.backing,
                backing_format: disk.backing_format,
                image: disk.image,
                copy: disk.copy,
            }));
        }
        (None, Some(pool), Some(volume)) => (pool, volume),
        (Some(path), _, _) => {
            problems.push(problem(
                path.span(),
                vm,
                &field("path"),
                "set either 'path' or 'pool' and 'volume', not both".into(),
            ));
            return Ok(None);
        }
        (None, pool, volume) => {
            let what = if pool.is_none() && volume.is_none() {
                "missing 'path' (an image file) or 'pool' and 'volume' (a pool volume)"
            } else {
                "a pool volume needs both 'pool' and 'volume'"
            };
            let span = pool
                .map(|p| p.span())
                .or(volume.map(|v| v.span()))
                .unwrap_or(disk.size.span());
            problems.push(problem(span, vm, &field("volume"), what.into()));
            return Ok(None);
        }
    };
    let before = problems.len();
    if let Some(image) = disk
        .image
        .as_ref()
        .map(|i| i.span())
        .or(disk.copy.map(|c| c.span()))
    {
        problems.push(problem(
            image,
            vm,
            &field("image"),
            "'image' and 'copy' are for a disk with a 'path', not a pool volume".into(),
        ));
    }
    for (value, key) in [(&pool, "pool"), (&volume, "volume")] {
        let what = if key == "pool" { "pool" } else { "volume" };
        if let Err(message) = path_rule::check_name(what, value.get_ref()) {
            problems.push(problem(value.span(), vm, &field(key), message));
        }
    }
    let size = parse_size(disk.size.get_ref())
        .map_err(|msg| problems.push(problem(disk.size.span(), vm, &field("size"), msg)))
        .ok();
    let backing = match &disk.backing {
        None => None,
        Some(b) => absolute_path(b.get_ref())
            .map_err(|msg| problems.push(problem(b.span(), vm, &field("backing"), msg)))
            .ok(),
    };
    if disk.format == DiskFormat::Raw && disk.backing.is_some() {
        problems.push(problem(
            volume.span(),
            vm,
            &field("backing"),
            "a raw image cannot have a backing file; use format = \"qcow2\"".into(),
        ));
    }
    if disk.backing.is_none() && disk.backing_format.is_some() {
        problems.push(problem(
            volume.span(),
            vm,
            &field("backing_format"),
            "'backing_format' needs 'backing'".into(),
        ));
    }
    match size {
        Some(size_bytes) if problems.len() == before => Ok(Some(VolumeSpec {
            pool: pool.into_inner(),
            name: volume.into_inner(),
            size_bytes,
            format: disk.format,
            backing,
            backing_format: disk.backing_format,
        })),
        _ => Ok(None),
    }
}

/// Where an entry's XML comes from: exactly one of `xml` and `xml_inline`, else a
/// problem on `xml` (reported at the entry's `name` when both are missing).
fn xml_source(
    xml: Option<Spanned<String>>,
    inline: Option<Spanned<String>>,
    name: std::ops::Range<usize>,
    report: &mut dyn FnMut(std::ops::Range<usize>, &str, String),
) -> Option<XmlSource> {
    match (xml, inline) {
        (Some(file), None) => Some(XmlSource::File(file.into_inner())),
        (None, Some(inline)) => Some(XmlSource::Inline(inline.into_inner())),
        (Some(file), Some(_)) => {
            report(
                file.span(),
                "xml",
                "set either 'xml' or 'xml_inline', not both".into(),
            );
            None
        }
        (None, None) => {
            report(
                name,
                "xml",
                "missing 'xml' (a file in the repository) or 'xml_inline'".into(),
            );
            None
        }
    }
}

/// An entry's `hosts`: `None` (every host) when absent; an empty list or name is a problem.
fn host_list(
    hosts: Option<Spanned<Vec<String>>>,
    report: &mut dyn FnMut(std::ops::Range<usize>, &str, String),
) -> Option<Vec<String>> {
    match hosts {
        Some(hosts)
            if hosts.get_ref().is_empty() || hosts.get_ref().iter().any(|h| h.is_empty()) =>
        {
            report(
                hosts.span(),
                "hosts",
                "'hosts' must list at least one non-empty host name (omit it for every host)"
                    .into(),
            );
            None
        }
        hosts => hosts.map(Spanned::into_inner),
    }
}

/// Parses the `[[network]]` or `[[pool]]` tables.
fn parse_resources(
    raw: Vec<RawResource>,
    kind: resource_xml::ResourceKind,
    text: &str,
    problems: &mut Vec<Problem>,
) -> Vec<ResourceEntry> {
    let mut out = Vec::new();
    for r in raw {
        let name = r.name.get_ref().clone();
        let line = line_of(text, r.name.span().start);
        let at = |span: std::ops::Range<usize>, field: &str, message: String| Problem {
            file: MANIFEST_FILE.into(),
            line: Some(line_of(text, span.start)),
            vm: None,
            field: Some(format!("{kind}.{field}")),
            message: format!("{kind} '{}': {message}", path_rule::shown(&name, 80)),
        };
        if let Err(message) = path_rule::check_name(kind.as_str(), &name) {
            problems.push(at(r.name.span(), "name", message));
        }
        let mut report = |span, field: &str, message| problems.push(at(span, field, message));
        let xml = xml_source(r.xml, r.xml_inline, r.name.span(), &mut report);
        let hosts = host_list(r.hosts, &mut report);
        if let Some(xml) = xml {
            out.push(ResourceEntry {
                kind,
                name,
                line,
                xml,
                autostart: r.autostart,
                hosts,
                adopt: r.adopt,
                on_change: r.on_change.unwrap_or_default(),
            });
        }
    }
    out
}

fn default_format() -> DiskFormat {
    DiskFormat::Qcow2
}

/// Where a VM's domain XML comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XmlSource {
    /// A file in the repository (path relative to the repository root).
    File(String),
    /// Inline in the manifest (`xml_inline`).
    Inline(String),
    /// Rendered from a template in the repository (`template`), with the VM's
    /// parameters (`[params]` with `[vm.params]` over them).
    Template {
        path: String,
        params: template_render::Params,
    },
}

/// One `[[vm]]` entry, with its values checked and typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEntry {
    pub name: String,
    /// Line of the entry's `name` key in `vmsync.toml`.
    pub line: usize,
    pub xml: XmlSource,
    /// Set libvirt's autostart flag and start the domain if it is not running (default false).
    pub autostart: bool,
    /// Hosts that apply this VM; `None` means every host.
    pub hosts: Option<Vec<String>>,
    pub disks: Vec<DiskSpec>,
    /// `on_change`: what a definition change does to a running domain (default "defer").
    pub on_change: OnChange,
    /// `state`: the power state kept (default "running" with autostart, else "defined").
    pub state: PowerState,
    /// `shutdown_timeout`: how long a graceful shutdown may take before the domain is
    /// destroyed (default: the agent's `policy.shutdown_timeout`, itself 120 s).
    pub shutdown_timeout: Option<std::time::Duration>,
    /// `self_heal`: overrides the agent's `policy.self_heal` for this VM.
    pub self_heal: Option<bool>,
    /// `adopt`: take over an existing domain of this name that vmsync did not define
    /// (default false: such a domain is never touched).
    pub adopt: bool,
    /// `[vm.health]`: the check after vmsync starts it with a new definition, and
    /// whether to revert (default: no check).
    pub health: Option<health_spec::HealthSpec>,
    /// `[[vm.disk]]` entries with `pool` and `volume`: volumes made through libvirt's
    /// storage API when missing.
    pub volumes: Vec<VolumeSpec>,
    /// `depends_on`: the VMs that must be up before this one starts (default none).
    pub depends_on: Vec<String>,
    /// Line of the entry's `depends_on` key, when it has one.
    pub depends_on_line: Option<usize>,
    /// `[vm.cloud_init]`: the NoCloud seed vmsync builds and attaches (default: none).
    pub cloud_init: Option<cloud_init_spec::CloudInitSpec>,
}

/// A pool volume a VM's disk names (`[[vm.disk]]` with `pool` and `volume`). Created
/// through libvirt's storage API when missing; never overwritten, shrunk or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub pool: String,
    pub name: String,
    pub size_bytes: u64,
    pub format: DiskFormat,
    /// An image the new volume is layered on (qcow2 only).
    pub backing: Option<PathBuf>,
    pub backing_format: Option<DiskFormat>,
}

/// One `[[network]]` or `[[pool]]` entry, with its values checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceEntry {
    pub kind: resource_xml::ResourceKind,
    pub name: String,
    /// Line of the entry's `name` key in `vmsync.toml`.
    pub line: usize,
    pub xml: XmlSource,
    /// Set libvirt's autostart flag and start it if it is not active (default false).
    pub autostart: bool,
    /// Hosts that apply it; `None` means every host.
    pub hosts: Option<Vec<String>>,
    /// Take over an existing network or pool of this name that vmsync did not define
    /// (default false: such an entry fails and the resource is left alone).
    pub adopt: bool,
    /// What a changed definition does to an active network or pool: "defer" (default,
    /// pending restart) or "restart" (stopped and started again).
    pub on_change: OnChange,
}

impl ResourceEntry {
    /// Whether the host named `host` applies this entry.
    pub fn targets(&self, host: &str) -> bool {
        targets(self.hosts.as_deref(), host)
    }

    /// The file the XML is read from, for messages.
    pub fn xml_file(&self) -> &str {
        self.xml.file()
    }
}

impl VmEntry {
    /// Whether the host named `host` applies this VM.
    pub fn targets(&self, host: &str) -> bool {
        targets(self.hosts.as_deref(), host)
    }

    /// The file the domain XML is read from, for messages.
    pub fn xml_file(&self) -> &str {
        self.xml.file()
    }
}

/// Whether the host named `host` applies an entry with this `hosts` list (`None`: every
/// host). The one rule behind [`VmEntry::targets`] and [`ResourceEntry::targets`].
fn targets(hosts: Option<&[String]>, host: &str) -> bool {
    hosts.is_none_or(|hosts| hosts.iter().any(|h| h == host))
}

impl XmlSource {
    /// The file the XML is read from, for messages (`vmsync.toml` for inline XML).
    pub fn file(&self) -> &str {
        match self {
            XmlSource::File(path) | XmlSource::Template { path, .. } => path,
            XmlSource::Inline(_) => MANIFEST_FILE,
        }
    }
}

/// The parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub directories: Vec<PathBuf>,
    pub vms: Vec<VmEntry>,
    /// `[[network]]` entries.
    pub networks: Vec<ResourceEntry>,
    /// `[[pool]]` entries.
    pub pools: Vec<ResourceEntry>,
    /// `[[window]]` entries: when running guests may be interrupted (none: always).
    pub windows: Vec<window_spec::Window>,
    /// `[[image]]` entries.
    pub images: Vec<crate::desired::disk_spec::ImageSpec>,
}

/// Line numbers of positions in one text, counted on from the previous position when
/// it is not behind (the `[[vm]]` tables come in order: a manifest of a thousand VMs is
/// scanned once, not a thousand times).
struct Lines<'a> {
    text: &'a str,
    pos: usize,
    line: usize,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            pos: 0,
            line: 1,
        }
    }

    /// [`line_of`]`(text, pos)`.
    fn at(&mut self, pos: usize) -> usize {
        let pos = pos.min(self.text.len());
        if pos < self.pos {
            (self.pos, self.line) = (0, 1);
        }
        self.line += self.text.as_bytes()[self.pos..pos]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        self.pos = pos;
        self.line
    }
}

/// The `name` of the `[[vm]]` table that contains `line`, found textually (used only to
/// name the VM in a message when the TOML could not be deserialized).
fn vm_name_around(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let upto = line.min(lines.len());
    let start = (0..upto)
        .rev()
        .find(|i| lines[*i].trim_start().starts_with('['))?;
    let header = lines[start].trim();
    if !header.starts_with("[[vm") && !header.starts_with("[vm.") {
        return None;
    }
    if header != "[[vm]]" {
        // Inside a [[vm.disk]] or [vm.health] table: look further up for its [[vm]].
        let vm_start = (0..start).rev().find(|i| lines[*i].trim() == "[[vm]]")?;
        return name_in_table(&lines[vm_start + 1..]);
    }
    name_in_table(&lines[start + 1..])
}

fn name_in_table(lines: &[&str]) -> Option<String> {
    for line in lines {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            return None;
        }
        if let Some(rest) = trimmed.strip_prefix("name") {
            let value = rest.trim_start().strip_prefix('=')?.trim();
            return Some(value.trim_matches(|c| c == '"' || c == '\'').to_string());
        }
    }
    None
}

/// The key of a `key = value` line (for type errors, whose span is the value).
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let (key, _) = text.lines().nth(line.checked_sub(1)?)?.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    .then(|| key.to_string())
}

/// Parses `vmsync.toml`. Returns every problem found, not just the first.
pub fn parse(text: &str) -> Result<Manifest, Vec<Problem>> {
    let raw = raw_manifest(text)?;
    let mut parse = Parse {
        text,
        lines: Lines::new(text),
        problems: Vec::new(),
        images: Vec::new(),
        image_names: Default::default(),
    };
    parse.check_version(&raw.version);
    let directories = parse.directories(&raw.directory);
    parse.images = parse.images(raw.image);
    let defaults = template_render::params_from_toml(
        raw.params.as_ref(),
        &Default::default(),
        "params",
        &mut |span, field, message| parse.push(span, None, field, message),
    );
    let mut vms = Vec::new();
    for raw_vm in raw.vm {
        if let Some(vm) = parse.vm(raw_vm, &defaults) {
            vms.push(vm);
        }
    }
    let (mut problems, images) = (parse.problems, parse.images);
    let networks = parse_resources(
        raw.network,
        resource_xml::ResourceKind::Network,
        text,
        &mut problems,
    );
    let pools = parse_resources(
        raw.pool,
        resource_xml::ResourceKind::Pool,
        text,
        &mut problems,
    );

    let windows = window_spec::parse_all(
        raw.window,
        &|pos| line_of(text, pos),
        &mut |span, field, message| problems.push(problem_at(text, span, None, &field, message)),
    );
    if problems.is_empty() {
        Ok(Manifest {
            directories,
            vms,
            networks,
            pools,
            windows,
            images,
        })
    } else {
        Err(problems)
    }
}

/// The manifest as TOML, or the one problem that stops reading it.
fn raw_manifest(text: &str) -> Result<RawManifest, Vec<Problem>> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        let vm = line.and_then(|l| vm_name_around(text, l));
        let message = e.message().trim().to_string();
        let field = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string)
            .or_else(|| line.and_then(|l| key_on_line(text, l)));
        vec![Problem {
            file: MANIFEST_FILE.into(),
            line,
            vm,
            field,
            message,
        }]
    })
}

/// A problem at `span` of the manifest `text`.
fn problem_at(
    text: &str,
    span: std::ops::Range<usize>,
    vm: Option<&str>,
    field: &str,
    message: String,
) -> Problem {
    Problem {
        file: MANIFEST_FILE.into(),
        line: Some(line_of(text, span.start)),
        vm: vm.map(str::to_string),
        field: Some(field.to_string()),
        message,
    }
}

/// What the steps of parsing one manifest share: its text, where the last line count
/// stopped, and the problems found so far.
struct Parse<'t> {
    text: &'t str,
    lines: Lines<'t>,
    problems: Vec<Problem>,
    /// The `[[image]]` entries, parsed before the VMs that name them.
    images: Vec<crate::desired::disk_spec::ImageSpec>,
    /// Every `[[image]]` name, valid entry or not.
    image_names: std::collections::BTreeSet<String>,
}

impl Parse<'_> {
    /// Records a problem at `span`.
    fn push(
        &mut self,
        span: std::ops::Range<usize>,
        vm: Option<&str>,
        field: &str,
        message: String,
    ) {
        self.problems
            .push(problem_at(self.text, span, vm, field, message));
    }

    /// `version` is 1.
    fn check_version(&mut self, version: &Spanned<i64>) {
        if *version.get_ref() != 1 {
            self.push(
                version.span(),
                None,
                "version",
                format!(
                    "unsupported manifest version {}; this vmsync reads version 1",
                    version.get_ref()
                ),
            );
        }
    }

    /// The `[[image]]` entries.
    fn images(
        &mut self,
        raw: Vec<image_spec::RawImage>,
    ) -> Vec<crate::desired::disk_spec::ImageSpec> {
        let text = self.text;
        let mut problems = Vec::new();
        self.image_names = raw.iter().map(|r| r.name().to_string()).collect();
        let images = image_spec::parse(
            raw,
            &mut |span, field, message| problems.push(problem_at(text, span, None, field, message)),
            &mut |pos| self.lines.at(pos),
        );
        self.lines = Lines::new(text);
        self.problems.extend(problems);
        images
    }

    /// A disk's `image` and `copy`: the entry it names (`Err` after a problem).
    fn disk_image(
        &mut self,
        disk: &FileDisk,
        field: &dyn Fn(&str) -> String,
        vm: Option<&str>,
    ) -> Result<Option<crate::desired::disk_spec::DiskImage>, ()> {
        let copy = disk.copy.as_ref().is_some_and(|c| *c.get_ref());
        let Some(name) = &disk.image else {
            if let Some(c) = &disk.copy {
                self.push(c.span(), vm, &field("copy"), "'copy' needs 'image'".into());
                return Err(());
            }
            return Ok(None);
        };
        let Some(image) = self.images.iter().find(|i| &i.name == name.get_ref()) else {
            if self.image_names.contains(name.get_ref()) {
                return Err(()); // The entry itself has a problem, reported there.
            }
            let message = format!(
                "no [[image]] is named '{}'",
                path_rule::shown(name.get_ref(), 80)
            );
            self.push(name.span(), vm, &field("image"), message);
            return Err(());
        };
        if disk.backing.is_some() {
            let message = "set either 'image' or 'backing', not both".into();
            self.push(name.span(), vm, &field("backing"), message);
            return Err(());
        }
        if !copy && disk.format != DiskFormat::Qcow2 {
            let message = format!(
                "an overlay on image '{}' is a qcow2 disk, not {}; set format = \"qcow2\" or copy = true",
                image.name, disk.format
            );
            self.push(name.span(), vm, &field("format"), message);
            return Err(());
        }
        Ok(Some(crate::desired::disk_spec::DiskImage::new(
            image.clone(),
            copy,
        )))
    }

    /// The `[[directory]]` paths, each absolute.
    fn directories(&mut self, raw: &[RawDirectory]) -> Vec<PathBuf> {
        let mut directories = Vec::new();
        for (i, dir) in raw.iter().enumerate() {
            match absolute_path(dir.path.get_ref()) {
                Ok(path) => directories.push(path),
                Err(msg) => self.push(dir.path.span(), None, &format!("directory[{i}].path"), msg),
            }
        }
        directories
    }

    /// One `[[vm]]` entry, or `None` when its XML source is unusable (the problems are
    /// recorded either way).
    fn vm(&mut self, mut raw_vm: RawVm, defaults: &template_render::Params) -> Option<VmEntry> {
        let name = raw_vm.name.get_ref().clone();
        let line = self.lines.at(raw_vm.name.span().start);
        let vm = Some(name.as_str());
        if let Err(message) = path_rule::check_name("vm", &name) {
            self.push(raw_vm.name.span(), vm, "name", message);
        }
        let xml = self.vm_xml(&mut raw_vm, vm, defaults);
        let hosts = host_list(raw_vm.hosts, &mut |span, field, message| {
            self.push(span, vm, field, message)
        });
        let state = self.power_state(raw_vm.autostart, raw_vm.state.as_ref(), vm);
        let shutdown_timeout = self.shutdown_timeout(raw_vm.shutdown_timeout.as_ref(), vm);
        let health = raw_vm.health.as_ref().and_then(|raw| {
            health_spec::HealthSpec::parse(raw, |span, field, msg| self.push(span, vm, field, msg))
        });
        let cloud_init = raw_vm.cloud_init.as_ref().and_then(|raw| {
            cloud_init_spec::CloudInitSpec::parse(raw.get_ref(), raw.span(), |span, field, msg| {
                self.push(span, vm, field, msg)
            })
        });
        let (disks, volumes) = self.disks(raw_vm.disk, vm);
        Some(VmEntry {
            cloud_init,
            name,
            line,
            xml: xml?,
            autostart: raw_vm.autostart,
            hosts,
            disks,
            on_change: raw_vm.on_change.unwrap_or_default(),
            state,
            shutdown_timeout,
            self_heal: raw_vm.self_heal,
            adopt: raw_vm.adopt,
            volumes,
            health,
            depends_on_line: raw_vm
                .depends_on
                .as_ref()
                .map(|d| line_of(self.text, d.span().start)),
            depends_on: raw_vm
                .depends_on
                .map(Spanned::into_inner)
                .unwrap_or_default(),
        })
    }

    /// Where the entry's XML comes from: a template with its parameters, or exactly one
    /// of `xml` and `xml_inline`.
    fn vm_xml(
        &mut self,
        raw_vm: &mut RawVm,
        vm: Option<&str>,
        defaults: &template_render::Params,
    ) -> Option<XmlSource> {
        let mut report = |span, field: &str, message| self.push(span, vm, field, message);
        match raw_vm.template.take() {
            Some(template) => template_render::template_source(
                template,
                raw_vm.params.as_ref(),
                [
                    raw_vm.xml.take().map(|x| x.span()),
                    raw_vm.xml_inline.take().map(|x| x.span()),
                ],
                defaults,
                &mut report,
            )
            .map(|(path, params)| XmlSource::Template { path, params }),
            None => {
                if let Some(params) = &raw_vm.params {
                    report(
                        params.span(),
                        "params",
                        "'params' are for a 'template'; this vm has none".into(),
                    );
                }
                if raw_vm.xml.is_none() && raw_vm.xml_inline.is_none() {
                    report(
                        raw_vm.name.span(),
                        "xml",
                        "missing 'xml' (a file in the repository), 'xml_inline' or 'template'"
                            .into(),
                    );
                    None
                } else {
                    xml_source(
                        raw_vm.xml.take(),
                        raw_vm.xml_inline.take(),
                        raw_vm.name.span(),
                        &mut report,
                    )
                }
            }
        }
    }

    /// `state`, by default "running" with autostart, else "defined"; autostart needs
    /// "running".
    fn power_state(
        &mut self,
        autostart: bool,
        state: Option<&Spanned<PowerState>>,
        vm: Option<&str>,
    ) -> PowerState {
        match state {
            None if autostart => PowerState::Running,
            None => PowerState::Defined,
            Some(state) => {
                if autostart && *state.get_ref() != PowerState::Running {
                    self.push(
                        state.span(),
                        vm,
                        "state",
                        format!(
                            "autostart = true starts the domain, so state must be \"running\", not \"{}\"",
                            state.get_ref().as_str()
                        ),
                    );
                }
                *state.get_ref()
            }
        }
    }

    /// `shutdown_timeout`, when given and valid.
    fn shutdown_timeout(
        &mut self,
        timeout: Option<&Spanned<String>>,
        vm: Option<&str>,
    ) -> Option<std::time::Duration> {
        let t = timeout?;
        match parse_timeout(t.get_ref()) {
            Ok(d) => Some(d),
            Err(msg) => {
                self.push(t.span(), vm, "shutdown_timeout", msg);
                None
            }
        }
    }

    /// The entry's `[[vm.disk]]`s: image files and pool volumes.
    fn disks(&mut self, raw: Vec<RawDisk>, vm: Option<&str>) -> (Vec<DiskSpec>, Vec<VolumeSpec>) {
        let mut disks = Vec::new();
        let mut volumes = Vec::new();
        let text = self.text;
        let problem = |span, vm: Option<&str>, field: &str, message| {
            problem_at(text, span, vm, field, message)
        };
        for (i, disk) in raw.into_iter().enumerate() {
            let field = |f: &str| format!("disk[{i}].{f}");
            let disk = match volume_disk(disk, &field, vm, &problem, &mut self.problems) {
                Ok(Some(volume)) => {
                    volumes.push(volume);
                    continue;
                }
                Ok(None) => continue,
                Err(disk) => disk,
            };
            if let Some(spec) = self.file_disk(&disk, &field, vm) {
                disks.push(spec);
            }
        }
        (disks, volumes)
    }

    /// A `[[vm.disk]]` with a `path`, when all its values are valid.
    fn file_disk(
        &mut self,
        disk: &FileDisk,
        field: &dyn Fn(&str) -> String,
        vm: Option<&str>,
    ) -> Option<DiskSpec> {
        let path = absolute_path(disk.path.get_ref())
            .map_err(|msg| self.push(disk.path.span(), vm, &field("path"), msg))
            .ok();
        let size = parse_size(disk.size.get_ref())
            .map_err(|msg| self.push(disk.size.span(), vm, &field("size"), msg))
            .ok();
        let backing = match &disk.backing {
            None => Some(None),
            Some(b) => absolute_path(b.get_ref())
                .map(Some)
                .map_err(|msg| self.push(b.span(), vm, &field("backing"), msg))
                .ok(),
        };
        if disk.format == DiskFormat::Raw && disk.backing.is_some() {
            self.push(
                disk.path.span(),
                vm,
                &field("backing"),
                "a raw image cannot have a backing file; use format = \"qcow2\"".into(),
            );
        }
        if disk.backing.is_none() && disk.backing_format.is_some() {
            self.push(
                disk.path.span(),
                vm,
                &field("backing_format"),
                "'backing_format' needs 'backing'".into(),
            );
        }
        let image = self.disk_image(disk, field, vm);
        let (Some(path), Some(size_bytes), Some(backing), Ok(image)) = (path, size, backing, image)
        else {
            return None;
        };
        let spec = DiskSpec {
            path,
            size_bytes,
            format: disk.format,
            backing,
            backing_format: disk.backing_format,
            image,
        };
        // Raw+backing and a lone backing_format were reported above.
        let reported = (disk.format == DiskFormat::Raw && disk.backing.is_some())
            || (disk.backing.is_none() && disk.backing_format.is_some());
        match spec.validate() {
            Ok(()) => Some(spec),
            Err(_) if reported => None,
            Err(e) => {
                self.push(disk.size.span(), vm, &field("size"), e.to_string());
                None
            }
        }
    }
}

/// 1-based line of byte offset `pos` in `text`.
pub fn line_of(text: &str, pos: usize) -> usize {
    Lines::new(text).at(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_counted_on_agree_with_line_of() {
        let text = "a\nbb\n\nccc\nd";
        let mut lines = Lines::new(text);
        for pos in [0, 1, 2, 5, 6, 7, 3, 0, 11, 12, 99] {
            assert_eq!(lines.at(pos), line_of(text, pos), "at {pos}");
        }
    }

    const GOOD: &str = r#"
version = 1

[[directory]]
path = "/var/lib/libvirt/images/ISOs"

[[vm]]
name = "web"
xml = "vms/web.xml"
autostart = true
hosts = ["hv1"]

  [[vm.disk]]
  path = "/var/lib/libvirt/images/web.qcow2"
  size = "20G"

  [[vm.disk]]
  path = "/var/lib/libvirt/images/web-data.img"
  size = "512M"
  format = "raw"

[[vm]]
name = "db"
xml_inline = '''<domain type="kvm"><name>db</name></domain>'''
"#;

    #[test]
    fn parses_a_full_manifest() {
        let m = parse(GOOD).unwrap();
        assert_eq!(
            m.directories,
            vec![PathBuf::from("/var/lib/libvirt/images/ISOs")]
        );
        assert_eq!(m.vms.len(), 2);
        let web = &m.vms[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.line, 8);
        assert_eq!(web.xml, XmlSource::File("vms/web.xml".into()));
        assert!(web.autostart);
        assert!(web.targets("hv1"));
        assert!(!web.targets("hv2"));
        assert_eq!(web.disks[0].size_bytes, 20 << 30);
        assert_eq!(web.disks[0].format, DiskFormat::Qcow2);
        assert_eq!(web.disks[1].format, DiskFormat::Raw);
        let db = &m.vms[1];
        assert!(!db.autostart, "autostart defaults to false");
        assert!(db.targets("anything"), "no hosts means every host");
        assert!(matches!(db.xml, XmlSource::Inline(_)));
        assert_eq!(db.xml_file(), MANIFEST_FILE);
    }

    fn one_problem(text: &str) -> Problem {
        let problems = parse(text).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems.into_iter().next().unwrap()
    }

    #[test]
    fn unknown_key_names_file_line_vm_and_key() {
        let text = GOOD.replace("autostart = true", "autostrat = true");
        let p = one_problem(&text);
        assert_eq!(p.file, "vmsync.toml");
        assert_eq!(p.line, Some(10));
        assert_eq!(p.vm.as_deref(), Some("web"));
        assert_eq!(p.field.as_deref(), Some("autostrat"));
        assert!(
            p.to_string()
                .starts_with("vmsync.toml:10: vm 'web': field 'autostrat': unknown field"),
            "{p}"
        );
    }

    #[test]
    fn health_table_is_typed_and_strict() {
        let with = |table: &str| {
            GOOD.replace(
                "hosts = [\"hv1\"]\n",
                &format!("hosts = [\"hv1\"]\n{table}"),
            )
        };
        let m = parse(&with(
            "[vm.health]\nsettle = \"2s\"\ncommand = [\"/usr/local/bin/check-web\"]\n",
        ))
        .unwrap();
        let health = m.vms[0].health.as_ref().unwrap();
        assert_eq!(health.settle, std::time::Duration::from_secs(2));
        assert_eq!(health.timeout, std::time::Duration::from_secs(300));
        assert!(health.revert && !health.guest_agent);
        assert_eq!(m.vms[1].health, None, "no table: no check");

        let p = one_problem(&with("[vm.health]\nsetle = \"2s\"\n"));
        assert_eq!(p.vm.as_deref(), Some("web"));
        assert_eq!(p.field.as_deref(), Some("setle"));
        assert_eq!(p.line, Some(13));
        let p = one_problem(&with("[vm.health]\nsettle = \"a while\"\n"));
        assert_eq!(p.field.as_deref(), Some("health.settle"));
        assert_eq!((p.line, p.vm.as_deref()), (Some(13), Some("web")));
    }

    #[test]
    fn unknown_key_in_a_disk_names_the_vm() {
        let text = GOOD.replace("format = \"raw\"", "fromat = \"raw\"");
        let p = one_problem(&text);
        assert_eq!(p.vm.as_deref(), Some("web"));
        assert_eq!(p.field.as_deref(), Some("fromat"));
    }

    #[test]
    fn wrong_types_and_bad_values_are_problems() {
        let p = one_problem(&GOOD.replace("autostart = true", "autostart = \"yes\""));
        assert_eq!(p.line, Some(10));
        assert!(p.message.contains("invalid type"), "{p}");

        let p = one_problem(&GOOD.replace("format = \"raw\"", "format = \"vmdk\""));
        assert!(p.message.contains("unknown variant"), "{p}");

        let p = one_problem(&GOOD.replace("size = \"20G\"", "size = \"20X\""));
        assert_eq!(p.field.as_deref(), Some("disk[0].size"));
        assert_eq!(p.vm.as_deref(), Some("web"));
        assert_eq!(p.line, Some(15));

        let p = one_problem(&GOOD.replace("/var/lib/libvirt/images/web.qcow2", "images/web.qcow2"));
        assert_eq!(p.field.as_deref(), Some("disk[0].path"));
        assert!(p.message.contains("must be absolute"));

        let p = one_problem(&GOOD.replace(
            "/var/lib/libvirt/images/web.qcow2",
            "/var/lib/libvirt/../x.qcow2",
        ));
        assert!(p.message.contains("'..'"));

        let p = one_problem(&GOOD.replace("size = \"20G\"", "size = \"1000\""));
        assert_eq!(p.field.as_deref(), Some("disk[0].size"));
        assert!(p.message.contains("512"), "{p}");

        let p = one_problem(&GOOD.replace("version = 1", "version = 2"));
        assert_eq!(p.field.as_deref(), Some("version"));

        let p = one_problem(&GOOD.replace("hosts = [\"hv1\"]", "hosts = []"));
        assert_eq!(p.field.as_deref(), Some("hosts"));

        let p = one_problem(&GOOD.replace("xml = \"vms/web.xml\"", ""));
        assert_eq!(p.field.as_deref(), Some("xml"));

        let p = one_problem(&GOOD.replace(
            "format = \"raw\"",
            "format = \"raw\"\n  backing = \"/var/lib/libvirt/images/b.qcow2\"",
        ));
        assert_eq!(p.field.as_deref(), Some("disk[1].backing"));
    }

    #[test]
    fn several_problems_are_all_reported() {
        let text = GOOD
            .replace("size = \"20G\"", "size = \"big\"")
            .replace("size = \"512M\"", "size = \"0x\"");
        assert_eq!(parse(&text).unwrap_err().len(), 2);
    }

    #[test]
    fn change_handling_keys_parse_with_defaults_and_checks() {
        let m = parse(GOOD).unwrap();
        assert_eq!(
            m.vms[0].state,
            PowerState::Running,
            "autostart implies running"
        );
        assert_eq!(m.vms[1].state, PowerState::Defined);
        assert_eq!(m.vms[0].on_change, OnChange::Defer);
        assert_eq!(m.vms[0].shutdown_timeout, None);
        assert_eq!(m.vms[0].self_heal, None);

        let text = GOOD.replace(
            "name = \"db\"",
            "name = \"db\"\non_change = \"restart\"\nstate = \"stopped\"\nshutdown_timeout = \"3s\"\nself_heal = false",
        );
        let db = &parse(&text).unwrap().vms[1];
        assert_eq!(db.on_change, OnChange::Restart);
        assert_eq!(db.state, PowerState::Stopped);
        assert_eq!(db.shutdown_timeout, Some(std::time::Duration::from_secs(3)));
        assert_eq!(db.self_heal, Some(false));

        let p =
            one_problem(&GOOD.replace("autostart = true", "autostart = true\nstate = \"stopped\""));
        assert_eq!(
            (p.vm.as_deref(), p.field.as_deref()),
            (Some("web"), Some("state"))
        );
        let p = one_problem(&GOOD.replace("autostart = true", "shutdown_timeout = \"soon\""));
        assert_eq!(p.field.as_deref(), Some("shutdown_timeout"));
        let p = one_problem(&GOOD.replace("autostart = true", "on_change = \"reboot\""));
        assert!(p.message.contains("unknown variant"), "{p}");
        assert_eq!(parse_timeout("90").unwrap().as_secs(), 90);
        assert_eq!(parse_timeout("2m").unwrap().as_secs(), 120);
    }

    #[test]
    fn malformed_toml_has_a_line() {
        let p = one_problem("version = 1\n[[vm]\nname = 'x'\n");
        assert_eq!(p.line, Some(2));
    }
}
