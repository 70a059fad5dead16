"""Read meta-fl's recipes, kas files and the agent's imports without bitbake: what the meta-fl tests share.

The recipe reader understands the subset of bitbake syntax meta-fl uses (`VAR = "..."`, `+=`, `?=`, `:=`,
backslash continuations, `VAR:override`); it is not a general parser. `image_boot` evaluates, per kas file,
which wks fl-image gets and which EFI loader that asks for, from the recipe and a table of machine facts.
The bitbake test (tests/test_metafl_bitbake.py) checks the same facts with a real parse when a poky checkout
is at hand.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYER = REPO / "meta-fl"
AGENT_PACKAGE = REPO / "appliance"
FL_AGENT_RECIPE = next(iter(sorted((LAYER / "recipes-fl" / "fl-agent").glob("fl-agent_*.bb"))), None)

# Third-party import name -> the recipe that provides it on scarthgap (meta-python, oe-core,
# meta-onnxruntime or meta-fl). The pinned layers were checked with `bitbake -g fl-image`.
THIRD_PARTY_RECIPES = {
    "aiohttp": "python3-aiohttp",  # meta-python 3.9.5
    "bcrypt": "python3-bcrypt",  # meta-python 4.1.2 (metrics basic auth; built with Rust)
    "cbor2": "python3-cbor2",  # meta-python 5.6.4
    "cryptography": "python3-cryptography",  # oe-core 42.0.5 (ChaCha20 of the secure-aggregation masks)
    "nacl": "python3-pynacl",  # meta-python 1.5.0
    "numpy": "python3-numpy",  # oe-core 1.26.4
    "onnxruntime": "onnxruntime",  # meta-onnxruntime 1.18.0 (inference build, Python bindings)
    "prometheus_client": "python3-prometheus-client",  # meta-fl 0.21.1
    "pyudev": "python3-pyudev",  # meta-python 0.24.1
    "yaml": "python3-pyyaml",  # oe-core 6.0.1 (the metrics endpoint's web configuration file)
}

# Standard-library module -> the python3-* package that ships it on scarthgap, from oe-core's
# meta/recipes-devtools/python/python3/python3-manifest.json. A dotted key beats its top-level module
# (urllib.parse is in python3-core, urllib.request in python3-netclient); modules the manifest does not
# list (wsgiref, timeit) land in python3-misc. tests/test_metafl_bitbake.py checks this table against the manifest.
STDLIB_PACKAGES = {
    "__future__": "python3-core",
    "abc": "python3-core",
    "argparse": "python3-core",
    "array": "python3-core",
    "asyncio": "python3-asyncio",
    "base64": "python3-netclient",
    "binascii": "python3-core",
    "bisect": "python3-core",
    "collections": "python3-core",
    "concurrent": "python3-asyncio",
    "contextlib": "python3-core",
    "copy": "python3-core",
    "ctypes": "python3-ctypes",
    "dataclasses": "python3-core",
    "datetime": "python3-datetime",
    "enum": "python3-core",
    "errno": "python3-core",
    "fcntl": "python3-fcntl",
    "functools": "python3-core",
    "glob": "python3-shell",
    "gzip": "python3-compression",
    "gc": "python3-core",
    "hashlib": "python3-crypt",
    "heapq": "python3-core",
    "hmac": "python3-netclient",
    "http": "python3-netclient",
    "importlib": "python3-core",
    "inspect": "python3-core",
    "io": "python3-core",
    "itertools": "python3-core",
    "json": "python3-json",
    "logging": "python3-logging",
    "math": "python3-core",
    "mmap": "python3-mmap",
    "multiprocessing": "python3-multiprocessing",
    "operator": "python3-core",
    "os": "python3-core",
    "pathlib": "python3-core",
    "platform": "python3-core",
    "queue": "python3-threading",
    "random": "python3-math",
    "re": "python3-core",
    "resource": "python3-resource",
    "secrets": "python3-netclient",
    "select": "python3-core",
    "selectors": "python3-core",
    "shutil": "python3-core",
    "signal": "python3-core",
    "socket": "python3-io",
    "ssl": "python3-io",
    "sqlite3": "python3-sqlite3",
    "stat": "python3-core",
    "socketserver": "python3-netserver",
    "string": "python3-stringold",
    "struct": "python3-core",
    "subprocess": "python3-core",
    "sys": "python3-core",
    "tempfile": "python3-io",
    "textwrap": "python3-core",
    "threading": "python3-core",
    "time": "python3-core",
    "timeit": "python3-misc",
    "tomllib": "python3-tomllib",
    "traceback": "python3-core",
    "types": "python3-core",
    "typing": "python3-core",
    "urllib.parse": "python3-core",
    "urllib.request": "python3-netclient",
    "uuid": "python3-netclient",
    "warnings": "python3-core",
    "weakref": "python3-core",
    "wsgiref": "python3-misc",
    "zlib": "python3-core",
}


@dataclass(frozen=True)
class Import:
    module: str  # dotted name as written
    path: Path
    line: int


def _optional_import_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes that need not succeed: inside `if TYPE_CHECKING:` or `try: ... except ImportError`."""
    optional: set[int] = set()
    for node in ast.walk(tree):
        guarded: list[ast.stmt] = []
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            guarded = node.body
        elif isinstance(node, ast.Try):
            caught = " ".join(ast.unparse(h.type) for h in node.handlers if h.type is not None)
            if "ImportError" in caught or "ModuleNotFoundError" in caught:
                guarded = node.body
        for stmt in guarded:
            optional.update(id(n) for n in ast.walk(stmt) if isinstance(n, ast.Import | ast.ImportFrom))
    return optional


