"""Paths for the Flax tests: this folder and tests/core (for the shared tiny configs)."""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent / "core", HERE.parents[1]):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
