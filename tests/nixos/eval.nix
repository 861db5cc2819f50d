# Evaluates a NixOS host configuration (`host`: a module, e.g. a path to a file) with
# tests/nixos/lib.nix, pkgs.nix and nixos.nix, as `nixos-rebuild` would evaluate it:
# failed assertions abort with NixOS' message, then the parts tests/deploy_files.rs reads
# are returned (`nix-instantiate --eval --strict --json`).
{ host }:
let
  lib = import ./lib.nix;
  pkgs = import ./pkgs.nix { inherit lib; };
  system = lib.evalModules {
    modules = import ./nixos.nix { inherit lib pkgs; } ++ [ host ];
  };
  inherit (system) config;
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  vmsync = config.services.vmsync or null;
  etc = config.environment.etc."vmsync/config.toml" or null;
in
if failed != [ ] then
  throw "\nFailed assertions:\n${lib.concatMapStringsSep "\n" (m: "- ${m}") failed}"
else
  {
    inherit (config) warnings;
    systemd = {
      inherit (config.systemd) services timers units;
      tmpfiles.rules = config.systemd.tmpfiles.rules;
    };
    libvirtd.enable = config.virtualisation.libvirtd.enable;
    libvirtd.swtpm = config.virtualisation.libvirtd.qemu.swtpm.enable;
    qemu = config.virtualisation.libvirtd.qemu.package;
    polkit.enable = config.security.polkit.enable;
    systemPackages = config.environment.systemPackages;
    vmsync =
      if vmsync == null then
        null
      else
        {
          inherit (vmsync) settings package;
          settingsDescription = system.options.services.vmsync.settings.description;
        };
    # /etc/vmsync/config.toml: the file, and the build that checks it (if any).
    configFile =
      if etc == null then
        null
      else
        {
          inherit (etc) source;
          # With services.vmsync.checkConfig: the runCommand script that checks the
          # file, else null. `toml`: the data written as TOML (formats.toml's value).
          script = etc.source.script or null;
          toml = etc.source.value or etc.source.env.unchecked.value;
        };
  }
