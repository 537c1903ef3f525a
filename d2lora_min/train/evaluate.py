"""Evaluation: multiple-choice accuracy by log-likelihood, greedy generation scored by ROUGE-L and exact
match, the validation loss, and the throughput of each.

Compute goes to tokens, not padding: a multiple-choice prompt is encoded once for all its choices (a choice tree,
packed with other items into rows, tiny_gpt's attention mask keeping them apart), and greedy decoding encodes the
prompt once and then feeds one new token per step (tiny_gpt.KVCache). Both count the positions they compute and
how many of them are padding.
"""

import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tiny_gpt import KVCache

import numpy as np

from .data import EOT, pack, pad_rows
from .tasks import scored_field


def batches_by_length(things, lengths, batch_size, slack=0.9):
    """Batches of things of similar length, longest first: a batch holds at most batch_size, and none of them shorter
    than `slack` times its longest, so padding each to the longest wastes at most a tenth of the positions."""
    batches = []
    for i in sorted(range(len(things)), key=lambda i: -lengths[i]):
        if batches and len(batches[-1]) < batch_size and lengths[i] >= slack * lengths[batches[-1][0]]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return [[things[i] for i in batch] for batch in batches]


def _device(model):
    return next(model.parameters()).device


def choice_tree(prompt, choices):
    """One multiple-choice item as one sequence: the prompt once, then every choice but its last token, each choice
    a branch that sees the prompt and itself -> (ids, positions, branches, targets). positions restart after the
    prompt for every branch (each choice sits where it would sit after the prompt alone); branch 0 is the prompt;
    targets[j] = [(index in the sequence whose prediction scores it, token)] for the tokens of choice j."""
    ids, positions, branches = list(prompt), list(range(len(prompt))), [0] * len(prompt)
    targets = []
    for j, choice in enumerate(choices):
        start = len(ids)
        ids += choice[:-1]
        positions += range(len(prompt), len(prompt) + len(choice) - 1)
        branches += [j + 1] * (len(choice) - 1)
        # the first token is predicted after the prompt's last one, each next one after its own predecessor
        targets.append([(len(prompt) - 1 if t == 0 else start + t - 1, token) for t, token in enumerate(choice)])
    return ids, positions, branches, targets


class Scored(NamedTuple):
    """One scored token of a packed batch: where its prediction is (row, index), which token, of which item and choice."""

    row: int
    index: int
    token: int
    item: int
    choice: int


def tree_mask(items, branches):
    """(B, 1, T, T) bool attention mask of packed choice trees: a position attends to earlier positions of its own
    item that are the prompt (branch 0) or its own branch. items, branches: (B, T) ids (a pad is an item alone)."""
    T = items.shape[1]
    same_item = items[:, :, None] == items[:, None, :]  # (B, T, T)
    visible = (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])  # prompt, or own branch
    causal = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()  # (T, T)
    return (same_item & visible & causal)[:, None]  # (B, 1, T, T)


@torch.no_grad()
def score_choices(model, tokenizer, items, batch_rows=64):
    """Log-likelihood of each choice given its prompt -> (summed, per_token, counts).

    summed[i][j] = sum of log p(choice token | prompt, earlier choice tokens); per_token divides it by the
    choice's length (the length-normalised scorer). Each item is encoded once: its prompt and all its choices in
    one choice tree (choice_tree), trees packed into rows of up to 2 x block_size positions, batch_rows rows per forward
    pass. counts = {"positions": positions computed, "padding": how many of them are padding}.
    """
    pad = tokenizer.token_to_id(EOT)
    capacity = (
        2 * model.config.block_size
    )  # rows may be longer than the position table: each tree has its own positions
    trees = [
        choice_tree(tokenizer.encode(it.prompt).ids, [tokenizer.encode(c).ids for c in it.choices]) for it in items
    ]
    rows = pack([len(t[0]) for t in trees], capacity)
    summed = [[0.0] * len(item.choices) for item in items]
    per_token = [[0.0] * len(item.choices) for item in items]
    counts = {"positions": 0, "padding": 0}
    device = _device(model)
    for batch in batches_by_length(rows, [sum(len(trees[i][0]) for i in row) for row in rows], batch_rows):
        T = max(sum(len(trees[i][0]) for i in row) for row in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)  # (B, T)
        positions = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
        owner = -1 - torch.arange(T).repeat(len(batch), 1)  # (B, T): the item at each position (a pad: its own)
        branch = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
        where = []  # a Scored(row, index, token, item, choice) for every scored token
        for b, row in enumerate(batch):
            offset = 0
            for i in row:
                tree_ids, tree_pos, tree_branch, targets = trees[i]
                n = len(tree_ids)
                ids[b, offset : offset + n] = torch.tensor(tree_ids)
                positions[b, offset : offset + n] = torch.tensor(tree_pos)
                branch[b, offset : offset + n] = torch.tensor(tree_branch)
                owner[b, offset : offset + n] = i
                where += [Scored(b, offset + k, token, i, j) for j, pairs in enumerate(targets) for k, token in pairs]
                offset += n
        counts["positions"] += ids.numel()
        counts["padding"] += int((owner < 0).sum())
        mask = tree_mask(owner, branch)
        logits, _ = model(ids.to(device), positions=positions.to(device), attn_mask=mask.to(device))  # (B, T, vocab)
        rows, index, token = (
            torch.tensor([getattr(w, f) for w in where], device=device) for f in ("row", "index", "token")
        )
        logp = F.log_softmax(logits[rows, index].float(), dim=-1)  # at the scored positions only: (n_scored, vocab)
        picked = logp.gather(1, token[:, None])[:, 0].tolist()  # log p of each scored token
        for w, lp in zip(where, picked):
            summed[w.item][w.choice] += lp
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            per_token[i][j] = summed[i][j] / len(trees[i][3][j])
    return summed, per_token, counts


