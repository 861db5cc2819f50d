//! The push webhook as users run it: the real daemon (`vmsync` without `--once`) on
//! libvirt's `test:///default` driver with `[webhook] listen` on 127.0.0.1 (port 0: the
//! kernel picks one, the daemon logs it), and real HTTP requests made with curl, signed
//! as GitHub, Gitea/Forgejo and GitLab sign them.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{Env, Manifest};
use hmac::{KeyInit, Mac};

const SECRET: &str = "It's a Secret to Everybody";

/// The answer to one HTTP request.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

/// Runs curl with `args` (after the common ones) against `url`; the status and body.
fn curl(url: &str, args: &[&str]) -> Answer {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs (scripts/setup-host.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        status: code.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl {args:?} {url}: no status in {text:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        }),
        body: body.to_string(),
    }
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// How a forge signs a push: the headers it would send with `body`.
#[derive(Debug, Clone, Copy)]
enum Forge {
    GitHub,
    Gitea,
    Forgejo,
    GitLab,
}

impl Forge {
    fn headers(self, secret: &str, body: &[u8]) -> Vec<String> {
        let sig = hmac_hex(secret, body);
        match self {
            Forge::GitHub => vec![
                format!("X-Hub-Signature-256: sha256={sig}"),
                "X-GitHub-Event: push".into(),
            ],
            Forge::Gitea => vec![
                format!("X-Gitea-Signature: {sig}"),
                "X-Gitea-Event: push".into(),
            ],
            Forge::Forgejo => vec![
                format!("X-Forgejo-Signature: {sig}"),
                format!("X-Gitea-Signature: {sig}"),
                format!("X-Hub-Signature-256: sha256={sig}"),
                "X-Forgejo-Event: push".into(),
            ],
            Forge::GitLab => vec![
                format!("X-Gitlab-Token: {secret}"),
                "X-Gitlab-Event: Push Hook".into(),
            ],
        }
    }
}

fn payload(branch: &str, after: &str) -> String {
    format!(
        r#"{{"ref":"refs/heads/{branch}","before":"0123456789012345678901234567890123456789","after":"{after}","repository":{{"full_name":"infra/vms"}}}}"#
    )
}

/// POSTs `body` (from a file, sent byte for byte) to `path` with `headers`.
fn post(daemon: &Daemon, path: &str, headers: &[String], body: &[u8], extra: &[&str]) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    std::fs::write(&file, body).unwrap();
    let data = format!("@{}", file.display());
    let mut args: Vec<&str> = vec!["-H", "Content-Type: application/json"];
    for h in headers {
        args.extend(["-H", h.as_str()]);
    }
    args.extend(extra);
    args.extend(["--data-binary", &data]);
    curl(&format!("{}{path}", daemon.base), &args)
}

/// Writes the secret file (mode 0600) and returns the agent config with `[webhook]`.
fn webhook_config(env: &Env, etc: &Path, secret: &str, agent: &str) -> PathBuf {
    let secret_file = etc.join("webhook-secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = env.config(&format!(
        "# 1 January at midnight: only the webhook and SIGHUP sync after the first.\n\
         schedule = \"0 0 0 1 1 *\"\njitter_seconds = 0\n{agent}\
         [webhook]\nlisten = \"127.0.0.1:0\"\nsecret_file = \"{}\"\n",
        secret_file.display()
    ));
    let path = etc.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn applied(env: &Env) -> Option<String> {
    env.record().last_applied_commit
}

