"""meta-fl's structure, checked without bitbake: what a Yocto engineer adding the layer relies on.

Cheap and always on. tests/test_metafl_bitbake.py runs the real parse when a poky checkout is at hand.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from metafl_recipes import (
    FL_AGENT_RECIPE,
    LAYER,
    REPO,
    STDLIB_PACKAGES,
    THIRD_PARTY_RECIPES,
    agent_imports,
    build_configs,
    function_body,
    image_boot,
    layer_conf,
    meta_fl_recipe_files,
    meta_fl_recipe_names,
    package_for_import,
    recipe_assignments,
    recipe_value,
)

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OVERLAY = REPO / "rootfs-overlay"
IMAGES = LAYER / "recipes-core" / "images"
# Versions the pinned scarthgap layers build with (oe-core python3-setuptools_69.1.1.bb).
SCARTHGAP_SETUPTOOLS = (69, 1, 1)


def test_layer_conf_has_the_standard_fields() -> None:
    conf = layer_conf()
    assert conf["BBFILE_COLLECTIONS"] == "fl"
    assert conf["BBFILE_PATTERN_fl"] == "^${LAYERDIR}/"
    assert conf["BBFILE_PRIORITY_fl"].isdigit()
    assert conf["LAYERVERSION_fl"].isdigit()
    assert set(conf["LAYERDEPENDS_fl"].split()) == {"core", "openembedded-layer", "meta-python", "meta-onnxruntime"}
    assert "scarthgap" in conf["LAYERSERIES_COMPAT_fl"].split()
    assert conf["BBPATH"] == ":${LAYERDIR}"


def test_every_recipe_is_inside_the_bbfiles_globs() -> None:
    """A recipe outside BBFILES is silently never parsed."""
    globs = [g.replace("${LAYERDIR}/", "") for g in layer_conf()["BBFILES"].split()]
    for path in meta_fl_recipe_files():
        rel = str(path.relative_to(LAYER))
        assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), \
            f"{rel} matches none of BBFILES {globs}: bitbake would never see it"


def test_every_local_src_uri_file_exists() -> None:
    for recipe in meta_fl_recipe_files():
        src_uri = recipe_value(recipe, "SRC_URI")
        entries = [e.split(";")[0].removeprefix("file://") for e in src_uri.split() if e.startswith("file://")]
        search = [recipe.parent / recipe.stem.split("_")[0], recipe.parent / "files"]
        if "FL_EDGE_SRCDIR" in recipe.read_text():
            search.insert(0, REPO)
        for entry in entries:
            assert any((base / entry).exists() for base in search), \
                f"{recipe.name}: SRC_URI file://{entry} is in none of {[str(s) for s in search]}"


def test_fl_agent_recipe_version_is_the_project_version() -> None:
    assert FL_AGENT_RECIPE is not None, "meta-fl/recipes-fl/fl-agent/fl-agent_<version>.bb is missing"
    version = FL_AGENT_RECIPE.stem.split("_", 1)[1]
    assert version == PYPROJECT["project"]["version"], \
        f"rename {FL_AGENT_RECIPE.name} to fl-agent_{PYPROJECT['project']['version']}.bb"


def test_pyproject_builds_with_scarthgap_setuptools() -> None:
    """The recipe builds the wheel with the layers' setuptools 69: a newer floor, or PEP 639 licence
    metadata (a string `license`), fails do_compile although pip on a laptop builds it fine."""
    for req in PYPROJECT["build-system"]["requires"]:
        m = re.fullmatch(r"setuptools\s*>=\s*([\d.]+)", req)
        if m:
            floor = tuple(int(x) for x in m.group(1).split("."))
            assert floor <= SCARTHGAP_SETUPTOOLS, f"build-system requires {req}; scarthgap has setuptools 69.1.1"
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    assert isinstance(PYPROJECT["project"]["license"], dict), \
        "a string licence (PEP 639) needs setuptools >= 77; scarthgap has 69.1.1: keep license = { text = ... }"


def test_fl_agent_rdepends_cover_every_agent_import() -> None:
    imports = agent_imports()
    if not imports:
        pytest.skip("appliance/ has no modules yet")
    rdepends = set(recipe_value(FL_AGENT_RECIPE, "RDEPENDS:${PN}").split())
    missing: dict[str, list[str]] = {}
    unknown: list[str] = []
    for imp in imports:
        where = f"{imp.path.relative_to(REPO)}:{imp.line}"
        try:
            package = package_for_import(imp.module)
        except KeyError as exc:
            unknown.append(f"{where}: {exc}")
            continue
        if package not in rdepends:
            missing.setdefault(package, []).append(f"{imp.module} ({where})")
    assert not unknown, "imports with no known Yocto package:\n" + "\n".join(unknown)
    assert not missing, "RDEPENDS:${PN} of fl-agent lacks:\n" + "\n".join(
        f"{pkg}: {', '.join(uses)}" for pkg, uses in sorted(missing.items()))


def test_import_map_knows_the_agent_dependencies_of_pyproject() -> None:
    """Every runtime requirement of the agent (core + [agent] extra) has a recipe in the map."""
    reqs = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["agent"]
    distributions = {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() for r in reqs}
    import_names = {"pynacl": "nacl", "prometheus-client": "prometheus_client", "pyyaml": "yaml"}
    for dist in distributions:
        assert import_names.get(dist, dist) in THIRD_PARTY_RECIPES, f"{dist} has no recipe in THIRD_PARTY_RECIPES"


def test_every_rdepends_name_comes_from_a_known_recipe() -> None:
    """Names must come from the pinned layers (the maps, checked by bitbake -g) or from meta-fl itself."""
    known = set(THIRD_PARTY_RECIPES.values()) | set(STDLIB_PACKAGES.values()) | meta_fl_recipe_names()
    for recipe in meta_fl_recipe_files():
        for var, _, value in recipe_assignments(recipe):
            if var.startswith("RDEPENDS"):
                for name in value.split():
                    assert name in known, f"{recipe.name}: {var} names {name}, which no pinned layer provides"


def test_every_overlay_file_is_installed_by_the_recipe() -> None:
    files = sorted(p.relative_to(OVERLAY).as_posix() for p in OVERLAY.rglob("*") if p.is_file())
    assert files, "rootfs-overlay/ is empty"
    body = function_body(FL_AGENT_RECIPE, "do_install:append")
    missing = [f for f in files if "${FL_OVERLAY}/" + f not in body]
    assert not missing, "rootfs-overlay files the fl-agent recipe does not install:\n" + "\n".join(missing)


def test_every_unit_the_recipe_installs_is_enabled_through_systemd_service() -> None:
    units = {p.name for p in (OVERLAY / "usr/lib/systemd/system").glob("*") if p.suffix in (".service", ".mount")}
    assert set(recipe_value(FL_AGENT_RECIPE, "SYSTEMD_SERVICE:${PN}").split()) == units


def test_install_step_ships_the_agent_and_nothing_of_the_host_side(tmp_path: Path) -> None:
    """Build the wheel as do_compile does, install it, run the recipe's do_install:append: the package
    holds fl-agent, the overlay and the mount points, and no aggregator or flctl."""
    dist, dest, src = tmp_path / "dist", tmp_path / "image", tmp_path / "fl-edge"
    # The recipe's S: exactly the SRC_URI entries, so a file the build needs but SRC_URI lacks fails here.
    for entry in recipe_value(FL_AGENT_RECIPE, "SRC_URI").split():
        rel = entry.split(";")[0].removeprefix("file://")
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / rel).is_dir():
            shutil.copytree(REPO / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / rel, src / rel)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(dist), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(dist.glob("fl_edge-*.whl"))
    # --ignore-installed: the venv holds fl-edge already (editable), and pip would skip the wheel.
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                              "--ignore-installed", "--root", str(dest), "--prefix", "/usr",
                              "--no-warn-script-location", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    site = f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    variables = {
        "D": str(dest), "PYTHON_SITEPACKAGES_DIR": site, "bindir": "/usr/bin",
        "PV": PYPROJECT["project"]["version"], "FL_OVERLAY": str(src / "rootfs-overlay"),
        "systemd_system_unitdir": "/usr/lib/systemd/system", "systemd_unitdir": "/usr/lib/systemd",
        "nonarch_libdir": "/usr/lib", "nonarch_base_libdir": "/usr/lib", "sysconfdir": "/etc", "localstatedir": "/var",
    }
    body = function_body(FL_AGENT_RECIPE, "do_install:append")
    for name, value in variables.items():
        body = body.replace("${" + name + "}", value)
    assert "${" not in body, f"variables the test does not know: {set(re.findall(r'[$][{][^}]+[}]', body))}"
    # Ownership needs pseudo and the fl-agent user; the modes and paths are what matter here.
    body = body.replace("-o fl-agent -g fl-agent ", "")
    run = subprocess.run(["bash", "-euc", body], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr

    installed = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert "usr/bin/fl-agent" in installed
    assert not [p for p in installed if "/aggregator/" in p or "/flctl/" in p or (p.startswith("usr/bin/fl")
                and p != "usr/bin/fl-agent")], "host-side code left in the package"
    assert any(p.startswith(site.lstrip("/") + "/appliance/") for p in installed)
    entry_points = next(dest.glob(f"{site.lstrip('/')}/fl_edge-*.dist-info/entry_points.txt")).read_text()
    assert "fl-agent" in entry_points and "flctl" not in entry_points and "fl-aggregator" not in entry_points
    for rel in (p.relative_to(OVERLAY).as_posix() for p in OVERLAY.rglob("*") if p.is_file()):
        assert rel in installed, f"rootfs-overlay/{rel} is not installed at /{rel}"
    assert (dest / "data").is_dir() and (dest / "var/lib/fl-agent").is_dir()


def _wks_partitions(path: Path) -> list[dict[str, str]]:
    parts = []
    for line in path.read_text().splitlines():
        if line.startswith("part "):
            tokens = re.findall(r'(--[\w-]+)(?:[= ]("[^"]*"|[^\s-][^\s]*))?|(\S+)', line.removeprefix("part "))
            options = {flag: value.strip('"') for flag, value, _ in tokens if flag}
            bare = [word for flag, _, word in tokens if not flag and word]
            options["mountpoint"] = bare[0] if bare else ""
            parts.append(options)
    return parts


@pytest.mark.parametrize("wks", sorted(p.name for p in (LAYER / "wic").glob("*.wks*")))
def test_wks_layout_is_what_flctl_flash_expects(wks: str) -> None:
    """GPT with partitions named fl-root and fl-data (flctl finds them by GPT name; the device mounts
    /data by the fl-data filesystem label; wic uses --label for both)."""
    path = LAYER / "wic" / wks
    assert re.search(r"^bootloader .*--ptable gpt", path.read_text(), re.M), f"{wks}: not a GPT layout"
    parts = {p.get("--label"): p for p in _wks_partitions(path)}
    assert parts["fl-root"]["mountpoint"] == "/" and parts["fl-root"]["--source"] == "rootfs"
    data = parts["fl-data"]
    assert data["--fstype"] == "ext4" and "--source" not in data
    assert data["mountpoint"] == "", "a /data mountpoint would add an fstab entry next to data.mount"
    for var in re.findall(r"\$\{(\w+)\}", path.read_text()):
        if var.startswith("FL_"):
            assert re.search(rf"^{var} \?=", (IMAGES / "fl-image.inc").read_text(), re.M), f"{var} is never set"


def test_every_build_configuration_depends_on_the_loader_its_wks_asks_for() -> None:
    """For each kas file (and qemuarm64 with the common settings): an EFI machine gets a disk with an EFI
    loader, a machine without EFI gets none, and the loader is in fl-image's dependency graph, because
    do_image_wic copies it from the deploy directory and fails at the build's last step when it is not there.
    Machine facts come from metafl_recipes.MACHINES, which tests/test_metafl_bitbake.py checks with bitbake."""
    pytest.importorskip("yaml", reason="PyYAML is not installed")
    problems = []
    for config in build_configs():
        boot = image_boot(config)
        if boot.efi != bool(boot.loaders):
            problems.append(f"{config.name} ({config.machine}, efi={boot.efi}): {boot.wks_file} asks for "
                            f"EFI loaders {boot.loaders}")
        problems += [f"{config.name} ({config.machine}): {boot.wks_file} asks for loader={loader}, which "
                     "fl-image does not depend on: do_image_wic would fail"
                     for loader in boot.loaders if loader not in boot.graph]
    assert not problems, "\n".join(problems)


def test_production_image_is_read_only_and_has_no_debug_features() -> None:
    inc = IMAGES / "fl-image.inc"
    assert "read-only-rootfs" in recipe_value(inc, "IMAGE_FEATURES").split()
    assert "fl-agent" in recipe_value(inc, "IMAGE_INSTALL").split()
    assert {"wic.zst", "wic.bmap"} <= set(recipe_value(inc, "IMAGE_FSTYPES").split())
    removed = set(recipe_value(IMAGES / "fl-image.bb", "IMAGE_FEATURES:remove").split())
    assert {"debug-tweaks", "package-management", "empty-root-password", "allow-root-login"} <= removed


def test_kas_files_pin_every_layer_to_a_commit() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    kas_dir = LAYER / "kas"
    readme = (LAYER / "README").read_text()
    conf = layer_conf()
    for path in sorted(kas_dir.glob("fl-image-*.yml")):
        data = yaml.safe_load(path.read_text())
        for name, repo in (data.get("repos") or {}).items():
            if repo and repo.get("url"):
                assert re.fullmatch(r"[0-9a-f]{40}", repo.get("commit", "")), f"{path.name}: {name} is not pinned"
                assert repo["commit"] in readme, f"README does not list the pinned commit of {name}"
        for include in (data.get("header") or {}).get("includes", []):
            assert (REPO / include).is_file(), f"{path.name} includes {include}, which does not exist"
    common = yaml.safe_load((kas_dir / "fl-image-common.yml").read_text())
    layers = {layer for repo in common["repos"].values() for layer in (repo or {}).get("layers", {None: 0})}
    assert {"meta", "meta-oe", "meta-python", "meta-fl"} <= layers
    assert "meta-onnxruntime" in common["repos"], f"LAYERDEPENDS names {conf['LAYERDEPENDS_fl']}"
