"""Adapter files: only the adapter tensors and a small config, in one safetensors file.

    save_adapters(model, "runs/my_adapter")   # runs/my_adapter/adapter.safetensors
    load_adapters(base_model, "runs/my_adapter")

The config (format, method, r, alpha, dropout, every option, each target's [out, in] and the SHA-256 of each target's
base weight) and a SHA-256 of the config and the tensors travel in the file's metadata, so the tensors and their
description are written in one atomic rename: a kill leaves the old file or the new one, never a mix. Nothing is
unpickled. Loading checks the checksum, names, shapes, dtypes and finiteness exactly, that the model's base weights are
the ones the adapter was trained on (not another base, and not a model the adapter was already merged into), and that
the tensors a layer derives from its base (D2-LoRA's target norms) agree; every check runs before the model is changed.
docs/PORTING.md, section 11, spells the file out.
"""

import hashlib
import json
import math
import os

import torch
import torch.nn as nn
from torch.nn.utils import skip_init
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..atomic import atomic_path
from .inject import CONV1D_HINT, adapter_layers, check_options, inject_adapters_at
from .registry import get_method, method_name

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


def adapter_config(model):
    """What it takes to rebuild the adapters: method, r, alpha, dropout, options, each target's [out, in] and the
    SHA-256 of each target's base weight."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters")
    configs = [
        {"method": method_name(layer), "r": layer.r, "alpha": layer.alpha, "dropout": layer.dropout, "options": layer.options()}
        for _, layer in layers
    ]
    if any(c != configs[0] for c in configs):
        raise ValueError("adapter layers differ in method or hyper-parameters; one config cannot describe them")
    return {"format": FORMAT, **configs[0], "targets": {name: [layer.out_features, layer.in_features] for name, layer in layers},
            "base_sha256": {name: base_sha256(layer.base.weight) for name, layer in layers}}  # fmt: skip


def _own_tensors(layer):
    """{name: tensor} of one adapter layer's own tensors (factors, magnitude, tau, target norms), not its base's."""
    return {key: t for key, t in layer.state_dict().items() if not key.startswith("base.")}


def adapter_state_dict(model):
    """Only the adapter tensors: {full name: tensor}, nothing of the base."""
    return {f"{name}.{key}": t for name, layer in adapter_layers(model) for key, t in _own_tensors(layer).items()}


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


def _check_format(config, source):
    """The one check of the config's format (FORMAT, an int): what the file and the direct API both pass through."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        said = f"format {config['format']!r}" if isinstance(config, dict) and "format" in config else "no format"
        raise ValueError(f"{source}: its config has {said}; this version of d2lora_min reads adapter files of format {FORMAT} only")


def _check_config(config, source="adapter file"):
    """The config's fields and their types, or a ValueError naming the first one that is wrong. Option values must
    have their default's type, so nothing deeper than the config's own fields is ever compared."""
    if not isinstance(config, dict):
        raise ValueError(f"adapter config must be a dict, got {type(config).__name__}")
    _check_format(config, source)
    unknown = sorted(str(k) for k in set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"adapter config has unknown fields {unknown}; expected {', '.join(CONFIG_KEYS)}")
    kinds = {"format": int, "method": str, "r": int, "alpha": (int, float), "dropout": (int, float), "options": dict, "targets": dict,
             "base_sha256": dict}  # fmt: skip
    for key, kind in kinds.items():
        if key not in config or isinstance(config[key], bool) or not isinstance(config[key], kind):
            raise ValueError(f"adapter config: {key!r} is missing or has the wrong type ({type(config.get(key)).__name__})")
    if config["r"] < 1:
        raise ValueError(f"adapter config: r must be >= 1, got {config['r']}")
    defaults = get_method(config["method"]).OPTIONS
    check_options(config["method"], config["options"])
    missing = sorted(set(defaults) - set(config["options"]))
    if missing:  # a file says everything about its adapter: no option silently takes today's default
        raise ValueError(f"adapter config for {config['method']!r} does not say {', '.join(missing)} (every option is stored)")
    for key, value in config["options"].items():
        like = defaults[key]
        ok = isinstance(value, bool) if isinstance(like, bool) else (isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok or (not isinstance(value, bool) and not math.isfinite(value)):
            raise ValueError(f"adapter config: option {key!r} = {value!r} is not a {type(like).__name__}")
    for name, shape in config["targets"].items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise ValueError(f"adapter config: target {name!r} has shape {shape!r}, expected [out, in]")
    digests = config["base_sha256"]
    hex_digest = lambda d: isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)  # noqa: E731
    if set(digests) != set(config["targets"]) or not all(hex_digest(d) for d in digests.values()):
        raise ValueError("adapter config: base_sha256 must give one SHA-256 (64 hex digits) for each target")


