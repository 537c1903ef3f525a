"""Evaluation (evaluate.py): the multiple-choice scorer picks the likely choice and both normalisations mean what they
say, batched scores and greedy answers equal one item at a time, choice trees score as one row per choice would, cached
greedy decoding gives the recomputing decoder's answers, and ROUGE-L on known pairs."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from d2lora_min.train.evaluate import choice_tree, greedy_generate, mc_accuracy, rouge_l_f1, score_choices
from d2lora_min.train.tasks import MCItem
from tiny_gpt import GPT, GPTConfig


class BigramModel(nn.Module):
    """A stand-in language model: the logits at a position depend only on the token there (a lookup table)."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)  # (vocab, vocab): row = current token, column = next token
        self.config = GPTConfig(vocab_size=table.shape[0], block_size=64)

    def forward(self, idx, targets=None, positions=None, attn_mask=None, cache=None):
        return self.table[idx], None  # (B, T, vocab): the token alone decides, so positions and masks change nothing


def one_token(tok, text):
    ids = tok.encode(text).ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_scorer_picks_the_likely_choice_and_normalisation_matters(tokenizer):
    tok = tokenizer
    go, yes, no, red, blue = (one_token(tok, t) for t in ("go", " yes", " no", " red", " blue"))
    V = tok.get_vocab_size()
    table = torch.full((V, V), -20.0)
    table[go, yes], table[go, no], table[go, red] = 2.0, 0.0, 1.5  # after "go": yes > red > no
    table[red, blue] = 5.0  # after "red": almost surely "blue"
    model = BigramModel(table)
    acc, preds, _ = mc_accuracy(model, tok, [MCItem("go", [" no", " yes"], 1)])
    assert acc == 1.0 and preds == [1]
    # " red blue" (two tokens, each likely) vs " yes" (one token): summed prefers " yes", per-token " red blue"
    summed, per_token, _ = score_choices(model, tok, [MCItem("go", [" yes", " red blue"], 0)])
    assert summed[0][0] > summed[0][1] and per_token[0][1] > per_token[0][0]
    assert mc_accuracy(model, tok, [MCItem("go", [" yes", " red blue"], 0)], normalise=True)[0] == 0.0


def test_batched_scores_equal_one_item_at_a_time(tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=32, n_layer=1, n_head=2, d_model=16)).eval()
    items = [MCItem("Q: go" + " red" * k + "\nA:", [" yes", " no", " red blue"], 0) for k in range(6)]
    batched, _, _ = score_choices(model, tokenizer, items)
    for item, row in zip(items, batched):
        alone, _, _ = score_choices(model, tokenizer, [item])
        assert np.allclose(alone[0], row, atol=1e-5)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=32, n_layer=1, n_head=2, d_model=16)).eval()
    prompts = ["go", "go red", "Q: go red blue\nA:", "stop"]
    batched, _ = greedy_generate(model, tokenizer, prompts, max_new_tokens=5, stop="\x00")
    for p, out in zip(prompts, batched):
        ids = torch.tensor([tokenizer.encode(p).ids])
        new = model.generate(ids, 5, greedy=True)[0, ids.shape[1] :].tolist()
        assert out == tokenizer.decode(new).strip()


@pytest.mark.parametrize(
    "candidate, reference, expected",
    [
        ("the red cup", "the red cup", 1.0),
        ("the cup", "the red cup", 0.8),  # LCS 2: P = 1, R = 2/3
        ("a b c d", "d c b a", 0.25),  # LCS 1
        ("The Red cup", "the red cup", 1.0),  # case-insensitive
        ("", "the red cup", 0.0),
        ("blue box", "the red cup", 0.0),
    ],
)
def test_rouge_l_on_known_pairs(candidate, reference, expected):
    assert rouge_l_f1(candidate, reference) == pytest.approx(expected)


# --- compute spent on tokens, not padding: the same scores and answers -------------------------------------------


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
