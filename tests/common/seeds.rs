//! Cloud-init seeds and secrets in tests: a host identity (an SSH ed25519 key made with
//! `ssh-keygen`, as on a real host), secrets encrypted to it, the agent config that
//! points vmsync at both, and reading a seed image back with `isoinfo` and `blkid`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use super::Env;

/// A host identity in `dir`: the private key file and its public line.
pub struct HostKey {
    pub path: PathBuf,
    pub public: String,
}

impl HostKey {
    /// `ssh-keygen -t ed25519 -N ''` into `dir/host_ed25519_key`.
    pub fn ssh(dir: &Path) -> Self {
        let path = dir.join("host_ed25519_key");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "test-host", "-f"])
            .arg(&path)
            .output()
            .expect("ssh-keygen runs (package openssh-client)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        Self {
            path,
            public: public.trim().to_string(),
        }
    }

    /// `plain` encrypted to this key (what `age -R host.pub` writes).
    pub fn encrypt(&self, plain: &[u8]) -> Vec<u8> {
        let recipient = age::ssh::Recipient::from_str(&self.public).expect("an ssh recipient");
        age::encrypt(&recipient, plain).unwrap()
    }
}

/// Writes the agent config of `env` with `[policy] seed_dir` and `[secrets] identity`
/// (plus `extra` lines in `[policy]`), and uses it for every run.
pub fn configure(env: &mut Env, seed_dir: &Path, identity: &Path, extra: &str) {
    let path = env.state.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "[policy]\nseed_dir = \"{}\"\n{extra}\n[secrets]\nidentity = \"{}\"\n",
            seed_dir.display(),
            identity.display()
        ),
    )
    .unwrap();
    env.config_file = Some(path);
}

/// A `[vm.cloud_init]` table with `user_data` and more `key = value` lines.
pub fn cloud_init(user_data: &str, more: &str) -> String {
    format!("\n  [vm.cloud_init]\n  user_data = \"{user_data}\"\n{more}")
}

/// `isoinfo ARGS -i IMAGE`, which must succeed: its output.
fn isoinfo(args: &[&str], image: &Path) -> String {
    let out = Command::new("isoinfo")
        .args(args)
        .arg("-i")
        .arg(image)
        .output()
        .expect("isoinfo runs (package genisoimage)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `isoinfo -J -x /NAME -i IMAGE`: a file of the seed as Linux shows it (Joliet).
pub fn seed_file(image: &Path, name: &str) -> String {
    isoinfo(&["-J", "-x", &format!("/{name}")], image)
}

/// `isoinfo -d -i IMAGE`: the volume descriptor as text.
pub fn seed_descriptor(image: &Path) -> String {
    isoinfo(&["-d"], image)
}

/// `isoinfo -J -l -i IMAGE`: the Joliet listing.
pub fn seed_listing(image: &Path) -> String {
    isoinfo(&["-J", "-l"], image)
}

/// `blkid -p -s LABEL -o value IMAGE`: the label cloud-init finds the seed by.
pub fn blkid_label(image: &Path) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-s", "LABEL", "-o", "value"])
        .arg(image)
        .output()
        .expect("blkid runs (package util-linux)");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// (inode, mtime in ns) of a file: equal means it was not written again.
pub fn identity_of(path: &Path) -> (u64, i128) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (
        m.ino(),
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
    )
}
