#!/usr/bin/env bash
# Run a command of this checkout inside a freshly made Debian 12 minbase root, as a
# new host would: nothing from this machine but the Rust toolchain and its CA bundle.
#
#   scripts/fresh-root.sh                        # scripts/test.sh inside (what CI runs)
#   scripts/fresh-root.sh scripts/quickstart.sh  # any command, run from the checkout
#
# Steps, each timed:
#   1. debootstrap --variant=minbase bookworm into a new directory (every run; the
#      downloaded .debs are kept between runs, the root is not);
#   2. copy the checkout in (without target/), hand in the toolchain
#      (/root/.rustup read-only, the rustup proxies copied into a fresh, writable
#      CARGO_HOME, so crates.io is fetched anew) and this machine's CA bundle
#      (registries answer through it), nothing else;
#   3. enter it with its own PID and mount namespaces: the root bound onto itself
#      (QEMU refuses a root that is not a mount point), proc, /sys read-write with
#      the cgroup hierarchies (systemd-nspawn needs them), /dev (with /dev/kvm and
#      /dev/pts), a tmpfs on /run; /tmp is the new root's own;
#   4. run the command there as root, from the checkout (/root/vmsync); whatever it
#      started (libvirtd, virtlogd, QEMU, swtpm, containers) dies with the PID
#      namespace, and the empty cgroups they leave are removed;
#   5. remove the root (only once nothing is mounted under it).
# Exits with the command's status.
#
# Run as root. Environment:
#   FRESH_ROOT_PARENT   where the root is made (default /var/tmp)
#   FRESH_ROOT_CACHE    .deb cache kept between runs (default /var/cache/vmsync-fresh-root)
#   FRESH_ROOT_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   FRESH_ROOT_KEEP=1   keep the root afterwards (its path is printed)
#   FRESH_ROOT_FROM=DIR start from a copy of DIR, an untouched root made by
#                       `debootstrap --variant=minbase bookworm DIR`, instead of
#                       running debootstrap (to iterate on the scripts; CI never does)
set -euo pipefail

log() { printf '[fresh-root] %s\n' "$*"; }
die() {
  printf '[fresh-root] ERROR: %s\n' "$*" >&2
  exit 1
}
trap 'rc=$?; printf "[fresh-root] ERROR: %s (line %s) exited %s\n" "$BASH_COMMAND" "$LINENO" "$rc" >&2' ERR

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, mounts and namespaces need it)"

SRC=$(cd "$(dirname "$0")/.." && pwd)
[ "$#" -gt 0 ] || set -- scripts/test.sh
PARENT=${FRESH_ROOT_PARENT:-/var/tmp}
CACHE=${FRESH_ROOT_CACHE:-/var/cache/vmsync-fresh-root}
MIRROR=${FRESH_ROOT_MIRROR:-http://deb.debian.org/debian}
RUSTUP_DIR=${RUSTUP_HOME:-/root/.rustup}
CARGO_DIR=${CARGO_HOME:-/root/.cargo}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

phases=()
phase_start=0
phase() {
  phase_start=$SECONDS
  log "== $1"
}
phase_end() {
  local secs=$((SECONDS - phase_start))
  phases+=("$(printf '%-12s %4dm%02ds' "$1" $((secs / 60)) $((secs % 60)))")
}
# shellcheck disable=SC2317 # called from the EXIT trap
report() {
  local p
  log "elapsed per phase:"
  for p in "${phases[@]}"; do log "  $p"; done
}

ROOT=
# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
  [ -n "$ROOT" ] && [ -d "$ROOT" ] || return 0
  if [ "${FRESH_ROOT_KEEP:-0}" = 1 ]; then
    log "kept the root at $ROOT (FRESH_ROOT_KEEP=1)"
    return 0
  fi
  # The mounts live in the command's mount namespace and are gone with it; never
  # delete through a mount that is still there (/dev, the toolchain).
  if findmnt -rn -o TARGET | awk -v r="$ROOT" '$0 == r || index($0, r "/") == 1 { found = 1 } END { exit !found }'; then
    log "WARNING: something is still mounted under $ROOT; not removing it"
    return 0
  fi
  rm -rf --one-file-system "$ROOT"
}
trap 'cleanup; report' EXIT

# ------------------------------------------------------------------ host tools --
phase host
missing=()
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]} on this machine"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
[ -x "$RUSTUP_DIR/toolchains" ] || [ -d "$RUSTUP_DIR/toolchains" ] ||
  die "no Rust toolchain at $RUSTUP_DIR (install rustup first, or set RUSTUP_HOME)"
