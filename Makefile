# Every target works from a fresh clone with only Python: dev tools go into
# virtualenvs of their own under build/, never into the Python that runs them.
PYTHON ?= python3
STDLIB_ONLY := build/stdlib-only
TESTS := test_jason examples/test_examples.py
# `make test V=1` lists every test; by default only failures and the summary are shown.
UNITTEST := $(PYTHON) -m unittest $(if $(V),-v,)

.PHONY: test test-installed test-stdlib quick selftest lint bench bench-servers clean version check

## test: the suite with the optional packages as installed, then with them blocked
test: test-installed test-stdlib

test-installed:
	$(UNITTEST) $(TESTS)

## test-stdlib: the same suite with orjson and aiofiles blocked (children inherit the block)
test-stdlib: $(STDLIB_ONLY)/sitecustomize.py
	PYTHONPATH=$(STDLIB_ONLY) $(UNITTEST) $(TESTS)

$(STDLIB_ONLY)/sitecustomize.py:
	mkdir -p $(STDLIB_ONLY)
	printf 'import sys\nsys.modules["orjson"] = None\nsys.modules["aiofiles"] = None\n' > $@

## quick: the inner loop, in seconds: one pass, without the slow tests (kill loop, packaging, 100,000 users)
quick:
	JASON_QUICK=1 $(UNITTEST) test_jason

selftest:
	$(PYTHON) jason.py --selftest

## lint: ruff (with the ASYNC rules) on everything, mypy --strict on jason.py, mypy on the tests and on typed records
LINT_VENV := build/lint-venv
lint: $(LINT_VENV)/installed
	$(LINT_VENV)/bin/python -m ruff check jason.py test_jason.py examples benchmarks
	$(LINT_VENV)/bin/python -m mypy --strict jason.py
	$(LINT_VENV)/bin/python -m mypy test_jason.py
	$(LINT_VENV)/bin/python -m mypy --strict --warn-unused-ignores examples/typed_records.py

$(LINT_VENV)/installed: requirements-lint.txt
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-lint.txt
	touch $@

## bench: JASON against its floors and peers, in its own virtualenv; writes benchmarks/results.{md,json} and chart.svg
BENCH_VENV := build/bench-venv
bench: $(BENCH_VENV)/installed
	$(BENCH_VENV)/bin/python benchmarks/bench.py $(BENCH_ARGS)

## bench-servers: JASON on throwaway PostgreSQL and Redis servers against the raw drivers; writes benchmarks/servers.{md,json}
bench-servers: $(BENCH_VENV)/installed
	$(BENCH_VENV)/bin/python benchmarks/servers.py $(BENCH_ARGS)

$(BENCH_VENV)/installed: benchmarks/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r benchmarks/requirements.txt
	touch $@

version:
	@$(PYTHON) jason.py --version

clean:
	rm -rf build dist *.egg-info __pycache__ .mypy_cache .ruff_cache

check: selftest test lint
