# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch installs from a local wheel here; any other spec would pull GBs of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo demo-seam demo-compare demo-parts test lint bench clean-venv

$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

install: $(BIN)/.installed

# The whole chain on the embedded dataset (IRN family): CAM -> ... -> DeepLab -> report.
# Two workers of one torch thread each: the GT ceiling trains beside the CAM chain, shards run in pairs.
DEMO_FLAGS ?= --workers 2 --wsss-torch-threads 1
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

# The demo chain plus every graph propagation method from the same CAMs, tabled side by side in the report.
demo-compare: install
	LUIGI_CONFIG_PATH=configs/demo_compare.cfg $(BIN)/luigi --module pipeline FullWSSS $(DEMO_FLAGS)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench

clean-venv:
	rm -rf $(VENV)
