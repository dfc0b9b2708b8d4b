"""Fixtures for the core tests; the configs and helpers live in core_helpers.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from core_helpers import CONFIGS  # noqa: E402


@pytest.fixture(params=sorted(CONFIGS))
def config_name(request):
    return request.param
