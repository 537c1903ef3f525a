"""Compute spent on tokens, not padding: packed fine-tuning rows give the padded step's loss and gradients, choice
trees give the one-row-per-choice scores, and cached greedy decoding gives the recomputing decoder's answers."""

import copy

import pytest
import torch
import torch.nn.functional as F

from d2lora_min.nn import inject_adapters
from d2lora_min.train.evaluate import choice_tree, greedy_generate, pack, score_choices
from d2lora_min.train.pretrain import load_base
from d2lora_min.train.batches import finetune_batches
from d2lora_min.train.tasks import build_splits
from d2lora_min.train.tokenizer import EOT
from d2lora_min.train.trainer import TrainConfig, train
from d2lora_min.train.world import World
from tiny_gpt import GPT, GPTConfig, packing


@pytest.fixture(scope="module")
def trained():
    """The shipped base with a D2-LoRA adapter trained for a few packed steps (non-zero B: the adapter matters),
    and the tasks' splits."""
    base, tokenizer, _ = load_base()
    world = World()
    splits = build_splits(world, ("yesno", "continuation", "compare", "span"), n_train=16, n_test=40, seed=0)
    model = inject_adapters(copy.deepcopy(base), "d2lora", r=2, alpha=4)
    batches = finetune_batches(tokenizer, {k: parts.train for k, parts in splits.items()}, 16, 0, tokenizer.token_to_id(EOT), capacity=128)
    train(model, batches, TrainConfig(steps=6, lr=1e-2, warmup_steps=1, progress=False))
    return model.eval(), tokenizer, splits


def test_pack_fills_rows_first_fit_decreasing_and_keeps_every_item_once():
    rows = pack([5, 3, 8, 2, 2, 7], capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert rows == [[2, 3], [5, 1], [0, 4]]  # 8+2, 7+3, 5+2: longest first, each into the first row it fits
    assert pack([12, 1], capacity=10) == [[0], [1]]  # too long for any row: a row of its own


def test_packing_gives_each_sequence_its_own_positions_and_a_block_causal_mask():
    segments = torch.tensor([[0, 0, 0, 1, 1, -6]])  # two sequences and a pad
    positions, mask = packing(segments)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # fmt: skip
    assert torch.equal(mask[0, 0], expected)


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


def one_row_per_choice(model, tokenizer, items):
    """The oracle: each choice scored in a row of its own, prompt + choice, one item at a time, no padding."""
    summed = []
    for item in items:
        prompt = tokenizer.encode(item.prompt).ids
        scores = []
        for choice in (tokenizer.encode(c).ids for c in item.choices):
            x = torch.tensor([prompt + choice[:-1]])
            with torch.no_grad():
                logp = F.log_softmax(model(x)[0][0].float(), dim=-1)  # (T, vocab)
            scores.append(sum(logp[len(prompt) - 1 + t, token].item() for t, token in enumerate(choice)))
        summed.append(scores)
    return summed


def test_choice_trees_score_every_item_as_one_row_per_choice_would(trained):
    model, tokenizer, splits = trained
    for task in ("yesno", "continuation", "compare"):  # single-token and multi-token choices
        items = splits[task].test
        summed, per_token, counts = score_choices(model, tokenizer, items)
        expected = one_row_per_choice(model, tokenizer, items)
        for got, want, item in zip(summed, expected, items, strict=True):
            assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4, task
            assert max(range(len(got)), key=got.__getitem__) == max(range(len(want)), key=want.__getitem__), task
        assert counts["padding"] <= 0.10 * counts["positions"], task
        lengths = [len(tokenizer.encode(c).ids) for c in items[0].choices]
        assert per_token[0] == pytest.approx([s / n for s, n in zip(summed[0], lengths)])


def test_a_choice_tree_holds_the_prompt_once():
    ids, positions, branches, targets = choice_tree([7, 8, 9], [[1, 2, 3], [4]])
    assert ids == [7, 8, 9, 1, 2] and positions == [0, 1, 2, 3, 4] and branches == [0, 0, 0, 1, 1]
    assert targets == [[(2, 1), (3, 2), (4, 3)], [(2, 4)]]  # choice 2's only token is predicted after the prompt


def test_cached_greedy_decoding_gives_the_recomputing_decoders_answers(trained):
    model, tokenizer, splits = trained
    prompts = [it.prompt for it in splits["span"].test]
    answers, counts = greedy_generate(model, tokenizer, prompts, max_new_tokens=8)
    for prompt, answer in zip(prompts, answers, strict=True):
        x = torch.tensor([tokenizer.encode(prompt).ids])
        out = model.generate(x, 8, greedy=True)  # one prompt at a time, the whole prefix recomputed each step
        assert answer == tokenizer.decode(out[0, x.shape[1] :].tolist()).split("\n")[0].strip()
    assert counts["padding"] <= 0.10 * counts["positions"]


def test_positions_past_the_table_are_refused():
    model = GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, d_model=4))
    with pytest.raises(ValueError, match="beyond block_size"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.tensor([[3, 4]]))
