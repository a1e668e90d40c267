# Two commands do all set-up: `make demo` runs a real experiment, `make test` runs the checks.
# Both create (or reuse) the virtual environment in .venv and install fm_ray into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/fm-ray run --dataset fashion_mnist --setting setting2 --model cnn --strategy fishermask \
		--init 100 --batch 100 --rounds 4 --epochs 20 --seed 0 --backend ray --out $(DEMO_OUT) --overwrite

lint: $(VENV)/.installed
	$(BIN)/ruff check fm_ray tests benchmarks
	$(BIN)/ruff format --check fm_ray tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

# The quick tier (every unit, property and integration test; about 10 minutes on 2 cores), then the
# slow end-to-end tier (SIGKILL fault runs, Tune sweeps, MLflow sweeps; CI runs it too).
test: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "slow and not labelstudio"

test-all: test test-slow

# Label Studio pins its own Django stack: it gets its own environment; the test talks to it over HTTP.
LS_VENV ?= .lsvenv
$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q 'label-studio>=1.20' 'label-studio-sdk>=1.0'
	touch $@

test-labelstudio: $(VENV)/.installed $(LS_VENV)/.installed
	FM_RAY_LABEL_STUDIO=$(abspath $(LS_VENV))/bin/label-studio $(BIN)/python -m pytest -q -m labelstudio tests/test_labelstudio.py

.PHONY: install demo lint test test-slow test-all test-labelstudio
