#!/usr/bin/env bash
# The test-only Flax reference environment: .venv-flaxref with diffusers==0.39.0 (the last release
# that has FlaxAutoencoderKL), JAX and Flax, all pinned in tests/flax/requirements-flaxref.txt, and
# no torch. tests/flax/test_diffusers_flax.py runs diffusers' class there as a subprocess.
# Idempotent (a stamp of the requirements file); FLAXREF_VENV=path moves it, SKIP_FLAXREF=1 skips it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLAXREF_VENV:-$ROOT/.venv-flaxref}"
REQ="$ROOT/tests/flax/requirements-flaxref.txt"
PYTHON_BIN="${PYTHON:-python3}"
log() { printf '[setup_flax] %s\n' "$*"; }

if [ "${SKIP_FLAXREF:-0}" = "1" ]; then
    log "SKIP_FLAXREF=1: not creating $VENV (the diffusers-0.39 Flax parity tests will skip)"
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.flaxref-requirements.sha256"
HASH="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
    log "requirements unchanged since last install"
else
    log "installing $REQ into $VENV"
    "$VENV/bin/python" -m pip install -q -r "$REQ"
    printf '%s\n' "$HASH" >"$STAMP"
fi
# The reference must be diffusers' Flax class on its own: no torch to lean on.
"$VENV/bin/python" - <<'EOF'
import importlib.util, sys
if importlib.util.find_spec("torch") is not None:
    sys.exit("[setup_flax] ERROR: torch is importable in the Flax reference venv; it must not be")
import diffusers
from diffusers import FlaxAutoencoderKL  # noqa: F401
if diffusers.__version__ != "0.39.0":
    sys.exit(f"[setup_flax] ERROR: diffusers {diffusers.__version__} in the reference venv, expected 0.39.0")
print(f"[setup_flax] reference ready: diffusers {diffusers.__version__} FlaxAutoencoderKL, no torch")
EOF
