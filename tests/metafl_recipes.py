"""Read meta-fl's recipes and the agent's imports without bitbake: what the meta-fl tests share.

The recipe reader understands the subset of bitbake syntax meta-fl uses (`VAR = "..."`, `+=`, `?=`, `:=`,
backslash continuations, `VAR:override`); it is not a general parser. The bitbake test
(tests/test_metafl_bitbake.py) checks the same facts with a real parse when a poky checkout is at hand.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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
    out: list[tuple[str, str, str]] = []
    in_function = False
    for line in _logical_lines(path.read_text()):
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
