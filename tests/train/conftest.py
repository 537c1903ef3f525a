"""Fixtures of the harness's tests: a small tokenizer, and the shipped base with a briefly trained adapter."""

import copy

import pytest

from d2lora_min.nn import inject_adapters
from d2lora_min.synthetic.tasks import TASKS
from d2lora_min.synthetic.world import World
from d2lora_min.train.data import EOT, finetune_batches, train_tokenizer
from d2lora_min.train.pretrain import load_base
from d2lora_min.train.tasks import build_splits
from d2lora_min.train.trainer import TrainConfig, train


@pytest.fixture(scope="session")
def tokenizer():
    """A BPE tokenizer of a few words ("go", " yes", " red", ... each one token) and the task format."""
    return train_tokenizer(["go yes no red blue green stop"] * 50 + ["Q: A:\n"] * 10, vocab_size=300)


@pytest.fixture(scope="session")
def trained():
    """The shipped base with a D2-LoRA adapter trained for a few packed steps (non-zero B: the adapter matters),
    and the tasks' splits -> (model in eval mode, tokenizer, splits)."""
    base, tokenizer, _ = load_base()
    world = World()
    tasks = {t: TASKS[t] for t in ("yesno", "continuation", "compare", "span")}
    splits = build_splits(world, tasks, n_train=16, n_test=40, seed=0)
    model = inject_adapters(copy.deepcopy(base), "d2lora", r=2, alpha=4)
    batches = finetune_batches(
        tokenizer, {k: parts.train for k, parts in splits.items()}, 16, 0, tokenizer.token_to_id(EOT), capacity=128
    )
    train(model, batches, TrainConfig(steps=6, lr=1e-2, warmup_steps=1, progress=False))
    return model.eval(), tokenizer, splits
