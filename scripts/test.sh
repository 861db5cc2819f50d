#!/usr/bin/env bash
# Full check, as CI runs it: prepare the host, then fmt, clippy, the Debian package
# on a fresh root (scripts/package-check.sh) and all tests, including the
# real-libvirtd tier (which must run, never skip, here).
#
# Usage, as root: scripts/test.sh   (not root? prefix with sudo)
set -euo pipefail

cd "$(dirname "$0")/.."

log() { printf '[test] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "[test] ERROR: run as root: it installs packages and starts libvirtd (as root: $0; with sudo: sudo $0)" >&2
  exit 2
fi

times=()
record_time() {
  local secs=$((SECONDS - $2))
  times+=("$(printf '%-50s %4dm%02ds' "$1" $((secs / 60)) $((secs % 60)))")
}
# Runs one step, logs its name and records how long it took. A failing step
# stops the script, saying which step it was.
step() {
  local name=$1 start=$SECONDS rc=0
  shift
  log "$name"
  "$@" || rc=$?
  record_time "$name" "$start"
  if [ "$rc" -ne 0 ]; then
    log "FAILED: $name (exit $rc)"
    print_times
    exit "$rc"
  fi
}
print_times() {
  local t
  log "time per step:"
  for t in "${times[@]}"; do log "  $t"; done
}

step "scripts/setup-host.sh" scripts/setup-host.sh

# setup-host.sh may have installed rustup in a child process; make its cargo visible.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi

# Tests read this: the real-libvirtd tier fails instead of skipping when it is set.
export VMSYNC_REQUIRE_LIBVIRTD=1

step "cargo fmt --check" cargo fmt --check
step "cargo clippy --all-targets -- -D warnings" cargo clippy --all-targets -- -D warnings
# Crash points (a build with the failpoints feature), then a brief fuzz run.
step "cargo test --features failpoints --test faults" cargo test --features failpoints --test faults
step "scripts/fuzz.sh" scripts/fuzz.sh
# The Debian package, built and installed in a fresh Debian 12 root without Rust.
step "scripts/package-check.sh" scripts/package-check.sh

# The real guest's image (tests/guest/build-image.sh, cached under
# /var/cache/vmsync-tests/guest by its recipe's hash): built once here, before the
# tests that boot it, so its time shows as a step of its own.
step "tests/guest/build-image.sh" bash -c 'tests/guest/build-image.sh >/dev/null'

out=$(mktemp)
trap 'rm -f "$out"' EXIT
start=$SECONDS
log "cargo test --all-targets"
set +e
cargo test --all-targets --no-fail-fast 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e
record_time "cargo test --all-targets" "$start"

echo
log "summary:"
grep -E '^[[:space:]]*Running |^test result:' "$out" || log "(no test result lines)"
print_times
if [ "$rc" -ne 0 ]; then
  log "FAILED (cargo test exit $rc)"
  exit "$rc"
fi
log "OK"
