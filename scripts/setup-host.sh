#!/usr/bin/env bash
# Prepare a Debian/Ubuntu host (or CI container) to build and test vmsync:
#   - build and runtime packages (C toolchain, libvirt, QEMU, OVMF, swtpm, qemu-img,
#     ssh, git, and the tools the tests run)
#   - a Rust toolchain (rustup, only if no cargo is found)
#   - a reachable libvirtd at qemu:///system (started only if none answers)
#
# Run as root (on a minimal system there may be no sudo). Safe to run any number
# of times: every step checks first and says what it did or why it did nothing.
# It never restarts or reconfigures a libvirtd that is already reachable. Any
# failure prints the step, the command and what to do.
#
# Environment:
#   SETUP_SKIP_APT=1   skip apt-get update/install (offline re-runs)
set -Eeuo pipefail

log() { printf '[setup-host] %s\n' "$*"; }
die() {
  printf '[setup-host] ERROR: %s\n' "$*" >&2
  exit 1
}

# What the current step is and what to do when it fails; the ERR trap names both.
STEP="start"
HINT=""
step() {
  STEP=$1
  HINT=$2
}
on_error() {
  local rc=$1 line=$2 cmd=$3
  # A failing subshell or command substitution is reported once, by its caller.
  [ "$BASH_SUBSHELL" -eq 0 ] || exit "$rc"
  # shellcheck disable=SC2016 # the backquotes are text
  printf '[setup-host] ERROR: step "%s" failed: `%s` exited %s (scripts/setup-host.sh line %s)\n' \
    "$STEP" "$cmd" "$rc" "$line" >&2
  [ -z "$HINT" ] || printf '[setup-host] what to do: %s\n' "$HINT" >&2
  exit "$rc"
}
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR

if [ "$(id -u)" -ne 0 ]; then
  die "must run as root: it installs packages and starts libvirtd (as root: $0; with sudo: sudo $0)"
fi

LIBVIRT_URI=qemu:///system

# Build: a C toolchain (cc links every Rust binary; c++ builds libfuzzer for
# scripts/fuzz.sh), pkg-config and the headers of what vmsync links: libvirt,
# libxml2 (src/host/schema_rng.rs), OpenSSL and zlib (git2).
BUILD_PKGS=(gcc g++ libc6-dev pkg-config libvirt-dev libxml2-dev libssl-dev zlib1g-dev
  git ca-certificates curl)
# Tools the tests and scripts run: nix-instantiate (nix-bin) parses the NixOS
# module and systemd-analyze (package systemd) verifies the units
# (tests/deploy_files.rs); openssl makes certificates and serves TLS, python3
# serves git over https and strace sees which files a sync opens
# (tests/https_ca.rs); procps has kill and pgrep; systemd-container and
# debootstrap boot a systemd container. Minimal images ship none of them.
BUILD_PKGS+=(nix-bin systemd systemd-container debootstrap openssl python3 strace procps)
# The Debian package (scripts/package.sh, checked by scripts/package-check.sh):
# dpkg-shlibdeps (dpkg-dev) computes its library dependencies; cargo-deb itself is
# installed by scripts/package.sh with cargo when missing.
BUILD_PKGS+=(dpkg-dev)
# isoinfo (genisoimage) reads back the cloud-init seeds vmsync writes (tests/seeds.rs)
# and makes the real-guest tier's hand-made seeds; blkid (util-linux) reads their label.
BUILD_PKGS+=(genisoimage util-linux)
# The real-guest tier (tests/guest/build-image.sh): debootstrap (above) builds a Debian
# 12 guest, mkfs.ext4 -d (e2fsprogs) makes its disk without a loop device, qemu-img
# (below) compresses it.
BUILD_PKGS+=(e2fsprogs)
RUNTIME_PKGS=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils swtpm swtpm-tools ovmf
  openssh-server openssh-client
  iptables dnsmasq-base iproute2)  # NAT/isolated networks; `ip link` for the bridge tests

# ---------------------------------------------------------------- packages --

# The installed version of a package, or nothing (not an error) when it is not
# installed: dpkg-query exits 1 for a package it does not know.
installed_version() {
  { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null || true; } |
    awk '$3 == "installed" { print $4 }'
}

is_debian_bookworm() {
  [ -r /etc/os-release ] || return 1
  # shellcheck disable=SC1091
  (. /etc/os-release && [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ])
}

