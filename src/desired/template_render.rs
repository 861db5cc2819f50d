//! Templated domain XML (`[[vm]] template = "…"`): rendering with the `minijinja` crate
//! (Jinja, as Ansible users write it), bounded and sealed, and the mapping of a problem
//! back to the template line that wrote it.
//!
//! What a template sees: `vm.name`, `host` (the agent's host name) and `params` (the
//! repository's `[params]` with the VM's `[vm.params]` over them). What it may load:
//! other files of the same commit, through the [`RepoFiles`] it is handed, with the checks
//! every repository path gets (relative, no `..`, no symlink, UTF-8, at most 1 MiB). It
//! has no access to the environment, the host's files, the network or the clock, so the
//! same template, params and files always render the same text: that is what lets a
//! render be remembered ([`RenderCache`]) instead of done on every sync.
//!
//! Bounds: a name the template uses that is not defined is an error
//! (`UndefinedBehavior::Strict`); a render runs on [`FUEL`] (a loop that does not end
//! stops there), at most [`RECURSION_LIMIT`] levels deep, loads at most
//! [`MAX_TEMPLATE_FILES`] files, and its output is at most [`MAX_OUTPUT_BYTES`], the
//! limit of a plain domain XML file.
//!
//! Values written with `{{ … }}` are XML-escaped (`& < > " '`); `| safe` writes a value
//! as it is. A table or an array written as text is an error (it is a param of the
//! wrong type for that place), not its debug form.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use minijinja::value::{Serde, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, OutputSpanKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::desired::secret_port::Secrets;
use crate::desired::template_secrets;
use crate::repo::files::{FileError, MAX_FILE_BYTES, RepoFiles, check_repo_path};

/// The work one render may do, in minijinja's fuel units (about one per instruction;
/// allocations are charged too). A domain XML template with loops over a few dozen
/// disks and interfaces uses a few thousand.
pub const FUEL: u64 = 500_000;
/// How deep includes, macros and nested blocks may go (minijinja's own cap is 500).
pub const RECURSION_LIMIT: usize = 100;
/// Largest rendered XML: the limit of a domain XML file in the repository.
pub const MAX_OUTPUT_BYTES: usize = MAX_FILE_BYTES as usize;
/// Files one VM's render may load besides its template (what it includes, imports or
/// extends; files loaded for an earlier VM of the commit are not counted again).
pub const MAX_TEMPLATE_FILES: usize = 64;

/// The parameters of one VM's template: `[params]` with `[vm.params]` over them.
pub type Params = serde_json::Map<String, serde_json::Value>;

/// What a template is rendered with.
#[derive(Debug, Clone, Copy)]
pub struct Vars<'a> {
    /// `vm.name`.
    pub vm: &'a str,
    /// `host`: the agent's host name (`None`: using it is an error).
    pub host: Option<&'a str>,
    /// `params`.
    pub params: &'a Params,
}

/// Where in the templates a problem is, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateProblem {
    /// The template file (the VM's template or a file it loaded).
    pub file: String,
    /// 1-based line in `file`, when known.
    pub line: Option<usize>,
    pub message: String,
}

/// Why a VM's template did not render.
#[derive(Debug, PartialEq, Eq)]
pub enum RenderError {
    /// The template file named in the manifest could not be read (reported on the
    /// manifest's `template` key, like an unreadable `xml` file).
    Unreadable(FileError),
    /// Rendering failed: a syntax error, an undefined name, a bad include, a type the
    /// template cannot use, the fuel or the output limit.
    Failed(TemplateProblem),
}

/// A render remembered: the XML, and the content id of every file the environment had
/// loaded (or found missing) when it was made. It is still good while each of those
/// files has the same content id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendered {
    pub xml: String,
    pub deps: Vec<(String, Option<String>)>,
}

/// Where renders are remembered across syncs (the schema cache of the state directory).
pub trait RenderCache {
    fn rendered(&self, key: &str) -> Option<Rendered>;
    fn remember_rendered(&self, key: &str, rendered: &Rendered);
}

/// A VM's rendered XML, and what to remember once the VM validated.
#[derive(Debug)]
pub struct RenderedVm {
    pub xml: String,
    /// `Some((key, render))` when this render is new and may be remembered.
    pub fresh: Option<(String, Rendered)>,
}

/// A template file as loaded for the environment.
#[derive(Debug, Clone)]
enum Loaded {
    Source(String),
    Missing,
    Refused(String),
    /// Asked for by a render, not read yet.
    Requested,
}

/// Renders the templates of one commit. One environment for all its VMs: a template
/// used by many VMs is read and parsed once.
pub struct Renderer<'a> {
    files: &'a dyn RepoFiles,
    env: Environment<'static>,
    loaded: Arc<Mutex<BTreeMap<String, Loaded>>>,
    /// A text renderer's secrets (`secret()`), and how they are opened.
    secrets: Option<(template_secrets::Table, Secrets)>,
}

/// Bumped when the meaning of a render changes (the environment's settings), so that
/// renders remembered by another vmsync are not reused.
const RENDER_FORMAT: &str = "vmsync-render-1";

