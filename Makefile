# Every target builds the virtual environment .venv/ on first use, so a fresh clone needs nothing else. The runs need
# torch and a few small packages; make test and make bench add pytest, pytest-timeout, hypothesis and PEFT (with
# transformers). The run targets call the `d2lora` console command (pyproject.toml); `make help` lists them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --progress-bar off -c constraints.txt
BASE := $(VENV)/.installed-base
EXTRAS := $(VENV)/.installed-test
HF := $(VENV)/.installed-hf
# --model DIR (a local Hugging Face model) needs transformers: the targets that take it install it when ARGS names one
NEEDS := $(BASE) $(if $(findstring --model,$(ARGS)),$(HF))
# TORCH_INDEX=URL takes torch from that package index, e.g. the CPU build on Linux:
#   make compare TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# NPROC=N runs compare, tune, ablate, replicate and pretrain data-parallel on N processes with torchrun (one per GPU
# on CUDA).
NPROC ?= 1
D2LORA = $(if $(filter 1,$(NPROC)),$(VENV)/bin/d2lora,$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m d2lora_min.commands)

.PHONY: help venv test compare tune ablate replicate tour pretrain bench golden results determinism format clean

help:
	@echo "For users:"
	@echo "  make compare      fine-tune LoRA(r), LoRA(2r), DoRA(r), D2-LoRA(r) on the shipped base and print the table"
	@echo "                    ARGS='--model DIR --tasks DIR': on your own Hugging Face model and JSONL tasks"
	@echo "  make test         run the test suite (pytest + hypothesis)"
	@echo "  make tune         each method's learning rate, on development seeds and validation items"
	@echo "  make replicate    the paper's claims at this scale, 28 seeds, at tuned and at the shared learning rate"
	@echo "  make ablate       D2-LoRA's open design questions (form, tau, detached norm, targets), 16 seeds"
	@echo "  make bench        speed and memory of every method, as ratios (writes runs/bench/)"
	@echo "  make tour         the pictures of docs/TOUR.md"
	@echo "  make pretrain     pretrain the default base model into runs/pretrain/"
	@echo "  make venv         build .venv/ with everything (make test's extras too); make clean removes it and runs/"
	@echo "For maintainers:"
	@echo "  make results      docs/RESULTS.md from the reports under docs/results/"
	@echo "  make determinism  make compare twice from scratch, and whether every number repeats"
	@echo "  make golden       regenerate the golden vectors under tests/golden/"
	@echo "  make format       ruff format the code (line length 120)"
	@echo "options: ARGS='...' passes flags, e.g. ARGS='--seeds 0,1,2' or ARGS='--methods lora,d2lora --fresh'; with"
	@echo "--publish a report also goes to docs/results/; NPROC=2 runs on 2 processes (torchrun)"

$(BASE): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PIP) -e .
	touch $(BASE)

$(HF): $(BASE)
	$(PIP) -e ".[hf]"
	touch $(HF)

$(EXTRAS): $(BASE)
	$(PIP) -e ".[test,peft]"
	touch $(EXTRAS)

venv: $(EXTRAS)

test: $(EXTRAS)
	$(PY) -m pytest

compare: $(NEEDS)
	$(D2LORA) compare $(ARGS)

tune: $(NEEDS)
	$(D2LORA) tune $(ARGS)

ablate: $(NEEDS)
	$(D2LORA) compare --preset ablate $(ARGS)

replicate: $(NEEDS)
	$(D2LORA) compare --preset replicate $(ARGS)

tour: $(BASE)
	$(VENV)/bin/d2lora tour $(ARGS)

pretrain: $(BASE)
	$(D2LORA) pretrain $(ARGS)

bench: $(EXTRAS)
	$(VENV)/bin/d2lora bench $(ARGS)

results: $(BASE)
	$(PY) -m scripts.results_page

determinism: $(BASE)
	$(PY) -m scripts.determinism $(ARGS)

golden: $(BASE)
	$(PY) -m scripts.make_golden

format: $(BASE)
	$(PIP) ruff
	$(VENV)/bin/ruff format d2lora_min scripts tests examples tiny_gpt.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
