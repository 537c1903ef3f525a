"""Adapter files: only the adapter tensors and a small config, in one safetensors file.

    save_adapters(model, "runs/my_adapter")   # runs/my_adapter/adapter.safetensors
    load_adapters(base_model, "runs/my_adapter")

The config says what it takes to rebuild the adapters (format, method, r, alpha, dropout, every option, each target's
[out, in] and the SHA-256 of each target's base weight). Loading refuses, before the model is changed, anything that
does not fit it exactly; the file format and its checks are in d2lora_min/files/adapter_file.py.
"""

import os

import torch
import torch.nn as nn
from torch.nn.utils import skip_init

from ..files import adapter_file
from ..files.adapter_file import ADAPTER_FILE, FORMAT, base_sha256, read_adapter_file
from .inject import CONV1D_HINT, adapter_layers, check_options, inject_adapters_at
from .registry import get_method, method_name


def adapter_config(model):
    """What it takes to rebuild the adapters: method, r, alpha, dropout, options, each target's [out, in] and the
    SHA-256 of each target's base weight."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters")
    configs = [
        {
            "method": method_name(layer),
            "r": layer.r,
            "alpha": layer.alpha,
            "dropout": layer.dropout,
            "options": layer.options(),
        }
        for _, layer in layers
    ]
    if any(c != configs[0] for c in configs):
        raise ValueError("adapter layers differ in method or hyper-parameters; one config cannot describe them")
    return {
        "format": FORMAT,
        **configs[0],
        "targets": {name: [layer.out_features, layer.in_features] for name, layer in layers},
        "base_sha256": {name: base_sha256(layer.base.weight) for name, layer in layers},
    }


def _own_tensors(layer):
    """{name: tensor} of one adapter layer's own tensors (factors, magnitude, tau, target norms), not its base's."""
    return {key: t for key, t in layer.state_dict().items() if not key.startswith("base.")}


def adapter_state_dict(model):
    """Only the adapter tensors: {full name: tensor}, nothing of the base."""
    return {f"{name}.{key}": t for name, layer in adapter_layers(model) for key, t in _own_tensors(layer).items()}


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
    adapter_file.check_config(
        config, source, lambda method, options: check_options(method, options) or get_method(method).OPTIONS
    )
    layers = dict(adapter_layers(model))
    _check_model_fits(model, layers, config, source)
    adapter_file.check_state_dict(state_dict, config, source)
    modules = dict(model.named_modules())
    bases = {name: layers[name].base if name in layers else modules[name] for name in config["targets"]}
    want, derived = _expected_tensors(config, bases)
    adapter_file.check_tensors(state_dict, want, source)
    adapter_file.check_base(config, {name: base.weight for name, base in bases.items()}, source)
    adapter_file.check_derived(state_dict, derived, source)

    if not layers:
        inject_adapters_at(
            model,
            config["method"],
            tuple(config["targets"]),
            r=config["r"],
            alpha=config["alpha"],
            dropout=config["dropout"],
            **config["options"],
        )
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
        diffs = [
            f"{k}: adapter file {want_targets.get(k, 'absent')}, model {have_targets.get(k, 'absent')}"
            for k in sorted(set(have_targets) | set(want_targets))
            if have_targets.get(k) != want_targets.get(k)
        ]
        raise ValueError(f"{source} is for other targets or shapes ([out, in]): " + "; ".join(diffs))
    if layers:
        have = adapter_config(model)
        for key in ("method", "r", "alpha", "dropout", "options"):
            if have[key] != config[key]:
                raise ValueError(f"{source} has {key}={config[key]!r}, the model's adapters have {have[key]!r}")


def save_adapters(model, folder):
    """Write folder/adapter.safetensors (tensors, config and their checksum in its metadata) atomically; returns its path."""
    return adapter_file.write_adapter_file(
        os.path.join(folder, ADAPTER_FILE), adapter_state_dict(model), adapter_config(model)
    )


def load_adapters(model, folder):
    """Load what save_adapters wrote onto `model` (injecting the adapters if it has none); returns the model."""
    path = os.path.join(folder, ADAPTER_FILE)
    tensors, config = read_adapter_file(path)
    weight = next(iter(model.parameters()), None)
    if weight is None:
        raise ValueError(f"{path}: the model has no parameters, so none of the adapter's targets")
    return load_adapter_state_dict(model, {k: v.to(weight.device) for k, v in tensors.items()}, config, source=path)