fn xml_escape(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
}

/// `{{ value }}`: XML-escaped text; a table, an array or an object is refused.
fn format_value(
    out: &mut minijinja::Output,
    state: &mut minijinja::State,
    value: &Value,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Map | ValueKind::Seq | ValueKind::Iterable | ValueKind::Plain => {
            let what = match value.kind() {
                ValueKind::Map => "a table",
                ValueKind::Seq => "an array",
                _ => "an object",
            };
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "{what} cannot be written into the XML as text (write one of its values, or join them)"
                ),
            ));
        }
        _ => {}
    }
    let text = value.to_string();
    if value.is_safe() || matches!(state.auto_escape(), AutoEscape::None) {
        return out.write_str(&text).map_err(Error::from);
    }
    let mut escaped = String::with_capacity(text.len());
    xml_escape(&text, &mut escaped);
    out.write_str(&escaped).map_err(Error::from)
}

fn escape_filter(value: Value) -> Value {
    if value.is_safe() {
        return value;
    }
    let mut escaped = String::new();
    xml_escape(&value.to_string(), &mut escaped);
    Value::from_safe_string(escaped)
}

impl<'a> Renderer<'a> {
    pub fn new(files: &'a dyn RepoFiles) -> Self {
        let loaded: Arc<Mutex<BTreeMap<String, Loaded>>> = Arc::default();
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_debug(false);
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).keep_trailing_newline(true);
        env.set_syntax(syntax.build().expect("the default delimiters are valid"));
        env.set_auto_escape_callback(|_| AutoEscape::Custom("xml".into()));
        env.set_formatter(format_value);
        env.add_filter("escape", escape_filter);
        env.add_filter("e", escape_filter);
        template_secrets::add_refusal(&mut env);
        // `debug()` dumps the render's state (Rust debug text): nothing for a domain XML.
        env.remove_global("debug");
        // Templates come only from the files of this commit, read by `load` below: the
        // loader hands out what was read and notes what a render asked for.
        let table = Arc::clone(&loaded);
        env.set_loader(move |name| {
            let mut table = table.lock().expect("the template table is not poisoned");
            match table.get(name) {
                Some(Loaded::Source(text)) => Ok(Some(text.clone())),
                Some(Loaded::Missing | Loaded::Requested) => Ok(None),
                Some(Loaded::Refused(why)) => {
                    Err(Error::new(ErrorKind::InvalidOperation, why.clone()))
                }
                None => {
                    table.insert(name.to_string(), Loaded::Requested);
                    Ok(None)
                }
            }
        });
        Self {
            files,
            env,
            loaded,
            secrets: None,
        }
    }

    /// A renderer of text files (cloud-init's user-data, meta-data, network-config):
    /// nothing is escaped, and `secret("….age")` gives a secret's text, opened with
    /// `secrets`.
    pub fn for_text(files: &'a dyn RepoFiles, secrets: Secrets) -> Self {
        let mut renderer = Self::new(files);
        renderer.env.set_auto_escape_callback(|_| AutoEscape::None);
        let table = template_secrets::Table::default();
        template_secrets::add_function(&mut renderer.env, &table);
        renderer.secrets = Some((table, secrets));
        renderer
    }

    /// Renders the text file `template` for one VM ([`Renderer::for_text`]); also says
    /// whether the text holds a secret.
    pub fn render_text(&self, template: &str, vars: &Vars) -> Result<(String, bool), RenderError> {
        if let Some((table, _)) = &self.secrets {
            template_secrets::start(table);
        }
        let text = self.render(template, vars)?;
        let used = self
            .secrets
            .as_ref()
            .is_some_and(|(table, _)| template_secrets::used(table));
        Ok((text, used))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Loaded>> {
        self.loaded
            .lock()
            .expect("the template table is not poisoned")
    }

    /// Reads the files renders asked for; how many there were.
    fn load_requested(&self) -> usize {
        let requested: Vec<String> = self
            .table()
            .iter()
            .filter(|(_, l)| matches!(l, Loaded::Requested))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &requested {
            let loaded = match check_repo_path(name).and_then(|_| self.files.read_text(name)) {
                Ok(text) => Loaded::Source(text),
                Err(FileError::NotFound(_)) => Loaded::Missing,
                Err(e) => Loaded::Refused(e.to_string()),
            };
            self.table().insert(name.clone(), loaded);
        }
        let secrets = self.secrets.as_ref().map_or(0, |(table, secrets)| {
            template_secrets::load(table, self.files, secrets)
        });
        requested.len() + secrets
    }

    fn context(vars: &Vars) -> Value {
        let mut ctx = BTreeMap::new();
        ctx.insert(
            "vm",
            Value::from(BTreeMap::from([("name", Value::from(vars.vm.to_string()))])),
        );
        if let Some(host) = vars.host {
            ctx.insert("host", Value::from(host.to_string()));
        }
        ctx.insert("params", Value::from(Serde(vars.params)));
        Value::from(ctx)
    }

    /// Renders `template` (a repository path) for one VM.
    pub fn render(&self, template: &str, vars: &Vars) -> Result<String, RenderError> {
        self.render_with(template, vars, |t, ctx| t.render(ctx).map(|x| (x, ())))
            .map(|(xml, _)| xml)
    }

    fn render_with<T>(
        &self,
        template: &str,
        vars: &Vars,
        run: impl Fn(&minijinja::Template<'_, '_>, Value) -> Result<(String, T), Error>,
    ) -> Result<(String, T), RenderError> {
        let known = matches!(self.table().get(template), Some(Loaded::Source(_)));
        if !known {
            let text = self
                .files
                .read_text(template)
                .map_err(RenderError::Unreadable)?;
            self.table()
                .insert(template.to_string(), Loaded::Source(text));
        }
        let ctx = Self::context(vars);
        let mut loaded = 0;
        loop {
            let result = self
                .env
                .get_template(template)
                .and_then(|t| run(&t, ctx.clone()));
            // A render that asked for files not read yet runs again with them (an
            // `ignore missing` include may have skipped one that exists).
            let more = self.load_requested();
            loaded += more;
            if loaded > MAX_TEMPLATE_FILES {
                return Err(RenderError::Failed(TemplateProblem {
                    file: template.to_string(),
                    line: None,
                    message: format!(
                        "the template loads more than {MAX_TEMPLATE_FILES} files (includes, imports, extends)"
                    ),
                }));
            }
            if more > 0 {
                continue;
            }
            let (xml, extra) =
                result.map_err(|e| RenderError::Failed(self.problem(template, vars, &e)))?;
            if xml.len() > MAX_OUTPUT_BYTES {
                return Err(RenderError::Failed(TemplateProblem {
                    file: template.to_string(),
                    line: None,
                    message: format!(
                        "the template renders {} bytes, more than the limit of {MAX_OUTPUT_BYTES}",
                        xml.len()
                    ),
                }));
            }
            return Ok((xml, extra));
        }
    }

    /// The key a render of `template` with `vars` is remembered under, when the files
    /// have content ids (a git commit; a checkout on disk has none).
    fn key(&self, template: &str, vars: &Vars) -> Option<String> {
        let id = self.files.content_id(template)?;
        let mut hash = Sha256::new();
        for part in [
            RENDER_FORMAT,
            env!("CARGO_PKG_VERSION"),
            template,
            &id,
            vars.vm,
            vars.host.unwrap_or("\u{0}"),
        ] {
            hash.update(part.len().to_le_bytes());
            hash.update(part.as_bytes());
        }
        let params = serde_json::to_vec(vars.params).expect("json values serialize");
        hash.update(params.len().to_le_bytes());
        hash.update(&params);
        Some(format!("render:{}", hex::encode(hash.finalize())))
    }

    /// Renders `template` for one VM, or takes the render `cache` remembered for the
    /// same template, params, VM name, host and files.
    pub fn render_cached(
        &self,
        cache: Option<&dyn RenderCache>,
        template: &str,
        vars: &Vars,
    ) -> Result<RenderedVm, RenderError> {
        let key = cache.and_then(|_| self.key(template, vars));
        if let (Some(cache), Some(key)) = (cache, &key)
            && let Some(hit) = cache.rendered(key)
            && hit
                .deps
                .iter()
                // The template's own blob id is part of the key.
                .filter(|(path, _)| path != template)
                .all(|(path, id)| self.files.content_id(path) == *id)
        {
            return Ok(RenderedVm {
                xml: hit.xml,
                fresh: None,
            });
        }
        let xml = self.render(template, vars)?;
        let fresh = key.map(|key| {
            (
                key,
                Rendered {
                    xml: xml.clone(),
                    deps: self.deps(),
                },
            )
        });
        Ok(RenderedVm { xml, fresh })
    }

    /// What this renderer's renders so far depend on: the content id of every file it
    /// loaded or found missing, and of every secret it read. A render is the same again
    /// while each of these files has the same content id.
    pub fn deps(&self) -> Vec<(String, Option<String>)> {
        let mut paths: Vec<String> = self
            .table()
            .iter()
            .filter(|(_, l)| matches!(l, Loaded::Source(_) | Loaded::Missing))
            .map(|(path, _)| path.clone())
            .collect();
        if let Some((table, _)) = &self.secrets {
            paths.extend(template_secrets::paths(table));
        }
        paths
            .into_iter()
            .map(|path| {
                let id = self.files.content_id(&path);
                (path, id)
            })
            .collect()
    }

    /// The template file and line that wrote line `line` (1-based) of the VM's rendered
    /// XML, found by rendering it again and following minijinja's output spans; `None`
    /// when no template text wrote it.
    pub fn locate(&self, template: &str, vars: &Vars, line: usize) -> Option<(String, usize)> {
        let (xml, spans) = self
            .render_with(template, vars, |t, ctx| t.render_with_spans(ctx))
            .ok()?;
        let start = xml
            .split_inclusive('\n')
            .take(line.checked_sub(1)?)
            .map(str::len)
            .sum::<usize>();
        let rest = xml.get(start..)?;
        let rest = rest.split('\n').next().unwrap_or("");
        // The first character of the line that is not blank (indentation is often the
        // tail of the previous template line).
        let at = start + rest.len() - rest.trim_start().len();
        let at = if rest.trim().is_empty() { start } else { at };
        let span = spans.iter().find(|s| s.output_range().contains(&at))?;
        let line = match span.kind() {
            OutputSpanKind::Raw => {
                span.line()
                    + xml[span.output_range().start..at]
                        .bytes()
                        .filter(|b| *b == b'\n')
                        .count()
            }
            _ => span.line(),
        };
        Some((span.name().to_string(), line))
    }

    /// A minijinja error as a problem at its template and line.
    fn problem(&self, template: &str, vars: &Vars, e: &Error) -> TemplateProblem {
        // An include or import that failed wraps the error of the file it loaded: report
        // the innermost one, where the mistake is.
        let mut e = e;
        while let Some(inner) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<Error>())
        {
            e = inner;
        }
        let detail = e.detail().unwrap_or("");
        let refused = self
            .table()
            .values()
            .any(|l| matches!(l, Loaded::Refused(why) if why == detail));
        let message = match e.kind() {
            _ if refused => detail.to_string(),
            ErrorKind::OutOfFuel => format!(
                "the template ran out of fuel (more than {FUEL} steps: a loop that does not end?)"
            ),
            ErrorKind::TemplateNotFound => format!(
                "{detail} (no such file in the commit; include, import and extends take a path from the repository root)"
            ),
            ErrorKind::UndefinedError => {
                let params: Vec<&str> = vars.params.keys().map(String::as_str).collect();
                format!(
                    "undefined value: this line uses a name that is not defined (defined: vm.name, {}params with {})",
                    if vars.host.is_some() { "host, " } else { "" },
                    if params.is_empty() {
                        "no keys".to_string()
                    } else {
                        params.join(", ")
                    }
                )
            }
            kind if detail.is_empty() => kind.to_string(),
            kind => format!("{kind}: {detail}"),
        };
        // An error raised while rendering an included file names that file.
        let (file, line) = match e.name() {
            Some(name) => (name.to_string(), e.line()),
            None => (template.to_string(), None),
        };
        TemplateProblem {
            file,
            line,
            message,
        }
    }
}

