# Two commands do everything on a fresh machine:
#   make dev    set up .venv and start the Dagster UI (webserver + daemon) on the embedded defaults
#   make test   set up .venv and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UV := $(VENV)/bin/uv
# The interpreter the venv is made from: the locks are for CPython 3.11 (locks/, scripts/lock.py).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# Notices `make dev` users cannot act on: `dagster dev` is superseded by `dg dev` (this project has
# no dg project layout), and Dagster's own sensor snapshots pass the beta `owners` parameter.
DEV_QUIET := ignore:Function `dev_command` is superseded,ignore:Parameter `owners` of initializer
HOST ?= 127.0.0.1
PORT ?= 3000
# The lock pins a CPU build of torch (torch==X+cpu): uv takes it from a local wheel folder where
# there is one (this machine's pip configuration has /opt/wheels), else from PyTorch's CPU index.
TORCH_WHEELS ?= /opt/wheels
TORCH_SOURCE ?= $(if $(wildcard $(TORCH_WHEELS)/torch-*.whl),--find-links $(TORCH_WHEELS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
# The uv cache and the venv are often on different file systems: copy without a warning.
export UV_LINK_MODE ?= copy
# RESOLVE=latest (make test-latest): the newest versions pyproject's ranges allow instead of the lock.
RESOLVE ?= locked

.PHONY: help install lock dev test test-latest soak soak-real demo clean gpu-bundle gpu-dry-run prod-local prod-stop deploy-test

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  \1\t/' | expand -t 16

install: $(VENV)/.installed  ## set up .venv with exactly locks/cpu.txt (every extra; torch a CPU build), via uv
$(VENV)/.installed: pyproject.toml locks/cpu.txt locks/uv.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || PIP_CONFIG_FILE=/dev/null $(PIP) install -q --require-hashes -r locks/uv.txt
ifeq ($(RESOLVE),latest)
	$(UV) pip install -q --python $(PY) $(TORCH_SOURCE) --upgrade -e ".[train,dev,deploy]" \
		"$$(grep -o '^torch==[^ ]*' locks/cpu.txt)"
	$(PY) scripts/lock.py drift
else
	$(UV) pip sync -q --python $(PY) $(TORCH_SOURCE) locks/cpu.txt
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	$(PY) scripts/lock.py check --installed
endif
	touch $@

lock: $(VENV)/.installed  ## re-resolve locks/ from pyproject.toml (the newest versions its ranges allow)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/lock.py compile
	$(MAKE) install

# `dg` (docs/dg.md) as an activated venv runs it: the project's code location from [tool.dg] in
# pyproject.toml, loaded by this venv's Python.
DG := VIRTUAL_ENV="$(CURDIR)/$(VENV)" PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dg

dev: install  ## set up and start the Dagster UI on the embedded defaults (local store, local backend, sample)
	$(PY) -m lora_pipeline.settings --check
	mkdir -p "$(DAGSTER_HOME)"
	cp dagster.dev.yaml "$(DAGSTER_HOME)/dagster.yaml"
	DAGSTER_HOME="$(DAGSTER_HOME)" PYTHONWARNINGS='$(DEV_QUIET)' $(DG) dev -h $(HOST) -p $(PORT)

test: install  ## set up and run the checks and the whole test suite (what CI runs)
	$(PY) scripts/lock.py check
	$(VENV)/bin/ruff check lora_pipeline lora_pipeline_tests benchmarks deploy scripts
	$(VENV)/bin/ruff format --check lora_pipeline lora_pipeline_tests benchmarks deploy scripts
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(VENV)/bin/mypy
	$(DG) check defs
	$(DG) list defs --json > /dev/null
	$(PY) -m pytest

# The canary for upstream releases (docs/testing.md): the same checks and suite in .venv-latest on
# the newest versions pyproject's ranges allow (torch stays the lock's CPU build). Not in CI.
test-latest:  ## the whole suite on the newest versions pyproject allows, in .venv-latest (not in CI)
	$(MAKE) test VENV=.venv-latest RESOLVE=latest

# The deterministic simulation (lora_pipeline_tests/sim/, docs/reliability.md) at length:
# SOAK_SCHEDULES seeded schedules from SOAK_START over SOAK_PROCESSES cores; each failure prints
# its seed and the command that replays it. CI runs 500 of them (the suite's test_simulation.py).
SOAK_SCHEDULES ?= 10000
SOAK_START ?= 1
SOAK_STEPS ?= 60
SOAK_PROCESSES ?= 2
soak: install  ## the simulation at length: 10,000 seeded schedules (SOAK_SCHEDULES, SOAK_START, SOAK_STEPS)
	$(PY) -m lora_pipeline_tests.sim --schedules $(SOAK_SCHEDULES) --start $(SOAK_START) \
		--steps $(SOAK_STEPS) --processes $(SOAK_PROCESSES) $(if $(SOAK_WITHOUT),--without $(SOAK_WITHOUT))

# The real-server fault campaign (lora_pipeline_tests/registry/test_fault_campaign.py: threads on
# the local store, S3 over HTTP behind the fault proxy) at length: many seeds, long runs.
SOAK_SEEDS ?= $(shell seq -s, 1 40)
SOAK_REAL_STEPS ?= 300
soak-real: install  ## the real-server fault campaign at length (SOAK_SEEDS, SOAK_REAL_STEPS)
	LORA_CAMPAIGN_SEEDS=$(SOAK_SEEDS) LORA_CAMPAIGN_STEPS=$(SOAK_REAL_STEPS) $(PY) -m pytest -q -p no:logging \
		lora_pipeline_tests/registry/test_fault_campaign.py

# The production shape on this machine, no containers (docs/deploy.md): Postgres (from the
# pgserver wheel), `lora-pipeline deploy init`, then the code server, webserver and daemon as
# separate processes, each in its own process group; state, logs and group ids in .dagster_prod/.
PROD_ROOT ?= .dagster_prod
PG_PORT ?= 5433
CODE_PORT ?= 4266
prod-local: install  ## Postgres + code server + webserver + daemon as separate processes, no containers
	$(VENV)/bin/lora-pipeline deploy local up --root $(PROD_ROOT) --pg-port $(PG_PORT) \
		--code-port $(CODE_PORT) --host $(HOST) --port $(PORT)

prod-stop:  ## stop what prod-local started under PROD_ROOT (by its records, whatever the ports)
	$(VENV)/bin/lora-pipeline deploy local down --root $(PROD_ROOT) --pg-port $(PG_PORT) \
		--code-port $(CODE_PORT) --host $(HOST) --port $(PORT)

# The GPU training benchmark (benchmarks/gpu/, README "GPU training benchmark").
# gpu-bundle: wheels for the bare GPU machine and the reference scripts into .gpu_bundle/, from a
# local diffusers snapshot (PyPI's sdist has no examples/): DIFFUSERS_SRC=<source tree or git mirror>
# [DIFFUSERS_REF=<tag>]. It prints the command to run there.
# gpu-dry-run: the same plan on this CPU with tiny models (the reference too, once the bundle is here).
DIFFUSERS_SRC ?=
DIFFUSERS_REF ?=
GPU_DRY_RUN_OUT ?= .gpu_dry_run
gpu-bundle: install  ## build .gpu_bundle/ for the GPU machine (DIFFUSERS_SRC=<diffusers source>)
	DIFFUSERS_SRC="$(DIFFUSERS_SRC)" DIFFUSERS_REF="$(DIFFUSERS_REF)" $(PY) benchmarks/gpu/bundle.py

gpu-dry-run: install  ## the GPU benchmark plan on this CPU with tiny models
	if [ -d .gpu_bundle/reference ]; then $(PY) benchmarks/gpu/bundle.py --local-reference-deps; fi
	$(PY) benchmarks/gpu/bench_gpu.py --dry-run --out $(GPU_DRY_RUN_OUT)

# The Compose stack for real (docs/deploy.md): needs a running Docker engine and docker-compose;
# builds local base images where no registry is reachable (deploy/test/base-image.sh). Not in CI.
deploy-test: install  ## bring the Compose stack up under Docker, run the sample chain in a run container, tear down
	$(PY) deploy/test/deploy_test.py

demo: install  ## the whole chain once in this process, printing each step
	$(VENV)/bin/lora-pipeline demo

clean:  ## remove .venv and every local state directory
	rm -rf $(VENV) .venv-latest .dagster_home .dagster_prod .lora_store .lora_jobs .deploy_test
