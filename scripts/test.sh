#!/usr/bin/env bash
# Full check, as CI runs it: prepare the host, then fmt, clippy and all tests,
# including the real-libvirtd tier (which must run, never skip, here).
#
# Usage (as root): sudo scripts/test.sh
set -euo pipefail

cd "$(dirname "$0")/.."

log() { printf '[test] %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "[test] ERROR: run as root: sudo $0" >&2; exit 2; }

scripts/setup-host.sh

# setup-host.sh may have installed rustup in a child process; make its cargo visible.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi

# Tests read this: the real-libvirtd tier fails instead of skipping when it is set.
export VMSYNC_REQUIRE_LIBVIRTD=1

log "cargo fmt --check"
cargo fmt --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

# Crash points (a build with the failpoints feature), then a brief fuzz run. Separate
# commands: under `set -e` a failure on the left of `&&` would not stop the script.
log "cargo test --features failpoints --test faults"
cargo test --features failpoints --test faults
log "scripts/fuzz.sh"
scripts/fuzz.sh
log "cargo test --all-targets"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
cargo test --all-targets --no-fail-fast 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e

echo
log "summary:"
grep -E '^[[:space:]]*Running |^test result:' "$out" || log "(no test result lines)"
if [ "$rc" -ne 0 ]; then
  log "FAILED (cargo test exit $rc)"
  exit "$rc"
fi
log "OK"
