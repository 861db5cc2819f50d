#!/usr/bin/env python3
"""vmsync benchmark against a real libvirtd, rerunnable by anyone (as root).

For each N (default 100 500 1000) it generates a VM repository of N domains, then in
the same run measures:
  - baseline: a shell loop of `virsh define` + `virsh autostart` over the same XML files;
  - vmsync --once: first sync (all new), no-op sync (same commit, applied), one VM
    changed, and a new commit that changes nothing for this host (the last three: RUNS
    runs of each, interleaved, best and median; the one-VM and unrelated runs each on a
    new commit);
  - the floor of a no-op sync: one list call plus one inactive-XML read per domain, by a
    bare libvirt client (examples/floor.rs), as a whole process (start, connect, calls:
    what `vmsync --once` pays too) and inside a warm process; and one validated define
    by that client (what "plus one define" is measured against);
  - the CPU of starting a process linked with libvirt;
  - the same no-op sync with the repository served by `git daemon` on loopback
    (git:// protocol), and the objects each fetch received (the other syncs fetch from
    a local path, so that the server's process start does not blur vmsync's figures);
    once more through a counting TCP proxy: connections, round trips (a client request
    answered by the server) and bytes of a fetch with nothing new;
  - wall time, CPU time (user+sys) and peak RSS of each vmsync run, and the libvirt
    calls vmsync reports per sync;
  - one VM changed against the no-op run just before it, run by run (median of the
    differences and its 95% bootstrap interval): wall time, CPU cost, and the stage
    times vmsync logs on its `converged` line (fetch, validate, connect, observe,
    plan, apply), whose sum without observing shows what the change adds;
  - for the largest N: the daemon's idle CPU over 10 s, its peak RSS (VmHWM) and its
    RSS and PSS after the sync, then its peak RSS after three commits that each change
    one VM (applied on SIGHUP); the same daemon started on an empty state dir; and one
    started on an empty state dir with none of the domains defined (first deployment).
Prints a markdown report (also written to bench/results.md) with ratios to the
baseline and to the floor.

Usage: sudo bench/run.py [--binary VMSYNC] [--floor FLOOR] [--compare OLD_VMSYNC]
                         [--results FILE] [N ...]
(needs libvirtd at qemu:///system, see scripts/setup-host.sh). Without --binary it builds
target/release/vmsync (and examples/floor.rs unless --floor is given). --compare runs
another build's no-op syncs interleaved with this one's, each against the same floor
(for example the build of an older commit: `git worktree add /tmp/old COMMIT` and
`cargo build --release` there). The report goes to bench/results.md, or to --results
FILE (`-`: printed only). Test domains are named vmsyncbench-<N>-<i> and removed at the
end.

       sudo bench/run.py --resources NETWORKS POOLS N
measures only what networks and pools add to a no-op sync: N domains alone, then the
same N domains with NETWORKS networks and POOLS dir pools in the manifest (defined,
autostart off, so that nothing is started), each no-op sync run RESOURCE_RUNS times:
libvirt calls (vmsync's own counter) and wall time. Prints a markdown table; removes
its domains, networks and pools (named vmsyncbench-res-*) at the end.

       sudo bench/run.py --templates N
measures what templates cost, in one run: N domains as N plain XML files
(vmsyncbench-<N>-<i>), and N other domains of the same XML rendered from one template
(vmsyncbench-t<N>-<i>, `[[vm]] template` with `[vm.params]`), each in its own
repository and state directory. Interleaved, TEMPLATE_RUNS times: a no-op sync of
each, and a commit that changes one VM (plain: its XML file; templated: its params).
Prints the medians, the templated/plain ratio of the no-op and the one-VM change minus
the no-op of each (targets: no-op at most 1.2x, one VM at most the plain one + 5 ms).

       sudo bench/run.py --seeds N [--compare OLD_VMSYNC]
measures what cloud-init seeds cost, in one run: N domains without seeds
(vmsyncbench-<N>-<i>) and N other domains of the same XML, each with a `[vm.cloud_init]`
whose user-data is a template that reads a secret (vmsyncbench-c<N>-<i>), each in its
own repository and state directory, defined and not started. SEED_RUNS rounds, each a
no-op sync of each in a shuffled order (target: seeded at most 1.1x, as medians and as
the median of the per-round ratios with its bootstrap interval; no seed is written again,
checked by the images' mtimes); with --compare, OLD_VMSYNC's no-op of the seeded
repository too, on a state directory of its own, in the same rounds. Then the build of one seed (render, decrypt, ISO,
atomic write) by examples/seed_build.rs, SEED_BUILDS times (target: under 50 ms).
"""

import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
URI = "qemu:///system"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
VMSYNC = TARGET / "release/vmsync"
FLOOR = TARGET / "release/examples/floor"
# --compare: another vmsync build whose no-op syncs run interleaved with VMSYNC's.
OLD = None
# Runs of each repeated sync kind (no-op, one VM changed, unrelated commit), interleaved.
RUNS = 25


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


TEMPLATE_RUNS = 25
SEED_RUNS = int(os.environ.get("SEED_RUNS", "41"))
SEED_BUILDS = 200


def domain_xml(name, memory=128):
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <interface type='user'><model type='virtio'/></interface>
    <graphics type='vnc' listen='127.0.0.1'/>
  </devices>
