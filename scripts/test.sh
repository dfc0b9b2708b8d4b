#!/usr/bin/env bash
# The test command: set up the hosts, the test requirements and the browser, then run every test
# (core, nodes, end-to-end against a real ComfyUI server, browser) against ComfyUI 0.3.75, and the
# interop, contract and workflow tests a second time against ComfyUI 0.8.0 (a second pytest process:
# one process can import only one host). Extra arguments go to both pytest runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/setup_host2.sh"
"$ROOT/scripts/setup_flax.sh"  # the torch-free diffusers 0.39 Flax reference for tests/flax
if [ -x "$ROOT/scripts/setup_browser.sh" ]; then
    "$ROOT/scripts/setup_browser.sh"
fi
cd "$ROOT"
# the demo model card's held-out Debian photos (apt-get download, pinned; without a mirror their
# checks in tests/core/test_shipped_model.py skip, saying so)
"$ROOT/.venv/bin/python" "$ROOT/scripts/images.py" --fetch-debian --heldout \
    || echo "[test] could not fetch the Debian photos: the held-out checks on them will skip"
# diffusers' own AutoencoderKL test file against our class (skips with a line when it cannot be fetched)
"$ROOT/scripts/test_peer.sh"

PYTEST=("$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider --timeout=900)
"${PYTEST[@]}" tests "$@"

HOST2=".host/ComfyUI-0.8.0"
SECOND_HOST_TESTS=(tests/nodes/test_host_interop.py tests/nodes/test_newest_host_contract.py
                   tests/e2e/test_workflows.py)
if [ -f "$ROOT/$HOST2/main.py" ]; then
    echo "[test] the same interop, contract and workflow tests against ComfyUI 0.8.0 ($HOST2)"
    AKL_HOST_DIR="$HOST2" "${PYTEST[@]}" "${SECOND_HOST_TESTS[@]}" "$@"
else
    echo "[test] SKIP: ComfyUI 0.8.0 is not installed at $HOST2 (see the setup_host2 line above);" \
         "the second-host tests did not run"
fi
