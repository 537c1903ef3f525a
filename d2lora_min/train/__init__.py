"""Everything the comparison needs, around one shared trainer.

trainer.py   the training loop for pretraining and every method's fine-tuning (NaN guard, DDP); resume.py its checkpoints
world.py     the synthetic world and its pretraining corpus;  data.py  corpus, tokenizer training, pretraining batches
tasks.py     the eight downstream tasks, their train/validation/test splits, the retention probe
batches.py   packed fine-tuning batches;  evaluate.py  scoring (choice trees), cached greedy decoding, ROUGE-L
specs.py     method specs (`name:key=value`);  presets.py  the settings, the presets, the tuned learning rates
run.py       one run: train, score, retention, merge check;  cache.py  its result file, key and validation
compare.py   `make compare` / `make replicate` / `make ablate`;  tune.py  `make tune` (writes tuned_lrs.json)
stats.py     paired differences with CIs;  tables.py, plots.py, claims.py (the paper's claims), report.py (the report)
pretrain.py  `make pretrain` and loading the base;  bench.py + bench_report.py  `make bench`;  tour.py  `make tour`
cli.py       the `--section.field=value` override parser and usage errors
"""
