# Two commands do everything on a fresh machine with Python 3.11:
#   make up     set up (virtualenv in .venv when missing, the project without its test extras) and run the
#               example ensemble to completion
#   make test   set up with the test extras and run every check and the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the test extras (pytest, mypy, ruff, ...), installed on top of the project for `make test` and the checks
TEST_STAMP := $(VENV)/.installed-test
EXAMPLE ?= examples/hello-world.yaml

.PHONY: setup test-setup up test tools lint typecheck stubs check-stubs schema pytest clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

test-setup: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

up: setup
	$(BIN)/ensemble up $(EXAMPLE)

test: test-setup lint typecheck check-stubs tools pytest

# What the tests need beyond Python, each skipped with its reason where it cannot be had: kubectl for the
# manifest tests (.ci/install-kubectl), as root a Docker engine with a base image for the image and
# compose tests (.ci/docker-engine: Debian's docker.io, debootstrap), and as root Debian's Chromium for the
# report's browser test (.ci/install-chromium). Flux is never installed here.
tools:
	.ci/docker-engine
	.ci/install-chromium

lint: test-setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: test-setup
	$(BIN)/mypy

stubs: test-setup
	PATH=$(BIN):$$PATH protos/generate.sh

check-stubs: test-setup
	rm -rf .stubs-check && mkdir -p .stubs-check
	PATH=$(BIN):$$PATH protos/generate.sh .stubs-check
	diff -r -x __init__.py -x __pycache__ .stubs-check/ensemble_core/rpc ensemble_core/rpc \
	  || (echo "generated gRPC stubs are stale: run 'make stubs' and commit the result" && exit 1)
	rm -rf .stubs-check

# The MiniCluster spec schema that validation reads, vendored from the Flux Operator's CRD (tests check it is fresh)
schema: test-setup
	$(BIN)/python tools/minicluster_schema.py

# The suite runs on PYTEST_WORKERS pytest-xdist workers (most tests wait on subprocesses, not the CPU: on
# 2 cores, 3 workers took 6 min 40 s where one took about 15 min); PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 3
pytest: test-setup
	tools="$$(.ci/install-kubectl)" && PATH="$${tools:+$$tools:}$$PATH" $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .stubs-check
