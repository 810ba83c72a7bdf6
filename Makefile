VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install tools run test lint fmt bench clean

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

lint: $(STAMP)
	$(BIN)/ruff check worker tests bench
	$(BIN)/ruff format --check worker tests bench
	$(BIN)/mypy worker

fmt: $(STAMP)
	$(BIN)/ruff format worker tests bench
	$(BIN)/ruff check --fix worker tests bench

bench: $(STAMP)
	$(PY) bench/ratelimit.py
	$(PY) bench/failover.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
