# A small stand-in for nixpkgs' `lib`, for tests/deploy_files.rs: nixpkgs itself cannot be
# fetched where the tests run. It follows the behaviour of nixpkgs' lib/modules.nix,
# lib/types.nix and lib/options.nix (written from their documented behaviour, not copied):
#
# - option declarations (`mkOption`, unknown arguments refused), types whose `check`
#   refuses a value of the wrong type, with nixpkgs' error texts
#   ("A definition for option `a.b' is not of type `string'", "The option `a.b' does not
#   exist", "The option `a.b' is used but not defined");
# - properties: `mkIf` (pushed down into attributes, conditions evaluated lazily),
#   `mkMerge`, `mkOverride` and its priorities (`mkForce` 50, plain 100, `mkDefault` 1000,
#   option defaults 1500), `mkOrder`;
# - submodules, `freeformType`, `_module.args` (so `{ pkgs, ... }:` modules get `pkgs`),
#   `imports` (paths and anonymous modules, deduplicated by key).
#
# Only the functions the module, package and the stub NixOS modules use are here; each
# has the name and meaning it has in nixpkgs, so a module that evaluates here and uses a
# function nixpkgs lacks fails with "attribute missing" instead of passing.
let
  inherit (builtins)
    addErrorContext
    all
    any
    attrNames
    attrValues
    concatLists
    concatMap
    concatStringsSep
    elem
    elemAt
    filter
    foldl'
    functionArgs
    genericClosure
    hasAttr
    head
    isAttrs
    isBool
    isFloat
    isFunction
    isInt
    isList
    isPath
    isString
    length
    listToAttrs
    mapAttrs
    match
    removeAttrs
    stringLength
    substring
    tail
    typeOf
    ;
