"""Fine-tuning batches: a task's items become (prompt, answer) token sequences whose loss is on the answer only,
drawn epoch by epoch in a seeded order and packed into rows without compute on padding.

    get_batch = finetune_batches(tokenizer, {task: items}, batch_size=32, seed=0, pad_id=eot, capacity=128)
    x, y, positions, attn_mask = get_batch(step)       # the model is called as model(x, y, positions, attn_mask)
"""

import math

import torch

from tiny_gpt import packing

from .data import SEED_STRIDE
from .evaluate import pack, pad_rows
from .tasks import answer_text


def encode_examples(tokenizer, items):
    """[(prompt ids, answer ids)]: the answer is what the fine-tuning loss is computed on."""
    return [(tokenizer.encode(it.prompt).ids, tokenizer.encode(answer_text(it)).ids) for it in items]


def steps_for(n_items, epochs, batch_size):
    """Optimiser steps of a budget of `epochs` passes over `n_items` training items: every epoch is
    ceil(n_items / batch_size) batches (the last one may be smaller)."""
    return epochs * math.ceil(n_items / batch_size)


def finetune_batches(tokenizer, train_sets, batch_size, seed, pad_id, capacity=None, n_shards=1):
    """get_batch(step) -> (x, y) or, packed, (x, y, positions, attn_mask): epochs over every training item of every
    task, each epoch in a new seeded order; y is -1 everywhere but on the answer tokens. The batch depends only on
    (seed, step), so a resumed run sees the batches an uninterrupted one would have seen. train_sets: {task: items}.

    capacity=None: one item per row, right-padded to the longest (what a reader expects, and the reference the
    packed form is tested against). capacity=C: the same items of the step packed into rows of at most C positions
    (first-fit decreasing), each item attending only to itself from position 0 (tiny_gpt.packing), so the step's
    loss and gradient are the padded step's, up to float rounding, with little compute spent on padding. At least
    n_shards rows (one per data-parallel process) when the step has that many items."""
    pool = [ex for items in train_sets.values() for ex in encode_examples(tokenizer, items)]
    per_epoch = math.ceil(len(pool) / batch_size)

    def get_batch(step):
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed * SEED_STRIDE + epoch))
        picks = [pool[j] for j in order[i * batch_size : (i + 1) * batch_size].tolist()]
        inputs = [(p + a)[:-1] for p, a in picks]  # position t predicts token t + 1
        targets = [[-1] * (len(p) - 1) + a for p, a in picks]  # the loss is on the answer tokens only
        if capacity is None:
            x = pad_rows(inputs, pad_id)  # (B, T), right-padded
            return x, pad_rows(targets, -1, x.shape[1])  # (B, T), -1 = no loss
        rows = pack([len(s) for s in inputs], capacity)
        while len(rows) < min(n_shards, len(picks)):  # one row per process at least: split the fullest row
            k = max(range(len(rows)), key=lambda k: len(rows[k]))
            rows[k:k + 1] = [rows[k][: len(rows[k]) // 2], rows[k][len(rows[k]) // 2 :]]
        x = pad_rows([[t for j in row for t in inputs[j]] for row in rows], pad_id)  # (rows, T)
        y = pad_rows([[t for j in row for t in targets[j]] for row in rows], -1, x.shape[1])  # (rows, T)
        segments = torch.full(x.shape, -1, dtype=torch.long)  # (rows, T): which item each position holds
        for b, row in enumerate(rows):
            segments[b, : sum(len(inputs[j]) for j in row)] = torch.tensor([k for k, j in enumerate(row) for _ in inputs[j]])
        pads = segments < 0
        segments[pads] = -1 - torch.nonzero(pads)[:, 1]  # every pad position a segment of its own
        return (x, y, *packing(segments))

    return get_batch
