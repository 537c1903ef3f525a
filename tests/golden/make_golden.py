"""Regenerate the golden vectors for porters: `make golden` (python -m tests.golden.make_golden).

Each case is <name>.safetensors (the tensors, float64 or float32, readable with safetensors.numpy / JAX / Rust)
plus <name>.json (its description; the schema is in docs/PORTING.md, section 10). Tensors:

  W0 (out, in), bias (out,) when the case has one, x (..., in), grad_output (..., out)      the inputs
  dropout_mask (..., in), 1 = kept, when the case has dropout (train mode)
  <adapter tensor names>                                                   e.g. lora_A, lora_B, magnitude, tau
  y (..., out)                                                             the layer's output
  merged_weight (out, in)                                                  what merge() produces
  grad.x, grad.<trainable name>                                            gradients of L = sum(y * grad_output)

The values come from the torch layers and are checked against d2lora_min.reference (NumPy, written separately
from the torch code) before anything is written; tests/test_peft.py checks the same layers against PEFT.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from d2lora_min import reference as ref
from d2lora_min.nn import METHODS

FOLDER = Path(__file__).parent
BASIC = dict(out_features=4, in_features=5, r=2, alpha=3.0, batch=(3,), bias=True, dtype="float64", dropout=0.0)

# name -> (method, options, shape and input settings, special rows)
CASES = {
    "lora": ("lora", {}, {}, None),
    "dora": ("dora", {}, {}, None),  # detach_norm=True, the default
    "dora_attached_norm": ("dora", {"detach_norm": False}, {}, None),
    "d2lora": ("d2lora", {}, {}, None),  # project, learned tau, gradient through the norm
    "d2lora_no_projection": ("d2lora", {"project": False}, {}, None),
    "d2lora_fixed_tau": ("d2lora", {"learn_tau": False, "tau_init": 0.3}, {}, None),
    "d2lora_detached_norm": ("d2lora", {"detach_norm": True}, {}, None),
    "d2lora_zero_row": ("d2lora", {}, {}, "zero_w0_row"),  # W0 row 1 is 0 (its B rows are not): t = 0, c = 0
    # rectangular shapes (out != in), a rank that divides neither, no bias, 3-D inputs
    "lora_rect_nobias_3d": ("lora", {}, dict(out_features=7, in_features=5, r=3, bias=False, batch=(2, 3)), None),
    "dora_rect_nobias": ("dora", {}, dict(out_features=3, in_features=7, r=2, bias=False, batch=(4,)), None),
    "d2lora_rect_nobias_3d": ("d2lora", {}, dict(out_features=7, in_features=5, r=3, bias=False, batch=(2, 3)), None),
    # dropout in training mode: the mask is stored; only the low-rank branch sees it
    "dora_dropout": ("dora", {}, dict(dropout=0.25, batch=(6,)), None),
    "d2lora_dropout": ("d2lora", {}, dict(out_features=6, in_features=5, r=2, dropout=0.3, batch=(2, 4)), None),
    # the eps guard: a row of V that is exactly zero (W0 row and every B row zero, DoRA's magnitude too)
    "d2lora_eps": ("d2lora", {}, {}, "zero_v_row"),
    "dora_eps": ("dora", {}, {}, "zero_v_row"),
    # float32 beside float64
    "lora_float32": ("lora", {}, dict(dtype="float32"), None),
    "d2lora_float32": ("d2lora", {}, dict(dtype="float32", out_features=6, in_features=4, r=3), None),
}

TOLERANCE = {"float64": 1e-11, "float32": 2e-5}  # the reference (float64) against the stored values, relative
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def settings(name):
    method, options, shape, special = CASES[name]
    return method, options, {**BASIC, **shape}, special


def build_case(name, seed):
    """The layer (random non-zero adapter tensors), its input, upstream gradient and dropout mask."""
    method, options, c, special = settings(name)
    dtype = DTYPES[c["dtype"]]
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype)

    base = nn.Linear(c["in_features"], c["out_features"], bias=c["bias"]).to(dtype)
    with torch.no_grad():
        base.weight.copy_(randn(c["out_features"], c["in_features"]))
        if c["bias"]:
            base.bias.copy_(randn(c["out_features"]))
        if special:
            base.weight[1] = 0.0
    layer = METHODS[method](base, r=c["r"], alpha=c["alpha"], dropout=c["dropout"], **options)
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if p.requires_grad:
                p.copy_(0.5 * randn(*p.shape) + (0 if pname.startswith("lora_B") else p))
        if special == "zero_v_row":
            for pname, p in layer.named_parameters():
                if pname.startswith("lora_B"):
                    p[1] = 0.0
            if method == "dora":
                layer.magnitude[1] = 0.0
    x = randn(*c["batch"], c["in_features"])
    grad_output = randn(*c["batch"], c["out_features"])
    return layer, x, grad_output


def outputs(layer, x, grad_output, mask_seed=0):
    """{tensor name: value} of everything a golden file records, computed by the torch layer, and the list of
    trainable tensors. With dropout the layer runs in training mode and the mask it drew is recorded."""
    x = x.clone().requires_grad_(True)
    tensors = {}
    if layer.dropout > 0:
        layer.train()
        torch.manual_seed(mask_seed)
        y = layer(x)
        torch.manual_seed(mask_seed)  # the same draw again: dropout is the layer's only use of the generator
        tensors["dropout_mask"] = (F.dropout(torch.ones_like(x), layer.dropout) != 0).to(x.dtype)
    else:
        layer.eval()
        y = layer(x)
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad((y * grad_output).sum(), [x] + list(trainable.values()))
    tensors.update({"W0": layer.base.weight, "x": x, "grad_output": grad_output, "y": y, "merged_weight": layer.merged_weight(), "grad.x": grads[0]})
    if layer.base.bias is not None:
        tensors["bias"] = layer.base.bias
    tensors.update({n: t for n, t in layer.state_dict().items() if not n.startswith("base.") and n != "target_norm"})
    tensors.update({f"grad.{n}": gr for n, gr in zip(trainable, grads[1:])})
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}, list(trainable)


def check_against_reference(name, t):
    """The stored (torch) values against the NumPy reference, computed in float64 from the stored inputs."""
    method, options, c, _ = settings(name)
    n = {k: v.double().numpy() for k, v in t.items()}
    params = {k: n[k] for k in ("lora_A", "lora_B", "magnitude", "lora_A_pos", "lora_B_pos", "lora_A_neg", "lora_B_neg", "tau") if k in n}
    project = options.get("project", True)
    drop = {"mask": n["dropout_mask"], "p": c["dropout"]} if "dropout_mask" in n else {}
    tol = TOLERANCE[c["dtype"]]

    def close(got, want, what):
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale, err_msg=f"{name}: {what}")

    close(ref.forward(method, n["x"], n["W0"], n.get("bias"), params, c["alpha"], project=project, **drop), n["y"], "y")
    close(ref.merged_weight(method, n["W0"], params, c["alpha"], project=project), n["merged_weight"], "merged_weight")
    grads = ref.gradients(method, n["x"], n["W0"], n.get("bias"), params, c["alpha"], n["grad_output"], project=project,
                          detach_norm=options.get("detach_norm"), **drop)  # fmt: skip
    for k, v in n.items():
        if k.startswith("grad.") and k != "grad_output":
            close(grads[k[5:]], v, k)


def main():
    for i, name in enumerate(CASES):
        method, options, c, _ = settings(name)
        layer, x, grad_output = build_case(name, seed=1000 + i)
        tensors, trainable = outputs(layer, x, grad_output)
        check_against_reference(name, tensors)
        save_file(tensors, FOLDER / f"{name}.safetensors")
        meta = {
            "method": method, "r": c["r"], "alpha": c["alpha"], "scaling": c["alpha"] / c["r"], "options": layer.options(),
            "bias": c["bias"], "dropout": c["dropout"], "mode": "train" if c["dropout"] > 0 else "eval",
            "trainable": trainable, "loss": "L = sum(y * grad_output)", "dtype": c["dtype"],
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
        }  # fmt: skip
        (FOLDER / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
