//! An https fetch checks the server's certificate against the CA bundle OpenSSL is given
//! (`SSL_CERT_FILE`): a server whose certificate the bundle vouches for gets past the TLS
//! handshake, one it does not is refused (exit 4, a certificate error). A fetch over
//! smart HTTP over TLS brings the commit in, answering the server's `401` with the
//! token; a sync from a local path or `file://` never opens the CA bundle, and one over
//! https reads it for one TLS context however many connections it makes (seen with
//! `strace`). Runs the real binary with its own environment. Needs the `openssl`
//! command (server and certificates), `python3` and `git` (an https front of
//! `git http-backend`) and `strace`.

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

/// A bare repository `vms.git` under `root` whose `main` holds a manifest without VMs;
/// returns the commit id.
fn bare_repo(root: &Path) -> String {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("vmsync.toml"), "version = 1\n").unwrap();
    git(&work, &["init", "-q"]);
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "empty manifest"]);
    git(root, &["clone", "-q", "--bare", "work", "vms.git"]);
    git(&work, &["rev-parse", "HEAD"])
}

/// A second commit on `main` of [`bare_repo`]'s repository; its id.
fn push_commit(root: &Path) -> String {
    let work = root.join("work");
    std::fs::write(work.join("README.md"), "more\n").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "second"]);
    git(&work, &["push", "-q", "../vms.git", "HEAD:main"]);
    git(&work, &["rev-parse", "HEAD"])
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t.invalid"])
        .args([
            "-c",
            "commit.gpgsign=false",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Smart HTTP over TLS: `git http-backend` behind a small python3 server, which asks
/// for `x-access-token:TOKEN` (Basic) first when a token is given.
const SMART_HTTPS: &str = r#"
import base64, http.server, os, ssl, subprocess, sys
root, cert, key, token = sys.argv[1:5]
want = "Basic " + base64.b64encode(("x-access-token:" + token).encode()).decode()
class Git(http.server.BaseHTTPRequestHandler):
    def serve(self, method):
        if token != "-" and self.headers.get("Authorization") != want:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="vms"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        env = dict(os.environ, GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL="1",
                   REQUEST_METHOD=method, PATH_INFO=path, QUERY_STRING=query,
                   CONTENT_TYPE=self.headers.get("Content-Type") or "",
                   CONTENT_LENGTH=str(len(body)), REMOTE_ADDR="127.0.0.1")
        out = subprocess.run(["git", "http-backend"], input=body, env=env,
                             capture_output=True).stdout
        ends = [(out.find(sep), sep) for sep in (b"\r\n\r\n", b"\n\n") if sep in out]
        end, sep = min(ends)
        head, payload = out[:end], out[end + len(sep):]
        status, headers = 200, []
        for line in head.decode().splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
    def do_GET(self):
        self.serve("GET")
    def do_POST(self):
        self.serve("POST")
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Git)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// The python3 smart-HTTPS server; killed on drop.
struct GitServer(Child, u16);

impl GitServer {
    fn start(root: &Path, cert: &str, key: &str, token: &str) -> Self {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .args(["-c", SMART_HTTPS])
            .arg(root)
            .args([cert, key, token])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the server's port");
        GitServer(child, port)
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/vms.git", self.1)
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vmsync --once` from `url` (test driver) with `bundle` as the CA bundle, under
/// `strace -e openat`: (exit code, stderr, how often `bundle` was opened).
fn traced_once(url: &str, state: &Path, bundle: &Path, extra: &[&str]) -> (i32, String, usize) {
    let trace = state.with_extension("trace");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=open,openat", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_vmsync"))
        .args([
            "--config",
            "/dev/null",
            "--once",
            "--connect",
            "test:///default",
        ])
        .args([
            "--branch",
            "main",
            "--host",
            "h",
            "--url",
            url,
            "--state-dir",
        ])
        .arg(state)
        .args(extra)
        .env("SSL_CERT_FILE", bundle)
        .output()
        .expect("run strace (Debian package strace)");
    let trace = std::fs::read_to_string(&trace).expect("strace's log");
    let bundle = bundle.to_str().unwrap();
    // Any other CA bundle or certificate directory would be a sign of TLS setup too.
    for system in [
        "/etc/ssl/certs/ca-certificates.crt",
        "/usr/lib/ssl/cert.pem",
    ] {
        assert!(
            !trace.contains(system) || url.starts_with("https://"),
            "{url}: opened {system}"
        );
    }
    let opened = trace
        .lines()
        .filter(|l| l.contains(&format!("\"{bundle}\"")))
        .count();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr, opened)
}

#[test]
fn a_smart_https_fetch_answers_the_token_challenge() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(tmp.path(), "server");
    let commit = bare_repo(tmp.path());
    let server = GitServer::start(tmp.path(), &cert, &key, "s3cret");
    let token = tmp.path().join("token");
    std::fs::write(&token, " s3cret\n").unwrap();
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "guess\n").unwrap();
    let bundle = Path::new(&cert);
    let token_arg = |file: &Path| ["--token-file".to_string(), file.display().to_string()];

    let t = token_arg(&token);
    let args: Vec<&str> = t.iter().map(String::as_str).collect();
    let (code, stderr, opened) = traced_once(&server.url(), &tmp.path().join("s1"), bundle, &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(&commit[..12]), "{stderr}");
    // Three requests (the advertisement unauthenticated, then with the token, then the
    // pack), each on a new connection (the server closes them): one TLS context. It
    // reads the bundle at most twice, OpenSSL's default paths and native-tls's own
    // lookup of SSL_CERT_FILE, however many connections follow.
    assert!((1..=2).contains(&opened), "bundle opened {opened} times");
    eprintln!("https fetch: the CA bundle was opened {opened} time(s)");

    // Nothing new: the advertisement names the commit the clone holds, no pack asked.
    let (code, stderr, _) = traced_once(&server.url(), &tmp.path().join("s1"), bundle, &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("received_objects=0"), "{stderr}");
    // A new commit: only what the clone lacks comes (the commit, its tree, one blob).
    let second = push_commit(tmp.path());
    let (code, stderr, _) = traced_once(&server.url(), &tmp.path().join("s1"), bundle, &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(&second[..12]), "{stderr}");
    assert!(stderr.contains("received_objects=3 "), "{stderr}");

    let w = token_arg(&wrong);
    let args: Vec<&str> = w.iter().map(String::as_str).collect();
    let (code, stderr, _) = traced_once(&server.url(), &tmp.path().join("s2"), bundle, &args);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("token from '") && stderr.contains("was refused"),
        "{stderr}"
    );

    let (code, stderr, _) = traced_once(&server.url(), &tmp.path().join("s3"), bundle, &[]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("no token_file is configured"), "{stderr}");
}

#[test]
fn a_sync_without_tls_never_opens_the_ca_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, _) = certificate(tmp.path(), "bundle");
    let commit = bare_repo(tmp.path());
    let repo = tmp.path().join("vms.git");
    let file_url = format!("file://{}", repo.display());
    for (i, url) in [repo.display().to_string(), file_url].iter().enumerate() {
        let state = tmp.path().join(format!("local{i}"));
        let (code, stderr, opened) = traced_once(url, &state, Path::new(&cert), &[]);
        assert_eq!(code, 0, "{url}: {stderr}");
        assert!(stderr.contains(&commit[..12]), "{stderr}");
        assert_eq!(opened, 0, "{url}: the CA bundle was opened");
    }
}
