#!/usr/bin/env python3
"""Fleet benchmark: N vmsync agents polling one git server, all on loopback.

Sets up, under a work directory (default /tmp/vmsync-fleet, removed first):
  - a bare VM repository (one tiny VM for libvirt's test driver) whose post-update hook
    runs `git update-server-info`, so `info/refs` always names the branch tip;
  - a real sshd on a spare port (its own host key and authorized key) serving it;
  - nginx + fcgiwrap in front of `git http-backend` (smart HTTP), nginx also serving the
    repository directory as static files (the dumb `info/refs` the probe asks, with
    ETags, so an unchanged file is a 304);
  - a counting TCP proxy (in this script) in front of each server: connections, bytes
    each way (TCP payload) and round trips (a client turn answered by the server);
  - the servers in their own cgroup (cpuacct on cgroup v1, cpu.stat on v2): the CPU
    they and every process they start (sshd's children, git-upload-pack, fcgiwrap's git
    http-backend) use, to the nanosecond;
  - N vmsync daemons against test:///default, each with its own state dir, host name
    (so its own jitter), schedule "0 * * * * *" (one poll a minute) and jitter_seconds 59.

Modes, one after the other, each with fresh agents:
  ssh    every poll fetches over SSH (the baseline);
  http   every poll fetches over smart HTTP (git http-backend);
  probe  every poll asks the probe (static info/refs, conditional GET) and fetches over
         SSH only when it names a new tip; at the end one push, and the time until every
         agent has applied it by polling alone;
  webhook  (if the daemon has [webhook]) probe mode plus a listener per agent; one push,
         fanned out by this script to every agent's listener, and the time until every
         agent has applied it;
  webhook-http  the same with the repository fetched over smart HTTP.
For each poll mode: after every agent's first sync (the clone), a settle period, then a
measured window: server CPU, bytes, connections and round trips per no-change poll, and
how the polls spread over the minute.

Usage (as root; packages: openssh-server nginx-light fcgiwrap git python3):
    bench/fleet/run.py [--agents N] [--window SECONDS] [--modes ssh,http,probe,webhook,webhook-http]
Writes bench/fleet/results.md (and prints it).
"""

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PORTS = {"sshd": 42201, "nginx": 42202, "ssh_proxy": 42211, "http_proxy": 42212}
WEBHOOK_BASE = 43000
SECRET = "fleet-bench-secret"


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


# ------------------------------------------------------------------ cgroup CPU --
class Cgroup:
    """A cgroup whose CPU time (ns) covers every process started into it."""

    def __init__(self, name):
        v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        base = "/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/cpuacct"
        self.path = os.path.join(base, name)
        self.v2 = v2
        if os.path.isdir(self.path):
            self.remove()
        os.makedirs(self.path, exist_ok=True)

    def join(self):
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def ns(self):
        if self.v2:
            with open(os.path.join(self.path, "cpu.stat")) as f:
                for line in f:
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) * 1000
        with open(os.path.join(self.path, "cpuacct.usage")) as f:
            return int(f.read())

    def kill_all(self):
        """Kills every process left in the cgroup (fcgiwrap's children outlive it)."""
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            pids = [int(p) for p in f.read().split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self):
        try:
            os.rmdir(self.path)
        except OSError:
            pass


# ------------------------------------------------------------ counting proxy --
class Proxy:
    """TCP proxy counting connections, bytes each way and round trips."""

    def __init__(self, listen, target):
        self.listen, self.target = listen, target
        self.conns = []  # [start, c2s, s2c, round_trips]
        self.lock = threading.Lock()

    async def handle(self, creader, cwriter):
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            cwriter.close()
            return
        rec = [time.time(), 0, 0, 0]
        state = {"last": None}
        with self.lock:
            self.conns.append(rec)

        async def pump(reader, writer, idx):
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    rec[idx] += len(data)
                    # A round trip: the server speaks after the client spoke.
                    if idx == 2 and state["last"] == 1:
                        rec[3] += 1
                    state["last"] = idx
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    writer.close()
                except Exception:
                    pass

        await asyncio.gather(pump(creader, swriter, 1), pump(sreader, cwriter, 2))

    def snapshot(self):
        with self.lock:
            return len(self.conns)

    def since(self, index):
        with self.lock:
            return [list(c) for c in self.conns[index:]]


def start_proxies(proxies):
    loop = asyncio.new_event_loop()

    async def main():
        for p in proxies:
            await asyncio.start_server(p.handle, "127.0.0.1", p.listen, backlog=1024)
        while True:
            await asyncio.sleep(3600)

    t = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    t.start()
    time.sleep(0.5)


