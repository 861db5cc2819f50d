//! The fake host that unit tests (`cfg(test)`) and the integration tests in tests/ (the
//! `test-support` feature, which the crate's dev-dependency on itself turns on) share: a
//! [`FakeHost`] in memory behind the `Hypervisor` and `DiskProvisioner` seams, with
//! scripted behaviours, and [`executable_script`]. Never in a release build.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

use crate::desired::disk_spec::DiskSpec;
use crate::host::disk::{DiskError, DiskProvisioner, ImageInfo};
use crate::host::hypervisor::{HvError, Hypervisor, Listing, RunState};

/// A host in memory: domains defined, started and stopped at once, the starts that
/// libvirt refuses (`refuse_start`), and the definitions whose domain crashes once
/// started (`crashing`). Disks exist once created. Every call is logged (`calls`).
#[derive(Default)]
pub struct FakeHost {
    domains: Mutex<BTreeMap<String, (Listing, String)>>,
    /// Domains (by name) that libvirt refuses to start.
    pub refuse_start: BTreeSet<String>,
    /// Definitions (by the fingerprint in vmsync's tag) whose domain crashes once
    /// started: `run_state` reports it "crashed".
    pub crashing: BTreeSet<String>,
    /// A script of states instead: the i-th `run_state` of any domain answers
    /// `run_states[i]`, the last one after that.
    pub run_states: Vec<RunState>,
    polls: Mutex<usize>,
    /// The guest agent answers from this ping on (1 = the first; 0 = never asked
    /// about, it answers every ping).
    pub agent_from: usize,
    pings: Mutex<usize>,
    /// The guests' IP addresses (`addresses`), for every domain.
    pub addresses: Vec<String>,
    /// Guests (by name) that ignore ACPI shutdown requests, as one without an OS does:
    /// only `destroy` stops them.
    pub ignore_shutdown: BTreeSet<String>,
    /// Domains (by name) whose XML cannot be read.
    pub unreadable_xml: BTreeSet<String>,
    calls: Mutex<Vec<String>>,
}

impl FakeHost {
    /// A host that refuses to start these domains.
    pub fn refusing_to_start(names: &[&str]) -> Self {
        Self {
            refuse_start: names.iter().map(|n| n.to_string()).collect(),
            ..Self::default()
        }
    }

    /// A host holding these domains (listing and inactive XML) already.
    pub fn with_domains(domains: Vec<(Listing, String)>) -> Self {
        let host = Self::default();
        *host.domains.lock().unwrap() = domains
            .into_iter()
            .map(|(listing, xml)| (listing.name.clone(), (listing, xml)))
            .collect();
        host
    }

    /// A domain whose states follow `run_states` (see [`FakeHost::run_states`]) and
    /// whose guest agent answers from the `agent_from`-th ping on.
    pub fn scripted(run_states: Vec<RunState>, agent_from: usize) -> Self {
        Self {
            run_states,
            agent_from,
            ..Self::default()
        }
    }

    /// A running guest `name` that ignores ACPI shutdown requests and whose XML cannot
    /// be read back; no call logged yet.
    pub fn stubborn_guest(name: &str) -> Self {
        let listing = Listing {
            name: name.to_string(),
            uuid: "00000000-0000-4000-8000-000000000000".into(),
            active: true,
            autostart: true,
            persistent: true,
        };
        let mut host = Self::with_domains(vec![(listing, String::new())]);
        host.ignore_shutdown.insert(name.to_string());
        host.unreadable_xml.insert(name.to_string());
        host
    }

    /// The guest agent pings so far.
    pub fn pings(&self) -> usize {
        *self.pings.lock().unwrap()
    }

    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    /// The calls so far: `define web`, `start web`, …
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn with<T>(&self, name: &str, f: impl FnOnce(&mut Listing) -> T) -> Result<T, HvError> {
        let mut domains = self.domains.lock().unwrap();
        match domains.get_mut(name) {
            Some((listing, _)) => Ok(f(listing)),
            None => Err(HvError::new("look up", Some(name), "fake:///", "no domain")),
        }
    }
}