/// Waits until the record's last applied commit is `commit`.
fn wait_applied(env: &Env, daemon: &Daemon, commit: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied(env).as_deref() != Some(commit) {
        assert!(
            Instant::now() < deadline,
            "{commit} never applied:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls the log until a sync started by the webhook appears after the first `before`
/// syncs; how long that took from `since`.
fn webhook_sync_after(daemon: &Daemon, before: usize, since: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let syncs = daemon.syncs();
        if syncs.len() > before {
            assert_eq!(syncs[before], "webhook", "{syncs:?}");
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "no sync after the push:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn signed_pushes_of_each_forge_sync_within_a_second() {
    let env = Env::new();
    let etc = tempfile::tempdir().unwrap();
    let c1 = env.commit(&Manifest::new().vm(env.vm("w-one")), "one vm");
    let config = webhook_config(&env, etc.path(), SECRET, "");
    let daemon = Daemon::start_webhook(&config, etc.path().join("daemon.log"), None);
    daemon.wait_finished(1);
    assert_eq!(applied(&env).as_deref(), Some(c1.as_str()));
    assert_eq!(daemon.syncs(), ["start"]);

    let mut latencies = Vec::new();
    for (i, forge) in [Forge::GitHub, Forge::Gitea, Forge::Forgejo, Forge::GitLab]
        .into_iter()
        .enumerate()
    {
        // A new commit, then its push: the sync the push starts applies it.
        let more = env.vm("w-one").xml(&env.bios("w-one", 256 + 64 * i as u32));
        let commit = env.commit(&Manifest::new().vm(more), &format!("{forge:?}"));
        let body = payload("main", &commit);
        let before = daemon.syncs().len();
        let sent = Instant::now();
        let answer = post(
            &daemon,
            "/hooks/push",
            &forge.headers(SECRET, body.as_bytes()),
            body.as_bytes(),
            &[],
        );
        assert_eq!(
            answer.status,
            202,
            "{forge:?}: {answer:?}\n{}",
            daemon.log()
        );
        assert_eq!(answer.body, "sync requested\n");
        // From before curl started (an upper bound of 202 -> sync start) to the log line.
        let latency = webhook_sync_after(&daemon, before, sent);
        assert!(
            latency < Duration::from_secs(1),
            "{forge:?}: the sync started {latency:?} after the push was sent"
        );
        latencies.push(latency);
        wait_applied(&env, &daemon, &commit);
        daemon.wait_finished(before + 1);
    }
    eprintln!("push sent -> 'sync started' logged: {latencies:?}");
}

#[test]
fn bad_requests_are_refused_and_start_nothing_and_the_daemon_keeps_serving() {
    let env = Env::new();
    let etc = tempfile::tempdir().unwrap();
    env.commit(&Manifest::new(), "empty");
    let config = webhook_config(&env, etc.path(), SECRET, "");
    let mut daemon = Daemon::start_webhook(&config, etc.path().join("daemon.log"), None);
    daemon.wait_finished(1);
    let head = env.repo.head();
    let body = payload("main", &head);
    let good = Forge::GitHub.headers(SECRET, body.as_bytes());

    // Each request: the status and a text of the answer.
    let check =
        |what: &str, path: &str, headers: &[String], body: &[u8], status: u16, text: &str| {
            let answer = post(&daemon, path, headers, body, &[]);
            assert_eq!(answer.status, status, "{what}: {answer:?}");
            assert!(answer.body.contains(text), "{what}: {answer:?}");
        };
    let push = "/hooks/push";
    let bytes = body.as_bytes();
    check("no signature", push, &[], bytes, 401, "no signature");
    let wrong = |forge: Forge| forge.headers("another secret", bytes);
    check(
        "github, wrong secret",
        push,
        &wrong(Forge::GitHub),
        bytes,
        401,
        "wrong signature",
    );
    check(
        "gitea, wrong secret",
        push,
        &wrong(Forge::Gitea),
        bytes,
        401,
        "wrong signature",
    );
    check(
        "gitlab, wrong token",
        push,
        &wrong(Forge::GitLab),
        bytes,
        401,
        "wrong token",
    );
    let other_body = Forge::Gitea.headers(SECRET, b"{}");
    check(
        "signature of another body",
        push,
        &other_body,
        bytes,
        401,
        "wrong signature",
    );
    let big = {
        let mut b = payload("main", &head).into_bytes();
        b.extend(std::iter::repeat_n(b' ', 2 << 20));
        b
    };
    let big_signed = Forge::GitHub.headers(SECRET, &big);
    check(
        "over 1 MiB, signed",
        push,
        &big_signed,
        &big,
        413,
        "body over 1 MiB",
    );
    check(
        "unknown path",
        "/hooks/pull",
        &good,
        bytes,
        404,
        "not found",
    );
    check("root", "/", &good, bytes, 404, "not found");
    let not_json = b"{\"ref\": refs/heads/main";
    let signed = Forge::Gitea.headers(SECRET, not_json);
    check(
        "bad json, signed",
        push,
        &signed,
        not_json,
        400,
        "not a push payload",
    );
    let other_branch = payload("dev", &head);
    let signed = Forge::Gitea.headers(SECRET, other_branch.as_bytes());
    let text = "ignored: push to branch 'dev'; this host follows 'main'";
    check(
        "another branch",
        push,
        &signed,
        other_branch.as_bytes(),
        202,
        text,
    );
    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let mut signed = Forge::GitHub.headers(SECRET, ping);
    signed[1] = "X-GitHub-Event: ping".into();
    check("ping", push, &signed, ping, 200, "pong");
    // Over 1 MiB without a length (chunked): cut off at the limit.
    let answer = post(
        &daemon,
        "/hooks/push",
        &big_signed,
        &big,
        &["-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!(answer.status, 413, "chunked: {answer:?}");
    // Not POST.
    let answer = curl(&format!("{}/hooks/push", daemon.base), &[]);
    assert_eq!(answer.status, 405, "{answer:?}");
    // Not HTTP at all: hyper answers 400, the listener goes on.
    let mut raw = std::net::TcpStream::connect(daemon.base.trim_start_matches("http://")).unwrap();
    raw.write_all(b"HELLO \x00\x01 there\r\n\r\n").unwrap();
    let mut reply = String::new();
    let _ = raw.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");

    // None of them started a sync (a push would have within a second).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(daemon.syncs(), ["start"], "{}", daemon.log());
    assert!(daemon.alive());
    let health = curl(&format!("{}/healthz", daemon.base), &[]);
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    // Every refusal is logged with the peer.
    let log = daemon.log();
    assert!(log.contains("webhook: refused; no sync"), "{log}");
    assert!(log.contains("webhook: body too large; no sync"), "{log}");

    // And a good push after all that still works.
    let answer = post(&daemon, "/hooks/push", &good, body.as_bytes(), &[]);
    assert_eq!(answer.status, 202, "{answer:?}");
    webhook_sync_after(&daemon, 1, Instant::now());

    // The secret is read again on SIGHUP: the old one is refused from then on.
    daemon.wait_finished(2);
    std::fs::write(etc.path().join("webhook-secret"), "rotated\n").unwrap();
    daemon.signal("-HUP");
    daemon.wait_finished(3);
    let answer = post(&daemon, "/hooks/push", &good, body.as_bytes(), &[]);
    assert_eq!(answer.status, 401, "{answer:?}");
    let rotated = Forge::GitLab.headers("rotated", body.as_bytes());
    let answer = post(&daemon, "/hooks/push", &rotated, body.as_bytes(), &[]);
    assert_eq!(answer.status, 202, "{answer:?}");
    webhook_sync_after(&daemon, 3, Instant::now());

    // SIGTERM ends the daemon and its listener: exit 0, the port closed.
    daemon.wait_finished(4);
    daemon.signal("-TERM");
    let status = daemon.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    let gone = curl(&format!("{}/healthz", daemon.base), &[]);
    assert_eq!(gone.status, 0, "{gone:?}");
}

#[test]
fn a_burst_of_twenty_pushes_runs_at_most_two_syncs() {
    let env = Env::new();
    let etc = tempfile::tempdir().unwrap();
    env.commit(&Manifest::new(), "empty");
    let bin = common::slow_qemu_img(etc.path(), 2);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let config = webhook_config(&env, etc.path(), SECRET, "");
    let daemon = Daemon::start_webhook(&config, etc.path().join("daemon.log"), Some(&path));
    daemon.wait_finished(1);

    // A commit whose sync creates a disk (2 s), then 20 pushes of it at once.
    let commit = env.commit(&Manifest::new().vm(env.vm("b-one")), "one vm");
    let body = payload("main", &commit);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    std::fs::write(&file, &body).unwrap();
    let data = format!("@{}", file.display());
    // curl's URL glob makes 20 requests, --parallel sends them at once.
    let url = format!("{}/hooks/push?n=[1-20]", daemon.base);
    let mut args: Vec<String> = ["--parallel", "--parallel-max", "20", "--data-binary", &data]
        .map(String::from)
        .into();
    for h in Forge::GitHub.headers(SECRET, body.as_bytes()) {
        args.extend(["-H".into(), h]);
    }
    args.push(url);
    let started = Instant::now();
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}\n"])
        .args(&args)
        .output()
        .unwrap();
    let burst = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let accepted = text.lines().filter(|l| *l == "202").count();
    assert_eq!(
        accepted,
        20,
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    wait_applied(&env, &daemon, &commit);
    // Quiet for 3 s after the last sync ended: nothing more queued.
    let mut last = daemon.finished();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
        let now = daemon.finished();
        if now != last {
            (last, quiet_since) = (now, Instant::now());
        }
    }
    let syncs = daemon.syncs();
    let pushed = syncs.iter().filter(|t| *t == "webhook").count();
    eprintln!("burst of 20 pushes in {burst:?}: {pushed} sync(s) ({syncs:?})");
    assert!(
        (1..=2).contains(&pushed),
        "20 pushes ran {pushed} syncs: {syncs:?}\n{}",
        daemon.log()
    );
    assert_eq!(syncs.len(), pushed + 1, "{syncs:?}");
}

/// `/metrics` is Prometheus text: every line a HELP, TYPE or sample line the parser
/// reads, every sample's value a number; and it holds every line of the metrics file.
#[test]
fn metrics_endpoint_parses_as_prometheus_text_and_matches_the_metrics_file() {
    let env = Env::new();
    let etc = tempfile::tempdir().unwrap();
    let c1 = env.commit(
        &Manifest::new().vm(env.vm("m-one").key("autostart = true")),
        "one vm",
    );
    let file = env.state.path().join("vmsync.prom");
    let config = webhook_config(
        &env,
        etc.path(),
        SECRET,
        &format!("metrics_file = \"{}\"\n", file.display()),
    );
    let daemon = Daemon::start_webhook(&config, etc.path().join("daemon.log"), None);
    daemon.wait_finished(1);
    assert_eq!(applied(&env).as_deref(), Some(c1.as_str()));
    // One refused request, to be counted.
    let answer = post(&daemon, "/hooks/push", &[], b"{}", &[]);
    assert_eq!(answer.status, 401);

    let answer = curl(&format!("{}/metrics", daemon.base), &["-D", "-"]);
    assert_eq!(answer.status, 200, "{answer:?}");
    let (head, text) = answer.body.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let mut samples = 0;
    for line in text.lines() {
        match prometheus_parse::LineInfo::parse(line) {
            prometheus_parse::LineInfo::Sample { value, .. } => {
                assert!(value.parse::<f64>().is_ok(), "{line}");
                samples += 1;
            }
            prometheus_parse::LineInfo::Doc { .. } | prometheus_parse::LineInfo::Type { .. } => {}
            other => panic!("not Prometheus text: {line:?} ({other:?})"),
        }
    }
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert_eq!(scrape.samples.len(), samples);
    let value = |name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) => v,
                ref other => panic!("{name}: {other:?}"),
            })
    };
    assert_eq!(value("vmsync_last_sync_success", None), Some(1.0));
    assert_eq!(
        value("vmsync_last_applied_commit_info", Some(("commit", &c1))),
        Some(1.0)
    );
    assert_eq!(value("vmsync_vm_up", Some(("vm", "m-one"))), Some(1.0));
    assert_eq!(
        value("vmsync_webhook_requests_total", Some(("code", "401"))),
        Some(1.0)
    );
    // The same figures as the metrics file, line for line.
    let file_text = std::fs::read_to_string(&file).unwrap();
    for line in file_text.lines() {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} not in /metrics:\n{text}"
        );
    }
}

