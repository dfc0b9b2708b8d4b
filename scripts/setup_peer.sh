#!/usr/bin/env bash
# Fetch diffusers' own test tree (a fixture for tests/peer, never part of the package) into
# .host/peer/ and install what it imports. Idempotent. Prints one SKIP line and exits 0 when neither
# the shared tarball nor the network can provide it; scripts/test_peer.sh then skips too.
#
# Environment knobs:
#   DIFFUSERS_TESTS_TARBALL=path   the tests/ tarball to use (default: ../shared/peer/ beside the repo)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VPY="$ROOT/.venv/bin/python"
COMMIT="58eb52c0803ea9af3abec60841c2a093bdf1f951"  # diffusers git, 2026-08-23 (see README, drop-in section)
SHA256="ccb05c6624cfd4cc360cbd8eb8d62f90546182577bc98fbead299b2503045ee3"
DEST="$ROOT/.host/peer"
STAMP="$DEST/.commit"
ACCELERATE="accelerate==1.15.0"  # imported by diffusers' shared test mixins; --no-deps keeps torch untouched

log() { printf '[setup_peer] %s\n' "$*"; }

if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$COMMIT" ]; then
    rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
    tarball="${DIFFUSERS_TESTS_TARBALL:-}"
    if [ -z "$tarball" ]; then
        for cand in "$ROOT/../shared/peer" "$ROOT/../../shared/peer"; do
            if [ -f "$cand/diffusers-tests-58eb52c.tar.gz" ]; then tarball="$cand/diffusers-tests-58eb52c.tar.gz"; break; fi
        done
    fi
    if [ -n "$tarball" ] && [ -f "$tarball" ]; then
        got="$(sha256sum "$tarball" | cut -d' ' -f1)"
        if [ "$got" != "$SHA256" ]; then
            log "ERROR: $tarball has sha256 $got, expected $SHA256 (diffusers tests at $COMMIT); replace the file"
            exit 1
        fi
        log "extracting $tarball"
        tar -xzf "$tarball" -C "$DEST.tmp"
    elif command -v git >/dev/null && (
            cd "$DEST.tmp" && git init -q src && cd src &&
            git remote add origin https://github.com/huggingface/diffusers.git &&
            timeout 300 git fetch -q --depth 1 --filter=blob:none origin "$COMMIT" &&
            git sparse-checkout set tests >/dev/null && git checkout -q FETCH_HEAD) 2>/dev/null; then
        log "fetched diffusers $COMMIT with git"
        mv "$DEST.tmp/src/tests" "$DEST.tmp/tests" && rm -rf "$DEST.tmp/src"
    else
        rm -rf "$DEST.tmp"
        log "SKIP: diffusers' tests are not available (no tarball at ../shared/peer/ or \$DIFFUSERS_TESTS_TARBALL, and git could not fetch $COMMIT from github.com); diffusers' own AutoencoderKL tests will not run"
        exit 0
    fi
    rm -rf "$DEST" && mv "$DEST.tmp" "$DEST" && echo "$COMMIT" > "$STAMP"
fi

if ! "$VPY" -c "import accelerate, parameterized, pytest_timeout" 2>/dev/null; then
    log "installing $ACCELERATE (--no-deps) and requirements-test.txt"
    "$VPY" -m pip install -q -r "$ROOT/requirements-test.txt"
    "$VPY" -m pip install -q --no-deps "$ACCELERATE"
fi
log "diffusers tests at $COMMIT in $DEST"
