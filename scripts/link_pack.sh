#!/usr/bin/env bash
# link_pack.sh COMFY_DIR: link this repository into COMFY_DIR/custom_nodes as ComfyUI-AutoencoderKL
# (idempotent; refuses to replace anything there that is not a symlink). Used by setup.sh and
# setup_host2.sh for the two test hosts.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFY_DIR="$1"
PACK_LINK="$COMFY_DIR/custom_nodes/ComfyUI-AutoencoderKL"
mkdir -p "$COMFY_DIR/custom_nodes"
if [ -L "$PACK_LINK" ]; then
    if [ "$(readlink "$PACK_LINK")" != "$REPO_ROOT" ]; then
        rm "$PACK_LINK"
        ln -s "$REPO_ROOT" "$PACK_LINK"
    fi
elif [ -e "$PACK_LINK" ]; then
    echo "[link_pack] ERROR: $PACK_LINK exists and is not a symlink; remove it and re-run" >&2
    exit 1
else
    ln -s "$REPO_ROOT" "$PACK_LINK"
fi
