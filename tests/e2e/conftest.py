"""Fixtures for end-to-end tests against a real ComfyUI host.

The host lives in ``.host/ComfyUI`` (created by ``scripts/setup.sh``), or where
``AKL_HOST_DIR`` says (``.host/ComfyUI-0.8.0`` from ``scripts/setup_host2.sh``); the
tests are skipped, with a line saying why, when it is missing.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from comfy_server import COMFY_DIR, ComfyServer, missing_host_reason  # noqa: E402


@pytest.fixture(scope="session")
def comfy_server():
    """A running ComfyUI host shared by the whole session.

    ``comfy_server.vae_dir`` is a temporary ``vae/`` folder that the host
    searches first (listed by the ``vae`` loaders), ``comfy_server.models_dir``
    its parent; output/input/user dirs are temporary too.
    """
    if not (COMFY_DIR / "main.py").is_file():
        pytest.skip(missing_host_reason(COMFY_DIR))
    with tempfile.TemporaryDirectory(prefix="comfy-e2e-models-") as models_dir:
        (Path(models_dir) / "vae").mkdir()
        server = ComfyServer(models_dir=models_dir)
        server.start()
        try:
            yield server
        finally:
            server.stop()
