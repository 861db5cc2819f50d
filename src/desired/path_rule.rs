//! One rule for every host path and every name a commit gives the host, checked at
//! validation (before anything on the host changes):
//!
//! - a **path** is absolute, has no `.` or `..` component, no control or invisible
//!   formatting characters (newline, ESC, bidi overrides …), at most
//!   [`PATH_MAX_BYTES`] bytes and no component over [`COMPONENT_MAX_BYTES`]; where it
//!   must be "below a root", it is strictly below one (not the root itself);
//! - a **name** (VM, network, pool, volume) is non-empty, at most [`NAME_MAX_BYTES`]
//!   bytes, has no `/`, is not `.` or `..`, and has no control or formatting characters
//!   (libvirt makes files named after it: a longer name fails at define with "File name
//!   too long", a newline forges log lines);
//! - whatever is refused is shown [`escape`]d, never raw.
//!
//! Symlinks on the host are not resolved here: the roots belong to the operator. Paths
//! in libvirt's own shared directories have an extra rule (they must belong to the VM
//! or resource that names them): see `host_access`.

use std::path::{Component, Path, PathBuf};

/// The longest path accepted (Linux `PATH_MAX` less the terminating NUL).
pub const PATH_MAX_BYTES: usize = 4095;
/// The longest path component accepted (Linux `NAME_MAX`).
pub const COMPONENT_MAX_BYTES: usize = 255;
/// The longest VM, network, pool or volume name accepted: libvirt and vmsync name files
/// after it with a prefix or suffix (`NAME.xml`, `NAME_VARS.fd`, `NAME.hostsfile`,
/// temporary names), which must stay within [`COMPONENT_MAX_BYTES`].
pub const NAME_MAX_BYTES: usize = 200;

/// A character that must not appear in a name or path: C0/C1 controls (newline, ESC,
/// DEL …), and the invisible formatting characters that make text display as something
/// it is not (bidi overrides and isolates, zero-width characters, line and paragraph
/// separators, the byte-order mark, the soft hyphen).
pub fn is_forbidden_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00ad}'
            | '\u{061c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}')
}

/// `text` with every forbidden character written as an escape (`\n`, `\t`, `\u{1b}`), so
/// that what is shown is one line and says what it is. Escaping twice changes nothing.
pub fn escape(text: &str) -> String {
    if !text.chars().any(is_forbidden_char) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_forbidden_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// `text` shortened to at most `max` bytes (at a character boundary, with `…` when cut)
/// and escaped: for messages about over-long input.
pub fn shown(text: &str, max: usize) -> String {
    if text.len() <= max {
        return escape(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", escape(&text[..end]))
}

fn first_forbidden(text: &str) -> Option<char> {
    text.chars().find(|c| is_forbidden_char(*c))
}

/// Checks a name of `what` (`"vm"`, `"network"`, `"pool"`, `"volume"`): see the module.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("a {what} name must not be empty"));
    }
    if name.len() > NAME_MAX_BYTES {
        return Err(format!(
            "a {what} name is at most {NAME_MAX_BYTES} bytes; '{}' has {}",
            shown(name, 40),
            name.len()
        ));
    }
    if let Some(c) = first_forbidden(name) {
        return Err(format!(
            "a {what} name must not contain control or formatting characters; '{}' has {}",
            escape(name),
            escape(&c.to_string())
        ));
    }
    if name.contains('/') || name == "." || name == ".." {
        return Err(format!(
            "a {what} name must not contain '/' or be '.' or '..'; got '{}'",
            escape(name)
        ));
    }
    Ok(())
}

/// Checks that `raw` is a host path by the rule of the module (absolute, no `.`/`..`,
/// no forbidden characters, bounded length) and returns it normalized (repeated and
/// trailing slashes dropped).
pub fn absolute(raw: &str) -> Result<PathBuf, String> {
    if raw.len() > PATH_MAX_BYTES {
        return Err(format!(
            "path '{}' is {} bytes, more than {PATH_MAX_BYTES}",
            shown(raw, 60),
            raw.len()
        ));
    }
    if let Some(c) = first_forbidden(raw) {
        return Err(format!(
            "path '{}' must not contain control or formatting characters ({})",
            escape(raw),
            escape(&c.to_string())
        ));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(format!("path '{raw}' must be absolute"));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || raw.contains("/./")
        || raw.ends_with("/.")
    {
        return Err(format!("path '{raw}' must not contain '.' or '..'"));
    }
    if let Some(long) = raw.split('/').find(|c| c.len() > COMPONENT_MAX_BYTES) {
        return Err(format!(
            "path '{}' has a component of {} bytes, more than {COMPONENT_MAX_BYTES}",
            shown(raw, 60),
            long.len()
        ));
    }
    Ok(path.components().collect())
}

/// Whether `path` is strictly below one of `roots` (not a root itself). Both sides are
/// compared by component: `/srv/imagesX` is not below `/srv/images`.
pub fn strictly_below(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r) && path != r)
}

