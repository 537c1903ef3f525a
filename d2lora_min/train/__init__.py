"""The harness: one trainer and everything a comparison needs around it. Listed in import order: each file imports
only files above it (and nn/, files/, synthetic/, tiny_gpt).

tasks.py     the task type (multiple-choice and generative items, a Task, its train/validation/test Split)
cli.py       the flag parser and usage errors
data.py      the corpus, its BPE tokenizer, pretraining windows, packed fine-tuning batches
trainer.py   the training loop for pretraining and every method's fine-tuning (NaN guard, checkpoints, DDP)
evaluate.py  scoring (choice trees), cached greedy decoding, ROUGE-L, retention;  measure.py  timing and memory
specs.py     method specs (`name:key=value`) and the compared roles
pretrain.py  `d2lora pretrain`, and loading the base
settings.py  every setting of a comparison, checked and derived once (resolve -> Settings); presets; tuned lrs
runs.py      one run: train, score, retention, merge check; its key and files
stats.py     paired differences with CIs, the lr match;  tables.py, plots.py, report.py  the report
compare.py   `d2lora compare`;  tune.py  `d2lora tune`;  bench.py  `d2lora bench`

Your own model and data (--model, --tasks DIR) live in d2lora_min/own/, which settings.resolve, compare and tune call.
"""
