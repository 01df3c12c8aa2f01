# Rollgate: `make demo` runs the whole thing on this machine; `make test` runs the test suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

var/secret-key:
	mkdir -p var
	$(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))' > var/secret-key
	chmod 600 var/secret-key

demo: $(STAMP) var/secret-key
	SECRET_KEY="$$(cat var/secret-key)" DEBUG=0 PORT=$(PORT) exec $(PY) manage.py demo --port $(PORT)

test: $(STAMP)
	SECRET_KEY=test-only-insecure-key DEBUG=0 $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf var .pytest_cache
