//! `vmsync render [DIR] VM...`: the domain XML of VMs as vmsync would define them (a
//! template rendered), after the whole checkout validated as `vmsync validate` does it,
//! for review and for the VM repository's own CI.

use std::path::{Path, PathBuf};

use crate::agent::sync;
use crate::config::{ConfigError, Settings};
use crate::desired::manifest::{self, MANIFEST_FILE};
use crate::error::SyncError;
use crate::repo::files::{DirFiles, RepoFiles};

/// Splits `[DIR] VM...`: the first of two or more arguments is the checkout when it is a
/// directory; else the checkout is the current directory.
fn split(args: &[String]) -> (PathBuf, &[String]) {
    match args {
        [first, rest @ ..] if !rest.is_empty() && Path::new(first).is_dir() => {
            (PathBuf::from(first), rest)
        }
        _ => (PathBuf::from("."), args),
    }
}

/// The XML of each VM named, one after the other (each after a comment naming it when
/// there are several). A VM the manifest does not have is a usage error (exit 2); a
/// checkout that does not validate is invalid (exit 3), with every problem.
pub fn render(settings: &Settings, args: &[String]) -> Result<String, SyncError> {
    let (dir, names) = split(args);
    let usage = |message: String| SyncError::Config(ConfigError(message));
    if names.is_empty() {
        return Err(usage("name at least one vm to render".into()));
    }
    // Names are checked first when the manifest parses; a manifest that does not is
    // reported with the other problems by the validation below.
    if let Ok(m) = DirFiles::new(&dir)
        .read_text(MANIFEST_FILE)
        .map_err(|_| ())
        .and_then(|text| manifest::parse(&text).map_err(|_| ()))
    {
        for name in names {
            if !m.vms.iter().any(|vm| vm.name == *name) {
                return Err(usage(format!(
                    "vm '{name}' is not in {}",
                    dir.join(MANIFEST_FILE).display()
                )));
            }
        }
    }
    let desired = sync::validate_dir(settings, &dir)?;
    let mut out = String::new();
    for name in names {
        let vm = desired
            .vms
            .iter()
            .find(|vm| vm.name == *name)
            .ok_or_else(|| usage(format!("vm '{name}' is not in the checkout")))?;
        if names.len() > 1 {
            out.push_str(&format!("<!-- vm '{}' from {} -->\n", vm.name, vm.xml_file));
        }
        out.push_str(&vm.xml);
        if !vm.xml.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_argument_is_the_checkout_only_when_it_is_a_directory() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let one = args(&["web-1"]);
        assert_eq!(split(&one), (PathBuf::from("."), &one[..]));
        let two = args(&[&d, "web-1"]);
        assert_eq!(split(&two), (dir.path().to_path_buf(), &two[1..]));
        let vms = args(&["web-1", "web-2"]);
        assert_eq!(split(&vms), (PathBuf::from("."), &vms[..]));
    }
}
