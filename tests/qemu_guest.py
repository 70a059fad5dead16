"""A throw-away QEMU guest for kernel behaviour this host cannot show (cgroup v2 memory, power cuts).

The guest is the Debian kernel the image ships, booted directly with an initramfs made of busybox, the host's
Python 3 (binary, shared libraries, stdlib without tests/tk/idle) and the files a test adds. No disk image, no
systemd: a test's init script does what it needs and powers off. Used by tests/test_budget_qemu.py,
tests/test_outbox_powercut.py and tests/test_cameras_qemu.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOOT_TIMEOUT = 400  # TCG on a busy 2-core machine
PY_VERSION = f"python{sys.version_info.major}.{sys.version_info.minor}"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (tools/host-packages.txt)")
    return path


def system_python() -> Path:
    python = Path("/usr/bin") / PY_VERSION
    if not python.exists():
        pytest.skip(f"{python} (the system Python the guest reuses) is not installed")
    return python


def cache_dir() -> Path:
    sys.path.insert(0, str(REPO / "tools"))
    from flctl.image.cache import cache_root

    path = cache_root() / "qemu-guest"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class GuestKernel:
    vmlinux: Path
    modules: list[Path]  # .ko files in load order


def kernel(modules: tuple[str, ...] = ()) -> GuestKernel:
    """The Debian kernel the image ships (uncompressed, for PVH boot) and ``modules`` with their
    dependencies, in load order. Downloaded once with apt and cached."""
    sys.path.insert(0, str(REPO / "tools"))
    from flctl.image import kernel as image_kernel

    cache = cache_dir()
    try:
        package = image_kernel.resolve_kernel_package()
    except image_kernel.KernelError as exc:
        pytest.skip(f"no Debian kernel package available from apt: {exc}")
    stem = f"{package.name}_{package.version}"
    vmlinux = cache / f"{stem}.vmlinux"
    extracted = cache / f"{stem}.tree"
    if not extracted.exists():
        deb = image_kernel.download_deb(package, cache)
        scratch = cache / f"{stem}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        image_kernel.extract_deb(deb, scratch)
        kver = next((scratch / "lib" / "modules").iterdir()).name
        subprocess.run(["depmod", "-b", str(scratch), kver], check=True)
        scratch.rename(extracted)
    if not vmlinux.exists():  # written aside and renamed: a run killed mid-write leaves no truncated kernel
        bzimage = next((extracted / "boot").glob("vmlinuz-*")).read_bytes()
        partial = vmlinux.with_suffix(".partial")
        partial.write_bytes(image_kernel.extract_vmlinux(bzimage))
        partial.replace(vmlinux)
    kver = next((extracted / "lib" / "modules").iterdir()).name
    order = image_kernel.module_load_order(extracted, kver, modules) if modules else []
    return GuestKernel(vmlinux, [extracted / "lib" / "modules" / kver / rel for rel in order])


def appliance_package() -> dict[str, Path]:
    """Every module of the `appliance` package, subpackages included, at /app/appliance in the guest. Copying
    the whole package (a few hundred kB) rather than a hand-kept list means a new module a guest imports
    indirectly cannot be forgotten (one was, and broke two guest tests; then a subpackage was)."""
    package = REPO / "appliance"
    return {f"/app/appliance/{p.relative_to(package)}": p for p in sorted(package.rglob("*.py"))}


_FIND_PACKAGES = r"""
import importlib, importlib.metadata, json, sys
from pathlib import Path
before = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module(name)
site = [Path(p) for p in sys.path if p.endswith("site-packages")]
loaded = {Path(m.__file__).resolve() for n, m in list(sys.modules.items())
          if n not in before and getattr(m, "__file__", None)}
tops = {path.relative_to(s.resolve()).parts[0] for path in loaded for s in site if path.is_relative_to(s.resolve())}
names = {top.split(".")[0] for top in tops}
owners = importlib.metadata.packages_distributions()
entries = set(tops)
for dist in {d for name in names for d in owners.get(name, [])} - {"fl-edge"}:
    for file in importlib.metadata.distribution(dist).files or []:
        top = file.parts[0]
        if top != ".." and not top.endswith(".dist-info") and top != "__pycache__":
            entries.add(top)  # a wheel's bundled libraries (numpy.libs) and its other top-level modules