</domain>
"""


def git(repo, *args):
    sh(["git", "-c", "user.name=bench", "-c", "user.email=bench@vmsync.invalid", "-c",
        "commit.gpgsign=false", *args], cwd=repo)


def make_repo(base, n):
    repo = base / f"repo-{n}"
    (repo / "vms").mkdir(parents=True)
    lines = ["version = 1\n"]
    for i in range(n):
        name = f"vmsyncbench-{n}-{i}"
        (repo / "vms" / f"{name}.xml").write_text(domain_xml(name))
        # autostart = false: vmsync would start autostart domains, and N running QEMUs
        # would measure QEMU, not vmsync. The baseline still sets the autostart flag.
        lines.append(f'[[vm]]\nname = "{name}"\nxml = "vms/{name}.xml"\n')
    (repo / "vmsync.toml").write_text("\n".join(lines))
    (repo / "README.md").write_text("bench repo\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "bench")
    return repo


def remove_domains(prefix):
    names = [l.strip() for l in sh(["virsh", "-c", URI, "list", "--all", "--name"]).splitlines()
             if l.strip().startswith(prefix)]
    for chunk in range(0, len(names), 200):
        cmds = "; ".join(f"undefine {n}" for n in names[chunk:chunk + 200])
        subprocess.run(["virsh", "-c", URI, cmds], capture_output=True, text=True)


def libvirtd_cpu():
    """CPU seconds libvirtd's threads have run (scheduler ns, finer than /proc ticks)."""
    pids = sh(["pgrep", "-x", "libvirtd"]).split()
    total = 0
    for pid in pids:
        for f in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            try:
                total += int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total / 1e9


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd, **kw):
    """Runs cmd under /usr/bin/time; returns (wall s, cpu s, max rss MiB, stderr, cost s):
    cost is the CPU of the command (microseconds, from rusage) plus libvirtd's meanwhile."""
    fmt = "BENCH %e %U %S %M"
    lv0, own0 = libvirtd_cpu(), children_cpu()
    started = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", fmt, *cmd], text=True, capture_output=True, **kw)
    elapsed = time.perf_counter() - started
    cost = (children_cpu() - own0) + (libvirtd_cpu() - lv0)
    m = re.search(r"BENCH ([\d.]+) ([\d.]+) ([\d.]+) (\d+)", p.stderr)
    if p.returncode != 0 or not m:
        raise SystemExit(f"{cmd[:3]} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}")
    # Wall time from a monotonic clock (time's %e has 10 ms steps); CPU and RSS from time.
    wall, user, sys_, rss = elapsed, float(m[2]), float(m[3]), int(m[4])
    return wall, user + sys_, rss / 1024, p.stderr, cost


def calls(stderr):
    m = re.findall(r"libvirt_calls=(\d+)", stderr)
    return int(m[-1]) if m else None


STAGES = ["fetch", "validate", "connect", "observe", "plan", "apply"]


def stages(stderr):
    """The stage times (ms) of the `converged` line: {"fetch": 0.5, ...}."""
    m = re.findall(r"stages_ms=(.*)$", stderr, re.M)
    return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", m[-1])} if m else {}


def paired(ones, noops, key):
    """Median of key(one run) - key(the no-op run just before it), with a 95% bootstrap
    interval of that median (fixed seed: the same runs give the same interval)."""
    diffs = [key(a) - key(b) for a, b in zip(ones, noops)]
    rng = random.Random(6)
    meds = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
    return statistics.median(diffs), meds[50], meds[1949]


def ratio(tops, bottoms, key):
    """Median of key(top) / key(bottom) over paired runs of one round, with a 95%
    bootstrap interval of that median (fixed seed)."""
    ratios = [key(a) / key(b) for a, b in zip(tops, bottoms)]
    rng = random.Random(6)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return statistics.median(ratios), meds[50], meds[1949]


def received(stderr):
    m = re.findall(r"received_objects=(\d+) received_bytes=(\d+)", stderr)
    return f"{m[-1][0]} obj / {m[-1][1]} B" if m else ""


def floor_process(prefix):
    """Best of 5 whole-process runs of the bare client (one list + N XML reads)."""
    return min(timed([str(FLOOR), URI, prefix, "1"])[0] for _ in range(5))


