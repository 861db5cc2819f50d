# A stand-in for the parts of nixpkgs' `pkgs` that deploy/nixos/ and tests/nixos/nixos.nix
# use. Nothing is built: a "derivation" is an attrset with `type = "derivation"` and an
# `outPath` in the store directory whose hash depends on its name and inputs, so a changed
# input gives a changed path (what reloadTriggers rely on). Each keeps what the tests read:
# `text` for writeText, `script` and `env` for runCommand, `value` for formats.toml.
{ lib }:
let
  drv =
    name: inputs:
    {
      type = "derivation";
      inherit name;
      outPath = "${builtins.storeDir}/${
        builtins.substring 0 32 (builtins.hashString "sha256" (name + builtins.toJSON inputs))
      }-${name}";
    };
  pkg =
    pname: version:
    drv "${pname}-${version}" { }
    // {
      inherit pname version;
      meta.mainProgram = pname;
    };

  # nixpkgs' pkgs/pkgs-lib/formats.nix: the TOML value type has no null (remarshal's
  # json2toml cannot write one). Generating a value with a null is a build failure there;
  # here it is an evaluation error naming the key.
  tomlValue =
    let
      valueType =
        lib.types.oneOf [
          lib.types.bool
          lib.types.int
          lib.types.float
          lib.types.str
          lib.types.path
          (lib.types.attrsOf valueType)
          (lib.types.listOf valueType)
        ]
        // {
          description = "TOML value";
        };
    in
    valueType;
  noNulls =
    path: v:
    if v == null then
      throw "json2toml: ${builtins.concatStringsSep "." path} is null, which TOML cannot represent"
    else if builtins.isAttrs v then
      builtins.mapAttrs (n: noNulls (path ++ [ n ])) v
    else if builtins.isList v then
      map (noNulls path) v
    else
      v;
in
rec {
  formats.toml =
    { }:
    {
      type = tomlValue;
      generate =
        name: value:
        let
          checked = noNulls [ ] value;
        in
        builtins.deepSeq checked (drv name { value = checked; }) // { value = checked; };
    };

  writeText = name: text: drv name { inherit text; } // { inherit text; };

  # runCommand NAME ENV SCRIPT: the script runs with ENV's attributes as environment
  # variables and the binaries of ENV.nativeBuildInputs on PATH, in a writable temporary
  # directory, and must create $out.
  runCommand =
    name: env: script:
    drv name {
      inherit script;
      env = builtins.removeAttrs env [ "nativeBuildInputs" ];
      inputs = map toString (env.nativeBuildInputs or [ ]);
    }
    // {
      inherit env script;
    };

  coreutils = pkg "coreutils" "9.5";
  qemu = pkg "qemu" "9.2.0";
  swtpm = pkg "swtpm" "0.10.0";
  libvirt = pkg "libvirt" "10.10.0";
  polkit = pkg "polkit" "125";
  systemd = pkg "systemd" "257";
  OVMF = pkg "OVMF" "202411" // {
    fd = pkg "OVMF-fd" "202411";
  };
  pkg-config = pkg "pkg-config" "0.29.2";
  openssl = pkg "openssl" "3.3.2";
  zlib = pkg "zlib" "1.3.1";
  libxml2 = pkg "libxml2" "2.13.4";
  installShellFiles = drv "install-shell-files" { };

  # Keeps what tests/nixos/flake-outputs.nix reads: the inputs, the environment and the
  # install script.
  rustPlatform.buildRustPackage =
    {
      pname,
      version,
      src,
      cargoLock,
      meta ? { },
      ...
    }@args:
    drv "${pname}-${version}" {
      inherit pname version;
      lock = toString cargoLock.lockFile;
      env = args.env or { };
    }
    // {
      inherit pname version meta;
    }
    // builtins.intersectAttrs {
      env = null;
      buildInputs = null;
      nativeBuildInputs = null;
      postInstall = null;
    } args;

  # Calls a package function with the arguments it names, from this set (and `lib`).
  callPackage =
    fn: overrides:
    let
      f = if builtins.isFunction fn then fn else import fn;
      available = pkgsSet // { inherit lib; };
    in
    f (builtins.intersectAttrs (builtins.functionArgs f) available // overrides);
  pkgsSet = {
    inherit
      coreutils
      qemu
      swtpm
      libvirt
      polkit
      systemd
      OVMF
      pkg-config
      openssl
      zlib
      libxml2
      installShellFiles
      rustPlatform
      writeText
      runCommand
      formats
      callPackage
      ;
  };
}