def agent_imports(package: Path = AGENT_PACKAGE) -> list[Import]:
    """Absolute imports the agent needs at run time (relative and own-package imports left out)."""
    found: list[Import] = []
    own = package.name
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        optional = _optional_import_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] != own:
                    found.append(Import(name, path, node.lineno))
    return found


def package_for_import(module: str) -> str:
    """The OE package (or recipe, for third-party modules) that provides `module`; KeyError if unknown."""
    top = module.split(".")[0]
    if top in THIRD_PARTY_RECIPES:
        return THIRD_PARTY_RECIPES[top]
    if top not in sys.stdlib_module_names:
        raise KeyError(f"{module}: a third-party module with no recipe in THIRD_PARTY_RECIPES")
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in STDLIB_PACKAGES:
            return STDLIB_PACKAGES[key]
    raise KeyError(f"{module}: a standard-library module missing from STDLIB_PACKAGES "
                   "(look it up in oe-core's python3-manifest.json)")


_ASSIGN = re.compile(r'^(?P<var>[A-Za-z0-9_\-${}:.\\/]+?)\s*(?P<op>\?\?=|\?=|:=|\+=|=\+|\.=|=\.|=)\s*"(?P<value>.*)')


def _logical_lines(text: str) -> Iterator[str]:
    pending = ""
    for raw in text.splitlines():
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        yield pending + raw
        pending = ""
    if pending:
        yield pending


def recipe_assignments(path: Path) -> list[tuple[str, str, str]]:
    """(variable, operator, value) for every top-level assignment, in file order."""
    return conf_assignments(path.read_text())


def conf_assignments(text: str) -> list[tuple[str, str, str]]:
    """(variable, operator, value) for every top-level assignment of recipe or .conf text, in order."""
    out: list[tuple[str, str, str]] = []
    in_function = False
    for line in _logical_lines(text):
        stripped = line.strip()
        if in_function:
            if stripped == "}":
                in_function = False
            continue
        if re.match(r"^(python\s+)?[\w:${}\-]+\s*\(\)\s*\{", stripped) or re.match(r"^def\s", stripped):
            in_function = stripped.endswith("{")
            continue
        m = _ASSIGN.match(stripped)
        if m:
            value = m.group("value")
            value = value[: value.rfind('"')] if '"' in value else value
            out.append((m.group("var"), m.group("op"), " ".join(value.split())))
    return out


