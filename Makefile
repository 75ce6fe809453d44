# rnnimg: `make demo` runs the whole product on embedded defaults; `make test` runs the tests.
# Both create .venv with Python 3.11 and install the pinned set in constraints.txt
# (torch pinned to the CPU build for this install path; the package itself asks for torch>=2.3).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-output

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test test-recovery test-deploy test-cluster clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,report,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python flows/demo.py --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not cluster and not recovery and not deploy"

# Runs killed mid-way (a worker, the driver, the whole command) and rerun: about 6 minutes; CI runs it after `make test`.
test-recovery: $(STAMP)
	$(BIN)/python -m pytest -m recovery

# infra/prefect.yaml deployed to a real Prefect server, worker and Ray cluster, every flow run (2 to 3 minutes); CI runs it after `make test`.
test-deploy: $(STAMP)
	$(BIN)/python -m pytest -m deploy

# Multi-node Ray clusters started with `ray start` on this machine (a few minutes); CI runs it after `make test`.
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -m cluster

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
