//! The layering guard: every import in `src/` points down the layer table of `src/lib.rs`
//! (and docs/design.md, "Source layout"), and no two modules of one layer import each other
//! in a cycle.
//!
//! It reads `src/**/*.rs` as text: every `crate::` path (in `use` lines and inline) and
//! every `super::` path outside `#[cfg(test)]` items and comments names the module it
//! points into; the edge from the file's module to that module must not go up the table,
//! and the modules of one layer must form no cycle. A module's own child files count as
//! part of it (`host::libvirt` and `host::libvirt::network_pool_calls` are one unit).
//!
//! `LAYERING_SRC=/path/to/src cargo test --test layering -- --nocapture` prints the counts
//! for another tree (for example an older checkout, with the older module names mapped
//! by `LEGACY`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer table, bottom up: a module may import only from its own layer or below.
/// The most specific prefix wins (`onboard::definition` is pure and sits in layer 1,
/// `onboard::import` is a command and sits in layer 6).
const LAYERS: &[(&str, usize)] = &[
    ("util", 0),
    ("repo::files", 0),
    ("desired", 1),
    ("onboard::definition", 1),
    ("record", 2),
    ("repo", 2),
    ("host", 3),
    ("testing", 3),
    ("reconcile", 4),
    ("apply", 5),
    ("agent", 6),
    ("config", 6),
    ("error", 6),
    ("cli", 6),
    ("onboard", 6),
];

/// Where the modules of the tree before the layering step (2375f90) sit in the same
/// table, by what they hold; used only when `LAYERING_SRC` points at such a tree.
const LEGACY: &[(&str, usize)] = &[
    ("host::par", 0),
    ("agent::state", 2),
    ("reconcile::apply", 5),
    ("agent::health", 5),
    ("onboard::adopt", 4),
];

fn layer_of(module: &str, extra: &[(&str, usize)]) -> Option<usize> {
    extra
        .iter()
        .chain(LAYERS.iter())
        .filter(|(prefix, _)| module == *prefix || module.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, layer)| *layer)
}

/// The module path of a source file relative to `src/` (`host/libvirt/mod.rs` →
/// `host::libvirt`); `None` for the crate root and the binary.
fn module_of(rel: &Path) -> Option<String> {
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let file = parts.pop()?;
    let stem = file.strip_suffix(".rs")?;
    if parts.is_empty() && (stem == "lib" || stem == "main") {
        return None;
    }
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    Some(parts.join("::"))
}

/// The text with comments, string and char literals blanked and `#[cfg(test)]` items cut.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'r' && b[i..].starts_with(b"r#\"") || b[i..].starts_with(b"r\"") {
            let hashes = b[i + 1..].iter().take_while(|c| **c == b'#').count();
            let mut end = vec![b'"'];
            end.extend(std::iter::repeat_n(b'#', hashes));
            i += 2 + hashes;
            while i < b.len() && !b[i..].starts_with(&end) {
                i += 1;
            }
            i += end.len();
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && (b.get(i + 2) == Some(&b'\'') || b.get(i + 1) == Some(&b'\\')) {
            // A char literal ('{', '\n', '\''); a lifetime ('a) has no closing quote.
            i += if b[i + 1] == b'\\' { 2 } else { 1 };
            while i < b.len() && b[i] != b'\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    cut_test_items(&out)
}

/// Removes every item marked `#[cfg(test)]` (a test module, a test-only fn or use).
fn cut_test_items(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let semi = after.find(';').unwrap_or(after.len());
        let brace = after.find('{').unwrap_or(after.len());
        if semi < brace {
            rest = &after[(semi + 1).min(after.len())..];
            continue;
        }
        let mut depth = 0usize;
        let mut end = after.len();
        for (k, c) in after.char_indices().skip(brace) {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path a `crate::` or `super::` reference names, as segments from the crate root.
/// Use groups are expanded: `crate::a::{b, c::{d, e}}` names `a::b`, `a::c::d`, `a::c::e`.
fn referenced_paths(code: &str, module: &str) -> Vec<Vec<String>> {
    let own: Vec<String> = module.split("::").map(String::from).collect();
    let mut paths = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':');
        let word: String = chars[i..].iter().take_while(|c| is_ident(**c)).collect();
        if starts_word && (word == "crate" || word == "super") {
            let mut j = i + word.len();
            if chars.get(j) == Some(&':') && chars.get(j + 1) == Some(&':') {
                j += 2;
                let mut base = if word == "crate" {
                    Vec::new()
                } else {
                    own[..own.len().saturating_sub(1)].to_vec()
                };
                // `super::super::x`
                while chars[j..].starts_with(&['s', 'u', 'p', 'e', 'r', ':', ':'])
                    && word == "super"
                {
                    base.pop();
                    j += 7;
                }
                j = parse_tree(&chars, j, base, &mut paths);
            }
            i = j.max(i + 1);
        } else {
            i += word.len().max(1);
        }
    }
    paths
}

/// Parses a use tree (or a plain path) at `i`, pushing every leaf path; returns the end.
fn parse_tree(
    chars: &[char],
    mut i: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        while chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        match chars.get(i) {
            Some('{') => {
                i += 1;
                loop {
                    i = parse_tree(chars, i, prefix.clone(), out);
                    while chars.get(i).is_some_and(|c| c.is_whitespace() || *c == ',') {
                        i += 1;
                    }
                    match chars.get(i) {
                        Some('}') => return i + 1,
                        None => return i,
                        _ => {}
                    }
                }
            }
            Some('*') => {
                out.push(prefix);
                return i + 1;
            }
            _ => {}
        }
        let word: String = chars[i..].iter().take_while(|c| is_ident(**c)).collect();
        if word.is_empty() {
            out.push(prefix);
            return i;
        }
        i += word.len();
        if word != "self" {
            prefix.push(word);
        }
        if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            out.push(prefix);
            return i;
        }
    }
}

