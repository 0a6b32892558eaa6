# The two set-up commands from README.md. Each creates what it needs on a fresh machine.
#   make serve   run pyturn on its embedded default config
#   make test    ruff, mypy and the whole pytest suite (installs coturn's client tools)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: serve test lint typecheck pytest system-deps clean

serve: $(VENV)/.installed
	$(BIN)/pyturn serve $(ARGS)

test: $(VENV)/.installed system-deps lint typecheck pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# coturn's turnutils_* are the third-party clients of the interop tests.
system-deps:
	@sh scripts/install-system-deps.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
