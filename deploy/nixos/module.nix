# NixOS module for vmsync, the git-ops pull agent for libvirt hosts.
#
#   imports = [ /path/to/vmsync/deploy/nixos/module.nix ];
#   services.vmsync = {
#     enable = true;
#     package = pkgs.callPackage /path/to/vmsync/deploy/nixos/package.nix { };
#     settings.source.url = "ssh://git@git.example.org/infra/vms.git";
#   };
#
# It replaces the hand-written glue (one `virsh define` unit per VM, lists of
# VMs fed to helper functions, `qemu-img create` units guarded by
# ConditionPathExists, inline XML redefined on every boot): the VMs live in a
# git repository, and this module only runs the agent that applies it.
# See deploy/README.md.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.vmsync;
  settingsFormat = pkgs.formats.toml { };
  configFile = settingsFormat.generate "vmsync-config.toml" cfg.settings;

  # Defaults of the agent itself (see deploy/config.toml), used to open the
  # sandbox for the paths vmsync writes.
  stateDir = cfg.settings.agent.state_dir or "/var/lib/vmsync";
  diskRoots = cfg.settings.policy.disk_roots or [ "/var/lib/libvirt/images" ];
  metricsFile = cfg.settings.agent.metrics_file or null;

  # The same sandbox as deploy/systemd/vmsync.service; the reasons for each
  # line are given there.
  hardening = {
    StateDirectory = "vmsync";
    StateDirectoryMode = "0700";
    UMask = "0022";
    NoNewPrivileges = true;
    CapabilityBoundingSet = [
      "CAP_DAC_OVERRIDE"
      "CAP_DAC_READ_SEARCH"
    ];
    ProtectSystem = "strict";
    # Every disk root, a non-default state dir and the metrics file's
    # directory: "-" skips a path that does not exist yet.
    ReadWritePaths =
      map (p: "-${p}") diskRoots
      ++ lib.optional (stateDir != "/var/lib/vmsync") stateDir
      ++ lib.optional (metricsFile != null) "-${dirOf metricsFile}";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    PrivateMounts = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    RestrictRealtime = true;
    RestrictNamespaces = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    SystemCallErrorNumber = "EPERM";
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
      "AF_NETLINK"
    ];
  };

  commonService = {
    after = [
      "libvirtd.service"
      "network-online.target"
    ];
    requires = [ "libvirtd.service" ];
    wants = [ "network-online.target" ];
    # qemu-img creates the disk images.
    path = [ config.virtualisation.libvirtd.qemu.package ];
    # libgit2 checks ssh host keys against $HOME/.ssh/known_hosts.
    environment.HOME = stateDir;
  };