/// The import graph: for each module, the modules its paths point into (the longest
/// known module prefix of each path; not itself, its ancestors or its descendants).
fn graph(files: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<&str> = files.iter().map(|(m, _)| m.as_str()).collect();
    let related = |a: &str, b: &str| {
        a == b || a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in files {
        let entry = edges.entry(module.clone()).or_default();
        for path in referenced_paths(&code_only(text), module) {
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|p| modules.contains(p.as_str()));
            if let Some(target) = target
                && !related(module, &target)
            {
                entry.insert(target);
            }
        }
    }
    edges
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        let targets = t.edges.get(v).into_iter().flatten();
        for w in targets {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// What the check finds: upward imports, cycles inside one layer, modules the table
/// does not place, and (for the report) every cycle of the whole graph.
#[derive(Debug, Default)]
struct Findings {
    upward: Vec<String>,
    layer_cycles: Vec<Vec<String>>,
    unplaced: Vec<String>,
    all_cycles: Vec<Vec<String>>,
}

fn check(files: &[(String, String)], extra: &[(&str, usize)]) -> Findings {
    let edges = graph(files);
    let mut findings = Findings {
        all_cycles: cycles(&edges),
        ..Findings::default()
    };
    let mut same_layer: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, targets) in &edges {
        let Some(lf) = layer_of(from, extra) else {
            findings.unplaced.push(from.clone());
            continue;
        };
        for to in targets {
            let Some(lt) = layer_of(to, extra) else {
                continue;
            };
            if lt > lf {
                findings
                    .upward
                    .push(format!("{from} (layer {lf}) imports {to} (layer {lt})"));
            } else if lt == lf {
                same_layer
                    .entry(from.clone())
                    .or_default()
                    .insert(to.clone());
            }
        }
    }
    findings.layer_cycles = cycles(&same_layer);
    findings
}

fn read_tree(root: &Path) -> Vec<(String, String)> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(root, &mut found);
    found.sort();
    found
        .into_iter()
        .filter_map(|path| {
            let module = module_of(path.strip_prefix(root).unwrap())?;
            Some((module, std::fs::read_to_string(&path).unwrap()))
        })
        .collect()
}

#[test]
fn every_import_points_down_the_layer_table() {
    let (root, extra) = match std::env::var_os("LAYERING_SRC") {
        Some(dir) => (PathBuf::from(dir), LEGACY),
        None => (Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &[][..]),
    };
    let files = read_tree(&root);
    assert!(
        files.len() > 20,
        "read only {} files under {}",
        files.len(),
        root.display()
    );
    let found = check(&files, extra);
    println!("modules: {}", files.len());
    println!("upward imports: {}", found.upward.len());
    for line in &found.upward {
        println!("  {line}");
    }
    println!("cycles inside a layer: {}", found.layer_cycles.len());
    println!("import cycles (whole graph): {}", found.all_cycles.len());
    for scc in &found.all_cycles {
        println!("  {} modules: {}", scc.len(), scc.join(", "));
    }
    assert!(
        found.unplaced.is_empty(),
        "modules the layer table does not place: {:?}",
        found.unplaced
    );
    assert!(
        found.upward.is_empty(),
        "imports that go up the layer table:\n{}",
        found.upward.join("\n")
    );
    assert!(
        found.layer_cycles.is_empty(),
        "cycles inside a layer: {:?}",
        found.layer_cycles
    );
}

fn fake(files: &[(&str, &str)]) -> Vec<(String, String)> {
    files
        .iter()
        .map(|(m, t)| (m.to_string(), t.to_string()))
        .collect()
}

#[test]
fn the_check_catches_a_planted_upward_import() {
    let files = fake(&[
        (
            "desired::manifest",
            "use crate::desired::values::parse_size;\n",
        ),
        ("desired::values", "pub fn parse_size() {}\n"),
        (
            "host::disk",
            "use crate::desired::{values, manifest::Entry};\n",
        ),
        (
            "desired::validate",
            "// use crate::agent::sync; (a comment is not an import)\n\
             const S: &str = \"crate::agent::sync\";\n\
             fn f() { let _ = crate::host::disk::QemuImg::new(); }\n\
             #[cfg(test)]\nmod tests { use crate::agent::sync::Report; }\n",
        ),
    ]);
    let found = check(&files, &[]);
    assert_eq!(
        found.upward,
        ["desired::validate (layer 1) imports host::disk (layer 3)"],
        "{found:?}"
    );
    assert!(found.layer_cycles.is_empty());
}

#[test]
fn the_check_catches_a_cycle_inside_a_layer_and_reads_use_groups() {
    let files = fake(&[
        (
            "reconcile::plan",
            "use crate::reconcile::{outcome::{Outcome, VmFailure}, render};\n",
        ),
        ("reconcile::outcome", "pub struct Outcome;\n"),
        ("reconcile::render", "use super::plan::Plan;\n"),
        ("host::libvirt", "pub struct Libvirt;\n"),
        ("host::libvirt::calls", "use super::Libvirt;\n"),
    ]);
    let found = check(&files, &[]);
    assert!(found.upward.is_empty(), "{found:?}");
    assert_eq!(
        found.layer_cycles,
        [vec![
            "reconcile::plan".to_string(),
            "reconcile::render".to_string()
        ]]
    );
}

#[test]
fn a_module_without_a_place_in_the_table_fails() {
    let files = fake(&[
        ("newthing::x", "use crate::util::fsio;\n"),
        ("util::fsio", ""),
    ]);
    assert_eq!(check(&files, &[]).unplaced, ["newthing::x"]);
}