def recipe_value(path: Path, var: str) -> str:
    """The value of `var` after `=`, `?=`, `+=` assignments in this file alone (no expansion)."""
    value = ""
    for name, op, val in recipe_assignments(path):
        if name != var:
            continue
        if op in ("=", ":=") or (op in ("?=", "??=") and not value):
            value = val
        elif op in ("+=", ".="):
            value = f"{value} {val}".strip()
        elif op in ("=+", "=."):
            value = f"{val} {value}".strip()
    return value


def function_body(path: Path, name: str) -> str:
    """Text of a shell function such as `do_install:append() { ... }`."""
    m = re.search(r"^" + re.escape(name) + r"\s*\(\)\s*\{\n(?P<body>.*?)^\}", path.read_text(), re.S | re.M)
    if not m:
        raise KeyError(f"{path.name} has no {name}()")
    return m.group("body")


def layer_conf() -> dict[str, str]:
    conf = LAYER / "conf" / "layer.conf"
    values: dict[str, str] = {}
    for name, op, val in recipe_assignments(conf):
        values[name] = f"{values.get(name, '')} {val}".strip() if op == "+=" else val
    return values


def meta_fl_recipe_files() -> list[Path]:
    return sorted(p for p in LAYER.rglob("*") if p.suffix in (".bb", ".bbappend"))


def meta_fl_recipe_names() -> set[str]:
    """PN of every recipe meta-fl carries (file name up to the first `_`)."""
    return {p.name.split("_")[0].removesuffix(".bb") for p in LAYER.rglob("*.bb")}


# What the pinned layers set for each machine that decides fl-image's disk layout and boot loader, read from
# their machine configurations (poky meta/ and meta-yocto-bsp/, meta-raspberrypi) and from oe-core's
# image_types_wic.bbclass. tests/test_metafl_bitbake.py checks these facts against `bitbake -e fl-image`.
@dataclass(frozen=True)
class Machine:
    efi: bool  # "efi" in the machine's own MACHINE_FEATURES
    overrides: frozenset[str]  # MACHINEOVERRIDES besides the machine's name (SOC_FAMILY and the like)
    efi_provider: str = ""  # EFI_PROVIDER ?= in the machine configuration (for a systemd distro)
    wic_loaders: str = ""  # WKS_FILE_DEPENDS_BOOTLOADERS of image_types_wic for the machine's architecture


MACHINES = {
    "qemux86-64": Machine(efi=False, overrides=frozenset({"qemuall"}),
                          wic_loaders="syslinux grub-efi systemd-boot os-release"),
    "qemuarm64": Machine(efi=False, overrides=frozenset({"qemuall", "aarch64"})),
    # genericarm64.conf: EFI_PROVIDER is systemd-boot when DISTRO_FEATURES has systemd, grub-efi otherwise.
    "genericarm64": Machine(efi=True, overrides=frozenset({"aarch64", "armv8a"}), efi_provider="systemd-boot"),
    "raspberrypi4-64": Machine(efi=False, overrides=frozenset({"rpi", "raspberrypi4", "aarch64"})),
}


@dataclass(frozen=True)
class BuildConfig:
    """One way of building fl-image: a machine and the local.conf a kas file (or a user) gives it."""
    name: str
    machine: str
    distro: str
    repos: dict[str, dict] = field(default_factory=dict)  # kas `repos`: name -> url, commit, layers
    local_conf: str = ""  # kas `local_conf_header` entries, joined


KAS_DIR = LAYER / "kas"
KAS_COMMON = KAS_DIR / "fl-image-common.yml"