# ------------------------------------------------------------------- servers --
def setup_repo(work):
    srv = os.path.join(work, "srv")
    bare = os.path.join(srv, "vms.git")
    os.makedirs(srv)
    sh("git", "init", "-q", "--bare", "-b", "main", bare)
    hook = os.path.join(bare, "hooks", "post-update")
    with open(hook, "w") as f:
        f.write("#!/bin/sh\nexec git update-server-info\n")
    os.chmod(hook, 0o755)
    sh("git", "-C", bare, "config", "http.receivepack", "false")
    clone = os.path.join(work, "clone")
    sh("git", "init", "-q", "-b", "main", clone)
    commit(clone, bare, 64)
    return bare, clone


def commit(clone, bare, memory):
    os.makedirs(os.path.join(clone, "vms"), exist_ok=True)
    with open(os.path.join(clone, "vmsync.toml"), "w") as f:
        f.write('version = 1\n\n[[vm]]\nname = "fleet-vm"\nxml = "vms/fleet-vm.xml"\n')
    with open(os.path.join(clone, "vms", "fleet-vm.xml"), "w") as f:
        f.write(
            "<domain type='test'><name>fleet-vm</name>"
            f"<memory unit='MiB'>{memory}</memory><os><type>hvm</type></os></domain>\n"
        )
    git = ["git", "-C", clone, "-c", "user.name=bench", "-c", "user.email=bench@invalid"]
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", f"memory {memory}"], check=True)
    subprocess.run(git + ["push", "-q", bare, "main"], check=True)
    return sh("git", "-C", clone, "rev-parse", "HEAD").strip()


def start_sshd(work, cgroup):
    d = os.path.join(work, "ssh")
    os.makedirs(d)
    os.makedirs("/run/sshd", exist_ok=True)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/host_key")
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/agent_key")
    shutil.copy(f"{d}/agent_key.pub", f"{d}/authorized_keys")
    with open(f"{d}/sshd_config", "w") as f:
        f.write(
            f"Port {PORTS['sshd']}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n"
            "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "MaxStartups 1000:30:2000\nLogLevel INFO\n"
        )
    home = os.path.join(work, "home")
    os.makedirs(os.path.join(home, ".ssh"))
    with open(f"{d}/host_key.pub") as f:
        hostkey = " ".join(f.read().split()[:2])
    with open(os.path.join(home, ".ssh", "known_hosts"), "w") as f:
        f.write(f"[127.0.0.1]:{PORTS['ssh_proxy']} {hostkey}\n")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    return subprocess.Popen(
        [sshd, "-D", "-e", "-f", f"{d}/sshd_config"],
        stderr=open(f"{d}/sshd.log", "w"),
        preexec_fn=cgroup.join,
    )


def start_http(work, bare, cgroup):
    d = os.path.join(work, "http")
    os.makedirs(os.path.join(d, "tmp"))
    sock = f"{d}/fcgiwrap.sock"
    fcgi = subprocess.Popen(
        ["fcgiwrap", "-c", "4", "-s", f"unix:{sock}"],
        stderr=open(f"{d}/fcgiwrap.log", "w"),
        preexec_fn=cgroup.join,
    )
    backend = os.path.join(sh("git", "--exec-path").strip(), "git-http-backend")
    srv = os.path.dirname(bare)
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(f"""
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  log_format bench '$msec $request_method $uri $status $request_length $bytes_sent';
  access_log {d}/access.log bench;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{
    listen 127.0.0.1:{PORTS['nginx']};
    location /static/ {{ alias {srv}/; }}
    location ~ ^/git(/.*)$ {{
      include /etc/nginx/fastcgi_params;
      fastcgi_param SCRIPT_FILENAME {backend};
      fastcgi_param GIT_PROJECT_ROOT {srv};
      fastcgi_param GIT_HTTP_EXPORT_ALL "";
      fastcgi_param PATH_INFO $1;
      fastcgi_pass unix:{sock};
    }}
  }}
}}
""")
    nginx = subprocess.Popen(
        ["nginx", "-c", f"{d}/nginx.conf", "-g", "daemon off;"],
        stderr=open(f"{d}/nginx.stderr", "w"),
        preexec_fn=cgroup.join,
    )
    time.sleep(0.5)
    return [nginx, fcgi], f"{d}/access.log"


