"""pytest plugin that runs diffusers' own AutoencoderKL test file against vae_core.AutoencoderKL.

Loaded with `-p diffusers_swap` by scripts/test_peer.sh; it is not a test module of our suite. It
swaps the class before collection and holds the one list of diffusers tests that are out of scope.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TEST_FILE = "models/autoencoders/test_models_autoencoder_kl.py"

# Deselected, as in diffusers' own offline baseline: they download a model from the Hub.
HUB_TESTS = (
    "TestAutoencoderKL::test_from_pretrained_hub",
    "TestAutoencoderKL::test_output_pretrained",
)

# The one list of diffusers tests that vae_core does not honour, each with the reason. Test id
# (class::name, parameters dropped) -> why it is out of scope for a torch-only core.
OUT_OF_SCOPE: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    import diffusers

    import vae_core

    # The test module does `from diffusers import AutoencoderKL`: after this it gets ours.
    diffusers.AutoencoderKL = vae_core.AutoencoderKL
    config.addinivalue_line("markers", "autoround: diffusers marker (unused here)")


def _short_id(item: pytest.Item) -> str:
    name = item.nodeid.split("::", 1)[-1]
    return name.split("[", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, hub = [], []
    for item in items:
        short = _short_id(item)
        if short in HUB_TESTS:
            hub.append(item)
            continue
        reason = OUT_OF_SCOPE.get(short)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"out of scope for vae_core: {reason}"))
        keep.append(item)
    if hub:
        config.hook.pytest_deselected(items=hub)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> str:
    import diffusers

    return (f"diffusers {diffusers.__version__} test file, diffusers.AutoencoderKL -> "
            f"{diffusers.AutoencoderKL.__module__}.{diffusers.AutoencoderKL.__qualname__}")
