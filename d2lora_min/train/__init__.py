"""Everything `make compare` needs, around one shared trainer.

trainer.py   the training loop for pretraining and every method's fine-tuning (resume, NaN guard, DDP)
world.py     the synthetic world and its pretraining corpus;  data.py  corpus, tokenizer training, batches
tasks.py     the eight downstream tasks and the retention probe;  evaluate.py  scoring, generation, ROUGE-L
compare.py   `make compare` (the runs);  report.py  its statistics, tables and plots
pretrain.py  `make pretrain` and loading the base;  bench.py  `make bench`;  tour.py  `make tour`
cli.py       the `--section.field=value` override parser and usage errors
"""
