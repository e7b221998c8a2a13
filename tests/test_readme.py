"""The README's two commands are what CI runs, and the [test] extra installs what the tests
import: README, CI and pyproject cannot drift apart."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def readme_first_block() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return lines[start + 1 : end]


def test_readme_starts_with_the_two_commands():
    assert readme_first_block() == ["pip install -e '.[demo]' && krypton demo",
                                    "scripts/install-browser && pip install -e '.[test]' && "
                                    "python -m pytest"]


def test_ci_runs_the_readme_commands_in_a_fresh_venv():
    out = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-commands"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out == readme_first_block()
    script = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in script and 'source "$venv/bin/activate"' in script


def _requirement_closure(dist: str, extras: set[str], seen: dict[str, set[str]]) -> None:
    """Every distribution ``dist[extras]`` pulls in, as installed here (names normalised)."""
    key = dist.lower().replace("_", "-")
    if extras <= seen.get(key, set()) and key in seen:
        return
    seen.setdefault(key, set()).update(extras)
    try:
        reqs = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return
    for r in map(Requirement, reqs):
        env_extras = extras or {""}
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in env_extras):
            _requirement_closure(r.name, set(r.extras), seen)


def _imported_top_modules(folder: Path) -> set[str]:
    names = set()
    for f in folder.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_test_extra_installs_every_package_the_tests_import():
    local = {f.stem for f in (ROOT / "tests").glob("*.py")} | {"krypton_db"}
    third_party = {n for n in _imported_top_modules(ROOT / "tests")
                   if n not in sys.stdlib_module_names and n not in local}
    closure: dict[str, set[str]] = {}
    _requirement_closure("krypton_db", {"test"}, closure)
    providers = metadata.packages_distributions()
    missing = {}
    for mod in sorted(third_party):
        dists = {d.lower().replace("_", "-") for d in providers.get(mod, [])}
        if not dists & closure.keys():
            missing[mod] = sorted(dists) or ["(not installed)"]
    assert not missing, f"imported by tests but not installed by krypton_db[test]: {missing}"