[ -x "$CARGO_DIR/bin/rustup" ] || die "no rustup at $CARGO_DIR/bin/rustup (set CARGO_HOME)"
[ -r "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE"
phase_end host

# ------------------------------------------------------------------ debootstrap --
phase debootstrap
mkdir -p "$PARENT" "$CACHE/debootstrap" "$CACHE/apt/partial"
ROOT=$(mktemp -d "$PARENT/vmsync-fresh-root.XXXXXX")
# mktemp makes it 0700: the root's own users (sshd, libvirt-qemu) must get in.
chmod 0755 "$ROOT"
if [ -n "${FRESH_ROOT_FROM:-}" ]; then
  log "copying $FRESH_ROOT_FROM (FRESH_ROOT_FROM) instead of debootstrap"
  cp -a "$FRESH_ROOT_FROM/." "$ROOT/"
else
  log "debootstrap --variant=minbase bookworm $ROOT $MIRROR"
  if ! debootstrap --variant=minbase --cache-dir="$CACHE/debootstrap" bookworm "$ROOT" "$MIRROR" \
    >"$ROOT.debootstrap.log" 2>&1; then
    tail -n 30 "$ROOT.debootstrap.log" >&2
    die "debootstrap failed (its last lines above; the whole log is $ROOT.debootstrap.log)"
  fi
  rm -f "$ROOT.debootstrap.log"
fi
phase_end debootstrap

# ---------------------------------------------------------------------- prepare --
phase prepare
# The checkout, without build output.
mkdir -p "$ROOT/root/vmsync"
tar -C "$SRC" --exclude=./target --exclude=./fuzz/target -cf - . | tar -C "$ROOT/root/vmsync" -xf -
# The toolchain: rustup's toolchains read-only; a fresh CARGO_HOME with the proxies.
mkdir -p "$ROOT/root/.rustup" "$ROOT/root/.cargo/bin"
cp -a "$CARGO_DIR/bin/rustup" "$ROOT/root/.cargo/bin/"
for proxy in cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt; do
  ln -sf rustup "$ROOT/root/.cargo/bin/$proxy"
done
# This machine's CA bundle (registries are reached through its CAs), kept apart from
# the root's own /etc/ssl so that installing ca-certificates does not replace it.
mkdir -p "$ROOT/etc/ssl/host"
cp "$CA_BUNDLE" "$ROOT/etc/ssl/host/ca-certificates.crt"
# Keep the downloaded .debs between runs.
mkdir -p "$ROOT/var/cache/apt/archives"
phase_end prepare

# -------------------------------------------------------------------------- run --
phase run
ca=/etc/ssl/host/ca-certificates.crt
inner_env=(
  HOME=/root USER=root LOGNAME=root SHELL=/bin/bash LANG=C.UTF-8
  "TERM=${TERM:-dumb}" "CI=${CI:-}"
  PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  RUSTUP_HOME=/root/.rustup CARGO_HOME=/root/.cargo RUSTUP_AUTO_INSTALL=0
  "SSL_CERT_FILE=$ca" "CARGO_HTTP_CAINFO=$ca" "GIT_SSL_CAINFO=$ca" "CURL_CA_BUNDLE=$ca"
  "PIP_CERT=$ca" "REQUESTS_CA_BUNDLE=$ca"
)
# Runs in the new namespaces: mount, then chroot and run the command.
# shellcheck disable=SC2016
inner='
set -eu
R=$1 RUSTUP_DIR=$2 CACHE=$3; shift 3
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=0755 tmpfs "$R/run"
mount --bind "$RUSTUP_DIR" "$R/root/.rustup"
mount -o remount,bind,ro "$R/root/.rustup"
mount --bind "$CACHE/apt" "$R/var/cache/apt/archives"
# Not exec: this shell stays PID 1 of the namespace (reaping what daemons leave), so the
# command gets ordinary signal handling; when this shell exits, the kernel kills
# everything left in the namespace (libvirtd, virtlogd, QEMU, swtpm).
rc=0
chroot "$R" "$@" || rc=$?
exit "$rc"
'
# cgroups that exist now; the run's libvirtd (machine/qemu-*) and systemd-nspawn
# (payload, supervisor) make more, which stay behind, empty, after a kill.
cgroups_before=$(mktemp)
list_cgroups() { { find /sys/fs/cgroup -mindepth 1 -type d 2>/dev/null || true; } | sort; }
list_cgroups >"$cgroups_before"
rc=0
unshare --pid --mount --fork --propagation private \
  bash -c "$inner" fresh-root "$ROOT" "$RUSTUP_DIR" "$CACHE" \
  /usr/bin/env -i "${inner_env[@]}" /bin/bash -c 'cd /root/vmsync && exec "$@"' cmd "$@" ||
  rc=$?
phase_end run
log "$(printf '%s ' "$@" | tr -s '\n\t ' ' ' | cut -c1-100) exited $rc"
# Remove the cgroups the run made, deepest first; rmdir removes only empty ones, so
# a cgroup something on this machine still uses is never touched.
list_cgroups | comm -13 "$cgroups_before" - | sort -r | while read -r dir; do
  rmdir "$dir" 2>/dev/null || true
done
rm -f "$cgroups_before"
exit "$rc"
