"""Your own model and data: the same comparison (trainer, budget, seeds, statistics, verdicts, report) on a local
Hugging Face causal LM and tasks from JSONL files, and the way back to the ecosystem.

session.py  the glue: the checks and defaults before any work, what the run key adds, the Setup of a comparison
model.py    a local Hugging Face causal LM, loaded and wrapped to be called as tiny_gpt is (transformers, on first use)
tasks.py    task folders of <task>.jsonl files -> the harness's task type; the command that writes the embedded tasks
export.py   `d2lora export`: the shipped base as OPT, adapters in PEFT's format, D2-LoRA's merged model

The harness (d2lora_min.train) reaches this package only from its hooks in settings.resolve, compare and tune (runs.py
reads what they put in Settings.own); for the shipped base and tasks session.resolve_own finds nothing to do, and
transformers is never imported.
"""
