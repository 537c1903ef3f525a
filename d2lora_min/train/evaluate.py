"""Evaluation: multiple-choice accuracy by log-likelihood, greedy generation scored by ROUGE-L and exact
match, the validation loss, and the throughput of each.

Batches are right-padded. With causal attention a token never sees the padding after it, so padding
changes no score; it only costs the compute of the padded positions.
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tokenizer import EOT


@dataclass
class MCItem:
    prompt: str
    choices: list  # the answer strings, each starting with a space: [" Mira", " Kalo", ...]
    answer: int  # index of the right choice
    cluster: str = ""  # items sharing an entity (a person, a script) share it; "" = independent (see report.py)


@dataclass
class GenItem:
    prompt: str
    reference: str  # the expected answer, without the final newline
    cluster: str = ""


def pad_rows(rows, pad_id, length=None):
    """List of 1-D id lists -> (B, length or the longest) LongTensor, right-padded with pad_id."""
    t = length or max(len(r) for r in rows)
    out = torch.full((len(rows), t), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def score_choices(model, tokenizer, items, batch_tokens=16384):
    """Log-likelihood of each choice given its prompt -> (summed, per_token, n_tokens_processed).

    summed[i][j] = sum of log p(choice token | prompt, earlier choice tokens); per_token divides it by the
    choice's length (the length-normalised scorer). When every choice of an item is a single token, one
    forward pass of the prompt scores them all; otherwise each choice gets its own row.
    """
    pad = tokenizer.token_to_id(EOT)
    # rows: (input ids, [(item, choice, first target position, target ids)])
    rows = []
    for i, item in enumerate(items):
        p = tokenizer.encode(item.prompt).ids
        cs = [tokenizer.encode(c).ids for c in item.choices]
        if all(len(c) == 1 for c in cs):
            rows.append((p, [(i, j, len(p) - 1, c) for j, c in enumerate(cs)]))
        else:
            rows.extend((p + c[:-1], [(i, j, len(p) - 1, c)]) for j, c in enumerate(cs))
    rows.sort(key=lambda r: len(r[0]))  # similar lengths together: less padding

    summed = [[0.0] * len(item.choices) for item in items]
    per_token = [[0.0] * len(item.choices) for item in items]
    n_tokens, start = 0, 0
    device = _device(model)
    while start < len(rows):
        end = start + 1  # grow the batch while (rows x longest row) stays within batch_tokens
        while end < len(rows) and (end + 1 - start) * len(rows[end][0]) <= batch_tokens:
            end += 1
        batch = rows[start:end]
        x = pad_rows([r[0] for r in batch], pad).to(device)  # (B, T)
        logits, _ = model(x)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, vocab)
        n_tokens += x.numel()
        for b, (_, targets) in enumerate(batch):
            for i, j, pos, ids in targets:
                positions = torch.arange(pos, pos + len(ids), device=device)
                lp = logp[b, positions, torch.tensor(ids, device=device)].sum().item()
                summed[i][j], per_token[i][j] = lp, lp / len(ids)
        start = end
    return summed, per_token, n_tokens


def mc_accuracy(model, tokenizer, items, normalise=False):
    """Fraction of items whose right choice has the highest (summed or length-normalised) log-likelihood.

    Returns (accuracy, predictions, tokens/s).
    """
    t0 = time.perf_counter()
    summed, per_token, n_tokens = score_choices(model, tokenizer, items)
    seconds = time.perf_counter() - t0
    scores = per_token if normalise else summed
    preds = [max(range(len(s)), key=s.__getitem__) for s in scores]
    acc = sum(p == item.answer for p, item in zip(preds, items)) / len(items)
    return acc, preds, n_tokens / seconds


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts, max_new_tokens=12, stop="\n", batch_size=256):
    """Greedy continuations of each prompt, cut at the first `stop` -> (texts, n_tokens_processed).

    Rows are right-padded; each row writes its next token just after its own last token, so prompts
    of different lengths share a batch without a padding mask (causal attention ignores what follows).
    """
    pad = tokenizer.token_to_id(EOT)
    stop_ids = tokenizer.encode(stop).ids
    stop_id = stop_ids[0] if len(stop_ids) == 1 else None  # a one-token stop lets a batch finish early
    device = _device(model)
    block = model.config.block_size
    texts, n_tokens = [None] * len(prompts), 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids = [tokenizer.encode(prompts[i]).ids for i in idx]
        lengths = torch.tensor([len(r) for r in ids], device=device)  # (B,)
        if lengths.max() + max_new_tokens > block:
            raise ValueError(f"prompt of {lengths.max().item()} tokens + {max_new_tokens} new ones exceed block_size {block}")
        x = pad_rows(ids, pad, int(lengths.max()) + max_new_tokens).to(device)  # room for the new tokens
        rows = torch.arange(len(ids), device=device)
        done = torch.zeros(len(ids), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits, _ = model(x[:, : int(lengths.max())])  # (B, T, vocab)
            n_tokens += len(ids) * int(lengths.max())
            next_id = logits[rows, lengths - 1].argmax(dim=-1)  # each row's prediction after its last token: (B,)
            x[rows, lengths] = next_id
            lengths = lengths + 1
            if stop_id is not None:
                done |= next_id == stop_id
                if done.all():  # every row has finished its answer
                    break
        for b, i in enumerate(idx):
            new = x[b, len(ids[b]) : len(ids[b]) + max_new_tokens].tolist()
            texts[i] = tokenizer.decode(new).split(stop)[0].strip()
    return texts, n_tokens


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


def generation_scores(model, tokenizer, items, max_new_tokens=12):
    """Mean ROUGE-L F1 and exact-match rate of greedy answers -> (rouge_l, exact, outputs, tokens/s)."""
    t0 = time.perf_counter()
    outputs, n_tokens = greedy_generate(model, tokenizer, [it.prompt for it in items], max_new_tokens)
    seconds = time.perf_counter() - t0
    rouge = sum(rouge_l_f1(o, it.reference) for o, it in zip(outputs, items)) / len(items)
    exact = sum(o.strip() == it.reference.strip() for o, it in zip(outputs, items)) / len(items)
    return rouge, exact, outputs, n_tokens / seconds


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
