"""Pretraining data: the corpus (embedded synthetic world or the user's own text file), its tokenizer,
and batches of random windows.
"""

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .tokenizer import EOT, train_tokenizer
from .world import World, corpus_documents

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
        raise ValueError(f"corpus file {path!r} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None
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
