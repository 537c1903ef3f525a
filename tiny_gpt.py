"""A tiny GPT in one file: the model every method in d2lora_min is compared on.

A decoder-only transformer in the style of GPT-2 / nanoGPT: learned absolute position embeddings,
pre-LayerNorm blocks, causal self-attention, a GELU MLP and an output head tied to the token
embedding. Where it departs from nanoGPT: attention keeps separate `q_proj, k_proj, v_proj, o_proj`
linears and the MLP `fc_in, fc_out`, so that an adapter can target each projection by name (the LoRA
paper adapts q and v); and the forward pass takes the optional inputs below.

Three optional inputs let one row hold several sequences and let decoding skip recomputation (they change the
work done, and the result only by rounding):
  positions (B, T) and attn_mask (B, 1, T, T), True where a query position may attend to a key position: packed
      rows (several training items in one row, each attending only to itself, each starting at position 0) and
      multiple-choice scoring (a prompt encoded once, each choice seeing the prompt and itself); see packing().
  cache: a KVCache, which keeps every layer's keys and values, so that greedy decoding feeds only the new token.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 1024  # tokens in the vocabulary (the tokenizer sets it)
    block_size: int = 128  # longest sequence the position table covers
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads per block
    d_model: int = 128  # width of the residual stream
    dropout: float = 0.0  # on attention weights and residual branches (0 = off)
    bias: bool = True  # bias in the linears and LayerNorms


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.d_model % config.n_head == 0, "d_model must be divisible by n_head"
        d = config.d_model
        self.n_head = config.n_head
        self.q_proj = nn.Linear(d, d, bias=config.bias)
        self.k_proj = nn.Linear(d, d, bias=config.bias)
        self.v_proj = nn.Linear(d, d, bias=config.bias)
        self.o_proj = nn.Linear(d, d, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.shape  # batch, time, channels (= d_model)
        hs = C // self.n_head  # head size
        # project, then split the channels into heads: (B, T, C) -> (B, nh, T, hs)
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)
        if cache is not None:  # decoding: prepend the keys and values of the positions seen before
            if cache.k is not None and attn_mask is None:  # is_causal aligns to the top left: wrong with a past
                raise ValueError("decoding with a KVCache past the first call needs an attn_mask over the cached keys")
            k, v = cache.extend(k, v)  # (B, nh, T_past + T, hs)
        # softmax(q k^T / sqrt(hs)) v with a causal mask (or the given one), in one fused call
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_dropout(self.o_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.fc_out = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = F.gelu(self.fc_in(x))  # (B, T, 4C)
        return self.dropout(self.fc_out(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class LayerCache:
    """One attention layer's keys and values for the positions decoded so far: (B, nh, T_past, hs) each."""

    def __init__(self):
        self.k = self.v = None

    def extend(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache(list):
    """A LayerCache per block: pass the same KVCache to every forward call of one decoding."""

    def __init__(self, n_layer):
        super().__init__(LayerCache() for _ in range(n_layer))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.d_model)  # position embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf, 2017)

        # GPT-2 initialisation: N(0, 0.02) everywhere, and the projections that write into the
        # residual stream scaled down by 1/sqrt(2 * n_layer) so the stream's variance stays put.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("fc_out.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, positions=None, attn_mask=None, cache=None):
        """idx: (B, T) token ids. targets: (B, T) ids, -1 where no loss is wanted. positions: (B, T) position ids
        (default 0..T-1 in every row). attn_mask: (B, 1, T, T_keys) bool, True where a query may attend to a key
        (default: causal). cache: a KVCache to read earlier keys and values from and append these to.

        Returns (logits (B, T, vocab), loss or None): mean cross-entropy over the target positions.
        """
        B, T = idx.shape
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
            positions = torch.arange(T, device=idx.device)  # (T,), the same in every row
        elif positions.numel() and int(positions.max()) >= self.config.block_size:
            raise ValueError(f"position {int(positions.max())} is beyond block_size {self.config.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if cache is None else cache[i])  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self):
        """Parameters of the model, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, greedy=False):
        """Extend idx (B, T) by max_new_tokens tokens, one at a time; returns (B, T + max_new_tokens).

        greedy=True takes the most likely token; otherwise it samples from softmax(logits / temperature),
        optionally restricted to the top_k most likely tokens.
        """
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]  # crop to the position table: (B, <=block)
            logits, _ = self(context)
            logits = logits[:, -1, :].float()  # the last position's prediction: (B, vocab)
            if greedy:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
        return idx


def packing(segments):
    """Packed rows: segments (B, T) int, one id per sequence in a row (pad positions get ids of their own) ->
    (positions (B, T), attn_mask (B, 1, T, T)): every sequence starts at position 0 and attends only to itself,
    causally, so a row of packed sequences computes exactly what the sequences would compute one per row."""
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]  # (B, T): where a sequence begins
    first = torch.cummax(torch.where(starts, index, 0), dim=1).values  # (B, T): the index its sequence began at
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T): query and key in one sequence
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    return index - first, (same & causal)[:, None]  # (B, T), (B, 1, T, T)