in
rec {
  inherit
    all
    any
    attrNames
    attrValues
    concatLists
    concatMap
    concatStringsSep
    elem
    filter
    foldl'
    head
    isAttrs
    isBool
    isFloat
    isFunction
    isInt
    isList
    isString
    length
    mapAttrs
    tail
    ;

  # ---- trivial, lists, strings, attrsets ------------------------------------------------

  id = x: x;
  const = x: _: x;
  flip = f: a: b: f b a;
  min = a: b: if a < b then a else b;
  boolToString = b: if b then "true" else "false";
  warn = msg: builtins.trace "evaluation warning: ${msg}";
  throwIf = cond: msg: if cond then throw msg else id;

  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalString = cond: s: if cond then s else "";
  optionalAttrs = cond: as: if cond then as else { };
  toList = x: if isList x then x else [ x ];
  last = xs: elemAt xs (length xs - 1);
  count = pred: foldl' (c: x: if pred x then c + 1 else c) 0;
  imap1 = f: xs: builtins.genList (i: f (i + 1) (elemAt xs i)) (length xs);
  reverseList = xs: builtins.genList (i: elemAt xs (length xs - i - 1)) (length xs);
  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
  findFirst =
    pred: default: xs:
    let
      found = filter pred xs;
    in
    if found == [ ] then default else head found;

  hasPrefix = pre: s: substring 0 (stringLength pre) s == pre;
  hasSuffix =
    suf: s:
    let
      ls = stringLength s;
      lf = stringLength suf;
    in
    lf <= ls && substring (ls - lf) lf s == suf;
  removePrefix =
    pre: s: if hasPrefix pre s then substring (stringLength pre) (stringLength s) s else s;
  removeSuffix =
    suf: s: if hasSuffix suf s then substring 0 (stringLength s - stringLength suf) s else s;
  concatMapStringsSep = sep: f: xs: concatStringsSep sep (map f xs);
  concatLines = xs: concatStringsSep "" (map (x: x + "\n") xs);
  escapeShellArg = s: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s)}'";
  escapeShellArgs = concatMapStringsSep " " escapeShellArg;
  isStringLike = x: isString x || isPath x || x ? outPath || x ? __toString;
  isDerivation = x: isAttrs x && (x.type or null) == "derivation";
  isStorePath =
    x:
    if isStringLike x then
      let
        s = toString x;
      in
      substring 0 1 s == "/" && dirOf s == builtins.storeDir
    else
      false;

  filterAttrs =
    pred: set:
    listToAttrs (
      concatMap (
        name:
        let
          v = set.${name};
        in
        if pred name v then [ { inherit name; value = v; } ] else [ ]
      ) (attrNames set)
    );
  filterAttrsRecursive =
    pred: set:
    listToAttrs (
      concatMap (
        name:
        let
          v = set.${name};
        in
        if pred name v then
          [
            {
              inherit name;
              value = if isAttrs v then filterAttrsRecursive pred v else v;
            }
          ]
        else
          [ ]
      ) (attrNames set)
    );
  mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
  nameValuePair = name: value: { inherit name value; };
  mapAttrs' = f: set: listToAttrs (mapAttrsToList f set);
  mapAttrsRecursiveCond =
    cond: f: set:
    let
      recurse =
        path:
        mapAttrs (
          name: value:
          if isAttrs value && cond value then recurse (path ++ [ name ]) value else f (path ++ [ name ]) value
        );
    in
    recurse [ ] set;
  zipAttrsWith =
    f: sets:
    let
      names = unique (concatMap attrNames sets);
    in
    listToAttrs (
      map (name: {
        inherit name;
        value = f name (map (s: s.${name}) (filter (s: s ? ${name}) sets));
      }) names
    );
  recursiveUpdate =
    lhs: rhs:
    lhs
    // mapAttrs (
      name: v: if isAttrs v && isAttrs (lhs.${name} or null) then recursiveUpdate lhs.${name} v else v
    ) rhs;
  setAttrByPath =
    path: value: if path == [ ] then value else { ${head path} = setAttrByPath (tail path) value; };
  genAttrs =
    names: f:
    listToAttrs (
      map (n: {
        name = n;
        value = f n;
      }) names
    );

  getBin = pkg: pkg.bin or pkg;
  getExe' = pkg: name: "${getBin pkg}/bin/${name}";
  getExe = pkg: getExe' pkg (pkg.meta.mainProgram or (throw "getExe: ${pkg.name} has no meta.mainProgram"));

  platforms.linux = [
    "aarch64-linux"
    "x86_64-linux"
  ];

  # package.nix's source filter. The store copy happens only if `outPath` is forced,
  # which the stub rustPlatform never does.
  cleanSourceFilter =
    name: type:
    let
      base = baseNameOf (toString name);
    in
    !(
      (type == "directory" && elem base [ ".git" ".svn" "CVS" ".hg" ])
      || hasSuffix "~" base
      || match "^\\.sw[a-z]$" base != null
      || match "^\\..*\\.sw[a-z]$" base != null
      || hasSuffix ".o" base
      || hasSuffix ".so" base
      || (type == "symlink" && hasPrefix "result" base)
    );
  cleanSourceWith =
    {
      src,
      filter ? _: _: true,
      name ? null,
    }:
    {
      origSrc = src.origSrc or src;
      inherit filter;
      outPath = builtins.path {
        path = src.origSrc or src;
        name = if name == null then "source" else name;
        inherit filter;
      };
    };

  # ---- options --------------------------------------------------------------------------

  isOption = x: isAttrs x && (x._type or "") == "option";

  # The same argument names as nixpkgs: an unknown one is an evaluation error there too.
  mkOption =
    {
      default ? null,
      defaultText ? null,
      example ? null,
      description ? null,
      relatedPackages ? null,
      type ? null,
      apply ? null,
      internal ? null,
      visible ? null,
      readOnly ? null,
    }@attrs:
    attrs // { _type = "option"; };

  mkEnableOption =
    name:
    mkOption {
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
      type = types.bool;
    };

  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };
  literalMD = text: {
    _type = "literalMD";
    inherit text;
  };

  # `services.vmsync.settings.source.url`, `environment.etc."vmsync/config.toml".source`
  showOption =
    parts:
    concatStringsSep "." (
      map (
        p:
        if
          match "[a-zA-Z_][a-zA-Z0-9_'-]*" p != null
          || p == "*"
          || hasPrefix "<" p
          || hasPrefix "‹" p
          || hasPrefix "[" p
        then
          p
        else
          builtins.toJSON p
      ) parts
    );
  showFiles = files: concatStringsSep " and " (map (f: "`${toString f}'") files);

  # A short rendering of a definition's value for error messages.
  showValue =
    v:
    if isString v then
      builtins.toJSON v
    else if isInt v || isFloat v then
      toString v
    else if isBool v then
      boolToString v
    else if v == null then
      "null"
    else if isPath v then
      toString v
    else if isFunction v then
      "<function>"
    else if isList v then
      "[ ${concatMapStringsSep " " showValue v} ]"
    else if isDerivation v then
      "<derivation ${v.name or "?"}>"
    else if (v._type or null) != null then
      "<${v._type}>"
    else
      "{ ${concatStringsSep " " (mapAttrsToList (n: x: "${showOption [ n ]} = ${showValue x};") v)} }";
  showDefs = defs: concatStringsSep "" (map (d: "\n- In `${toString d.file}': ${showValue d.value}") defs);

  prioritySuggestion = "\nUse `lib.mkForce value` or `lib.mkDefault value` to change the priority on any of these definitions.";

  mergeEqualOption =
    loc: defs:
    if defs == [ ] then
      abort "this case should never happen"
    else if length defs == 1 then
      (head defs).value
    else if any (d: isFunction d.value) defs then
      throw "The option `${showOption loc}' has conflicting definition values (functions):${showDefs defs}"
    else if all (d: d.value == (head defs).value) defs then
      (head defs).value
    else
      throw "The option `${showOption loc}' has conflicting definition values:${showDefs defs}${prioritySuggestion}";

  mergeOneOption =
    loc: defs:
    if length defs == 1 then
      (head defs).value
    else
      throw "The option `${showOption loc}' is defined multiple times while it's expected to be unique.\nDefinition values:${showDefs defs}${prioritySuggestion}";

  mergeDefaultOption =
    loc: defs:
    let
      list = map (d: d.value) defs;
    in
    if length list == 1 then
      head list
    else if all isFunction list then
      x: mergeDefaultOption loc (map (f: f x) list)
    else if all isList list then
      concatLists list
    else if all isAttrs list then
      foldl' (a: b: a // b) { } list
    else if all isBool list then
      any id list
    else if all isString list then
      concatStringsSep "" list
    else if all isInt list && all (x: x == head list) list then
      head list
    else
      throw "Cannot merge definitions of `${showOption loc}'. Definition values:${showDefs defs}";

  # ---- properties -----------------------------------------------------------------------

  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkOverride = priority: content: {
    _type = "override";
    inherit priority content;
  };
  mkOptionDefault = mkOverride 1500;
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;
  defaultOverridePriority = 100;
  mkOrder = priority: content: {
    _type = "order";
    inherit priority content;
  };
  mkBefore = mkOrder 500;
  mkAfter = mkOrder 1500;
  defaultOrderPriority = 1000;

  # mkMerge [ a (mkIf c { x = 1; y = 2; }) ] -> [ a { x = mkIf c 1; y = mkIf c 2; } ]:
  # conditions are evaluated only when an option's value is, as in nixpkgs, so `mkIf
  # cfg.enable` may read the configuration it contributes to.
  pushDownProperties =
    cfg:
    if (cfg._type or "") == "merge" then
      concatMap pushDownProperties cfg.contents
    else if (cfg._type or "") == "if" then
      map (mapAttrs (_: v: mkIf cfg.condition v)) (pushDownProperties cfg.content)
    else if (cfg._type or "") == "override" then
      map (mapAttrs (_: v: mkOverride cfg.priority v)) (pushDownProperties cfg.content)
    else
      [ cfg ];

  dischargeProperties =
    def:
    if (def._type or "") == "merge" then
      concatMap dischargeProperties def.contents
    else if (def._type or "") == "if" then
      if isBool def.condition then
        (if def.condition then dischargeProperties def.content else [ ])
      else
        throw "‘mkIf’ called with a non-Boolean condition"
    else
      [ def ];

  filterOverrides' =
    defs:
    let
      getPrio = def: if (def.value._type or "") == "override" then def.value.priority else defaultOverridePriority;
      highestPrio = foldl' (prio: def: min (getPrio def) prio) 9999 defs;
      strip = def: if (def.value._type or "") == "override" then def // { value = def.value.content; } else def;
    in
    {
      values = concatMap (def: if getPrio def == highestPrio then [ (strip def) ] else [ ]) defs;
      inherit highestPrio;
    };

  sortProperties =
    defs:
    let
      strip =
        def:
        if (def.value._type or "") == "order" then
          def
          // {
            value = def.value.content;
            inherit (def.value) priority;
          }
        else
          def;
    in
    builtins.sort (a: b: (a.priority or defaultOrderPriority) < (b.priority or defaultOrderPriority)) (
      map strip defs
    );

  # ---- the module system ----------------------------------------------------------------

  mergeDefinitions = loc: type: defs: rec {
    defsFinal' =
      let
        discharged = concatMap (
          m:
          map (value: {
            inherit (m) file;
            inherit value;
          }) (addErrorContext "while evaluating definitions from `${toString m.file}':" (dischargeProperties m.value))
        ) defs;
        overridden = filterOverrides' discharged;
        sorted =
          if any (def: (def.value._type or "") == "order") overridden.values then
            sortProperties overridden.values
          else
            overridden.values;
      in
      {
        values = sorted;
        inherit (overridden) highestPrio;
      };
    defsFinal = defsFinal'.values;
    isDefined = defsFinal != [ ];
    mergedValue =
      if isDefined then
        if all (def: type.check def.value) defsFinal then
          type.merge loc defsFinal
        else
          throw "A definition for option `${showOption loc}' is not of type `${type.description}'. Definition values:${
            showDefs (filter (def: !type.check def.value) defsFinal)
          }"
      else
        throw "The option `${showOption loc}' is used but not defined.";
    optionalValue = if isDefined then { value = mergedValue; } else { };
  };

  evalOptionValue =
    loc: opt: defs:
    let
      defs' =
        (optional (opt ? default) {
          file = head opt.declarations;
          value = mkOptionDefault opt.default;
        })
        ++ defs;
      res =
        if (opt.readOnly or false) == true && length defs' > 1 then
          throw "The option `${showOption loc}' is read-only, but it's set multiple times. Definition values:${showDefs defs'}"
        else
          mergeDefinitions loc opt.type defs';
      value = if opt ? apply then opt.apply res.mergedValue else res.mergedValue;
    in
    opt
    // {
      value = addErrorContext "while evaluating the option `${showOption loc}':" value;
      inherit (res.defsFinal') highestPrio;
      definitions = map (def: def.value) res.defsFinal;
      files = map (def: def.file) res.defsFinal;
      inherit (res) isDefined;
      inherit loc;
    };

  mergeOptionDecls =
    loc: decls:
    foldl' (
      res: decl:
      let
        bothHave = k: decl.options ? ${k} && res ? ${k};
        mergedType = if bothHave "type" then res.type.typeMerge decl.options.type.functor else null;
      in
      if
        bothHave "default"
        || bothHave "example"
        || bothHave "description"
        || bothHave "apply"
        || (bothHave "type" && mergedType == null)
      then
        throw "The option `${showOption loc}' in `${toString decl._file}' is already declared in ${showFiles res.declarations}."
      else
        decl.options
        // res
        // {
          declarations = res.declarations ++ [ decl._file ];
        }
        // optionalAttrs (bothHave "type") { type = mergedType; }
    ) { declarations = [ ]; } decls;

  # An attrset name -> list, collected from the attribute `attr` of each module.
  byName =
    attr: f: modules:
    foldl' (acc: module: acc // mapAttrs (n: v: (acc.${n} or [ ]) ++ f module v) module.${attr}) { } modules;

  mergeModules' =
    prefix: decls: defs:
    let
      declsByName = byName "options" (module: option: [
        {
          inherit (module) _file;
          options = option;
        }
      ]) decls;
      defnsByName = byName "config" (
        module: value:
        map (config: {
          inherit (module) file;
          inherit config;
        }) (pushDownProperties value)
      ) defs;
      defnsByName' = byName "config" (module: value: [
        {
          inherit (module) file;
          inherit value;
        }
      ]) defs;
      resultsByName = mapAttrs (
        name: decls:
        let
          loc = prefix ++ [ name ];
          nrOptions = count (d: isOption d.options) decls;
        in
        if nrOptions == length decls then
          let
            opt = mergeOptionDecls loc decls;
            typed = opt // {
              type = opt.type or types.unspecified;
            };
          in
          {
            matchedOptions = evalOptionValue loc typed (defnsByName'.${name} or [ ]);
            unmatchedDefns = [ ];
          }
        else if nrOptions != 0 then
          throw "The option `${showOption loc}' in `${
            toString (findFirst (d: isOption d.options) { } decls)._file
          }' is a prefix of options in `${toString (findFirst (d: !isOption d.options) { } decls)._file}'."
        else
          mergeModules' loc decls (defnsByName.${name} or [ ])
      ) declsByName;
      matchedOptions = mapAttrs (_: v: v.matchedOptions) resultsByName;
      unmatchedByName =
        mapAttrs (_: v: v.unmatchedDefns) resultsByName // removeAttrs defnsByName' (attrNames matchedOptions);
    in
    {
      inherit matchedOptions;
      unmatchedDefns = concatLists (
        mapAttrsToList (
          name: defs:
          map (
            def:
            def
            // {
              prefix = [ name ] ++ (def.prefix or [ ]);
            }
          ) defs
        ) unmatchedByName
      );
    };

  unifyModuleSyntax =
    file: key: m:
    let
      addFreeform =
        config:
        if m ? freeformType then
          mkMerge [
            config
            { _module.freeformType = m.freeformType; }
          ]
        else
          config;
    in
    if m ? config || m ? options then
      let
        bad = removeAttrs m [
          "_file"
          "_class"
          "key"
          "disabledModules"
          "imports"
          "options"
          "config"
          "meta"
          "freeformType"
        ];
      in
      if bad != { } then
        throw "Module `${key}' has an unsupported attribute `${head (attrNames bad)}'. This is caused by introducing a top-level `config' or `options' attribute. Add configuration attributes immediately on the top level instead, or move all of them (namely: ${toString (attrNames bad)}) into the explicit `config' attribute."
      else
        {
          _file = m._file or file;
          key = toString (m.key or key);
          imports = m.imports or [ ];
          options = m.options or { };
          config = addFreeform (m.config or { });
        }
    else
      {
        _file = m._file or file;
        key = toString (m.key or key);
        imports = m.imports or [ ];
        options = { };
        config = addFreeform (
          removeAttrs m [
            "_file"
            "_class"
            "key"
            "disabledModules"
            "imports"
            "freeformType"
          ]
        );
      };

  # Calls a module function with the arguments it names: `lib`, `config`, `options` and
  # the special arguments directly, anything else (`pkgs`, `name`) from `_module.args`.
  applyModuleArgs =
    key: f: args:
    if isFunction f then
      f (
        args
        // mapAttrs (
          name: _:
          addErrorContext "while evaluating the module argument `${name}' in \"${key}\":" (
            args.${name} or args.config._module.args.${name}
          )
        ) (functionArgs f)
      )
    else
      f;

  collectModules =
    modules: args:
    let
      load =
        parentFile: parentKey: n: m:
        let
          isFile = isPath m || isString m;
          file = if isFile then toString m else parentFile;
          key = if isFile then toString m else "${parentKey}:anon-${toString n}";
          value = if isFile then import m else m;
        in
        unifyModuleSyntax file key (applyModuleArgs key value args);
      entries = parent: imap1 (n: m: let module = load parent._file parent.key n m; in { inherit (module) key; inherit module; });
    in
    map (e: e.module) (genericClosure {
      startSet = entries {
        _file = "<unknown-file>";
        key = "";
      } modules;
      operator = e: entries e.module e.module.imports;
    });

  evalModules =
    {
      modules,
      prefix ? [ ],
      specialArgs ? { },
      args ? { },
    }:
    let
      internalModule = {
        _file = "lib/modules.nix";
        key = "lib/modules.nix";
        options._module.args = mkOption {
          type = types.lazyAttrsOf types.raw;
          internal = true;
          description = "Arguments passed to each module.";
        };
        options._module.check = mkOption {
          type = types.bool;
          default = true;
          internal = true;
          description = "Whether to check that every definition has a declared option.";
        };
        options._module.freeformType = mkOption {
          type = types.nullOr types.raw;
          default = null;
          internal = true;
          description = "The type of definitions that have no option; null: such definitions are errors.";
        };
        config._module.args = args;
      };
      collected = collectModules (modules ++ [ internalModule ]) (
        {
          inherit lib options config;
        }
        // specialArgs
      );
      merged = mergeModules' prefix collected (
        concatMap (
          m:
          map (c: {
            file = m._file;
            config = c;
          }) (pushDownProperties m.config)
        ) collected
      );
      options = merged.matchedOptions;
      declaredConfig = mapAttrsRecursiveCond (v: !isOption v) (_: v: v.value) options;
      freeformType = declaredConfig._module.freeformType;
      config =
        if freeformType == null then
          declaredConfig
        else
          recursiveUpdate (
            if merged.unmatchedDefns == [ ] then
              { }
            else
              freeformType.merge prefix (
                map (def: {
                  inherit (def) file;
                  value = setAttrByPath def.prefix def.value;
                }) merged.unmatchedDefns
              )
          ) declaredConfig;
      checkUnmatched =
        if config._module.check && freeformType == null && merged.unmatchedDefns != [ ] then
          let
            first = head merged.unmatchedDefns;
          in
          throw "The option `${showOption (prefix ++ first.prefix)}' does not exist. Definition values:${showDefs [ first ]}"
        else
          null;
      lib = self;
    in
    builtins.seq checkUnmatched {
      inherit options;
      config = removeAttrs config [ "_module" ];
      inherit (config) _module;
    };

  self = import ./lib.nix;

  # ---- types ----------------------------------------------------------------------------

  types = rec {
    isType = type: x: (x._type or "") == type;

    mkOptionType =
      {
        name,
        description ? null,
        descriptionClass ? null,
        check ? (_: true),
        merge ? mergeDefaultOption,
        emptyValue ? { },
        getSubModules ? null,
        substSubModules ? _: null,
        functor ? {
          inherit name;
          wrapped = null;
          payload = null;
          type = null;
        },
        typeMerge ? null,
        nestedTypes ? { },
      }:
      {
        _type = "option-type";
        inherit
          name
          check
          merge
          emptyValue
          getSubModules
          substSubModules
          functor
          nestedTypes
          descriptionClass
          ;
        description = if description == null then name else description;
        # Two declarations of one option merge their types only when these are the same
        # type (submodules: their modules are combined).
        typeMerge =
          if typeMerge != null then
            typeMerge
          else
            f': if f'.name == name && f'.payload or null == functor.payload or null then types.${name} or null else null;
      };

    addCheck = elemType: check: elemType // { check = x: elemType.check x && check x; };

    raw = mkOptionType {
      name = "raw";
      description = "raw value";
      merge = mergeOneOption;
    };
    unspecified = mkOptionType {
      name = "unspecified";
      description = "unspecified value";
    };
    anything = mkOptionType {
      name = "anything";
      check = _: true;
      merge =
        loc: defs:
        if all (d: isAttrs d.value && !isDerivation d.value) defs then
          (attrsOf anything).merge loc defs
        else
          mergeEqualOption loc defs;
    };
    bool = mkOptionType {
      name = "bool";
      description = "boolean";
      check = isBool;
      merge = mergeEqualOption;
    };
    int = mkOptionType {
      name = "int";
      description = "signed integer";
      check = isInt;
      merge = mergeEqualOption;
    };
    ints = rec {
      between =
        lo: hi:
        addCheck int (x: x >= lo && x <= hi)
        // {
          name = "intBetween";
          description = "integer between ${toString lo} and ${toString hi} (both inclusive)";
        };
      unsigned = addCheck int (x: x >= 0) // {
        name = "unsignedInt";
        description = "unsigned integer, meaning >=0";
      };
      positive = addCheck int (x: x > 0) // {
        name = "positiveInt";
        description = "positive integer, meaning >0";
      };
      u32 = between 0 4294967295 // {
        name = "unsignedInt32";
        description = "32 bit unsigned integer; between 0 and 4294967295 (both inclusive)";
      };
      u16 = between 0 65535 // {
        name = "unsignedInt16";
        description = "16 bit unsigned integer; between 0 and 65535 (both inclusive)";
      };
    };
    port = ints.u16;
    float = mkOptionType {
      name = "float";
      description = "floating point number";
      check = isFloat;
      merge = mergeEqualOption;
    };
    str = mkOptionType {
      name = "str";
      description = "string";
      check = isString;
      merge = mergeEqualOption;
    };
    nonEmptyStr = mkOptionType {
      name = "nonEmptyStr";
      description = "non-empty string";
      check = x: isString x && match "[ \t\n]*" x == null;
      merge = mergeEqualOption;
    };
    singleLineStr = mkOptionType {
      name = "singleLineStr";
      description = "(optionally newline-terminated) single-line string";
      check = x: isString x && match "[^\n\r]*\n?" x != null;
      merge = loc: defs: removeSuffix "\n" (mergeEqualOption loc defs);
    };
    strMatching =
      pattern:
      mkOptionType {
        name = "strMatching ${builtins.toJSON pattern}";
        description = "string matching the pattern ${pattern}";
        check = x: isString x && match pattern x != null;
        merge = mergeEqualOption;
      };
    separatedString =
      sep:
      mkOptionType {
        name = "separatedString";
        description = if sep == "" then "Concatenated string" else "strings concatenated with ${builtins.toJSON sep}";
        check = isString;
        merge = loc: defs: concatStringsSep sep (map (d: d.value) defs);
        functor = {
          name = "separatedString";
          payload = sep;
          wrapped = null;
          type = null;
        };
        typeMerge = f': if f'.name == "separatedString" && f'.payload == sep then separatedString sep else null;
      };
    lines = separatedString "\n";
    attrs = mkOptionType {
      name = "attrs";
      description = "attribute set";
      check = isAttrs;
      merge = _: foldl' (res: def: res // def.value) { };
      emptyValue = {
        value = { };
      };
    };
    package = mkOptionType {
      name = "package";
      check = x: isDerivation x || isStorePath x;
      merge = mergeOneOption;
    };
    path = mkOptionType {
      name = "path";
      check = x: isStringLike x && substring 0 1 (toString x) == "/";
      merge = mergeEqualOption;
    };

    listOf =
      elemType:
      mkOptionType {
        name = "listOf";
        description = "list of ${elemType.description}";
        check = isList;
        merge =
          loc: defs:
          map (x: x.value) (
            filter (x: x ? value) (
              concatLists (
                imap1 (
                  n: def:
                  imap1 (
                    m: v:
                    (mergeDefinitions (loc ++ [ "[definition ${toString n}-entry ${toString m}]" ]) elemType [
                      {
                        inherit (def) file;
                        value = v;
                      }
                    ]).optionalValue
                  ) def.value
                ) defs
              )
            )
          );
        emptyValue = {
          value = [ ];
        };
        getSubModules = elemType.getSubModules;
        substSubModules = m: listOf (elemType.substSubModules m);
        functor = {
          name = "listOf";
          wrapped = elemType;
          payload = null;
        };
        typeMerge =
          f':
          let
            m = if f'.name == "listOf" then elemType.typeMerge f'.wrapped.functor else null;
          in
          if m == null then null else listOf m;
        nestedTypes.elemType = elemType;
      };

    attrsWith =
      { elemType, lazy }:
      mkOptionType {
        name = if lazy then "lazyAttrsOf" else "attrsOf";
        description = "${if lazy then "lazy attribute set" else "attribute set"} of ${elemType.description}";
        check = isAttrs;
        merge =
          loc: defs:
          let
            pushed = map (def: mapAttrs (_: v: { inherit (def) file; value = v; }) def.value) defs;
          in
          if lazy then
            zipAttrsWith (
              name: defs:
              let
                merged = mergeDefinitions (loc ++ [ name ]) elemType defs;
              in
              merged.optionalValue.value or elemType.emptyValue.value or merged.mergedValue
            ) pushed
          else
            mapAttrs (_: v: v.value) (
              filterAttrs (_: v: v ? value) (
                zipAttrsWith (name: defs: (mergeDefinitions (loc ++ [ name ]) elemType defs).optionalValue) pushed
              )
            );
        emptyValue = {
          value = { };
        };
        getSubModules = elemType.getSubModules;
        substSubModules = m: attrsWith { elemType = elemType.substSubModules m; inherit lazy; };
        functor = {
          name = if lazy then "lazyAttrsOf" else "attrsOf";
          wrapped = elemType;
          payload = null;
        };
        typeMerge =
          f':
          let
            m = if f'.name == (if lazy then "lazyAttrsOf" else "attrsOf") then elemType.typeMerge f'.wrapped.functor else null;
          in
          if m == null then null else attrsWith { elemType = m; inherit lazy; };
        nestedTypes.elemType = elemType;
      };
    attrsOf = elemType: attrsWith { inherit elemType; lazy = false; };
    lazyAttrsOf = elemType: attrsWith { inherit elemType; lazy = true; };

    uniq =
      elemType:
      elemType
      // {
        name = "unique";
        merge = mergeOneOption;
      };

    nullOr =
      elemType:
      mkOptionType {
        name = "nullOr";
        description = "null or ${elemType.description}";
        check = x: x == null || elemType.check x;
        merge =
          loc: defs:
          let
            nulls = count (def: def.value == null) defs;
          in
          if nulls == length defs then
            null
          else if nulls != 0 then
            throw "The option `${showOption loc}` is defined both null and not null, in ${showFiles (map (d: d.file) defs)}."
          else
            elemType.merge loc defs;
        emptyValue = {
          value = null;
        };
        getSubModules = elemType.getSubModules;
        substSubModules = m: nullOr (elemType.substSubModules m);
        functor = {
          name = "nullOr";
          wrapped = elemType;
          payload = null;
        };
        typeMerge =
          f':
          let
            m = if f'.name == "nullOr" then elemType.typeMerge f'.wrapped.functor else null;
          in
          if m == null then null else nullOr m;
        nestedTypes.elemType = elemType;
      };

    enum =
      values:
      let
        show = v: if isString v then ''"${v}"'' else if isInt v then toString v else if isBool v then boolToString v else "<${typeOf v}>";
      in
      mkOptionType {
        name = "enum";
        description = "one of ${concatMapStringsSep ", " show values}";
        check = x: elem x values;
        merge = mergeEqualOption;
        functor = {
          name = "enum";
          payload = values;
          wrapped = null;
        };
        typeMerge = f': if f'.name == "enum" then enum (unique (values ++ f'.payload)) else null;
      };

    either =
      t1: t2:
      mkOptionType {
        name = "either";
        description = "${t1.description} or ${t2.description}";
        check = x: t1.check x || t2.check x;
        merge =
          loc: defs:
          let
            values = map (d: d.value) defs;
          in
          if all t1.check values then
            t1.merge loc defs
          else if all t2.check values then
            t2.merge loc defs
          else
            mergeOneOption loc defs;
        functor = {
          name = "either";
          wrapped = [
            t1
            t2
          ];
          payload = null;
        };
        typeMerge = _: null;
      };
    oneOf =
      ts: if ts == [ ] then throw "types.oneOf needs to get at least one type in its argument" else foldl' either (head ts) (tail ts);

    coercedTo =
      coercedType: coerceFunc: finalType:
      mkOptionType {
        name = "coercedTo";
        description = "${finalType.description} or ${coercedType.description} convertible to it";
        check = x: (coercedType.check x && finalType.check (coerceFunc x)) || finalType.check x;
        merge =
          loc: defs:
          finalType.merge loc (
            map (def: def // { value = if finalType.check def.value then def.value else coerceFunc def.value; }) defs
          );
        emptyValue = finalType.emptyValue;
        typeMerge = _: null;
      };

    submoduleWith =
      {
        modules,
        specialArgs ? { },
        shorthandOnlyDefinesConfig ? false,
        description ? null,
      }@attrs:
      let
        # The submodule's options alone, for its freeform type's description.
        base = evalModules {
          inherit specialArgs;
          modules = [ { _module.args.name = mkOptionDefault "‹name›"; } ] ++ modules;
        };
        freeformType = base._module.freeformType;
      in
      mkOptionType {
        name = "submodule";
        description = if description != null then description else freeformType.description or "submodule";
        check = x: isAttrs x || isFunction x || path.check x;
        merge =
          loc: defs:
          (evalModules {
            inherit specialArgs;
            prefix = loc;
            modules =
              [ { _module.args.name = last loc; } ]
              ++ modules
              ++ map (
                { value, file }:
                if isAttrs value && shorthandOnlyDefinesConfig then
                  {
                    _file = file;
                    config = value;
                  }
                else
                  {
                    _file = file;
                    imports = [ value ];
                  }
              ) defs;
          }).config;
        emptyValue = {
          value = { };
        };
        getSubModules = modules;
        substSubModules = m: submoduleWith (attrs // { modules = m; });
        functor = {
          name = "submodule";
          payload = {
            inherit modules;
          };
          wrapped = null;
        };
        typeMerge =
          f':
          if f'.name == "submodule" then
            submoduleWith (attrs // { modules = modules ++ f'.payload.modules; })
          else
            null;
        nestedTypes = optionalAttrs (freeformType != null) { inherit freeformType; };
      };
    submodule =
      modules:
      submoduleWith {
        shorthandOnlyDefinesConfig = true;
        modules = toList modules;
      };
  };
}
