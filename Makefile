# trading-bot-ml: the front door. `make setup` then `make test`; `make run` / `make stop`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup redis-server chromium test test-unit test-ray test-e2e bench chaos run stop lint format clean

setup: $(VENV)/.installed redis-server chromium

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml changes (idempotent and quick otherwise).
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	@$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

redis-server:
	@if command -v redis-server >/dev/null 2>&1; then \
		echo "redis-server: $$(redis-server --version | cut -d' ' -f3)"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's redis-server"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
		  || { echo "apt-get install redis-server failed" >&2; exit 1; }; \
		systemctl disable --now redis-server >/dev/null 2>&1 || service redis-server stop >/dev/null 2>&1 || true; \
	else \
		echo "redis-server is missing: install it with 'sudo apt-get install redis-server' (Debian/Ubuntu) and run make setup again" >&2; \
		exit 1; \
	fi

# Debian's Chromium: the status page is checked in a real headless browser (tests/ray/test_serving_api.py).
chromium:
	@if command -v chromium >/dev/null 2>&1; then \
		echo "chromium: $$(chromium --version 2>/dev/null | cut -d' ' -f2)"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		  || { echo "apt-get install chromium failed" >&2; exit 1; }; \
	else \
		echo "chromium is missing: install it with 'sudo apt-get install chromium' (Debian/Ubuntu) and run make setup again" >&2; \
		exit 1; \
	fi

# The unit tier (CPU-bound, no Ray) runs beside the Ray and end-to-end tiers, which mostly wait on
# clusters, timers and processes; its output follows theirs. Either tier failing fails the target.
UNIT_LOG := tests/artifacts/unit-tier.log
test: setup
	@mkdir -p $(dir $(UNIT_LOG))
	@$(VENV)/bin/pytest -q --timeout=900 tests/unit > $(UNIT_LOG) 2>&1 & unit=$$!; \
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -q --timeout=900 tests/ray tests/e2e; cluster=$$?; \
	wait $$unit; unit_rc=$$?; \
	echo "===== unit tier (tests/unit) ====="; cat $(UNIT_LOG); \
	echo "ray+e2e tiers exit $$cluster, unit tier exit $$unit_rc"; \
	test $$cluster -eq 0 -a $$unit_rc -eq 0

test-unit: setup
	$(VENV)/bin/pytest -q tests/unit

test-ray: setup
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -q tests/ray

test-e2e: setup
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -q tests/e2e

bench: setup
	RAY_AUTH_MODE=disabled $(PY) -m bench.run $(BENCH_ARGS)

chaos: setup
	RAY_AUTH_MODE=disabled $(PY) -m bench.chaos $(CHAOS_ARGS)

run: setup
	$(VENV)/bin/tbml up

stop:
	$(VENV)/bin/tbml down

lint:
	$(VENV)/bin/ruff check .

format:
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
