PYTHON ?= python3

.PHONY: test test-fast lint bench warmup

test:  ## the whole suite: unit, integration, system (real redis-server), fuzz, browser
	bash scripts/system-deps.sh
	$(PYTHON) -m pytest -q

# The fuzz tests' and benches' pytest plugins (schemathesis, anyio, benchmark) cost ~2.5 s to load.
FAST_PLUGINS = -p no:cacheprovider -p no:schemathesis -p no:anyio -p no:benchmark

# One pytest process per core (pytest-xdist). Bytecode is cached even where the environment
# turns it off (PYTHONDONTWRITEBYTECODE), else every run re-compiles and re-rewrites ~150 modules.
test-fast:  ## unit + integration tests, without the system and slow ones (fakeredis, no processes started)
	env -u PYTHONDONTWRITEBYTECODE $(PYTHON) -m pytest -q -n auto $(FAST_PLUGINS) -m "not system and not slow" tests/unit tests/integration

lint:  ## ruff (lint + format) everywhere; mypy on engine, worker and service (zero errors)
	$(PYTHON) -m ruff check engine worker service tests bench
	$(PYTHON) -m ruff format --check engine worker service tests bench
	$(PYTHON) -m mypy

bench:
	$(PYTHON) bench/engine.py
	$(PYTHON) bench/service.py

warmup:
	convq warmup
