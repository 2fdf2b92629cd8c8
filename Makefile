# Two commands do everything on a fresh machine:
#   make dev    set up .venv and start the Dagster UI (webserver + daemon) on the embedded defaults
#   make test   set up .venv and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned: a looser spec pulls a multi-GB CUDA build (see README, "Installing").
TORCH ?= torch==2.13.0
DAGSTER_HOME ?= $(CURDIR)/.dagster_home
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: install dev test soak demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[train,dev]" "$(TORCH)"
	touch $@

dev: install
	mkdir -p "$(DAGSTER_HOME)"
	cp dagster.yaml "$(DAGSTER_HOME)/dagster.yaml"
	DAGSTER_HOME="$(DAGSTER_HOME)" $(VENV)/bin/dagster dev -w workspace.yaml -h $(HOST) -p $(PORT)

test: install
	$(VENV)/bin/ruff check lora_pipeline lora_pipeline_tests benchmarks
	$(PY) -m pytest

# The fault campaign (tests/registry/test_fault_campaign.py) at length: many seeds, long runs.
SOAK_SEEDS ?= $(shell seq -s, 1 40)
SOAK_STEPS ?= 300
soak: install
	LORA_CAMPAIGN_SEEDS=$(SOAK_SEEDS) LORA_CAMPAIGN_STEPS=$(SOAK_STEPS) $(PY) -m pytest -q -p no:logging \
		lora_pipeline_tests/registry/test_fault_campaign.py

demo: install
	$(VENV)/bin/lora-pipeline demo

clean:
	rm -rf $(VENV) .dagster_home .lora_store .lora_jobs
