"""`bitbake -g fl-image` against real checkouts of the pinned layers: every recipe and RDEPENDS resolves.

Needs checkouts that CI does not have (no network to fetch them), so it runs only when FL_YOCTO_LAYERS
names a directory holding poky/, meta-openembedded/ and meta-onnxruntime/ at the commits the kas files pin.
bitbake refuses to run as root: as root, set FL_YOCTO_USER to an unprivileged user that can read the
checkouts and this repository (the build directory is created for it). FL_YOCTO_BUILD keeps the build
directory, and with it bitbake's parse cache, between runs: a cold parse takes about 8 minutes on 2 cores,
a warm one about 10 s. Host tools: chrpath cpio diffstat gawk lz4 zstd, and the en_US.UTF-8 locale.

    FL_YOCTO_LAYERS=/work/yocto FL_YOCTO_USER=yoctobuild FL_YOCTO_BUILD=/work/yocto/build \\
        python -m pytest tests/test_metafl_bitbake.py
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from metafl_recipes import LAYER, STDLIB_PACKAGES, THIRD_PARTY_RECIPES, agent_imports, package_for_import

LAYERS_DIR = os.environ.get("FL_YOCTO_LAYERS")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),  # a cold parse under load took 22 minutes here
    pytest.mark.skipif(not LAYERS_DIR, reason="FL_YOCTO_LAYERS is not set: no poky/meta-openembedded checkout "
                       "to run bitbake against (CI cannot fetch one)"),
]

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
KAS = yaml.safe_load((LAYER / "kas" / "fl-image-common.yml").read_text())
BBLAYERS = ["poky/meta", "poky/meta-poky", "poky/meta-yocto-bsp", "meta-openembedded/meta-oe",
            "meta-openembedded/meta-python", "meta-onnxruntime"]
LOCAL_CONF = """\
MACHINE = "qemux86-64"
DISTRO = "poky"
INIT_MANAGER = "systemd"
MACHINE_FEATURES:append = " efi"
EFI_PROVIDER = "systemd-boot"
ONNXRUNTIME_TARGET_ARCH:pn-onnxruntime = "x86_64"
BB_NO_NETWORK = "1"
BB_NUMBER_THREADS = "2"
CONF_VERSION = "2"
"""


def layers_dir() -> Path:
    assert LAYERS_DIR is not None
    return Path(LAYERS_DIR)


def run_bitbake(build: Path, command: str) -> subprocess.CompletedProcess[str]:
    script = (f"export PATH=/usr/bin:/bin:/usr/sbin:/sbin LANG=en_US.UTF-8 LC_ALL=en_US.UTF-8; "
              f"source {shlex.quote(str(layers_dir() / 'poky' / 'oe-init-build-env'))} "
              f"{shlex.quote(str(build))} >/dev/null && {command}")
    argv = ["bash", "-c", script]
    if os.geteuid() == 0:
        argv = ["su", os.environ["FL_YOCTO_USER"], "-s", "/bin/bash", "-c", script]
    return subprocess.run(argv, capture_output=True, text=True, timeout=3600)


@pytest.fixture(scope="module")
def build_dir() -> Iterator[Path]:
    if os.geteuid() == 0 and not os.environ.get("FL_YOCTO_USER"):
        pytest.skip("running as root and FL_YOCTO_USER is not set: bitbake refuses to run as root")
    keep = os.environ.get("FL_YOCTO_BUILD")
    build = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="fl-bitbake-"))
    conf = build / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    layers = [str(layers_dir() / rel) for rel in BBLAYERS] + [str(LAYER)]
    (conf / "bblayers.conf").write_text('POKY_BBLAYERS_CONF_VERSION = "2"\nBBPATH = "${TOPDIR}"\nBBFILES ?= ""\n'
                                        'BBLAYERS ?= "' + " ".join(layers) + '"\n')
    (conf / "local.conf").write_text(LOCAL_CONF)
    if os.geteuid() == 0:
        shutil.chown(build, os.environ["FL_YOCTO_USER"])
        subprocess.run(["chown", "-R", os.environ["FL_YOCTO_USER"], str(build)], check=True)
    yield build
    if not keep:
        shutil.rmtree(build, ignore_errors=True)


@pytest.fixture(scope="module")
def graph(build_dir: Path) -> dict[str, str]:
    result = run_bitbake(build_dir, "bitbake -g fl-image")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return {
        "pn-buildlist": (build_dir / "pn-buildlist").read_text(),
        "task-depends.dot": (build_dir / "task-depends.dot").read_text(),
    }


def test_checkouts_are_at_the_pinned_commits() -> None:
    for name, repo in KAS["repos"].items():
        if not (repo or {}).get("commit"):
            continue
        head = subprocess.run(["git", "-c", "safe.directory=*", "-C", str(layers_dir() / name), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert head == repo["commit"], f"{name} is at {head}, the kas files pin {repo['commit']}"


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
