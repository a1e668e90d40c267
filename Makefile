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
		--init 100 --batch 100 --rounds 4 --epochs 20 --seed 0 --out $(DEMO_OUT) --overwrite

lint: $(VENV)/.installed
	$(BIN)/ruff check fm_ray tests benchmarks
	$(BIN)/ruff format --check fm_ray tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

.PHONY: install demo lint test
