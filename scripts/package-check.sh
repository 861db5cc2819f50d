#!/usr/bin/env bash
# The Debian package on a host without Rust: builds the .deb (scripts/package.sh), then
# in a fresh Debian 12 minbase root (debootstrap, no compiler, no Rust) checks what an
# operator does with it:
#   1. `apt-get install ./vmsync_*.deb` (apt resolves the dependencies), timed together
#      with the first sync: the installed example repository applied by the installed
#      binary against libvirt's test driver (`--connect test:///default`): changes
#      applied, a disk made, state.json written;
#   2. `vmsync --version` (version, this checkout's commit, libvirt), `man -w` for
#      vmsync(1), vmsync-plan(1) and vmsync.toml(5), the completions, the docs;
#   3. `systemd-analyze verify` of the installed units, none of them enabled, the config
#      a conffile, /var/lib/vmsync made (mode 0700);
#   4. `apt-get remove` keeps the config and the state, `apt-get purge` removes the
#      config;
#   5. an older build of the package (same binary, version 0.0.0-1) installed, its
#      config edited, then this one installed over it: the edit is kept.
# Tools the checks use (man-db, systemd for systemd-analyze, git for the example
# repository) are installed into the root first, apart from the timed step. Packages
# are installed without Recommends (libvirt-daemon-system and what it pulls in would
# only add minutes; the Recommends field itself is checked).
#
# Run as root (debootstrap, chroot). Part of scripts/test.sh. Environment:
#   PACKAGE_CHECK_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   PACKAGE_CHECK_CACHE    debootstrap's .deb cache (default /var/cache/vmsync-package-check)
#   PACKAGE_CHECK_FROM=DIR start from a copy of DIR, an untouched
#                          `debootstrap --variant=minbase bookworm DIR` root (to iterate;
#                          CI never does)
#   PACKAGE_CHECK_KEEP=1   keep the root afterwards
# Exits non-zero, naming the check, when one fails.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)

log() { printf '[package-check] %s\n' "$*"; }
fail() {
  printf '[package-check] FAILED: %s\n' "$*" >&2
  exit 1
}
[ "$(id -u)" -eq 0 ] || fail "must run as root (debootstrap and chroot need it)"

