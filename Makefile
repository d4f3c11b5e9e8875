# The two commands a fresh machine needs: `make drill` and `make test`. Both build the venv.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch: a plain "torch" would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
# checkov in a venv of its own: it pins its own HCL parser and friends.
CHECKOV_VENV := .venv-checkov
CHECKOV_PIN := checkov==3.3.30
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
# A second S3 implementation for the compatibility tests (tests/trainer_hooks/test_s3_compatible.py),
# from the npm registry into a folder of its own.
S3RVER_DIR := .s3rver
S3RVER_PIN := s3rver@3.7.1
S3RVER_STAMP := $(S3RVER_DIR)/.installed

.PHONY: test lint unit drill bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

$(CHECKOV_STAMP): Makefile
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet "$(CHECKOV_PIN)"
	touch $@

$(S3RVER_STAMP): Makefile
	mkdir -p $(S3RVER_DIR)
	npm install --prefix $(S3RVER_DIR) --no-audit --no-fund --silent "$(S3RVER_PIN)"
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# mypy cannot follow setuptools' editable finder, and the import names differ from the
	@# folder names (DESIGN.md); a link tree gives it the installed layout.
	rm -rf build/typecheck && mkdir -p build/typecheck/spotguard
	for entry in spotguard/*; do ln -s "../../../$$entry" build/typecheck/spotguard/; done
	ln -s ../../../agent build/typecheck/spotguard/agent
	ln -s ../../../trainer_hooks build/typecheck/spotguard/trainer_hooks
	ln -s ../../../fleet build/typecheck/spotguard/fleet
	MYPYPATH=build/typecheck $(BIN)/mypy -p spotguard

unit: $(STAMP) $(CHECKOV_STAMP) $(S3RVER_STAMP)
	@# The slowest tests are listed at the end: the whole suite must stay under 20 min on 2 cores.
	@# Two workers: much of the suite waits on subprocesses, servers and Terraform; the fleet
	@# tests share one worker (tests/fleet/conftest.py).
	$(BIN)/pytest -n 2 --durations=30

test: lint unit

# The whole interruption loop on this machine: agent, notice, emergency save, exit 75, resume.
drill: $(STAMP)
	$(BIN)/spotguard drill

bench: $(STAMP)
	$(BIN)/python bench/agent_latency.py
	$(BIN)/python bench/checkpoint_io.py
	$(BIN)/python bench/upload_parts.py
	$(BIN)/python bench/drill_e2e.py
	$(BIN)/python bench/store_ceiling.py

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(S3RVER_DIR) build .pytest_cache .mypy_cache .ruff_cache
