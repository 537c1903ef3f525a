"""The tiny GPT itself (tiny_gpt.py): shapes, the loss and the tied head, causality, the position table, greedy
generation, and packed rows with their own positions and a block-causal mask."""

import pytest
import torch

from tiny_gpt import GPT, GPTConfig, packing

from .helpers import SMALL, small_gpt


def tokens(seed=0, batch=3, length=12, vocab=SMALL.vocab_size):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def test_gpt_shapes_loss_and_tied_head():
    model = small_gpt()
    idx = tokens()
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 12, SMALL.vocab_size)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.lm_head.weight is model.wte.weight
    targets = idx.clone()
    targets[:, :6] = -1  # ignored positions do not count
    _, loss_half = model(idx, targets)
    assert not torch.isclose(loss, loss_half)


def test_gpt_is_causal():
    model = small_gpt()
    idx = tokens()
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.equal(a[:, 7:], b[:, 7:])


def test_gpt_rejects_sequences_longer_than_block_size():
    with pytest.raises(ValueError, match="block_size"):
        small_gpt()(tokens(length=SMALL.block_size + 1))


def test_generate_greedy_is_argmax_of_forward():
    model = small_gpt()
    idx = tokens(length=4)
    out = model.generate(idx, 5, greedy=True)
    assert out.shape == (3, 9) and torch.equal(out[:, :4], idx)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(out[:, 4:], logits[:, 3:].argmax(-1))


def test_packing_gives_each_sequence_its_own_positions_and_a_block_causal_mask():
    segments = torch.tensor([[0, 0, 0, 1, 1, -6]])  # two sequences and a pad
    positions, mask = packing(segments)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # fmt: skip
    assert torch.equal(mask[0, 0], expected)


def test_positions_past_the_table_are_refused():
    model = GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, d_model=4))
    with pytest.raises(ValueError, match="beyond block_size"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.tensor([[3, 4]]))
