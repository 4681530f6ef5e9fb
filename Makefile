# make demo: set up .venv + Fashion-MNIST, then BYOL vs ReLA+BYOL at a reduced budget.
# make test: the same set-up, then the test suite.
# make readme-tables: the measured blocks of README.md and docs/, regenerated from benchmarks/results/*.json.
# make docs: the documentation site, built offline and strictly into site/ (MkDocs; a stale block or broken link fails).
# make mutation: mutation testing (not in CI; about an hour on 2 shared cores), see benchmarks/results/mutation.md.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup data demo test readme-tables docs clean bench-gpu mutation

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

# two pytest-xdist workers (one thread each, tests/conftest.py): 6 min instead of 10 on 2 cores; each file
# stays on one worker, so its module fixtures (the wheel, the docs site) are built once. TEST_WORKERS=0: serial
TEST_WORKERS ?= 2
test: setup data
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10

readme-tables: setup
	$(BIN)/python benchmarks/readme_tables.py

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# mutmut over rela/targets.py and rela/accelerator.py against their unit tests ([tool.mutmut] in
# pyproject.toml; mutants/ is a scratch copy), then the hand-written mutants of the training step
mutation: setup
	rm -rf mutants
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results
	OMP_NUM_THREADS=1 $(BIN)/python scripts/mutation_train.py --json mutants/train.json

# GPU benchmark, offline: the 4 Fashion-MNIST .gz files in FMNIST (an ignored folder carried with the tree);
# resumes a stopped benchmark (FRESH=--fresh starts over). On a lent GPU: bash benchmarks/gpu_check.sh (--quick).
# BENCH_PYTHON=python3 where there is no .venv (a lent GPU machine).
FMNIST ?= data/fashion-mnist
BENCH_PYTHON ?= $(BIN)/python
bench-gpu:
	$(BENCH_PYTHON) benchmarks/gpu.py --data-root $(FMNIST) $(FRESH)

clean:
	rm -rf runs .cache .pytest_cache site
