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
	$(BIN)/python -m pip install -q -e ".[dense,viz,dev,deploy,tensorboard]"
	rm -rf $(TIMM_TESTS) && mkdir -p $(TIMM_TESTS)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $(TIMM_TESTS) \
		"timm==$$($(BIN)/python -c 'import timm; print(timm.__version__)')"
	tar -xzf $(TIMM_TESTS)/timm-*.tar.gz -C $(TIMM_TESTS) --strip-components=1
	touch $(STAMP)

# The main job on built-in data: generate the shapes, train sgformer_nano on the CPU, validate,
# predict a few held-out images, draw their significance maps. Outputs in runs/demo/.
# sgformer.data.DEFAULT_ROOT, which the dense trainers use without data flags
DEMO_DATA := data/shapes
DEMO_RUN := runs/demo
DEMO_IMAGES := $(DEMO_DATA)/val/*/val_0000[0-7].png  # one per class, expanded by the shell

demo: $(STAMP)
	$(BIN)/sgformer data shapes $(DEMO_DATA) --force  # rewritten only when it differs
	rm -rf $(DEMO_RUN)
	$(BIN)/sgformer train --recipe shapes_demo --data-dir $(DEMO_DATA) --output $(DEMO_RUN)
	$(BIN)/sgformer validate --data-dir $(DEMO_DATA) --checkpoint $(DEMO_RUN)/best.pth \
		--results-file $(DEMO_RUN)/validate.json
	$(BIN)/sgformer predict $(DEMO_IMAGES) --checkpoint $(DEMO_RUN)/best.pth --topk 3
	$(BIN)/sgformer significance $(DEMO_IMAGES) --checkpoint $(DEMO_RUN)/best.pth \
		--output $(DEMO_RUN)/significance

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow"

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
