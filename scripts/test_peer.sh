#!/usr/bin/env bash
# Run diffusers' own AutoencoderKL test file against vae_core.AutoencoderKL (the swap and the list of
# out-of-scope tests live in tests/peer/diffusers_swap.py). CPU, offline. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_peer.sh"
PEER="$ROOT/.host/peer"
FILE="tests/models/autoencoders/test_models_autoencoder_kl.py"
if [ ! -f "$PEER/$FILE" ]; then
    echo "[test_peer] SKIP: $PEER/$FILE is missing (see the setup_peer line above)"
    exit 0
fi
cd "$PEER"
# CUDA_VISIBLE_DEVICES= : diffusers' tests pick the accelerator when one is visible; PEER_DEVICE=1 lets them
if [ -z "${PEER_DEVICE:-}" ]; then export CUDA_VISIBLE_DEVICES=; fi
HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT/tests/peer${PYTHONPATH:+:$PYTHONPATH}" \
    exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider -p diffusers_swap --rootdir "$PEER" \
    -W ignore::FutureWarning -W ignore::pytest.PytestRemovedIn10Warning -rs --timeout=900 "$FILE" "$@"
