//! The change probe (`--probe-url`) against a real HTTP server on loopback (a thread
//! here serving a git `info/refs` file with ETags): an unchanged probe skips the fetch,
//! a changed one fetches and applies, a broken one fetches anyway, and a probe that lies
//! never brings in what the branch does not hold.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{Manifest, Repo, Run, TEST_URI, Vm, vmsync};

/// What the server answers `GET /info/refs` with.
#[derive(Clone)]
enum Serve {
    /// The text, with an ETag; `If-None-Match` with that ETag gets a 304.
    Refs(String),
    /// 500 Internal Server Error.
    Broken,
    /// 200 with an HTML page.
    Html,
}

#[derive(Default)]
struct Seen {
    requests: usize,
    not_modified: usize,
}

struct Server {
    port: u16,
    serve: Arc<Mutex<Serve>>,
    seen: Arc<Mutex<Seen>>,
}

impl Server {
    fn start(serve: Serve) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let serve = Arc::new(Mutex::new(serve));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (s, n) = (serve.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut if_none_match = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("if-none-match")
                    {
                        if_none_match = Some(value.trim().to_string());
                    }
                }
                let mut seen = n.lock().unwrap();
                seen.requests += 1;
                let answer = match &*s.lock().unwrap() {
                    Serve::Refs(text) => {
                        // From the whole text, as a web server's ETag changes with the file.
                        let etag = {
                            use std::hash::{Hash, Hasher};
                            let mut h = std::collections::hash_map::DefaultHasher::new();
                            text.hash(&mut h);
                            format!("\"{:x}\"", h.finish())
                        };
                        if if_none_match.as_deref() == Some(etag.as_str()) {
                            seen.not_modified += 1;
                            format!("HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nConnection: close\r\n\r\n")
                        } else {
                            format!(
                                "HTTP/1.1 200 OK\r\nETag: {etag}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                                text.len()
                            )
                        }
                    }
                    Serve::Broken => {
                        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                    }
                    Serve::Html => {
                        let page = "<html><body>not here</body></html>";
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                            page.len()
                        )
                    }
                };
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        Self { port, serve, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/info/refs", self.port)
    }

    fn set(&self, serve: Serve) {
        *self.serve.lock().unwrap() = serve;
    }

    fn requests(&self) -> (usize, usize) {
        let seen = self.seen.lock().unwrap();
        (seen.requests, seen.not_modified)
    }
}

fn refs(tip: &str) -> Serve {
    Serve::Refs(format!("{tip}\trefs/heads/main\n"))
}

/// A repository with one VM whose memory marks the commit.
fn repo(memory: u32) -> (Repo, String) {
    let repo = Repo::new();
    commit(&repo, memory);
    let head = repo.head();
    (repo, head)
}

fn commit(repo: &Repo, memory: u32) -> String {
    let xml = format!(
        "<domain type='test'><name>probe-vm</name><memory unit='MiB'>{memory}</memory><os><type>hvm</type></os></domain>"
    );
    Manifest::new()
        .vm(Vm::new("probe-vm").xml(&xml))
        .write(repo);
    repo.commit(&format!("memory {memory}"))
}

fn once(repo: &Path, state: &Path, probe: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "--once",
        "--url",
        repo.to_str().unwrap(),
        "--probe-url",
        probe,
        "--connect",
        TEST_URI,
        "--state-dir",
        state.to_str().unwrap(),
        "--host",
        "hv1",
    ];
    args.extend_from_slice(extra);
    vmsync(&args).expect(0)
}

/// Did this run fetch? (`source::fetch` logs `fetched` at INFO after every fetch.)
fn fetched(run: &Run) -> bool {
    run.stderr.lines().any(|l| l.contains(" fetched "))
}

