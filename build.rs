//! Build facts for `vmsync --version`: the git commit the binary is built from and the
//! libvirt version it is built against.
//!
//! - `VMSYNC_GIT_COMMIT`: `$VMSYNC_BUILD_COMMIT` when set (a packager building outside
//!   git, e.g. the Nix flake with its `rev`), else `git rev-parse --short=12 HEAD` of
//!   this checkout, else `unknown` (a source tarball without `.git`).
//! - `VMSYNC_LIBVIRT_VERSION`: `pkg-config --modversion libvirt` (what the `virt` crate
//!   links against), else `unknown`.
//!
//! Rebuilds only when HEAD moves (or the variable changes), never on every build.

use std::path::PathBuf;
use std::process::Command;

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=VMSYNC_BUILD_COMMIT");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let commit = match std::env::var("VMSYNC_BUILD_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => git_commit().unwrap_or_else(|| "unknown".into()),
    };
    println!("cargo:rustc-env=VMSYNC_GIT_COMMIT={commit}");

    let pkg_config = std::env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".into());
    let libvirt =
        output(&pkg_config, &["--modversion", "libvirt"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=VMSYNC_LIBVIRT_VERSION={libvirt}");
}

/// HEAD's commit, watching the files that move it: HEAD itself (in a worktree, the
/// worktree's own), the branch it names (loose or packed). Outside git: `None`, and no
/// path to watch (a missing watched path would rerun this script on every build).
fn git_commit() -> Option<String> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    // Only this checkout's own repository, never one around an unpacked tarball.
    let top = output("git", &["-C", &manifest, "rev-parse", "--show-toplevel"])?;
    if std::fs::canonicalize(&top).ok()? != std::fs::canonicalize(&manifest).ok()? {
        return None;
    }
    let commit = output("git", &["-C", &manifest, "rev-parse", "--short=12", "HEAD"])?;
    let git_path = |what: &str| {
        output("git", &["-C", &manifest, "rev-parse", "--git-path", what])
            .map(|p| PathBuf::from(&manifest).join(p))
    };
    let mut watch = vec![git_path("HEAD"), git_path("packed-refs")];
    if let Some(branch) = output("git", &["-C", &manifest, "symbolic-ref", "-q", "HEAD"]) {
        watch.push(git_path(&branch));
    }
    for path in watch.into_iter().flatten().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    Some(commit)
}
