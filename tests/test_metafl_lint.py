"""oelint-adv over meta-fl: zero findings, and every suppression says why."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from metafl_recipes import FL_AGENT_RECIPE, LAYER, REPO

CONFIG = LAYER / ".oelint.cfg"


def lint_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.suffix in (".bb", ".bbappend", ".inc"))


def run_oelint(files: list[str], config: Path = CONFIG) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OELINT_CONFIG": str(config)}
    env.pop("OELINT_SKIP_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "oelint_adv", "--quiet", "--jobs", "1", *files],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def findings(result: subprocess.CompletedProcess[str]) -> list[str]:
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if re.search(r":\d+:(info|warning|error):", line)]


def test_oelint_adv_finds_nothing_in_meta_fl() -> None:
    result = run_oelint(lint_files(LAYER))
    assert not findings(result), "oelint-adv findings:\n" + "\n".join(findings(result))
    assert result.returncode == 0, result.stdout + result.stderr


def test_oelint_adv_reports_a_broken_recipe(tmp_path: Path) -> None:
    """The configuration must not silence real problems: a recipe without LICENSE is reported."""
    layer = tmp_path / "meta-fl"
    shutil.copytree(LAYER, layer, ignore=shutil.ignore_patterns("kas", "lib"))
    recipe = layer / FL_AGENT_RECIPE.relative_to(LAYER)
    recipe.write_text(re.sub(r'^LICENSE = "MIT"\n', "", recipe.read_text(), flags=re.M))
    result = run_oelint([str(recipe)], config=layer / ".oelint.cfg")
    assert any("oelint.var.mandatoryvar.LICENSE" in f for f in findings(result)), result.stdout + result.stderr


def test_every_suppression_gives_a_reason() -> None:
    lines = CONFIG.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("suppress"))
    for i in range(start + 1, len(lines)):
        item = lines[i].strip()
        if not lines[i].startswith((" ", "\t")):
            break
        if item and not item.startswith("#"):
            assert lines[i - 1].strip().startswith("#"), f".oelint.cfg: suppression {item} has no comment above it"
    for path in lint_files(LAYER):
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if "nooelint:" in line:
                assert re.search(r"nooelint:\s*\S+\s+-\s+\w", line), \
                    f"{Path(path).relative_to(REPO)}:{n}: inline suppression without ' - reason'"
