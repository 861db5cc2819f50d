# Build vmsync from this repository:
#   pkgs.callPackage ./deploy/nixos/package.nix { }
#
# Needs a nixpkgs whose Rust is >= 1.89 (edition 2024, std::fs::File::try_lock).
# Only syntax-checked in this repository's CI (`nix-instantiate --parse`);
# nixpkgs itself is not available there.
{
  lib,
  rustPlatform,
  pkg-config,
  libvirt,
  openssl,
  zlib,
}:

rustPlatform.buildRustPackage {
  pname = "vmsync";
  version = "0.1.0";

  src = lib.cleanSourceWith {
    src = ../..;
    # No build output or editor/VCS litter in the source.
    filter =
      path: type:
      lib.cleanSourceFilter path type && !(type == "directory" && baseNameOf path == "target");
  };

  cargoLock.lockFile = ../../Cargo.lock;

  nativeBuildInputs = [ pkg-config ];
  buildInputs = [
    libvirt
    openssl
    zlib
  ];

  # The test suite needs a running libvirtd, qemu-img, git and sshd, none of
  # which exist in the build sandbox (scripts/test.sh runs it on a host).
  doCheck = false;

  meta = {
    description = "git-ops pull agent for libvirt hosts: keeps domains in sync with a git repository";
    mainProgram = "vmsync";
    platforms = lib.platforms.linux;
  };
}
