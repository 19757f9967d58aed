# `make demo` and `make test` each create .venv on first use and install the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# timm's own model tests, from the sdist of the installed timm release (tests/test_timm_suite.py)
TIMM_TESTS := $(VENV)/timm-sdist

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dense,viz,dev]"
	rm -rf $(TIMM_TESTS) && mkdir -p $(TIMM_TESTS)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $(TIMM_TESTS) \
		"timm==$$($(BIN)/python -c 'import timm; print(timm.__version__)')"
	tar -xzf $(TIMM_TESTS)/timm-*.tar.gz -C $(TIMM_TESTS) --strip-components=1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sgformer demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow"

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
