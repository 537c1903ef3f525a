"""The data (data.py): a tokenizer, fine-tuning batches that put the loss on the answer only and visit every item once
per epoch, packed rows that give the padded step's loss and gradients with little padding, pretraining windows, and a
user's corpus file checked before any training."""

import copy

import numpy as np
import pytest
import torch

from d2lora_min.nn import inject_adapters
from d2lora_min.train.data import EOT, finetune_batches, pack, read_text_file, steps_for, window_batches
from d2lora_min.train.pretrain import load_base
from d2lora_min.train.tasks import GenItem, MCItem, answer_text


def test_finetune_batches_put_the_loss_on_the_answer_only(tokenizer):
    items = [MCItem("Q: go\nA:", [" yes", " no"], 1), GenItem("Q: red\nA:", "blue green")]
    get_batch = finetune_batches(
        tokenizer, {"a": items[:1], "b": items[1:]}, batch_size=6, seed=0, pad_id=tokenizer.token_to_id(EOT)
    )
    x, y = get_batch(0)
    assert torch.equal(get_batch(0)[0], x) and x.shape == y.shape and len(x) == 2  # one epoch: both items, once
    texts = sorted(tokenizer.decode([t for t in y[b].tolist() if t != -1]) for b in range(len(x)))
    assert texts == sorted([answer_text(items[0]), answer_text(items[1])])


def test_the_epoch_budget_gives_the_steps_it_claims_and_visits_every_item_once_per_epoch(tokenizer):
    items = [MCItem(f"Q: go{i}\nA:", [" yes", " no"], i % 2) for i in range(10)]
    get_batch = finetune_batches(
        tokenizer, {"a": items[:7], "b": items[7:]}, batch_size=4, seed=3, pad_id=tokenizer.token_to_id(EOT)
    )
    assert steps_for(10, epochs=2, batch_size=4) == 6  # ceil(10 / 4) = 3 batches per epoch
    for epoch in range(2):
        seen = []
        for step in range(3 * epoch, 3 * epoch + 3):
            x, y = get_batch(step)
            seen += [
                tokenizer.decode(x[b][x[b] != tokenizer.token_to_id(EOT)].tolist()).split("\n")[0]
                for b in range(len(x))
            ]
        assert sorted(seen) == sorted(f"Q: go{i}" for i in range(10))  # each item exactly once per epoch
    assert torch.equal(get_batch(4)[0], get_batch(4)[0])  # a pure function of the step


def test_pack_fills_rows_first_fit_decreasing_and_keeps_every_item_once():
    rows = pack([5, 3, 8, 2, 2, 7], capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert rows == [[2, 3], [5, 1], [0, 4]]  # 8+2, 7+3, 5+2: longest first, each into the first row it fits
    assert pack([12, 1], capacity=10) == [[0], [1]]  # too long for any row: a row of its own


@pytest.mark.parametrize("method", ["lora", "d2lora"])
def test_a_packed_step_has_the_padded_steps_loss_and_gradients(trained, method):
    _, tokenizer, splits = trained
    base, _, _ = load_base()
    model = inject_adapters(copy.deepcopy(base), method, r=2, alpha=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # non-zero B: the adapters take part
    train_sets, pad = {k: parts.train for k, parts in splits.items()}, tokenizer.token_to_id(EOT)
    padded = finetune_batches(tokenizer, train_sets, 24, 3, pad)(1)
    packed = finetune_batches(tokenizer, train_sets, 24, 3, pad, capacity=128)(1)
    assert packed[0].shape[0] < padded[0].shape[0]  # several items per row
    assert int((packed[1] != -1).sum()) == int((padded[1] != -1).sum())  # the same answer tokens
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for batch in (padded, packed):
        _, loss = model(*batch)
        results.append((loss, torch.autograd.grad(loss, params)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a.item() - loss_b.item()) <= 1e-5 * abs(loss_a.item())
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert (ga - gb).abs().max() <= 1e-4 * max(1.0, ga.abs().max().item())


def test_packed_batches_compute_little_padding(trained):
    _, tokenizer, splits = trained
    pad = tokenizer.token_to_id(EOT)
    get_batch = finetune_batches(tokenizer, {k: parts.train for k, parts in splits.items()}, 32, 0, pad, capacity=128)
    x = torch.cat([get_batch(s)[0].flatten() for s in range(2)])
    assert (x == pad).float().mean() <= 0.10


def test_window_batches_shift_by_one_and_refuse_a_tiny_corpus():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = window_batches(tokens, block_size=8, batch_size=4, seed=0)(3)
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="too short for one block"):
        window_batches(np.arange(5, dtype=np.uint16), block_size=8, batch_size=4, seed=0)


@pytest.mark.parametrize(
    "content, error, match",
    [
        (None, FileNotFoundError, "does not exist"),
        (b"", ValueError, "at least"),
        (b"\xff\xfe\x00bad", ValueError, "not UTF-8"),
        (b"too short", ValueError, "at least 1000"),
        ("folder", ValueError, "not a regular file"),
    ],
)
def test_bad_user_corpus_is_refused_before_training(tmp_path, content, error, match):
    path = tmp_path / "corpus.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=match):
        read_text_file(str(path))