def _expected_tensors(config, bases):
    """{full name: (shape, dtype)} of the adapter tensors `config` describes, and {full name: tensor} of those a layer
    derives from its base weight, from a throwaway layer per target built around a CPU copy of that target's base
    weight (one at a time; no change to any model). bases: {target name: the model's nn.Linear there}."""
    cls = get_method(config["method"])
    want, derived = {}, {}
    for name, (n_out, n_in) in config["targets"].items():
        weight = bases[name].weight
        shadow = skip_init(nn.Linear, n_in, n_out, bias=False, dtype=weight.dtype)
        with torch.no_grad():
            shadow.weight.copy_(weight.detach().cpu())
        layer = cls(shadow, r=config["r"], alpha=config["alpha"], dropout=config["dropout"], **config["options"])
        want.update({f"{name}.{key}": (tuple(t.shape), t.dtype) for key, t in _own_tensors(layer).items()})
        derived.update({f"{name}.{key}": t for key, t in layer.derived_buffers().items()})
    return want, derived


def load_adapter_state_dict(model, state_dict, config, source="adapter file"):
    """Load adapter tensors saved by adapter_state_dict with their adapter_config (in place; returns the model).

    A model without adapters gets them injected from `config` (each new layer in the mode of the layer it replaces).
    Anything that does not match is a ValueError naming it, raised before the model is changed: other targets, shapes,
    method, rank, options or dtypes; missing, extra or non-finite tensors; base weights other than those the adapter
    was trained on (another base, or the model it was already merged into). Tensors a layer derives from its base or
    options (D2-LoRA's target_norm, a fixed tau) must agree with what this model gives them, and keep those values.
    """
    _check_config(config, source)
    layers = dict(adapter_layers(model))
    _check_model_fits(model, layers, config, source)
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise ValueError(f"{source}: the state dict must map names to tensors")
    if not state_dict:
        raise ValueError(f"{source} holds no tensors")
    largest = max((max(t.shape, default=1) for t in state_dict.values()), default=1)
    if config["r"] > largest:  # the rank is a dimension of the stored factors: refuse before allocating for it
        raise ValueError(f"{source}: rank r={config['r']} is larger than any dimension of the stored tensors ({largest})")
    modules = dict(model.named_modules())
    bases = {name: layers[name].base if name in layers else modules[name] for name in config["targets"]}
    want, derived = _expected_tensors(config, bases)
    _check_tensors(state_dict, want, source)
    _check_base(config, bases, source)
    _check_derived(state_dict, derived, source)

    if not layers:
        inject_adapters_at(model, config["method"], tuple(config["targets"]), r=config["r"], alpha=config["alpha"],
                           dropout=config["dropout"], **config["options"])  # fmt: skip
    with torch.no_grad():
        for key, tensor in adapter_state_dict(model).items():
            if key not in derived:  # derived tensors keep what the layer computed for this model
                tensor.copy_(state_dict[key])  # same shape and dtype, checked above; shares storage with the layer
    return model


def _check_model_fits(model, layers, config, source):
    """The config's targets are the model's (names and [out, in]), and adapters already there are the config's."""
    want_targets = {name: list(shape) for name, shape in config["targets"].items()}
    if layers:
        have_targets = {name: [m.out_features, m.in_features] for name, m in layers.items()}
    else:
        modules = dict(model.named_modules())
        have_targets = {}
        for name in want_targets:
            m = modules.get(name)
            if isinstance(m, nn.Linear):
                have_targets[name] = [m.out_features, m.in_features]
            elif m is not None:  # there, but not something an adapter wraps
                hint = CONV1D_HINT if type(m).__name__ == "Conv1D" else ""
                raise ValueError(f"{source}: the model's {name} is a {type(m).__name__}, not an nn.Linear{hint}")
    if have_targets != want_targets:
        diffs = [f"{k}: adapter file {want_targets.get(k, 'absent')}, model {have_targets.get(k, 'absent')}"
                 for k in sorted(set(have_targets) | set(want_targets)) if have_targets.get(k) != want_targets.get(k)]  # fmt: skip
        raise ValueError(f"{source} is for other targets or shapes ([out, in]): " + "; ".join(diffs))
    if layers:
        have = adapter_config(model)
        for key in ("method", "r", "alpha", "dropout", "options"):
            if have[key] != config[key]:
                raise ValueError(f"{source} has {key}={config[key]!r}, the model's adapters have {have[key]!r}")


