# make demo: set up .venv + Fashion-MNIST, then BYOL vs ReLA+BYOL at a reduced budget.
# make test: the same set-up, then the test suite.
# make readme-tables: the README's measured tables, regenerated from benchmarks/results/*.json.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup data demo test readme-tables clean bench-gpu

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

data:
	./scripts/install-fashion-mnist.sh

demo: setup data
	$(BIN)/rela demo --out runs/demo

test: setup data
	$(BIN)/python -m pytest -q --durations=10

readme-tables: setup
	$(BIN)/python benchmarks/readme_tables.py

# GPU benchmark, offline: the 4 Fashion-MNIST .gz files in FMNIST (an ignored folder carried with the tree)
FMNIST ?= data/fashion-mnist
bench-gpu:
	$(BIN)/python benchmarks/gpu.py --data-root $(FMNIST)

clean:
	rm -rf runs .cache .pytest_cache
