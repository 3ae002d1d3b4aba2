#!/usr/bin/env bash
# Adds what the browser test (tests/test_browser.py) needs on top of scripts/bootstrap.sh:
#   - Debian's `chromium` (apt-get; needs root or sudo), driven headless over the DevTools protocol
#   - ComfyUI 0.3.75's web front end, `comfyui-frontend-package==1.32.9`, in .venv
# Idempotent: re-running only does missing work. Prints the browser's path on its last line.
# $AE_CHROMIUM names a browser binary to use instead of installing one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
FRONTEND="comfyui-frontend-package==1.32.9"
STAMP="$ROOT/.venv/.ae-frontend-1.32.9"

if [ ! -x "$PY" ]; then
  echo "no $PY: run scripts/bootstrap.sh (make setup) first" >&2
  exit 1
fi
if [ ! -f "$STAMP" ]; then
  "$PY" -m pip install --quiet "$FRONTEND"
  touch "$STAMP"
fi

find_browser() {
  if [ -n "${AE_CHROMIUM:-}" ]; then
    command -v "$AE_CHROMIUM"
    return
  fi
  command -v chromium || command -v chromium-browser || true
}

BROWSER="$(find_browser)"
if [ -z "$BROWSER" ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then
    SUDO="sudo -n"
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core >/dev/null; then
    $SUDO apt-get update >/dev/null
    $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core >/dev/null
  fi
  BROWSER="$(find_browser)"
fi
if [ -z "$BROWSER" ]; then
  echo "chromium not found after installing it" >&2
  exit 1
fi
echo "$BROWSER"
