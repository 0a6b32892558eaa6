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

$(VENV)/.installed: pyproject.toml hatch_build.py pyturn/net/_udp_batch.c \
		pyturn/net/_udp_batch.h pyturn/net/_fastpath.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# coturn's turnutils_* are the third-party clients of the interop tests.
system-deps:
	@sh scripts/install-system-deps.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# The "Fast relay" benchmark: pyturn against coturn, side by side (README "Performance").
# It needs coturn and the OpenSSL headers for its load generator: system-deps has both.
#   make bench                   full run, about 13 minutes
#   make bench BENCH_ARGS=--quick    about 3 minutes
.PHONY: bench
bench: $(VENV)/.installed system-deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Hostile traffic (SECURITY.md): the long runs behind the short ones in `make test`.
#   make fuzz                   both atheris targets for FUZZ_SECONDS each (default 120)
#   make fuzz FUZZ_SECONDS=3600
#   make soak                   allocation churn against a real server, SOAK_MINUTES (3)
# A crash is saved as $(FUZZ_DIR)/artifacts/crash-<sha1>; replay it with
#   $(BIN)/python fuzz/fuzz_wire.py FILE   or   $(BIN)/python fuzz/fuzz_core.py --replay FILE
FUZZ_SECONDS ?= 120
FUZZ_DIR     ?= /tmp/pyturn-fuzz
SOAK_MINUTES ?= 3
.PHONY: fuzz soak
fuzz: $(VENV)/.installed
	$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/pip install --quiet atheris
	mkdir -p $(FUZZ_DIR)/wire-corpus $(FUZZ_DIR)/core-corpus $(FUZZ_DIR)/artifacts
	for f in tests/wire/vectors/*.hex; do \
	    $(BIN)/python -c 'import sys; sys.stdout.buffer.write(bytes.fromhex(open(sys.argv[1]).read()))' \
	        "$$f" > "$(FUZZ_DIR)/wire-corpus/$$(basename "$$f" .hex)"; \
	done
	$(BIN)/python fuzz/fuzz_core.py --seed-corpus $(FUZZ_DIR)/core-corpus
	$(BIN)/python fuzz/fuzz_wire.py -max_total_time=$(FUZZ_SECONDS) \
	    -artifact_prefix=$(FUZZ_DIR)/artifacts/ $(FUZZ_DIR)/wire-corpus
	$(BIN)/python fuzz/fuzz_core.py -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
	    -artifact_prefix=$(FUZZ_DIR)/artifacts/ $(FUZZ_DIR)/core-corpus

soak: $(VENV)/.installed
	$(BIN)/python tools/soak.py --minutes $(SOAK_MINUTES)
