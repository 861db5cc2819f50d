# Evaluates the outputs of the flake at the top of the repository (`src`) the way
# `nix flake show` / `nix flake check` would, with stand-ins for its input: `nixpkgs`
# is tests/nixos/lib.nix (plus a `lib.nixosSystem` on tests/nixos/nixos.nix) and
# pkgs.nix for every system. Nothing is built. Returns what tests/deploy_files.rs reads
# (`nix-instantiate --eval --strict --json`).
{ src }:
let
  lib = import ./lib.nix;
  basePkgs = import ./pkgs.nix { inherit lib; };
  pkgsFor = system: basePkgs // { stdenv.hostPlatform.system = system; };
  nixpkgs = {
    lib = lib // {
      nixosSystem =
        { system, modules, ... }:
        lib.evalModules {
          modules = import ./nixos.nix {
            inherit lib;
            pkgs = pkgsFor system;
          } ++ modules;
        };
    };
    legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] pkgsFor;
  };
  flake = import (src + "/flake.nix");
  self =
    flake.outputs { inherit self nixpkgs; }
    // {
      outPath = src;
      shortRev = "0123456789ab";
    };
  package = p: {
    inherit (p) name pname version;
    meta.mainProgram = p.meta.mainProgram;
    commit = p.env.VMSYNC_BUILD_COMMIT or null;
    buildInputs = map (d: d.pname or d.name) p.buildInputs;
    nativeBuildInputs = map (d: d.pname or d.name) p.nativeBuildInputs;
    postInstall = p.postInstall or "";
  };
  # A host that imports only the flake's module: the package comes with it.
  host = nixpkgs.lib.nixosSystem {
    system = "x86_64-linux";
    modules = [
      self.nixosModules.default
      {
        services.vmsync = {
          enable = true;
          settings.source.url = "file:///srv/vms";
        };
      }
    ];
  };
in
{
  inputs = builtins.mapAttrs (_: i: i.url) flake.inputs;
  outputs = builtins.attrNames (flake.outputs { inherit self nixpkgs; });
  packages = builtins.mapAttrs (_: ps: builtins.mapAttrs (_: package) ps) self.packages;
  overlay = package (self.overlays.default basePkgs basePkgs).vmsync;
  checks = builtins.mapAttrs (
    _: cs: builtins.mapAttrs (_: c: builtins.fromJSON c.text) cs
  ) self.checks;
  host = {
    package = host.config.services.vmsync.package.name;
    execStart = host.config.systemd.services.vmsync.serviceConfig.ExecStart;
    timer = host.config.systemd.timers.vmsync.timerConfig;
  };
}