MIRROR=${PACKAGE_CHECK_MIRROR:-http://deb.debian.org/debian}
CACHE=${PACKAGE_CHECK_CACHE:-/var/cache/vmsync-package-check}
timings=()
timed() { timings+=("$(printf '%-44s %4d s' "$1" "$2")"); }

# ----------------------------------------------------------------- packages --
start=$SECONDS
debs=$(mktemp -d)
built=$(scripts/package.sh | tail -n 1)
deb=$debs/${built##*/}
cp "$built" "$deb"
mkdir "$debs/old"
old=$(scripts/package.sh --deb-version 0.0.0-1 -o "$debs/old/" | tail -n 1)
timed "scripts/package.sh (twice)" $((SECONDS - start))
deb_kib=$(du -k "$deb" | cut -f1)
installed_kib=$(dpkg-deb -f "$deb" Installed-Size)
log "package: $deb ($deb_kib KiB; Installed-Size $installed_kib KiB)"
log "control: Depends: $(dpkg-deb -f "$deb" Depends)"
log "control: Recommends: $(dpkg-deb -f "$deb" Recommends)"
dpkg-deb -f "$deb" Depends | grep -q 'libvirt0' || fail "Depends lacks libvirt0 (dpkg-shlibdeps)"
dpkg-deb -f "$deb" Depends | grep -q 'qemu-utils' || fail "Depends lacks qemu-utils"
[ "$(dpkg-deb -f "$deb" Recommends)" = libvirt-daemon-system ] || fail "Recommends is not libvirt-daemon-system"
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
version=$(dpkg-deb -f "$deb" Version)
version=${version%-*}

# --------------------------------------------------------------- fresh root --
start=$SECONDS
mkdir -p "$CACHE/debootstrap" /var/tmp
ROOT=$(mktemp -d /var/tmp/vmsync-package-check.XXXXXX)
chmod 0755 "$ROOT"
# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
  rm -rf "$debs"
  if [ "${PACKAGE_CHECK_KEEP:-0}" = 1 ]; then
    log "kept the root at $ROOT"
  else
    # Every mount lives in a namespace of its own (in_root), gone with it.
    rm -rf --one-file-system "$ROOT"
  fi
}
trap cleanup EXIT
if [ -n "${PACKAGE_CHECK_FROM:-}" ]; then
  cp -a "$PACKAGE_CHECK_FROM/." "$ROOT/"
else
  exec 9>"$CACHE/debootstrap.lock"
  flock 9
  debootstrap --variant=minbase --cache-dir="$CACHE/debootstrap" bookworm "$ROOT" "$MIRROR" \
    >"$ROOT.log" 2>&1 || {
    tail -n 30 "$ROOT.log" >&2
    rm -f "$ROOT.log"
    fail "debootstrap (its last lines above)"
  }
  rm -f "$ROOT.log"
  exec 9>&-
fi
timed "debootstrap --variant=minbase bookworm" $((SECONDS - start))
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
mkdir -p "$ROOT/tmp/debs"
cp "$deb" "$ROOT/tmp/debs/vmsync_new.deb"
cp "$old" "$ROOT/tmp/debs/vmsync_old.deb"

# Runs a shell script in the root: own mount and PID namespaces, /proc and /dev.
in_root() {
  unshare --mount --pid --fork --propagation private bash -c '
    set -e
    mount -t proc proc "$1/proc"
    mount --rbind /dev "$1/dev"
    exec chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
      LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive /bin/bash -euo pipefail -c "$2"
  ' in-root "$ROOT" "$1"
}
check() {
  local what=$1
  shift
  in_root "$1" || fail "$what"
  log "ok: $what"
}
apt_install='apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0'

start=$SECONDS
check "no compiler and no Rust in the fresh root" '
  for tool in cc gcc rustc cargo; do
    if command -v $tool; then echo "$tool found"; exit 1; fi
  done'
check "tools for the checks installed (man-db, systemd, git)" "
  apt-get update -q >/dev/null
  $apt_install man-db systemd git >/dev/null"
timed "apt-get update; man-db, systemd, git" $((SECONDS - start))

# ---------------------------------------------------- install and first sync --
start=$SECONDS
check "apt-get install ./vmsync_*.deb, then the example repository applied (test driver)" "
  $apt_install /tmp/debs/vmsync_new.deb
  repo=/var/tmp/example-repo images=/var/tmp/images
  cp -r /usr/share/doc/vmsync/example-repo \$repo
  mkdir -p \$images
  grep -rlF /var/lib/libvirt/images \$repo | xargs sed -i \"s|/var/lib/libvirt/images|\$images|g\"
  git -C \$repo init -q -b main
  git -C \$repo -c user.name=ci -c user.email=ci@vmsync.invalid add -A
  git -C \$repo -c user.name=ci -c user.email=ci@vmsync.invalid commit -q -m example
  vmsync --once --url \$repo --connect test:///default --disk-root \$images | tee /tmp/report
  grep -Eq '^applied commit [0-9a-f]{40}: [1-9][0-9]* change\\(s\\)' /tmp/report
  test -f \$images/uefi-tpm.qcow2
  test -f /var/lib/vmsync/state.json"
first_sync=$((SECONDS - start))
timed "apt install ./vmsync_*.deb to first sync" "$first_sync"

start=$SECONDS
check "vmsync --version names version $version, commit $commit and libvirt" "
  vmsync --version | tee /tmp/version
  grep -qx 'vmsync $version' /tmp/version
  grep -qx 'commit $commit' /tmp/version
  grep -qx 'built against libvirt [0-9][0-9.]*' /tmp/version"
check "man pages: vmsync(1) with exit statuses, vmsync-plan(1), vmsync.toml(5)" '
  man -w vmsync && man -w vmsync-plan && man -w 5 vmsync.toml
  MANWIDTH=80 man vmsync 2>/dev/null | grep -q "^EXIT STATUS"
  MANWIDTH=80 man vmsync 2>/dev/null | grep -q -- "--allow-rewind"'
check "completions and docs installed" '
  test -s /usr/share/bash-completion/completions/vmsync
  test -s /usr/share/zsh/vendor-completions/_vmsync
  test -s /usr/share/fish/vendor_completions.d/vmsync.fish
  test -s /usr/share/doc/vmsync/README.md
  test -s /usr/share/doc/vmsync/docs/repository-format.md
  test -s /usr/share/doc/vmsync/example-repo/vmsync.toml
  test -s /usr/share/doc/vmsync/example-repo/vms/uefi-tpm.xml'
check "systemd-analyze verify of the installed units" '
  out=$(systemd-analyze verify /lib/systemd/system/vmsync.service \
    /lib/systemd/system/vmsync.timer /lib/systemd/system/vmsync-agent.service 2>&1) || {
    echo "$out"; exit 1; }
  if echo "$out" | grep vmsync; then exit 1; fi'
check "units installed but not enabled; state directory 0700; config a conffile" '
  for unit in vmsync.timer vmsync.service vmsync-agent.service; do
    state=$(systemctl is-enabled $unit || true)
    [ "$state" = disabled ] || [ "$state" = static ] || { echo "$unit: $state"; exit 1; }
  done
  [ "$(stat -c %a /var/lib/vmsync)" = 700 ]
  dpkg-query -W -f="\${Conffiles}\n" vmsync | grep -q "^ /etc/vmsync/config.toml "'

check "apt-get remove keeps the config and the state" '
  echo "# edited by the operator" >>/etc/vmsync/config.toml
  apt-get remove -y -q vmsync >/dev/null
  ! test -e /usr/bin/vmsync
  grep -q "^# edited by the operator" /etc/vmsync/config.toml
  test -f /var/lib/vmsync/state.json'
check "apt-get purge removes the config" '
  apt-get purge -y -q vmsync >/dev/null
  ! test -e /etc/vmsync/config.toml
  [ "$(dpkg-query -W -f="\${Status}" vmsync 2>/dev/null || true)" != "install ok installed" ]'
check "an upgrade over an older build keeps the edited conffile" "
  $apt_install /tmp/debs/vmsync_old.deb >/dev/null
  [ \"\$(dpkg-query -W -f='\${Version}' vmsync)\" = 0.0.0-1 ]
  sed -i 's|^url = .*|url = \"file:///srv/vms.git\"|' /etc/vmsync/config.toml
  $apt_install /tmp/debs/vmsync_new.deb >/dev/null
  [ \"\$(dpkg-query -W -f='\${Version}' vmsync)\" != 0.0.0-1 ]
  grep -qx 'url = \"file:///srv/vms.git\"' /etc/vmsync/config.toml
  ! test -e /etc/vmsync/config.toml.dpkg-new"
timed "the other checks" $((SECONDS - start))

log "sizes: .deb $deb_kib KiB, installed $installed_kib KiB (Installed-Size)"
log "time from apt install to the first sync: $first_sync s"
log "time per step:"
for t in "${timings[@]}"; do log "  $t"; done
log "OK"
