"""Adapter checkpoints: only the adapter tensors and a small config, in one safetensors file.

    save_adapters(model, "runs/my_adapter")   # runs/my_adapter/adapter.safetensors
    load_adapters(base_model, "runs/my_adapter")

The config (method, r, alpha, dropout, options, and each target's [out, in]) travels in the file's metadata,
so the tensors and their description are written in one atomic rename: a kill leaves the old file or the new
one, never a mix. Nothing is unpickled. Loading checks names, shapes, dtypes and finiteness exactly, and every
check runs before the model is changed.
"""

import json
import os

import torch
import torch.nn as nn
from torch.nn.utils import skip_init
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..atomic import atomic_path
from .inject import adapter_layers, check_options, inject_adapters
from .registry import get_method, method_name

ADAPTER_FILE = "adapter.safetensors"
CONFIG_KEY = "d2lora_min.adapter_config"  # the metadata entry holding the config as JSON


def adapter_config(model):
    """What it takes to rebuild the adapters: method, r, alpha, dropout, options and each target's [out, in]."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters")
    configs = [
        {"method": method_name(layer), "r": layer.r, "alpha": layer.alpha, "dropout": layer.dropout, "options": layer.options()}
        for _, layer in layers
    ]
    if any(c != configs[0] for c in configs):
        raise ValueError("adapter layers differ in method or hyper-parameters; one config cannot describe them")
    return {**configs[0], "targets": {name: [layer.out_features, layer.in_features] for name, layer in layers}}


def _own_tensors(layer):
    """{name: tensor} of one adapter layer's own tensors (factors, magnitude, tau, target norms), not its base's."""
    return {key: t for key, t in layer.state_dict().items() if not key.startswith("base.")}


def adapter_state_dict(model):
    """Only the adapter tensors: {full name: tensor}, nothing of the base."""
    return {f"{name}.{key}": t for name, layer in adapter_layers(model) for key, t in _own_tensors(layer).items()}


def _check_config(config):
    """The config's fields and their types, or a ValueError naming the first one that is wrong."""
    if not isinstance(config, dict):
        raise ValueError(f"adapter config must be a dict, got {type(config).__name__}")
    kinds = {"method": str, "r": int, "alpha": (int, float), "dropout": (int, float), "options": dict, "targets": dict}
    for key, kind in kinds.items():
        if key not in config or isinstance(config[key], bool) or not isinstance(config[key], kind):
            raise ValueError(f"adapter config: {key!r} is missing or has the wrong type ({config.get(key)!r})")
    get_method(config["method"])
    check_options(config["method"], config["options"])
    for name, shape in config["targets"].items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise ValueError(f"adapter config: target {name!r} has shape {shape!r}, expected [out, in]")


def _expected_tensors(config, dtypes):
    """{full name: (shape, dtype)} of the adapter tensors `config` describes, from a throwaway layer per target
    (built around an uninitialised stand-in for the base, one at a time; no change to any model)."""
    cls = get_method(config["method"])
    want = {}
    for name, (n_out, n_in) in config["targets"].items():
        shadow = skip_init(nn.Linear, n_in, n_out, dtype=dtypes[name])
        layer = cls(shadow, r=config["r"], alpha=config["alpha"], dropout=config["dropout"], **config["options"])
        want.update({f"{name}.{key}": (tuple(t.shape), t.dtype) for key, t in _own_tensors(layer).items()})
    return want


def load_adapter_state_dict(model, state_dict, config, source="adapter checkpoint"):
    """Load adapter tensors saved by adapter_state_dict with their adapter_config (in place; returns the model).

    A model without adapters gets them injected from `config`. Anything that does not match (other targets,
    shapes, method, rank, options, dtypes; missing, extra or non-finite tensors) is a ValueError naming the
    tensor, raised before the model is changed.
    """
    _check_config(config)
    want_targets = {name: list(shape) for name, shape in config["targets"].items()}
    layers = adapter_layers(model)
    if layers:
        have_targets = {name: [m.out_features, m.in_features] for name, m in layers}
    else:
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        have_targets = {name: [linears[name].out_features, linears[name].in_features] for name in want_targets if name in linears}
    if have_targets != want_targets:
        diffs = [
            f"{k}: checkpoint {want_targets.get(k, 'absent')}, model {have_targets.get(k, 'absent')}"
            for k in sorted(set(have_targets) | set(want_targets))
            if have_targets.get(k) != want_targets.get(k)
        ]
        raise ValueError(f"{source} is for other targets or shapes ([out, in]): " + "; ".join(diffs))
    if layers:
        have = adapter_config(model)
        for key in ("method", "r", "alpha", "dropout", "options"):
            if have[key] != config[key]:
                raise ValueError(f"{source} has {key}={config[key]!r}, the model's adapters have {have[key]!r}")

    modules = dict(model.named_modules())
    dtypes = {name: (modules[name].base if name in dict(layers) else modules[name]).weight.dtype for name in want_targets}
    want = _expected_tensors(config, dtypes)
    missing, extra = sorted(set(want) - set(state_dict)), sorted(set(state_dict) - set(want))
    if missing or extra:
        raise ValueError(f"{source} does not fit the model: missing {missing}, unexpected {extra}")
    for key, (shape, dt) in want.items():
        t = state_dict[key]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dt:
            got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{source}, tensor {key}: stored {got}, the model needs {(shape, dt)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{source}, tensor {key}: holds NaN or Inf")

    if not layers:
        targets = tuple(want_targets)
        inject_adapters(model, config["method"], r=config["r"], alpha=config["alpha"], targets=targets,
                        dropout=config["dropout"], **config["options"])  # fmt: skip
    with torch.no_grad():
        for key, tensor in adapter_state_dict(model).items():
            tensor.copy_(state_dict[key])  # same shape and dtype, checked above; shares storage with the layer
    return model


def save_adapters(model, folder):
    """Write folder/adapter.safetensors (tensors + config in its metadata) atomically; returns its path."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    path = os.path.join(folder, ADAPTER_FILE)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={CONFIG_KEY: json.dumps(adapter_config(model), sort_keys=True)})
    return path


def read_adapter_file(path):
    """(tensors on CPU, config) from an adapter file; a clear ValueError for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
        config = json.loads(metadata[CONFIG_KEY])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable d2lora_min adapter file ({type(e).__name__}: {e})") from None
    return tensors, config


def load_adapters(model, folder):
    """Load what save_adapters wrote onto `model` (injecting the adapters if it has none); returns the model."""
    path = os.path.join(folder, ADAPTER_FILE)
    tensors, config = read_adapter_file(path)
    device = next(model.parameters()).device
    return load_adapter_state_dict(model, {k: v.to(device) for k, v in tensors.items()}, config, source=path)
