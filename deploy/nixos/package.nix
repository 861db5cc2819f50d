# Build vmsync from this repository:
#   pkgs.callPackage ./deploy/nixos/package.nix { }
# (or the flake at the top: `packages.<system>.default`, `overlays.default`).
#
# Installs the binary, its man pages (vmsync(1), one page per command, vmsync.toml(5))
# and bash/zsh/fish completions, both made by the built binary itself.
# Needs a nixpkgs whose Rust is >= 1.89 (edition 2024, std::fs::File::try_lock).
# In this repository's CI it is evaluated with stand-ins for nixpkgs (tests/nixos/),
# never built: nixpkgs itself is not available there.
{
  lib,
  rustPlatform,
  pkg-config,
  installShellFiles,
  libvirt,
  libxml2,
  openssl,
  zlib,
  # The commit `vmsync --version` names (the source has no .git); the flake passes its
  # revision.
  gitCommit ? "unknown",
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

  nativeBuildInputs = [
    pkg-config
    installShellFiles
  ];
  # libvirt (the virt crate), libxml2 (RELAX NG validation), OpenSSL and zlib (git2).
  buildInputs = [
    libvirt
    libxml2
    openssl
    zlib
  ];

  env.VMSYNC_BUILD_COMMIT = gitCommit;

  # The hidden `vmsync __generate` writes them from the binary's own flags.
  postInstall = ''
    $out/bin/vmsync __generate man man
    installManPage man/*.1 man/*.5
    $out/bin/vmsync __generate completions completions
    installShellCompletion --cmd vmsync \
      --bash completions/vmsync.bash \
      --zsh completions/_vmsync \
      --fish completions/vmsync.fish
  '';

  # The test suite needs a running libvirtd, qemu-img, git and sshd, none of
  # which exist in the build sandbox (scripts/test.sh runs it on a host).
  doCheck = false;

  meta = {
    description = "git-ops pull agent for libvirt hosts: keeps domains in sync with a git repository";
    mainProgram = "vmsync";
    platforms = lib.platforms.linux;
  };
}
