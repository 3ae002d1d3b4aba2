# The two commands (see README): `make demo` and `make test`. Both set up what they need first.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-fast lint validate bench-cpu cost-model clean

setup:
	./scripts/bootstrap.sh

# Main job: real ComfyUI server + the bundled workflow on the generated tiny checkpoint.
# Pass options through ARGS, e.g. make demo ARGS="--checkpoint /path/model.safetensors --comfyui /path/ComfyUI"
demo: setup
	$(PY) scripts/run_demo.py $(ARGS)

# The whole test suite (unit, in-process host, HTTP server, parity) on ComfyUI 0.3.75 (.comfyui/) and, at the same
# time in a second process, the host-marked tests on ComfyUI 0.8.0 (.comfyui-0.8.0/, present when bootstrap found
# its tarball); the 0.8.0 log is printed when both are done. Fails if either fails.
COMFY080 := $(CURDIR)/.comfyui-0.8.0
LOG080 := $(CURDIR)/.cache/test-comfyui-0.8.0.log
test: setup
	@mkdir -p .cache; pid=; \
	if [ -f "$(COMFY080)/main.py" ]; then \
	  echo "== host tests on ComfyUI 0.8.0: running alongside, log in $(LOG080) =="; \
	  COMFYUI_ROOT="$(COMFY080)" $(PY) -m pytest -m host -p no:cacheprovider $(ARGS) > "$(LOG080)" 2>&1 & pid=$$!; \
	else \
	  echo "== host tests on ComfyUI 0.8.0: SKIPPED (no .comfyui-0.8.0/: its tarball was not found by scripts/bootstrap.sh) =="; \
	fi; \
	echo "== tests on ComfyUI 0.3.75 =="; \
	$(PY) -m pytest -p no:cacheprovider $(ARGS); rc=$$?; rc080=0; \
	if [ -n "$$pid" ]; then \
	  wait $$pid; rc080=$$?; \
	  echo "== host tests on ComfyUI 0.8.0 (COMFYUI_ROOT=$(COMFY080) $(PY) -m pytest -m host $(ARGS)) =="; \
	  cat "$(LOG080)"; \
	fi; \
	[ $$rc -eq 0 ] && [ $$rc080 -eq 0 ]

# Unit tests only (seconds).
test-fast: setup
	$(PY) -m pytest -m "not slow" $(ARGS)
test-browser: setup ; $(PY) -m pytest -m browser $(ARGS)

lint: setup
	$(PY) -m ruff check .

# Registry metadata: `comfy node validate` (comfy-cli from PyPI, in its own virtual environment under .cache/, apart
# from ComfyUI's packages) checks pyproject.toml and runs its security lint; its security warnings fail here too.
COMFY_CLI_VERSION := 1.23.0
COMFY_CLI_VENV := .cache/comfy-cli
validate:
	@[ -x $(COMFY_CLI_VENV)/bin/comfy ] || { $${PYTHON:-python3.11} -m venv $(COMFY_CLI_VENV) && \
	  $(COMFY_CLI_VENV)/bin/pip install -q comfy-cli==$(COMFY_CLI_VERSION); }
	@out=$$($(COMFY_CLI_VENV)/bin/comfy --skip-prompt --no-enable-telemetry node validate 2>&1); rc=$$?; \
	  echo "$$out"; [ $$rc -eq 0 ] && ! echo "$$out" | grep -qi "security warnings\|error"

bench-cpu: setup
	$(PY) benchmarks/bench.py --device cpu $(ARGS)

# Counted cost of a gradient pass vs a plain step on the real SD1.5/SDXL layouts (meta device, any machine).
cost-model: setup
	$(PY) benchmarks/cost_model.py $(ARGS)

clean:
	rm -rf .cache ae_output
