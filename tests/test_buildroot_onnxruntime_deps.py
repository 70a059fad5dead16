"""onnxruntime-deps.sh, the onnxruntime package's download hooks, on a stand-in source archive: it takes the
third-party archives cmake/deps.txt lists (here already in the download directory, so nothing is fetched),
refuses one whose SHA1 differs from deps.txt's, skips those named in ONNXRUNTIME_DEPS_SKIP, and points
deps.txt at the local files so that the cmake configure step needs no network."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

from buildroot_tree import EXTERNAL

SCRIPT = EXTERNAL / "package" / "onnxruntime" / "onnxruntime-deps.sh"
TOP = "onnxruntime-1.25.0"


def stand_in(tmp_path: Path, archives: dict[str, bytes]) -> tuple[Path, str]:
    """A source archive whose cmake/deps.txt lists `archives` (name -> content) plus a skipped entry."""
    lines = ["#Name;Url;SHA1", "# a comment line"]
    for name, content in archives.items():
        lines.append(f"{name};https://example.invalid/{name}/archive/v1.0.zip;{hashlib.sha1(content).hexdigest()}")
    lines.append("protoc_win64;https://example.invalid/protoc-win64.zip;" + "0" * 40)
    deps_txt = "\n".join(lines) + "\n"
    src = tmp_path / "src" / TOP / "cmake"
    src.mkdir(parents=True)
    (src / "deps.txt").write_text(deps_txt)
    tarball = tmp_path / f"{TOP}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "src" / TOP, arcname=TOP)
    return tarball, deps_txt


def run(*args: str, skip: str = "protoc_win64") -> subprocess.CompletedProcess[str]:
    # WGET fails loudly: the archives are in place, so nothing may be downloaded.
    env = {**os.environ, "ONNXRUNTIME_DEPS_SKIP": skip, "WGET": "false"}
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True)


def test_fetch_checks_every_archive_against_deps_txt(tmp_path):
    archives = {"abseil_cpp": b"abseil", "protobuf": b"protobuf"}
    tarball, _ = stand_in(tmp_path, archives)
    dest = tmp_path / "dl" / "deps-1.25.0"
    dest.mkdir(parents=True)
    for name, content in archives.items():
        (dest / f"{name}-v1.0.zip").write_bytes(content)
    result = run("fetch", str(tarball), TOP, str(dest))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["abseil_cpp-v1.0.zip", "deps.txt", "protobuf-v1.0.zip"]

    (dest / "protobuf-v1.0.zip").write_bytes(b"tampered")
    result = run("fetch", str(tarball), TOP, str(dest))
    assert result.returncode != 0
    assert "protobuf-v1.0.zip: SHA1 is not" in result.stderr
    assert not (dest / "protobuf-v1.0.zip").exists(), "a file that fails its check must not stay for the build"


def test_fetch_downloads_what_is_missing_and_not_what_is_skipped(tmp_path):
    tarball, _ = stand_in(tmp_path, {"onnx": b"onnx"})
    dest = tmp_path / "dl"
    result = run("fetch", str(tarball), TOP, str(dest))
    assert result.returncode != 0, "WGET=false: the missing onnx archive had to be downloaded"
    result = run("fetch", str(tarball), TOP, str(dest), skip="protoc_win64 onnx")
    assert result.returncode == 0, result.stderr


def test_localize_points_deps_txt_at_the_downloaded_files(tmp_path):
    _, deps_txt = stand_in(tmp_path, {"abseil_cpp": b"abseil", "re2": b"re2"})
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "abseil_cpp-v1.0.zip").write_bytes(b"abseil")
    extracted = tmp_path / "deps.txt"
    extracted.write_text(deps_txt)
    result = run("localize", str(extracted), str(dest))
    assert result.returncode == 0, result.stderr
    rows = {line.split(";")[0]: line.split(";") for line in extracted.read_text().splitlines()}
    assert rows["abseil_cpp"][1] == f"{dest}/abseil_cpp-v1.0.zip"
    assert rows["abseil_cpp"][2] == hashlib.sha1(b"abseil").hexdigest(), "cmake still checks the SHA1"
    assert rows["re2"][1].startswith("https://"), "an archive that is not there keeps its URL"
    assert "# a comment line" in rows
