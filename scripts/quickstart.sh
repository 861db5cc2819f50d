#!/usr/bin/env bash
# Quick start: build vmsync and apply example-repo/ once.
#
#   sudo scripts/quickstart.sh                                  # safe: libvirt's test driver
#   sudo VMSYNC_CONNECT=qemu:///system scripts/quickstart.sh    # really define/start the VMs
#
# By default vmsync talks to libvirt's embedded test driver (test:///default),
# so the quick start never touches this host's real VMs; in that mode the
# example's disk paths are redirected into a temporary directory too, so
# nothing is written under /var/lib/libvirt. Set VMSYNC_CONNECT=qemu:///system
# to apply the example for real (creates uefi-tpm and bios-vm, starts uefi-tpm,
# creates their disks under /var/lib/libvirt/images).
#
# Exits with vmsync's exit code (0 converged, 1 action failed, 3 invalid
# commit, ... see docs/operations.md).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
CONNECT=${VMSYNC_CONNECT:-test:///default}
STATE_DIR=$ROOT/target/quickstart-state

log() { printf '[quickstart] %s\n' "$*"; }

if [ "$(id -u)" -eq 0 ]; then
  scripts/setup-host.sh
else
  log "not root: skipping scripts/setup-host.sh (run with sudo to install dependencies)"
fi
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi

log "cargo build --release"
cargo build --release
VMSYNC=$ROOT/target/release/vmsync

WORK=$(mktemp -d -t vmsync-quickstart.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
REPO=$WORK/vms
cp -r "$ROOT/example-repo" "$REPO"

disk_args=()
case $CONNECT in
  test://*)
    # Dry run: keep the example's disks and directories out of the real
    # image store. Fresh state each run: the test driver forgets everything
    # when the process exits.
    images=$WORK/images
    mkdir -p "$images"
    grep -rlF /var/lib/libvirt/images "$REPO" |
      xargs sed -i "s|/var/lib/libvirt/images|$images|g"
    disk_args=(--disk-root "$images")
    rm -rf "$STATE_DIR"
    ;;
esac

git -C "$REPO" init -q -b main
git -C "$REPO" config user.name "vmsync quickstart"
git -C "$REPO" config user.email "quickstart@vmsync.invalid"
git -C "$REPO" add -A
git -C "$REPO" commit -q -m "Example VMs"
log "VM repo: $REPO at $(git -C "$REPO" rev-parse HEAD)"

mkdir -p "$STATE_DIR"
log "vmsync --once --connect $CONNECT"
set +e
"$VMSYNC" --once --url "$REPO" --branch main --state-dir "$STATE_DIR" \
  --connect "$CONNECT" "${disk_args[@]}"
rc=$?
set -e
log "vmsync --once exited $rc"

case $CONNECT in
  test://*) log "note: status runs in a new process with a fresh test driver, so VMs show as not defined there" ;;
esac
log "vmsync status"
set +e
"$VMSYNC" status --state-dir "$STATE_DIR" --connect "$CONNECT"
status_rc=$?
set -e
[ "$status_rc" -eq 0 ] || log "vmsync status exited $status_rc"

exit "$rc"