print(json.dumps({top: str(s / top) for top in sorted(entries) for s in site if (s / top).exists()}))
"""


def python_packages(*modules: str) -> dict[str, Path]:
    """What importing ``modules`` loads from the venv's site-packages, whole distributions with the libraries
    their wheels bundle, at /app/<name> in the guest (put /app on sys.path). The guest's system Python has the
    venv's version, so the compiled extensions load. Found by a fresh interpreter, so this process's own
    imports do not count."""
    found = subprocess.run([sys.executable, "-c", _FIND_PACKAGES, *modules], capture_output=True, text=True,
                           check=True).stdout
    return {f"/app/{top}": Path(path) for top, path in json.loads(found).items()}


def _shared_libs(binary: Path) -> set[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    return {Path(p) for p in re.findall(r"(/\S+\.so[\w.]*)", out)}


def guest_module_paths(modules: list[Path]) -> list[str]:
    """Where `initramfs` puts ``modules`` in the guest, in load order."""
    return [f"/lib/modules/{i:02d}-{module.name}" for i, module in enumerate(modules)]


def initramfs(work: Path, init: str, files: dict[str, str | Path], modules: list[Path] = ()) -> Path:
    """An initramfs with busybox, the system Python, ``files`` (guest path -> text, or a host file or
    directory to copy, with the shared libraries its extension modules need), ``modules`` at
    `guest_module_paths` and ``init`` as /init. Returns the cpio archive."""
    python = system_python()
    root = work / "initramfs"
    stdlib = Path("/usr/lib") / PY_VERSION
    for d in ("bin", "usr/bin", "proc", "sys", "dev", "tmp", "etc", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(need("busybox"), root / "bin" / "busybox")
    shutil.copy2(python, root / "usr" / "bin" / "python3")
    skip = {"test", "idlelib", "tkinter", "ensurepip", "lib2to3", "pydoc_data", "distutils", "site-packages",
            "dist-packages", "__pycache__", "turtledemo", f"config-{PY_VERSION[6:]}-x86_64-linux-gnu"}
    shutil.copytree(stdlib, root / "usr" / "lib" / PY_VERSION,
                    ignore=lambda _d, names: [n for n in names if n in skip])
    libs = _shared_libs(python)
    for ext in (stdlib / "lib-dynload").glob("*.so"):
        libs |= _shared_libs(ext)
    for content in files.values():
        if isinstance(content, Path) and content.is_dir():  # a package's own bundled libs travel with it
            for ext in content.rglob("*.so"):
                libs |= {lib for lib in _shared_libs(ext) if content.name not in str(lib)}
    for lib in libs:
        target = root / lib.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), target)
    for module, guest_path in zip(modules, guest_module_paths(modules), strict=True):
        shutil.copy2(module, root / guest_path.lstrip("/"))
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nagent:x:1000:1000::/tmp:/bin/sh\n")
    for guest_path, content in files.items():
        target = root / guest_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path) and content.is_dir():
            shutil.copytree(content, target, ignore=shutil.ignore_patterns("__pycache__", "tests", "*.pyi"))
        elif isinstance(content, Path):
            shutil.copy2(content, target)
        else:
            target.write_text(content)
    (root / "init").write_text(init)
    (root / "init").chmod(0o755)
    archive = work / "initrd.cpio"
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with open(archive, "wb") as fh:
        subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"], input="\n".join(names).encode(),
                       cwd=root, stdout=fh, check=True)
    return archive


def marked(console: str, tag: str) -> list[str]:
    """What the guest printed after ``tag`` + space, one item per line. The marker may follow other output on
    its line: the firmware's "Booting from ROM.." ends without a newline, so the guest's first line does too."""
    return [line.split(f"{tag} ", 1)[1] for line in console.splitlines() if f"{tag} " in line]


def boot(guest_kernel: GuestKernel, initrd: Path, *, append: str = "", extra: list[str] = (),
         memory_mb: int = 768) -> str:
    """Boot the guest until it powers off; return the serial console output."""
    qemu = need("qemu-system-x86_64")
    # -cpu max: numpy 2 wheels need x86-64-v2 (SSE4.2, POPCNT); QEMU's default qemu64 CPU lacks them
    cmd = [qemu, "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mb), "-smp", "2", "-nographic",
           "-no-reboot", "-nic", "none", "-kernel", str(guest_kernel.vmlinux), "-initrd", str(initrd),
           "-append", f"console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init {append}".strip(), *extra]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BOOT_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"guest did not finish within {BOOT_TIMEOUT} s; console tail:\n{out[-3000:]}")
    return done.stdout
