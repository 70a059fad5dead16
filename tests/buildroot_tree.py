"""Read buildroot-external/ without Buildroot: genimage configs, defconfigs, package files.

What the Buildroot tests share. The genimage reader understands the subset of libconfuse syntax the board
files use (sections `name { ... }` with an optional title, `key = value`, `#` comments, the `#BOOT_FILES#`
placeholder of the Raspberry Pi template); it is not a general parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXTERNAL = REPO / "buildroot-external"
BOARDS = EXTERNAL / "board" / "fl-edge"
PACKAGES = ("onnxruntime", "python-fl-agent", "python-prometheus-client")
DEFCONFIGS = {
    "fl_qemu_x86_64_defconfig": BOARDS / "qemu-x86_64" / "genimage.cfg",
    "fl_raspberrypi4_64_defconfig": BOARDS / "raspberrypi4-64" / "genimage.cfg.in",
}

# Third-party import name of the agent -> the Buildroot package that provides it (upstream 2026.02, or this
# tree: onnxruntime, python-prometheus-client).
BUILDROOT_PACKAGES = {
    "aiohttp": "python-aiohttp",
    "bcrypt": "python-bcrypt",
    "cbor2": "python-cbor2",
    "cryptography": "python-cryptography",
    "nacl": "python-pynacl",
    "numpy": "python-numpy",
    "onnxruntime": "onnxruntime",
    "prometheus_client": "python-prometheus-client",
    "pyudev": "python-pyudev",
    "yaml": "python-pyyaml",
}
# Standard-library modules Buildroot's python3 builds only when an option asks for them.
PYTHON3_OPTIONS = {
    "ssl": "BR2_PACKAGE_PYTHON3_SSL",
    "zlib": "BR2_PACKAGE_PYTHON3_ZLIB",
    "gzip": "BR2_PACKAGE_PYTHON3_ZLIB",
    "sqlite3": "BR2_PACKAGE_PYTHON3_SQLITE",
    "decimal": "BR2_PACKAGE_PYTHON3_DECIMAL",
    "unicodedata": "BR2_PACKAGE_PYTHON3_UNICODEDATA",
    "bz2": "BR2_PACKAGE_PYTHON3_BZIP2",
    "lzma": "BR2_PACKAGE_PYTHON3_XZ",
    "readline": "BR2_PACKAGE_PYTHON3_READLINE",
    "curses": "BR2_PACKAGE_PYTHON3_CURSES",
    "xml": "BR2_PACKAGE_PYTHON3_PYEXPAT",
}


def kconfig_symbol(package: str) -> str:
    """BR2_PACKAGE_* of a Buildroot package name (python-foo-bar -> BR2_PACKAGE_PYTHON_FOO_BAR)."""
    return "BR2_PACKAGE_" + package.upper().replace("-", "_")


@dataclass
class Section:
    """One `kind [title] { ... }` block of a genimage config."""

    kind: str
    title: str
    options: dict[str, str] = field(default_factory=dict)
    children: list[Section] = field(default_factory=list)

    def child(self, kind: str) -> Section:
        found = [c for c in self.children if c.kind == kind]
        assert len(found) == 1, f"{self.kind} {self.title}: expected one {kind} section, found {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[Section]:
        return [c for c in self.children if c.kind == kind]


_TOKEN = re.compile(r'\s*(?:(?P<str>"[^"]*")|(?P<brace>[{}])|(?P<eq>=)|(?P<word>[^\s{}="]+))')


def parse_genimage(text: str) -> Section:
    """The top-level sections of a genimage config (images), as a tree under a root Section."""
    src = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            if src[pos:].strip() == "":
                break
            raise ValueError(f"genimage config: cannot read {src[pos:pos + 40]!r}")
        pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        tokens.append((kind, m.group(kind)))
    root = Section("root", "")
    stack = [root]
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "brace" and value == "}":
            stack.pop()
            i += 1
        elif kind in ("word", "str") and i + 1 < len(tokens) and tokens[i + 1][0] == "eq":
            raw = tokens[i + 2][1] if i + 2 < len(tokens) else ""
            if tokens[i + 2][0] == "brace":  # a list: files = { "a", "b" }
                j = i + 3
                while tokens[j][1] != "}":
                    j += 1
                stack[-1].options[value] = " ".join(t[1].strip('"') for t in tokens[i + 3:j] if t[0] == "str")
                i = j + 1
            else:
                stack[-1].options[value] = raw.strip('"')
                i += 3
        elif kind == "word":
            title = ""
            j = i + 1
            if tokens[j][0] in ("word", "str"):
                title = tokens[j][1].strip('"')
                j += 1
            assert tokens[j] == ("brace", "{"), f"genimage config: expected '{{' after {value} {title}"
            section = Section(value, title)
            stack[-1].children.append(section)
            stack.append(section)
            i = j + 1
        else:
            raise ValueError(f"genimage config: unexpected {value!r}")
    assert len(stack) == 1, "genimage config: unbalanced braces"
    return root


def read_genimage(path: Path) -> Section:
    # The Raspberry Pi template's placeholder becomes an empty file list.
    return parse_genimage(path.read_text().replace("#BOOT_FILES#", ""))


def read_defconfig(name: str) -> dict[str, str]:
    """Symbol -> value ('y', a string without quotes, or 'n' for `# X is not set`)."""
    values: dict[str, str] = {}
    for line in (EXTERNAL / "configs" / name).read_text().splitlines():
        if m := re.match(r"# (BR2_\w+) is not set$", line):
            values[m.group(1)] = "n"
        elif m := re.match(r"(BR2_\w+)=(.*)$", line):
            values[m.group(1)] = m.group(2).strip('"')
    return values


def expand_external(value: str) -> Path:
    """A defconfig path written with $(BR2_EXTERNAL_FL_EDGE_PATH), resolved against this checkout."""
    return Path(value.replace("$(BR2_EXTERNAL_FL_EDGE_PATH)", str(EXTERNAL))).resolve()


def mk_value(package: str, var: str) -> str:
    """The value of a `VAR = ...` assignment (backslash continuations joined) in package/<p>/<p>.mk."""
    text = (EXTERNAL / "package" / package / f"{package}.mk").read_text().replace("\\\n", " ")
    m = re.search(rf"^{re.escape(var)}\s*=\s*(.*)$", text, re.M)
    assert m, f"{package}.mk does not set {var}"
    return " ".join(m.group(1).split())


def config_selects(package: str) -> set[str]:
    """The symbols package/<p>/Config.in selects."""
    text = (EXTERNAL / "package" / package / "Config.in").read_text()
    return set(re.findall(r"^\tselect (BR2_\w+)", text, re.M))