impl Hypervisor for FakeHost {
    fn list(&self) -> Result<Vec<Listing>, HvError> {
        let domains = self.domains.lock().unwrap();
        Ok(domains.values().map(|(l, _)| l.clone()).collect())
    }
    fn xml(&self, name: &str, _inactive: bool) -> Result<String, HvError> {
        if self.unreadable_xml.contains(name) {
            return Err(HvError::new(
                "read the XML of",
                Some(name),
                "fake:///",
                "unreadable",
            ));
        }
        let domains = self.domains.lock().unwrap();
        let found = domains.get(name).map(|(_, xml)| xml.clone());
        found.ok_or_else(|| HvError::new("read", Some(name), "fake:///", "no domain"))
    }
    fn define(&self, xml: &str) -> Result<(), HvError> {
        let name = crate::desired::domain_xml::summarize(xml)
            .map_err(|e| HvError::new("define", None, "fake:///", &format!("{e:?}")))?
            .name;
        self.log(format!("define {name}"));
        let mut domains = self.domains.lock().unwrap();
        let uuid = format!("00000000-0000-4000-8000-{:012}", domains.len());
        let entry = domains.entry(name.clone()).or_insert_with(|| {
            let listing = Listing {
                name,
                uuid,
                active: false,
                autostart: false,
                persistent: true,
            };
            (listing, String::new())
        });
        entry.1 = xml.to_string();
        Ok(())
    }
    fn set_autostart(&self, name: &str, autostart: bool) -> Result<(), HvError> {
        self.log(format!("autostart {name} {autostart}"));
        self.with(name, |l| l.autostart = autostart)
    }
    fn start(&self, name: &str) -> Result<(), HvError> {
        self.log(format!("start {name}"));
        if self.refuse_start.contains(name) {
            return Err(HvError::new("start", Some(name), "fake:///", "no disk"));
        }
        self.with(name, |l| l.active = true)
    }
    fn is_active(&self, name: &str) -> Result<bool, HvError> {
        self.with(name, |l| l.active)
    }
    fn run_state(&self, name: &str) -> Result<RunState, HvError> {
        if let Some(last) = self.run_states.last() {
            let mut polls = self.polls.lock().unwrap();
            let state = self.run_states.get(*polls).unwrap_or(last).clone();
            *polls += 1;
            return Ok(state);
        }
        let active = self.is_active(name)?;
        let xml = self.xml(name, true)?;
        let crashed = crate::desired::domain_xml::read_tag(&xml)
            .is_some_and(|tag| self.crashing.contains(&tag.fingerprint));
        Ok(RunState {
            state: match (active, crashed) {
                (false, _) => "shut off",
                (true, true) => "crashed",
                (true, false) => "running",
            },
            reason: String::new(),
        })
    }
    fn addresses(&self, _name: &str) -> Vec<String> {
        self.addresses.clone()
    }
    fn agent_ping(&self, name: &str, _timeout: std::time::Duration) -> Result<(), HvError> {
        let mut pings = self.pings.lock().unwrap();
        *pings += 1;
        if *pings >= self.agent_from {
            return Ok(());
        }
        Err(HvError::new(
            "ping the guest agent of",
            Some(name),
            "fake:///",
            "Guest agent is not responding",
        ))
    }
    fn shutdown(&self, name: &str) -> Result<(), HvError> {
        self.log(format!("shutdown {name}"));
        let ignored = self.ignore_shutdown.contains(name);
        self.with(name, |l| l.active &= ignored)
    }
    fn destroy(&self, name: &str) -> Result<(), HvError> {
        self.log(format!("destroy {name}"));
        self.with(name, |l| l.active = false)
    }
    fn undefine_keep_state(&self, name: &str) -> Result<(), HvError> {
        self.log(format!("undefine {name}"));
        self.domains.lock().unwrap().remove(name);
        Ok(())
    }
    fn rename(&self, name: &str, new_name: &str) -> Result<(), HvError> {
        self.log(format!("rename {name} {new_name}"));
        let mut domains = self.domains.lock().unwrap();
        let (mut listing, xml) = domains.remove(name).expect("renamed domain exists");
        listing.name = new_name.to_string();
        domains.insert(new_name.to_string(), (listing, xml));
        Ok(())
    }
}

impl DiskProvisioner for FakeHost {
    fn ensure_dir(&self, _path: &Path) -> Result<bool, DiskError> {
        Ok(false)
    }
    fn inspect(&self, _path: &Path) -> Result<Option<ImageInfo>, DiskError> {
        Ok(None)
    }
    fn create(&self, spec: &DiskSpec) -> Result<(), DiskError> {
        self.log(format!("create {}", spec.path.display()));
        Ok(())
    }
}

/// Writes an executable shell script at `path`. The file is written by a child
/// process (`install`), not by the test process: a file this process holds open for
/// writing is inherited by any child another test thread forks at that moment, and
/// executing it then fails with "Text file busy" (ETXTBSY).
pub fn executable_script(path: &Path, body: &str) {
    let source = path.with_extension("script-source");
    std::fs::write(&source, format!("#!/bin/sh\n{body}\n")).unwrap();
    let status = std::process::Command::new("install")
        .args(["-m", "755"])
        .arg(&source)
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "install {}", path.display());
}

/// What [`http_server`] answers on one path.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `200` with this body (and its `Content-Length`).
    Body(Vec<u8>),
    /// `200` announcing the whole body, but the connection closes after `after` bytes.
    Cut { body: Vec<u8>, after: usize },
    /// `200` announcing the whole body; `after` bytes are sent, then nothing (the
    /// connection is held open for a minute).
    Stall { body: Vec<u8>, after: usize },
    /// `302` to this location.
    Redirect(String),
}

/// A tiny HTTP/1.1 server on `127.0.0.1` (a thread per connection, `Connection: close`)
/// for the image download tests. Paths not in `routes` get `404`.
pub struct HttpServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The paths requested, in order.
    pub hits: std::sync::Arc<Mutex<Vec<String>>>,
}

/// Starts an [`HttpServer`] serving `routes` (path → reply); it runs until the process ends.
pub fn http_server(routes: Vec<(&str, Reply)>) -> HttpServer {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let routes: std::sync::Arc<BTreeMap<String, Reply>> = std::sync::Arc::new(
        routes
            .into_iter()
            .map(|(p, r)| (p.to_string(), r))
            .collect(),
    );
    let hits = std::sync::Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (routes, seen) = (routes.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                        break;
                    }
                }
                seen.lock().unwrap().push(path.clone());
                let mut out = stream;
                let head = |len: usize| {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
                };
                let _ = match routes.get(&path) {
                    Some(Reply::Body(body)) => out
                        .write_all(head(body.len()).as_bytes())
                        .and_then(|_| out.write_all(body)),
                    Some(Reply::Cut { body, after }) => out
                        .write_all(head(body.len()).as_bytes())
                        .and_then(|_| out.write_all(&body[..*after])),
                    Some(Reply::Stall { body, after }) => {
                        let sent = out
                            .write_all(head(body.len()).as_bytes())
                            .and_then(|_| out.write_all(&body[..*after]));
                        std::thread::sleep(std::time::Duration::from_secs(60));
                        sent
                    }
                    Some(Reply::Redirect(to)) => out.write_all(
                        format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .as_bytes(),
                    ),
                    None => out.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
            });
        }
    });
    HttpServer { base, hits }
}
