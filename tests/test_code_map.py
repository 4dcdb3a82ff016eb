"""The README's code map against the tree: every module listed once, nothing listed that is gone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "simulators", "scripts", "tests")


def _map_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Code map", 1)[1]
    block = section.split("```", 2)[1]
    return block.splitlines()[1:]


def _listed_modules() -> list[str]:
    """Paths from the map: a top-level folder line sets the prefix, indented lines add to it."""
    listed, top = [], ""
    for line in _map_lines():
        name = line.split()[0] if line.strip() else ""
        if not name:
            continue
        if not line.startswith(" "):
            top = name
        elif name.endswith(".py"):
            listed.append(top + name)
    return listed


def _tree_modules() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT)
            if "__pycache__" not in relative.parts:
                found.add(relative.as_posix())
    return found


def test_every_module_is_in_the_code_map_once_and_every_listed_module_exists():
    listed = _listed_modules()
    duplicated = sorted({m for m in listed if listed.count(m) > 1})
    assert not duplicated, f"listed twice: {duplicated}"
    tree = _tree_modules()
    missing, gone = sorted(tree - set(listed)), sorted(set(listed) - tree)
    assert not missing, f"in the tree, not in README's code map: {missing}"
    assert not gone, f"in README's code map, not in the tree: {gone}"


def test_each_module_line_says_what_it_holds():
    for line in _map_lines():
        if line.startswith(" ") and ".py" in line:
            assert re.match(r"^ +\S+\.py +\S.{8,}$", line), f"no description: {line!r}"
