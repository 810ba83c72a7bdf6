VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install tools run test chaos lint fmt bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium, prometheus (promtool) and wrk, when missing.
tools:
	scripts/ensure-tools

# One replica plus the sandbox marketplace and event sites it reads (stopped with the replica).
run: $(STAMP)
	$(BIN)/worker migrate --create-db
	@set -a; . examples/sandbox.env; set +a; \
	$(BIN)/worker sandbox --port 8900 --emag-items 5000 --fienta-port 8901 --eventim-port 8902 \
	  --kontramarka-port 8903 & sandbox=$$!; \
	trap 'kill $$sandbox 2>/dev/null' EXIT INT TERM; \
	WORKER_JOBS_FILE=$${WORKER_JOBS_FILE:-examples/jobs.toml} $(BIN)/worker run

test: $(STAMP) tools
	$(BIN)/pytest -q

# Every chaos scenario (tests/chaos; `make test` runs the few listed in its conftest).
chaos: $(STAMP)
	CHAOS=all $(BIN)/pytest -q -s tests/chaos

# The deploy files' scanners: hadolint (dev extras) on the Dockerfile, checkov on k8s/.
# checkov pins packaging<24 and brings some sixty packages, which would hold pytest back:
# it lives in a venv of its own. It runs offline: no Prisma Cloud key, nothing downloaded
# (.checkov.yaml), no PyPI version check.
SCAN := $(VENV)/scan
CHECKOV_VERSION := 3.3.30
SCAN_STAMP := $(SCAN)/.checkov-$(CHECKOV_VERSION)

$(SCAN_STAMP):
	test -x $(SCAN)/bin/python || python3 -m venv $(SCAN)
	$(SCAN)/bin/python -m pip install -q 'checkov==$(CHECKOV_VERSION)'
	touch $@

lint: $(STAMP) $(SCAN_STAMP)
	$(BIN)/ruff check worker tests bench
	$(BIN)/ruff format --check worker tests bench
	$(BIN)/mypy worker
	$(BIN)/hadolint docker/Dockerfile
	env -u BC_API_KEY CKV_SKIP_PACKAGE_UPDATE_CHECK=true $(SCAN)/bin/checkov --config-file .checkov.yaml

fmt: $(STAMP)
	$(BIN)/ruff format worker tests bench
	$(BIN)/ruff check --fix worker tests bench

bench: $(STAMP)
	$(PY) bench/ratelimit.py
	$(PY) bench/failover.py
	$(PY) bench/scale.py --jobs 1000 5000 10000
	$(PY) bench/probes.py
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
