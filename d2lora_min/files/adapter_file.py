"""The adapter file: a safetensors file of the adapter tensors, with the adapter's config and a SHA-256 of both in its
metadata, and every check a file (or a state dict with its config) passes before it changes a model. Nothing is
unpickled; the tensors and their description are written in one atomic rename, so a kill leaves the old file or the
new one, never a mix. nn/checkpoint.py (save_adapters, load_adapters) calls these; docs/PORTING.md, section 11,
spells the file out.
"""

import hashlib
import json
import math
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .io import atomic_path

ADAPTER_FILE = "adapter.safetensors"
CONFIG_KEY = "d2lora_min.adapter_config"  # the metadata entry holding the config as JSON
CHECKSUM_KEY = "d2lora_min.sha256"  # the metadata entry holding adapter_sha256(config text, tensors)
FORMAT = 4  # the one format this version writes and reads
MAX_CONFIG_CHARS = 1_000_000  # a config longer than this is not ours (and is not parsed)
CONFIG_KEYS = ("format", "method", "r", "alpha", "dropout", "options", "targets", "base_sha256")


def base_sha256(weight):
    """SHA-256 of a base weight's raw bytes (its dtype, row-major, in the CPU's byte order: little-endian on x86 and
    ARM): which base weight an adapter belongs to."""
    flat = weight.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def adapter_sha256(config_text, tensors):
    """SHA-256 over the config's JSON text and {name: tensor}: for each name in sorted order, the JSON text
    [name, dtype, [numel]] (the length of the flattened tensor, not its shape: shapes are checked against the model on
    load) and then its raw bytes."""
    h = hashlib.sha256(config_text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)  # 1-D: a 0-d tensor (tau) cannot be viewed as bytes
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_format(config, source):
    """The one check of the config's format (FORMAT, an int): what the file and the direct API both pass through."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        said = f"format {config['format']!r}" if isinstance(config, dict) and "format" in config else "no format"
        raise ValueError(
            f"{source}: its config has {said}; this version of d2lora_min reads adapter files of format {FORMAT} only"
        )


def check_config(config, source, defaults_of):
    """The config's fields and their types, or a ValueError naming the first one that is wrong. Option values must
    have their default's type, so nothing deeper than the config's own fields is ever compared. defaults_of(method,
    options) -> the method's {option: default}, raising for an unknown method or option."""
    if not isinstance(config, dict):
        raise ValueError(f"adapter config must be a dict, got {type(config).__name__}")
    check_format(config, source)
    unknown = sorted(str(k) for k in set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"adapter config has unknown fields {unknown}; expected {', '.join(CONFIG_KEYS)}")
    kinds = {
        "format": int,
        "method": str,
        "r": int,
        "alpha": (int, float),
        "dropout": (int, float),
        "options": dict,
        "targets": dict,
        "base_sha256": dict,
    }
    for key, kind in kinds.items():
        if key not in config or isinstance(config[key], bool) or not isinstance(config[key], kind):
            raise ValueError(
                f"adapter config: {key!r} is missing or has the wrong type ({type(config.get(key)).__name__})"
            )
    if config["r"] < 1:
        raise ValueError(f"adapter config: r must be >= 1, got {config['r']}")
    defaults = defaults_of(config["method"], config["options"])
    missing = sorted(set(defaults) - set(config["options"]))
    if missing:  # a file says everything about its adapter: no option silently takes today's default
        raise ValueError(
            f"adapter config for {config['method']!r} does not say {', '.join(missing)} (every option is stored)"
        )
    for key, value in config["options"].items():
        like = defaults[key]
        ok = (
            isinstance(value, bool)
            if isinstance(like, bool)
            else (isinstance(value, (int, float)) and not isinstance(value, bool))
        )
        if not ok or (not isinstance(value, bool) and not math.isfinite(value)):
            raise ValueError(f"adapter config: option {key!r} = {value!r} is not a {type(like).__name__}")
    for name, shape in config["targets"].items():
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
        ):
            raise ValueError(f"adapter config: target {name!r} has shape {shape!r}, expected [out, in]")
    digests = config["base_sha256"]
    hex_digest = lambda d: isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)  # noqa: E731
    if set(digests) != set(config["targets"]) or not all(hex_digest(d) for d in digests.values()):
        raise ValueError("adapter config: base_sha256 must give one SHA-256 (64 hex digits) for each target")


