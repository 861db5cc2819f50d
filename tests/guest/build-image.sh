#!/usr/bin/env bash
# The Debian 12 guest of the real-guest tier (tests/real_guest*.rs): a small image built
# from Debian packages with debootstrap, booted by direct kernel boot.
#
#   disk.qcow2   an ext4 filesystem on the whole disk (no partition table, made with
#                `mkfs.ext4 -d`: no loop device), compressed qcow2
#   vmlinuz      the kernel (linux-image-cloud-amd64)
#   initrd.img   its initramfs
#   cmdline      the kernel command line: root=/dev/vda rw console=ttyS0 ...
#
# In it: systemd, udev, cloud-init (NoCloud seeds: a CD-ROM labelled cidata),
# qemu-guest-agent, openssh-server, ifupdown and isc-dhcp-client (cloud-init's network
# renderer on Debian 12). Docs, man pages, locales and apt lists are removed.
#
# Built once per machine and kept in $VMSYNC_GUEST_CACHE (default
# /var/cache/vmsync-tests/guest) under a directory named by the hash of this script:
# a changed recipe builds a new image. One builder at a time (flock); the others wait
# and reuse its image. Prints the image directory on stdout (logs go to stderr) and
# how long the build took. Run as root. Needs debootstrap, e2fsprogs (mkfs.ext4 -d),
# qemu-utils and deb.debian.org (or $VMSYNC_DEBIAN_MIRROR) the first time.
set -euo pipefail

