"""Run by tests/train/test_distributed.py under `torchrun --nproc_per_node=N`: fine-tune a tiny model with the
shared trainer, then dump this process's final weights and how many files it wrote.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train/ddp_worker.py OUT_DIR DUMP_DIR
"""

import sys

import torch

import d2lora_min.train.trainer as trainer
from d2lora_min.nn import adapter_state_dict, inject_adapters
from d2lora_min.train.trainer import TrainConfig, init_distributed, train
from tiny_gpt import GPT, GPTConfig


def batches(step):
    """A global batch of 8 counting sequences; rows carry different numbers of targets (as in fine-tuning)."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, 16, (8, 1), generator=g)
    seq = (start + torch.arange(13)) % 16
    x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    for b in range(8):
        y[b, : b + 1] = -1  # row b has its first b + 1 targets masked
    return x, y


def main(out_dir, dump_dir):
    rank, world = init_distributed()
    writes = []
    real_save = trainer.save_checkpoint
    trainer.save_checkpoint = lambda *a, **k: (writes.append(a[0]), real_save(*a, **k))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=12, n_layer=1, n_head=2, d_model=16))
    inject_adapters(model, "d2lora", r=2, alpha=4)
    result = train(
        model,
        batches,
        TrainConfig(steps=8, batch_size=8, lr=1e-2, warmup_steps=2, checkpoint_every=4, progress=False),
        out_dir=out_dir,
    )
    torch.save({"adapter": adapter_state_dict(model), "losses": result.losses, "writes": len(writes), "world": world},
               f"{dump_dir}/rank{rank}_of{world}.pt")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