def check_state_dict(state_dict, config, source):
    """Tensors by name, at least one, and no stored factor smaller than the rank the config says (checked before
    anything is allocated for that rank)."""
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise ValueError(f"{source}: the state dict must map names to tensors")
    if not state_dict:
        raise ValueError(f"{source} holds no tensors")
    largest = max((max(t.shape, default=1) for t in state_dict.values()), default=1)
    if config["r"] > largest:  # the rank is a dimension of the stored factors: refuse before allocating for it
        raise ValueError(
            f"{source}: rank r={config['r']} is larger than any dimension of the stored tensors ({largest})"
        )


def check_tensors(state_dict, want, source):
    """Exactly the expected tensors, with their shapes and dtypes, and finite."""
    missing, extra = sorted(set(want) - set(state_dict)), sorted(set(state_dict) - set(want))
    if missing or extra:
        raise ValueError(f"{source} does not fit the model: missing {missing}, unexpected {extra}")
    for key, (shape, dt) in want.items():
        t = state_dict[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{source}, tensor {key}: stored with shape {tuple(t.shape)}, the model needs {shape}")
        if t.dtype != dt:
            raise ValueError(
                f"{source}, tensor {key}: stored as {t.dtype}, the model's weights are {dt}; load it onto the "
                f"model in {t.dtype} and convert the model afterwards (model.to({dt}))"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"{source}, tensor {key}: holds NaN or Inf")


def check_base(config, weights, source):
    """Each target's base weight ({name: tensor}) is, byte for byte, the one the adapter was trained on."""
    for name, stored in config["base_sha256"].items():
        have = base_sha256(weights[name])
        if have != stored:
            raise ValueError(
                f"{source} was trained on another base weight at {name} (SHA-256 {stored[:12]}..., this "
                f"model's {have[:12]}...): an adapter loads only onto the "
                f"base it was trained on, never onto a model it was already merged into"
            )


HALF_TOL = 1e-2  # how far a value derived in float16 or bfloat16 may be from the same value derived in float32


def _agree(stored, computed, tol):
    """Elementwise within tol of the computed values and tol of their largest magnitude."""
    return torch.allclose(
        stored, computed, rtol=tol, atol=tol * float(computed.abs().max()) if computed.numel() else 0.0
    )


def check_derived(state_dict, derived, source):
    """The tensors a layer derives from its base or options agree with what this model gives them (relative 1e-5 of
    their largest value; 1e-2 in 16-bit dtypes). A 32- or 64-bit model whose stored values agree only to 16-bit
    rounding was cast to float16 or bfloat16 after inject_adapters: the cast rounded the derived buffer and the base
    weight each on its own, so the buffer is no longer the one the base gives (the error says so, and what to do)."""
    for key, computed in derived.items():
        half = computed.dtype in (torch.float16, torch.bfloat16)
        stored, computed = state_dict[key].double().cpu(), computed.double().cpu()
        if _agree(stored, computed, HALF_TOL if half else 1e-5):
            continue
        name = key.rpartition(".")[2]
        if not half and _agree(stored, computed, HALF_TOL):
            raise ValueError(
                f"{source}, tensor {key}: agrees with this model's base weight only to 16-bit rounding: a "
                f"model was cast to float16 or bfloat16 after inject_adapters, which rounded {name} apart from "
                f"the weight it is derived from; cast a model before inject_adapters, never after"
            )
        raise ValueError(
            f"{source}, tensor {key}: the stored values are not those of this model's base weight and the "
            f"adapter's options (saved for another base, or edited); {name} is derived, not trained"
        )


def write_adapter_file(path, tensors, config):
    """Write {name: tensor} and the config, sealed by their SHA-256, as one safetensors file, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    config_text = json.dumps(config, sort_keys=True)
    metadata = {CONFIG_KEY: config_text, CHECKSUM_KEY: adapter_sha256(config_text, tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def read_adapter_file(path):
    """(tensors on CPU, config) from an adapter file; a clear ValueError for a missing, truncated, edited or foreign file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter file at {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a readable d2lora_min adapter file (not a regular file)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        text = metadata[CONFIG_KEY]
        if len(text) > MAX_CONFIG_CHARS:
            raise ValueError(f"its config has {len(text)} characters")
        config = json.loads(text)
        tensors = load_file(path)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise ValueError(
            f"{path} is not a readable d2lora_min adapter file ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    check_format(config, path)  # before the checksum: another format may seal its tensors another way
    if CHECKSUM_KEY not in metadata:
        raise ValueError(
            f"{path}: no checksum is stored with the tensors ({CHECKSUM_KEY!r} is missing from the metadata: "
            f"an edited file)"
        )
    if metadata[CHECKSUM_KEY] != adapter_sha256(text, tensors):
        raise ValueError(
            f"{path}: the config or the tensors do not match the checksum stored with them (a damaged or edited file)"
        )
    return tensors, config
