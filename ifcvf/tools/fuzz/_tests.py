"""The properties some targets reuse live in the source tree's tests/ (the C
relay's Python oracle, the model's engine rig): put them on the path."""
from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[3] / "tests"


def add_paths() -> None:
    if not (TESTS / "relay_oracle.py").exists():
        raise RuntimeError(f"this target needs the source tree's tests/ ({TESTS} is missing)")
    for sub in (TESTS, TESTS / "property", TESTS / "sim"):
        if str(sub) not in sys.path:
            sys.path.insert(0, str(sub))
