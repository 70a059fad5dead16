"""README.md's "Documentation" list names every page in docs/ with a line saying what it is for: a page written
without an entry there is a page a user does not find, and an entry for a page that is gone is a dead link."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\[[^\]]+\]\(([^)#\s]+)(?:#[^)]*)?\)")


def documentation_items() -> list[tuple[list[str], str]]:
    """Each item of the README's Documentation list: (the paths it links before its colon, its description)."""
    text = README.read_text(encoding="utf-8")
    _, found, rest = text.partition("\n## Documentation\n")
    assert found, "README.md has no '## Documentation' section"
    section = rest.split("\n## ", 1)[0]
    items = []
    for item in re.split(r"\n(?=- )", "\n" + section):
        if not item.startswith("- "):
            continue
        links, colon, description = item[2:].partition("): ")
        items.append((LINK.findall(links + ")") if colon else [], " ".join(description.split())))
    return items


def test_every_docs_page_is_listed_once_with_a_description() -> None:
    listed: dict[str, str] = {}
    for paths, description in documentation_items():
        for path in paths:
            assert path not in listed, f"README.md's Documentation list names {path} twice"
            listed[path] = description
    pages = sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
    missing = [p for p in pages if p not in listed]
    assert not missing, f"README.md's Documentation list lacks {', '.join(missing)}: add '- [{missing[0]}]" \
                        f"({missing[0]}): what it is for.'"
    terse = [p for p in pages if len(listed[p].split()) < 4]
    assert not terse, f"README.md's Documentation list gives {', '.join(terse)} no description of a few words"


def test_every_listed_page_exists() -> None:
    paths = [path for links, _ in documentation_items() for path in links]
    assert paths, "README.md's Documentation list links nothing"
    gone = [p for p in paths if not (ROOT / p).is_file()]
    assert not gone, f"README.md's Documentation list links {', '.join(gone)}, which do not exist"
