"""d2lora_min: LoRA, DoRA and D2-LoRA side by side on one tiny GPT.

d2lora_min.nn         the adapters, injection, merge, adapter files, the opt-in fused path
d2lora_min.train      the harness: the shared trainer, data, tasks, evaluation, statistics, compare, tune, bench
d2lora_min.synthetic  the embedded data: a synthetic world, its pretraining corpus and its eight tasks
d2lora_min.files      file safety: atomic writes, bounded reads, checksummed adapter files, checkpoints and results
d2lora_min.reference  the math in NumPy only, for porting
d2lora_min.commands   the `d2lora` console command;  d2lora_min.tour  the pictures of docs/TOUR.md
"""

__version__ = "0.1.0"
