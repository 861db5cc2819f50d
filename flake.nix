# vmsync as a Nix flake:
#
#   packages.<system>.default  vmsync built from Cargo.lock (deploy/nixos/package.nix),
#                              with its man pages and bash/zsh/fish completions
#   overlays.default           adds `vmsync` to nixpkgs
#   nixosModules.default       deploy/nixos/module.nix, `services.vmsync.package`
#                              defaulting to this flake's package
#   checks.<system>.nixos-module  evaluates the module on a host with vmsync enabled
#                              (timer mode) and writes the units it makes
#
# A host's flake:
#   inputs.vmsync.url = "git+https://git.example.org/vmsync.git";
#   nixosConfigurations.hv1 = nixpkgs.lib.nixosSystem {
#     modules = [ vmsync.nixosModules.default ./hv1.nix ];   # services.vmsync = { ... }
#   };
#
# In this repository's CI nixpkgs cannot be fetched: tests/deploy_files.rs evaluates
# these outputs with stand-ins for nixpkgs (tests/nixos/); nothing is built there.
{
  description = "vmsync: git-ops pull agent for libvirt hosts";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
      # `vmsync --version` names the commit; a flake source has no .git.
      gitCommit = self.shortRev or self.dirtyShortRev or "unknown";
      vmsyncFor = pkgs: pkgs.callPackage ./deploy/nixos/package.nix { inherit gitCommit; };
    in
    {
      overlays.default = final: _prev: { vmsync = vmsyncFor final; };

      packages = forAllSystems (
        _system: pkgs: rec {
          vmsync = vmsyncFor pkgs;
          default = vmsync;
        }
      );

      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./deploy/nixos/module.nix ];
          services.vmsync.package = lib.mkDefault (vmsyncFor pkgs);
        };

      checks = forAllSystems (
        system: pkgs:
        let
          host = lib.nixosSystem {
            inherit system;
            modules = [
              self.nixosModules.default
              {
                services.vmsync = {
                  enable = true;
                  settings.source.url = "https://git.example.org/infra/vms.git";
                };
              }
            ];
          };
          inherit (host) config;
          # The module's own assertions (a whole host would also need file systems and
          # a boot loader, which this check does not describe).
          failed = map (a: a.message) (
            builtins.filter (a: !a.assertion && lib.hasPrefix "services.vmsync" a.message) config.assertions
          );
          units = {
            service = config.systemd.services.vmsync.serviceConfig;
            timer = config.systemd.timers.vmsync.timerConfig;
            configFile = config.environment.etc."vmsync/config.toml".source;
          };
        in
        {
          nixos-module =
            if failed != [ ] then
              throw "services.vmsync: ${lib.concatStringsSep "; " failed}"
            else
              pkgs.writeText "vmsync-nixos-module-check.json" (builtins.toJSON units);
        }
      );
    };
}
