#!/usr/bin/env bash
# The test command: set up the host, the test requirements and the browser, then run every test
# (core, nodes, end-to-end against a real ComfyUI server, browser). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/setup_flax.sh"  # the torch-free diffusers 0.39 Flax reference for tests/flax
if [ -x "$ROOT/scripts/setup_browser.sh" ]; then
    "$ROOT/scripts/setup_browser.sh"
fi
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider --timeout=900 tests "$@"
