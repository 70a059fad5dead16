"""`bitbake -g fl-image` against real checkouts of the pinned layers, once per build configuration (each kas
machine file, and qemuarm64 with the common settings): every recipe and RDEPENDS resolves, and the boot loader
the disk image asks for is in the graph.

Needs checkouts that CI does not have (no network to fetch them), so it runs only when FL_YOCTO_LAYERS
names a directory holding poky/, meta-openembedded/ and meta-onnxruntime/ (and meta-raspberrypi/ for the
Raspberry Pi; a configuration whose layers are missing is skipped) at the commits the kas files pin.
The local.conf of each configuration is written from its kas files, as kas writes it.
bitbake refuses to run as root: as root, set FL_YOCTO_USER to an unprivileged user that can read the
checkouts and this repository (the build directories are created for it). FL_YOCTO_BUILD keeps the build
directories (one per configuration), and with them bitbake's parse cache, between runs: a cold parse takes
about 8 minutes on 2 cores, a warm one about 10 s. Host tools: chrpath cpio diffstat gawk lz4 zstd, ping
(the qemux86-64 file's testimage class wants it), and the en_US.UTF-8 locale.

    FL_YOCTO_LAYERS=/work/yocto FL_YOCTO_USER=yoctobuild FL_YOCTO_BUILD=/work/yocto/build \\
        python -m pytest tests/test_metafl_bitbake.py
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from metafl_recipes import (
    MACHINES,
    REPO,
    STDLIB_PACKAGES,
    THIRD_PARTY_RECIPES,
    BuildConfig,
    agent_imports,
    build_configs,
    image_boot,
    package_for_import,
)

LAYERS_DIR = os.environ.get("FL_YOCTO_LAYERS")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),  # a cold parse under load took 22 minutes here
    pytest.mark.skipif(not LAYERS_DIR, reason="FL_YOCTO_LAYERS is not set: no poky/meta-openembedded checkout "
                       "to run bitbake against (CI cannot fetch one)"),
]

pytest.importorskip("yaml", reason="PyYAML is not installed")
CONFIGS = build_configs()
SETTINGS = """\
BB_NO_NETWORK = "1"
BB_NUMBER_THREADS = "2"
CONF_VERSION = "2"
"""


def layers_dir() -> Path:
    assert LAYERS_DIR is not None
    return Path(LAYERS_DIR)


def bblayers(config: BuildConfig) -> list[Path]:
    """The layer directories of a configuration's kas repos: this repository's own, the others under
    FL_YOCTO_LAYERS/<repo name> (a repo that lists no layers is one layer itself, as in kas)."""
    paths = []
    for name, repo in config.repos.items():
        root = layers_dir() / name if (repo or {}).get("url") else REPO
        paths += [root / layer for layer in (repo or {}).get("layers") or {".": None}]
    return paths


def run_bitbake(build: Path, command: str) -> subprocess.CompletedProcess[str]:
    script = (f"export PATH=/usr/bin:/bin:/usr/sbin:/sbin LANG=en_US.UTF-8 LC_ALL=en_US.UTF-8; "
              f"source {shlex.quote(str(layers_dir() / 'poky' / 'oe-init-build-env'))} "
              f"{shlex.quote(str(build))} >/dev/null && {command}")
    argv = ["bash", "-c", script]
    if os.geteuid() == 0:
        argv = ["su", os.environ["FL_YOCTO_USER"], "-s", "/bin/bash", "-c", script]
    return subprocess.run(argv, capture_output=True, text=True, timeout=3600)


def env_value(env: str, var: str) -> str:
    """A variable's value in `bitbake -e` output (which escapes quotes and dollars, and ends wrapped lines
    with a backslash)."""
    m = re.search(rf'^{re.escape(var)}="((?:[^"\\]|\\.)*)"$', env, re.M | re.S)
    assert m, f"{var} is not in bitbake -e output"
    return re.sub(r"\\(.)", r"\1", m.group(1).replace(" \\\n", "\n"))


@pytest.fixture(scope="module", params=CONFIGS, ids=[c.name for c in CONFIGS])
def graph(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """pn-buildlist, task-depends.dot and `bitbake -e fl-image` for one configuration."""
    config: BuildConfig = request.param
    if os.geteuid() == 0 and not os.environ.get("FL_YOCTO_USER"):
        pytest.skip("running as root and FL_YOCTO_USER is not set: bitbake refuses to run as root")
    missing = [str(p) for p in bblayers(config) if not (p / "conf" / "layer.conf").is_file()]
    if missing:
        pytest.skip(f"{config.name}: layers not checked out: {', '.join(missing)}")
    keep = os.environ.get("FL_YOCTO_BUILD")
    build = Path(keep) / config.name if keep else Path(tempfile.mkdtemp(prefix="fl-bitbake-"))
    conf = build / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "bblayers.conf").write_text('POKY_BBLAYERS_CONF_VERSION = "2"\nBBPATH = "${TOPDIR}"\nBBFILES ?= ""\n'
                                        'BBLAYERS ?= "' + " ".join(map(str, bblayers(config))) + '"\n')
    (conf / "local.conf").write_text(f'MACHINE = "{config.machine}"\nDISTRO = "{config.distro}"\n'
                                     + config.local_conf + "\n" + SETTINGS)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", os.environ["FL_YOCTO_USER"], str(build)], check=True)
    result = run_bitbake(build, "bitbake -g fl-image && bitbake -e fl-image > fl-image.env")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    yield {
        "name": config.name,
        "pn-buildlist": (build / "pn-buildlist").read_text(),
        "task-depends.dot": (build / "task-depends.dot").read_text(),
        "env": (build / "fl-image.env").read_text(),
    }
    if not keep:
        shutil.rmtree(build, ignore_errors=True)


def test_checkouts_are_at_the_pinned_commits() -> None:
    pinned = {name: repo["commit"] for c in CONFIGS for name, repo in c.repos.items() if (repo or {}).get("commit")}
    for name, commit in pinned.items():
        if not (layers_dir() / name).is_dir():
            continue
        head = subprocess.run(["git", "-c", "safe.directory=*", "-C", str(layers_dir() / name), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert head == commit, f"{name} is at {head}, the kas files pin {commit}"


def test_wks_loader_is_in_the_graph(graph: dict[str, str]) -> None:
    """do_image_wic copies the EFI loader the wks names from the deploy directory: the loader's do_deploy
    must be in fl-image's task graph, or the image fails at its very last step."""
    wks = env_value(graph["env"], "_WKS_TEMPLATE")
    loaders = re.findall(r"loader=([\w-]+)", wks)
    for loader in loaders:
        assert f'"{loader}.do_deploy"' in graph["task-depends.dot"], \
            f"{graph['name']}: the wks asks for loader={loader}, which is not in fl-image's task graph"
    assert "${" not in "\n".join(line for line in wks.splitlines() if line.startswith("part ")), wks


