# sav-ray: common commands. `make demo` and `make test` work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint benchmark clean

# torch goes in first and pinned: an unpinned torch pulled in by another package would
# resolve to a multi-GB CUDA build. constraints.txt pins everything else to tested versions.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) jobs/demo.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check sav_ray jobs serve tests
	$(VENV)/bin/ruff format --check sav_ray jobs serve tests

benchmark: install
	$(PY) jobs/benchmark.py

clean:
	rm -rf data/demo .pytest_cache
