#!/usr/bin/env bash
# What the browser tests (tests/web/test_browser.py) need beyond scripts/setup.sh, idempotently:
#   /usr/bin/chromium            Debian's `chromium` package (apt-get; sudo only when not root)
#   tests/web/node_modules/      playwright-core from tests/web/package-lock.json (npm ci), with
#                                PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1: playwright never downloads a browser
# Needs Node.js 18+ and npm on PATH. Safe to re-run; run from any cwd.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WEB_TESTS="$REPO_ROOT/tests/web"
CHROMIUM=/usr/bin/chromium

log() { printf '[setup_browser] %s\n' "$*"; }

# 1. Chromium from Debian.
if [ -x "$CHROMIUM" ]; then
    log "chromium present: $("$CHROMIUM" --version 2>/dev/null | head -1)"
else
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { log "ERROR: not root and no sudo; install the 'chromium' package"; exit 1; }
        SUDO="sudo"
    fi
    log "installing chromium with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium
    [ -x "$CHROMIUM" ] || { log "ERROR: $CHROMIUM still missing after apt-get install chromium"; exit 1; }
fi

# 2. playwright-core, exactly as locked.
command -v node >/dev/null || { log "ERROR: node is not on PATH (Node.js 18+ needed)"; exit 1; }
command -v npm >/dev/null || { log "ERROR: npm is not on PATH"; exit 1; }
NODE_MAJOR="$(node -p 'process.versions.node.split(".")[0]')"
[ "$NODE_MAJOR" -ge 18 ] || { log "ERROR: Node.js $(node --version) is too old; 18+ needed"; exit 1; }
log "npm ci in tests/web (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1)"
(cd "$WEB_TESTS" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
log "done: node $(node --version), playwright-core $(node -p "require('$WEB_TESTS/node_modules/playwright-core/package.json').version")"
