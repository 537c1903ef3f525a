# Every target builds the virtual environment .venv/ on first use, so a fresh clone needs nothing else. The runs need
# torch and a few small packages; make test and make bench add pytest, pytest-timeout, hypothesis and PEFT (with
# transformers).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --progress-bar off -c constraints.txt
BASE := $(VENV)/.installed-base
EXTRAS := $(VENV)/.installed-test
# TORCH_INDEX=URL takes torch from that package index, e.g. the CPU build on Linux:
#   make compare TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# NPROC=N runs compare / ablate / pretrain data-parallel on N processes with torchrun (one per GPU on CUDA).
NPROC ?= 1
LAUNCH = $(if $(filter 1,$(NPROC)),$(PY),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC))

.PHONY: help venv test compare tune ablate replicate tour pretrain bench golden results determinism clean

help:
	@echo "make compare      fine-tune LoRA(r), LoRA(2r), DoRA(r), D2-LoRA(r) on the shipped base and print the table"
	@echo "make test         run the test suite (pytest + hypothesis)"
	@echo "make tune         each method's learning rate, on development seeds and validation items (ARGS=--publish adopts them)"
	@echo "make replicate    the paper's claims at this scale, 28 seeds, at tuned and at the shared learning rate"
	@echo "make ablate       D2-LoRA's open design questions (form, tau, detached norm, targets), 16 seeds"
	@echo "make bench        speed and memory of every method, as ratios (writes runs/bench/)"
	@echo "make determinism  make compare twice from scratch, and whether every number repeats"
	@echo "make results      docs/RESULTS.md from the reports under docs/results/"
	@echo "make tour         the pictures of docs/TOUR.md"
	@echo "make pretrain     pretrain the default base model into runs/pretrain/ (about 20 minutes on 2 CPU cores)"
	@echo "make golden       regenerate the golden vectors under tests/golden/"
	@echo "make venv         build .venv/ with everything (make test's extras too); make clean removes it and runs/"
	@echo "options: ARGS='...' passes arguments, e.g. ARGS='--seeds 0,1,2' or ARGS='--fresh'; NPROC=2 runs on 2 processes (torchrun)"

$(BASE): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PIP) -e .
	touch $(BASE)

$(EXTRAS): $(BASE)
	$(PIP) -e ".[test,peft]"
	touch $(EXTRAS)

venv: $(EXTRAS)

test: $(EXTRAS)
	$(PY) -m pytest

compare: $(BASE)
	$(LAUNCH) -m d2lora_min.train.compare $(ARGS)

tune: $(BASE)
	$(LAUNCH) -m d2lora_min.train.tune $(ARGS)

ablate: $(BASE)
	$(LAUNCH) -m d2lora_min.train.compare --preset ablate $(ARGS)

replicate: $(BASE)
	$(LAUNCH) -m d2lora_min.train.compare --preset replicate $(ARGS)

determinism: $(BASE)
	$(PY) -m d2lora_min.train.determinism $(ARGS)

results: $(BASE)
	$(PY) -m d2lora_min.train.results_page

tour: $(BASE)
	$(PY) -m d2lora_min.train.tour $(ARGS)

pretrain: $(BASE)
	$(LAUNCH) -m d2lora_min.train.pretrain $(ARGS)

bench: $(EXTRAS)
	$(PY) -m d2lora_min.train.bench $(ARGS)

golden: $(BASE)
	$(PY) -m tests.golden.make_golden

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
