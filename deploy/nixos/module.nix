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
  inherit (lib) mkOption types;
  settingsFormat = pkgs.formats.toml { };

  # Paths vmsync and systemd read: absolute, one "/" between components, no "." or ".."
  # component (vmsync refuses those in disk roots), no trailing "/". A string, not a Nix
  # path: a Nix path would be copied into the world-readable store (deploy keys!).
  absolutePath =
    types.addCheck types.str (
      p: builtins.match "/|(/([^/.][^/]*|\\.[^/.][^/]*|\\.\\.[^/]+))+" p != null
    )
    // {
      name = "absolutePath";
      description = "absolute path (a string, without trailing \"/\", \".\" or \"..\")";
    };

  # One key of /etc/vmsync/config.toml. `null` leaves the key out of the file (TOML has
  # no null) and vmsync uses its own default.
  key =
    type: default: description:
    mkOption { inherit type default description; };

  # A `[section]` of the file: only the keys vmsync knows. vmsync refuses unknown keys
  # (serde deny_unknown_fields in every section and at the top), so there is no
  # freeformType: a misspelt key is an evaluation error here, not a failed unit there.
  section =
    description: options:
    mkOption {
      inherit description;
      default = { };
      type = types.submodule { inherit options; };
    };

  settingsOptions = {
    source = section "`[source]`: the VM repository." {
      url = key (types.nullOr types.nonEmptyStr) null ''
        The git repository holding vmsync.toml and the domain XMLs: `ssh://`,
        `https://`, `file://` or a local path. Required (flag `--url`).
      '';
      branch = key types.nonEmptyStr "main" "Branch to follow (flag `--branch`).";
      ssh_key = key (types.nullOr absolutePath) null ''
        Private key for `ssh://` URLs (flag `--ssh-key`); null: ssh-agent. Keep it out of
        the Nix store, e.g. /etc/vmsync/deploy_key, mode 0600.
      '';
      token_file = key (types.nullOr absolutePath) null ''
        File holding an access token for `https://` URLs (flag `--token-file`).
      '';
      probe_url = key (types.nullOr types.nonEmptyStr) null ''
        Change probe (flag `--probe-url`): an http(s) URL of the repository's
        `info/refs`, asked with a conditional GET before each fetch; the fetch is
        skipped while it names the tip already fetched. Never trusted for what is applied.
      '';
      probe_max_skip = key (types.nullOr types.nonEmptyStr) null ''
        With probe_url: a real fetch at least this often, whatever the probe says
        (e.g. "30m"); null: vmsync's default, "1h".
      '';
    };
    libvirt = section "`[libvirt]`: the hypervisor connection." {
      uri = key types.nonEmptyStr "qemu:///system" "libvirt connection URI (flag `--connect`).";
    };
    agent = section "`[agent]`: the agent's own state and schedule." {
      state_dir = key absolutePath "/var/lib/vmsync" ''
        Clone, state file and lock (flag `--state-dir`); also the service's HOME, so
        libgit2 reads `<state_dir>/.ssh/known_hosts`. Below /var/lib it is the unit's
        StateDirectory=; elsewhere a tmpfiles rule creates it (0700 root) and the
        sandbox opens it.
      '';
      host = key (types.nullOr types.nonEmptyStr) null ''
        Name matched against a VM's `hosts` in vmsync.toml (flag `--host`); null: the
        hostname.
      '';
      schedule = key types.nonEmptyStr "0 */5 * * * *" ''
        Daemon mode: when to sync, cron with seconds (`sec min hour dom month dow
        [year]`). Checked when the configuration is built (see `checkConfig`).
      '';
      jitter_seconds = key types.ints.unsigned 30 ''
        Daemon mode: each tick waits a per-host delay in 0..jitter_seconds.
      '';
      max_attempts = key (types.ints.between 1 4294967295) 5 ''
        Daemon mode: a commit that failed this many syncs in a row is not retried until a
        newer one arrives.
      '';
      backoff_max_seconds = key types.ints.unsigned 3600 ''
        Daemon mode: cap of the retry backoff (10 s, 20 s, 40 s, ...).
      '';
      metrics_file = key (types.nullOr absolutePath) null ''
        Prometheus textfile written after every sync, e.g.
        /var/lib/prometheus/node-exporter/vmsync.prom; its directory is opened in the
        sandbox. null: no metrics.
      '';
      tick_timeout = key (types.nullOr types.nonEmptyStr) null ''
        Daemon mode: a sync running longer than this (a hung libvirt call or fetch) stops
        the systemd watchdog's pings, and systemd restarts the daemon (option
        `watchdogSec`); null: vmsync's default, "1h".
      '';
    };
    policy = section "`[policy]`: what a commit may do on this host." {
      disk_roots = key (types.listOf absolutePath) [ "/var/lib/libvirt/images" ] ''
        Disks and directories in vmsync.toml must live below one of these (flag
        `--disk-root`). Each is opened in the service's sandbox.
      '';
      self_heal = key types.bool true ''
        Put drifted domains back to the commit; false only reports drift (flag
        `--self-heal`).
      '';
      prune = key types.bool false ''
        Shut down and undefine (keeping NVRAM, TPM state and disks) domains this agent
        applied that left the manifest (flag `--prune`).
      '';
      max_prune = key types.ints.unsigned 5 ''
        Refuse a commit pruning more domains than this, or all of them, unless `vmsync
        --once --allow-mass-prune` (flag `--max-prune`).
      '';
      shutdown_timeout = key types.nonEmptyStr "120s" ''
        Graceful shutdown timeout before a destroy, e.g. "120s" or "2m" (flag
        `--shutdown-timeout`).
      '';
      allowed_paths = key (types.listOf absolutePath) [ ] ''
        Host paths domain XML may name besides the disk roots (ISOs, serial log files,
        kernels). Firmware under /usr/share is always allowed.
      '';
      allow_hostdev = key types.bool false "Allow `<hostdev>` and other host device pass-through.";
      allow_block_devices = key types.bool false "Allow host block devices as guest disks.";
      allow_direct_interfaces = key types.bool false "Allow `<interface type='direct'>` (macvtap).";
      allow_qemu_commandline = key types.bool false ''
        Allow `<qemu:commandline>`, a custom `<emulator>` and interface scripts:
        programs run on the host.
      '';
      allow_unconfined = key types.bool false ''
        Allow `<seclabel type='none'>`, a static `<seclabel>` or a `<baselabel>` (no or
        a chosen sVirt confinement).
      '';
      health_commands = key (types.listOf absolutePath) [ ] ''
        Programs, or directories of them, a `[vm.health] command` may run (as root,
        without a shell; symlinks resolved). Empty: every check command is refused.
      '';
      allow_link_local_hosts = key types.bool false ''
        Allow network disks and pools on link-local or cloud metadata addresses
        (169.254.0.0/16, fe80::/10, metadata.google.internal …).
      '';
      allow_open_listeners = key types.bool false ''
        Allow listeners on host addresses other than loopback without a password: VNC
        or SPICE consoles, TCP/UDP character devices in bind mode, server/mcast/udp
        interfaces, passt port forwards.
      '';
      image_urls = key (types.listOf types.nonEmptyStr) [ "https://" ] ''
        URL prefixes `[[image]]` entries may be downloaded from (redirects too); an
        entry ending in the host (`http://127.0.0.1`) allows that host on any port.
      '';
      image_dir = key absolutePath "/var/lib/libvirt/images/vmsync-images" ''
        Where downloaded base images are kept, one read-only file per sha256; opened
        in the sandbox when it is not below a disk root.
      '';
      image_timeout = key types.nonEmptyStr "60s" ''
        A base image download that receives nothing for this long fails.
      '';
      seed_dir = key (types.nullOr absolutePath) null ''
        Where vmsync writes the VMs' cloud-init seed images (`[vm.cloud_init]`); it is
        opened in the sandbox. null: vmsync's default,
        /var/lib/libvirt/images/vmsync-seeds.
      '';
    };
    secrets = section "`[secrets]`: decrypting the repository's `.age` files." {
      identity = key (types.nullOr absolutePath) null ''
        The private key that decrypts secrets: an SSH ed25519 or RSA key without a
        passphrase, or an age identity file. null: vmsync's default,
        /etc/ssh/ssh_host_ed25519_key (the host key, as agenix uses it).
      '';
    };
    trust = section "`[trust]`: which commits are applied." {
      allowed_signers = key (types.nullOr absolutePath) null ''
        Apply only commits with a valid SSH signature (namespace "git") by a key in this
        file, in git's gpg.ssh.allowedSignersFile format (flag `--allowed-signers`);
        null: signatures are not checked. A file outside the store is checked when the
        service starts; one in the store (`"''${pkgs.writeText "allowed_signers" "..."}"`)
        also when the configuration is built.
      '';
    };
    webhook = section "`[webhook]`: push-triggered syncs (daemon mode)." {
      listen = key (types.nullOr types.nonEmptyStr) null ''
        Address and port of the webhook listener, e.g. "127.0.0.1:9870": `POST
        /hooks/push` from GitHub, Gitea/Forgejo or GitLab syncs now; `GET /healthz` and
        `GET /metrics` beside it. null (the default): no listener. Needs `mode =
        "daemon"` and `secret_file`. The firewall is not opened: put a reverse proxy with
        TLS in front (see SECURITY.md), or open the port yourself.
      '';
      secret_file = key (types.nullOr absolutePath) null ''
        File holding the webhook's shared secret (its trailing newline is not part of
        it), e.g. /etc/vmsync/webhook-secret, mode 0600. Keep it out of the Nix store:
        the daemon reads it at start and on reload, the build never does.
      '';
    };
    notify = mkOption {
      description = ''
        `[[notify]]`: where events go (see docs/notifications.md). Each entry: kind
        (webhook, commit-status, command), url, secret_file, forge, api_url, repository,
        token_file, target_url, command, events, timeout.
      '';
      default = [ ];
      type = types.listOf (types.submodule { options = notifyOptions; });
    };
  };

  # One `[[notify]]` table; vmsync checks which keys go with which kind.
  notifyOptions = {
    kind = key (types.enum [
      "webhook"
      "commit-status"
      "command"
    ]) "webhook" "What the entry is: a signed JSON POST, a forge commit status, or a program.";
    url = key (types.nullOr types.nonEmptyStr) null "webhook: the URL events are POSTed to.";
    secret_file = key (types.nullOr absolutePath) null ''
      webhook: file holding the HMAC-SHA256 key of the `X-Vmsync-Signature-256` header
      (trailing newline not part of it); null: unsigned. Keep it out of the Nix store.
    '';
    forge = key (types.nullOr (
      types.enum [
        "github"
        "gitea"
        "forgejo"
        "gitlab"
      ]
    )) null "commit-status: the forge's API.";
    api_url = key (types.nullOr types.nonEmptyStr) null ''
      commit-status: the API's base URL (GitHub: https://api.github.com, GitLab:
      https://gitlab.com/api/v4 by default; Gitea/Forgejo: required, e.g.
      https://git.example.org/api/v1).
    '';
    repository = key (types.nullOr types.nonEmptyStr) null ''
      commit-status: "owner/name" (GitLab: the project path or id) of the VM repository.
    '';
    token_file = key (types.nullOr absolutePath) null ''
      commit-status: file holding an API token allowed to set commit statuses. Keep it out
      of the Nix store.
    '';
    target_url = key (types.nullOr types.nonEmptyStr) null "commit-status: a link the status carries (a dashboard).";
    command = key (types.nullOr (types.listOf types.str)) null ''
      command: program (absolute path) and arguments, run without a shell, the event JSON
      on its stdin.
    '';
    events = key (types.nullOr (types.listOf types.nonEmptyStr)) null ''
      Which events the entry gets (applying, applied, recovered, failed, reverted,
      invalid, refused, untrusted, fetch-failed, suspended); null: all.
    '';
    timeout = key (types.nullOr types.nonEmptyStr) null "One request or run's time limit; null: \"10s\".";
  };
  notifyEntries = cfg.settings.notify;
  secretsInStore = builtins.filter (f: f != null && lib.hasPrefix "${builtins.storeDir}/" f) (
    map (n: n.secret_file) notifyEntries ++ map (n: n.token_file) notifyEntries
  );

  # The file without the keys left at null (vmsync's own default applies).
  settingsFile = settingsFormat.generate "vmsync-config.toml" (
    lib.filterAttrsRecursive (_: v: v != null) (removeAttrs cfg.settings [ "notify" ])
    // lib.optionalAttrs (notifyEntries != [ ]) {
      notify = map (lib.filterAttrs (_: v: v != null)) notifyEntries;
    }
  );
  # The package reads the file as the service will: `vmsync validate` loads the config
  # (unknown keys, cron schedule, disk roots, empty host, ...) before it checks an empty
  # VM repository. The allowed-signers file is read too when it is in the store; a host
  # file is not there at build time, so an empty one stands in for it.
  signers = cfg.settings.trust.allowed_signers;
  signersInStore = signers != null && lib.hasPrefix "${builtins.storeDir}/" signers;
  configFile =
    if cfg.checkConfig then
      pkgs.runCommand "vmsync-config.toml"
        {
          nativeBuildInputs = [ cfg.package ];
          unchecked = settingsFile;
          preferLocalBuild = true;
        }
        ''
          mkdir repo
          echo 'version = 1' > repo/vmsync.toml
          : > allowed_signers
          vmsync --config "$unchecked" ${
            lib.optionalString (!signersInStore) "--allowed-signers allowed_signers"
          } validate repo > /dev/null
          cp "$unchecked" "$out"
        ''
    else
      settingsFile;

  stateDir = cfg.settings.agent.state_dir;
  # StateDirectory= takes a path below /var/lib: systemd creates it and opens it in the
  # sandbox. Anywhere else the tmpfiles rule below creates it.
  stateDirectory =
    if lib.hasPrefix "/var/lib/" stateDir then lib.removePrefix "/var/lib/" stateDir else null;
  inherit (cfg.settings.policy) disk_roots;
  metricsFile = cfg.settings.agent.metrics_file;
  seedDir = cfg.settings.policy.seed_dir;
  imageDir = cfg.settings.policy.image_dir;

  # The same sandbox as deploy/systemd/vmsync.service; the reasons for each
  # line are given there.
  hardening =
    lib.optionalAttrs (stateDirectory != null) {
      StateDirectory = stateDirectory;
      StateDirectoryMode = "0700";
    }
    // {
      UMask = "0022";
      NoNewPrivileges = true;
      CapabilityBoundingSet = [
        "CAP_DAC_OVERRIDE"
        "CAP_DAC_READ_SEARCH"
      ];
      ProtectSystem = "strict";
      # Every disk root, a state dir outside /var/lib and the metrics file's directory.
      # "-": a path missing when the unit starts is skipped instead of failing it with
      # 226/NAMESPACE (vmsync then reports the read-only path itself).
      ReadWritePaths =
        map (p: "-${p}") disk_roots
        ++ lib.optional (stateDirectory == null) "-${stateDir}"
        ++ lib.optional (metricsFile != null) "-${dirOf metricsFile}"
        ++ lib.optional (seedDir != null) "-${seedDir}"
        # The base image directory, when it is not below a disk root already.
        ++ lib.optional (!lib.any (r: lib.hasPrefix "${r}/" "${imageDir}/") disk_roots) "-${imageDir}";
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

    package = mkOption {
      type = types.package;
      description = ''
        The vmsync package. nixpkgs has none yet: build it from the vmsync
        repository, e.g. `pkgs.callPackage ./deploy/nixos/package.nix { }`.
      '';
      example = lib.literalExpression "pkgs.callPackage /path/to/vmsync/deploy/nixos/package.nix { }";
    };

    settings = mkOption {
      type = types.submodule { options = settingsOptions; };
      default = { };
      description = ''
        Contents of /etc/vmsync/config.toml (see deploy/config.toml in the vmsync
        repository), one option per key, in the sections `source` (url, branch,
        ssh_key, token_file, probe_url, probe_max_skip), `libvirt` (uri), `agent` (state_dir, host, schedule,
        jitter_seconds, max_attempts, backoff_max_seconds, metrics_file, tick_timeout), `policy`
        (disk_roots, self_heal, prune, max_prune, shutdown_timeout, allowed_paths,
        allow_hostdev, allow_block_devices, allow_direct_interfaces,
        allow_qemu_commandline, allow_unconfined, health_commands,
        allow_link_local_hosts, allow_open_listeners, image_urls, image_dir,
        image_timeout, seed_dir), `secrets` (identity), `trust` (allowed_signers),
        `webhook` (listen, secret_file; daemon mode, off by default) and `notify` (a list
        of `[[notify]]` entries: kind, url, secret_file, forge, api_url, repository,
        token_file, target_url, command, events, timeout).
        `source.url` is required. A value of the wrong type or an unknown key is an
        evaluation error, as vmsync itself refuses unknown keys. Every entry of
        `policy.disk_roots`, the state directory and the metrics file's directory are
        made writable in the service's sandbox. Put the git server's ssh host key in
        `<state_dir>/.ssh/known_hosts` (option `knownHosts`).
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
          trust.allowed_signers = "/etc/vmsync/allowed_signers";
        }
      '';
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Check /etc/vmsync/config.toml when the system is built: the package's
        `vmsync validate` reads it with an empty VM repository, so a bad cron
        `schedule` or `shutdown_timeout` fails `nixos-rebuild` instead of the service.
        The check runs the package's binary on the build machine: turn it off when
        cross-compiling.
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

    watchdogSec = lib.mkOption {
      type = lib.types.nonEmptyStr;
      default = "60s";
      description = ''
        Daemon mode: the unit's WatchdogSec=. The daemon pings every half of it, while it
        is between syncs or in a sync younger than `settings.agent.tick_timeout`; without
        pings systemd kills and restarts it.
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

    orderedShutdown = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        At host shutdown, before libvirtd stops, `vmsync shutdown` stops the VMs vmsync
        manages in reverse dependency order (`depends_on` in the VM repository), each
        gracefully within its `shutdown_timeout` (unit vmsync-shutdown.service, both
        modes). It replaces libvirt-guests for these VMs: with every VM managed by
        vmsync, also set `virtualisation.libvirtd.onShutdown = "shutdown"` or turn
        libvirt-guests off, so that it does not suspend them first.
      '';
    };

    shutdownTimeoutSec = lib.mkOption {
      type = lib.types.nonEmptyStr;
      default = "30min";
      description = ''
        vmsync-shutdown.service's TimeoutStopSec=: the longest chain of shutdown timeouts
        (one per wave of the dependency graph, 120s per VM by default) must fit in it.
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
          {
            assertion = (cfg.settings.webhook.listen == null) == (cfg.settings.webhook.secret_file == null);
            message = "services.vmsync.settings.webhook: set both listen and secret_file, or neither.";
          }
          {
            assertion = cfg.settings.webhook.listen == null || cfg.mode == "daemon";
            message = "services.vmsync.settings.webhook.listen needs services.vmsync.mode = \"daemon\" (the timer's one-shot runs serve no webhook).";
          }
        ];
        warnings =
          map (
            f:
            "services.vmsync.settings.notify: ${f} is in the Nix store, which every local user can read: keep secrets and tokens in root-only files such as /etc/vmsync/notify-secret."
          ) secretsInStore
          ++ lib.optional
            (
              cfg.settings.webhook.secret_file != null
              && lib.hasPrefix "${builtins.storeDir}/" cfg.settings.webhook.secret_file
            )
            "services.vmsync.settings.webhook.secret_file is in the Nix store, which every local user can read: keep the secret in a root-only file such as /etc/vmsync/webhook-secret.";

        # vmsync talks to libvirtd (qemu:///system); it is not optional.
        virtualisation.libvirtd.enable = true;
        # libvirtd's module asserts polkit (its socket authorizes through it); a headless
        # host would otherwise fail `nixos-rebuild` on "requires Polkit to be enabled".
        security.polkit.enable = lib.mkDefault true;
        # UEFI + TPM guests (the common case) need swtpm.
        virtualisation.libvirtd.qemu.swtpm.enable = lib.mkDefault true;

        environment.etc."vmsync/config.toml".source = configFile;
        environment.systemPackages = [ cfg.package ];

        # The state directory exists before the service starts, wherever it is (below
        # /var/lib StateDirectory= would create it too, but not before .ssh below).
        systemd.tmpfiles.rules = [
          "d ${stateDir} 0700 root root -"
        ]
        ++ lib.optionals (cfg.knownHosts != [ ]) [
          "d ${stateDir}/.ssh 0700 root root -"
          "L+ ${stateDir}/.ssh/known_hosts - - - - ${
            pkgs.writeText "vmsync-known_hosts" (lib.concatLines cfg.knownHosts)
          }"
        ];
      }

      (lib.mkIf cfg.orderedShutdown {
        # Starting it does nothing; its stop (at shutdown) runs `vmsync shutdown`. It is
        # stopped before libvirtd and libvirt-guests (After=) and after the sync units.
        systemd.services.vmsync-shutdown = {
          description = "vmsync: shut managed VMs down in reverse dependency order at host shutdown";
          wantedBy = [ "multi-user.target" ];
          after = [
            "libvirtd.service"
            "libvirt-guests.service"
            "network-online.target"
          ];
          before = [
            "vmsync.service"
            "vmsync-agent.service"
          ];
          requires = [ "libvirtd.service" ];
          environment.HOME = stateDir;
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = "${pkgs.coreutils}/bin/true";
            ExecStop = "${lib.getExe' cfg.package "vmsync"} shutdown";
            TimeoutStopSec = cfg.shutdownTimeoutSec;
            NoNewPrivileges = true;
            ProtectSystem = "strict";
            ProtectHome = true;
            PrivateTmp = true;
          };
        };
      })

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
            # At boot, as soon as libvirtd and the network are up (the service's After=):
            # the first sync starts the VMs of a dependency graph in order.
            OnBootSec = "1s";
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
            # The daemon pings while its loop makes progress (settings.agent.tick_timeout).
            WatchdogSec = cfg.watchdogSec;
          };
        };
      })
    ]
  );
}
