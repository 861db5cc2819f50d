//! Where and what `vmsync import` writes: files in the import directory that never go
//! through a symbolic link, and domain XML without the values of `<qemu:env>`.
//!
//! The directory may hold anything with `--force`, including links an attacker (or an
//! old checkout) left there. Import refuses before writing anything when a file or
//! folder it would write is a symbolic link, and writes each file as a temporary file in
//! the same folder renamed into place, so that even a link made in between is replaced,
//! never followed: nothing outside the directory is ever written.
//!
//! `<qemu:env name='…' value='…'/>` (QEMU's environment, under `<qemu:commandline>`)
//! often carries tokens; the repository is shared, so import writes a placeholder for
//! each value and a comment that says so.

use std::io::Write as _;
use std::path::{Component, Path, PathBuf};

use crate::agent::sync::SyncError;
use crate::config::ConfigError;

/// libvirt's QEMU namespace (`xmlns:qemu`).
const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// What import writes instead of a `<qemu:env>` value.
pub const ENV_PLACEHOLDER: &str = "VALUE-NOT-IMPORTED";

/// Refuses when `rel` (a relative path below `dir`), or a folder on the way to it, is a
/// symbolic link. Missing parts are fine: they are made by [`write_file`].
pub fn check_target(dir: &Path, rel: &str) -> Result<(), SyncError> {
    let mut path = dir.to_path_buf();
    for part in Path::new(rel).components() {
        let Component::Normal(part) = part else {
            return Err(refused(&dir.join(rel), "is not a plain relative path"));
        };
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(refused(&path, "is a symbolic link"));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(refused(&path, &format!("cannot be checked: {e}"))),
        }
    }
    Ok(())
}

fn refused(path: &Path, why: &str) -> SyncError {
    SyncError::Config(ConfigError(format!(
        "'{}' {why}; vmsync import never writes through a link: remove it, or import into an empty directory",
        path.display()
    )))
}

/// Writes `text` to `dir/rel`: the folders on the way are made (never followed when
/// they are links), the file is written as a temporary file beside it and renamed over
/// the final name, which replaces a link there instead of writing to its target.
pub fn write_file(dir: &Path, rel: &str, text: &str) -> Result<(), SyncError> {
    check_target(dir, rel)?;
    let path = dir.join(rel);
    let parent = path
        .parent()
        .map_or_else(|| dir.to_path_buf(), Path::to_path_buf);
    make_dirs(dir, &parent)?;
    let failed = |e: std::io::Error| {
        SyncError::Other(anyhow::anyhow!("failed to write '{}': {e}", path.display()))
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".vmsync-import-")
        .tempfile_in(&parent)
        .map_err(failed)?;
    tmp.write_all(text.as_bytes()).map_err(failed)?;
    tmp.as_file().sync_all().map_err(failed)?;
    // A plain file mode (the temporary file is 0600).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(failed)?;
    }
    tmp.persist(&path).map_err(|e| failed(e.error))?;
    Ok(())
}

/// Makes `target` and the folders above it below `dir`, one `mkdir` at a time; a link on
/// the way is refused.
fn make_dirs(dir: &Path, target: &Path) -> Result<(), SyncError> {
    let rel = target.strip_prefix(dir).unwrap_or(Path::new(""));
    let mut path: PathBuf = dir.to_path_buf();
    std::fs::create_dir_all(dir).map_err(|e| {
        SyncError::Other(anyhow::anyhow!("failed to create '{}': {e}", dir.display()))
    })?;
    for part in rel.components() {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(refused(&path, "is a symbolic link"));
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(refused(&path, "is not a directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&path).map_err(|e| {
                    SyncError::Other(anyhow::anyhow!(
                        "failed to create '{}': {e}",
                        path.display()
                    ))
                })?;
            }
            Err(e) => return Err(refused(&path, &format!("cannot be checked: {e}"))),
        }
    }
    Ok(())
}

/// `xml` with the value of every `<qemu:env>` replaced by [`ENV_PLACEHOLDER`] and a
/// comment before the element, and the names of the variables whose values were left
/// out. Unchanged (and no names) when there is no `<qemu:env>`, or when the XML does
/// not parse (the caller reports that).
pub fn redact_qemu_env(xml: &str) -> (String, Vec<String>) {
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        ..Default::default()
    };
    let Ok(doc) = roxmltree::Document::parse_with_options(xml, options) else {
        return (xml.to_string(), Vec::new());
    };
    // (where, what): values to replace and comments to insert, applied from the end.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let mut names = Vec::new();
    for env in doc.descendants().filter(|n| {
        n.is_element()
            && n.tag_name().name() == "env"
            && n.tag_name().namespace() == Some(QEMU_NAMESPACE)
    }) {
        let name = env.attribute("name").unwrap_or("").to_string();
        let Some(value) = env.attributes().find(|a| a.name() == "value") else {
            continue;
        };
        if value.value() == ENV_PLACEHOLDER {
            continue;
        }
        let start = env.range().start;
        let line_start = xml[..start].rfind('\n').map_or(0, |i| i + 1);
        let indent = &xml[line_start..start];
        let indent = if indent.trim().is_empty() { indent } else { "" };
        edits.push((value.range_value(), ENV_PLACEHOLDER.to_string()));
        edits.push((
            start..start,
            format!(
                "<!-- vmsync import: the value of {} was not imported (it may be a secret); put it back before applying -->\n{indent}",
                sanitize_comment(&name)
            ),
        ));
        names.push(name);
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse((r.start, r.end)));
    let mut out = xml.to_string();
    for (range, text) in edits {
        out.replace_range(range, &text);
    }
    (out, names)
}

/// A variable name as it may stand in an XML comment (no `--`, no control characters).
fn sanitize_comment(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() || c == '-' { '_' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_are_replaced_and_named_and_the_xml_still_parses() {
        let xml = "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n  <name>a</name>\n  <qemu:commandline>\n    <qemu:arg value='-S'/>\n    <qemu:env name='TOKEN' value='hunter2'/>\n    <qemu:env name='B' value=\"x&amp;y\"/>\n  </qemu:commandline>\n</domain>\n";
        let (out, names) = redact_qemu_env(xml);
        assert_eq!(names, ["TOKEN", "B"]);
        assert!(
            !out.contains("hunter2") && !out.contains("x&amp;y"),
            "{out}"
        );
        assert_eq!(out.matches(ENV_PLACEHOLDER).count(), 2, "{out}");
        assert!(out.contains("<qemu:arg value='-S'/>"), "{out}");
        assert!(out.contains("the value of TOKEN was not imported"), "{out}");
        roxmltree::Document::parse(&out).unwrap();
        // Again: nothing more to do.
        assert_eq!(redact_qemu_env(&out), (out.clone(), vec![]));
        // No env: unchanged.
        let plain = "<domain><name>a</name></domain>";
        assert_eq!(redact_qemu_env(plain), (plain.to_string(), vec![]));
    }

    #[test]
    fn links_are_refused_and_files_replace_nothing_outside() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("file.xml")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("vms")).unwrap();
        let err = write_file(dir.path(), "file.xml", "new").unwrap_err();
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        let err = write_file(dir.path(), "vms/a.xml", "new").unwrap_err();
        assert!(err.to_string().contains("vms' is a symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(!outside.path().join("a.xml").exists());
        write_file(dir.path(), "networks/n.xml", "x").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("networks/n.xml")).unwrap(),
            "x"
        );
    }
}
