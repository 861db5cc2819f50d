#!/usr/bin/env bash
# The Debian 12 tree that tests/systemd_boot.rs boots with `systemd-nspawn -b`:
# systemd, dbus, qemu-utils, git and the libraries the vmsync binary links
# (libvirt0, libssl3). Built once with debootstrap (a few minutes) and kept in
# $VMSYNC_ROOTFS_CACHE (default /var/cache/vmsync-tests) under a name keyed by a
# hash of the recipe below, so a changed package list builds a new tree.
# The test boots it with --volatile=overlay: the cached tree is never written.
#
# Prints the tree's path on stdout (logs go to stderr). Run as root.
# Needs: debootstrap, and deb.debian.org (or $VMSYNC_DEBIAN_MIRROR) reachable
# the first time.
set -euo pipefail

SUITE=bookworm
MIRROR=${VMSYNC_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd,systemd-sysv,dbus,qemu-utils,git,ca-certificates,libvirt0,libssl3
CACHE=${VMSYNC_ROOTFS_CACHE:-/var/cache/vmsync-tests}

log() { printf '[systemd-rootfs] %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "ERROR: must run as root"; exit 2; }
command -v debootstrap >/dev/null || {
  log "ERROR: debootstrap not found: apt-get install debootstrap"
  exit 2
}

# Version 1 of the steps after debootstrap; bump it when they change.
key=$(printf 'v1 %s %s minbase %s\n' "$SUITE" "$MIRROR" "$PACKAGES" | sha256sum | cut -c1-16)
tree=$CACHE/rootfs-$SUITE-$key

mkdir -p "$CACHE"
# One builder at a time; the others wait and reuse its tree.
exec 9>"$CACHE/rootfs.lock"
flock 9

if [ -x "$tree/usr/lib/systemd/systemd" ] && [ -f "$tree/.vmsync-rootfs-complete" ]; then
  log "cached: $tree"
  echo "$tree"
  exit 0
fi

tmp=$(mktemp -d "$CACHE/.build-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log "debootstrap $SUITE ($PACKAGES) into $tmp: takes a few minutes"
started=$(date +%s)
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" "$MIRROR" >"$tmp.log" 2>&1; then
  log "ERROR: debootstrap failed; last lines of its log:"
  tail -n 30 "$tmp.log" >&2
  rm -f "$tmp.log"
  exit 1
fi
rm -f "$tmp.log"

# A container boots faster and quieter without units that need real hardware or
# a network. Nothing here concerns vmsync's units.
for unit in systemd-networkd.service systemd-resolved.service systemd-timesyncd.service \
  apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
  man-db.timer dpkg-db-backup.timer; do
  ln -sf /dev/null "$tmp/etc/systemd/system/$unit"
done
# What libvirt-daemon would create on a real host: the default disk root.
install -d -m 0711 "$tmp/var/lib/libvirt/images"
# nspawn with --volatile=overlay gives the container a machine id of its own.
: >"$tmp/etc/machine-id"
echo vmsync-systemd-test >"$tmp/etc/hostname"
rm -rf "$tmp/var/cache/apt/archives/"*.deb "$tmp/var/lib/apt/lists/"*
touch "$tmp/.vmsync-rootfs-complete"

mv "$tmp" "$tree"
trap - EXIT
log "built $tree in $(($(date +%s) - started)) s ($(du -sh "$tree" | cut -f1))"
echo "$tree"
