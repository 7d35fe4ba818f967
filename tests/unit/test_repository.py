"""The repository stands alone: its code and docs cite its own files, never a design document,
seed systems or issue numbers that live outside it (a maintainer who clones it has none of them)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Spelled in pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"DESIGN" + r"\.md", r"shared/" + r"seeds", r"\b[Ii]ssues? #?[0-9]+\b"]))


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
