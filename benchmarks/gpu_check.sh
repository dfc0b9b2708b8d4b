#!/usr/bin/env bash
# One command for an accelerator machine: prints the table of benchmarks/gpu_check.py (speed against
# diffusers and the host's nodes, exact tiling, the out-of-memory retry, a real server on the device).
# Arguments go to gpu_check.py: `--device cpu --quick` is the small CPU form that CI runs.
#
# Where the venv and the host are here (scripts/setup.sh), it uses them. Else, on a machine that has
# its own CUDA torch but no network, it uses that Python and the device kit carried beside the code
# (scripts/device_kit.sh builds .devkit here; scripts/device_env.sh installs from it there).
# Else it runs scripts/setup.sh, which needs PyPI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -x "$ROOT/.venv/bin/python" ] && [ -f "$ROOT/.host/ComfyUI/main.py" ]; then
    PY="$ROOT/.venv/bin/python"
elif [ ! -x "$ROOT/.venv/bin/python" ] && [ -f "$ROOT/.devkit/modules.txt" ]; then
    # shellcheck source=../scripts/device_env.sh
    . "$ROOT/scripts/device_env.sh"
else
    "$ROOT/scripts/setup.sh" >&2
    PY="$ROOT/.venv/bin/python"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