def vmsync_once(url, state, binary=None, config="/dev/null"):
    return timed([str(binary or VMSYNC), "--config", str(config), "--once", "--url", str(url), "--state-dir",
                  str(state), "--connect", URI, "--host", "bench"],
                 env={**os.environ, "NO_COLOR": "1"})


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of `port` that records, per connection, the
    bursts of bytes each way. A round trip is a client burst answered by a server burst."""

    def __init__(self, port):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.target))
            events, lock = [], threading.Lock()
            self.connections.append(events)
            for a, b, way in ((client, server, "c"), (server, client, "s")):
                threading.Thread(target=self._pump, args=(a, b, way, events, lock), daemon=True).start()

    @staticmethod
    def _pump(src, dst, way, events, lock):
        try:
            while data := src.recv(65536):
                with lock:
                    events.append((way, len(data)))
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side closed or reset: the fetch is over

    def report(self):
        """(connections, round trips, bytes client to server, bytes server to client)."""
        trips = sent = got = 0
        for events in self.connections:
            bursts = [way for i, (way, _) in enumerate(events) if i == 0 or events[i - 1][0] != way]
            trips += sum(1 for i, way in enumerate(bursts) if way == "s" and i > 0 and bursts[i - 1] == "c")
            sent += sum(n for way, n in events if way == "c")
            got += sum(n for way, n in events if way == "s")
        return len(self.connections), trips, sent, got


def fetch_round_trips(port, repo_name, state):
    """A no-op `vmsync --once` fetching through a CountingProxy."""
    proxy = CountingProxy(port)
    r = vmsync_once(f"git://127.0.0.1:{proxy.port}/{repo_name}", state)
    time.sleep(0.2)
    return (*proxy.report(), received(r[3]))


def daemon_idle(url, state, n, repo=None):
    """Starts the daemon, waits for its first sync, then measures 10 s of idle CPU, its peak
    RSS, RSS and PSS. With `repo`: then three commits that each change one VM, each
    applied on SIGHUP, and the peak RSS after them (a daemon that applies changes)."""
    cfg = state.parent / f"daemon-{n}-{state.name}.toml"
    cfg.write_text(f'[source]\nurl = "{url}"\n[libvirt]\nuri = "{URI}"\n[agent]\nstate_dir = "{state}"\n'
                   f'host = "bench"\nschedule = "0 0 0 1 1 *"\n')
    log = open(state.parent / f"daemon-{n}-{state.name}.log", "w")
    p = subprocess.Popen([str(VMSYNC), "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=log)
    started = time.time()
    try:
        deadline = started + 300
        rec = state / "state.json"
        # Wait for this daemon's first sync to be recorded.
        while time.time() < deadline:
            if rec.exists() and rec.stat().st_mtime > started and \
                    json.loads(rec.read_text()).get("last_result") == "converged":
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"daemon did not converge within 300 s; see {log.name}")
        time.sleep(1)
        def ticks():
            f = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(f[11]) + int(f[12])
        t0 = ticks()
        time.sleep(10)
        idle_ticks = ticks() - t0
        status = Path(f"/proc/{p.pid}/status").read_text()
        hwm = int(re.search(r"VmHWM:\s+(\d+)", status)[1]) / 1024
        rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024
        # PSS: shared library pages (libvirt's own libraries, used by libvirtd too) are
        # divided among the processes that map them.
        pss = int(re.search(r"Pss:\s+(\d+)", Path(f"/proc/{p.pid}/smaps_rollup").read_text())[1]) / 1024
        changed_hwm = None
        if repo is not None:
            for k in range(3):
                (repo / "vms" / f"vmsyncbench-{n}-{k}.xml").write_text(
                    domain_xml(f"vmsyncbench-{n}-{k}", memory=300 + k))
                git(repo, "commit", "-q", "-am", f"daemon: vm {k} changed")
                head = sh(["git", "rev-parse", "HEAD"], cwd=repo).strip()
                p.send_signal(signal.SIGHUP)
                while json.loads(rec.read_text()).get("last_applied_commit") != head:
                    if time.time() > deadline + 120:
                        raise SystemExit(f"daemon did not apply {head}; see {log.name}")
                    time.sleep(0.1)
            time.sleep(1)
            status = Path(f"/proc/{p.pid}/status").read_text()
            changed_hwm = int(re.search(r"VmHWM:\s+(\d+)", status)[1]) / 1024
        return idle_ticks, hwm, rss, pss, changed_hwm
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)


def start_cost(n=20):
    """CPU and wall of starting a process linked with libvirt (`vmsync --version`),
    averaged over n runs: what every `vmsync --once` pays before it does anything."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    for _ in range(n):
        subprocess.run([str(VMSYNC), "--version"], capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n
    return cpu * 1000, (time.perf_counter() - started) / n * 1000


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read())[1]) // 1024 // 1024
    libvirt = sh(["virsh", "-c", URI, "version"]).strip().splitlines()
    kvm = "yes" if os.path.exists("/dev/kvm") else "no"
    return (f"{os.cpu_count()} x {cpu}, {mem} GiB RAM, {platform.system()} {platform.release()}, "
            f"/dev/kvm: {kvm}; " + "; ".join(l.strip() for l in libvirt if l.strip()))


RESOURCE_RUNS = 7


def remove_resources(prefix):
    """Undefines the networks and pools named PREFIX* (their storage is left; removed
    by the caller)."""
    for kind, lister, undefine in [("net", "net-list", "net-undefine"), ("pool", "pool-list", "pool-undefine")]:
        names = [l.strip() for l in sh(["virsh", "-c", URI, lister, "--all", "--name"]).splitlines()
                 if l.strip().startswith(prefix)]
        if names:
            subprocess.run(["virsh", "-c", URI, "; ".join(f"{undefine} {n}" for n in names)],
                           capture_output=True, text=True)


def resources_bench(nets, pools, n):
    """A no-op sync of N domains without and with NETS networks and POOLS pools."""
    sh(["cargo", "build", "--release", "--bin", "vmsync"], cwd=ROOT)
    base = Path(tempfile.mkdtemp(prefix="vmsync-bench-res-"))
    prefix, res = f"vmsyncbench-{n}-", "vmsyncbench-res-"
    remove_domains(prefix)
    remove_resources(res)
    try:
        repo = make_repo(base, n)
        state = base / "state"
        vmsync_once(repo, state)
        without = [vmsync_once(repo, state) for _ in range(RESOURCE_RUNS)]
        lines = [(repo / "vmsync.toml").read_text()]
        for i in range(nets):
            name = f"{res}net-{i}"
            lines.append(f'[[network]]\nname = "{name}"\nxml_inline = "<network><name>{name}</name>'
                         f"<bridge name='vsbr{i}'/></network>\"\n")
        for i in range(pools):
            name = f"{res}pool-{i}"
            lines.append(f'[[pool]]\nname = "{name}"\nxml_inline = "<pool type=\'dir\'><name>{name}</name>'
                         f'<target><path>/var/lib/libvirt/images/{name}</path></target></pool>"\n')
        (repo / "vmsync.toml").write_text("\n".join(lines))
        git(repo, "commit", "-q", "-am", "networks and pools")
        vmsync_once(repo, state)
        with_res = [vmsync_once(repo, state) for _ in range(RESOURCE_RUNS)]
        med = statistics.median
        rows = [
            ("without", [calls(r[3]) for r in without], med(r[0] for r in without),
             med(stages(r[3]).get("observe", 0) for r in without)),
            (f"with {nets} networks and {pools} pools", [calls(r[3]) for r in with_res],
             med(r[0] for r in with_res), med(stages(r[3]).get("observe", 0) for r in with_res)),
        ]
        out = [f"No-op sync of {n} domains, {RESOURCE_RUNS} runs each ({machine()}):", "",
               "| manifest | libvirt calls per sync | wall (median) | observe stage (median) |",
               "|---|---|---|---|"]
        for label, c, wall, observe in rows:
            out.append(f"| {label} | {sorted(set(c))} | {wall * 1000:.1f} ms | {observe:.1f} ms |")
        extra = rows[1][1][0] - rows[0][1][0]
        out.append("")
        out.append(f"Networks and pools add {extra} libvirt calls per no-op sync "
                   f"(target: one list call per kind plus one XML read each = {2 + nets + pools}).")
        print("\n".join(out))
    finally:
        remove_domains(prefix)
        remove_resources(res)
        # The pools' directories, made when vmsync built them (empty: no volumes).
        for d in Path("/var/lib/libvirt/images").glob(f"{res}pool-*"):
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def make_template_repo(base, n, prefix, memory=None):
    """The repository of N templated VMs named PREFIX<i>: one template that renders
    exactly domain_xml(name, memory), [params] memory_mib = 128, and `memory` (a dict
    i -> MiB) as [vm.params] of those VMs."""
    repo = base / f"repo-templates-{n}"
    (repo / "templates").mkdir(parents=True, exist_ok=True)
    template = domain_xml("{{ vm.name }}").replace(
        "<memory unit='MiB'>128</memory>", "<memory unit='MiB'>{{ params.memory_mib }}</memory>")
    (repo / "templates" / "bench.xml").write_text(template)
    lines = ["version = 1\n", "[params]\nmemory_mib = 128\n"]
    for i in range(n):
        lines.append(f'[[vm]]\nname = "{prefix}{i}"\ntemplate = "templates/bench.xml"\n')
        if memory and i in memory:
            lines.append(f"  [vm.params]\n  memory_mib = {memory[i]}\n")
    (repo / "vmsync.toml").write_text("\n".join(lines))
    if not (repo / ".git").exists():
        (repo / "README.md").write_text("bench repo\n")
        git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "bench templates")
    return repo