install_packages() {
  if [ "${SETUP_SKIP_APT:-0}" = 1 ]; then
    log "apt: skipped (SETUP_SKIP_APT=1)"
    return
  fi
  local pkgs=("${BUILD_PKGS[@]}" "${RUNTIME_PKGS[@]}")
  local extra_opts=()

  # GOTCHA: on Debian 12 hosts that pulled qemu-utils from bookworm-backports
  # (10.x), that qemu-utils "Breaks: qemu-system-common" from bookworm (7.2),
  # so installing qemu-system-x86 fails. Pin the qemu packages that came from
  # backports to the bookworm release (a downgrade). Only on Debian bookworm:
  # Ubuntu and other Debian releases have no "bookworm" release to select.
  if is_debian_bookworm; then
    local i name ver pinned=()
    for i in "${!pkgs[@]}"; do
      name=${pkgs[$i]}
      case $name in qemu-*) ;; *) continue ;; esac
      ver=$(installed_version "$name")
      if [[ $ver == *bpo* ]]; then
        pkgs[i]="$name/bookworm"
        pinned+=("$name ($ver)")
      fi
    done
    # qemu-block-extra is version-locked to qemu-utils; move it along if present.
    ver=$(installed_version qemu-block-extra)
    if [[ $ver == *bpo* ]]; then
      pkgs+=("qemu-block-extra/bookworm")
      pinned+=("qemu-block-extra ($ver)")
    fi
    if [ "${#pinned[@]}" -gt 0 ]; then
      log "apt: backports qemu found, downgrading to bookworm: ${pinned[*]}"
      extra_opts+=(--allow-downgrades)
    fi
  fi

  step "packages: apt-get update" \
    "check that this host reaches its apt mirrors (/etc/apt/sources.list, /etc/apt/sources.list.d/) and run it again"
  log "apt: apt-get update"
  apt-get update -q
  step "packages: apt-get install" \
    "read apt's message above: a package missing from the configured releases (on Ubuntu some, such as nix-bin, are in universe: add-apt-repository universe) or held back by another version; fix that (or install the packages by hand) and run it again, or skip apt with SETUP_SKIP_APT=1 on a host that has them"
  log "apt: installing ${pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${extra_opts[@]}" "${pkgs[@]}"
}

# -------------------------------------------------------------------- rust --

ensure_rust() {
  step "rust" "install Rust for root (rustup, https://rustup.rs) or put cargo on PATH, then run it again"
  if command -v cargo >/dev/null 2>&1; then
    log "rust: cargo found at $(command -v cargo), nothing to do"
  elif [ -x "$HOME/.cargo/bin/cargo" ]; then
    log "rust: cargo found at $HOME/.cargo/bin/cargo (not on PATH; scripts add it)"
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
  else
    log "rust: no cargo found, installing rustup (minimal profile)"
    curl --proto '=https' --tlsv1.2 https://sh.rustup.rs -sSf | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
  fi
  # The minimal profile has no rustfmt/clippy; scripts/test.sh needs both.
  # Only ask rustup (network) when one is actually missing.
  if command -v rustup >/dev/null 2>&1; then
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if [ "${#missing[@]}" -gt 0 ]; then
      log "rust: adding components ${missing[*]}"
      rustup component add "${missing[@]}"
    fi
  fi
  log "rust: $(cargo --version)"
}

# ----------------------------------------------------------------- libvirt --

libvirt_reachable() {
  virsh -c "$LIBVIRT_URI" uri >/dev/null 2>&1
}

wait_for_libvirt() {
  local i
  for i in $(seq 1 30); do
    if libvirt_reachable; then
      log "libvirt: $LIBVIRT_URI reachable after ${i}s"
      return 0
    fi
    sleep 1
  done
  die "libvirt: $LIBVIRT_URI still not reachable after 30s: see /var/log/libvirt/libvirtd.log (or journalctl -u libvirtd), fix it and run scripts/setup-host.sh again"
}

unit_exists() {
  [ -n "$(systemctl list-unit-files --no-legend "$1" 2>/dev/null)" ]
}

# Set `key = value` in a libvirt config file: drop any active line for the
# key, then append ours. Comments and other settings are kept.
set_conf_key() {
  local file=$1 key=$2 value=$3 value_re
  # The value as a literal in the regular expression ("[]" is one too).
  value_re=$(printf '%s' "$value" | sed 's/[][\.*^$+?(){}|/]/\\&/g')
  if grep -Eq "^[[:space:]]*${key}[[:space:]]*=[[:space:]]*${value_re}[[:space:]]*$" "$file" 2>/dev/null &&
    [ "$(grep -Ec "^[[:space:]]*${key}[[:space:]]*=" "$file")" -eq 1 ]; then
    return 0
  fi
  if [ -f "$file" ]; then
    sed -i -E "/^[[:space:]]*${key}[[:space:]]*=/d" "$file"
  fi
  printf '%s = %s\n' "$key" "$value" >>"$file"
  log "libvirt: set ${key} = ${value} in ${file}"
}