#[test]
fn webhook_config_errors_stop_the_daemon_at_start() {
    let env = Env::new();
    let etc = tempfile::tempdir().unwrap();
    let config = webhook_config(&env, etc.path(), SECRET, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let secret_line = text
        .lines()
        .find(|l| l.starts_with("secret_file"))
        .unwrap()
        .to_string();
    let run = |text: &str| {
        std::fs::write(&config, text).unwrap();
        common::vmsync(&["--config", &config.display().to_string()])
    };
    // listen without secret_file.
    run(&text.replace(&secret_line, ""))
        .expect(2)
        .stderr_has("[webhook] listen is set but secret_file is not");
    // secret_file without listen.
    run(&text.replace("listen = \"127.0.0.1:0\"", ""))
        .expect(2)
        .stderr_has("[webhook] secret_file is set but listen is not");
    // A listen that is no address.
    run(&text.replace("127.0.0.1:0", "localhost"))
        .expect(2)
        .stderr_has("invalid [webhook] listen 'localhost'");
    // An unknown key.
    run(&text.replace("[webhook]\n", "[webhook]\nport = 1\n"))
        .expect(2)
        .stderr_has("unknown field `port`");
    // An empty secret (a newline only).
    std::fs::write(etc.path().join("webhook-secret"), "\n").unwrap();
    run(&text).expect(2).stderr_has("the secret is empty");
    // A port someone else holds: the daemon cannot start.
    std::fs::write(etc.path().join("webhook-secret"), "s\n").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    run(&text.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")))
        .expect(1)
        .stderr_has(&format!(
            "failed to listen on 127.0.0.1:{port} for [webhook] listen"
        ));
    // A secret file others may read is warned about (the daemon runs: stopped here).
    use std::os::unix::fs::PermissionsExt;
    let secret = etc.path().join("webhook-secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&config, &text).unwrap();
    let daemon = Daemon::start_webhook(&config, etc.path().join("daemon.log"), None);
    assert!(
        daemon.log().contains("readable by group or others"),
        "{}",
        daemon.log()
    );
}

/// Misbehaving clients for [`healthz_is_answered_under_slowloris_and_idle_connections`]:
/// `n` idle connections (connected, silent) and `n` slowloris ones (a request head sent
/// one byte at a time, never finished), each reopened when the daemon closes it, until
/// dropped.
struct Flood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, usize)>>,
}

impl Flood {
    fn start(addr: &str, n: usize) -> Self {
        use std::net::TcpStream;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connect = {
            let addr = addr.to_string();
            move || {
                let s = TcpStream::connect(&addr).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            }
        };
        let mut idle: Vec<TcpStream> = (0..n).map(|_| connect()).collect();
        let mut slow: Vec<TcpStream> = (0..n).map(|_| connect()).collect();
        let head = b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut reopened_idle, mut reopened_slow) = (0, 0);
            let mut sent = vec![0usize; slow.len()];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for (s, at) in slow.iter_mut().zip(sent.iter_mut()) {
                    let byte = [head[*at % head.len()]];
                    if matches!(s.write(&byte), Ok(0) | Err(_)) {
                        *s = connect();
                        *at = 0;
                        reopened_slow += 1;
                    } else {
                        *at += 1;
                    }
                }
                for s in idle.iter_mut() {
                    let mut buf = [0u8; 1];
                    match s.peek(&mut buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        _ => {
                            *s = connect();
                            reopened_idle += 1;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (reopened_idle, reopened_slow)
        });
        Flood {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the clients; how many idle and slowloris connections were reopened.
    fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// One `GET /healthz` on a new connection: the answer's status line and body, and how
/// long it took; `None` when nothing came within `limit`.
fn probe(addr: &str, limit: Duration) -> Option<(String, Duration)> {
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), limit).ok()?;
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    (started.elapsed() < limit).then(|| (reply, started.elapsed()))
}

#[test]
fn healthz_is_answered_under_slowloris_and_idle_connections() {
    let env = Env::new();
    let etc = tempfile::tempdir().unwrap();
    env.commit(&Manifest::new(), "empty");
    let config = webhook_config(&env, etc.path(), SECRET, "");
    let mut daemon = Daemon::start_webhook(&config, etc.path().join("daemon.log"), None);
    daemon.wait_finished(1);
    let addr = daemon.base.trim_start_matches("http://").to_string();

    // 100 idle and 100 slowloris connections, kept up (reopened when closed) for 12 s,
    // longer than the header deadline: each probe on a new connection is answered.
    let flood = Flood::start(&addr, 100);
    std::thread::sleep(Duration::from_millis(500));
    let mut latencies = Vec::new();
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        // Generous: the machine is shared; the figures are in docs/webhook.md.
        let answer = probe(&addr, Duration::from_secs(4));
        let Some((reply, took)) = answer else {
            panic!(
                "/healthz not answered within 4 s under 100 idle and 100 slowloris connections (after {latencies:?})"
            );
        };
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok\n"),
            "{reply:?}"
        );
        latencies.push(took);
        std::thread::sleep(Duration::from_millis(300));
    }
    let (idle, slow) = flood.stop();
    latencies.sort();
    eprintln!(
        "/healthz under 100 idle + 100 slowloris: {} probes, median {:?}, max {:?}; reopened {idle} idle and {slow} slowloris connections",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
    // The daemon closed the silent ones at the header deadline (they were reopened).
    assert!(idle >= 100 && slow >= 100, "idle {idle}, slowloris {slow}");
    assert!(daemon.alive());
    let metrics = curl(&format!("{}/metrics", daemon.base), &[]);
    assert!(
        metrics
            .body
            .contains("# TYPE vmsync_webhook_connections_evicted_total counter"),
        "{}",
        metrics.body
    );
    // And a signed push still starts a sync.
    let head = env.repo.head();
    let body = payload("main", &head);
    let answer = post(
        &daemon,
        "/hooks/push",
        &Forge::GitHub.headers(SECRET, body.as_bytes()),
        body.as_bytes(),
        &[],
    );
    assert_eq!(answer.status, 202, "{answer:?}");
    webhook_sync_after(&daemon, 1, Instant::now());
}

#[test]
fn a_replayed_delivery_starts_no_second_sync() {
    let env = Env::new();
    let etc = tempfile::tempdir().unwrap();
    env.commit(&Manifest::new(), "empty");
    let config = webhook_config(&env, etc.path(), SECRET, "");
    let daemon = Daemon::start_webhook(&config, etc.path().join("daemon.log"), None);
    daemon.wait_finished(1);
    let head = env.repo.head();
    let body = payload("main", &head);
    let mut headers = Forge::GitHub.headers(SECRET, body.as_bytes());
    headers.push("X-GitHub-Delivery: 72d3162e-cc78-11e3-81ab-4c9367dc0958".into());
    let answer = post(&daemon, "/hooks/push", &headers, body.as_bytes(), &[]);
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (202, "sync requested\n")
    );
    webhook_sync_after(&daemon, 1, Instant::now());
    daemon.wait_finished(2);

    // The same signed body again, with the same delivery id and with another one (the
    // id is not signed): answered, no sync.
    for id in ["72d3162e-cc78-11e3-81ab-4c9367dc0958", "another-id"] {
        headers[2] = format!("X-GitHub-Delivery: {id}");
        let answer = post(&daemon, "/hooks/push", &headers, body.as_bytes(), &[]);
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (202, "ignored: this delivery was already received\n"),
            "{id}"
        );
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(daemon.syncs(), ["start", "webhook"], "{}", daemon.log());
    assert!(
        daemon
            .log()
            .contains("this delivery was already received; no sync")
    );

    // A new push (another body) syncs.
    let body = payload("main", "1111111111111111111111111111111111111111");
    let answer = post(
        &daemon,
        "/hooks/push",
        &Forge::Gitea.headers(SECRET, body.as_bytes()),
        body.as_bytes(),
        &[],
    );
    assert_eq!(answer.status, 202, "{answer:?}");
    webhook_sync_after(&daemon, 2, Instant::now());
}
