# Front door of the pipeline: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# cpu (default) or gpu: which TensorFlow build `make setup` installs.
TF ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
EXTRAS ?= $(TF),offline,int8,ray,dev

DATA_ROOT ?= data/fashion-mnist
TRAIN_PER_CLASS ?= 100
TEST_PER_CLASS ?= 50
FEATURES ?= features
# compare scores 200 test images per class (2,000): enough to tell strategies apart (README, "Compare"); its
# training images are the default data's (the datasets tool draws the test images with their own seed).
COMPARE_ROOT ?= data/fashion-mnist-compare
COMPARE_TEST_PER_CLASS ?= 200
COMPARE_OUT ?= $(FEATURES)/compare
TRAIN_H5 := $(FEATURES)/train.h5
TEST_H5 := $(FEATURES)/test.h5
# What train-* and predict use: the default data's files, or the ones you name.
TRAIN ?= $(TRAIN_H5)
TEST ?= $(if $(filter $(TRAIN_H5),$(TRAIN)),$(TEST_H5),)
# `make extract DATA=path/to/images OUT=features/x.h5` extracts any folder.
DATA ?=
OUT ?=
EXTRACT_ARGS ?=
FMNIST_DEB := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.DEFAULT_GOAL := help
MODELS ?= $(FEATURES)/models
MODEL ?= $(MODELS)/lr.joblib
.PHONY: help setup data extract train-lr train-svm train-rf predict compare-data compare bench bench-backbones bench-train demo test test-avx2 verify clean

help: ## list the targets
	@grep -E "^[a-zA-Z0-9_ -]+:.*## " $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo ""
	@echo "Your own images (one sub-folder per class, train/ and test/ kept apart):"
	@echo "  make extract DATA=mydata/train OUT=features/my-train.h5"
	@echo "  make extract DATA=mydata/test OUT=features/my-test.h5"
	@echo "  make train-lr TRAIN=features/my-train.h5 TEST=features/my-test.h5 MODELS=features/my-models"
	@echo "  make predict IMAGES=new-images/ MODEL=features/my-models/lr.joblib"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the build backend's editable-install banner (a UserWarning) is not for users
	PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

$(FMNIST_DEB):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
	  echo "note: apt-get could not install dataset-fashion-mnist; make data will try the Keras download"; \
	else echo "note: not root, skipping apt-get install dataset-fashion-mnist; make data will try the Keras download"; fi

setup: $(VENV)/.installed ## create .venv, install everything, provision the ImageNet weights and the Fashion-MNIST package (idempotent)
	@[ -f $(FMNIST_DEB) ] || $(MAKE) --no-print-directory $(FMNIST_DEB)
	@$(PY) -m pipeline weights >/dev/null 2>&1 || $(PY) -m pipeline weights

data: setup ## build the default class-per-folder PNG tree (TRAIN_PER_CLASS/TEST_PER_CLASS images per class)
	$(PY) -m pipeline data $(DATA_ROOT) --train-per-class $(TRAIN_PER_CLASS) --test-per-class $(TEST_PER_CLASS)

extract: setup ## extract features: the default data's train/test splits, or DATA=folder OUT=file.h5
ifneq ($(DATA),)
	$(PY) -m pipeline extract $(DATA) -o $(or $(OUT),$(FEATURES)/features.h5) $(EXTRACT_ARGS)
else
	@$(MAKE) --no-print-directory data
	$(PY) -m pipeline extract $(DATA_ROOT)/train -o $(TRAIN_H5) $(EXTRACT_ARGS)
	$(PY) -m pipeline extract $(DATA_ROOT)/test -o $(TEST_H5) $(EXTRACT_ARGS)
endif

train-lr train-svm train-rf: train-%: setup ## a classifier (lr, svm or rf): the default features, or TRAIN=file.h5 [TEST=file.h5] [MODELS=folder]
ifneq ($(DATA)$(OUT),)
	@echo "error: train-$* reads feature files, not images: make train-$* TRAIN=file.h5 [TEST=file.h5] (DATA=/OUT= are extract's)" >&2; exit 2
endif
	@if [ "$(TRAIN)" = "$(TRAIN_H5)" ]; then [ -f $(TRAIN_H5) ] && [ -f $(TEST_H5) ] || $(MAKE) --no-print-directory extract; fi
	@echo "train-$*: $(TRAIN) -> $(MODELS)/$*.joblib, tested on $(or $(TEST),a held-out split of $(TRAIN))"
	$(PY) -m pipeline train $(TRAIN) --model $* $(if $(TEST),--test $(TEST)) -o $(MODELS) $(TRAIN_ARGS)

predict: setup ## label images: make predict IMAGES=folder [MODEL=features/models/lr.joblib]
ifeq ($(IMAGES),)
	@echo "error: make predict IMAGES=folder_or_files [MODEL=$(MODEL)]" >&2; exit 2
endif
	@echo "predict: $(IMAGES) with $(MODEL)"
	$(PY) -m pipeline predict $(MODEL) $(IMAGES) $(PREDICT_ARGS)

compare-data: setup ## the comparison's data: the default training images, COMPARE_TEST_PER_CLASS test images per class (2,000)
	$(PY) -m pipeline data $(COMPARE_ROOT) --train-per-class $(TRAIN_PER_CLASS) --test-per-class $(COMPARE_TEST_PER_CLASS)

compare: compare-data ## every strategy (scratch CNN and ResNet-20, frozen features + LR/SVM/RF, frozen base + head, fine-tuning from a dense head and LP-FT from the LR probe), each final model fitted on all training images, on the same 2,000 test images, with intervals and paired tests
	$(PY) -m pipeline compare --data $(COMPARE_ROOT) -o $(COMPARE_OUT) $(COMPARE_ARGS)

bench: ## measure extraction (naive loop, compute limit, precisions), memory, storage, incremental cost, accuracy
	@$(MAKE) --no-print-directory data
	$(PY) -m pipeline bench --data $(DATA_ROOT) -o $(FEATURES)/bench

bench-backbones: ## extraction speed, feature shape and GMACs of every backbone, in one run (python -m pipeline bench --backbone all)
	@$(MAKE) --no-print-directory data
	$(PY) -m pipeline bench --data $(DATA_ROOT) --backbone all --images 64 -o $(FEATURES)/bench-backbones

bench-train: setup ## training speed against rows (in memory, out of core) on the default features replicated, against one read pass (python -m pipeline bench --train)
	@[ -f $(TRAIN_H5) ] && [ -f $(TEST_H5) ] || $(MAKE) --no-print-directory extract
	$(PY) -m pipeline bench --train --replay $(TRAIN_H5) --test-features $(TEST_H5) -o $(FEATURES)/bench-train

verify: ## check the invariants of the default feature files
	$(PY) -m pipeline verify $(TRAIN_H5) $(TEST_H5)

demo: ## set everything up and run the main job on the default data: extract, then logistic regression
	@$(MAKE) --no-print-directory extract
	@$(MAKE) --no-print-directory train-lr

test: setup ## run the test suite
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-avx2: setup ## run the test suite as an AVX2-only CPU would (`--precision auto` -> float32), on any CPU
	PIPELINE_CPU_FLAGS="avx2 fma" $(PY) -m pytest -q $(PYTEST_ARGS)

clean: ## remove generated features (keeps .venv, data and the weights cache)
	@test -n "$(strip $(FEATURES))" || { echo "error: FEATURES is empty; make clean removes FEATURES/*.h5, FEATURES/*.partial and FEATURES/models" >&2; exit 2; }
	rm -rf -- "$(FEATURES)"/*.h5 "$(FEATURES)"/*.partial "$(FEATURES)/models"
