# The NixOS modules deploy/nixos/module.nix meets on a host, reduced to the options it and
# a host configuration touch, with the types and behaviour of nixpkgs' modules
# (written from nixpkgs' nixos/modules/misc/assertions.nix, system/etc/etc.nix,
# system/boot/systemd.nix with nixos/lib/systemd-unit-options.nix, system/boot/
# systemd/tmpfiles.nix, security/polkit.nix and virtualisation/libvirtd.nix):
#
# - `assertions` / `warnings`: checked by eval.nix the way NixOS' top-level does;
# - `security.polkit.enable` defaults to false (mkEnableOption), and
#   `virtualisation.libvirtd` asserts it ("The libvirtd module currently requires Polkit
#   to be enabled");
# - systemd units: the unit options and their types, list-valued directives concatenated
#   across definitions, `Type=`/`Restart=` values checked, the default PATH packages, and
#   each unit rendered to its text as systemd.nix does;
# - `systemd.tmpfiles.rules`, `environment.etc`, `environment.systemPackages`, `users`.
{ lib, pkgs }:
let
  inherit (lib) mkOption mkIf mkMerge types;

  # nixos/lib/systemd-unit-options.nix: a directive's definitions are either all lists
  # (concatenated: ReadWritePaths from two modules add up) or all single values (equal).
  unitOption = types.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = (lib.filterOverrides' defs).values;
      in
      if builtins.isList (builtins.head defs').value then
        lib.concatMap (
          def:
          if builtins.isList def.value then
            def.value
          else
            throw "The definitions for systemd unit options should be either all lists, representing repeatable options, or all non-lists, but for the option ${lib.showOption loc}, the definitions are a mix of list and non-list${lib.showDefs defs'}"
        ) defs'
      else
        lib.mergeEqualOption loc defs';
  };
  unitNames = types.listOf types.str;
  checkService =
    cfg:
    let
      oneOf = key: allowed: !(cfg ? ${key}) || builtins.elem cfg.${key} allowed;
    in
    oneOf "Type" [ "exec" "simple" "forking" "oneshot" "dbus" "notify" "notify-reload" "idle" ]
    && oneOf "Restart" [ "no" "on-success" "on-failure" "on-abnormal" "on-abort" "on-watchdog" "always" ];

  commonUnitOptions =
    { name, config, ... }:
    {
      options = {
        enable = mkOption {
          type = types.bool;
          default = true;
        };
        description = mkOption {
          type = types.singleLineStr;
          default = "";
        };
        documentation = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        requires = mkOption {
          type = unitNames;
          default = [ ];
        };
        wants = mkOption {
          type = unitNames;
          default = [ ];
        };
        after = mkOption {
          type = unitNames;
          default = [ ];
        };
        before = mkOption {
          type = unitNames;
          default = [ ];
        };
        bindsTo = mkOption {
          type = unitNames;
          default = [ ];
        };
        partOf = mkOption {
          type = unitNames;
          default = [ ];
        };
        conflicts = mkOption {
          type = unitNames;
          default = [ ];
        };
        wantedBy = mkOption {
          type = unitNames;
          default = [ ];
        };
        requiredBy = mkOption {
          type = unitNames;
          default = [ ];
        };
        onFailure = mkOption {
          type = unitNames;
          default = [ ];
        };
        unitConfig = mkOption {
          type = types.attrsOf unitOption;
          default = { };
        };
        restartTriggers = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        reloadTriggers = mkOption {
          type = types.listOf unitOption;
          default = [ ];
        };
      };
      config.unitConfig = lib.filterAttrs (_: v: v != "") {
        Requires = toString config.requires;
        Wants = toString config.wants;
        After = toString config.after;
        Before = toString config.before;
        BindsTo = toString config.bindsTo;
        PartOf = toString config.partOf;
        Conflicts = toString config.conflicts;
        OnFailure = toString config.onFailure;
        Description = config.description;
        "X-Restart-Triggers" = toString config.restartTriggers;
        "X-Reload-Triggers" = toString config.reloadTriggers;
      };
    };

  serviceOptions =
    { name, config, ... }:
    {
      options = {
        environment = mkOption {
          type = types.attrsOf (
            types.nullOr (
              types.oneOf [
                types.str
                types.path
                types.package
              ]
            )
          );
          default = { };
        };
        path = mkOption {
          type = types.listOf (
            types.oneOf [
              types.package
              types.str
            ]
          );
          default = [ ];
        };
        serviceConfig = mkOption {
          type = types.addCheck (types.attrsOf unitOption) checkService;
          default = { };
        };
        script = mkOption {
          type = types.lines;
          default = "";
        };
        preStart = mkOption {
          type = types.lines;
          default = "";
        };
        restartIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
        reloadIfChanged = mkOption {
          type = types.bool;
          default = false;
        };
        stopIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
        startAt = mkOption {
          type = types.either types.str (types.listOf types.str);
          default = [ ];
          apply = lib.toList;
        };
      };
      config = mkMerge [
        {
          # systemd.nix: every service gets these on its PATH, before its own `path`.
          path = lib.mkAfter [
            pkgs.coreutils
            pkgs.systemd
          ];
          environment.PATH = "${lib.concatMapStringsSep ":" (p: "${p}/bin") config.path}:${
            lib.concatMapStringsSep ":" (p: "${p}/sbin") config.path
          }";
        }
        (mkIf (config.script != "") {
          serviceConfig.ExecStart = "${pkgs.writeText "${name}-start" config.script}";
        })
        (mkIf (config.preStart != "") {
          serviceConfig.ExecStartPre = [ "${pkgs.writeText "${name}-pre-start" config.preStart}" ];
        })
      ];
    };

  timerOptions = {
    options.timerConfig = mkOption {
      type = types.attrsOf unitOption;
      default = { };
    };
  };
  socketOptions = {
    options.listenStreams = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    options.socketConfig = mkOption {
      type = types.attrsOf unitOption;
      default = { };
    };
  };

  # systemd-lib's attrsToSection: one `Key=value` line per value, lists repeated.
  toOption =
    x:
    if x == true then
      "true"
    else if x == false then
      "false"
    else
      toString x;
  attrsToSection =
    as:
    lib.concatStringsSep "" (
      lib.concatLists (
        lib.mapAttrsToList (name: value: map (x: "${name}=${toOption x}\n") (lib.toList value)) as
      )
    );
  serviceText =
    def:
    "[Unit]\n"
    + attrsToSection def.unitConfig
    + "\n[Service]\n"
    + lib.concatMapStringsSep "" (n: "Environment=\"${n}=${toString def.environment.${n}}\"\n") (
      lib.attrNames (lib.filterAttrs (_: v: v != null) def.environment)
    )
    + lib.optionalString (!def.restartIfChanged) "X-RestartIfChanged=false\n"
    + lib.optionalString (!def.stopIfChanged) "X-StopIfChanged=false\n"
    + attrsToSection def.serviceConfig
    + lib.optionalString (def.wantedBy != [ ]) "\n[Install]\nWantedBy=${toString def.wantedBy}\n";
  timerText =
    def:
    "[Unit]\n"
    + attrsToSection def.unitConfig
    + "\n[Timer]\n"
    + attrsToSection def.timerConfig
    + lib.optionalString (def.wantedBy != [ ]) "\n[Install]\nWantedBy=${toString def.wantedBy}\n";