def _kas_merged(path: Path) -> dict:
    """A kas file with its includes merged in, as kas does: includes first, the including file wins."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    merged: dict = {"repos": {}, "local_conf_header": {}}
    for include in (data.get("header") or {}).get("includes", []):
        inner = _kas_merged(REPO / include)
        merged["repos"].update(inner["repos"])
        merged["local_conf_header"].update(inner["local_conf_header"])
        merged.update({k: v for k, v in inner.items() if k not in ("repos", "local_conf_header")})
    merged["repos"].update(data.get("repos") or {})
    merged["local_conf_header"].update(data.get("local_conf_header") or {})
    merged.update({k: v for k, v in data.items() if k not in ("repos", "local_conf_header", "header")})
    return merged


def kas_build_config(path: Path) -> BuildConfig:
    kas = _kas_merged(path)
    return BuildConfig(name=path.stem, machine=kas.get("machine", ""), distro=kas.get("distro", "poky"),
                       repos=kas["repos"], local_conf="\n".join(kas["local_conf_header"].values()))


def build_configs() -> list[BuildConfig]:
    """Every kas machine file, and qemuarm64 with only the common settings: a machine without EFI, as a
    user adding the layer to a plain poky build gets (the case that once asked for a loader it never built)."""
    configs = [kas_build_config(p) for p in sorted(KAS_DIR.glob("fl-image-*.yml")) if p != KAS_COMMON]
    configs.append(replace(kas_build_config(KAS_COMMON), name="qemuarm64-common-settings", machine="qemuarm64"))
    return configs


def _bb_contains(variable: str, checkvalues: str, truevalue: str, falsevalue: str, d: _Datastore) -> str:
    return truevalue if set(checkvalues.split()) <= set((d.getVar(variable) or "").split()) else falsevalue


class _Datastore:
    """The `d` and `bb` inline python (`${@...}`) sees, over already-resolved variables."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def getVar(self, name: str, expand: bool = True) -> str | None:
        value = self.values.get(name)
        return expand_value(value, self.values) if value is not None and expand else value


class _Bb:
    class utils:
        contains = staticmethod(_bb_contains)


def expand_value(value: str, values: dict[str, str]) -> str:
    """Expand `${VAR}` from `values` (unknown names stay as written), then evaluate `${@...}` inline python."""
    for _ in range(20):
        expanded = re.sub(r"\$\{([A-Za-z0-9_\-]+)\}", lambda m: values.get(m.group(1), m.group(0)), value)
        if expanded == value:
            break
        value = expanded
    return re.sub(r"\$\{@(.+?)\}",
                  lambda m: str(eval(m.group(1), {"bb": _Bb, "d": _Datastore(values)})), value)


def resolve_assignments(assignments: list[tuple[str, str, str]], overrides: set[str]) -> dict[str, str]:
    """Variable values after bitbake's operators and overrides, for the subset meta-fl uses: `=`, `?=`, `??=`,
    `+=`, `:append`, `:remove` and `VAR:<override>` (which wins over the plain value when it is active)."""
    plain: dict[str, str] = {}
    weak: dict[str, str] = {}
    chosen: dict[str, str] = {}
    appends: dict[str, list[tuple[str, str]]] = {}
    for name, op, value in assignments:
        base, *suffix = name.split(":")
        if any(s not in overrides and s not in ("append", "prepend", "remove") for s in suffix):
            continue
        if suffix and suffix[0] in ("append", "prepend", "remove"):
            appends.setdefault(base, []).append((suffix[0], value))
        elif suffix:
            chosen[base] = value
        elif op in ("=", ":="):
            plain[base] = value
        elif op == "?=":
            plain.setdefault(base, value)
        elif op == "??=":
            weak[base] = value
        elif op in ("+=", ".="):
            plain[base] = f"{plain.get(base, '')} {value}".strip()
        elif op in ("=+", "=."):
            plain[base] = f"{value} {plain.get(base, '')}".strip()
    values = {**weak, **plain, **chosen}
    for base, operations in appends.items():
        for kind, value in operations:
            current = values.get(base, "")
            # The reader keeps no leading space, so every value is taken as a whitespace-separated list.
            if kind == "append":
                values[base] = f"{current} {value}".strip()
            elif kind == "prepend":
                values[base] = f"{value} {current}".strip()
            else:
                values[base] = " ".join(w for w in current.split() if w not in value.split())
    return values