# -------------------------------------------------------------------- agents --
def has_webhook(vmsync):
    """Whether this vmsync knows [webhook] (the config loader rejects unknown keys)."""
    probe = subprocess.run(
        [vmsync, "--config", "/dev/stdin", "status", "--state-dir", "/nonexistent"],
        input='[webhook]\nlisten = "127.0.0.1:1"\n',
        capture_output=True,
        text=True,
    )
    return "unknown field" not in probe.stderr


def start_agents(work, vmsync, n, mode, webhook=False):
    agents = []
    ssh_url = f"ssh://root@127.0.0.1:{PORTS['ssh_proxy']}/{work}/srv/vms.git"
    http_url = f"http://127.0.0.1:{PORTS['http_proxy']}/git/vms.git"
    probe_url = f"http://127.0.0.1:{PORTS['http_proxy']}/static/vms.git/info/refs"
    base = os.path.join(work, f"agents-{mode}")
    os.makedirs(base)
    if webhook:
        with open(os.path.join(base, "secret"), "w") as f:
            f.write(SECRET + "\n")
    env = dict(os.environ, HOME=os.path.join(work, "home"), VMSYNC_LOG="info", NO_COLOR="1")
    env.pop("JOURNAL_STREAM", None)
    env.pop("NOTIFY_SOCKET", None)
    for i in range(n):
        d = os.path.join(base, f"a{i:03d}")
        os.makedirs(os.path.join(d, "images"))
        lines = ["[source]"]
        over_http = mode in ("http", "webhook-http")
        lines.append(f'url = "{http_url if over_http else ssh_url}"')
        if not over_http:
            lines.append(f'ssh_key = "{work}/ssh/agent_key"')
        if mode in ("probe", "webhook", "webhook-http"):
            lines.append(f'probe_url = "{probe_url}"')
        lines += [
            "[libvirt]",
            'uri = "test:///default"',
            "[agent]",
            f'state_dir = "{d}/state"',
            f'host = "agent-{i:03d}"',
            'schedule = "0 * * * * *"',
            "jitter_seconds = 59",
            "[policy]",
            f'disk_roots = ["{d}/images"]',
        ]
        if webhook:
            lines += [
                "[webhook]",
                f'listen = "127.0.0.1:{WEBHOOK_BASE + i}"',
                f'secret_file = "{base}/secret"',
            ]
        with open(os.path.join(d, "config.toml"), "w") as f:
            f.write("\n".join(lines) + "\n")
        log = open(os.path.join(d, "vmsync.log"), "w")
        p = subprocess.Popen(
            [vmsync, "--config", os.path.join(d, "config.toml")],
            env=env,
            stdout=log,
            stderr=log,
        )
        agents.append((p, d))
        time.sleep(0.02)
    return agents


def applied(d):
    try:
        with open(os.path.join(d, "state", "state.json")) as f:
            return json.load(f).get("last_applied_commit")
    except (OSError, ValueError):
        return None


def wait_applied(agents, commit, timeout):
    start = time.time()
    done = {}
    while time.time() - start < timeout and len(done) < len(agents):
        for _, d in agents:
            if d not in done and applied(d) == commit:
                done[d] = time.time()
        time.sleep(0.05)
    return done


