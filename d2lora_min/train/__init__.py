"""Everything `make compare` needs, around one shared trainer.

trainer.py   the training loop for pretraining and every method's fine-tuning (resume, NaN guard, DDP)
world.py     the synthetic world and its pretraining corpus;  data.py  corpus, tokenizer training, batches
tasks.py     the seven downstream tasks;  evaluate.py  log-likelihood scoring, generation, ROUGE-L
pretrain.py  `make pretrain` and loading the base;  compare.py  `make compare`;  bench.py  `make bench`
"""
