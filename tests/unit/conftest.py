from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_tally_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests see the documented defaults, whatever TALLY_* the developer's shell exports."""
    for name in list(os.environ):
        if name.startswith("TALLY_"):
            monkeypatch.delenv(name)
