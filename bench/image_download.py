#!/usr/bin/env python3
"""Base image download speed: vmsync against curl, from the same local server, in one run.

Generates a SIZE_MIB file (default 1024 MiB, pseudo-random so that nothing compresses
it on the way) in /var/tmp/vmsync-bench-images/, serves it from a local HTTP server
(Python's ThreadingHTTPServer, the body sent with sendfile(2) so that the server costs
little CPU), then RUNS times, interleaved:

  - `curl -sS -o FILE URL` (no hash): the reference rate;
  - `vmsync --once` on libvirt's test:///default driver with a one-VM repository whose
    disk is made from that image (`[[image]]` with its sha256, format raw): the image
    is downloaded and hashed in the same pass, fsynced, checked with qemu-img info and
    renamed; the disk is a qcow2 overlay on it. Each run starts with an empty image
    directory and state directory, so each run downloads.

For vmsync it reports the download+hash rate (the `image downloaded` log line: from the
first byte of the response to the last byte written, hash included, fsync and the
qemu-img check excluded) and the rate over the whole `--once` run (git fetch,
validation, fsync, check, disk and define included). Medians, and vmsync's download
rate as a ratio of curl's (target: at least 0.90). Everything it made is removed at the
end; the image file is removed too.

Usage: bench/image_download.py [--binary VMSYNC] [--size-mib N] [--runs N]
Without --binary it uses target/release/vmsync, which must exist (`cargo build
--release`). Needs curl, git and qemu-img; no libvirtd.
"""

import argparse
import hashlib
import http.server
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

WORK = "/var/tmp/vmsync-bench-images"


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves the one file at /image.raw with sendfile(2)."""

    path_on_disk = ""

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        if self.path != "/image.raw":
            self.send_error(404)
            return
        size = os.path.getsize(self.path_on_disk)
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        with open(self.path_on_disk, "rb") as f:
            self.connection.sendfile(f)

    def log_message(self, *args):
        pass


def make_image(path, size_mib):
    """A pseudo-random file of size_mib MiB (a 1 MiB random block, varied per MiB); its sha256."""
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(size_mib):
            chunk = i.to_bytes(8, "little") + block[8:]
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {platform.release()}"


def run_curl(url, out):
    start = time.monotonic()
    subprocess.run(["curl", "-sS", "-o", out, url], check=True)
    secs = time.monotonic() - start
    os.remove(out)
    return secs


def git(repo, *args):
    subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True)


def make_repo(repo, url, sha, disks):
    os.makedirs(os.path.join(repo, "vms"))
    xml = (
        "<domain type='test'><name>img</name><memory unit='MiB'>128</memory>"
        "<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{disks}/img.qcow2'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>\n"
    )
    with open(os.path.join(repo, "vms", "img.xml"), "w") as f:
        f.write(xml)
    with open(os.path.join(repo, "vmsync.toml"), "w") as f:
        f.write(
            f'version = 1\n\n[[image]]\nname = "big"\nurl = "{url}"\nsha256 = "{sha}"\n\n'
            f'[[vm]]\nname = "img"\nxml = "vms/img.xml"\n  [[vm.disk]]\n'
            f'  path = "{disks}/img.qcow2"\n  size = "2G"\n  image = "big"\n'
        )
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "image")


def run_vmsync(binary, repo, url_prefix, scratch):
    """One --once that downloads: (whole-run seconds, download seconds, bytes)."""
    disks = os.path.join(scratch, "disks")
    state = os.path.join(scratch, "state")
    for d in (disks, state):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    images = os.path.join(disks, "images")
    config = os.path.join(scratch, "config.toml")
    with open(config, "w") as f:
        f.write(f'[policy]\nimage_urls = ["{url_prefix}"]\nimage_dir = "{images}"\n')
    start = time.monotonic()
    out = subprocess.run(
        [binary, "--once", "--config", config, "--url", repo, "--state-dir", state,
         "--connect", "test:///default", "--disk-root", disks, "--host", "bench",
         "--log-format", "json"],
        capture_output=True, text=True,
    )
    secs = time.monotonic() - start
    if out.returncode != 0:
        raise SystemExit(f"vmsync --once failed ({out.returncode}):\n{out.stderr}")
    served = download = None
    for line in (out.stdout + out.stderr).splitlines():
        if "image downloaded" in line:
            served = int(re.search(r'"served":(\d+)', line).group(1))
            download = float(re.search(r'"seconds":"([\d.]+)"', line).group(1))
    if download is None:
        raise SystemExit(f"no 'image downloaded' line:\n{out.stderr}")
    shutil.rmtree(disks, ignore_errors=True)
    return secs, download, served


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/vmsync")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    binary = os.path.abspath(args.binary)
    if not os.path.exists(binary):
        raise SystemExit(f"{binary} is missing: cargo build --release, or --binary")
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    try:
        image = os.path.join(WORK, "image.raw")
        sha = make_image(image, args.size_mib)
        Handler.path_on_disk = image
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        prefix = f"http://127.0.0.1:{server.server_address[1]}"
        url = f"{prefix}/image.raw"
        scratch = tempfile.mkdtemp(dir=WORK)
        repo = os.path.join(scratch, "repo")
        make_repo(repo, url, sha, os.path.join(scratch, "disks"))
        size = args.size_mib << 20
        curl, whole, download = [], [], []
        for _ in range(args.runs):
            curl.append(size / run_curl(url, os.path.join(WORK, "curl.out")))
            w, d, served = run_vmsync(binary, repo, prefix, scratch)
            assert served == size, (served, size)
            whole.append(size / w)
            download.append(size / d)
        server.shutdown()
        mib = lambda r: f"{statistics.median(r) / (1 << 20):.0f} MiB/s"  # noqa: E731
        spread = lambda r: f"{min(r) / (1 << 20):.0f}–{max(r) / (1 << 20):.0f}"  # noqa: E731
        ratio = statistics.median(download) / statistics.median(curl)
        print(f"# Image download: {args.size_mib} MiB from a local server, {args.runs} runs each, interleaved\n")
        print(f"machine: {machine()}\n")
        print("| what | median | range (MiB/s) |")
        print("|---|---|---|")
        print(f"| `curl -o` (no hash) | {mib(curl)} | {spread(curl)} |")
        print(f"| vmsync download + sha256 + write | {mib(download)} | {spread(download)} |")
        print(f"| vmsync whole `--once` (also fetch, fsync, qemu-img check, disk, define) | {mib(whole)} | {spread(whole)} |")
        print(f"\nvmsync download / curl: {ratio:.2f} (target: at least 0.90)")
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
