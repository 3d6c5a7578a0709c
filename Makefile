# bnas_jax: common commands. `make` (or `make help`) lists the targets.
#
# Variables (override on the command line, e.g. `make search EXP=cifar_proxy ARGS="--config.seed=1"`):
PYTHON ?= python
EXP ?=
VARIANT ?=
WORKDIR ?= runs/$(EXP)$(if $(VARIANT),_$(VARIANT))
ARGS ?=
WORKERS ?= auto
TEST_ARGS ?=
DATASET ?= cifar10
DATA_DIR ?=
SEEDS ?= 0,1,2,3,4
KINDS ?= ggn_fast

CONFIG = experiments/$(EXP).py$(if $(VARIANT),:$(VARIANT))

.DEFAULT_GOAL := help
.PHONY: help install install-prepare test search train bench nb201-seeds data data-shared check-exp

help: ## Show this help.
	@echo "Usage: make <target> [VAR=value ...]"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "Variables: PYTHON=$(PYTHON) EXP=<NAME of experiments/NAME.py> VARIANT=<config variant>"
	@echo "  WORKDIR=runs/<EXP>[_<VARIANT>] ARGS=<config overrides, e.g. \"--config.seed=1\">"
	@echo "  WORKERS=$(WORKERS) (pytest-xdist workers) TEST_ARGS=<extra pytest args>"
	@echo "  DATASET=cifar10|cifar100 DATA_DIR=<data folder> (data, data-shared)"

install: ## Install the package in editable mode with the test tools (pip install -e .[test]).
	$(PYTHON) -m pip install -e '.[test]'

install-prepare: ## Also install TensorFlow, needed only by `make data` (TFDS preparation).
	$(PYTHON) -m pip install -e '.[test,prepare]'

# pytest exits 5 when it collected no test: reported, not treated as a failure.
test: ## Run the test suite: pytest tests/ on WORKERS xdist workers (one file per worker).
	@$(PYTHON) -m pytest tests/ -n $(WORKERS) --dist loadfile $(TEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 0; fi; exit $$rc

check-exp:
	@test -n "$(EXP)" || { echo "EXP is required: make $(MAKECMDGOALS) EXP=<name of experiments/NAME.py>"; exit 2; }
	@test -f "experiments/$(EXP).py" || { echo "no experiment EXP=$(EXP): experiments/$(EXP).py does not exist; the experiments are: $$(ls experiments/*.py | sed 's|experiments/||; s|\.py$$||' | grep -v '^_' | tr '\n' ' ')"; exit 2; }

search: check-exp ## Architecture search: make search EXP=<name> [VARIANT=..] [WORKDIR=..] [ARGS=..].
	$(PYTHON) -m bnas_jax.main --config $(CONFIG) --workdir $(WORKDIR) $(ARGS)

train: check-exp ## Train/evaluate a network: make train EXP=<name> [VARIANT=..] [WORKDIR=..] [ARGS=..].
	$(PYTHON) -m bnas_jax.main --config $(CONFIG) --workdir $(WORKDIR) $(ARGS)

nb201-seeds: ## NAS-Bench-201 quality over seeds: make nb201-seeds [SEEDS=0,1,2,3,4] [KINDS=ggn_fast,recursive].
	$(PYTHON) bench/nb201_seeds.py --seeds $(SEEDS) --kinds $(KINDS) $(if $(ARGS),-- $(ARGS))

bench: ## Run the speed benchmarks bench/bench_*.py (print throughput figures).
	@set -e; for f in bench/bench_*.py; do echo "== $$f"; $(PYTHON) $$f; done

data: ## Download + prepare DATASET with TFDS (array_record; needs internet and install-prepare).
	$(PYTHON) -m bnas_jax.data.prepare prepare --name $(DATASET) $(if $(DATA_DIR),--data_dir $(DATA_DIR))

data-shared: ## Build cifar-10-batches-bin from shared/ (JPEG-derived) and the lossless subset (tiny config) into DATA_DIR (default ~/.cache/bnas_jax).
	$(PYTHON) -m bnas_jax.data.prepare build-shared $(if $(DATA_DIR),--data_dir $(DATA_DIR))
	$(PYTHON) -m bnas_jax.data.prepare build-subset $(if $(DATA_DIR),--data_dir $(DATA_DIR))