def test_host_model_of_the_boot_path_matches_bitbake(graph: dict[str, str]) -> None:
    """tests/test_metafl_layer.py predicts the wks and its loader from metafl_recipes.MACHINES without
    bitbake; bitbake must agree, or the table is wrong for the pinned layers."""
    config = next(c for c in CONFIGS if c.name == graph["name"])
    predicted = image_boot(config)
    env = graph["env"]
    assert env_value(env, "WKS_FILE") == predicted.wks_file
    assert re.findall(r"loader=([\w-]+)", env_value(env, "_WKS_TEMPLATE")) == predicted.loaders
    machine = MACHINES[config.machine]
    overrides = set(env_value(env, "MACHINEOVERRIDES").split(":"))
    assert machine.overrides <= overrides, f"{config.machine}: MACHINEOVERRIDES are {sorted(overrides)}"
    assert ("efi" in env_value(env, "MACHINE_FEATURES").split()) == predicted.efi


def test_fl_image_depends_on_fl_agent_and_every_module_it_imports(graph: dict[str, str]) -> None:
    recipes = set(graph["pn-buildlist"].split())
    dot = graph["task-depends.dot"]
    # Standard-library modules come from the python3 recipe's split packages, the others from their recipes.
    providers = {package_for_import(i.module) for i in agent_imports()}
    needed = {"fl-agent", "python3"} | (providers & set(THIRD_PARTY_RECIPES.values()))
    for recipe in sorted(needed):
        assert recipe in recipes, f"{recipe} is not in fl-image's pn-buildlist"
        assert f'"{recipe}.do_package_write_rpm"' in dot or f'"{recipe}.do_build"' in dot, \
            f"{recipe} has no task in task-depends.dot"


def _manifest_packages(manifest: dict, module: str) -> list[str]:
    prefix = "${libdir}/python${PYTHON_MAJMIN}/"
    owners: dict[str, set[str]] = {}
    for pkg, entry in manifest.items():
        for f in entry["files"]:
            if f.startswith(prefix):
                owners.setdefault(f[len(prefix):].rstrip("/"), set()).add(f"python3-{pkg}")
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        path = "/".join(parts[:n])
        for candidate in (path + ".py", path):
            if candidate in owners:
                return sorted(owners[candidate])
    for rel, pkgs in owners.items():
        if rel.startswith("lib-dynload/") and rel.split("/")[1].split(".")[0] in (module, "_" + module):
            return sorted(pkgs)
    return ["python3-core"] if module in sys.builtin_module_names else ["python3-misc"]


def test_stdlib_table_matches_oe_core_python3_manifest() -> None:
    path = layers_dir() / "poky/meta/recipes-devtools/python/python3/python3-manifest.json"
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    manifest = json.loads(text)
    wrong = {mod: (pkg, _manifest_packages(manifest, mod)) for mod, pkg in STDLIB_PACKAGES.items()
             if pkg not in _manifest_packages(manifest, mod)}
    assert not wrong, f"STDLIB_PACKAGES disagrees with python3-manifest.json (table, manifest): {wrong}"
