#!/usr/bin/env python3
"""What `[[notify]]` costs a sync, rerunnable by anyone (as root, libvirtd at qemu:///system).

A VM repository of N domains (default 20; defined, autostart off) is applied once; then
no-op syncs (`vmsync --once`, same commit) run interleaved in three configurations:

  none   no [[notify]] entry;
  quiet  three entries (a Gitea commit status and a webhook to a receiver that answers at
         once, a webhook to a receiver that accepts the connection and never answers),
         the outcome already told and nothing left undelivered: the usual tick;
  told   the same three entries with notify.json removed before each run, so every run
         tells its outcome and the never-answering receiver holds its lane.

For each run: the sync's own duration as vmsync measures it
(`vmsync_last_sync_duration_seconds` in the metrics file), the whole process's wall time
(which, under --once, includes waiting up to 5 s for deliveries before exiting) and CPU
time. Prints a markdown table with medians and the ratios to `none`.

Usage: sudo bench/notify.py [N] [RUNS]     (test domains vmsyncbench-notify-<i>, removed at the end)
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "vmsyncbench-notify"


class Fast(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()


def serve_fast():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fast)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def serve_hung():
    """A listener that completes handshakes (the kernel's backlog) and never reads."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(512)
    return s, s.getsockname()[1]


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def domain_xml(name):
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>
"""


def make_repo(root, n):
    repo = root / "repo"
    repo.mkdir()
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    manifest = ["version = 1\n"]
    for i in range(n):
        name = f"{PREFIX}-{i}"
        (repo / f"{name}.xml").write_text(domain_xml(name))
        manifest.append(f'[[vm]]\nname = "{name}"\nxml = "{name}.xml"\n')
    (repo / "vmsync.toml").write_text("".join(manifest))
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=b", "-c", "user.email=b@x", "commit", "-q", "-m", "bench", cwd=repo)
    return repo


def config(root, name, repo, state, notify):
    text = f"""[source]
url = "{repo}"
[libvirt]
uri = "qemu:///system"
[agent]
state_dir = "{state}"
host = "bench"
metrics_file = "{state}/metrics.prom"
[policy]
disk_roots = ["/var/lib/libvirt/images"]
{notify}"""
    path = root / f"config-{name}.toml"
    path.write_text(text)
    return path


def run_once(binary, cfg, state):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    out = subprocess.run([binary, "--config", str(cfg), "--once"], capture_output=True, text=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        sys.exit(f"vmsync --once failed ({out.returncode}):\n{out.stderr}")
    metrics = (state / "metrics.prom").read_text()
    sync = float(
        next(l for l in metrics.splitlines() if l.startswith("vmsync_last_sync_duration_seconds ")).split()[1]
    )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return sync, wall, cpu


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    if os.geteuid() != 0:
        sys.exit("run as root (qemu:///system)")
    sh("cargo", "build", "--release", "-q", cwd=ROOT)
    binary = str(ROOT / "target/release/vmsync")
    root = Path(tempfile.mkdtemp(prefix="vmsync-notify-bench-"))
    fast = serve_fast()
    hung_socket, hung = serve_hung()
    try:
        repo = make_repo(root, n)
        token = root / "token"
        token.write_text("bench-token\n")
        secret = root / "secret"
        secret.write_text("bench-secret\n")
        notify = f"""
[[notify]]
kind = "commit-status"
forge = "gitea"
api_url = "http://127.0.0.1:{fast}/api/v1"
repository = "infra/vms"
token_file = "{token}"

[[notify]]
kind = "webhook"
url = "http://127.0.0.1:{fast}/hook"
secret_file = "{secret}"

[[notify]]
kind = "webhook"
url = "http://127.0.0.1:{hung}/never"
"""
        states = {k: root / f"state-{k}" for k in ("none", "quiet", "told")}
        cfgs = {
            "none": config(root, "none", repo, states["none"], ""),
            "quiet": config(root, "quiet", repo, states["quiet"], notify),
            "told": config(root, "told", repo, states["told"], notify),
        }
        # Apply once per state directory (the domains are the same: later runs are no-ops).
        for k in cfgs:
            run_once(binary, cfgs[k], states[k])
        results = {k: [] for k in cfgs}
        for _ in range(runs):
            for k in ("none", "quiet", "told"):
                notify_file = states[k] / "notify.json"
                if k == "told":
                    notify_file.unlink(missing_ok=True)
                elif k == "quiet":
                    # What the hung receiver never got is not sent again here.
                    data = json.loads(notify_file.read_text())
                    data["undelivered"] = []
                    notify_file.write_text(json.dumps(data))
                results[k].append(run_once(binary, cfgs[k], states[k]))
        base = [statistics.median(r[i] for r in results["none"]) for i in range(3)]
        load = os.getloadavg()[0]
        print(f"N = {n} domains, {runs} interleaved runs each, load average {load:.1f}, "
              f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        print("| configuration | sync (vmsync's own), median ms | ratio | process wall, median ms | ratio | process CPU, median ms | ratio |")
        print("|---|---|---|---|---|---|---|")
        for k in ("none", "quiet", "told"):
            med = [statistics.median(r[i] for r in results[k]) for i in range(3)]
            cells = []
            for i in range(3):
                cells += [f"{med[i] * 1000:.1f}", f"{med[i] / base[i]:.2f}"]
            print(f"| {k} | " + " | ".join(cells) + " |")
        told_sync_max = max(r[0] for r in results["told"])
        print(f"\nlongest `told` sync: {told_sync_max * 1000:.1f} ms "
              f"(the never-answering receiver's timeout is 10 s)")
    finally:
        hung_socket.close()
        for i in range(n):
            subprocess.run(["virsh", "-q", "-c", "qemu:///system", "undefine", f"{PREFIX}-{i}"],
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
