//! A `vmsync` daemon run by a test (tests/daemon.rs, tests/webhook.rs): started with a
//! config file, its log (stderr) in a file, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running daemon.
pub struct Daemon {
    pub child: Child,
    log: PathBuf,
    /// `http://127.0.0.1:PORT` of its webhook listener ([`Daemon::start_webhook`]);
    /// empty otherwise.
    pub base: String,
}

impl Daemon {
    /// Starts `vmsync --config CONFIG`, logging to `log`.
    pub fn start(config: &Path, log: PathBuf) -> Self {
        Self::spawn(config, log, None)
    }

    /// Starts the daemon (with `PATH` set to `path_env` when given) and waits for its
    /// "webhook listening" line, whose address becomes [`Daemon::base`].
    pub fn start_webhook(config: &Path, log: PathBuf, path_env: Option<&str>) -> Self {
        let mut daemon = Self::spawn(config, log, path_env);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = daemon.log();
            if let Some(line) = log.lines().find(|l| l.contains("webhook listening")) {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("listen="))
                    .unwrap_or_else(|| panic!("no listen= in {line:?}"));
                daemon.base = format!("http://{addr}");
                return daemon;
            }
            assert!(daemon.alive(), "the daemon exited:\n{log}");
            assert!(Instant::now() < deadline, "no listener:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(config: &Path, log: PathBuf, path_env: Option<&str>) -> Self {
        let mut cmd = super::vmsync_command();
        cmd.args(["--config", &config.display().to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(path) = path_env {
            cmd.env("PATH", path);
        }
        Daemon {
            child: cmd.spawn().unwrap(),
            log,
            base: String::new(),
        }
    }

    /// Sends `sig` (`-HUP`, `-TERM`, …) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The triggers of the syncs started so far ("start", "webhook", ...), in order.
    pub fn syncs(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("sync started"))
            .map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("trigger="))
                    .unwrap_or("?")
                    .trim_matches('"')
                    .to_string()
            })
            .collect()
    }

    /// Syncs that ended (each logs its next tick).
    pub fn finished(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("next sync"))
            .count()
    }

    /// Waits until `n` syncs have ended.
    pub fn wait_finished(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.finished() < n {
            assert!(
                Instant::now() < deadline,
                "{n} syncs never ended:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
