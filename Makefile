# Two commands for a fresh machine with Python 3.11+: `make demo` and `make test`.
# Each creates .venv and installs what it needs, at the versions pinned in constraints.txt
# (`make lock` refreshes them).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench lock clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $@

# Re-resolve every dependency (all extras) in a throwaway venv and pin the result.
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip && \
	"$$tmp/venv/bin/python" -m pip install -q '.[dev,bench]' && \
	{ echo "# Every dependency of pgqueue[dev,bench], pinned; \`make lock\` rewrites this file."; \
	  echo "# pip constraints (-c): the Makefile, CI and the Dockerfile install with them."; \
	  "$$tmp/venv/bin/python" -m pip freeze --exclude pgqueue; } > "$$tmp/constraints.txt" && \
	mv "$$tmp/constraints.txt" constraints.txt && \
	echo "constraints.txt: $$(grep -vc '^#' constraints.txt) pins"

demo: $(BIN)/.installed
	$(BIN)/pgqueue demo

test: $(BIN)/.installed
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict pgqueue
	$(BIN)/lint-imports

bench: $(BIN)/.bench-installed
	$(BIN)/python bench/enqueue.py

clean:
	rm -rf $(VENV) .pgqueue
