"""Your own model (`--model DIR`): a local Hugging Face causal LM as the base of a comparison, loaded with transformers'
Auto classes from a folder (config.json, safetensors weights, tokenizer.json), never downloaded, and wrapped so that
the harness calls it exactly as it calls tiny_gpt:

    model(x, y=None, positions=None, attn_mask=None, cache=None) -> (logits, loss)

x (B, T) token ids; y (B, T) the next tokens, -1 where no loss is wanted (the harness shifts them itself, as
tiny_gpt's trainer does); positions (B, T) position ids; attn_mask (B, 1, T, T_keys) bool, True where a query may
attend to a key (packed rows, choice trees, left-padded decoding); cache: a tiny_gpt.KVCache, to which the wrapper
attaches the transformers cache it decodes with. model.config has block_size (the longest sequence the harness
builds) and n_layer. Nothing is downloaded and nothing is unpickled (safetensors weights only).

transformers is imported inside the functions that need it (here and in export.py): the rest of the project runs
without it.
"""

import functools
import hashlib
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiny_gpt import KVCache, packing

from ..files.io import sha256_file
from ..train.cli import UsageError
from ..train.data import EOT, load_tokenizer

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# Default targets by config.model_type: the attention projections, as the paper adapts. GPT-2's c_attn (q, k and v in
# one Conv1D, converted to one nn.Linear) is adapted as one layer, as PEFT does: the per-row norms of DoRA and
# D2-LoRA are the same whether it is split or not (a norm is per output row); the low-rank factors are shared by q, k
# and v (one A (r, d), one B (3d, r)) instead of one pair each.
DEFAULT_TARGETS = {
    **{t: ATTENTION for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "gpt2": ("c_attn", "attn.c_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "gpt_neox": ("query_key_value", "attention.dense"),
}
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PROBE_TOL = 1e-4  # packed against separate logits, relative to their scale: float32 rounding is ~1e-6


def check_folder(folder):
    """The model folder exists and holds config.json, safetensors weights and tokenizer.json -> Path; a one-line
    UsageError otherwise (a Hub name is refused: nothing is downloaded)."""
    path = Path(folder)
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(folder)):
            raise UsageError(
                f"--model {folder}: no such folder here, and nothing is downloaded: it looks like a Hugging Face Hub "
                f"name; download it first (huggingface-cli download {folder} --local-dir DIR) and pass --model DIR"
            )
        raise UsageError(f"--model {folder}: no such folder")
    if not path.is_dir():
        raise UsageError(f"--model {folder}: not a folder (give the folder holding config.json)")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {folder}: no config.json in it")
    if not any((path / w).is_file() for w in WEIGHTS):
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (only {', '.join(bins)}: pickled weights are not loaded; convert them to safetensors)" if bins else ""
        raise UsageError(f"--model {folder}: no model.safetensors (or model.safetensors.index.json) in it{hint}")
    if not (path / "tokenizer.json").is_file():
        raise UsageError(f"--model {folder}: no tokenizer.json in it (the tokenizers library's file; "
                         f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes one)")  # fmt: skip
    return path


@functools.lru_cache(maxsize=8)
def read_config(folder):
    path = check_folder(folder)  # (every reader of the folder reads its config first: the checks come first)
    try:
        from transformers import AutoConfig
    except ImportError:
        raise UsageError("--model needs transformers: pip install -e '.[hf]' (make compare installs it)") from None
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:  # an unknown model_type, a broken config.json
        raise UsageError(
            f"--model {folder}: config.json is not a config transformers reads ({str(e).splitlines()[0][:200]})"
        ) from None


def default_targets(config, model):
    """The module-name suffixes adapted by default for this architecture; a UsageError listing the model's linear
    modules' names when it has no default."""
    if config.model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[config.model_type]
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    raise UsageError(f"no default targets for model type {config.model_type!r}: choose them with --targets=a,b (its "
                     f"nn.Linear modules' names end in: {', '.join(names)})")  # fmt: skip


def conv1d_to_linear(model):
    """Replace every transformers Conv1D (weight (in, out), x @ W + b) by the nn.Linear computing the same (weight
    (out, in)), in place -> the converted modules' names (export.linear_to_conv1d turns them back)."""
    from transformers.pytorch_utils import Conv1D

    names = [name for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        linear = nn.Linear(
            *conv.weight.shape, device=conv.weight.device, dtype=conv.weight.dtype
        )  # (in, out) -> Linear(in, out)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)  # (out, in)
            linear.bias.copy_(conv.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return names


QKV = ("q_proj", "k_proj", "v_proj")


def order_projections(model):
    """Register every attention's q_proj, k_proj, v_proj first, in that order (OPT registers k, v, q), in place.
    Adapters draw their random initialisation in module order, so one seed then initialises the same projection the
    same way on every architecture (tiny_gpt and Llama are already in this order); forward calls them by name."""
    for module in model.modules():
        if all(name in module._modules for name in QKV):
            rest = [(k, v) for k, v in module._modules.items() if k not in QKV]
            ordered = [(k, module._modules[k]) for k in QKV] + rest
            module._modules.clear()
            module._modules.update(ordered)


@functools.lru_cache(maxsize=8)
def skeleton(folder):
    """The model's modules with no weights (on the meta device), Conv1D converted: what targets are checked against
    before anything is loaded."""
    config = read_config(folder)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    conv1d_to_linear(model)
    return config, model


class HFTokenizer:
    """tokenizer.json as the harness uses a tokenizer. Pieces (a prompt, a choice, an answer) are encoded without the
    tokenizer's special tokens, because the harness concatenates them: a BOS would land between a prompt and its
    answer. EOT (the harness's padding token) maps to the tokenizer's own <|endoftext|>, else the model's pad, eos or
    bos id; padding is never attended to nor trained on, and it is what the padding counts count."""

    def __init__(self, tokenizer, pad_id):
        self.tokenizer, self.pad_id = tokenizer, pad_id

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts):
        return self.tokenizer.encode_batch(texts, add_special_tokens=False)

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def token_to_id(self, token):
        return self.pad_id if token == EOT else self.tokenizer.token_to_id(token)

    def get_vocab_size(self):
        return self.tokenizer.get_vocab_size()


def pad_id_of(tokenizer, config):
    own = tokenizer.token_to_id(EOT)
    for candidate in (own, config.pad_token_id, config.eos_token_id, config.bos_token_id):
        candidate = candidate[0] if isinstance(candidate, (list, tuple)) and candidate else candidate
        if isinstance(candidate, int) and 0 <= candidate < config.vocab_size:
            return candidate
    raise UsageError("the model has no padding token: set pad_token_id (or eos_token_id) in its config.json")


class HFCausalLM(nn.Module):
    """A transformers causal LM called as tiny_gpt is (see the module docstring)."""

    def __init__(self, hf_model, block_size, converted=()):
        super().__init__()
        self.hf = hf_model
        config = hf_model.config
        self.config = SimpleNamespace(block_size=block_size, n_layer=config.num_hidden_layers,
                                      vocab_size=config.vocab_size, d_model=config.hidden_size)  # fmt: skip
        self.converted = list(converted)  # the Conv1D modules turned into nn.Linear (names inside self.hf)
        params = inspect.signature(hf_model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.bool_mask = config._attn_implementation == "sdpa"  # sdpa takes a bool mask; eager adds a float one

    def forward(self, idx, targets=None, positions=None, attn_mask=None, cache=None):
        B, T = idx.shape
        kwargs = {"use_cache": cache is not None}
        if attn_mask is not None:  # (B, 1, T, T_keys): transformers uses a 4D mask as given
            if positions is None:  # (with a mask, some models would derive positions from it)
                positions = torch.arange(T, device=idx.device).expand(B, T)
            dtype = next(self.hf.parameters()).dtype
            kwargs["attention_mask"] = (
                attn_mask
                if self.bool_mask
                else torch.zeros(attn_mask.shape, dtype=dtype, device=idx.device).masked_fill(
                    ~attn_mask, torch.finfo(dtype).min
                )
            )
        if positions is not None:
            kwargs["position_ids"] = positions.expand(B, T)  # (B, T); OPT adds its offset of 2 itself
        if cache is not None:
            from transformers import DynamicCache

            if getattr(cache, "hf", None) is None:  # the KVCache greedy decoding passes: it carries transformers' cache
                cache.hf = DynamicCache(config=self.hf.config)
            kwargs[self.cache_kwarg] = cache.hf
        logits = self.hf(input_ids=idx, **kwargs).logits  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def load(folder, context, device="cpu"):
    """(wrapped model, tokenizer, meta, folder) from a local model folder; the model in float32 on `device`, in eval
    mode, its block_size min(the model's own positions, context). Refuses a model that fails the packing check."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # (a bar per load would interleave with the harness's own lines)
    folder = check_folder(folder)
    config = read_config(folder)
    options = dict(local_files_only=True, dtype=torch.float32, use_safetensors=True)
    try:
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", **options)
        except ValueError as e:  # an architecture without sdpa: eager attention, which takes an additive mask
            if "sdpa" not in str(e).lower():
                raise
            hf_model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **options)
    except (ValueError, OSError, RuntimeError) as e:
        raise UsageError(f"--model {folder}: transformers could not load it ({str(e).splitlines()[0][:200]})") from None
    converted = conv1d_to_linear(hf_model)
    order_projections(hf_model)
    own = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or context
    model = HFCausalLM(hf_model, min(own, context), converted).to(device).eval()
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    if tokenizer.get_vocab_size() > config.vocab_size:
        n = tokenizer.get_vocab_size()
        raise UsageError(f"--model {folder}: tokenizer.json has {n} tokens, the model's embedding {config.vocab_size}")
    check_packing(model)
    meta = {"sha256": model_digest(str(folder)), "probe_accuracy": "–", "model_type": config.model_type,
            "folder": str(folder),
            "converted_conv1d": converted, "attention": hf_model.config._attn_implementation}  # fmt: skip
    return model, HFTokenizer(tokenizer, pad_id_of(tokenizer, config)), meta, folder


@functools.lru_cache(maxsize=8)
def model_digest(folder):
    """SHA-256 over every .json and .safetensors file of the folder (weights, config, tokenizer): the base's id."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".json", ".safetensors") and p.is_file())
    return hashlib.sha256("".join(f"{p.name}:{sha256_file(p)};" for p in files).encode()).hexdigest()


def width(folder):
    """The model's width (what a rank is bounded by): its hidden size."""
    return read_config(folder).hidden_size


@torch.no_grad()
def check_packing(model):
    """Two sequences packed into one row (positions restarting, a block-diagonal mask) must give the logits they give
    one per row, and a decoding step from a cache the logits of the full sequence: the harness packs training items,
    scores choice trees and decodes that way. A UsageError for a model that does not."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(device) for n in (5, 3))
    alone = torch.cat([model(a)[0][0], model(b)[0][0]])  # (8, vocab)
    positions, mask = packing(torch.tensor([[0] * 5 + [1] * 3], device=device))
    try:
        packed = model(torch.cat([a, b], dim=1), positions=positions, attn_mask=mask)[0][0]  # (8, vocab)
        cache = KVCache(model.config.n_layer)
        model(a[:, :4], positions=positions[:, :4], attn_mask=mask[:, :, :4, :4], cache=cache)
        step = model(
            a[:, 4:],
            positions=positions[:, 4:5],
            attn_mask=torch.ones(1, 1, 1, 5, dtype=torch.bool, device=device),
            cache=cache,
        )[0][0]
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(
            f"the model does not take position ids and a 4D attention mask ({str(e).splitlines()[0][:160]}): the "
            f"harness packs items and scores choices with them"
        ) from None
    scale = max(1.0, alone.abs().max().item())
    gap = max((packed - alone).abs().max().item(), (step[-1] - alone[4]).abs().max().item()) / scale
    if not gap <= PROBE_TOL:
        raise UsageError(
            f"the model gives other logits for packed sequences or a cached decoding step (relative gap {gap:.1e}): "
            f"it does not honour position ids and 4D attention masks as the harness needs"
        )