/// `roots` for a message: `'/a', '/b'`.
pub fn roots_text(roots: &[PathBuf]) -> String {
    roots
        .iter()
        .map(|r| format!("'{}'", r.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks `raw` by [`absolute`] and that it is strictly below one of `roots`; the error
/// names the roots and, when given, the policy key that would allow it.
pub fn below_roots(raw: &str, roots: &[PathBuf], key: &str) -> Result<PathBuf, String> {
    let path = absolute(raw)?;
    if strictly_below(&path, roots) {
        Ok(path)
    } else {
        Err(format!(
            "'{}' is not below a disk root or allowed path ({}); add a root to [policy] {key} to allow it",
            path.display(),
            roots_text(roots)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_paths_pass_and_are_normalized() {
        assert_eq!(absolute("/srv/x//y/").unwrap(), PathBuf::from("/srv/x/y"));
        assert_eq!(absolute("/").unwrap(), PathBuf::from("/"));
        assert!(absolute("/srv/äöü with space/x.qcow2").is_ok());
    }

    #[test]
    fn each_bad_path_is_refused_with_a_reason() {
        let long_component = format!("/srv/{}", "a".repeat(256));
        let long_path = format!("/srv{}", "/abcdefgh".repeat(500));
        let cases: &[(&str, &str)] = &[
            ("srv/x", "must be absolute"),
            ("", "must be absolute"),
            ("/srv/../etc", "'.' or '..'"),
            ("/srv/./x", "'.' or '..'"),
            ("/srv/x/.", "'.' or '..'"),
            ("/srv/x/..", "'.' or '..'"),
            ("/var/lib/libvirt/images/../../../../etc", "'.' or '..'"),
            ("/srv/x\nFAKE log line", "control or formatting"),
            ("/srv/\u{1b}[31mred", "control or formatting"),
            ("/srv/x\u{202e}gpj.exe", "control or formatting"),
            ("/srv/x\0y", "control or formatting"),
            (&long_component, "more than 255"),
            (&long_path, "more than 4095"),
        ];
        for (raw, why) in cases {
            let e = absolute(raw).unwrap_err();
            assert!(e.contains(why), "{raw:?}: {e}");
            assert!(
                !e.chars().any(is_forbidden_char),
                "{raw:?}: the message is escaped: {e:?}"
            );
        }
    }

    #[test]
    fn below_is_strict_and_by_component() {
        let roots = [PathBuf::from("/srv/images")];
        assert!(strictly_below(Path::new("/srv/images/a"), &roots));
        assert!(!strictly_below(Path::new("/srv/images"), &roots));
        assert!(!strictly_below(Path::new("/srv/imagesX/a"), &roots));
        assert!(below_roots("/srv/images/a/b", &roots, "disk_roots").is_ok());
        let e = below_roots("/srv/images/../x", &roots, "disk_roots").unwrap_err();
        assert!(e.contains("'..'"), "{e}");
        let e = below_roots("/etc", &roots, "allowed_paths").unwrap_err();
        assert!(e.contains("[policy] allowed_paths"), "{e}");
    }

    #[test]
    fn names_have_limits() {
        assert!(check_name("vm", "web-1.example_x").is_ok());
        assert!(check_name("vm", &"a".repeat(NAME_MAX_BYTES)).is_ok());
        let cases: &[(&str, &str)] = &[
            ("", "must not be empty"),
            ("a/b", "'/'"),
            ("..", "'..'"),
            ("web\nINFO forged", "control or formatting"),
            ("web\u{1b}[2J", "control or formatting"),
            ("web\u{200b}", "control or formatting"),
        ];
        for (name, why) in cases {
            let e = check_name("vm", name).unwrap_err();
            assert!(e.contains(why), "{name:?}: {e}");
            assert!(!e.chars().any(is_forbidden_char), "{e:?}");
        }
        let e = check_name("vm", &"x".repeat(5003)).unwrap_err();
        assert!(e.contains("at most 200 bytes") && e.contains("5003"), "{e}");
        assert!(e.len() < 200, "the message does not repeat the name: {e}");
    }

    #[test]
    fn escape_shows_what_is_there_on_one_line() {
        assert_eq!(escape("plain 'x'"), "plain 'x'");
        assert_eq!(escape("a\nb\tc\u{1b}d\\"), "a\\nb\\tc\\u{1b}d\\");
        assert_eq!(escape(&escape("a\nb")), escape("a\nb"));
        assert_eq!(escape("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(shown("abcdef", 3), "abc…");
        assert_eq!(shown("äb", 1), "…");
    }
}