def mc_accuracy(model, tokenizer, items, normalise=False):
    """Fraction of items whose right choice has the highest (summed or length-normalised) log-likelihood.

    Returns (accuracy, predictions, tokens/s).
    """
    t0 = time.perf_counter()
    summed, per_token, counts = score_choices(model, tokenizer, items)
    seconds = time.perf_counter() - t0
    scores = per_token if normalise else summed
    preds = [max(range(len(s)), key=s.__getitem__) for s in scores]
    acc = sum(p == item.answer for p, item in zip(preds, items)) / len(items)
    return acc, preds, counts["positions"] / seconds


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts, max_new_tokens=12, stop="\n", batch_size=256):
    """Greedy continuations of each prompt, cut at the first `stop` -> (texts, counts).

    Prompts of similar length share a batch (at most batch_size, none a tenth shorter than the longest), left-padded
    so that every row's next token goes in the same column;
    each row's positions start at 0 at its first real token and no position attends to a pad. The prompt is
    encoded once; then each step feeds only the new token and reads the earlier keys and values from a KVCache.
    counts = {"positions": positions computed, "padding": how many of them are padding}.
    """
    stop_ids = tokenizer.encode(stop).ids
    stop_id = stop_ids[0] if len(stop_ids) == 1 else None  # a one-token stop lets a batch finish early
    pad = tokenizer.token_to_id(EOT)
    device = _device(model)
    block = model.config.block_size
    texts, counts = [None] * len(prompts), {"positions": 0, "padding": 0}
    encoded = [tokenizer.encode(p).ids for p in prompts]
    for idx in batches_by_length(list(range(len(prompts))), [len(e) for e in encoded], batch_size):
        ids = [encoded[i] for i in idx]
        lengths = torch.tensor([len(r) for r in ids], device=device)  # (B,)
        L = int(lengths.max())
        if L + max_new_tokens > block:
            raise ValueError(f"prompt of {L} tokens + {max_new_tokens} new ones exceed block_size {block}")
        x = torch.full((len(ids), L), pad, dtype=torch.long)  # (B, L), left-padded
        for b, r in enumerate(ids):
            x[b, L - len(r) :] = torch.tensor(r)
        x = x.to(device)
        column = torch.arange(L, device=device)  # (L,)
        first = (L - lengths)[:, None]  # (B, 1): the column of each row's first real token
        real = column[None, :] >= first  # (B, L): which keys are real tokens
        positions = (column[None, :] - first).clamp_min(0)  # (B, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()  # (L, L)
        mask = (causal & real[:, None, :]) | torch.eye(
            L, dtype=torch.bool, device=device
        )  # (B, L, L); a pad sees itself
        cache = KVCache(model.config.n_layer)
        logits, _ = model(x, positions=positions, attn_mask=mask[:, None], cache=cache)  # (B, L, vocab)
        counts["positions"] += x.numel()
        counts["padding"] += int((~real).sum())
        new = torch.zeros((len(ids), max_new_tokens), dtype=torch.long, device=device)  # (B, max_new_tokens)
        done = torch.zeros(len(ids), dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            new[:, t] = logits[:, -1].argmax(dim=-1)  # each row's prediction after its last token: (B,)
            if stop_id is not None:
                done |= new[:, t] == stop_id
            if t == max_new_tokens - 1 or (stop_id is not None and done.all()):  # every row has finished its answer
                break
            real = torch.cat([real, torch.ones(len(ids), 1, dtype=torch.bool, device=device)], dim=1)  # (B, L + t + 1)
            logits, _ = model(
                new[:, t : t + 1], positions=(lengths + t)[:, None], attn_mask=real[:, None, None, :], cache=cache
            )
            counts["positions"] += len(ids)
        for b, i in enumerate(idx):
            texts[i] = tokenizer.decode(new[b].tolist()).split(stop)[0].strip()
    return texts, counts


def rouge_l_f1(candidate, reference):
    """ROUGE-L F1 over lower-cased whitespace words: 2PR / (P + R) with P, R from the longest common subsequence."""
    c, r = candidate.lower().split(), reference.lower().split()
    if not c or not r:
        return float(c == r)
    # lcs[i][j] = LCS length of c[:i] and r[:j]
    lcs = [[0] * (len(r) + 1) for _ in range(len(c) + 1)]
    for i in range(1, len(c) + 1):
        for j in range(1, len(r) + 1):
            lcs[i][j] = lcs[i - 1][j - 1] + 1 if c[i - 1] == r[j - 1] else max(lcs[i - 1][j], lcs[i][j - 1])
    n = lcs[-1][-1]
    if n == 0:
        return 0.0
    precision, recall = n / len(c), n / len(r)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def validation_loss(model, tokens, block_size, max_windows=256, batch_size=64):
    """Mean next-token loss (nats) over up to max_windows consecutive, non-overlapping windows of `tokens`."""
    data = torch.from_numpy(tokens.astype("int64"))
    n = min(max_windows, (len(data) - 1) // block_size)
    device = _device(model)
    total, count = 0.0, 0
    for s in range(0, n, batch_size):
        starts = range(s * block_size, min(n, s + batch_size) * block_size, block_size)
        x = torch.stack([data[i : i + block_size] for i in starts]).to(device)
        y = torch.stack([data[i + 1 : i + 1 + block_size] for i in starts]).to(device)
        _, loss = model(x, y)
        total += loss.item() * x.numel()
        count += x.numel()
    return total / count if count else math.nan


def evaluate_items(model, tokenizer, splits, tasks, counts=None, split="test"):
    """{task: per-item results} on the `split` items ("test" or "validation"): for multiple choice each choice's
    summed log-likelihood and whether the summed and the length-normalised scorer pick the right choice; for
    generative tasks the greedy answer, its ROUGE-L and exact match. counts, if given, accumulates the positions
    computed and how many were padding."""
    out = {}
    for name, parts in splits.items():
        test = getattr(parts, split)
        task = tasks[name]
        if task.kind == "mc":
            summed, per_token, used = score_choices(model, tokenizer, test)
            out[name] = {
                "correct_sum": [int(np.argmax(s) == it.answer) for s, it in zip(summed, test)],
                "correct_mean": [int(np.argmax(s) == it.answer) for s, it in zip(per_token, test)],
                "logp": [[round(v, 4) for v in s] for s in summed],
            }
        else:
            answers, used = greedy_generate(model, tokenizer, [it.prompt for it in test], task.max_new_tokens)
            out[name] = {
                "rouge": [rouge_l_f1(a, it.reference) for a, it in zip(answers, test)],
                "exact": [int(a.strip() == it.reference.strip()) for a, it in zip(answers, test)],
                "answer": answers,
            }
        for k in counts if counts is not None else ():
            counts[k] += used[k]
    return out


def task_scores(items, tasks, scoring):
    """{task: score} from evaluate_items' per-item results (accuracy, or ROUGE-L and `<task>_exact`)."""
    scores = {}
    for name, res in items.items():
        task = tasks[name]
        if task.kind == "mc":
            scores[name] = float(np.mean(res[scored_field(task, scoring)]))
        else:
            scores[name], scores[name + "_exact"] = float(np.mean(res["rouge"])), float(np.mean(res["exact"]))
    return scores


def retention(model, tokenizer, probe):
    """What fine-tuning kept of pretraining: held-out text loss (nats) and the facts probe in corpus wording (NaN where
    the probe has none: your own text has no facts probe, your own tasks without --heldout_text no text)."""
    tokens, items = probe
    window = 0 if tokens is None else min(model.config.block_size, len(tokens) - 1)  # a short text: one window of it
    loss = validation_loss(model, tokens, window) if window else math.nan
    return {"heldout_loss": loss, "facts_probe": mc_accuracy(model, tokenizer, items)[0] if items else math.nan}


LOGIT_PROBE_PER_TASK = 16  # test prompts per task on which unmerged and merged logits are compared


def logit_probe_batch(tokenizer, splits, n_per_task=LOGIT_PROBE_PER_TASK):
    """A fixed batch of test prompts on which unmerged and merged logits are compared."""
    ids = [tokenizer.encode(item.prompt).ids for parts in splits.values() for item in parts.test[:n_per_task]]
    return pad_rows(ids, tokenizer.token_to_id(EOT)), [len(r) for r in ids]


@torch.no_grad()
def real_logits(model, x, lengths):
    logits, _ = model(x.to(next(model.parameters()).device))
    return torch.cat([logits[b, :n] for b, n in enumerate(lengths)]).float().cpu()  # (sum of lengths, vocab)
