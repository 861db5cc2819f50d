//! libvirt's lifecycle events as a test sees them: `virsh -c qemu:///system event --all
//! --loop --timestamp` read on a thread (tests/real_libvirt_order.rs,
//! tests/systemd_boot.rs), so that an order is the one libvirt saw.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// libvirt's lifecycle events, as `virsh event` prints them, collected on a thread.
pub struct Events {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

/// One lifecycle event: when, which domain, what ("Started Booted").
#[derive(Debug, Clone)]
pub struct Event {
    pub at: DateTime<Utc>,
    pub domain: String,
    pub what: String,
}

impl Events {
    pub fn start() -> Self {
        let mut child = Command::new("virsh")
            .args([
                "-c",
                "qemu:///system",
                "event",
                "--all",
                "--loop",
                "--timestamp",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        // virsh registers its callbacks before it reads events; give it a moment.
        std::thread::sleep(Duration::from_millis(500));
        Events { child, lines }
    }

    /// The lifecycle events of domains starting with `prefix`, in order.
    pub fn of(&self, prefix: &str) -> Vec<Event> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let (at, rest) = l.split_once(": event 'lifecycle' for domain '")?;
                let (domain, what) = rest.split_once("': ")?;
                if !domain.starts_with(prefix) {
                    return None;
                }
                let at = DateTime::parse_from_str(at, "%Y-%m-%d %H:%M:%S%.3f%z").ok()?;
                Some(Event {
                    at: at.with_timezone(&Utc),
                    domain: domain.to_string(),
                    what: what.to_string(),
                })
            })
            .collect()
    }

    /// The first event of `domain` whose text starts with `what`, after `since`.
    pub fn first(
        &self,
        prefix: &str,
        domain: &str,
        what: &str,
        since: DateTime<Utc>,
    ) -> Option<Event> {
        self.of(prefix)
            .into_iter()
            .find(|e| e.domain == domain && e.what.starts_with(what) && e.at >= since)
    }

    /// The domains of `names` ordered by their first `what` event after `since`; `None`
    /// while one has none yet.
    pub fn order(&self, names: &[String], what: &str, since: DateTime<Utc>) -> Option<Vec<String>> {
        let prefix = "";
        let mut seen = Vec::new();
        for n in names {
            seen.push((self.first(prefix, n, what, since)?.at, n.clone()));
        }
        seen.sort();
        Some(seen.into_iter().map(|(_, n)| n).collect())
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
