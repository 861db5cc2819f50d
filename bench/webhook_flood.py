#!/usr/bin/env python3
"""How fast the webhook listener answers `GET /healthz` while 100 idle and 100 slowloris
connections are held open (each reopened when the daemon closes it). Rerunnable by
anyone; no root, no libvirtd (libvirt's test:///default driver, an empty VM repository).

For each binary given (default: target/release/vmsync), in turns (binary A, binary B,
A, B, ... ROUNDS rounds, so that the shared machine's load hits both alike):
  - start the daemon with `[webhook] listen` on a free loopback port;
  - open IDLE connections that send nothing and SLOW connections that send a request
    head one byte every 200 ms and never finish it;
  - every 300 ms for SECONDS seconds, one probe on a new connection: `GET /healthz`,
    timed from connect to the whole answer, given up after 10 s.
Prints per binary: probes, answered, answered within 1 s, median, p95 and max latency.

Usage: bench/webhook_flood.py [--rounds 2] [--seconds 15] [BINARY ...]
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAD = b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"a" * 200


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(binary, work):
    repo = work / "repo"
    repo.mkdir()
    (repo / "vmsync.toml").write_text("version = 1\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "empty"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env=env)
    secret = work / "secret"
    secret.write_text("bench\n")
    secret.chmod(0o600)
    port = free_port()
    config = work / "config.toml"
    config.write_text(f"""[source]
url = "{repo}"
[libvirt]
uri = "test:///default"
[agent]
state_dir = "{work / 'state'}"
schedule = "0 0 0 1 1 *"
jitter_seconds = 0
[webhook]
listen = "127.0.0.1:{port}"
secret_file = "{secret}"
""")
    log = open(work / "daemon.log", "w")
    proc = subprocess.Popen([binary, "--config", str(config)], stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{binary}: the listener never came up; see {work}/daemon.log")


def flood(port, idle_n, slow_n, stop):
    def connect():
        s = socket.socket()
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        return s

    idle = [connect() for _ in range(idle_n)]
    slow = [[connect(), 0] for _ in range(slow_n)]
    while not stop.is_set():
        for entry in slow:
            s, at = entry
            try:
                s.send(HEAD[at % len(HEAD):at % len(HEAD) + 1])
                entry[1] = at + 1
            except OSError:
                s.close()
                entry[0], entry[1] = connect(), 0
        for i, s in enumerate(idle):
            try:
                if s.recv(1, socket.MSG_PEEK) == b"":
                    raise OSError("closed")
            except BlockingIOError:
                continue
            except OSError:
                pass
            s.close()
            idle[i] = connect()
        stop.wait(0.2)
    for s in idle + [e[0] for e in slow]:
        s.close()


def probe(port, limit=10.0):
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
            s.settimeout(max(0.01, limit - (time.monotonic() - started)))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            reply = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return None
    took = time.monotonic() - started
    return took if reply.startswith(b"HTTP/1.1 200") and took < limit else None


def one_round(binary, seconds, idle_n, slow_n):
    with tempfile.TemporaryDirectory(prefix="vmsync-flood-") as tmp:
        proc, port = start_daemon(binary, Path(tmp))
        try:
            time.sleep(1)  # the first sync
            stop = threading.Event()
            t = threading.Thread(target=flood, args=(port, idle_n, slow_n, stop), daemon=True)
            t.start()
            time.sleep(0.5)
            results = []
            end = time.time() + seconds
            while time.time() < end:
                results.append(probe(port))
                time.sleep(0.3)
            stop.set()
            t.join()
            return results
        finally:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--idle", type=int, default=100)
    ap.add_argument("--slow", type=int, default=100)
    ap.add_argument("binaries", nargs="*", default=[str(ROOT / "target/release/vmsync")])
    args = ap.parse_args()
    results = {b: [] for b in args.binaries}
    for r in range(args.rounds):
        for b in args.binaries:
            got = one_round(b, args.seconds, args.idle, args.slow)
            results[b].extend(got)
            print(f"round {r + 1}: {b}: {sum(x is not None for x in got)}/{len(got)} answered", file=sys.stderr)
    print(f"`GET /healthz` under {args.idle} idle + {args.slow} slowloris connections, "
          f"{args.rounds} rounds of {args.seconds:g} s per binary, interleaved; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}:\n")
    print("| binary | probes | answered | within 1 s | median | p95 | max |")
    print("|---|---|---|---|---|---|---|")
    for b, xs in results.items():
        ok = sorted(x for x in xs if x is not None)
        fmt = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
        row = [b, str(len(xs)), str(len(ok)), str(sum(1 for x in ok if x < 1))]
        row += [fmt(statistics.median(ok)), fmt(ok[int(0.95 * (len(ok) - 1))]), fmt(ok[-1])] if ok else ["-"] * 3
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
