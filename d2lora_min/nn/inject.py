"""Putting adapters into any model built from nn.Linear, merging them out again, and adapter checkpoints.

    model = inject_adapters(model, "d2lora", r=4, alpha=8, targets=("q_proj", "v_proj"))
    ...train...
    save_adapters(model, "runs/my_adapter")   # adapter.safetensors + adapter_config.json
    model = merge_adapters(model)             # plain nn.Linear everywhere again
"""

import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, write_json
from .base import AdapterLinear
from .registry import METHODS

# Every linear of a tiny_gpt block: attention q, k, v, o and the MLP's two layers.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")


def get_method(name):
    """The adapter class registered as `name`; a clear error listing the valid names otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def check_options(method, options):
    """Raise if `options` holds a keyword that `method` does not take."""
    valid = get_method(method).OPTIONS
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{k} (default {v})" for k, v in valid.items()) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {method!r}; valid options: {listed}")


def method_name(layer):
    """The registry name of an adapter layer's class."""
    for name, cls in METHODS.items():
        if type(layer) is cls:
            return name
    raise ValueError(f"{type(layer).__name__} is not registered in METHODS")


def adapter_layers(model):
    """[(module name, adapter layer)] in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLinear)]


def _matches(module_name, target):
    """A target names a module by its full name or by a suffix after a dot: "v_proj" matches "blocks.0.attn.v_proj"."""
    return module_name == target or module_name.endswith("." + target)


def _replace_module(model, name, new):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_adapters(model, method, r=4, alpha=8.0, targets=DEFAULT_TARGETS, dropout=0.0, **options):
    """Freeze every parameter of `model` and wrap each targeted nn.Linear in the `method`'s adapter (in place).

    targets: module-name suffixes (or full names). Every target must match at least one module, and every
    matched module must be an nn.Linear. Returns the model.
    """
    cls = get_method(method)
    check_options(method, options)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one module suffix, e.g. ('q_proj', 'v_proj')")
    if adapter_layers(model):
        raise ValueError("model already has adapters: merge_adapters(model) first, or start from the base model")

    modules = [(name, m) for name, m in model.named_modules() if name]
    chosen = [(name, m) for name, m in modules if any(_matches(name, t) for t in targets)]
    for t in targets:
        if not any(_matches(name, t) for name, _ in modules):
            linears = sorted({name.rsplit(".", 1)[-1] for name, m in modules if isinstance(m, nn.Linear)})
            raise ValueError(f"target {t!r} matches no module; the model's nn.Linear names end in: {', '.join(linears)}")
    for name, m in chosen:
        if not isinstance(m, nn.Linear):
            raise TypeError(f"target module {name!r} is a {type(m).__name__}, not an nn.Linear")

    model.requires_grad_(False)  # the base is frozen; only the adapter tensors created below train
    for name, m in chosen:
        _replace_module(model, name, cls(m, r=r, alpha=alpha, dropout=dropout, **options))
    return model


@torch.no_grad()
def merge_adapters(model):
    """Replace every adapter layer by the plain nn.Linear it equals (in place); returns the model."""
    if isinstance(model, AdapterLinear):
        return model.merge()
    for name, layer in adapter_layers(model):
        _replace_module(model, name, layer.merge())
    return model


def trainable_parameters(model):
    """Number of parameters that receive gradients (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- adapter checkpoints --------------------------------------------------------------------------


def adapter_config(model):
    """What it takes to rebuild the adapters: method, r, alpha, dropout, options and each target's (out, in)."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters")
    configs = []
    for _, layer in layers:
        configs.append(
            {
                "method": method_name(layer),
                "r": layer.r,
                "alpha": layer.alpha,
                "dropout": layer.dropout,
                "options": layer.options(),
            }
        )
    if any(c != configs[0] for c in configs):
        raise ValueError("adapter layers differ in method or hyper-parameters; one config cannot describe them")
    return {**configs[0], "targets": {name: [layer.out_features, layer.in_features] for name, layer in layers}}


def adapter_state_dict(model):
    """Only the adapter tensors (factors, magnitude, tau, target norms): {full name: tensor}, nothing of the base."""
    state = {}
    for name, layer in adapter_layers(model):
        for key, tensor in layer.state_dict().items():
            if not key.startswith("base."):
                state[f"{name}.{key}"] = tensor
    return state


def load_adapter_state_dict(model, state_dict, config):
    """Load adapter tensors saved by adapter_state_dict with their adapter_config (in place; returns the model).

    A model without adapters gets them injected from `config` first. Anything that does not match
    (other targets, other shapes, another method or rank, missing or extra tensors) is a ValueError,
    raised before the model is changed.
    """
    want = {name: list(shape) for name, shape in config["targets"].items()}
    layers = adapter_layers(model)
    if layers:
        have = {name: [m.out_features, m.in_features] for name, m in layers}
    else:
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        have = {name: [linears[name].out_features, linears[name].in_features] for name in want if name in linears}
    if have != want:
        diffs = [
            f"{k}: checkpoint {want.get(k, 'absent')}, model {have.get(k, 'absent')}"
            for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)
        ]
        raise ValueError("adapter checkpoint is for other targets or shapes ([out, in]): " + "; ".join(diffs))
    if not layers:
        inject_adapters(
            model,
            config["method"],
            r=config["r"],
            alpha=config["alpha"],
            targets=tuple(want),
            dropout=config["dropout"],
            **config["options"],
        )
    have_config = adapter_config(model)
    for key in ("method", "r", "alpha", "options"):
        if have_config[key] != config[key]:
            raise ValueError(f"adapter checkpoint has {key}={config[key]!r}, the model's adapters have {have_config[key]!r}")

    own = adapter_state_dict(model)
    missing, extra = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or extra:
        raise ValueError(f"adapter checkpoint does not fit: missing {missing}, unexpected {extra}")
    for key, tensor in own.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(state_dict[key].shape)}, model {tuple(tensor.shape)}")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state_dict[key])  # state_dict() tensors share storage with the live parameters
    return model


ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


def save_adapters(model, folder):
    """Write adapter.safetensors and adapter_config.json into `folder`, each atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    with atomic_path(os.path.join(folder, ADAPTER_FILE)) as tmp:
        save_file(tensors, tmp)
    write_json(os.path.join(folder, CONFIG_FILE), adapter_config(model))


def load_adapters(model, folder):
    """Load what save_adapters wrote onto `model` (injecting the adapters if it has none); returns the model."""
    with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as f:
        config = json.load(f)
    state = load_file(os.path.join(folder, ADAPTER_FILE), device=str(next(model.parameters()).device))
    return load_adapter_state_dict(model, state, config)
