# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch installs from a local wheel here; any other spec would pull GBs of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo demo-seam demo-compare demo-parts test lint bench gpu-check clean-venv

$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

install: $(BIN)/.installed

# The whole chain on the embedded dataset (IRN CAMs and IRNet, WSGCN GCN): CAM -> ... -> DeepLab -> report.
# Two workers: the GT ceiling trains beside the CAM chain, shards run in pairs. Each task takes its share of the
# cores ([wsss] torch_threads = 0): a task running alone, such as PretrainBackbone, uses both.
DEMO_FLAGS ?= --workers 2
demo: install
	$(BIN)/luigi --module pipeline FullWSSS $(DEMO_FLAGS)
	$(BIN)/python -m pipeline summary

# The PSA/SEAM family to the same end (reuses the pretraining and the ceiling of `make demo`).
demo-seam: install
	LUIGI_CONFIG_PATH=configs/demo_seam.cfg $(BIN)/luigi --module pipeline FullWSSS $(DEMO_FLAGS)
	LUIGI_CONFIG_PATH=configs/demo_seam.cfg $(BIN)/python -m pipeline summary

# GMNet's part branch on the demo (configs/demo_parts.cfg): object maps, the conditioned part segmenter, EvalParts.
demo-parts: install
	LUIGI_CONFIG_PATH=configs/demo_parts.cfg $(BIN)/luigi --module pipeline FullWSSS $(DEMO_FLAGS)
	LUIGI_CONFIG_PATH=configs/demo_parts.cfg $(BIN)/python -m pipeline summary

# The demo chain plus every method's own recipe (configs/demo_<method>.cfg) from the same CAMs, tabled side by side in
# the report and in the summary: CAM -> seeds -> pseudo labels -> its CRF -> DeepLab on them / the ceiling.
demo-compare: install
	LUIGI_CONFIG_PATH=configs/demo_compare.cfg $(BIN)/luigi --module pipeline FullWSSS $(DEMO_FLAGS)
	LUIGI_CONFIG_PATH=configs/demo_compare.cfg $(BIN)/python -m pipeline summary

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench

# On a GPU machine (README "Checking a GPU machine"): its own environment (GPU_VENV, created with the system's
# site-packages so that a preinstalled CUDA torch is kept; GPU_TORCH_SPEC is pip-installed only where that torch
# is missing or CPU-only; GPU_WHEELS=DIR installs offline from a folder of wheels), then the CUDA tests and the
# GPU benches, results in GPU_CHECK_OUT. Not TORCH_SPEC: its default is the CPU wheel of this project's CI.
GPU_VENV ?= .venv-gpu
GPU_TORCH_SPEC ?= torch
GPU_CHECK_OUT ?= bench/results/gpu
GPU_WHEELS ?=
GPU_CHECK_FLAGS ?=
gpu-check:
	$(PYTHON) bench/gpu_check.py --venv $(GPU_VENV) --torch-spec "$(GPU_TORCH_SPEC)" --out $(GPU_CHECK_OUT) \
		$(if $(GPU_WHEELS),--wheels $(GPU_WHEELS)) $(GPU_CHECK_FLAGS)

clean-venv:
	rm -rf $(VENV)
