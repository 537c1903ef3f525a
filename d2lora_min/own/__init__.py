"""Your own model and data: the same comparison (trainer, budget, seeds, statistics, verdicts, report) on a local
Hugging Face causal LM and tasks from JSONL files, and the way back to the ecosystem.

model.py    a local Hugging Face causal LM, loaded and wrapped to be called as tiny_gpt is (transformers, on first use)
export.py   `d2lora export`: the shipped base as OPT, adapters in PEFT's format, D2-LoRA's merged model
"""
