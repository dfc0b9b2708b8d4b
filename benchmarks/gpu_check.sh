#!/usr/bin/env bash
# One command for an accelerator machine: prints the table of benchmarks/gpu_check.py (speed against
# diffusers and the host's nodes, exact tiling, the out-of-memory retry, a real server on the device).
# Sets up the venv and the host first if they are missing (scripts/setup.sh). Arguments go to
# gpu_check.py: `--device cpu --quick` is the small CPU form that CI runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$ROOT/.venv/bin/python" ] || [ ! -f "$ROOT/.host/ComfyUI/main.py" ]; then
    "$ROOT/scripts/setup.sh" >&2
fi
cd "$ROOT"
exec "$ROOT/.venv/bin/python" benchmarks/gpu_check.py "$@"
