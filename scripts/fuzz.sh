#!/usr/bin/env bash
# A brief fuzz run of the VM repository loaders, as CI does it: the manifest parser and
# the domain XML reader/renderer/host policy (targets in fuzz/), seeded with the bad-input
# corpus and the example repository; and the webhook's signature and payload handling,
# seeded with forge-like requests (mode byte, header lines, blank line, body).
#
# cargo-fuzz passes nightly-only rustc flags (-Zsanitizer=address and sanitizer
# coverage); vmsync builds with stable Rust only, so RUSTC_BOOTSTRAP=1 lets stable rustc
# accept them (the sanitizer runtime ships with the stable x86_64 Linux toolchain).
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 20; or VMSYNC_FUZZ_SECONDS)
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${1:-${VMSYNC_FUZZ_SECONDS:-20}}

log() { printf '[fuzz] %s\n' "$*"; }

# libfuzzer-sys compiles libFuzzer's C++ sources.
if ! command -v c++ >/dev/null 2>&1; then
  printf '[fuzz] ERROR: no C++ compiler (c++): as root, run scripts/setup-host.sh (installs g++)\n' >&2
  exit 2
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  log "installing cargo-fuzz from crates.io"
  cargo install --locked cargo-fuzz
fi

seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds/manifest" "$seeds/domain_xml" "$seeds/webhook"
i=0
for f in tests/corpus/*/vmsync.toml example-repo/vmsync.toml; do
  cp "$f" "$seeds/manifest/seed$((i++))"
done
for f in tests/corpus/*/vms/*.xml example-repo/vms/*.xml; do
  [ -f "$f" ] && cp "$f" "$seeds/domain_xml/seed$((i++))"
done

# Mode 0: the target signs the body; 1: the headers as written (see the target).
push='{"ref":"refs/heads/main","after":"1111111111111111111111111111111111111111"}'
printf '\000x-github-event: push\n\n%s' "$push" >"$seeds/webhook/github-push"
printf '\000x-github-event: ping\n\n{"zen":"hi","hook_id":1}' >"$seeds/webhook/github-ping"
printf '\000x-gitea-event: push\n\n{"ref":"refs/heads/dev"}' >"$seeds/webhook/gitea-other-branch"
printf '\000x-gitlab-event: Push Hook\n\n{"ref":"refs/tags/v1","deleted":true}' >"$seeds/webhook/gitlab-tag"
printf '\001x-gitlab-token: s3cret\nx-gitlab-event: Push Hook\n\n%s' "$push" >"$seeds/webhook/gitlab-token"
printf '\001x-hub-signature-256: sha256=00ff\nx-gitea-signature: zz\n\n%s' "$push" >"$seeds/webhook/bad-signatures"

cd fuzz
export RUSTC_BOOTSTRAP=1
for target in manifest domain_xml webhook; do
  mkdir -p "corpus/$target"
  log "cargo fuzz run $target for ${seconds}s"
  cargo fuzz run "$target" "corpus/$target" "$seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536
done
log "OK (crashes would be in $root/fuzz/artifacts/)"