SUITE=bookworm
MIRROR=${VMSYNC_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${VMSYNC_GUEST_CACHE:-/var/cache/vmsync-tests/guest}
# debootstrap's own resolver handles the base; apt in the tree installs the rest (it
# resolves the alternatives and virtual packages cloud-init's Python stack needs).
BASE=systemd-sysv,udev,dbus,kmod
PACKAGES=(linux-image-cloud-amd64 initramfs-tools cloud-init qemu-guest-agent openssh-server
  ifupdown isc-dhcp-client iproute2 netbase e2fsprogs)
# The root filesystem's size (sparse: only what is written takes room).
FS_SIZE=2G

log() { printf '[guest-image] %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

[ "$(id -u)" -eq 0 ] || {
  log "ERROR: must run as root (debootstrap)"
  exit 2
}
for tool in debootstrap mkfs.ext4 qemu-img; do
  command -v "$tool" >/dev/null || die "$tool not found: run scripts/setup-host.sh (packages debootstrap, e2fsprogs, qemu-utils)"
done

# The recipe is this script (and the mirror it pulls from).
key=$( (cat "$0" && echo "$MIRROR") | sha256sum | cut -c1-16)
out=$CACHE/$key

mkdir -p "$CACHE"
exec 9>"$CACHE/build.lock"
flock 9

if [ -f "$out/complete" ]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

started=$(date +%s)
work=$(mktemp -d "$CACHE/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
tree=$work/tree
log "debootstrap $SUITE into $tree"
mkdir -p "$CACHE/debs" "$CACHE/apt/partial"
if ! debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$BASE" \
  "$SUITE" "$tree" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
  tail -n 30 "$work/debootstrap.log" >&2
  die "debootstrap failed (its last lines above)"
fi
log "debootstrap done after $(($(date +%s) - started)) s; apt-get install ${PACKAGES[*]}"
# No service starts in the tree.
printf '#!/bin/sh\nexit 101\n' >"$tree/usr/sbin/policy-rc.d"
chmod 0755 "$tree/usr/sbin/policy-rc.d"
# In a mount namespace of its own: /proc and /dev for the maintainer scripts, and the
# .debs kept between builds; all of it gone when the namespace ends.
# shellcheck disable=SC2016 # expanded by the inner shell
if ! unshare --mount --propagation private bash -c '
  set -e
  t=$1 cache=$2; shift 2
  mount -t proc proc "$t/proc"
  mount --bind /dev "$t/dev"
  mount --bind "$cache" "$t/var/cache/apt/archives"
  chroot "$t" apt-get update -q
  DEBIAN_FRONTEND=noninteractive chroot "$t" apt-get install -y -q --no-install-recommends "$@"
' guest-image "$tree" "$CACHE/apt" "${PACKAGES[@]}" >"$work/apt.log" 2>&1; then
  tail -n 30 "$work/apt.log" >&2
  die "apt-get install in the tree failed (its last lines above)"
fi
rm -f "$tree/usr/sbin/policy-rc.d"
log "packages installed after $(($(date +%s) - started)) s"

# --- configuration -------------------------------------------------------------
echo debian >"$tree/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$tree/etc/hosts"
printf 'LABEL=root\t/\text4\tdefaults\t0\t1\n' >"$tree/etc/fstab"
# Every boot of a new disk is a first boot: systemd makes a machine id.
: >"$tree/etc/machine-id"
rm -f "$tree/var/lib/dbus/machine-id"
# ifupdown reads what cloud-init renders into interfaces.d.
printf 'auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n' \
  >"$tree/etc/network/interfaces"
mkdir -p "$tree/etc/network/interfaces.d"
# Only NoCloud: no waiting for metadata servers that are not there.
# One host key type: RSA keys take long to make under TCG.
cat >"$tree/etc/cloud/cloud.cfg.d/90-vmsync-tests.cfg" <<'EOF'
datasource_list: [ NoCloud, None ]
ssh_genkeytypes: [ ed25519 ]
EOF
# The host keys are made on the guest's first boot (by cloud-init), never shipped.
rm -f "$tree"/etc/ssh/ssh_host_*
# Faster boots: nothing here needs these timers or waits.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
  fstrim.timer man-db.timer dpkg-db-backup.timer systemd-networkd-wait-online.service; do
  ln -sf /dev/null "$tree/etc/systemd/system/$unit"
done
# A serial console, for the boot log (virsh console, the domain's log file).
ln -sf /lib/systemd/system/serial-getty@.service \
  "$tree/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service" 2>/dev/null || true

# --- kernel and initrd for direct kernel boot ----------------------------------
kernel=$(find "$tree/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n 1)
initrd=$(find "$tree/boot" -maxdepth 1 -name 'initrd.img-*' | sort | tail -n 1)
[ -n "$kernel" ] && [ -n "$initrd" ] || die "no kernel or initrd in $tree/boot"
mkdir -p "$work/out"
cp "$kernel" "$work/out/vmlinuz"
cp "$initrd" "$work/out/initrd.img"
echo "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet" >"$work/out/cmdline"

# --- size: no docs, man pages, locales, apt lists or caches --------------------
rm -rf "$tree"/usr/share/doc/* "$tree"/usr/share/man/* "$tree"/usr/share/info/* \
  "$tree"/usr/share/locale/* "$tree"/usr/share/lintian "$tree"/var/lib/apt/lists/* \
  "$tree"/var/cache/apt/*.bin "$tree"/var/cache/apt/archives/*.deb "$tree"/var/cache/debconf/*-old \
  "$tree"/var/log/*.log "$tree"/boot/*

# --- the disk --------------------------------------------------------------------
log "mkfs.ext4 -d ($FS_SIZE) and qemu-img convert"
mkfs.ext4 -q -F -L root -d "$tree" "$work/root.raw" "$FS_SIZE" >&2
qemu-img convert -c -O qcow2 "$work/root.raw" "$work/out/disk.qcow2"
rm -f "$work/root.raw"
rm -rf "$tree"
echo "$key" >"$work/out/recipe"
chmod 0644 "$work/out/"*
touch "$work/out/complete"
mv "$work/out" "$out"
secs=$(($(date +%s) - started))
log "built $out in $secs s: disk.qcow2 $(du -h --apparent-size "$out/disk.qcow2" | cut -f1), kernel $(du -h "$out/vmlinuz" | cut -f1), initrd $(du -h "$out/initrd.img" | cut -f1)"
# Older builds are of other recipes: remove them (never the one just built).
for old in "$CACHE"/*/; do
  old=${old%/}
  [ "$old" != "$out" ] && [ -f "$old/complete" ] && rm -rf "$old"
done
echo "$out"