start_libvirt_systemd() {
  if unit_exists libvirtd.service; then
    log "libvirt: systemctl start virtlogd libvirtd"
    systemctl start virtlogd libvirtd
  elif unit_exists virtqemud.socket || unit_exists virtqemud.service; then
    # Modular daemons (no monolithic libvirtd unit on this system).
    log "libvirt: no libvirtd unit; systemctl start virtlogd.socket virtqemud.socket virtqemud"
    systemctl start virtlogd.socket virtqemud.socket
    systemctl start virtqemud.service || true
  else
    # libvirt-daemon (without libvirt-daemon-system) ships no units: start it by hand.
    log "libvirt: no libvirtd/virtqemud units installed; starting the daemons by hand"
    start_libvirt_container
  fi
}

start_libvirt_container() {
  log "libvirt: no systemd (container); starting virtlogd and libvirtd by hand"
  mkdir -p /var/log/libvirt /run/libvirt /var/lib/libvirt/images
  getent group libvirt >/dev/null || { groupadd --system libvirt && log "libvirt: created group libvirt"; }
  getent group libvirt-qemu >/dev/null || { groupadd --system libvirt-qemu && log "libvirt: created group libvirt-qemu"; }
  if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt \
      --no-create-home --shell /usr/sbin/nologin libvirt-qemu
    log "libvirt: created user libvirt-qemu"
  fi

  # Containers usually cannot switch QEMU/swtpm to unprivileged users (no
  # working user/group switching, no DAC relabel of bind mounts), so run them
  # as root. WARNING: never do this to a host whose libvirtd is already
  # running or managed by systemd: it weakens isolation of every guest. This
  # branch is only reached when no libvirtd answers and either systemd is not
  # PID 1 or no libvirt units are installed.
  mkdir -p /etc/libvirt
  local conf=/etc/libvirt/qemu.conf
  set_conf_key "$conf" user '"root"'
  set_conf_key "$conf" group '"root"'
  set_conf_key "$conf" swtpm_user '"root"'
  set_conf_key "$conf" swtpm_group '"root"'
  # Without systemd this is a container or a chroot-like root, where libvirt's
  # private /dev for each QEMU breaks it (in a debootstrap root entered with
  # unshare: "Could not open '/dev/urandom'" for a VM with an RNG device;
  # elsewhere "Failed to open /dev/null for OFD lock probing"): give QEMU the
  # root's own /dev. Not on a host that runs systemd.
  if [ ! -d /run/systemd/system ]; then
    set_conf_key "$conf" namespaces '[]'
  fi

  if pgrep -x virtlogd >/dev/null 2>&1; then
    log "libvirt: virtlogd already running"
  else
    log "libvirt: virtlogd -d"
    virtlogd -d
  fi
  if pgrep -x libvirtd >/dev/null 2>&1; then
    log "libvirt: a libvirtd process exists but does not answer; waiting for it"
  else
    log "libvirt: libvirtd -d"
    libvirtd -d
  fi
}

ensure_libvirt() {
  step "libvirt" "see /var/log/libvirt/libvirtd.log (or journalctl -u libvirtd), fix what it says and run it again"
  if libvirt_reachable; then
    log "libvirt: $LIBVIRT_URI already reachable; leaving the running daemon alone"
    return
  fi
  if [ -d /run/systemd/system ]; then
    start_libvirt_systemd
  else
    start_libvirt_container
  fi
  wait_for_libvirt
}

ensure_sshd_dir() {
  step "ssh" "create /run/sshd (mode 0755) by hand and run it again"
  if [ -d /run/sshd ]; then
    log "ssh: /run/sshd exists"
  else
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
    log "ssh: created /run/sshd"
  fi
}

step "packages" ""
install_packages
ensure_rust
ensure_libvirt
ensure_sshd_dir
step "done" ""
log "done: $(virsh -c "$LIBVIRT_URI" version --daemon 2>/dev/null | sed -n 's/^Running against daemon: *//p' | sed 's/^/libvirtd /')"
