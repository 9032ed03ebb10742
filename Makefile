# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8080
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint serve clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/gateway demo --port $(PORT)

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests
	$(VENV)/bin/ruff format --check gateway tests

clean:
	rm -rf $(VENV) .demo .pytest_cache build *.egg-info
