# Developer shortcuts. The README's two set-up commands are the plain pip/python
# lines below; `make demo` and `make test` run exactly those.
PYTHON ?= python
INSTALL = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: demo test test-fast bench clean

demo:
	$(INSTALL) -e . && $(PYTHON) -m skdeepmix.demo

test:
	$(INSTALL) -e ".[test]" && $(PYTHON) -m pytest

test-fast:
	$(PYTHON) -m pytest -x -q -m "not slow"

bench:
	$(PYTHON) benchmarks/bench_gaussian_mixture.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
