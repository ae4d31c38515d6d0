# Every target works from a fresh clone with only Python; dev tools are
# installed into the current Python by the targets that need them.
PYTHON ?= python3
STDLIB_ONLY := build/stdlib-only

.PHONY: test test-installed test-stdlib selftest lint bench clean version check

## test: the suite with the optional packages as installed, then with them blocked
test: test-installed test-stdlib

test-installed:
	$(PYTHON) -m unittest -v test_jason examples/test_examples.py

## test-stdlib: the same suite with orjson and aiofiles blocked (children inherit the block)
test-stdlib: $(STDLIB_ONLY)/sitecustomize.py
	PYTHONPATH=$(STDLIB_ONLY) $(PYTHON) -m unittest -v test_jason examples/test_examples.py

$(STDLIB_ONLY)/sitecustomize.py:
	mkdir -p $(STDLIB_ONLY)
	printf 'import sys\nsys.modules["orjson"] = None\nsys.modules["aiofiles"] = None\n' > $@

selftest:
	$(PYTHON) jason.py --selftest

lint:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PYTHON) -m ruff check jason.py test_jason.py examples benchmarks
	$(PYTHON) -m mypy --strict jason.py

## bench: JASON against its floors and peers, in its own virtualenv; writes benchmarks/results.{md,json} and chart.svg
BENCH_VENV := build/bench-venv
bench: $(BENCH_VENV)/installed
	$(BENCH_VENV)/bin/python benchmarks/bench.py $(BENCH_ARGS)

$(BENCH_VENV)/installed: benchmarks/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r benchmarks/requirements.txt
	touch $@

version:
	@$(PYTHON) jason.py --version

clean:
	rm -rf build dist *.egg-info __pycache__ .mypy_cache .ruff_cache

check: selftest test lint
