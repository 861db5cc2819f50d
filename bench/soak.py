#!/usr/bin/env python3
"""Soak benchmark: the release daemon for a long time under pushes, a git server that
fails now and then, and libvirtd restarts. Rerunnable by anyone, as root.

What runs (all in a fresh work directory, nothing shared with the host's libvirt):
  - a private libvirtd in session mode, run as the user `vmsoak` (made if missing) with
    its own XDG_RUNTIME_DIR/HOME, so its restarts never touch the host's
    qemu:///system daemon; vmsync reaches it by its socket
    (qemu+unix:///session?socket=…);
  - `git daemon` on loopback serving a bare VM repository (git:// protocol);
  - the vmsync daemon (default target/release/vmsync) with a schedule every 10 s,
    no jitter, backoff capped at 10 s, a webhook listener and a metrics file;
  - a pusher: every 2 to 6 s (random) a commit changes the memory of one of VMS
    domains (each with a qemu-img disk, autostart off: defined, never started) and
    is pushed to the bare repository, then announced with a signed webhook delivery;
  - faults at random: the git daemon is killed (SIGKILL) every 20 to 90 s and comes
    back after 2 to 15 s; the private libvirtd is stopped (SIGTERM, or SIGKILL one
    time in three) every 60 to 180 s and comes back after 1 to 5 s;
  - a sampler every 5 s: the daemon's RSS (VmRSS) and open file descriptors
    (/proc/PID/fd), and the last applied commit from state.json.

At the end (after the last push, up to 120 s of quiet for the daemon to converge) it
checks that every push was applied (the last applied commit is the last pushed one,
and each domain's memory in libvirt is the one the last commit asks for) and prints a
markdown report: per interval RSS/FD minimum and maximum and sync outcomes, the push
to applied latency, the fault counts, and the RSS/FD drift between the first and the
last fifth of the run. The report also goes to bench/soak-results.md.

Usage: sudo bench/soak.py [--minutes 30] [--binary target/release/vmsync] [--vms 5]
"""

import argparse
import hashlib
import hmac
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
USER = "vmsoak"
SECRET = "soak-secret"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Libvirtd:
    """A private session-mode libvirtd run as USER."""

    def __init__(self, work):
        self.work = work / "libvirt"
        self.run_dir = self.work / "run"
        self.home = self.work / "home"
        for d in (self.run_dir, self.home):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        uid = pwd.getpwnam(USER)
        for d in (self.work, self.run_dir, self.home):
            os.chown(d, uid.pw_uid, uid.pw_gid)
        self.uid, self.gid = uid.pw_uid, uid.pw_gid
        self.socket = self.run_dir / "libvirt" / "libvirt-sock"
        self.uri = f"qemu+unix:///session?socket={self.socket}"
        self.proc = None
        self.restarts = 0

    def start(self):
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.run_dir),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
        }
        out = open(self.work / "libvirtd.log", "ab")
        self.proc = subprocess.Popen(
            ["libvirtd", "--timeout", "0"],
            env=env,
            stdout=out,
            stderr=out,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
        )
        for _ in range(100):
            if self.socket.exists() and subprocess.run(
                ["virsh", "-q", "-c", self.uri, "list"], capture_output=True
            ).returncode == 0:
                return
            time.sleep(0.1)
        raise SystemExit("the private libvirtd did not come up; see " + str(self.work))

    def stop(self, hard=False):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def memory_mib(self, name):
        out = subprocess.run(
            ["virsh", "-c", self.uri, "dumpxml", "--inactive", name],
            capture_output=True,
            text=True,
        ).stdout
        m = re.search(r"<memory unit='KiB'>(\d+)</memory>", out)
        return int(m.group(1)) // 1024 if m else None


