"""Fixtures of the web tests (tests/web): the Node.js binary, skipping with a reason when absent."""
from __future__ import annotations

import shutil

import pytest

SETUP_HINT = "run scripts/setup_browser.sh"


@pytest.fixture(scope="session")
def node_bin() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"Node.js (node) is not on PATH; install Node 20+ and {SETUP_HINT}")
    return node
