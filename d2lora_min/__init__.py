"""d2lora_min: LoRA, DoRA and D2-LoRA side by side on one tiny GPT.

d2lora_min.nn        the adapters, injection, merge and adapter checkpoints
d2lora_min.train     the shared trainer, data, tasks, evaluation, `compare` and `bench`
d2lora_min.reference the math in NumPy only, for porting
"""

__version__ = "0.1.0"
