"""The data: the pretraining corpus (the embedded synthetic world, or the user's own text file), its byte-level BPE
tokenizer, batches of random windows for pretraining, and packed fine-tuning batches of the tasks' items.

    get_batch = finetune_batches(tokenizer, {task: items}, batch_size=32, seed=0, pad_id=eot, capacity=128)
    x, y, positions, attn_mask = get_batch(step)       # the model is called as model(x, y, positions, attn_mask)

Byte-level BPE (the `tokenizers` library) encodes any UTF-8 text (no unknown tokens) and merges the most frequent
pairs until the vocabulary is full, so the synthetic world's names and words mostly become single tokens.
"""

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tiny_gpt import packing

from .tasks import answer_text
from ..synthetic.world import World, corpus_documents

EOT = "<|endoftext|>"  # separates documents; also the padding token in evaluation batches


def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path):
    return Tokenizer.from_file(str(path))


MIN_TEXT_CHARS = 1000  # a user corpus shorter than this cannot train anything useful
SEED_STRIDE = 1_000_003  # a prime: seed * SEED_STRIDE + step (or epoch) never collides across seeds for < 1e6 steps
VOCAB_SIZE = 1280  # BPE vocabulary of the default base: large enough that every name of the world is one token


@dataclass
class CorpusConfig:
    world_seed: int = 0  # the synthetic world (people and their facts)
    n_people: int = 300
    n_docs: int = 400_000  # documents in the training corpus (~40 tokens each)
    n_val_docs: int = 4_000  # held-out documents for the validation loss
    seed: int = 1  # which documents are drawn
    vocab_size: int = VOCAB_SIZE  # BPE vocabulary
    text_file: Optional[str] = None  # pretrain on this UTF-8 text file instead of the synthetic world


def read_text_file(path, min_chars=MIN_TEXT_CHARS):
    """The user's corpus, checked before any training starts: it exists, is UTF-8 and is long enough."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"corpus file {path!r} is not a regular file (a folder or a device)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"corpus file {path!r} is not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 4]!r})"
        ) from None
    if len(text.strip()) < min_chars:
        raise ValueError(f"corpus file {path!r} has {len(text.strip())} characters; at least {min_chars} are needed")
    return text


def corpus_texts(cfg: CorpusConfig):
    """(training documents, validation documents) as lists of strings."""
    if cfg.text_file:
        text = read_text_file(cfg.text_file)
        docs = [d for d in text.split("\n\n") if d.strip()]  # paragraphs as documents
        n_val = max(1, len(docs) // 50)
        if len(docs) < 2:  # one long paragraph: hold out its last 2 %
            cut = int(len(text) * 0.98)
            return [text[:cut]], [text[cut:]]
        return docs[:-n_val], docs[-n_val:]
    world = World(seed=cfg.world_seed, n_people=cfg.n_people)
    train_docs = corpus_documents(world, cfg.n_docs, seed=cfg.seed)
    val_docs = corpus_documents(world, cfg.n_val_docs, seed=cfg.seed + 10_000)
    return train_docs, val_docs


def encode_documents(tokenizer, docs):
    """All documents as one token stream, each followed by the end-of-text token: (n_tokens,) uint16."""
    eot = tokenizer.token_to_id(EOT)
    ids = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16)


def build_corpus(cfg: CorpusConfig):
    """Train the tokenizer on the training documents, then encode both splits -> (tokenizer, train, val)."""
    train_docs, val_docs = corpus_texts(cfg)
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    return tokenizer, encode_documents(tokenizer, train_docs), encode_documents(tokenizer, val_docs)


def window_batches(tokens, block_size, batch_size, seed):
    """get_batch(step) -> (x, y): batch_size random windows of block_size tokens, y = x shifted by one.

    The windows depend only on (seed, step), so a resumed run draws the same batches.
    """
    data = torch.from_numpy(tokens.astype(np.int64))
    if len(data) <= block_size + 1:
        raise ValueError(f"the corpus has {len(data)} tokens: too short for one block of {block_size}")

    def get_batch(step):
        g = torch.Generator().manual_seed(seed * SEED_STRIDE + step)
        starts = torch.randint(0, len(data) - block_size - 1, (batch_size,), generator=g)
        x = torch.stack([data[s : s + block_size] for s in starts.tolist()])  # (B, T)
        y = torch.stack([data[s + 1 : s + 1 + block_size] for s in starts.tolist()])  # (B, T)
        return x, y

    return get_batch


def heldout_text(world, tokenizer, n_docs=300, seed=20_000, exclude_names=()):
    """Fresh synthetic documents (a seed no pretraining split uses), tokenized: the held-out pretraining-text
    loss before vs after fine-tuning measures what fine-tuning destroyed. Documents naming a person in
    exclude_names (facts that fine-tuning updates on purpose) are left out."""
    docs = [d for d in corpus_documents(world, n_docs, seed=seed) if not any(n in d for n in exclude_names)]
    return encode_documents(tokenizer, docs)


def pad_rows(rows, pad_id, length=None):
    """List of 1-D id lists -> (B, length or the longest) LongTensor, right-padded with pad_id."""
    t = length or max(len(r) for r in rows)
    out = torch.full((len(rows), t), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def pack(lengths, capacity):
    """First-fit decreasing: group sequences of the given lengths into rows of at most `capacity` positions (a
    sequence longer than that gets a row of its own) -> [[sequence indices, in the order they sit in the row]].
    Deterministic: longer first, ties by index."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = next((j for j, free in enumerate(room) if free >= lengths[i]), None)
        if j is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[j].append(i)
            room[j] -= lengths[i]
    return rows


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
            rows[k : k + 1] = [rows[k][: len(rows[k]) // 2], rows[k][len(rows[k]) // 2 :]]
        x = pad_rows([[t for j in row for t in inputs[j]] for row in rows], pad_id)  # (rows, T)
        y = pad_rows([[t for j in row for t in targets[j]] for row in rows], -1, x.shape[1])  # (rows, T)
        segments = torch.full(x.shape, -1, dtype=torch.long)  # (rows, T): which item each position holds
        for b, row in enumerate(rows):
            segments[b, : sum(len(inputs[j]) for j in row)] = torch.tensor(
                [k for k, j in enumerate(row) for _ in inputs[j]]
            )
        pads = segments < 0
        segments[pads] = -1 - torch.nonzero(pads)[:, 1]  # every pad position a segment of its own
        return (x, y, *packing(segments))

    return get_batch
