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


# Hugging Face's Conv1D (GPT-2 and its relatives) computes x @ weight + bias with weight stored (in, out),
# the transpose of nn.Linear's (out, in). Every row norm and merge here assumes nn.Linear's layout.
CONV1D_HINT = (
    "; Conv1D (GPT-2's transformers.pytorch_utils.Conv1D) stores its weight as (in, out), the transpose of"
    " nn.Linear's (out, in). Convert it first: in_features, out_features = conv.weight.shape; linear ="
    " nn.Linear(in_features, out_features) with linear.weight = conv.weight.T and linear.bias = conv.bias (the"
    " same output); conv1d_to_linear(model) in examples/hf_recipe.py does this for every Conv1D of a model"
)


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


def _matches(module_name, target, exact=False):
    """A target names a module by its full name or by a suffix after a dot: "v_proj" matches "blocks.0.attn.v_proj".
    exact: by its full name only."""
    return module_name == target or (not exact and module_name.endswith("." + target))


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
    matched module must be an nn.Linear that its parent calls (a Hugging Face Conv1D is refused, with how to convert
    it). A layer registered under several names (shared) gets one adapter, under every name. Each adapter starts in
    the mode (train or eval) of the layer it replaces. Returns the model. On any error the model is left as it was.
    """
    return _inject(model, method, r, alpha, targets, dropout, options, exact=False)


def inject_adapters_at(model, method, names, r, alpha, dropout=0.0, **options):
    """inject_adapters for exactly the modules with these full names (what adapter files store): a full name used as
    a suffix could select more modules ("0" also matches "1.0")."""
    return _inject(model, method, r, alpha, names, dropout, options, exact=True)


def _inject(model, method, r, alpha, targets, dropout, options, exact):
    cls = get_method(method)
    check_options(method, options)
    targets = check_targets(targets)
    if adapter_layers(model):
        raise ValueError("model already has adapters: merge_adapters(model) first, or start from the base model")

    chosen = find_targets(model, targets, exact)
    # Build every adapter first (a bad r, alpha or option raises here); wrapping freezes each base layer,
    # so remember what was trainable and restore it if anything fails.
    trainable = {p: p.requires_grad for p in model.parameters()}
    try:
        wrapped = [
            (names, cls(m, r=r, alpha=alpha, dropout=dropout, **options).train(m.training)) for m, names in chosen
        ]
    except BaseException:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        raise
    model.requires_grad_(False)  # the base is frozen; the adapters built above are not in it yet and keep theirs
    for names, layer in wrapped:  # each adapter takes the mode (train or eval) of the layer it replaces
        for name in names:  # a shared layer stays shared: the same adapter under every name
            _replace_module(model, name, layer)
    return model


def find_targets(model, targets, exact=False):
    """The modules `targets` select (by suffix, or by full name only when exact) -> [(module, [every name it is
    registered under])], in model order; a clear error when a target matches nothing or selects something an adapter
    cannot wrap. Changes nothing."""
    targets = check_targets(targets)
    # every name a module is registered under (a module shared by two parents has two names)
    modules = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if name]
    chosen = {}  # id(module) -> (module, [every name it has]), for modules that a target matches
    for name, m in modules:
        if any(_matches(name, t, exact) for t in targets):
            chosen[id(m)] = (m, [n for n, other in modules if other is m])
    for t in targets:
        if not any(_matches(name, t, exact) for name, _ in modules):
            linears = sorted({name.rsplit(".", 1)[-1] for name, m in modules if isinstance(m, nn.Linear)})
            raise ValueError(
                f"target {t!r} matches no module; the model's nn.Linear names end in: {', '.join(linears)}"
            )
    parents = dict(modules)
    for m, names in chosen.values():
        parent_name = names[0].rpartition(".")[0]
        check_wrappable(names[0], m, parents[parent_name] if parent_name else model)
    return list(chosen.values())


def check_wrappable(name, module, parent):
    """A target must be an nn.Linear that its parent calls as a module (an adapter replaces the module; a parent
    that reads module.weight itself would bypass it)."""
    if not isinstance(module, nn.Linear):
        hint = CONV1D_HINT if type(module).__name__ == "Conv1D" else ""  # GPT-2's Conv1D, found by name (no import)
        raise TypeError(f"target module {name!r} is a {type(module).__name__}, not an nn.Linear{hint}")
    if isinstance(parent, nn.MultiheadAttention):
        raise TypeError(
            f"target module {name!r} is the out_proj of an nn.MultiheadAttention, which reads its weight "
            f"directly instead of calling it: an adapter there would be bypassed"
        )


@torch.no_grad()
def merge_adapters(model):
    """Replace every adapter layer by the plain nn.Linear it equals (in place); returns the model (given one adapter
    layer itself, returns its merge())."""
    if isinstance(model, AdapterLinear):
        return model.merge()
    names = {}  # id(adapter) -> every name it is registered under (a shared layer has several)
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, AdapterLinear):
            names.setdefault(id(m), []).append(name)
    merged = [(names[id(layer)], layer.merge()) for _, layer in adapter_layers(model)]  # all merges before any change
    for layer_names, linear in merged:
        for name in layer_names:
            _replace_module(model, name, linear)
    return model


def trainable_parameters(model):
    """Number of parameters that receive gradients (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
