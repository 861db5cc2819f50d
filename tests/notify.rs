//! Events (`[[notify]]`) and `vmsync suspend`, with the real binary. The receiver is a
//! small Python HTTP server written from the forges' API documentation, independently of
//! vmsync's code: it checks each commit-status request's method, path, auth header and
//! JSON fields field by field (GitHub, Gitea/Forgejo, GitLab, including GitLab's state
//! names, its refusal of a transition to the state a status already has, and the
//! description limits), verifies a webhook's HMAC-SHA256 signature with Python's `hmac`,
//! and has a path that accepts a request and never answers.
//!
//! The first tests run on libvirt's test driver; the `real_` ones on the real libvirtd
//! (tests/common harness, objects with a unique prefix).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, Manifest, Run, vmsync_command};

const RECEIVER: &str = r#"
import hmac, hashlib, json, re, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = sys.argv[1]
SECRET = open(sys.argv[2], 'rb').read().rstrip(b'\r\n')
HOST = sys.argv[3]
SHA = r'[0-9a-f]{40}'
FORGES = {
    # Documented path, auth header and value, body fields, states, description limit.
    'github': (r'^/gh/repos/infra/vms/statuses/(' + SHA + r')$', 'Authorization', 'Bearer TOKEN-GH',
               {'state', 'target_url', 'description', 'context'}, {'pending', 'success', 'failure', 'error'}, 'context', 140),
    'gitea': (r'^/gitea/api/v1/repos/infra/vms/statuses/(' + SHA + r')$', 'Authorization', 'token TOKEN-GITEA',
              {'state', 'target_url', 'description', 'context'}, {'pending', 'success', 'error', 'failure', 'warning'}, 'context', 255),
    'gitlab': (r'^/gitlab/api/v4/projects/infra%2Fvms/statuses/(' + SHA + r')$', 'PRIVATE-TOKEN', 'TOKEN-GL',
               {'state', 'ref', 'target_url', 'description', 'name', 'context', 'coverage', 'pipeline_id'},
               {'pending', 'running', 'success', 'failed', 'canceled'}, 'name', 255),
}
gitlab_state = {}
lock = threading.Lock()

def log(entry):
    with lock:
        with open(LOG, 'a') as f:
            f.write(json.dumps(entry) + '\n')

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def answer(self, code):
        self.send_response(code)
        self.send_header('Content-Length', '0')
        self.end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('Content-Length', '0')))
        if self.path == '/hang':
            log({'kind': 'hang'})
            time.sleep(3600)
            return
        if self.path == '/hook':
            problems = []
            sig = self.headers.get('X-Vmsync-Signature-256', '')
            want = 'sha256=' + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(sig, want):
                problems.append('bad signature')
            if self.headers.get('Content-Type') != 'application/json':
                problems.append('content type')
            try:
                event = json.loads(body)
            except Exception as e:
                event = None
                problems.append('not json: %s' % e)
            log({'kind': 'webhook', 'problems': problems, 'event': event})
            return self.answer(204 if not problems else 401)
        for forge, (path, header, value, fields, states, ctx, limit) in FORGES.items():
            m = re.match(path, self.path)
            if not m:
                continue
            problems = []
            if self.command != 'POST':
                problems.append('method ' + self.command)
            if self.headers.get(header) != value:
                problems.append('auth header %s' % header)
            if forge == 'github' and self.headers.get('Accept') != 'application/vnd.github+json':
                problems.append('accept header')
            try:
                data = json.loads(body)
            except Exception as e:
                data = {}
                problems.append('not json: %s' % e)
            extra = set(data) - fields
            if extra:
                problems.append('unknown fields %s' % sorted(extra))
            if data.get('state') not in states:
                problems.append('state %r' % data.get('state'))
            if data.get(ctx) != 'vmsync/' + HOST:
                problems.append('%s %r' % (ctx, data.get(ctx)))
            desc = data.get('description', '')
            if not isinstance(desc, str) or not desc or len(desc) > limit:
                problems.append('description %r' % desc)
            code = 201
            if forge == 'gitlab':
                key = (m.group(1), data.get('name'))
                with lock:
                    if gitlab_state.get(key) == data.get('state'):
                        problems.append('gitlab: cannot transition to the same state')
                        code = 400
                    else:
                        gitlab_state[key] = data.get('state')
            log({'kind': 'status', 'forge': forge, 'sha': m.group(1), 'state': data.get('state'),
                 'description': desc, 'problems': problems})
            return self.answer(code if not problems else 400)
        log({'kind': 'unknown', 'path': self.path, 'problems': ['unknown path']})
        self.answer(404)