fn applied(state: &Path) -> String {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("state.json")).unwrap()).unwrap();
    record["last_applied_commit"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn an_unchanged_probe_skips_the_fetch_and_a_changed_one_fetches() {
    let (repo, first) = repo(64);
    let server = Server::start(refs(&first));
    let state = tempfile::tempdir().unwrap();

    // No clone yet: the probe is not even asked.
    let run = once(repo.path(), state.path(), &server.url(), &[]);
    assert!(fetched(&run), "first sync fetches:\n{}", run.stderr);
    assert_eq!(applied(state.path()), first);
    assert_eq!(server.requests(), (0, 0));

    // Same tip: a 200 the first time (no validators yet), then 304s; no fetch.
    for round in 1..=2 {
        let run = once(repo.path(), state.path(), &server.url(), &[]);
        assert!(!fetched(&run), "round {round} fetched:\n{}", run.stderr);
        run.stderr_has("converged");
        assert_eq!(applied(state.path()), first);
    }
    assert_eq!(server.requests(), (2, 1));

    // A new commit the probe does not know of yet: still skipped (the probe can delay
    // a change, until probe_max_skip) ...
    let second = commit(&repo, 128);
    let run = once(repo.path(), state.path(), &server.url(), &[]);
    assert!(!fetched(&run), "{}", run.stderr);
    assert_eq!(applied(state.path()), first);

    // ... and once it names the new tip, it is fetched and applied.
    server.set(refs(&second));
    let run = once(repo.path(), state.path(), &server.url(), &[]);
    assert!(fetched(&run), "{}", run.stderr);
    assert_eq!(applied(state.path()), second);
    assert_eq!(server.requests(), (4, 2));
}

#[test]
fn a_broken_probe_fetches_anyway() {
    let (repo, first) = repo(64);
    let server = Server::start(Serve::Broken);
    let state = tempfile::tempdir().unwrap();
    once(repo.path(), state.path(), &server.url(), &[]);
    assert_eq!(applied(state.path()), first);

    let second = commit(&repo, 128);
    let run = once(repo.path(), state.path(), &server.url(), &[]);
    assert!(fetched(&run), "{}", run.stderr);
    run.stderr_has("probe failed");
    assert_eq!(applied(state.path()), second);

    // An HTML page is malformed: fetched too.
    server.set(Serve::Html);
    let third = commit(&repo, 256);
    let run = once(repo.path(), state.path(), &server.url(), &[]);
    assert!(fetched(&run), "{}", run.stderr);
    run.stderr_has("malformed");
    assert_eq!(applied(state.path()), third);

    // Nothing listening: fetched too.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/info/refs", closed.local_addr().unwrap());
    drop(closed);
    let fourth = commit(&repo, 512);
    let run = once(repo.path(), state.path(), &url, &[]);
    assert!(fetched(&run), "{}", run.stderr);
    assert_eq!(applied(state.path()), fourth);
    assert_eq!(server.requests().0, 2);
}

#[test]
fn a_lying_probe_brings_in_nothing_the_branch_does_not_hold() {
    let (repo, first) = repo(64);
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(refs(&first));
    once(repo.path(), state.path(), &server.url(), &[]);
    assert_eq!(applied(state.path()), first);

    // A commit on another branch, which the probe names as main's tip.
    repo.git(&["checkout", "-q", "-b", "evil"]);
    let evil = commit(&repo, 4096);
    repo.git(&["checkout", "-q", "main"]);
    server.set(refs(&evil));
    let run = once(repo.path(), state.path(), &server.url(), &[]);
    assert!(fetched(&run), "{}", run.stderr);
    assert_eq!(applied(state.path()), first, "only main's tip is applied");
    let status = vmsync(&[
        "status",
        "--json",
        "--state-dir",
        state.path().to_str().unwrap(),
    ]);
    assert!(!status.stdout.contains(&evil), "{}", status.stdout);

    // An object id that exists nowhere: fetched, main's tip applied.
    let second = commit(&repo, 128);
    server.set(refs(&"ab".repeat(20)));
    let run = once(repo.path(), state.path(), &server.url(), &[]);
    assert!(fetched(&run), "{}", run.stderr);
    assert_eq!(applied(state.path()), second);
}

#[test]
fn probe_max_skip_forces_a_real_fetch() {
    let (repo, first) = repo(64);
    let server = Server::start(refs(&first));
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("config.toml");
    std::fs::write(&config, "[source]\nprobe_max_skip = \"0s\"\n").unwrap();
    let config = config.to_str().unwrap();
    once(
        repo.path(),
        state.path(),
        &server.url(),
        &["--config", config],
    );
    let run = once(
        repo.path(),
        state.path(),
        &server.url(),
        &["--config", config],
    );
    assert!(fetched(&run), "{}", run.stderr);
    run.stderr_has("probe_max_skip");
    // A bad value is a config error naming the key.
    std::fs::write(
        state.path().join("bad.toml"),
        "[source]\nprobe_max_skip = \"soon\"\n",
    )
    .unwrap();
    let bad = state.path().join("bad.toml");
    let run = vmsync(&[
        "--once",
        "--config",
        bad.to_str().unwrap(),
        "--url",
        repo.path().to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("probe_max_skip 'soon'"),
        "{}",
        run.stderr
    );
}
