//! The CA bundle that `source::init_git` leaves out of OpenSSL's start-up (a sync that
//! does not fetch over https never needs it) is loaded before an https fetch: a server
//! whose certificate the bundle vouches for gets past the TLS handshake, one it does not
//! is refused. Its own test binary: `init_git` must be the process's first libgit2 use.
//! Needs the `openssl` command (server and certificates).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmsync::source::{self, FetchError, SourceSettings};

/// A self-signed certificate for 127.0.0.1: (cert.pem, key.pem) in `dir`.
fn certificate(dir: &Path, name: &str) -> (String, String) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")).display().to_string(),
        dir.join(format!("{name}.key")).display().to_string(),
    );
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .args(["-keyout", &key, "-out", &cert])
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "{out:?}");
    (cert, key)
}

/// `openssl s_server` on a free loopback port, answering any request with a web page.
struct Server(Child, u16);

impl Server {
    fn start(cert: &str, key: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
            .args(["-cert", cert, "-key", key])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run openssl s_server");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "s_server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server(child, port)
    }

    fn fetch(&self, state: &Path) -> FetchError {
        let settings = SourceSettings {
            url: format!("https://127.0.0.1:{}/vms.git", self.1),
            branch: "main".into(),
            ssh_key: None,
            token_file: None,
        };
        match source::fetch(&settings, state) {
            Ok(_) => panic!("a web page is not a git repository"),
            Err(e) => e,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_deferred_ca_bundle_is_loaded_before_an_https_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let (trusted_cert, trusted_key) = certificate(tmp.path(), "trusted");
    let (other_cert, other_key) = certificate(tmp.path(), "other");
    // The user's bundle: only the first certificate.
    // SAFETY: the harness runs this binary's only test; no other thread reads the
    // environment now.
    unsafe { std::env::set_var("SSL_CERT_FILE", &trusted_cert) };
    // SAFETY: as above, and the first use of libgit2 in this process.
    unsafe { source::init_git("/a/local/path") };
    assert_eq!(
        std::env::var("SSL_CERT_FILE").as_deref(),
        Ok(trusted_cert.as_str()),
        "the environment is put back"
    );

    let trusted = Server::start(&trusted_cert, &trusted_key);
    let err = trusted.fetch(&tmp.path().join("s1")).to_string();
    assert!(
        !err.contains("certificate") && !err.contains("SSL"),
        "the TLS handshake passed, then git failed on a web page: {err}"
    );

    let untrusted = Server::start(&other_cert, &other_key);
    let err = untrusted.fetch(&tmp.path().join("s2")).to_string();
    assert!(err.contains("certificate"), "{err}");
}
