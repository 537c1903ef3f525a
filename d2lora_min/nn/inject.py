"""Putting adapters into any model built from nn.Linear, and merging them out again.

    model = inject_adapters(model, "d2lora", r=4, alpha=8, targets=("q_proj", "v_proj"))
    ...train...
    model = merge_adapters(model)             # plain nn.Linear everywhere again

Every check runs before the model is touched: a call that raises leaves the model as it was.
"""

import torch
import torch.nn as nn

from .base import AdapterLinear
from .registry import get_method

# Every linear of a tiny_gpt block: attention q, k, v, o and the MLP's two layers.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")


def check_options(method, options):
    """Raise if `options` holds a keyword that `method` does not take."""
    valid = get_method(method).OPTIONS
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{k} (default {v})" for k, v in valid.items()) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {method!r}; valid options: {listed}")


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


def check_targets(targets):
    """A non-empty tuple of distinct, non-empty module-name strings (a single string is one target)."""
    targets = (targets,) if isinstance(targets, str) else targets
    if not isinstance(targets, (tuple, list)) or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"targets must be module-name strings, e.g. ('q_proj', 'v_proj'); got {targets!r}")
    if not targets:
        raise ValueError("targets is empty: name at least one module suffix, e.g. ('q_proj', 'v_proj')")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets has duplicates: {list(targets)}")
    return tuple(targets)


def inject_adapters(model, method, r=4, alpha=8.0, targets=DEFAULT_TARGETS, dropout=0.0, **options):
    """Freeze every parameter of `model` and wrap each targeted nn.Linear in the `method`'s adapter (in place).

    targets: module-name suffixes (or full names). Every target must match at least one module, and every
    matched module must be an nn.Linear. Returns the model. On any error the model is left as it was.
    """
    cls = get_method(method)
    check_options(method, options)
    targets = check_targets(targets)
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

    # Build every adapter first (a bad r, alpha or option raises here); wrapping freezes each base layer,
    # so remember what was trainable and restore it if anything fails.
    trainable = {p: p.requires_grad for p in model.parameters()}
    try:
        wrapped = [(name, cls(m, r=r, alpha=alpha, dropout=dropout, **options)) for name, m in chosen]
    except BaseException:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        raise
    model.requires_grad_(False)  # the base is frozen; the adapters built above are not in it yet and keep theirs
    for name, layer in wrapped:
        _replace_module(model, name, layer)
    return model


@torch.no_grad()
def merge_adapters(model):
    """Replace every adapter layer by the plain nn.Linear it equals (in place); returns the model."""
    if isinstance(model, AdapterLinear):
        return model.merge()
    merged = [(name, layer.merge()) for name, layer in adapter_layers(model)]  # all merges before any change
    for name, linear in merged:
        _replace_module(model, name, linear)
    return model


def trainable_parameters(model):
    """Number of parameters that receive gradients (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
