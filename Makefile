# Developer shortcuts. The README's two set-up commands are the plain pip/python
# lines below; `make demo` and `make test` run exactly those.
PYTHON ?= python
INSTALL = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: demo test test-fast bench docs docs-clean clean

demo:
	$(INSTALL) -e . && $(PYTHON) -m skdeepmix.demo

test:
	$(INSTALL) -e ".[test]" && $(PYTHON) -m pytest

test-fast:
	$(PYTHON) -m pytest -x -q -m "not slow"

bench:
	$(PYTHON) benchmarks/bench_gaussian_mixture.py

# The documentation site (warnings are errors); `pip install -e ".[docs]"` first.
# Gallery examples run with one thread (doc/conf.py sets OMP_NUM_THREADS=1).
docs:
	$(PYTHON) -m sphinx -W --keep-going -b html doc doc/_build/html

docs-clean:
	rm -rf doc/_build doc/auto_examples doc/generated doc/gen_modules doc/sg_execution_times.rst

clean: docs-clean
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
