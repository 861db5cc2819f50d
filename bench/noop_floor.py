#!/usr/bin/env python3
"""A no-op sync against the floor at N VMs, robust on a loaded machine (as root).

    sudo bench/noop_floor.py N ROUNDS NEW_VMSYNC OLD_VMSYNC FLOOR [time|ir|trace|all]

Defines N domains (vmsynchttps-<N>-<i>, removed at the end) through a first sync of each
build, then:
  time: ROUNDS rounds, each a no-op of NEW, a no-op of OLD (each on its own state
        directory) and a floor process (examples/floor.rs: connect, one list call, one
        inactive-XML read per domain), in an order shuffled per round; prints medians,
        the median of the per-round ratios and the ratio of the medians;
  ir:   the instructions each process executes (valgrind --tool=callgrind; libvirtd's
        work is not counted), with `callgrind_annotate` tops and `strace -c -f` of each
        left in the printed directory;
  trace: the fsyncs, renames and threads of one no-op of NEW (strace).
Needs valgrind and strace for ir and trace (Debian packages of the same names)."""
import os, random, re, shutil, statistics, subprocess, sys, tempfile
from pathlib import Path

if len(sys.argv) < 6:
    raise SystemExit(__doc__)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R

n, rounds = int(sys.argv[1]), int(sys.argv[2])
NEW, OLD, FLOOR = (Path(p) for p in sys.argv[3:6])
mode = sys.argv[6] if len(sys.argv) > 6 else "all"
prefix = f"vmsynchttps-{n}-"
base = Path(tempfile.mkdtemp(prefix="vmsync-noop-floor-"))
repo = base / "repo"
(repo / "vms").mkdir(parents=True)
lines = ["version = 1\n"]
for i in range(n):
    name = f"{prefix}{i}"
    (repo / "vms" / f"{name}.xml").write_text(R.domain_xml(name))
    lines.append(f'[[vm]]\nname = "{name}"\nxml = "vms/{name}.xml"\n')
(repo / "vmsync.toml").write_text("\n".join(lines))
R.git(repo, "init", "-q", "-b", "main"); R.git(repo, "add", "-A"); R.git(repo, "commit", "-q", "-m", "p")
R.remove_domains(prefix)
try:
    cmd = lambda b, s: [str(b), "--config", "/dev/null", "--once", "--url", str(repo), "--state-dir", str(s),
                        "--connect", R.URI, "--host", "bench"]
    floor = [str(FLOOR), R.URI, prefix, "1"]
    env = {**os.environ, "NO_COLOR": "1"}
    for b, s in ((NEW, base / "s-new"), (OLD, base / "s-old")):
        subprocess.run(cmd(b, s), env=env, capture_output=True, check=True)
        subprocess.run(cmd(b, s), env=env, capture_output=True, check=True)
    if mode in ("all", "time"):
        res = {"new": [], "old": [], "floor": []}
        rng = random.Random(1)
        for _ in range(rounds):
            kinds = ["new", "old", "floor"]; rng.shuffle(kinds)
            for k in kinds:
                c = floor if k == "floor" else cmd(NEW if k == "new" else OLD, base / f"s-{k}")
                res[k].append(R.timed(c, env=env)[0])
        med = statistics.median
        print(f"N={n} rounds={rounds} load={open('/proc/loadavg').read().split()[:3]}")
        print(f"  medians ms: new {med(res['new'])*1000:.1f} old {med(res['old'])*1000:.1f} floor {med(res['floor'])*1000:.1f}")
        print(f"  best ms: new {min(res['new'])*1000:.1f} old {min(res['old'])*1000:.1f} floor {min(res['floor'])*1000:.1f}")
        print(f"  median of per-round ratios: new/floor {med([a/f for a,f in zip(res['new'],res['floor'])]):.2f}x "
              f"old/floor {med([a/f for a,f in zip(res['old'],res['floor'])]):.2f}x "
              f"new/old {med([a/b for a,b in zip(res['new'],res['old'])]):.2f}x")
        print(f"  ratio of medians: new/floor {med(res['new'])/med(res['floor']):.2f}x old/floor {med(res['old'])/med(res['floor']):.2f}x")
    if mode in ("all", "ir"):
        for label, c in (("new", cmd(NEW, base / "s-new")), ("old", cmd(OLD, base / "s-old")), ("floor", floor)):
            out = base / f"cg.{label}"
            p = subprocess.run(["valgrind", "--tool=callgrind", "--trace-children=no", f"--callgrind-out-file={out}", *c],
                               env=env, capture_output=True, text=True)
            m = re.search(r"Collected : (\d+)", p.stderr)
            print(f"  callgrind Ir {label}: {m[1] if m else p.stderr[-500:]}")
            subprocess.run(f"callgrind_annotate --inclusive=no {out} 2>/dev/null | head -40 > {base}/top.{label}", shell=True)
            subprocess.run(f"callgrind_annotate --inclusive=yes {out} 2>/dev/null | head -80 > {base}/inc.{label}", shell=True)
            s = subprocess.run(["strace", "-f", "-c", "-o", str(base / f"strace.{label}"), *c], env=env, capture_output=True)
        print(f"  files in {base}")
    if mode == "trace":
        p = subprocess.run(["strace", "-f", "-y", "-e", "trace=fsync,fdatasync,renameat,rename,renameat2,clone3,unlink,unlinkat", *cmd(NEW, base / "s-new")], env=env, capture_output=True, text=True)
        print("\n".join(l for l in p.stderr.splitlines() if "fsync" in l or "rename" in l or "clone3" in l or "unlink" in l)[:4000])
        p = subprocess.run(["strace", "-f", "-r", "-e", "trace=connect,fsync,renameat,clone3,exit_group,write", "-s", "80", *cmd(NEW, base / "s-new")], env=env, capture_output=True, text=True)
        open(base / "relative.trace", "w").write(p.stderr)
        print(base / "relative.trace")
finally:
    R.remove_domains(prefix)
    if mode not in ("ir", "all"):
        shutil.rmtree(base, ignore_errors=True)
