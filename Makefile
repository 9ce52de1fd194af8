PYTHON ?= python3
PROFILE ?= quick
DATA ?=
JOBS ?= 2
SEEDS ?= 3
PRETRAIN ?=

.PHONY: build data test bench compare clean

## build: install the requirements and build the C++ (and, where CUDA is present, CUDA) extension
build:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) csrc/build.py

## data: make the default synthetic dataset (data_prep/synthetic/) if it is missing
data:
	$(PYTHON) -c "import sys; sys.path.insert(0, '.'); from data_prep.synthesize import ensure_default_data; ensure_default_data()"

## test: the whole test suite (tiny models and tiny data; a few minutes on 2 cores)
test:
	$(PYTHON) -m pytest -q tests

## bench: speed ratios measured side by side in one run
bench:
	$(PYTHON) tests/bench.py

## compare: every strategy x seeds -> results/compare.md, results/compare.csv (PRETRAIN=1 adds the pretraining section)
compare:
	$(PYTHON) common/compare.py --profile $(PROFILE) --jobs $(JOBS) --seeds $(SEEDS) $(if $(DATA),--data $(DATA),) $(if $(PRETRAIN),--pretraining,)

clean:
	rm -rf csrc/build data_prep/synthetic .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