def _check_tensors(state_dict, want, source):
    """Exactly the expected tensors, with their shapes and dtypes, and finite."""
    missing, extra = sorted(set(want) - set(state_dict)), sorted(set(state_dict) - set(want))
    if missing or extra:
        raise ValueError(f"{source} does not fit the model: missing {missing}, unexpected {extra}")
    for key, (shape, dt) in want.items():
        t = state_dict[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{source}, tensor {key}: stored with shape {tuple(t.shape)}, the model needs {shape}")
        if t.dtype != dt:
            raise ValueError(f"{source}, tensor {key}: stored as {t.dtype}, the model's weights are {dt}; load it onto the "
                             f"model in {t.dtype} and convert the model afterwards (model.to({dt}))")  # fmt: skip
        if not torch.isfinite(t).all():
            raise ValueError(f"{source}, tensor {key}: holds NaN or Inf")


def _check_base(config, bases, source):
    """Each target's base weight is, byte for byte, the one the adapter was trained on."""
    for name, stored in config["base_sha256"].items():
        have = base_sha256(bases[name].weight)
        if have != stored:
            raise ValueError(f"{source} was trained on another base weight at {name} (SHA-256 {stored[:12]}..., this "
                             f"model's {have[:12]}...): an adapter loads only onto the "
                             f"base it was trained on, never onto a model it was already merged into")  # fmt: skip


HALF_TOL = 1e-2  # how far a value derived in float16 or bfloat16 may be from the same value derived in float32


def _agree(stored, computed, tol):
    """Elementwise within tol of the computed values and tol of their largest magnitude."""
    return torch.allclose(stored, computed, rtol=tol, atol=tol * float(computed.abs().max()) if computed.numel() else 0.0)


def _check_derived(state_dict, derived, source):
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
            raise ValueError(f"{source}, tensor {key}: agrees with this model's base weight only to 16-bit rounding: a "
                             f"model was cast to float16 or bfloat16 after inject_adapters, which rounded {name} apart from "
                             f"the weight it is derived from; cast a model before inject_adapters, never after")  # fmt: skip
        raise ValueError(f"{source}, tensor {key}: the stored values are not those of this model's base weight and the "
                         f"adapter's options (saved for another base, or edited); {name} is derived, not trained")  # fmt: skip


def save_adapters(model, folder):
    """Write folder/adapter.safetensors (tensors, config and their checksum in its metadata) atomically; returns its path."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    path = os.path.join(folder, ADAPTER_FILE)
    config_text = json.dumps(adapter_config(model), sort_keys=True)
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
        raise ValueError(f"{path} is not a readable d2lora_min adapter file ({type(e).__name__}: {str(e)[:200]})") from None
    _check_format(config, path)  # before the checksum: another format may seal its tensors another way
    if CHECKSUM_KEY not in metadata:
        raise ValueError(f"{path}: no checksum is stored with the tensors ({CHECKSUM_KEY!r} is missing from the metadata: "
                         f"an edited file)")  # fmt: skip
    if metadata[CHECKSUM_KEY] != adapter_sha256(text, tensors):
        raise ValueError(f"{path}: the config or the tensors do not match the checksum stored with them (a damaged or "
                         f"edited file)")  # fmt: skip
    return tensors, config


def load_adapters(model, folder):
    """Load what save_adapters wrote onto `model` (injecting the adapters if it has none); returns the model."""
    path = os.path.join(folder, ADAPTER_FILE)
    tensors, config = read_adapter_file(path)
    weight = next(iter(model.parameters()), None)
    if weight is None:
        raise ValueError(f"{path}: the model has no parameters, so none of the adapter's targets")
    return load_adapter_state_dict(model, {k: v.to(weight.device) for k, v in tensors.items()}, config, source=path)