def templates_bench(n):
    """A no-op and a one-VM change of N plain VMs against the same of N templated VMs."""
    sh(["cargo", "build", "--release", "--bin", "vmsync"], cwd=ROOT)
    base = Path(tempfile.mkdtemp(prefix="vmsync-bench-tmpl-"))
    plain_prefix, tmpl_prefix = f"vmsyncbench-{n}-", f"vmsyncbench-t{n}-"
    remove_domains(plain_prefix)
    remove_domains(tmpl_prefix)
    try:
        plain = make_repo(base, n)
        tmpl = make_template_repo(base, n, tmpl_prefix)
        # The template renders the plain files' XML byte for byte (names aside).
        out = sh([str(VMSYNC), "render", str(tmpl), f"{tmpl_prefix}0"])
        assert out == domain_xml(f"{tmpl_prefix}0"), out
        p_state, t_state = base / "state-plain", base / "state-templates"
        vmsync_once(plain, p_state)
        vmsync_once(tmpl, t_state)
        runs = {"plain no-op": [], "plain one VM": [], "templated no-op": [], "templated one VM": []}
        memory = {}
        for k in range(TEMPLATE_RUNS):
            runs["plain no-op"].append(vmsync_once(plain, p_state))
            runs["templated no-op"].append(vmsync_once(tmpl, t_state))
            (plain / "vms" / f"{plain_prefix}{k}.xml").write_text(domain_xml(f"{plain_prefix}{k}", memory=256 + k))
            git(plain, "commit", "-q", "-am", f"vm {k} changed")
            runs["plain one VM"].append(vmsync_once(plain, p_state))
            memory[k] = 256 + k
            make_template_repo(base, n, tmpl_prefix, memory)
            runs["templated one VM"].append(vmsync_once(tmpl, t_state))
        for label, rs in runs.items():
            # Each run did what it stands for: nothing, or one redefine.
            want = "changes=1 " if "one VM" in label else "nothing to do"
            assert all(want in r[3] for r in rs), f"{label}: not every run shows {want!r}"
        med = statistics.median
        wall = {k: med(r[0] for r in v) * 1000 for k, v in runs.items()}
        cost = {k: med(r[4] for r in v) * 1000 for k, v in runs.items()}
        stage = lambda rs, s: med(stages(r[3]).get(s, 0.0) for r in rs)
        out = [f"Templates, N = {n}, {TEMPLATE_RUNS} interleaved runs of each ({machine()}):", "",
               "| run | wall (median) | CPU cost (median) | validate stage (median) | peak RSS MiB (median) |",
               "|---|---:|---:|---:|---:|"]
        for label, rs in runs.items():
            out.append(f"| {label} | {wall[label]:.1f} ms | {cost[label]:.1f} ms | "
                       f"{stage(rs, 'validate'):.1f} ms | {med(r[2] for r in rs):.1f} |")
        one = lambda kind, key: paired(runs[f"{kind} one VM"], runs[f"{kind} no-op"], key)
        ci = lambda t: f"{t[0]:+.1f} ms (95% interval {t[1]:+.1f} to {t[2]:+.1f})"
        besides_observe = lambda r: sum(stages(r[3]).get(k, 0.0) for k in STAGES if k != "observe")
        out += ["",
                f"- No-op: templated / plain = {wall['templated no-op'] / wall['plain no-op']:.3f} (wall), "
                f"{cost['templated no-op'] / cost['plain no-op']:.3f} (CPU cost), "
                f"{stage(runs['templated no-op'], 'validate') / stage(runs['plain no-op'], 'validate'):.3f} "
                "(validate stage); target at most 1.2."]
        for what, key in [("wall", lambda r: r[0] * 1000), ("CPU cost", lambda r: r[4] * 1000),
                          ("stages other than observing", besides_observe),
                          ("validate stage", lambda r: stages(r[3]).get("validate", 0.0))]:
            p_one, t_one = one("plain", key), one("templated", key)
            out.append(f"- One VM changed minus the no-op just before it, {what}: plain {ci(p_one)}, "
                       f"templated {ci(t_one)}; templated minus plain {t_one[0] - p_one[0]:+.1f} ms "
                       "(target: at most +5 ms).")
        out.append("- The same by stage (median of the differences, ms): " + "; ".join(
            f"{kind}: " + ", ".join(
                f"{k} {one(kind, lambda r, k=k: stages(r[3]).get(k, 0.0))[0]:+.1f}" for k in STAGES)
            for kind in ("plain", "templated")) + ".")
        print("\n".join(out))
    finally:
        remove_domains(plain_prefix)
        remove_domains(tmpl_prefix)
        shutil.rmtree(base, ignore_errors=True)