type Report<'r> = dyn FnMut(std::ops::Range<usize>, &str, String) + 'r;

/// `[params]` (or a VM's `[vm.params]`, over `defaults`) as template parameters. A TOML
/// date or time, or a float that is not finite, has no template value: a problem on
/// `field.key`, and `defaults` are returned.
pub fn params_from_toml(
    table: Option<&toml::Spanned<toml::Table>>,
    defaults: &Params,
    field: &str,
    report: &mut Report,
) -> Params {
    let mut params = defaults.clone();
    let Some(table) = table else {
        return params;
    };
    fn convert(value: &toml::Value, path: &str) -> Result<serde_json::Value, String> {
        Ok(match value {
            toml::Value::String(s) => s.clone().into(),
            toml::Value::Integer(i) => (*i).into(),
            toml::Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .ok_or_else(|| format!("'{path}' is {f}; a parameter must be a finite number"))?,
            toml::Value::Boolean(b) => (*b).into(),
            toml::Value::Datetime(d) => {
                return Err(format!(
                    "'{path}' is a TOML date or time ({d}); write it as a string"
                ));
            }
            toml::Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| convert(v, &format!("{path}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?
                .into(),
            toml::Value::Table(t) => t
                .iter()
                .map(|(k, v)| Ok((k.clone(), convert(v, &format!("{path}.{k}"))?)))
                .collect::<Result<serde_json::Map<_, _>, String>>()?
                .into(),
        })
    }
    for (key, value) in table.get_ref() {
        match convert(value, &format!("{field}.{key}")) {
            // A key of [vm.params] replaces the same key of [params] whole.
            Ok(value) => {
                params.insert(key.clone(), value);
            }
            Err(message) => report(table.span(), &format!("{field}.{key}"), message),
        }
    }
    params
}

/// A `[[vm]]` with `template`: its path and parameters, or `None` after a problem
/// (`xml` or `xml_inline` set too: `others` are their spans).
pub fn template_source(
    template: toml::Spanned<String>,
    params: Option<&toml::Spanned<toml::Table>>,
    others: [Option<std::ops::Range<usize>>; 2],
    defaults: &Params,
    report: &mut Report,
) -> Option<(String, Params)> {
    let params = params_from_toml(params, defaults, "params", report);
    if others.iter().any(Option::is_some) {
        report(
            template.span(),
            "template",
            "set one of 'xml', 'xml_inline' and 'template', not several".into(),
        );
        return None;
    }
    Some((template.into_inner(), params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::files::MemoryFiles;
    use std::cell::RefCell;

    fn params(toml_text: &str) -> Params {
        let table: toml::Table = toml::from_str(toml_text).unwrap();
        match serde_json::to_value(table).unwrap() {
            serde_json::Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    fn render(files: &MemoryFiles, params_toml: &str) -> Result<String, RenderError> {
        let p = params(params_toml);
        Renderer::new(files).render(
            "t.xml",
            &Vars {
                vm: "web-1",
                host: Some("hv1"),
                params: &p,
            },
        )
    }

    fn failed(result: Result<String, RenderError>) -> TemplateProblem {
        match result {
            Err(RenderError::Failed(p)) => p,
            other => panic!("expected a failed render, got {other:?}"),
        }
    }

    #[test]
    fn renders_the_variables_escaped() {
        let files = MemoryFiles::new([(
            "t.xml",
            "<domain>\n  <name>{{ vm.name }}</name>\n{% if host == 'hv1' %}\n  <memory unit='MiB'>{{ params.memory_mib * 2 }}</memory>\n{% endif %}\n  <title>{{ params.title }}</title>\n  <description>{{ params.raw | safe }}</description>\n</domain>\n",
        )]);
        let xml = render(
            &files,
            "memory_mib = 1024\ntitle = \"a <b> & 'c'\"\nraw = \"<b/>\"",
        )
        .unwrap();
        assert_eq!(
            xml,
            "<domain>\n  <name>web-1</name>\n  <memory unit='MiB'>2048</memory>\n  <title>a &lt;b&gt; &amp; &apos;c&apos;</title>\n  <description><b/></description>\n</domain>\n"
        );
    }

    #[test]
    fn macros_includes_and_imports_read_the_commit() {
        let files = MemoryFiles::new([
            (
                "t.xml",
                "{% import 'lib/disks.j2' as d %}<domain>{% include 'lib/head.xml' %}{{ d.disk('vda') }}</domain>",
            ),
            ("lib/head.xml", "<name>{{ vm.name }}</name>"),
            (
                "lib/disks.j2",
                "{% macro disk(dev) %}<disk><target dev='{{ dev }}'/></disk>{% endmacro %}",
            ),
        ]);
        assert_eq!(
            render(&files, "").unwrap(),
            "<domain><name>web-1</name><disk><target dev='vda'/></disk></domain>"
        );
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let p = failed(render(
            &MemoryFiles::new([("t.xml", "<domain>\n{% if %}\n</domain>")]),
            "",
        ));
        assert_eq!((p.file.as_str(), p.line), ("t.xml", Some(2)));
        assert!(p.message.starts_with("syntax error"), "{p:?}");

        let p = failed(render(
            &MemoryFiles::new([("t.xml", "<domain>\n\n{{ params.memory }}\n</domain>")]),
            "",
        ));
        assert_eq!((p.file.as_str(), p.line), ("t.xml", Some(3)));
        assert!(p.message.contains("undefined"), "{p:?}");

        // Strict: even a top-level name that is not defined.
        let p = failed(render(&MemoryFiles::new([("t.xml", "{{ bridge }}")]), ""));
        assert!(p.message.contains("undefined"), "{p:?}");

        // In an included file: that file and its line.
        let p = failed(render(
            &MemoryFiles::new([
                ("t.xml", "<domain>{% include 'inc.xml' %}</domain>"),
                ("inc.xml", "\n\n{{ nope }}"),
            ]),
            "",
        ));
        assert_eq!((p.file.as_str(), p.line), ("inc.xml", Some(3)), "{p:?}");
    }

    #[test]
    fn includes_stay_inside_the_commit() {
        for (include, wanted) in [
            ("/etc/passwd", "must be relative"),
            ("../outside.xml", "must be relative"),
            ("link.xml", "not a regular file"),
            ("missing.xml", "no such file in the commit"),
        ] {
            let files = MemoryFiles::new([(
                "t.xml",
                &format!("<domain>\n{{% include '{include}' %}}</domain>"),
            )]);
            let p = failed(render(&files, ""));
            assert_eq!((p.file.as_str(), p.line), ("t.xml", Some(2)), "{include}");
            assert!(p.message.contains(wanted), "{include}: {p:?}");
        }
        // `ignore missing` skips a missing file, but not a refused one.
        let files = MemoryFiles::new([("t.xml", "<a>{% include 'nope.xml' ignore missing %}</a>")]);
        assert_eq!(render(&files, "").unwrap(), "<a></a>");
        let files = MemoryFiles::new([("t.xml", "{% include '/etc/hostname' ignore missing %}")]);
        assert!(
            failed(render(&files, ""))
                .message
                .contains("must be relative")
        );
    }

    #[test]
    fn the_template_itself_unreadable_is_a_manifest_problem() {
        let files = MemoryFiles::default();
        assert_eq!(
            render(&files, ""),
            Err(RenderError::Unreadable(FileError::NotFound("t.xml".into())))
        );
    }

    #[test]
    fn runaway_renders_are_stopped() {
        let p = failed(render(
            &MemoryFiles::new([(
                "t.xml",
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            )]),
            "",
        ));
        assert!(p.message.contains("ran out of fuel"), "{p:?}");
        assert_eq!(p.line, Some(1));

        let p = failed(render(
            &MemoryFiles::new([(
                "t.xml",
                "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            )]),
            "",
        ));
        assert!(p.message.contains("recursion"), "{p:?}");

        let p = failed(render(
            &MemoryFiles::new([("t.xml", "{{ 'x' * 2000000 }}")]),
            "",
        ));
        assert!(
            p.message.contains("more than the limit of 1048576") || p.message.contains("fuel"),
            "{p:?}"
        );
        let p = failed(render(
            &MemoryFiles::new([(
                "t.xml",
                "{% for i in range(30) %}{{ params.kb }}{% endfor %}",
            )]),
            &format!("kb = \"{}\"", "y".repeat(40_000)),
        ));
        assert_eq!(p.file, "t.xml");
        assert!(
            p.message.contains("more than the limit of 1048576"),
            "{p:?}"
        );

        let p = failed(render(
            &MemoryFiles::new([("t.xml", "{% include 't.xml' %}")]),
            "",
        ));
        assert!(p.message.contains("recursion"), "{p:?}");

        // Files loaded for one VM are bounded (here: names made up in a loop).
        let p = failed(render(
            &MemoryFiles::new([(
                "t.xml",
                "{% for i in range(1000) %}{% include 'x' ~ i ~ '.xml' ignore missing %}{% endfor %}",
            )]),
            "",
        ));
        assert!(p.message.contains("loads more than 64 files"), "{p:?}");
    }

    #[test]
    fn params_of_the_wrong_type_are_errors_at_their_line() {
        let files = MemoryFiles::new([(
            "t.xml",
            "<domain>\n<memory>{{ params.memory_mib * 1024 }}</memory>\n</domain>",
        )]);
        assert!(render(&files, "memory_mib = 4").is_ok());
        let p = failed(render(&files, "memory_mib = { size = 4 }"));
        assert_eq!(p.line, Some(2));
        assert!(p.message.starts_with("invalid operation"), "{p:?}");

        let files = MemoryFiles::new([("t.xml", "<domain>\n{{ params.bridges }}</domain>")]);
        let p = failed(render(&files, "bridges = ['br0', 'br1']"));
        assert_eq!(p.line, Some(2));
        assert!(p.message.contains("an array cannot be written"), "{p:?}");
        let p = failed(render(&files, "bridges = { a = 1 }"));
        assert!(p.message.contains("a table cannot be written"), "{p:?}");
        let files = MemoryFiles::new([(
            "t.xml",
            "{% for b in params.bridges %}<b>{{ b }}</b>{% endfor %}",
        )]);
        assert_eq!(
            render(&files, "bridges = ['br0', 'br1']").unwrap(),
            "<b>br0</b><b>br1</b>"
        );
        let p = failed(render(&files, "bridges = 3"));
        assert!(p.message.contains("not iterable"), "{p:?}");
    }

    #[test]
    fn rendered_lines_map_back_to_template_lines() {
        let files = MemoryFiles::new([
            (
                "t.xml",
                "<domain>\n{% if true %}\n  <name>{{ vm.name }}</name>\n{% endif %}\n  <memory>1</memory>\n{% include 'inc.xml' %}\n</domain>\n",
            ),
            ("inc.xml", "  <devices>\n    <hostdev/>\n  </devices>\n"),
        ]);
        let p = Params::new();
        let vars = Vars {
            vm: "a",
            host: None,
            params: &p,
        };
        let r = Renderer::new(&files);
        let xml = r.render("t.xml", &vars).unwrap();
        let lines: Vec<&str> = xml.lines().collect();
        assert_eq!(lines[1], "  <name>a</name>");
        assert_eq!(r.locate("t.xml", &vars, 2), Some(("t.xml".into(), 3)));
        assert_eq!(r.locate("t.xml", &vars, 3), Some(("t.xml".into(), 5)));
        assert_eq!(lines[4], "    <hostdev/>");
        assert_eq!(r.locate("t.xml", &vars, 5), Some(("inc.xml".into(), 2)));
        assert_eq!(r.locate("t.xml", &vars, 99), None);
    }

    #[test]
    fn host_is_undefined_without_one() {
        let files = MemoryFiles::new([("t.xml", "{{ host }}")]);
        let p = Params::new();
        let r = Renderer::new(&files);
        let vars = Vars {
            vm: "a",
            host: None,
            params: &p,
        };
        match r.render("t.xml", &vars) {
            Err(RenderError::Failed(p)) => assert!(p.message.contains("undefined"), "{p:?}"),
            other => panic!("{other:?}"),
        }
    }

    /// Counts renders by remembering them.
    #[derive(Default)]
    struct Memory(RefCell<BTreeMap<String, Rendered>>);
    impl RenderCache for Memory {
        fn rendered(&self, key: &str) -> Option<Rendered> {
            self.0.borrow().get(key).cloned()
        }
        fn remember_rendered(&self, key: &str, rendered: &Rendered) {
            self.0.borrow_mut().insert(key.into(), rendered.clone());
        }
    }

    #[test]
    fn a_render_is_remembered_until_a_file_or_param_changes() {
        let cache = Memory::default();
        let run = |files: &MemoryFiles, params_toml: &str, vm: &str| {
            let p = params(params_toml);
            let vars = Vars {
                vm,
                host: Some("hv1"),
                params: &p,
            };
            let r = Renderer::new(files)
                .render_cached(Some(&cache), "t.xml", &vars)
                .unwrap();
            if let Some((key, rendered)) = &r.fresh {
                cache.remember_rendered(key, rendered);
            }
            (r.xml, r.fresh.is_some())
        };
        let files = MemoryFiles::new([
            ("t.xml", "{{ vm.name }} {{ params.m }} {% include 'inc' %}"),
            ("inc", "one"),
        ]);
        assert_eq!(run(&files, "m = 1", "a"), ("a 1 one".into(), true));
        assert_eq!(run(&files, "m = 1", "a"), ("a 1 one".into(), false));
        assert_eq!(run(&files, "m = 2", "a"), ("a 2 one".into(), true));
        assert_eq!(run(&files, "m = 1", "b"), ("b 1 one".into(), true));
        // An included file changed: rendered again.
        let changed = MemoryFiles::new([
            ("t.xml", "{{ vm.name }} {{ params.m }} {% include 'inc' %}"),
            ("inc", "two"),
        ]);
        assert_eq!(run(&changed, "m = 1", "a"), ("a 1 two".into(), true));
        assert_eq!(run(&changed, "m = 1", "a"), ("a 1 two".into(), false));
        // Without content ids (a checkout on disk) nothing is remembered.
        let p = params("m = 1");
        let vars = Vars {
            vm: "a",
            host: Some("hv1"),
            params: &p,
        };
        let r = Renderer::new(&changed.without_content_ids())
            .render_cached(Some(&cache), "t.xml", &vars)
            .unwrap();
        assert!(r.fresh.is_none());
        assert_eq!(r.xml, "a 1 two");
    }
}

/// Templates through the whole commit's validation: every check a plain file gets, with
/// problems at the template's lines.
#[cfg(test)]
mod validate_tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use crate::desired::desired_state::Policy;
    use crate::desired::domain_xml::DomainSummary;
    use crate::desired::manifest::Problem;
    use crate::desired::resource_xml::ResourceKind;
    use crate::desired::schema_check::{SchemaChecker, SchemaError};
    use crate::desired::validate::validate;
    use crate::repo::files::MemoryFiles;

    use super::{RenderCache, Rendered};

    /// Rejects "<bogus"; remembers summaries and renders.
    #[derive(Default)]
    struct Schema {
        files: RefCell<BTreeMap<String, DomainSummary>>,
        renders: RefCell<BTreeMap<String, Rendered>>,
    }
    impl SchemaChecker for Schema {
        fn check(&self, xml: &str) -> Result<(), SchemaError> {
            if xml.contains("<bogus") {
                return Err(SchemaError::Rejected(
                    "Element domain has extra content: bogus".into(),
                ));
            }
            Ok(())
        }
        fn known(&self, id: &str) -> Option<DomainSummary> {
            self.files.borrow().get(id).cloned()
        }
        fn remember(&self, id: &str, summary: &DomainSummary) {
            self.files.borrow_mut().insert(id.into(), summary.clone());
        }
        fn render_cache(&self) -> Option<&dyn RenderCache> {
            Some(self)
        }
        fn check_resource(&self, _kind: ResourceKind, _xml: &str) -> Result<(), SchemaError> {
            Ok(())
        }
    }
    impl RenderCache for Schema {
        fn rendered(&self, key: &str) -> Option<Rendered> {
            self.renders.borrow().get(key).cloned()
        }
        fn remember_rendered(&self, key: &str, rendered: &Rendered) {
            self.renders
                .borrow_mut()
                .insert(key.into(), rendered.clone());
        }
    }

    const MANIFEST: &str = r#"version = 1

[params]
memory_mib = 512

[[vm]]
name = "web-1"
template = "t/server.xml"
  [vm.params]
  memory_mib = 1024

[[vm]]
name = "web-2"
template = "t/server.xml"
"#;

    const TEMPLATE: &str = "<domain type='kvm'>\n  <name>{{ vm.name }}</name>\n  <memory unit='MiB'>{{ params.memory_mib }}</memory>\n  <devices>\n{% include 't/extra.xml' %}\n  </devices>\n</domain>\n";

    fn files(manifest: &str, template: &str, extra: &str) -> MemoryFiles {
        MemoryFiles::new([
            ("vmsync.toml", manifest),
            ("t/server.xml", template),
            ("t/extra.xml", extra),
        ])
    }

    fn policy() -> Policy {
        Policy {
            host: Some("hv1".into()),
            disk_roots: vec!["/srv/images".into()],
            ..Default::default()
        }
    }

    fn problems(files: &MemoryFiles) -> Vec<String> {
        validate(files, &policy(), &Schema::default())
            .unwrap_err()
            .iter()
            .map(Problem::to_string)
            .collect()
    }

    #[test]
    fn templated_vms_validate_with_their_params() {
        let files = files(MANIFEST, TEMPLATE, "");
        let d = validate(&files, &policy(), &Schema::default()).unwrap();
        assert_eq!(d.vms.len(), 2);
        assert_eq!(d.vms[0].xml_file, "t/server.xml");
        assert!(d.vms[0].xml.contains("<name>web-1</name>"));
        assert!(d.vms[0].xml.contains(">1024</memory>"));
        assert!(d.vms[1].xml.contains(">512</memory>"), "[params] default");
        assert_eq!(
            d.vms[1].fingerprint,
            crate::desired::domain_xml::fingerprint(&d.vms[1].xml),
            "the fingerprint is the rendered text's"
        );
    }

    #[test]
    fn checks_of_the_rendered_xml_name_the_template_line() {
        // The host policy, at the line of the included file that wrote it.
        let f = files(
            MANIFEST,
            TEMPLATE,
            "    <interface type='ethernet'/>\n    <hostdev mode='subsystem' type='pci'/>\n",
        );
        let p = problems(&f);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(
            p[0].starts_with("t/extra.xml:2: vm 'web-1': field 'devices/hostdev': "),
            "{p:#?}"
        );
        // Not well-formed: the line of the template.
        let f = files(MANIFEST, &TEMPLATE.replace("</memory>", "</memroy>"), "");
        let p = problems(&f);
        assert!(
            p[0].starts_with("t/server.xml:3: vm 'web-1': field 'xml': malformed xml"),
            "{p:#?}"
        );
        // A name that is not the VM's, and libvirt's schema (no line: the file).
        let f = files(
            MANIFEST,
            &TEMPLATE.replace("{{ vm.name }}", "web-1"),
            "<bogus/>",
        );
        let p = problems(&f);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(
            p[0].starts_with("t/server.xml: vm 'web-1': field 'xml': "),
            "{p:#?}"
        );
        assert_eq!(
            p[1],
            "t/server.xml: vm 'web-2': field 'name': the xml's <name> is 'web-1' but the manifest says 'web-2'"
        );
        // Not a domain at all.
        let f = files(
            MANIFEST,
            "<network>\n<name>{{ vm.name }}</name></network>",
            "",
        );
        let p = problems(&f);
        assert_eq!(
            p[0],
            "t/server.xml:1: vm 'web-1': field 'domain': root element is <network>, expected <domain>"
        );
    }

    #[test]
    fn render_and_manifest_problems_name_file_line_vm_and_field() {
        let f = files(MANIFEST, &TEMPLATE.replace("vm.name", "vm.nmae"), "");
        let p = problems(&f);
        assert_eq!(p.len(), 2);
        assert!(
            p[0].starts_with("t/server.xml:2: vm 'web-1': field 'template': undefined value"),
            "{p:#?}"
        );
        let f = files(
            &MANIFEST.replace("t/server.xml\"\n  [vm", "t/nope.xml\"\n  [vm"),
            TEMPLATE,
            "",
        );
        assert_eq!(
            problems(&f),
            [
                "vmsync.toml:7: vm 'web-1': field 'template': 't/nope.xml' does not exist in the repository"
            ]
        );
        let f = files(
            &MANIFEST.replace(
                "template = \"t/server.xml\"\n  [vm",
                "template = \"t/server.xml\"\nxml = \"a.xml\"\n  [vm",
            ),
            TEMPLATE,
            "",
        );
        assert_eq!(
            problems(&f),
            [
                "vmsync.toml:8: vm 'web-1': field 'template': set one of 'xml', 'xml_inline' and 'template', not several"
            ]
        );
        let f = files(
            &format!("{MANIFEST}\n[[vm]]\nname = \"c\"\nxml = \"c.xml\"\n  [vm.params]\n  a = 1\n"),
            TEMPLATE,
            "",
        );
        assert_eq!(
            problems(&f),
            [
                "vmsync.toml:19: vm 'c': field 'params': 'params' are for a 'template'; this vm has none"
            ]
        );
        let f = files(
            &MANIFEST.replace(
                "memory_mib = 1024",
                "memory_mib = 1024\n  since = 2024-01-01",
            ),
            TEMPLATE,
            "",
        );
        let p = problems(&f);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].starts_with(
                "vmsync.toml:9: vm 'web-1': field 'params.since': 'params.since' is a TOML date"
            ),
            "{p:#?}"
        );
    }

    #[test]
    fn an_unchanged_commit_is_not_rendered_again() {
        let schema = Schema::default();
        let f = files(MANIFEST, TEMPLATE, "");
        let first = validate(&f, &policy(), &schema).unwrap();
        assert_eq!(schema.renders.borrow().len(), 2);
        let reads = f.reads();
        let again = validate(&f, &policy(), &schema).unwrap();
        assert_eq!(first, again);
        assert_eq!(f.reads() - reads, 1, "only the manifest was read again");
        // One VM's params changed: that VM alone is rendered (the template read once).
        let changed = files(&MANIFEST.replace("1024", "2048"), TEMPLATE, "");
        let d = validate(&changed, &policy(), &schema).unwrap();
        assert!(d.vms[0].xml.contains(">2048</memory>"));
        assert_eq!(changed.reads(), 3, "manifest, template, include");
        assert_eq!(schema.renders.borrow().len(), 3);
        // An included file changed: every VM that uses it is rendered again.
        let changed = files(MANIFEST, TEMPLATE, "<!-- new -->\n");
        let d = validate(&changed, &policy(), &schema).unwrap();
        assert!(d.vms.iter().all(|vm| vm.xml.contains("<!-- new -->")));
    }
}
