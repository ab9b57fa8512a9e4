# Two entry points: `make demo` and `make test`. Both create .venv when it is missing and
# (re)install only when pyproject.toml or constraints.txt changed since the last install.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# --no-compile: byte-compiling every module of torch and its peers at install time cost about
	# a minute of make demo's ten (results/demo.md); Python compiles what it imports, once
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e '.[dev,video,audio]'
	touch $(STAMP)

# The whole pipeline on a synthetic Aff-Wild2 tree; writes $(DEMO_DIR)/report.md and report.png.
demo: $(STAMP)
	$(BIN)/fercache demo --out $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