class GitServer:
    """`git daemon` on loopback serving WORK/git."""

    def __init__(self, work):
        self.base = work / "git"
        self.port = free_port()
        self.url = f"git://127.0.0.1:{self.port}/vms.git"
        self.proc = None
        self.kills = 0

    def start(self):
        self.proc = subprocess.Popen(
            [
                "git", "daemon", "--reuseaddr", "--export-all",
                f"--base-path={self.base}", "--listen=127.0.0.1",
                f"--port={self.port}", str(self.base),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # `git daemon` runs git-daemon as a child: its own process group, killed whole.
            start_new_session=True,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)

    def kill(self):
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None


def domain_xml(name, memory, disk):
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


class Repo:
    def __init__(self, work, vms, images):
        self.bare = work / "git" / "vms.git"
        self.tree = work / "checkout"
        self.vms = [f"soak-{i}" for i in range(vms)]
        self.images = images
        self.memory = {vm: 128 for vm in self.vms}
        self.pushed = []  # (commit, time pushed)
        self.n = 0
        run("git", "init", "-q", "--bare", "-b", "main", str(self.bare))
        run("git", "init", "-q", "-b", "main", str(self.tree))
        for k, v in (("user.name", "soak"), ("user.email", "soak@localhost")):
            run("git", "-C", str(self.tree), "config", k, v)
        run("git", "-C", str(self.tree), "remote", "add", "origin", str(self.bare))

    def write(self):
        (self.tree / "vms").mkdir(exist_ok=True)
        manifest = ["version = 1", ""]
        for vm in self.vms:
            disk = self.images / f"{vm}.qcow2"
            (self.tree / "vms" / f"{vm}.xml").write_text(
                domain_xml(vm, self.memory[vm], disk)
            )
            manifest += [
                "[[vm]]",
                f'name = "{vm}"',
                f'xml = "vms/{vm}.xml"',
                "autostart = false",
                "  [[vm.disk]]",
                f'  path = "{disk}"',
                '  size = "16M"',
                '  format = "qcow2"',
                "",
            ]
        (self.tree / "vmsync.toml").write_text("\n".join(manifest))

    def push(self):
        """One commit changing one VM's memory, pushed; returns the commit id."""
        if self.pushed:
            vm = self.vms[self.n % len(self.vms)]
            self.memory[vm] = 128 + (self.memory[vm] - 128 + 16) % 512
        self.n += 1
        self.write()
        run("git", "-C", str(self.tree), "add", "-A")
        run("git", "-C", str(self.tree), "commit", "-q", "-m", f"push {self.n}")
        run("git", "-C", str(self.tree), "push", "-q", "origin", "main")
        commit = run("git", "-C", str(self.tree), "rev-parse", "HEAD").stdout.strip()
        self.pushed.append((commit, time.time()))
        return commit


def webhook(port, commit):
    body = json.dumps({"ref": "refs/heads/main", "after": commit}).encode()
    sig = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/hooks/push",
        data=body,
        headers={
            "X-Hub-Signature-256": f"sha256={sig}",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": f"soak-{commit}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except Exception as e:  # noqa: BLE001 - a failed delivery is counted, not fatal
        return str(e)


def proc_stats(pid):
    rss = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])  # KiB
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--binary", default=str(ROOT / "target/release/vmsync"))
    ap.add_argument("--vms", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "soak-results.md"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (the private libvirtd runs as the user vmsoak)")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER)

    work = Path(tempfile.mkdtemp(prefix="vmsync-soak-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    images = work / "images"
    images.mkdir()
    state = work / "state"
    lv = Libvirtd(work)
    git = GitServer(work)
    repo = Repo(work, args.vms, images)
    lv.start()
    git.start()
    first = repo.push()
    hook_port = free_port()
    (work / "secret").write_text(SECRET + "\n")
    os.chmod(work / "secret", 0o600)
    config = work / "config.toml"
    config.write_text(
        f"""[source]
url = "{git.url}"
branch = "main"
[libvirt]
uri = "{lv.uri}"
[agent]
state_dir = "{state}"
schedule = "*/10 * * * * *"
jitter_seconds = 0
backoff_max_seconds = 10
max_attempts = 1000000
metrics_file = "{work / 'vmsync.prom'}"
[policy]
disk_roots = ["{images}"]
[webhook]
listen = "127.0.0.1:{hook_port}"
secret_file = "{work / 'secret'}"
"""
    )
    version = run(args.binary, "--version").stdout.strip()
    daemon_log = open(work / "daemon.log", "w")
    daemon = subprocess.Popen(
        [args.binary, "--config", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "VMSYNC_LOG": "info", "NO_COLOR": "1"},
    )
    events = []  # (time, kind) kind: converged | failed | other-error

    def reader():
        for line in daemon.stderr:
            now = time.time()
            daemon_log.write(f"{now:.3f} {line}")
            if " INFO converged " in line:
                m = re.search(r" changes=(\d+)", line)
                events.append((now, "converged" if m and int(m.group(1)) > 0 else "no-op"))
            elif "sync failed:" in line:
                events.append((now, "failed"))
        daemon_log.flush()

    threading.Thread(target=reader, daemon=True).start()
    log(f"work dir {work}; daemon pid {daemon.pid}; {version}")

    start = time.time()
    end = start + args.minutes * 60
    stop = threading.Event()
    samples = []  # (t, rss KiB, fds, applied commit)
    deliveries = {"ok": 0, "failed": 0}
    faults = {"git kills": 0, "libvirtd stops": 0, "libvirtd kills": 0}
    lock = threading.Lock()

    def applied_commit():
        try:
            return json.loads((state / "state.json").read_text()).get("last_applied_commit")
        except (OSError, ValueError):
            return None

    def sampler():
        while not stop.is_set():
            try:
                rss, fds = proc_stats(daemon.pid)
            except OSError:
                break
            samples.append((time.time(), rss, fds, applied_commit()))
            stop.wait(5)

    def pusher():
        while not until(random.uniform(2, 6)):
            with lock:
                commit = repo.push()
            status = webhook(hook_port, commit)
            deliveries["ok" if status == 202 else "failed"] += 1

    def until(seconds):
        """Sleeps `seconds`, or until the end; whether the end came first."""
        time.sleep(max(0, min(seconds, end - time.time())))
        return time.time() >= end

    def git_faults():
        while not until(random.uniform(20, 90)):
            git.kill()
            faults["git kills"] += 1
            time.sleep(random.uniform(2, 15))
            git.start()

    def libvirt_faults():
        while not until(random.uniform(60, 180)):
            hard = random.random() < 1 / 3
            lv.stop(hard=hard)
            faults["libvirtd kills" if hard else "libvirtd stops"] += 1
            time.sleep(random.uniform(1, 5))
            lv.start()

    threads = [threading.Thread(target=f, daemon=True) for f in (pusher, git_faults, libvirt_faults)]
    sampler_thread = threading.Thread(target=sampler, daemon=True)
    sampler_thread.start()
    for t in threads:
        t.start()
    try:
        while time.time() < end:
            time.sleep(10)
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited with {daemon.returncode}; see {work}/daemon.log")
            if samples:
                t, rss, fds, _ = samples[-1]
                log(f"t={t - start:6.0f}s rss={rss / 1024:.1f} MiB fds={fds} pushes={len(repo.pushed)} "
                    f"converged={sum(1 for e in events if e[1] == 'converged')} failed={sum(1 for e in events if e[1] == 'failed')}")
        for t in threads:
            t.join()
        # Everything up again; the last push must be applied within 120 s.
        if git.proc is None:
            git.start()
        if lv.proc is None:
            lv.start()
        last = repo.pushed[-1][0]
        deadline = time.time() + 120
        while time.time() < deadline and applied_commit() != last:
            time.sleep(1)
        time.sleep(6)
    finally:
        stop.set()
        sampler_thread.join()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        git.kill()
        memory = {vm: lv.memory_mib(vm) for vm in repo.vms} if lv.proc else {}
        lv.stop()

    report = render(args, version, start, samples, events, repo, deliveries, faults, memory, last)
    print(report)
    Path(args.out).write_text(report)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"kept {work}")


def render(args, version, start, samples, events, repo, deliveries, faults, memory, last):
    lines = []
    p = lines.append
    p(f"# Soak run ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(start))})")
    p("")
    p(f"`bench/soak.py --minutes {args.minutes:g} --vms {args.vms}`, {version}, "
      f"{os.cpu_count()} CPUs, kernel {os.uname().release}.")
    p("")
    # Push to applied latency: the first sample whose applied commit is this push or a
    # later one.
    order = {c: i for i, (c, _) in enumerate(repo.pushed)}
    latencies, never = [], 0
    for i, (commit, t) in enumerate(repo.pushed):
        hit = next((s[0] for s in samples if s[0] >= t and order.get(s[3], -1) >= i), None)
        if hit is None:
            never += 1
        else:
            latencies.append(hit - t)
    applied = samples[-1][3] if samples else None
    want = repo.memory
    memory_ok = all(memory.get(vm) == want[vm] for vm in repo.vms)
    p("| | |")
    p("|---|---|")
    p(f"| duration | {(samples[-1][0] - start) / 60:.1f} min |")
    p(f"| pushes | {len(repo.pushed)} (webhook deliveries answered 202: {deliveries['ok']}, not: {deliveries['failed']}) |")
    p(f"| faults | {', '.join(f'{k}: {v}' for k, v in faults.items())} |")
    conv = sum(1 for e in events if e[1] == "converged")
    noop = sum(1 for e in events if e[1] == "no-op")
    fail = sum(1 for e in events if e[1] == "failed")
    p(f"| syncs | {conv} applied a change, {noop} had nothing to do, {fail} failed (git server or libvirtd down; retried) |")
    p(f"| pushes applied | {len(repo.pushed) - never} of {len(repo.pushed)}; last pushed {last[:12]}, last applied {str(applied)[:12]}; "
      f"libvirt's definitions match the last commit: {'yes' if memory_ok else 'NO ' + str(memory)} |")
    if latencies:
        q = sorted(latencies)
        p(f"| push to applied (5 s sampling) | median {statistics.median(q):.1f} s, p95 {q[int(0.95 * (len(q) - 1))]:.1f} s, max {q[-1]:.1f} s |")
    # After a one-minute warm-up (the first sync, the first webhook connection).
    warm = [s for s in samples if s[0] >= start + 60] or samples
    fifth = max(1, len(warm) // 5)
    head, tail = warm[:fifth], warm[-fifth:]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    p(f"| RSS, first fifth → last fifth (median) | {med([s[1] for s in head]) / 1024:.1f} MiB → {med([s[1] for s in tail]) / 1024:.1f} MiB (max after warm-up {max(s[1] for s in warm) / 1024:.1f} MiB) |")
    p(f"| open FDs, first fifth → last fifth (median) | {med([s[2] for s in head]):g} → {med([s[2] for s in tail]):g} (min {min(s[2] for s in warm)}, max {max(s[2] for s in warm)} after warm-up) |")
    p("")
    p("| minutes | RSS MiB (min–max) | FDs (min–max) | syncs applied | no-op | failed | pushes |")
    p("|---|---|---|---|---|---|---|")
    step = 300
    t0 = start
    while t0 < samples[-1][0]:
        t1 = t0 + step
        win = [s for s in samples if t0 <= s[0] < t1 and s[0] >= start + 60] or [s for s in samples if t0 <= s[0] < t1]
        if win:
            p(f"| {(t0 - start) / 60:.0f}–{(t1 - start) / 60:.0f} | "
              f"{min(s[1] for s in win) / 1024:.1f}–{max(s[1] for s in win) / 1024:.1f} | "
              f"{min(s[2] for s in win)}–{max(s[2] for s in win)} | "
              f"{sum(1 for e in events if t0 <= e[0] < t1 and e[1] == 'converged')} | "
              f"{sum(1 for e in events if t0 <= e[0] < t1 and e[1] == 'no-op')} | "
              f"{sum(1 for e in events if t0 <= e[0] < t1 and e[1] == 'failed')} | "
              f"{sum(1 for _, t in repo.pushed if t0 <= t < t1)} |")
        t0 = t1
    p("")
    verdict = never == 0 and applied == last and memory_ok
    p(f"Every push applied: {'yes' if verdict else 'NO'}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
