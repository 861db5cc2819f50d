//! What one cloud-init seed costs to build, and an `.age` file for the benchmark. Used
//! by `bench/run.py --seeds`.
//!
//! `seed_build encrypt PUBKEY_FILE < PLAIN > OUT.age`: encrypts stdin to the SSH or age
//! public key in PUBKEY_FILE (what `age -R PUBKEY_FILE` does).
//!
//! `seed_build time REPO_DIR USER_DATA IDENTITY SEED_DIR ROUNDS`: ROUNDS times, builds
//! the seed of a VM whose `user_data` is USER_DATA in the checkout REPO_DIR (rendered
//! when it ends in `.j2`, its secrets decrypted with IDENTITY, as a sync does) and
//! writes its image into SEED_DIR (atomically, fsynced); prints the median and the
//! best in milliseconds, and the image's size.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use vmsync::desired::cloud_init_spec::{CloudInitSpec, SeedOnChange};
use vmsync::desired::secret_port::Secrets;
use vmsync::desired::seed_spec::{self, SeedInputs};
use vmsync::desired::template_render::{Params, Renderer, Vars};
use vmsync::host::secret_identity::AgeIdentity;
use vmsync::host::seed_file;
use vmsync::repo::files::DirFiles;

const XML: &str = "<domain type='kvm'><name>bench</name><devices/></domain>";

fn encrypt(pubkey: &Path) {
    let line = std::fs::read_to_string(pubkey).expect("read the public key");
    let line = line.trim();
    let mut plain = Vec::new();
    std::io::stdin()
        .read_to_end(&mut plain)
        .expect("read stdin");
    let out = match age::ssh::Recipient::from_str(line) {
        Ok(r) => age::encrypt(&r, &plain),
        Err(_) => age::encrypt(
            &age::x25519::Recipient::from_str(line).expect("an SSH or age public key"),
            &plain,
        ),
    }
    .expect("encrypt");
    std::io::Write::write_all(&mut std::io::stdout(), &out).expect("write stdout");
}

fn time(args: &[String]) {
    let [repo, user_data, identity, seed_dir, rounds] = args else {
        panic!("time REPO_DIR USER_DATA IDENTITY SEED_DIR ROUNDS");
    };
    let rounds: usize = rounds.parse().expect("ROUNDS");
    let files = DirFiles::new(repo);
    let spec = CloudInitSpec {
        user_data: user_data.clone(),
        meta_data: None,
        network_config: None,
        on_change: SeedOnChange::NextBoot,
    };
    let params = Params::new();
    let mut times = Vec::with_capacity(rounds);
    let mut size = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        // A new renderer and identity each round: a sync reads the key once, so this
        // is the cost of the first seed of a sync.
        let secrets = Secrets::with(Arc::new(AgeIdentity::new(PathBuf::from(identity))));
        let renderer = Renderer::for_text(&files, secrets);
        let inputs = SeedInputs {
            files: &files,
            renderer: &renderer,
            vars: Vars {
                vm: "bench",
                host: Some("bench"),
                params: &params,
            },
            seed_dir: Path::new(seed_dir),
        };
        let mut seed = seed_spec::build(&inputs, &spec).expect("the seed builds");
        seed_spec::attach(XML, &mut seed).expect("the CD-ROM is attached");
        seed_file::write(&seed).expect("the seed is written");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        size = std::fs::metadata(&seed.path).expect("the image").len();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{:.3} {:.3} {size}",
        times[times.len() / 2],
        times.first().copied().unwrap_or(0.0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("encrypt") => encrypt(Path::new(args.get(1).expect("PUBKEY_FILE"))),
        Some("time") => time(&args[1..]),
        _ => panic!(
            "usage: seed_build encrypt PUBKEY_FILE | time REPO_DIR USER_DATA IDENTITY SEED_DIR ROUNDS"
        ),
    }
}