def make_seeded_repo(base, n, prefix, tool, pubkey):
    """N VMs named PREFIX<i>, each with a seed whose user-data template reads a secret."""
    repo = base / f"repo-seeds-{n}"
    for d in ("vms", "cloud-init", "secrets"):
        (repo / d).mkdir(parents=True)
    (repo / "cloud-init" / "user.yaml.j2").write_text(
        "#cloud-config\nhostname: {{ vm.name }}\nusers:\n  - name: ops\n"
        "    ssh_authorized_keys: [ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBench ops]\n"
        "chpasswd:\n  list: |\n    ops:{{ secret(\"secrets/ops.age\") }}\n")
    secret = subprocess.run([str(tool), "encrypt", str(pubkey)], input=b"bench-password\n",
                            check=True, capture_output=True).stdout
    (repo / "secrets" / "ops.age").write_bytes(secret)
    lines = ["version = 1\n"]
    for i in range(n):
        name = f"{prefix}{i}"
        (repo / "vms" / f"{name}.xml").write_text(domain_xml(name))
        lines.append(f'[[vm]]\nname = "{name}"\nxml = "vms/{name}.xml"\n'
                     '  [vm.cloud_init]\n  user_data = "cloud-init/user.yaml.j2"\n')
    (repo / "vmsync.toml").write_text("\n".join(lines))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "bench seeds")
    return repo


def seeds_bench(n):
    """A no-op sync of N VMs against the same of N VMs with seeds; one seed's build."""
    sh(["cargo", "build", "--release", "--bin", "vmsync", "--example", "seed_build"], cwd=ROOT)
    tool = TARGET / "release/examples/seed_build"
    base = Path(tempfile.mkdtemp(prefix="vmsync-bench-seeds-"))
    plain_prefix, seeded_prefix = f"vmsyncbench-{n}-", f"vmsyncbench-c{n}-"
    remove_domains(plain_prefix)
    remove_domains(seeded_prefix)
    try:
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "host_key")])
        plain = make_repo(base, n)
        seeded = make_seeded_repo(base, n, seeded_prefix, tool, base / "host_key.pub")
        seed_dir = base / "seeds"
        config = base / "agent.toml"
        config.write_text(f'[policy]\nseed_dir = "{seed_dir}"\n[secrets]\nidentity = "{base / "host_key"}"\n')
        p_state, s_state = base / "state-plain", base / "state-seeds"
        vmsync_once(plain, p_state)
        vmsync_once(seeded, s_state, config=config)
        images = sorted(seed_dir.glob("*.iso"))
        assert len(images) == n, f"{len(images)} seeds for {n} VMs"
        mtimes = {p: p.stat().st_mtime_ns for p in images}
        runs = {"no-op without seeds": [], "no-op with seeds": []}
        if OLD:
            o_state = base / "state-seeds-old"
            vmsync_once(seeded, o_state, binary=OLD, config=config)
            runs["no-op with seeds, OLD"] = []
        order = random.Random(24)
        syncs = {"no-op without seeds": lambda: vmsync_once(plain, p_state),
                 "no-op with seeds": lambda: vmsync_once(seeded, s_state, config=config)}
        if OLD:
            syncs["no-op with seeds, OLD"] = lambda: vmsync_once(seeded, o_state, binary=OLD, config=config)
        for _ in range(SEED_RUNS):
            # Each round in its own order: no run always follows the same other run.
            labels = list(syncs)
            order.shuffle(labels)
            for label in labels:
                runs[label].append(syncs[label]())
        for label, rs in runs.items():
            assert all("nothing to do" in r[3] for r in rs), f"{label}: not every run shows nothing to do"
        assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items()), "a no-op sync wrote a seed"
        med = statistics.median
        wall = {k: med(r[0] for r in v) * 1000 for k, v in runs.items()}
        cost = {k: med(r[4] for r in v) * 1000 for k, v in runs.items()}
        stage = lambda rs, s: med(stages(r[3]).get(s, 0.0) for r in rs)
        build = sh([str(tool), "time", str(seeded), "cloud-init/user.yaml.j2", str(base / "host_key"),
                    str(base / "seed-build"), str(SEED_BUILDS)]).split()
        out = [f"Seeds, N = {n}, {SEED_RUNS} rounds, each a no-op of each kind in a shuffled order ({machine()}):", "",
               "| run | wall (median) | CPU cost (median) | validate stage (median) | observe stage (median) | peak RSS MiB (median) |",
               "|---|---:|---:|---:|---:|---:|"]
        for label, rs in runs.items():
            out.append(f"| {label} | {wall[label]:.1f} ms | {cost[label]:.1f} ms | "
                       f"{stage(rs, 'validate'):.1f} ms | {stage(rs, 'observe'):.1f} ms | "
                       f"{med(r[2] for r in rs):.1f} |")
        w, c = runs["no-op with seeds"], runs["no-op without seeds"]
        rw, rc = ratio(w, c, lambda r: r[0]), ratio(w, c, lambda r: r[4])
        out += ["",
                f"- Per round, with seeds / without (median and 95% bootstrap interval): "
                f"wall {rw[0]:.3f} [{rw[1]:.3f}, {rw[2]:.3f}], CPU cost {rc[0]:.3f} [{rc[1]:.3f}, {rc[2]:.3f}]; "
                "target at most 1.1.",
                f"- No-op: with seeds / without = {wall['no-op with seeds'] / wall['no-op without seeds']:.3f} (wall), "
                f"{cost['no-op with seeds'] / cost['no-op without seeds']:.3f} (CPU cost); target at most 1.1. "
                f"Validate stage {stage(w, 'validate'):.1f} vs {stage(c, 'validate'):.1f} ms. "
                "No seed image was written again (mtimes unchanged)."]
        if OLD:
            old = "no-op with seeds, OLD"
            out.append(f"- OLD ({OLD}): with seeds / without = {wall[old] / wall['no-op without seeds']:.3f} (wall), "
                       f"{cost[old] / cost['no-op without seeds']:.3f} (CPU cost); validate stage "
                       f"{stage(runs[old], 'validate'):.1f} ms. This build / OLD, seeded no-op, median of the "
                       f"per-round ratios: {med(a[0] / b[0] for a, b in zip(w, runs[old])):.3f} (wall), "
                       f"{med(a[4] / b[4] for a, b in zip(w, runs[old])):.3f} (CPU cost), "
                       f"{med(stages(a[3]).get('validate', 0.0) / stages(b[3]).get('validate', 1.0) for a, b in zip(w, runs[old])):.3f} (validate stage).")
        out += [
                f"- One seed built (template rendered, secret decrypted with an SSH ed25519 key, ISO, "
                f"atomic write with fsync): median {float(build[0]):.2f} ms, best {float(build[1]):.2f} ms "
                f"over {SEED_BUILDS} builds; image {int(build[2])} bytes; target under 50 ms."]
        print("\n".join(out))
    finally:
        remove_domains(plain_prefix)
        remove_domains(seeded_prefix)
        shutil.rmtree(base, ignore_errors=True)


