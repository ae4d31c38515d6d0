# Every target works from a fresh clone with only Python: dev tools go into
# virtualenvs of their own under build/, never into the Python that runs them.
PYTHON ?= python3
STDLIB_ONLY := build/stdlib-only
TESTS := test_jason examples/test_examples.py
# `make test V=1` lists every test; by default only failures and the summary are shown.
UNITTEST := $(PYTHON) -m unittest $(if $(V),-v,)

.PHONY: test test-installed test-stdlib quick selftest lint bench bench-servers clean version check

# Runs $(1) in two processes at once, one per core, sharing the test classes as they go (each class is
# claimed by the first process to reach it: see "how the suite runs" in test_jason.py). Each process's
# output is shown when both have finished; the run fails if either fails.
define in_two_processes
	@rm -rf build/claims-$@ && mkdir -p build/claims-$@
	@echo "$(1)  (in two processes)"
	@JASON_CLAIMS=$(CURDIR)/build/claims-$@ $(1) > build/claims-$@/first.log 2>&1 & first=$$!; \
	trap 'kill $$first 2>/dev/null' INT TERM; \
	JASON_CLAIMS=$(CURDIR)/build/claims-$@ $(1) > build/claims-$@/second.log 2>&1; second=$$?; \
	wait $$first; first=$$?; cat build/claims-$@/first.log build/claims-$@/second.log; \
	test $$first -eq 0 && test $$second -eq 0
endef

## test: the suite with the optional packages as installed, then the codec's part with orjson blocked
test: test-installed test-stdlib

test-installed:
	$(call in_two_processes,$(UNITTEST) $(TESTS))

## test-stdlib: with orjson blocked (children inherit the block): the codec's parity checks and the folder API
test-stdlib: $(STDLIB_ONLY)/sitecustomize.py
	$(call in_two_processes,PYTHONPATH=$(STDLIB_ONLY) $(UNITTEST) test_jason)

$(STDLIB_ONLY)/sitecustomize.py: Makefile
	mkdir -p $(STDLIB_ONLY)
	printf 'import sys\nsys.modules["orjson"] = None\n' > $@

## quick: the inner loop, in seconds: one pass, without the slow tests (kill loop, packaging, 100,000 users)
quick:
	$(call in_two_processes,JASON_QUICK=1 $(UNITTEST) test_jason)

selftest:
	$(PYTHON) jason.py --selftest

## lint: ruff (with the ASYNC rules) on everything, mypy --strict on jason.py, mypy on the tests and the examples, --strict on typed records
LINT_VENV := build/lint-venv
lint: $(LINT_VENV)/installed
	$(LINT_VENV)/bin/python -m ruff check jason.py test_jason.py examples benchmarks
	$(LINT_VENV)/bin/python -m mypy --strict jason.py
	$(LINT_VENV)/bin/python -m mypy test_jason.py examples
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