def stop_agents(agents):
    for p, _ in agents:
        p.send_signal(signal.SIGTERM)
    for p, _ in agents:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def fan_out(agents, n, after):
    """POSTs a signed GitHub push event to every agent's listener, concurrently."""
    body = json.dumps({"ref": "refs/heads/main", "after": after}).encode()
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    codes = [None] * n

    def post(i):
        req = urllib.request.Request(
            f"http://127.0.0.1:{WEBHOOK_BASE + i}/hooks/push",
            data=body,
            headers={
                "Content-Type": "application/json",
                "X-GitHub-Event": "push",
                "X-Hub-Signature-256": sig,
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                codes[i] = r.status
        except Exception as e:  # noqa: BLE001 - reported
            codes[i] = str(e)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


# ------------------------------------------------------------------- figures --
def spread(times):
    """Polls per 10 s of the minute, and the most in any one second."""
    buckets = [0] * 6
    per_second = {}
    for t in times:
        buckets[int(t % 60) // 10] += 1
        per_second[int(t)] = per_second.get(int(t), 0) + 1
    return buckets, max(per_second.values()) if per_second else 0


def measure(mode, proxy, ssh_proxy, cgroup, other, access_log, settle, window, n):
    # Settle: the clones are done, and in probe mode every agent has had one probe
    # answered with a 200 (validators) before the window.
    time.sleep(settle)
    first, ssh_first = proxy.snapshot(), ssh_proxy.snapshot()
    log_at = os.path.getsize(access_log) if os.path.exists(access_log) else 0
    cpu0, other0, t0 = cgroup.ns(), other.ns(), time.time()
    time.sleep(window)
    cpu1, other1, t1 = cgroup.ns(), other.ns(), time.time()
    time.sleep(1)  # connections that started in the window finish
    conns = [c for c in proxy.since(first) if c[0] < t1]
    ssh_conns = [c for c in ssh_proxy.since(ssh_first) if c[0] < t1]
    requests = []
    if os.path.exists(access_log):
        with open(access_log) as f:
            f.seek(log_at)
            for line in f:
                parts = line.split()
                if len(parts) == 6 and t0 <= float(parts[0]) < t1:
                    requests.append(parts)
    # A poll: one SSH connection (ssh), one GET of info/refs (http, probe).
    polls = [float(r[0]) for r in requests if r[1] == "GET" and r[2].endswith("/info/refs")]
    if mode == "ssh":
        polls = [c[0] for c in conns]
    count = len(polls)
    cpu_ms = (cpu1 - cpu0) / 1e6
    per = lambda total: round(total / count, 1) if count else None  # noqa: E731
    buckets, peak = spread(polls)
    return {
        "mode": mode,
        "agents": n,
        "window_s": round(t1 - t0, 1),
        "polls": count,
        "server_cpu_ms": round(cpu_ms, 1),
        "other_server_cpu_ms": round((other1 - other0) / 1e6, 1),
        "cpu_ms_per_poll": round(cpu_ms / count, 3) if count else None,
        "bytes_c2s": per(sum(c[1] for c in conns)),
        "bytes_s2c": per(sum(c[2] for c in conns)),
        "connections_per_poll": round(len(conns) / count, 2) if count else None,
        "round_trips": per(sum(c[3] for c in conns)),
        "http_requests_per_poll": round(len(requests) / count, 2) if count and requests else None,
        "http_statuses": sorted({(r[1], r[3]) for r in requests}),
        # Per answer status of the polled URL: count, request bytes, answer bytes (nginx).
        "by_status": {
            st: (len(rs), round(statistics.mean(int(r[4]) for r in rs)),
                 round(statistics.mean(int(r[5]) for r in rs)))
            for st in sorted({r[3] for r in requests if r[2].endswith("/info/refs")})
            for rs in [[r for r in requests if r[3] == st and r[2].endswith("/info/refs")]]
        },
        "ssh_connections_in_window": len(ssh_conns) if mode != "ssh" else len(conns),
        "spread_10s": buckets,
        "max_per_second": peak,
    }


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ver = lambda *a: subprocess.run(a, capture_output=True, text=True).stdout.strip() or subprocess.run(a, capture_output=True, text=True).stderr.strip()  # noqa: E731
    return (
        f"{os.cpu_count()} x {cpu}, Linux {platform.release()}; "
        f"{ver('ssh', '-V')}; "
        f"{ver('nginx', '-v')}; {ver('git', '--version')}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--window", type=int, default=120, help="measured seconds per mode")
    ap.add_argument("--modes", default="ssh,http,probe,webhook,webhook-http")
    ap.add_argument("--settle", type=int, default=65,
                    help="probe mode: seconds before the window, so every agent's first probe (a 200) is done")
    ap.add_argument("--work", default="/tmp/vmsync-fleet")
    ap.add_argument("--vmsync", default=None, help="binary [target/release, else target/debug]")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (sshd, nginx and cgroups need it)")
    vmsync = args.vmsync or next(
        p for p in (f"{ROOT}/target/release/vmsync", f"{ROOT}/target/debug/vmsync")
        if os.path.exists(p)
    )
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    modes = args.modes.split(",")
    if any(m.startswith("webhook") for m in modes) and not has_webhook(vmsync):
        print("this vmsync has no [webhook]: skipping the webhook modes", file=sys.stderr)
        modes = [m for m in modes if not m.startswith("webhook")]

    bare, clone = setup_repo(args.work)
    cg_ssh, cg_http = Cgroup("vmsync-fleet-sshd"), Cgroup("vmsync-fleet-http")
    servers = [start_sshd(args.work, cg_ssh)]
    http_procs, access_log = start_http(args.work, bare, cg_http)
    servers += http_procs
    ssh_proxy = Proxy(PORTS["ssh_proxy"], PORTS["sshd"])
    http_proxy = Proxy(PORTS["http_proxy"], PORTS["nginx"])
    start_proxies([ssh_proxy, http_proxy])

    results, latencies = [], []
    memory = 64
    try:
        for mode in modes:
            tip = sh("git", "-C", clone, "rev-parse", "HEAD").strip()
            started = time.time()
            agents = start_agents(args.work, vmsync, args.agents, mode,
                                  webhook=mode.startswith("webhook"))
            done = wait_applied(agents, tip, 300)
            print(f"{mode}: {len(done)}/{len(agents)} agents applied {tip[:12]} "
                  f"in {time.time() - started:.1f} s", file=sys.stderr)
            if mode.startswith("webhook"):
                time.sleep(5)
                memory *= 2
                cpu0 = cg_ssh.ns() + cg_http.ns()
                t0 = time.time()
                new = commit(clone, bare, memory)
                codes = fan_out(agents, args.agents, new)
                fanned = time.time() - t0
                done = wait_applied(agents, new, 120)
                lat = sorted(t - t0 for t in done.values())
                herd_cpu = (cg_ssh.ns() + cg_http.ns() - cpu0) / 1e9
                how = "fetch over SSH" if mode == "webhook" else "fetch over smart HTTP"
                latencies.append((f"webhook fanned out to every agent, {how} "
                                  f"(server CPU for the push: {herd_cpu:.2f} s)", len(done),
                                  len(agents), lat, fanned, sorted({str(c) for c in codes})))
            else:
                poll_mode = mode
                proxy = http_proxy if mode in ("http", "probe") else ssh_proxy
                settle = args.settle if mode == "probe" else 5
                r = measure(poll_mode, proxy, ssh_proxy, *((cg_ssh, cg_http) if mode == "ssh" else (cg_http, cg_ssh)),
                            access_log, settle, args.window, args.agents)
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
                if mode == "probe":
                    memory *= 2
                    t0 = time.time()
                    new = commit(clone, bare, memory)
                    done = wait_applied(agents, new, 150)
                    lat = sorted(t - t0 for t in done.values())
                    latencies.append(("polling alone (1 min, jitter 59 s)", len(done),
                                      len(agents), lat, None, None))
            stop_agents(agents)
    finally:
        for p in servers:
            p.terminate()
        for p in servers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        time.sleep(0.5)
        for cg in (cg_ssh, cg_http):
            cg.kill_all()
        time.sleep(0.5)
        cg_ssh.remove()
        cg_http.remove()

    lines = [
        "# Fleet benchmark results",
        "",
        f"Machine: {machine()}",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; vmsync: {vmsync}",
        f"Command: `bench/fleet/run.py --agents {args.agents} --window {args.window} --modes {args.modes}`",
        "",
        "Per no-change poll (means over the measured window; server CPU from the servers' "
        "cgroup, bytes and round trips from the counting proxy, TCP payload only):",
        "",
        "| mode | agents | window s | polls | server CPU ms / poll | bytes client→server | "
        "bytes server→client | connections / poll | round trips / poll | HTTP requests / poll | SSH connections in window | polls per 10 s of the minute | max polls in 1 s | HTTP (method, status) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in results:
        statuses = ", ".join(f"{m} {s}" for m, s in r["http_statuses"]) or "-"
        lines.append(
            f"| {r['mode']} | {r['agents']} | {r['window_s']} | {r['polls']} | {r['cpu_ms_per_poll']} | "
            f"{r['bytes_c2s']} | {r['bytes_s2c']} | {r['connections_per_poll']} | {r['round_trips']} | "
            f"{r['http_requests_per_poll'] or '-'} | {r['ssh_connections_in_window']} | "
            f"{' / '.join(map(str, r['spread_10s']))} | {r['max_per_second']} | {statuses} |"
        )
    lines += ["", "Answers to the polled `info/refs`, from nginx's log (HTTP bytes, headers included):", ""]
    for r in results:
        for st, (count, req, sent) in r["by_status"].items():
            lines.append(f"- {r['mode']}: {count} x {st}, {req} bytes of request, {sent} bytes of answer")
    lines += ["", "Push → every agent applied it:", "",
              "| how | applied | median s | max s | fan-out took s | listener answers |",
              "|---|---:|---:|---:|---:|---|"]
    for how, ok, total, lat, fanned, codes in latencies:
        med = f"{statistics.median(lat):.2f}" if lat else "-"
        mx = f"{max(lat):.2f}" if lat else "-"
        fo = f"{fanned:.2f}" if fanned is not None else "-"
        lines.append(f"| {how} | {ok}/{total} | {med} | {mx} | {fo} | {', '.join(codes or []) or '-'} |")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
