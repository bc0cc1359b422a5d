# `make demo` and `make test` work on a fresh clone with nothing but Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-workers test test-fast matrix lint format bench load dashboards docs docs-dot clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

demo: $(STAMP)
	$(BIN)/python -m uvicorn demo_app.main:app --host 127.0.0.1 --port 8000

# The demo as deployed: gunicorn, 3 uvicorn workers, one merged /metrics (docs/deployment.md).
demo-workers: $(STAMP)
	$(BIN)/gunicorn -c demo_app/gunicorn.conf.py demo_app.main:app

load: $(STAMP)
	$(BIN)/python -m demo_app.load

dashboards: $(STAMP)
	$(BIN)/python dashboards/generate.py

# pytest exits 5 when it ran no test: say so instead of failing without a word.
NO_TEST := { rc=$$?; [ $$rc -ne 5 ] || echo "pytest ran no test (exit 5)" >&2; exit $$rc; }

test: $(STAMP)
	$(BIN)/python -m pytest --durations=15 || $(NO_TEST)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" || $(NO_TEST)

# The test matrix of noxfile.py: Python 3.11 to 3.13, the lowest and the newest dependencies,
# the built wheel serving the quick start. One session: make matrix NOX_ARGS="-s lowest";
# add -r to reuse the venvs of an earlier run.
NOX_ARGS ?=
matrix: $(STAMP)
	bash .ci/with-pythons $(BIN)/nox $(NOX_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict middleware/sessionscope
	$(BIN)/python dashboards/generate.py --check

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The docs site (Sphinx, MyST, furo), warnings as errors; the reference pages are generated first.
# docs/lifecycle.md draws its diagram with Graphviz: without `dot` the build would fail late.
docs-dot:
	@command -v dot >/dev/null 2>&1 || { \
		echo "make docs needs Graphviz's dot command (docs/lifecycle.md draws a diagram with it):" \
			"install Graphviz (apt-get install graphviz, brew install graphviz) and run it again." >&2; \
		exit 1; }

docs: docs-dot $(DOCS_STAMP)
	$(BIN)/python docs/_tools/reference.py
	$(BIN)/sphinx-build -W --keep-going -q -b html docs build/docs

bench:
	bash benchmarks/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
