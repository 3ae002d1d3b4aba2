# The two commands (see README): `make demo` and `make test`. Both set up what they need first.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-fast lint bench-cpu cost-model clean

setup:
	./scripts/bootstrap.sh

# Main job: real ComfyUI server + the bundled workflow on the generated tiny checkpoint.
# Pass options through ARGS, e.g. make demo ARGS="--checkpoint /path/model.safetensors --comfyui /path/ComfyUI"
demo: setup
	$(PY) scripts/run_demo.py $(ARGS)

# The whole test suite (unit, in-process host, HTTP server, parity).
test: setup
	$(PY) -m pytest $(ARGS)

# Unit tests only (seconds).
test-fast: setup
	$(PY) -m pytest -m "not slow" $(ARGS)
test-browser: setup ; $(PY) -m pytest -m browser $(ARGS)

lint: setup
	$(PY) -m ruff check .

bench-cpu: setup
	$(PY) benchmarks/bench.py --device cpu $(ARGS)

# Counted cost of a gradient pass vs a plain step on the real SD1.5/SDXL layouts (meta device, any machine).
cost-model: setup
	$(PY) benchmarks/cost_model.py $(ARGS)

clean:
	rm -rf .cache ae_output