in
{
  options.services.vmsync = {
    enable = lib.mkEnableOption "vmsync, the git-ops pull agent that syncs this host's libvirt domains with a git repository";

    package = lib.mkOption {
      type = lib.types.package;
      description = ''
        The vmsync package. nixpkgs has none yet: build it from the vmsync
        repository, e.g. `pkgs.callPackage ./deploy/nixos/package.nix { }`.
      '';
      example = lib.literalExpression "pkgs.callPackage /path/to/vmsync/deploy/nixos/package.nix { }";
    };

    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      description = ''
        Contents of /etc/vmsync/config.toml: sections `source` (url, branch,
        ssh_key, token_file), `libvirt` (uri), `agent` (state_dir, host,
        schedule, jitter_seconds, max_attempts, backoff_max_seconds,
        metrics_file) and `policy` (disk_roots). `source.url` is required;
        vmsync rejects unknown keys. Every entry of `policy.disk_roots`, the
        state directory and the metrics file's directory are made writable in
        the service's sandbox. Put the git server's ssh host key in
        `<state_dir>/.ssh/known_hosts` (default /var/lib/vmsync/.ssh/known_hosts).
      '';
      example = lib.literalExpression ''
        {
          # The team's VM repository: vmsync.toml plus one domain XML per VM,
          # e.g. a UEFI + Secure Boot + TPM 2.0 guest:
          #   [[vm]]
          #   name = "uefi-tpm"
          #   xml = "vms/uefi-tpm.xml"
          #   autostart = true
          #     [[vm.disk]]
          #     path = "/var/lib/libvirt/images/uefi-tpm.qcow2"
          #     size = "20G"
          #     format = "qcow2"
          source = {
            url = "ssh://git@git.example.org/infra/vms.git";
            branch = "main";
            ssh_key = "/etc/vmsync/deploy_key";
          };
          libvirt.uri = "qemu:///system";
          agent.schedule = "0 */5 * * * *";
          policy.disk_roots = [ "/var/lib/libvirt/images" ];
        }
      '';
    };

    mode = lib.mkOption {
      type = lib.types.enum [
        "timer"
        "daemon"
      ];
      default = "timer";
      description = ''
        How vmsync runs. `timer`: `vmsync --once` from vmsync.service,
        started by vmsync.timer every `interval`. `daemon`: vmsync-agent.service
        (`vmsync`, Type=notify) syncs on `settings.agent.schedule`; a NixOS
        switch that changes the settings reloads it (SIGHUP).
      '';
    };

    knownHosts = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "git.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA..." ];
      description = ''
        known_hosts lines for the git server (`[host]:port ...` for a
        non-default port). libgit2 reads only `$HOME/.ssh/known_hosts`, not
        /etc/ssh/ssh_known_hosts, so `programs.ssh.knownHosts` does not reach
        vmsync. When non-empty, `<state_dir>/.ssh/known_hosts` becomes a link
        to these lines; when empty, that file is left alone (manage it by hand).
      '';
    };

    interval = lib.mkOption {
      type = lib.types.str;
      default = "5min";
      example = "15min";
      description = ''
        Timer mode: time between the start of one sync and the next
        (OnUnitActiveSec=, systemd.time(7) syntax).
      '';
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = (cfg.settings.source.url or null) != null;
            message = "services.vmsync.settings.source.url must be set (the VM git repository).";
          }
        ];

        # vmsync talks to libvirtd (qemu:///system); it is not optional.
        virtualisation.libvirtd.enable = true;
        # UEFI + TPM guests (the common case) need swtpm.
        virtualisation.libvirtd.qemu.swtpm.enable = lib.mkDefault true;

        environment.etc."vmsync/config.toml".source = configFile;
        environment.systemPackages = [ cfg.package ];

        systemd.tmpfiles.rules = lib.mkIf (cfg.knownHosts != [ ]) [
          "d ${stateDir} 0700 root root -"
          "d ${stateDir}/.ssh 0700 root root -"
          "L+ ${stateDir}/.ssh/known_hosts - - - - ${
            pkgs.writeText "vmsync-known_hosts" (lib.concatLines cfg.knownHosts)
          }"
        ];
      }

      (lib.mkIf (cfg.mode == "timer") {
        systemd.services.vmsync = commonService // {
          description = "vmsync: sync libvirt domains with the VM git repository (one run)";
          # Every run reads /etc/vmsync/config.toml afresh: no restart trigger.
          serviceConfig = hardening // {
            Type = "oneshot";
            ExecStart = "${lib.getExe' cfg.package "vmsync"} --once";
            # 75: another vmsync holds the lock; not a failure.
            SuccessExitStatus = [ 75 ];
            TimeoutStartSec = "15min";
          };
        };
        systemd.timers.vmsync = {
          description = "vmsync: sync libvirt domains with the VM git repository every ${cfg.interval}";
          wantedBy = [ "timers.target" ];
          timerConfig = {
            OnBootSec = "1min";
            OnUnitActiveSec = cfg.interval;
            RandomizedDelaySec = "30s";
            Unit = "vmsync.service";
          };
        };
      })

      (lib.mkIf (cfg.mode == "daemon") {
        systemd.services.vmsync-agent = commonService // {
          description = "vmsync: sync libvirt domains with the VM git repository (daemon)";
          wantedBy = [ "multi-user.target" ];
          # A changed config.toml is picked up with SIGHUP, no restart.
          reloadTriggers = [ configFile ];
          serviceConfig = hardening // {
            Type = "notify";
            ExecStart = lib.getExe' cfg.package "vmsync";
            ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
            Restart = "on-failure";
            RestartSec = "10s";
            RestartPreventExitStatus = [ 2 ];
          };
        };
      })
    ]
  );
}
