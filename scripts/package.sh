#!/usr/bin/env bash
# Build the Debian package of this checkout: target/debian/vmsync_<version>-1_<arch>.deb
# (on Debian 12 / Ubuntu, where it then installs with `apt install ./vmsync_*.deb`).
#
#   scripts/package.sh                               # the .deb, version from Cargo.toml
#   scripts/package.sh --deb-version 0.0.9-1 -o DIR  # any `cargo deb` option after it
#
# Steps:
#   1. cargo-deb: installed with `cargo install cargo-deb --locked` when `cargo deb` is
#      missing (compiled from crates.io: about 2 minutes on 2 cores); dpkg-shlibdeps
#      (package dpkg-dev) computes the library dependencies;
#   2. `cargo build --release` (nothing to do when it is built already);
#   3. the man pages and shell completions, made by that binary from its own command
#      line definitions (`vmsync __generate man|completions DIR`) into target/package/;
#   4. `cargo deb --no-build`: the contents are [package.metadata.deb] in Cargo.toml,
#      the maintainer scripts deploy/debian/.
# Prints the package's path (last line of stdout). Exits non-zero when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[package] %s\n' "$*" >&2; }
die() {
  printf '[package] ERROR: %s\n' "$*" >&2
  exit 1
}

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || die "no cargo: run scripts/setup-host.sh (or install Rust) first"
command -v dpkg-shlibdeps >/dev/null 2>&1 ||
  die "no dpkg-shlibdeps (it computes the package's library dependencies): apt-get install dpkg-dev, or run scripts/setup-host.sh"

if ! cargo deb --version >/dev/null 2>&1; then
  log "cargo-deb missing: cargo install cargo-deb --locked (compiles it from crates.io)"
  start=$SECONDS
  cargo install cargo-deb --locked
  log "cargo-deb installed in $((SECONDS - start)) s"
fi

log "cargo build --release"
cargo build --release
bin=target/release/vmsync

log "man pages and completions from $bin"
rm -rf target/package
"$bin" __generate man target/package/man >/dev/null
"$bin" __generate completions target/package/completions >/dev/null
gzip -9n target/package/man/*

log "cargo deb --no-build $*"
out=$(cargo deb --no-build "$@")
deb=$(printf '%s\n' "$out" | tail -n 1)
[ -f "$deb" ] || die "cargo deb did not name a package (it printed: $out)"
log "$deb: $(du -k "$deb" | cut -f1) KiB, installed size $(dpkg-deb -f "$deb" Installed-Size) KiB"
echo "$deb"
