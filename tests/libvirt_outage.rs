//! libvirtd going away in the middle of a sync, as the client sees it: vmsync talks to
//! the real libvirtd through a unix-socket proxy that cuts every connection after a
//! fixed number of bytes from the client and then refuses new ones (the daemon stopped).
//! The run must fail with exit 1 and a clear message, record nothing as applied, and the
//! next run (proxy back: the daemon restarted) must converge without duplicating anything.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Env, Manifest, Vm};

use vmsync::record;

const LIBVIRT_SOCK: &str = "/run/libvirt/libvirt-sock";

/// A proxy in front of libvirtd's socket; `cut_after` client bytes, it closes every
/// connection and stops accepting.
struct Proxy {
    path: PathBuf,
    down: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(path: &Path, cut_after: Option<usize>) -> Proxy {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let flag = down.clone();
        let accept = std::thread::spawn(move || {
            let mut streams: Vec<UnixStream> = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let server = UnixStream::connect(LIBVIRT_SOCK).unwrap();
                        streams.push(client.try_clone().unwrap());
                        streams.push(server.try_clone().unwrap());
                        // server -> client
                        let (mut from, mut to) =
                            (server.try_clone().unwrap(), client.try_clone().unwrap());
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                        // client -> server, counting
                        let (mut from, mut to) = (client, server);
                        let (sent, flag) = (sent.clone(), flag.clone());
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 4096];
                            loop {
                                let n = match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                let total = sent.fetch_add(n, Ordering::SeqCst) + n;
                                if cut_after.is_some_and(|limit| total > limit) {
                                    flag.store(true, Ordering::SeqCst);
                                    break;
                                }
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
            }
            // Down: every open connection is cut; the listener closes (connections refused).
            for s in streams {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        });
        Proxy {
            path: path.to_path_buf(),
            down,
            accept: Some(accept),
        }
    }

    fn uri(&self) -> String {
        format!("qemu+unix:///system?socket={}", self.path.display())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down.store(true, Ordering::SeqCst);
        if let Some(handle) = self.accept.take() {
            let _ = handle.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether libvirt's message is one of a lost connection to the daemon: the words of
/// libvirt's RPC client for a socket closed under it (src/rpc/virnetclient.c and
/// virnetsocket.c), whichever of its checks sees the cut first.
fn connection_lost(message: &str) -> bool {
    [
        "internal error: client socket is closed",
        "internal error: received hangup event on socket",
        "internal error: received error event on socket",
        "End of file while reading data",
        "Cannot write data",
        "Cannot recv data",
    ]
    .iter()
    .any(|m| message.starts_with(m))
}

#[test]
fn libvirtd_gone_mid_sync_fails_cleanly_and_the_next_run_converges() {
    let Some(env) = Env::system("outage") else {
        return;
    };
    let p = env.prefix.clone();
    let shorts: Vec<String> = (0..40).map(|i| format!("{i:02}")).collect();
    // No disk: the XML names one under the images dir that nobody creates (never started).
    let forty = Manifest::new().vms(
        shorts
            .iter()
            .map(|short| Vm::new(&env.name(short)).xml(&env.bios(short, 64))),
    );
    let commit = env.commit(&forty, "forty vms");
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("libvirt-sock");
    let once = |proxy: &Proxy| env.run_at(&["--once"], None, Some(&proxy.uri()));
    let defined = || {
        let (_, out) = common::virsh_system(&["list", "--all", "--name"]);
        out.lines().filter(|n| n.trim().starts_with(&p)).count()
    };

    // libvirtd "stops" after about 20 KiB from the client: some defines went through, the
    // rest cannot.
    let proxy = Proxy::start(&sock, Some(20 * 1024));
    let uri = proxy.uri();
    let run = once(&proxy).expect(1);
    drop(proxy);
    // libvirtd may still be finishing a define whose request reached it before the cut
    // (seen: 2 more domains a moment later, in 1 of 20 runs): count once it holds still.
    let mut half = defined();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = defined();
        if now == half || std::time::Instant::now() > deadline {
            break;
        }
        half = now;
    }
    assert!(
        half > 0 && half < shorts.len(),
        "{half} of {} defined before the cut",
        shorts.len()
    );
    let record = env.record();
    assert_eq!(
        record.last_applied_commit, None,
        "nothing recorded as applied"
    );
    assert_eq!(record.last_result, Some(record::SyncResult::Failed));
    assert_eq!(record.vms.len(), shorts.len(), "every VM has a record");
    let failed: Vec<_> = record.vms.iter().filter(|(_, vm)| !vm.ok).collect();
    // A define whose request reached libvirtd but whose answer was cut is recorded as
    // failed although the domain exists: the next run finds it converged.
    assert!(
        failed.len() >= shorts.len() - half && !failed.is_empty(),
        "{} failed, {half} defined",
        failed.len()
    );
    // Each failed VM names the operation and libvirt's words for the lost connection, in
    // its record and in the log line of the failed action.
    for (name, vm) in &failed {
        let error = vm.last_error.as_deref().unwrap_or_default();
        let libvirt = error
            .strip_prefix(&format!("failed to define domain '{name}' at '{uri}': "))
            .unwrap_or_else(|| panic!("{name}: {error}"));
        assert!(connection_lost(libvirt), "{name}: {error}");
        run.stderr_has(&format!(
            "action failed vm={name} commit={} action=define error={error}",
            &commit[..12]
        ));
    }
    let summary = format!(
        "{} of {} vms failed at commit {commit}; the last applied commit is unchanged",
        failed.len(),
        shorts.len()
    );
    run.stderr_has(&summary);
    // The record's error lists each failed VM with its error, by name.
    let each: Vec<_> = failed
        .iter()
        .map(|(name, vm)| format!("vm '{name}': {}", vm.last_error.as_deref().unwrap()))
        .collect();
    assert_eq!(record.last_error, Some(each.join("; ")));

    // libvirtd is back: the next run converges, defining only what is missing.
    let proxy = Proxy::start(&sock, None);
    let run = once(&proxy).expect(0);
    run.stdout_has(&format!("applied commit {commit}"));
    let redefined = run
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(&p) && l.contains(": define"))
        .count();
    assert_eq!(
        redefined,
        shorts.len() - half,
        "only the missing domains are defined:\n{}",
        run.stdout
    );
    assert_eq!(defined(), shorts.len());
    once(&proxy).expect(0).stdout_has("nothing to do");
}