def main():
    global VMSYNC, FLOOR, OLD
    if sys.argv[1:2] == ["--seeds"]:
        if sys.argv[3:4] == ["--compare"]:
            OLD = Path(sys.argv[4]).resolve()
        return seeds_bench(int(sys.argv[2]))
    if sys.argv[1:2] == ["--templates"]:
        return templates_bench(int(sys.argv[2]))
    if sys.argv[1:2] == ["--resources"]:
        nets, pools, n = (int(a) for a in sys.argv[2:5])
        return resources_bench(nets, pools, n)
    args, ns, results = sys.argv[1:], [], ROOT / "bench" / "results.md"
    while args:
        a = args.pop(0)
        if a in ("--binary", "--floor", "--compare", "--results") and args:
            v = args.pop(0)
            if a == "--results":
                results = None if v == "-" else Path(v)
            else:
                path = Path(v).resolve()
                if not os.access(path, os.X_OK):
                    raise SystemExit(f"{a} {v}: not an executable file")
                VMSYNC, FLOOR, OLD = (path if a == k else cur for k, cur in
                                      (("--binary", VMSYNC), ("--floor", FLOOR), ("--compare", OLD)))
        elif a.isdigit() and int(a) >= 3:
            ns.append(int(a))
        else:
            raise SystemExit(f"usage: bench/run.py [--binary VMSYNC] [--floor FLOOR] [--compare OLD_VMSYNC] "
                             f"[--results FILE|-] [N ...] (N >= 3); got {a!r}")
    ns = ns or [100, 500, 1000]
    build = [] if "--binary" in sys.argv else ["--bin", "vmsync"]
    build += [] if "--floor" in sys.argv else ["--example", "floor"]
    if build:
        sh(["cargo", "build", "--release", *build], cwd=ROOT)
    rows, extra = [], []
    load_start = " ".join(open("/proc/loadavg").read().split()[:3])
    base = Path(tempfile.mkdtemp(prefix="vmsync-bench-"))
    port = 19418
    daemon = subprocess.Popen(["git", "daemon", "--export-all", "--reuseaddr", "--listen=127.0.0.1",
                               f"--port={port}", f"--base-path={base}", str(base)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for n in ns:
            prefix = f"vmsyncbench-{n}-"
            remove_domains(prefix)
            repo = make_repo(base, n)
            url = f"git://127.0.0.1:{port}/{repo.name}"
            xml_dir = repo / "vms"
            loop = (f'for f in {xml_dir}/*.xml; do n=$(basename "$f" .xml); '
                    f'virsh -c {URI} define "$f" >/dev/null && virsh -c {URI} autostart "$n" >/dev/null || exit 1; done')
            b_wall, b_cpu, _, _, _ = timed(["bash", "-c", loop])
            remove_domains(prefix)

            state = base / f"state-{n}"
            first = vmsync_once(repo, state)
            noop_git = min((vmsync_once(url, state) for _ in range(5)), key=lambda r: r[0])
            trips = fetch_round_trips(port, repo.name, state)
            floor_ms = float(sh([str(FLOOR), URI, prefix, "5"]).split()[0])
            floor_wall = floor_process(prefix)
            # One validated define by a bare client, of a scratch domain vmsync never sees.
            scratch = base / f"define-{n}.xml"
            scratch.write_text(domain_xml(f"{prefix}floor-define").replace(
                "</name>", "</name>\n  <uuid>6f1c2a3b-0000-4000-8000-00000000beef</uuid>"))
            # As many defines as syncs of each kind, best and median (compared like for like).
            lv0, own0 = libvirtd_cpu(), children_cpu()
            define_line = sh([str(FLOOR), URI, "-", str(RUNS), str(scratch)]).splitlines()[1]
            # CPU per define, the client's (with its start and connection spread over the
            # defines) plus libvirtd's.
            define_cost_ms = ((children_cpu() - own0) + (libvirtd_cpu() - lv0)) / RUNS * 1000
            define_ms = float(define_line.split()[0])
            define_med_ms = float(re.search(r"median ([\d.]+) ms", define_line)[1])

            # Interleaved, RUNS of each: the no-op (same commit, applied), a new commit that
            # changes one VM's memory, a new commit that changes nothing for this host.
            noops, ones, unrelateds = [], [], []
            for k in range(RUNS):
                noops.append(vmsync_once(repo, state))
                vm = f"{prefix}{k % n}"  # N may be below RUNS: a VM changes again, to a new size
                (xml_dir / f"{vm}.xml").write_text(domain_xml(vm, memory=256 + k))
                git(repo, "commit", "-q", "-am", f"vm {k} changed")
                ones.append(vmsync_once(repo, state))
                with open(repo / "README.md", "a") as f:
                    f.write(f"unrelated change {k}\n")
                git(repo, "commit", "-q", "-am", "nothing for this host")
                unrelateds.append(vmsync_once(repo, state))
            extra.append((n, "trips", trips))
            if OLD:
                # The other build on a state dir of its own (the domains are applied: its
                # first sync changes nothing), then no-op syncs of both, interleaved.
                old_state = base / f"state-old-{n}"
                vmsync_once(repo, old_state, OLD)
                # Each pair with a floor process run beside it: the ratios to the floor of
                # runs made within the same second, less at the mercy of a loaded machine.
                pairs, floors = [], []
                for _ in range(RUNS):
                    pairs.append((vmsync_once(repo, state), vmsync_once(repo, old_state, OLD)))
                    floors.append(timed([str(FLOOR), URI, prefix, "1"])[0])
                compared = []
                for label, runs in [("no-op sync, interleaved with the --compare build", [p[0] for p in pairs]),
                                    (f"no-op sync, --compare build ({OLD})", [p[1] for p in pairs])]:
                    wall, cpu, rss, err = min(runs, key=lambda r: r[0])[:4]
                    med = statistics.median(r[0] for r in runs)
                    compared.append((n, label, wall, med, cpu, rss, calls(err), b_wall / wall, wall / floor_wall,
                                     received(err)))
                extra.append((n, "compare", [(a[0], b[0], a[1], b[1], f) for (a, b), f in zip(pairs, floors)]))
            if n == max(ns):
                # A daemon (re)started on a host where this commit is applied: its state
                # dir is the --once runs' (schema cache warm) ...
                extra.append((n, "applied, state dir of the runs above (warm cache)", daemon_idle(url, state, n, repo)))
                # ... and one with an empty state dir, which validates every file again.
                extra.append((n, "applied, empty state dir (validates all files)", daemon_idle(url, base / f"daemon-state-{n}", n)))
                # ... and a first deployment: empty state dir, none of the domains defined.
                remove_domains(prefix)
                extra.append((n, "none defined, empty state dir (first deployment: defines all)",
                              daemon_idle(url, base / f"daemon-first-{n}", n)))
            remove_domains(prefix)

            for label, runs in [("first sync", [first]), ("no-op sync", noops),
                                ("no-op sync, fetch over git:// (git daemon)", [noop_git]),
                                ("one VM changed", ones), ("unrelated commit", unrelateds)]:
                wall, cpu, rss, err = min(runs, key=lambda r: r[0])[:4]
                med = statistics.median(r[0] for r in runs)
                rows.append((n, label, wall, med if len(runs) > 1 else None, cpu, rss, calls(err), b_wall / wall,
                             wall / floor_wall if label == "no-op sync" else None, received(err)))
            rows.extend(compared if OLD else [])
            best = lambda runs: min(r[0] for r in runs)
            med = lambda runs: statistics.median(r[0] for r in runs)
            cost = lambda runs: statistics.median(r[4] for r in runs)
            extra.append((n, "one", (best(ones) - best(noops), med(ones) - med(noops), define_ms, define_med_ms,
                                     best(ones) - best(unrelateds), med(ones) - med(unrelateds))))
            extra.append((n, "cost", (cost(noops), cost(ones), cost(unrelateds), define_cost_ms)))
            # The same, run by run (each one-VM run against the no-op just before it), and
            # inside the process: the stages of the `converged` line. Observing is the
            # same work in both and the noisiest stage; the rest is what the change adds.
            stage = lambda r, k: stages(r[3]).get(k, 0.0)
            besides_observe = lambda r: sum(stage(r, k) for k in STAGES if k != "observe")
            extra.append((n, "paired", (
                paired(ones, noops, lambda r: r[0] * 1000),
                paired(ones, noops, lambda r: r[4] * 1000),
                paired(ones, noops, besides_observe),
                {k: paired(ones, noops, lambda r, k=k: stage(r, k))[0] for k in STAGES},
                {label: {k: statistics.median(stage(r, k) for r in runs) for k in STAGES}
                 for label, runs in [("no-op", noops), ("one VM changed", ones),
                                     ("unrelated commit", unrelateds)]},
                define_med_ms)))
            rows.append((n, "baseline: virsh define + autostart loop", b_wall, None, b_cpu, None, 2 * n, 1.0, None,
                         ""))
            rows.append((n, "floor process: connect, 1 list + N XML reads", floor_wall, None, None, None, 1 + n,
                         None, 1.0, ""))
            rows.append((n, "floor in a warm process (no start, no connect)", floor_ms / 1000, None, None, None,
                         1 + n, None, None, ""))
            rows.append((n, "one validated define, bare client in a warm process", define_ms / 1000,
                         define_med_ms / 1000, None, None, 1, None, None, ""))
    finally:
        daemon.terminate()
        shutil.rmtree(base, ignore_errors=True)

    load = " ".join(open("/proc/loadavg").read().split()[:3])
    out = [f"Machine: {machine()}", f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
           f"load average {load_start} at the start, {load} at the end", f"vmsync: {VMSYNC}" + (f"; --compare: {OLD}" if OLD else ""), "",
           f"| N | run | wall s (best of {RUNS} where a median is given) | median s | CPU s | peak RSS MiB | "
           "libvirt calls | baseline / run | run / floor | fetched |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n, label, wall, med, cpu, rss, c, ratio, vs_floor, fetched in rows:
        f = lambda v, fmt: "" if v is None else fmt.format(v)
        out.append(f"| {n} | {label} | {wall:.3f} | {f(med, '{:.3f}')} | {f(cpu, '{:.2f}')} | "
                   f"{f(rss, '{:.1f}')} | {f(c, '{}')} | {f(ratio, '{:.1f}x')} | {f(vs_floor, '{:.2f}x')} | "
                   f"{fetched} |")
    out.append("")
    for n, how, figures in extra:
        if how == "one":
            d_best, d_med, define_ms, define_med_ms, u_best, u_med = figures
            out.append(f"- N = {n}, one VM changed minus no-op: {d_best * 1000:.1f} ms (best against best), "
                       f"{d_med * 1000:.1f} ms (median against median); minus the unrelated commit (which "
                       f"fetches a new commit too): {u_best * 1000:.1f} ms, {u_med * 1000:.1f} ms; one "
                       f"validated define by a bare client: {define_ms:.1f} ms best, {define_med_ms:.1f} ms median "
                       f"(of {RUNS}).")
            continue
        if how == "cost":
            c_noop, c_one, c_unrel, define_cost_ms = figures
            out.append(f"- N = {n}, CPU cost (vmsync's and libvirtd's CPU, median): no-op {c_noop * 1000:.1f} ms, "
                       f"one VM changed {c_one * 1000:.1f} ms, unrelated commit {c_unrel * 1000:.1f} ms; one VM "
                       f"changed minus no-op {(c_one - c_noop) * 1000:.1f} ms, minus the unrelated commit "
                       f"{(c_one - c_unrel) * 1000:.1f} ms; one validated define by the bare client: "
                       f"{define_cost_ms:.1f} ms (libvirtd's CPU plus the client's, over {RUNS} defines).")
            continue
        if how == "paired":
            wall, cost_, inner, by_stage, medians, define_med_ms = figures
            ci = lambda t: f"{t[0]:+.1f} ms (95% interval {t[1]:+.1f} to {t[2]:+.1f})"
            out.append(f"- N = {n}, one VM changed minus the no-op run just before it (median of the {RUNS} "
                       f"differences): wall {ci(wall)}; CPU cost {ci(cost_)}; inside the process, the stages "
                       f"other than observing {ci(inner)}: "
                       + ", ".join(f"{k} {v:+.1f}" for k, v in by_stage.items())
                       + f" ms. One validated define by the bare client: {define_med_ms:.1f} ms median.")
            out.append(f"- N = {n}, stage medians (ms) from the `converged` line: "
                       + "; ".join(f"{label}: " + ", ".join(f"{k} {v:.1f}" for k, v in st.items())
                                   for label, st in medians.items()) + ".")
            continue
        if how == "compare":
            med = lambda xs: statistics.median(xs)
            walls = [a / b for a, b, _, _, _ in figures]
            cpus = [a / b for _, _, a, b, _ in figures if b > 0]
            out.append(f"- N = {n}, no-op sync of this build against the --compare build, run by run "
                       f"({len(figures)} interleaved pairs, each with a floor process run beside it): wall "
                       f"{med(walls):.2f}x (median of the ratios), CPU {med(cpus):.2f}x; no-op / floor process "
                       f"{med([a / f for a, _, _, _, f in figures]):.2f}x this build, "
                       f"{med([b / f for _, b, _, _, f in figures]):.2f}x the --compare build (medians of the "
                       f"ratios; the floor runs: best {min(f for *_, f in figures):.3f} s, median "
                       f"{med([f for *_, f in figures]):.3f} s).")
            continue
        if how == "trips":
            conns, trips, sent, got, fetched = figures
            out.append(f"- N = {n}, no-op fetch over git:// through a counting proxy: {conns} connection(s), "
                       f"{trips} round trip(s), {sent} B sent, {got} B received; fetched {fetched}.")
            continue
        ticks, hwm, rss, pss, changed_hwm = figures
        out.append(f"- Daemon, {n} domains, {how}: {ticks} CPU ticks (1/100 s) in 10 s idle; "
                   f"peak RSS {hwm:.1f} MiB ({hwm * 1.048576:.1f} MB); after the sync RSS {rss:.1f} MiB, "
                   f"PSS {pss:.1f} MiB." + ("" if changed_hwm is None else
                   f" Then 3 commits that each change one VM, applied on SIGHUP: peak RSS "
                   f"{changed_hwm:.1f} MiB ({changed_hwm * 1.048576:.1f} MB)."))
    start_cpu, start_wall = start_cost()
    out.append(f"- Starting a process linked with libvirt (`vmsync --version`): {start_cpu:.1f} ms CPU, "
               f"{start_wall:.1f} ms wall (mean of 20 runs).")
    report = "\n".join(out)
    print(report)
    # Text after the marker is written by people (what each piece of machinery cost),
    # and kept across runs.
    if results is None:
        return
    marker = "<!-- below: kept by bench/run.py -->"
    kept = results.read_text().partition(marker)[2] if results.exists() else ""
    results.write_text(report + "\n" + (f"\n{marker}{kept}" if kept else ""))


if __name__ == "__main__":
    main()
