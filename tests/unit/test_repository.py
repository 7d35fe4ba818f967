"""The repository stands alone: its code and docs cite its own files, never a design document,
seed systems or issue numbers that live outside it (a maintainer who clones it has none of them),
and pyproject.toml declares every distribution its code imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Spelled in pieces so that this file does not match itself.
OUTSIDE = re.compile(
    "|".join(
        [
            r"DESIGN" + r"\.md",
            r"shared/" + r"seeds",
            r"\b[Ii]ssues? #?[0-9]+\b",
            r"\b[Ss]eeds? " + r"\(?0[0-9]{2}\b",
        ]
    )
)


def test_no_file_cites_what_lies_outside_the_repository() -> None:
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    found = []
    for name in filter(None, tracked):
        path = ROOT / name
        if name.endswith(".lock") or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        found += [
            f"{name}:{n}: {line.strip()}"
            for n, line in enumerate(text.splitlines(), 1)
            if OUTSIDE.search(line)
        ]
    assert not found, "cites what a clone does not have:\n" + "\n".join(found)


def _imported(package_dirs: list[str]) -> dict[str, str]:
    """Top-level modules the given packages import (absolute imports), each with one place."""
    found: dict[str, str] = {}
    for package in package_dirs:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def _declared(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings, normalized (PEP 503)."""
    names = (re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0] for req in requirements)
    return {re.sub(r"[-_.]+", "-", name).lower() for name in names}


def test_what_the_code_imports_is_declared() -> None:
    """A module that code imports comes from a distribution that pyproject.toml names: the product's
    dependencies for the product packages, plus the dev and bench groups for tests/ and bench/ (a
    module found only through another package's dependencies breaks when that package drops it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    product = _declared(project["project"]["dependencies"])
    groups = product | {name for group in project["dependency-groups"].values() for name in _declared(group)}
    ours = {"schemas", "sinks", "agents", "pipeline", "tests", "bench"}
    distributions = importlib.metadata.packages_distributions()
    missing = []
    product_code = ["schemas", "sinks", "agents", "pipeline"]
    for packages, allowed in ((product_code, product), (["tests", "bench"], groups)):
        for module, where in _imported(packages).items():
            if module in ours or module in sys.stdlib_module_names or module == "__future__":
                continue
            names = _declared(distributions.get(module, [module]))
            if not names & allowed:
                missing.append(f"{where}: {module} (from {', '.join(sorted(names))})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)