IMAGE_RECIPE = LAYER / "recipes-core" / "images" / "fl-image.bb"
IMAGE_INC = LAYER / "recipes-core" / "images" / "fl-image.inc"


@dataclass(frozen=True)
class ImageBoot:
    efi: bool  # "efi" in MACHINE_FEATURES, after local.conf
    wks_file: str  # WKS_FILE, as bitbake resolves it for fl-image on this machine
    loaders: list[str]  # the EFI loaders (`loader=`) the expanded wks asks wic to install
    graph: set[str]  # recipes and packages the image depends on that decide its boot path


def image_boot(config: BuildConfig) -> ImageBoot:
    """What fl-image's disk asks for on `config`, and what the image pulls into its dependency graph.

    The graph is what fl-image's own variables name (WKS_FILE_DEPENDS, DEPENDS, EXTRA_IMAGEDEPENDS,
    IMAGE_INSTALL) plus the two rules of oe-core that bring boot loaders in: image_types_wic's
    WKS_FILE_DEPENDS default (the x86 loaders) and packagegroup-core-boot, which RDEPENDS on ${EFI_PROVIDER}
    and the kernel when MACHINE_FEATURES has "efi"."""
    if config.machine not in MACHINES:
        raise KeyError(f"{config.name}: machine {config.machine} is not in MACHINES; add what its configuration "
                       "at the pinned commit sets (MACHINE_FEATURES efi, MACHINEOVERRIDES, EFI_PROVIDER)")
    machine = MACHINES[config.machine]
    overrides = {config.machine, *machine.overrides, "pn-fl-image"}
    # Parse order: local.conf, the machine configuration, then the recipe with its classes' weak defaults.
    global_conf = [*conf_assignments(config.local_conf), ("MACHINE_FEATURES", "=", "efi" if machine.efi else "")]
    if machine.efi_provider:
        global_conf.append(("EFI_PROVIDER", "?=", machine.efi_provider))
    image = [("WKS_FILE_DEPENDS", "??=", machine.wic_loaders), *recipe_assignments(IMAGE_INC),
             *recipe_assignments(IMAGE_RECIPE)]
    values = resolve_assignments(global_conf + image, overrides)
    values["MACHINE"] = config.machine

    def words(var: str, among: dict[str, str] = values) -> set[str]:
        return set(expand_value(among.get(var, ""), among).split())

    efi = "efi" in words("MACHINE_FEATURES")
    graph = words("WKS_FILE_DEPENDS") | words("DEPENDS") | words("EXTRA_IMAGEDEPENDS") | words("IMAGE_INSTALL")
    if "packagegroup-core-boot" in graph and efi:
        # Its own EFI_PROVIDER: the configuration's, or the packagegroup's default, never the image recipe's.
        packagegroup = resolve_assignments([*global_conf, ("EFI_PROVIDER", "??=", "grub-efi")], overrides)
        graph |= words("EFI_PROVIDER", packagegroup) | {"kernel"}
    wks_file = expand_value(values["WKS_FILE"], values)
    parts = [expand_value(line, values) for line in (LAYER / "wic" / wks_file).read_text().splitlines()
             if line.startswith("part ")]
    loaders = [m.group(1) for line in parts if "bootimg-efi" in line for m in [re.search(r"loader=([\w-]+)", line)]
               if m]
    return ImageBoot(efi=efi, wks_file=wks_file, loaders=loaders, graph=graph)
