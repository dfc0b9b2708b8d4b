#!/usr/bin/env bash
# The main job: set up the host if missing, then run the example workflow headless on a
# bundled photo with the shipped demo VAE, writing outputs/demo/. `--serve` serves the UI instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo.py" "$@"