in
[
  {
    _file = "nixos/modules/misc/assertions.nix";
    options.assertions = mkOption {
      type = types.listOf types.unspecified;
      internal = true;
      default = [ ];
    };
    options.warnings = mkOption {
      type = types.listOf types.str;
      internal = true;
      default = [ ];
    };
  }

  {
    _file = "nixos/modules/misc/nixpkgs.nix";
    config._module.args.pkgs = pkgs;
  }

  (
    { config, ... }:
    {
      _file = "nixos/modules/system/etc/etc.nix";
      options.environment.systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      options.environment.pathsToLink = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      options.environment.etc = mkOption {
        default = { };
        type = types.attrsOf (
          types.submodule (
            { name, config, ... }:
            {
              options = {
                enable = mkOption {
                  type = types.bool;
                  default = true;
                };
                target = mkOption {
                  type = types.str;
                  default = name;
                };
                text = mkOption {
                  type = types.nullOr types.lines;
                  default = null;
                };
                source = mkOption { type = types.path; };
                mode = mkOption {
                  type = types.str;
                  default = "symlink";
                };
                user = mkOption {
                  type = types.str;
                  default = "+0";
                };
                group = mkOption {
                  type = types.str;
                  default = "+0";
                };
              };
              config.source = mkIf (config.text != null) (
                lib.mkDefault (pkgs.writeText "etc-${baseNameOf name}" config.text)
              );
            }
          )
        );
      };
    }
  )

  (
    { config, ... }:
    {
      _file = "nixos/modules/system/boot/systemd.nix";
      options.systemd = {
        package = mkOption {
          type = types.package;
          default = pkgs.systemd;
        };
        packages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        services = mkOption {
          type = types.attrsOf (
            types.submodule [
              commonUnitOptions
              serviceOptions
            ]
          );
          default = { };
        };
        timers = mkOption {
          type = types.attrsOf (
            types.submodule [
              commonUnitOptions
              timerOptions
            ]
          );
          default = { };
        };
        sockets = mkOption {
          type = types.attrsOf (
            types.submodule [
              commonUnitOptions
              socketOptions
            ]
          );
          default = { };
        };
        tmpfiles.rules = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        units = mkOption {
          type = types.attrsOf types.str;
          default = { };
          internal = true;
          description = "The text of each generated unit.";
        };
      };
      config.systemd.units =
        lib.mapAttrs' (n: v: lib.nameValuePair "${n}.service" (serviceText v)) config.systemd.services
        // lib.mapAttrs' (n: v: lib.nameValuePair "${n}.timer" (timerText v)) config.systemd.timers;
    }
  )

  (
    { config, ... }:
    {
      _file = "nixos/modules/config/users-groups.nix";
      options.users.users = mkOption {
        default = { };
        type = types.attrsOf (
          types.submodule {
            options = {
              isNormalUser = mkOption {
                type = types.bool;
                default = false;
              };
              isSystemUser = mkOption {
                type = types.bool;
                default = false;
              };
              extraGroups = mkOption {
                type = types.listOf types.str;
                default = [ ];
              };
              group = mkOption {
                type = types.str;
                default = "";
              };
              description = mkOption {
                type = types.str;
                default = "";
              };
            };
          }
        );
      };
      options.users.groups = mkOption {
        default = { };
        type = types.attrsOf (
          types.submodule {
            options.gid = mkOption {
              type = types.nullOr types.int;
              default = null;
            };
          }
        );
      };
    }
  )

  (
    { config, ... }:
    let
      cfg = config.security.polkit;
    in
    {
      _file = "nixos/modules/security/polkit.nix";
      options.security.polkit = {
        enable = lib.mkEnableOption "polkit";
        extraConfig = mkOption {
          type = types.lines;
          default = "";
        };
        adminIdentities = mkOption {
          type = types.listOf types.str;
          default = [ "unix-group:wheel" ];
        };
      };
      config = mkIf cfg.enable {
        environment.systemPackages = [ pkgs.polkit ];
        systemd.packages = [ pkgs.polkit ];
        environment.etc."polkit-1/rules.d/10-nixos.rules".text = ''
          polkit.addAdminRule(function(action, subject) {
            return [${lib.concatMapStringsSep ", " (i: "\"${i}\"") cfg.adminIdentities}];
          });

          ${cfg.extraConfig}
        '';
        systemd.tmpfiles.rules = [
          "R /var/lib/polkit-1"
          "R /var/lib/PolicyKit"
        ];
        users.users.polkituser = {
          description = "PolKit daemon";
          isSystemUser = true;
          group = "polkituser";
        };
        users.groups.polkituser = { };
      };
    }
  )

  (
    { config, ... }:
    let
      cfg = config.virtualisation.libvirtd;
    in
    {
      _file = "nixos/modules/virtualisation/libvirtd.nix";
      options.virtualisation.libvirtd = {
        enable = mkOption {
          type = types.bool;
          default = false;
        };
        package = mkOption {
          type = types.package;
          default = pkgs.libvirt;
        };
        extraConfig = mkOption {
          type = types.lines;
          default = "";
        };
        extraOptions = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        onBoot = mkOption {
          type = types.enum [
            "start"
            "ignore"
          ];
          default = "start";
        };
        onShutdown = mkOption {
          type = types.enum [
            "shutdown"
            "suspend"
          ];
          default = "suspend";
        };
        qemu = mkOption {
          default = { };
          type = types.submodule {
            options = {
              package = mkOption {
                type = types.package;
                default = pkgs.qemu;
              };
              runAsRoot = mkOption {
                type = types.bool;
                default = true;
              };
              verbatimConfig = mkOption {
                type = types.lines;
                default = "namespaces = []\n";
              };
              swtpm = mkOption {
                default = { };
                type = types.submodule {
                  options.enable = mkOption {
                    type = types.bool;
                    default = false;
                  };
                  options.package = mkOption {
                    type = types.package;
                    default = pkgs.swtpm;
                  };
                };
              };
              ovmf = mkOption {
                default = { };
                type = types.submodule {
                  options.enable = mkOption {
                    type = types.bool;
                    default = true;
                  };
                  options.packages = mkOption {
                    type = types.listOf types.package;
                    default = [ pkgs.OVMF.fd ];
                  };
                };
              };
            };
          };
        };
      };
      config = mkIf cfg.enable {
        assertions = [
          {
            assertion = config.security.polkit.enable;
            message = "The libvirtd module currently requires Polkit to be enabled ('security.polkit.enable = true').";
          }
        ];
        environment.systemPackages = [
          cfg.package
          cfg.qemu.package
        ];
        users.groups.libvirtd.gid = 67;
        systemd.packages = [ cfg.package ];
        systemd.services.libvirtd-config = {
          description = "Libvirt Virtual Machine Management Daemon - configuration";
          script = "cp -f ${pkgs.writeText "qemu.conf" cfg.qemu.verbatimConfig} /var/lib/libvirt/qemu.conf";
          serviceConfig = {
            Type = "oneshot";
            RuntimeDirectoryPreserve = "yes";
            StateDirectory = [
              "libvirt"
              "libvirt/dnsmasq"
            ];
          };
        };
        systemd.services.libvirtd = {
          requires = [ "libvirtd-config.service" ];
          after = [ "libvirtd-config.service" ];
          environment.LIBVIRTD_ARGS = lib.escapeShellArgs ([ "--timeout" "120" ] ++ cfg.extraOptions);
          path = [ cfg.qemu.package ] ++ lib.optional cfg.qemu.swtpm.enable cfg.qemu.swtpm.package;
          serviceConfig = {
            Type = "notify";
            KillMode = "process";
            Restart = "no";
          };
          restartIfChanged = false;
        };
        systemd.sockets.libvirtd.wantedBy = [ "sockets.target" ];
        security.polkit.extraConfig = ''
          polkit.addRule(function(action, subject) {
            if (action.id == "org.libvirt.unix.manage" &&
              subject.isInGroup("libvirtd")) {
              return polkit.Result.YES;
            }
          });
        '';
      };
    }
  )
]
