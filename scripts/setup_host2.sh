#!/usr/bin/env bash
# The second test host: ComfyUI v0.8.0 (upstream commit fc0cb10f) beside the 0.3.75 of setup.sh.
# It sets up files only; it runs no tests, and it never changes a package in the shared .venv.
#
# Creates (idempotently, from any cwd):
#   .host/ComfyUI-0.8.0/        the v0.8.0 source tree, from shared/hosts/ComfyUI-0.8.0.tar.gz
#                               (sha256 checked) or, without that file, `git clone --branch v0.8.0`
#   .host/ComfyUI-0.8.0/custom_nodes/ComfyUI-AutoencoderKL -> <repo root>  (symlink)
#   .host/py-0.8.0/             the packages 0.8.0 needs beyond 0.3.75's, installed with
#                               `pip install --target ... --no-deps`: on PYTHONPATH for 0.8.0 runs only
#
# When neither the tarball nor the network is there, it prints one line saying the second-host tests
# will be skipped, and exits 0.
#
# Starting 0.8.0 by hand (the browser tests and the e2e server do the same):
#   cd .host/ComfyUI-0.8.0
#   PYTHONPATH="$REPO_ROOT/.host/py-0.8.0" "$REPO_ROOT/.venv/bin/python" main.py --cpu \
#       --listen 127.0.0.1 --port 8190 --disable-api-nodes --database-url sqlite:///:memory:
# The tests pick it with AKL_HOST_DIR=.host/ComfyUI-0.8.0 (tests/e2e/comfy_server.py adds
# .host/py-0.8.0 to sys.path and to the server's PYTHONPATH by itself).
#
# Environment knobs:
#   AKL_HOST2_TARBALL=PATH   the tarball to use (default: shared/hosts/ beside or above the repo)
#   AKL_HOST2_NO_GIT=1       never try the network
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

VERSION="0.8.0"
TAG="v$VERSION"
COMMIT_PREFIX="fc0cb10f"
SHA256="8c346a4efde87a31b95233515ed3a7bcb21611c796e2b7174543d13236adff38"
UPSTREAM="https://github.com/comfyanonymous/ComfyUI.git"
HOST_DIR="$REPO_ROOT/.host"
COMFY_DIR="$HOST_DIR/ComfyUI-$VERSION"
SITE_DIR="$HOST_DIR/py-$VERSION"
PACK_LINK="$COMFY_DIR/custom_nodes/ComfyUI-AutoencoderKL"
VPY="$REPO_ROOT/.venv/bin/python"
# What 0.8.0's requirements.txt pins or adds beyond 0.3.75's (requirements-host.txt); the
# workflow-templates media bundles (assets only) are left out: no test reads them.
EXTRA_PACKAGES=(
    "comfyui-frontend-package==1.35.9"
    "comfyui-workflow-templates==0.7.67"
    "comfyui-workflow-templates-core==0.3.74"
    "comfy-kitchen==0.2.40"
)

log() { printf '[setup_host2] %s\n' "$*"; }

# --------------------------------------------------------------------------
# 1. the source tree
# --------------------------------------------------------------------------
find_tarball() {
    local c
    for c in "${AKL_HOST2_TARBALL:-}" \
             "$REPO_ROOT/shared/hosts/ComfyUI-$VERSION.tar.gz" \
             "$REPO_ROOT/../shared/hosts/ComfyUI-$VERSION.tar.gz" \
             "$REPO_ROOT/../../shared/hosts/ComfyUI-$VERSION.tar.gz"; do
        if [ -n "$c" ] && [ -f "$c" ]; then
            printf '%s\n' "$c"
            return 0
        fi
    done
    return 1
}

if [ ! -f "$COMFY_DIR/main.py" ]; then
    mkdir -p "$HOST_DIR"
    rm -rf "$COMFY_DIR.partial"
    mkdir -p "$COMFY_DIR.partial"
    if TARBALL="$(find_tarball)"; then
        got="$(sha256sum "$TARBALL" | cut -d' ' -f1)"
        if [ "$got" != "$SHA256" ]; then
            log "ERROR: $TARBALL has sha256 $got, expected $SHA256 (ComfyUI $TAG as released); replace the file"
            exit 1
        fi
        log "extracting $TARBALL"
        tar -xzf "$TARBALL" -C "$COMFY_DIR.partial" --strip-components=1
    elif [ "${AKL_HOST2_NO_GIT:-0}" != "1" ] && command -v git >/dev/null 2>&1 \
            && timeout 300 git clone -q --depth 1 --branch "$TAG" "$UPSTREAM" "$COMFY_DIR.partial" 2>/dev/null; then
        head="$(git -C "$COMFY_DIR.partial" rev-parse HEAD)"
        case "$head" in
            "$COMMIT_PREFIX"*) log "cloned $TAG ($head)" ;;
            *) log "ERROR: tag $TAG is at $head, expected $COMMIT_PREFIX...; not using it"
               rm -rf "$COMFY_DIR.partial"; exit 1 ;;
        esac
        rm -rf "$COMFY_DIR.partial/.git"
    else
        rm -rf "$COMFY_DIR.partial"
        log "SKIP: no ComfyUI-$VERSION.tar.gz in shared/hosts/ and no network for git clone --branch $TAG;" \
            "the second-host ($VERSION) tests will be skipped"
        exit 0
    fi
    rm -rf "$COMFY_DIR"
    mv "$COMFY_DIR.partial" "$COMFY_DIR"
else
    log "ComfyUI $VERSION already present at $COMFY_DIR"
fi

# --------------------------------------------------------------------------
# 2. its extra packages, outside the shared venv
# --------------------------------------------------------------------------
STAMP="$SITE_DIR/.setup-packages"
WANT="$(printf '%s\n' "${EXTRA_PACKAGES[@]}")"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    log "extra packages unchanged in $SITE_DIR"
else
    log "installing ${EXTRA_PACKAGES[*]} into $SITE_DIR (--no-deps)"
    rm -rf "$SITE_DIR.partial"
    "$VPY" -m pip install -q --no-deps --no-compile --target "$SITE_DIR.partial" "${EXTRA_PACKAGES[@]}"
    rm -rf "$SITE_DIR"
    mv "$SITE_DIR.partial" "$SITE_DIR"
    printf '%s\n' "$WANT" >"$STAMP"
fi

# --------------------------------------------------------------------------
# 3. link this repo into custom_nodes
# --------------------------------------------------------------------------
"$REPO_ROOT/scripts/link_pack.sh" "$COMFY_DIR"
log "ready: $COMFY_DIR (custom_nodes/ComfyUI-AutoencoderKL -> $(readlink "$PACK_LINK")), PYTHONPATH=$SITE_DIR"
