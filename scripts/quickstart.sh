#!/usr/bin/env bash
# Quick start: install what vmsync needs, build it and apply example-repo/ once.
#
#   scripts/quickstart.sh                                  # as root; safe: libvirt's test driver
#   VMSYNC_CONNECT=qemu:///system scripts/quickstart.sh    # really define/start the VMs
#
# (Not root? Prefix with sudo: it installs packages and may start libvirtd.)
#
# By default vmsync talks to libvirt's embedded test driver (test:///default),
# so the quick start never touches this host's real VMs; in that mode the
# example's disk paths are redirected into a temporary directory too, so
# nothing is written under /var/lib/libvirt. The test driver lives inside the
# vmsync process: what it defined and started is gone when `vmsync --once`
# exits, so the result shown is that run's own report and the disk images it
# made. Set VMSYNC_CONNECT=qemu:///system to apply the example for real
# (creates uefi-tpm, bios-vm and the templated web-1 and web-2, starts
# uefi-tpm, creates their disks under /var/lib/libvirt/images); then
# `vmsync status` shows them afterwards.
#
# Exits with vmsync's exit code (0 converged, 1 action failed, 3 invalid
# commit, ... see docs/operations.md).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
CONNECT=${VMSYNC_CONNECT:-test:///default}

log() { printf '[quickstart] %s\n' "$*"; }
die() {
  printf '[quickstart] ERROR: %s\n' "$*" >&2
  exit 2
}

# Rust installed by rustup but not on PATH yet (a new login shell would add it).
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi

started=$SECONDS
took() { printf '%dm%02ds' $(((SECONDS - started) / 60)) $(((SECONDS - started) % 60)); }

if [ "$(id -u)" -eq 0 ]; then
  scripts/setup-host.sh || die "scripts/setup-host.sh failed (its message is above); fix that and run the quick start again"
else
  # Without root the dependencies cannot be installed: go on only if they are here.
  missing=()
  for tool in cargo cc pkg-config git qemu-img; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  for lib in libvirt libxml-2.0; do
    pkg-config --exists "$lib" 2>/dev/null || missing+=("$lib (pkg-config)")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    die "not root, so nothing can be installed, and missing: ${missing[*]}. Run it as root (or prefix it with sudo): scripts/setup-host.sh then installs what is missing"
  fi
  log "not root: skipping scripts/setup-host.sh (the build tools are installed)"
fi
# setup-host.sh may have installed rustup in a child process.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
log "cargo build --release"
cargo build --release
log "built after $(took) (setup and build)"
VMSYNC=$ROOT/target/release/vmsync

WORK=$(mktemp -d -t vmsync-quickstart.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

disk_args=()
images=/var/lib/libvirt/images
case $CONNECT in
  test://*)
    # Dry run: the test driver forgets everything when the process exits, so the
    # VM repository, the state and the disks are temporary too, and the example's
    # disks and directories stay out of the real image store.
    REPO=$WORK/vms
    STATE_DIR=$WORK/state
    images=$WORK/images
    mkdir -p "$images"
    cp -r "$ROOT/example-repo" "$REPO"
    grep -rlF /var/lib/libvirt/images "$REPO" |
      xargs sed -i "s|/var/lib/libvirt/images|$images|g"
    disk_args=(--disk-root "$images")
    ;;
  *)
    # For real: the VM repository and vmsync's state are kept (in target/), so
    # that a second run continues the first one's history (vmsync refuses a
    # commit that does not descend from the one it applied) and converges.
    REPO=$ROOT/target/quickstart/vms
    STATE_DIR=$ROOT/target/quickstart/state
    mkdir -p "$REPO"
    find "$REPO" -mindepth 1 -maxdepth 1 ! -name .git -exec rm -rf {} +
    cp -r "$ROOT/example-repo/." "$REPO/"
    ;;
esac

[ -d "$REPO/.git" ] || git -C "$REPO" init -q -b main
git -C "$REPO" config user.name "vmsync quickstart"
git -C "$REPO" config user.email "quickstart@vmsync.invalid"
git -C "$REPO" add -A
git -C "$REPO" diff --cached --quiet || git -C "$REPO" commit -q -m "Example VMs from example-repo/"
log "VM repo: $REPO at $(git -C "$REPO" rev-parse HEAD)"

mkdir -p "$STATE_DIR"
log "vmsync --once --connect $CONNECT"
rc=0
"$VMSYNC" --once --url "$REPO" --branch main --state-dir "$STATE_DIR" \
  --connect "$CONNECT" "${disk_args[@]}" >"$WORK/report" || rc=$?

echo
log "result of vmsync --once (exit $rc):"
sed 's/^/  /' "$WORK/report"
case $CONNECT in
  test://*) log "disk images it made (in a temporary directory, removed when the quick start exits):" ;;
  *) log "disk images:" ;;
esac
for disk in "$images"/uefi-tpm.qcow2 "$images"/bios-vm.qcow2; do
  [ -f "$disk" ] || continue
  log "  $disk:"
  # -U: a running VM holds a write lock on its disk.
  { qemu-img info -U "$disk" || true; } | { grep -E '^(file format|virtual size|disk size):' || true; } |
    sed 's/^/    /'
done

case $CONNECT in
  test://*)
    log "test:///default is libvirt's in-memory test driver: the VMs above were defined and"
    log "started inside that vmsync process and are gone now that it has exited."
    if virsh -c qemu:///system uri >/dev/null 2>&1; then
      log "to apply the example to this host's libvirtd for real:"
      log "  VMSYNC_CONNECT=qemu:///system scripts/quickstart.sh"
    fi
    ;;
  *)
    log "vmsync status --connect $CONNECT"
    status_rc=0
    "$VMSYNC" status --state-dir "$STATE_DIR" --connect "$CONNECT" || status_rc=$?
    [ "$status_rc" -eq 0 ] || log "vmsync status exited $status_rc"
    ;;
esac

exit "$rc"