server = ThreadingHTTPServer(('127.0.0.1', 0), H)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// The Python receiver, killed on drop.
struct Receiver {
    child: Child,
    port: u16,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("receiver.py");
        std::fs::write(&script, RECEIVER).unwrap();
        let secret = dir.path().join("hook-secret");
        std::fs::write(&secret, "hook s3cret\n").unwrap();
        for (name, token) in [
            ("gh", "TOKEN-GH"),
            ("gitea", "TOKEN-GITEA"),
            ("gl", "TOKEN-GL"),
        ] {
            std::fs::write(
                dir.path().join(format!("{name}-token")),
                format!("{token}\n"),
            )
            .unwrap();
        }
        let log = dir.path().join("requests.jsonl");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&log)
            .arg(&secret)
            .arg(common::HOST)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (scripts/setup-host.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the receiver's port");
        Receiver {
            child,
            port,
            log,
            dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every request logged so far.
    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until `n` requests of `kind` arrived (or 10 s), then returns them.
    fn wait_for(&self, kind: &str, n: usize) -> Vec<serde_json::Value> {
        let start = Instant::now();
        loop {
            let got: Vec<_> = self
                .requests()
                .into_iter()
                .filter(|r| r["kind"] == kind)
                .collect();
            if got.len() >= n || start.elapsed() > Duration::from_secs(10) {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `sync` and asserts that it told nothing: no request arrives.
    fn tells_nothing(&self, sync: impl FnOnce()) {
        let before = self.requests().len();
        sync();
        std::thread::sleep(Duration::from_millis(300));
        let requests = self.requests();
        assert_eq!(requests.len(), before, "{:?}", &requests[before..]);
    }

    /// The (state, description) of each status of `forge` for `sha`, in order.
    fn statuses(&self, forge: &str, sha: &str) -> Vec<(String, String)> {
        self.requests()
            .into_iter()
            .filter(|r| r["kind"] == "status" && r["forge"] == forge && r["sha"] == sha)
            .map(|r| {
                assert_eq!(r["problems"], serde_json::json!([]), "{r}");
                (
                    r["state"].as_str().unwrap().to_string(),
                    r["description"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config file with the three forges, the signed webhook and a command hook that saves
/// its stdin, plus `extra` lines.
fn config(env: &Env, rx: &Receiver, extra: &str) -> PathBuf {
    let out = rx.file("command-events");
    std::fs::create_dir_all(&out).unwrap();
    let text = format!(
        r#"{base}
[[notify]]
kind = "commit-status"
forge = "github"
api_url = "{gh}"
repository = "infra/vms"
token_file = "{ghtok}"

[[notify]]
kind = "commit-status"
forge = "forgejo"
api_url = "{gitea}"
repository = "infra/vms"
token_file = "{giteatok}"

[[notify]]
kind = "commit-status"
forge = "gitlab"
api_url = "{gl}"
repository = "infra/vms"
token_file = "{gltok}"

[[notify]]
kind = "webhook"
url = "{hook}"
secret_file = "{secret}"

[[notify]]
kind = "command"
command = ["/bin/sh", "-c", "cat > {out}/$(date +%s%N).json"]
{extra}
"#,
        base = env.config(""),
        gh = rx.url("/gh"),
        gitea = rx.url("/gitea/api/v1"),
        gl = rx.url("/gitlab/api/v4"),
        ghtok = rx.file("gh-token").display(),
        giteatok = rx.file("gitea-token").display(),
        gltok = rx.file("gl-token").display(),
        hook = rx.url("/hook"),
        secret = rx.file("hook-secret").display(),
        out = out.display(),
    );
    let path = rx.file("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn once(env: &Env, config: &Path, extra: &[&str]) -> Run {
    let mut cmd = vmsync_command();
    cmd.arg("--config").arg(config).args(extra).arg("--once");
    // Only the flags the config file does not already say.
    cmd.args(["--disk-root", &env.images.display().to_string()]);
    cmd.output().unwrap().into()
}

fn command_events(rx: &Receiver) -> Vec<serde_json::Value> {
    let mut files: Vec<_> = std::fs::read_dir(rx.file("command-events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", f.display()))
        })
        .collect()
}

#[test]
fn a_commit_that_applies_tells_each_forge_pending_then_success_once() {
    let env = Env::new();
    let rx = Receiver::start();
    let config = config(&env, &rx, "");
    let c1 = env.commit(&Manifest::new().vm(env.vm("web")), "web");
    once(&env, &config, &[]).expect(0);
    let secret_text = "hook s3cret";
    for (forge, pending) in [
        ("github", "pending"),
        ("gitea", "pending"),
        ("gitlab", "running"),
    ] {
        let got = rx.statuses(forge, &c1);
        assert_eq!(got.len(), 2, "{forge}: {got:?}");
        assert_eq!(got[0].0, pending, "{forge}");
        assert_eq!(
            got[1],
            (
                "success".into(),
                format!("applied {}: 2 change(s)", &c1[..12])
            ),
            "{forge}"
        );
    }
    // The webhook: signed (verified by the receiver's own hmac), the event's schema.
    let hooks = rx.wait_for("webhook", 2);
    assert_eq!(hooks.len(), 2);
    for h in &hooks {
        assert_eq!(h["problems"], serde_json::json!([]), "{h}");
    }
    let applied = &hooks[1]["event"];
    assert_eq!(applied["version"], 1);
    assert_eq!(applied["event"], "applied");
    assert_eq!(applied["host"], common::HOST);
    assert_eq!(applied["commit"], c1.as_str());
    assert_eq!(applied["previous_commit"], serde_json::Value::Null);
    assert_eq!(applied["vms"][0]["name"], "web");
    assert!(
        !applied["vms"][0]["actions"].as_array().unwrap().is_empty(),
        "{applied}"
    );
    assert!(applied["finished_at"].is_string());
    // The command hook got the same events, as valid JSON on stdin.
    let events = command_events(&rx);
    assert_eq!(
        events
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["applying", "applied"]
    );
    // No secret anywhere: not in the events, the state directory or the log.
    let state_text: String = std::fs::read_dir(env.state.path())
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .collect();
    for secret in [secret_text, "TOKEN-GH", "TOKEN-GITEA", "TOKEN-GL"] {
        assert!(!state_text.contains(secret), "{secret} in the state dir");
        assert!(!serde_json::to_string(&events).unwrap().contains(secret));
    }

    // The same outcome again is not told: no new request.
    rx.tells_nothing(|| {
        once(&env, &config, &[]).expect(0);
    });

    // An invalid commit: error (GitLab: failed), told once, nothing applied.
    env.repo.write(
        "vmsync.toml",
        "version = 1\n[[vm]]\nname = \"web\"\nautostrat = true\n",
    );
    let c2 = env.repo.commit("typo");
    once(&env, &config, &[]).expect(3);
    once(&env, &config, &[]).expect(3);
    assert_eq!(rx.statuses("github", &c2).len(), 1);
    assert_eq!(rx.statuses("github", &c2)[0].0, "error");
    assert!(
        rx.statuses("github", &c2)[0]
            .1
            .starts_with("invalid commit, nothing applied")
    );
    assert_eq!(rx.statuses("gitlab", &c2)[0].0, "failed");
    // Its repair is told as a recovery.
    let c3 = env.commit(&Manifest::new().vm(env.vm("web")), "fixed");
    once(&env, &config, &[]).expect(0);
    assert_eq!(rx.statuses("gitea", &c3).last().unwrap().0, "success");
    let hooks = rx.wait_for("webhook", 5);
    assert_eq!(hooks.last().unwrap()["event"]["event"], "recovered");
    assert_eq!(
        hooks.last().unwrap()["event"]["previous_commit"],
        c1.as_str()
    );
}

#[test]
fn a_receiver_that_never_answers_costs_the_sync_nothing_and_is_counted() {
    let env = Env::new();
    let rx = Receiver::start();
    let metrics = env.state.path().join("metrics.prom");
    let config = config(
        &env,
        &rx,
        &format!(
            "[[notify]]\nkind = \"webhook\"\nurl = \"{}\"\ntimeout = \"2s\"\n",
            rx.url("/hang")
        ),
    );
    // metrics_file goes in [agent]: add it to the config's [agent] table.
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[agent]\n",
        &format!("[agent]\nmetrics_file = \"{}\"\n", metrics.display()),
        1,
    );
    std::fs::write(&config, text).unwrap();
    env.commit(&Manifest::new().vm(env.vm("web")), "web");
    let started = Instant::now();
    let run = once(&env, &config, &[]).expect(0);
    // The sync is done before the hung receiver's timeout; --once then waits at most
    // a few seconds for deliveries and keeps what is left.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    run.stderr_has("kept for the next run");
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env.state.path().join("notify.json")).unwrap(),
    )
    .unwrap();
    let left = file["undelivered"].as_array().unwrap();
    assert!(!left.is_empty(), "{file}");
    assert!(
        left.iter()
            .all(|u| u["target"] == format!("webhook http://127.0.0.1:{}", rx.port))
    );
    // The other targets got theirs all the same.
    assert_eq!(rx.wait_for("webhook", 2).len(), 2);
    let metrics_text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        metrics_text.contains("vmsync_notify_failures_total 0"),
        "{metrics_text}"
    );
    assert!(metrics_text.contains("vmsync_last_success_timestamp_seconds"));
}

#[test]
fn a_suspended_host_plans_applies_nothing_says_so_and_resumes_after_until() {
    let env = Env::new();
    let rx = Receiver::start();
    let config = config(&env, &rx, "");
    let suspend = |args: &[&str]| -> Run {
        let mut cmd = vmsync_command();
        cmd.arg("--config")
            .arg(&config)
            .args(args)
            .env("SUDO_USER", "alice");
        cmd.output().unwrap().into()
    };
    suspend(&["suspend", "--reason", "kernel upgrade", "--until", "3s"])
        .expect(0)
        .stdout_has("host suspended by alice until");
    let c1 = env.commit(&Manifest::new().vm(env.vm("web")), "web");
    let run = once(&env, &config, &[]).expect(0);
    run.stdout_has("host suspended by alice");
    run.stdout_has("planned, not applied");
    assert!(!env.record().vms.contains_key("web"), "nothing applied");
    assert_eq!(env.record().last_applied_commit, None);
    let status = suspend(&["status", "--json"]).expect(0);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["suspended"]["host"]["by"], "alice");
    assert_eq!(status["suspended"]["host"]["reason"], "kernel upgrade");
    let plan = suspend(&["plan"]).expect(0);
    plan.stdout_has("host suspended by alice");
    let got = rx.statuses("github", &c1);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "pending");
    assert!(
        got[0].1.contains("suspended by alice") && got[0].1.contains("kernel upgrade"),
        "{got:?}"
    );
    assert_eq!(rx.statuses("gitlab", &c1)[0].0, "pending");

    // After --until it applies on its own: running (GitLab) is not pending, so GitLab
    // accepts the transition.
    std::thread::sleep(Duration::from_secs(3));
    once(&env, &config, &[]).expect(0);
    assert_eq!(
        env.record().last_applied_commit.as_deref(),
        Some(c1.as_str())
    );
    let gl = rx.statuses("gitlab", &c1);
    assert_eq!(
        gl.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        ["pending", "running", "success"]
    );

    // One VM suspended: its change waits, the resume lets it through.
    suspend(&["suspend", "--vm", "web", "--reason", "debugging"]).expect(0);
    let c2 = env.commit(
        &Manifest::new().vm(env.vm("web").xml(&env.bios("web", 192))),
        "more memory",
    );
    once(&env, &config, &[])
        .expect(0)
        .stdout_has("web: suspended by alice");
    assert_eq!(
        env.record().vms["web"].applied_commit.as_deref(),
        Some(c1.as_str()),
        "the suspended vm keeps its record"
    );
    assert!(
        rx.statuses("github", &c2)
            .last()
            .unwrap()
            .1
            .contains("vm 'web' suspended")
    );
    suspend(&["resume", "--vm", "web"])
        .expect(0)
        .stdout_has("vm 'web' resumed");
    once(&env, &config, &[]).expect(0);
    assert_eq!(
        env.record().vms["web"].applied_commit.as_deref(),
        Some(c2.as_str())
    );
    assert_eq!(rx.statuses("github", &c2).last().unwrap().0, "success");
}

// ---- the real libvirtd ----

#[test]
fn real_pending_success_then_a_vm_that_fails_to_start_then_untrusted() {
    let Some(env) = Env::system("notify") else {
        return;
    };
    let rx = Receiver::start();
    let config = config(&env, &rx, "");
    let autostart = "autostart = true";
    let c1 = env.commit(&Manifest::new().vm(env.vm("a").key(autostart)), "a");
    once(&env, &config, &[]).expect(0);
    assert_eq!(
        rx.statuses("github", &c1)
            .iter()
            .map(|s| s.0.as_str())
            .collect::<Vec<_>>(),
        ["pending", "success"]
    );

    // A second VM whose disk image libvirt cannot open: it fails to start.
    let broken = env.bios("b", 128).replace(
        &env.disk("b").display().to_string(),
        &env.images.join("nowhere.qcow2").display().to_string(),
    );
    let b = common::Vm::new(&env.name("b")).key(autostart).xml(&broken);
    let c2 = env.commit(&Manifest::new().vm(env.vm("a").key(autostart)).vm(b), "b");
    once(&env, &config, &[]).expect(1);
    let got = rx.statuses("github", &c2);
    assert_eq!(got.last().unwrap().0, "failure", "{got:?}");
    assert!(
        got.last().unwrap().1.contains(&env.name("b")),
        "names the vm: {got:?}"
    );
    let hooks = rx.wait_for("webhook", 4);
    let failed = &hooks.last().unwrap()["event"];
    assert_eq!(failed["event"], "failed");
    assert!(
        failed["vms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == env.name("b").as_str() && v["error"].is_string()),
        "{failed}"
    );
    // The same failure next run is not told again.
    rx.tells_nothing(|| {
        once(&env, &config, &[]).expect(1);
    });

    // An untrusted commit (unsigned, with allowed signers set): error, nothing applied.
    let key = common::SigningKey::new("ed25519");
    let signers = common::SigningKey::allowed_signers(
        rx.dir.path(),
        &[format!("signer@example.org {}", key.public)],
    );
    let c3 = env.commit(&Manifest::new().vm(env.vm("a").key(autostart)), "unsigned");
    let applied_before = env.record().last_applied_commit.clone();
    once(
        &env,
        &config,
        &["--allowed-signers", &signers.display().to_string()],
    )
    .expect(5);
    assert_eq!(env.record().last_applied_commit, applied_before);
    let got = rx.statuses("github", &c3);
    assert_eq!(
        got.len(),
        1,
        "no pending for a commit never applied: {got:?}"
    );
    assert_eq!(got[0].0, "error");
    assert!(
        got[0].1.starts_with("untrusted commit, nothing applied"),
        "{got:?}"
    );
}

#[test]
fn real_a_health_revert_names_the_vm_and_the_commit_held_back() {
    let Some(env) = Env::system("notifyh") else {
        return;
    };
    let rx = Receiver::start();
    let config = config(&env, &rx, "");
    let keys = "autostart = true\non_change = \"restart\"\nshutdown_timeout = \"2s\"\n[vm.health]\nsettle = \"1s\"";
    let good = env.bios("a", 128);
    env.commit(&Manifest::new().vm(env.vm("a").key(keys).xml(&good)), "a");
    once(&env, &config, &[]).expect(0);
    let missing = env.images.join("missing.qcow2");
    let bad = good.replacen(
        "    <interface",
        &format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='{}'/>\n      <target dev='vdb' bus='virtio'/>\n    </disk>\n    <interface",
            missing.display()
        ),
        1,
    );
    let c2 = env.commit(
        &Manifest::new().vm(env.vm("a").key(keys).xml(&bad)),
        "unstartable",
    );
    once(&env, &config, &[]).expect(1);
    let got = rx.statuses("github", &c2);
    assert_eq!(got.last().unwrap().0, "failure", "{got:?}");
    assert!(
        got.last().unwrap().1.contains("reverted")
            && got.last().unwrap().1.contains(&env.name("a")),
        "{got:?}"
    );
    let hooks = rx.wait_for("webhook", 4);
    let event = &hooks.last().unwrap()["event"];
    assert_eq!(event["event"], "reverted", "{event}");
    assert_eq!(event["reverted"], serde_json::json!([env.name("a")]));
    assert_eq!(event["held_back"][0]["vm"], env.name("a").as_str());
    assert_eq!(event["held_back"][0]["commit"], c2.as_str());
    // The next run (the vm held back: exit 1 again) is the same outcome: not told.
    rx.tells_nothing(|| {
        once(&env, &config, &[]).expect(1);
    });
}

#[test]
fn real_a_suspended_host_applies_nothing_until_its_time_is_up() {
    let Some(env) = Env::system("notifys") else {
        return;
    };
    let rx = Receiver::start();
    let config = config(&env, &rx, "");
    let mut cmd = vmsync_command();
    cmd.arg("--config")
        .arg(&config)
        .args(["suspend", "--reason", "maintenance", "--until", "4s"]);
    Run::from(cmd.output().unwrap()).expect(0);
    let c1 = env.commit(
        &Manifest::new().vm(env.vm("a").key("autostart = true")),
        "a",
    );
    once(&env, &config, &[])
        .expect(0)
        .stdout_has("planned, not applied");
    assert!(!env.defined("a"), "nothing defined while suspended");
    assert_eq!(rx.statuses("github", &c1)[0].0, "pending");
    std::thread::sleep(Duration::from_secs(4));
    once(&env, &config, &[]).expect(0);
    assert!(env.defined("a"));
    assert_eq!(env.domstate("a"), "running");
    assert_eq!(rx.statuses("github", &c1).last().unwrap().0, "success");

    // Suspended again: drift is reported, not healed; the resume heals it.
    let mut cmd = vmsync_command();
    cmd.arg("--config")
        .arg(&config)
        .args(["suspend", "--reason", "hands on"]);
    Run::from(cmd.output().unwrap()).expect(0);
    common::virsh_system_ok(&["autostart", "--disable", &env.name("a")]);
    once(&env, &config, &[])
        .expect(0)
        .stdout_has("planned, not applied");
    assert!(!env.autostart("a"), "not healed while suspended");
    let drift = env.vm_status("a")["drift"].clone();
    assert!(
        drift.as_array().is_some_and(|d| !d.is_empty()),
        "reported: {drift}"
    );
    let mut cmd = vmsync_command();
    cmd.arg("--config").arg(&config).arg("resume");
    Run::from(cmd.output().unwrap()).expect(0);
    once(&env, &config, &[]).expect(0);
    assert!(env.autostart("a"), "healed after resume");
}

/// Waits (up to 30 s) until `check` holds.
fn eventually(what: &str, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_daemon_tells_its_outcomes_and_picks_up_a_suspension_without_a_restart() {
    let env = Env::new();
    let rx = Receiver::start();
    let config = config(&env, &rx, "");
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[agent]\n",
        "[agent]\nschedule = \"* * * * * *\"\njitter_seconds = 0\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let c1 = env.commit(&Manifest::new().vm(env.vm("web")), "web");
    let mut daemon = vmsync_command()
        .arg("--config")
        .arg(&config)
        .args(["--disk-root", &env.images.display().to_string()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let last_state = |sha: &str| {
        rx.statuses("gitea", sha)
            .last()
            .map(|s| s.0.clone())
            .unwrap_or_default()
    };
    eventually("c1 applied", || last_state(&c1) == "success");

    // Suspended between two ticks: the next tick holds the new commit back.
    let suspend = |args: &[&str]| {
        let mut cmd = vmsync_command();
        cmd.arg("--config").arg(&config).args(args);
        Run::from(cmd.output().unwrap()).expect(0);
    };
    suspend(&["suspend", "--reason", "maintenance"]);
    let c2 = env.commit(
        &Manifest::new().vm(env.vm("web").xml(&env.bios("web", 192))),
        "more memory",
    );
    eventually("c2 held back", || last_state(&c2) == "pending");
    assert!(rx.statuses("gitea", &c2)[0].1.contains("maintenance"));
    // Ticks go on, the same outcome is not told again.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(rx.statuses("gitea", &c2).len(), 1);
    suspend(&["resume"]);
    eventually("c2 applied after resume", || last_state(&c2) == "success");
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    assert!(daemon.wait().unwrap().success());
}
