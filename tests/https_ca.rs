//! An https fetch checks the server's certificate against the CA bundle OpenSSL is given
//! (`SSL_CERT_FILE`): a server whose certificate the bundle vouches for gets past the TLS
//! handshake, one it does not is refused (exit 4, a certificate error). Runs the real
//! binary with its own environment. Needs the `openssl` command (server and
//! certificates).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

    /// `vmsync --once` from this server with `bundle` as the CA bundle: its stderr.
    fn fetch(&self, state: &Path, bundle: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_vmsync"))
            .args(["--once", "--connect", "test:///default", "--branch", "main"])
            .arg("--url")
            .arg(format!("https://127.0.0.1:{}/vms.git", self.1))
            .arg("--state-dir")
            .arg(state)
            .env("SSL_CERT_FILE", bundle)
            .output()
            .expect("run vmsync");
        assert_eq!(out.status.code(), Some(4), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_https_fetch_checks_the_certificate_against_the_ca_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let (trusted_cert, trusted_key) = certificate(tmp.path(), "trusted");
    let (other_cert, other_key) = certificate(tmp.path(), "other");

    // The user's bundle holds only the first certificate.
    let trusted = Server::start(&trusted_cert, &trusted_key);
    let err = trusted.fetch(&tmp.path().join("s1"), &trusted_cert);
    assert!(err.contains("failed to fetch branch 'main'"), "{err}");
    assert!(
        !err.contains("certificate") && !err.contains("SSL"),
        "the TLS handshake passed, then git failed on a web page: {err}"
    );

    let untrusted = Server::start(&other_cert, &other_key);
    let err = untrusted.fetch(&tmp.path().join("s2"), &trusted_cert);
    assert!(err.contains("certificate"), "{err}");
}
