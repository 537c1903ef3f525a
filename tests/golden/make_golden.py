"""Regenerate the golden vectors for porters: `make golden` (python -m tests.golden.make_golden).

Each case is <name>.safetensors (float64 tensors, readable with safetensors.numpy / JAX / Rust) plus
<name>.json (method, r, alpha, options, shapes, and which tensors are trainable). Tensors:

  W0 (out, in), bias (out,), x (batch, in), grad_output (batch, out)       the inputs
  <adapter tensor names>                                                   e.g. lora_A, lora_B, magnitude, tau
  y (batch, out)                                                           the layer's output
  merged_weight (out, in)                                                  what merge() produces
  grad.x, grad.<trainable name>                                            gradients of L = sum(y * grad_output)

The values come from the torch layers in float64 and are checked against d2lora_min.reference before writing.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from d2lora_min import reference as ref
from d2lora_min.nn import METHODS

FOLDER = Path(__file__).parent
IN, OUT, R, ALPHA, BATCH = 5, 4, 2, 3.0, 3

# name -> (method, options, zero_row): one case per option that changes the math or the gradients
CASES = {
    "lora": ("lora", {}, False),
    "dora": ("dora", {}, False),  # detach_norm=True, the default
    "dora_attached_norm": ("dora", {"detach_norm": False}, False),
    "d2lora": ("d2lora", {}, False),  # project, learned tau, gradient through the norm
    "d2lora_no_projection": ("d2lora", {"project": False}, False),
    "d2lora_fixed_tau": ("d2lora", {"learn_tau": False, "tau_init": 0.3}, False),
    "d2lora_detached_norm": ("d2lora", {"detach_norm": True}, False),
    "d2lora_zero_row": ("d2lora", {}, True),  # W0 has a zero row: the eps guard
}


def build_case(method, options, zero_row, seed):
    """A float64 layer with random non-zero adapter tensors, an input and an upstream gradient."""
    torch.manual_seed(seed)  # lora_A's initialisation uses the global generator
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN, OUT).double()
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=g, dtype=torch.float64))
        base.bias.copy_(torch.randn(OUT, generator=g, dtype=torch.float64))
        if zero_row:
            base.weight[1] = 0.0
    layer = METHODS[method](base, r=R, alpha=ALPHA, **options)
    with torch.no_grad():
        for _, p in layer.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(BATCH, IN, generator=g, dtype=torch.float64)
    grad_output = torch.randn(BATCH, OUT, generator=g, dtype=torch.float64)
    return layer, x, grad_output


def outputs(layer, x, grad_output):
    """{tensor name: value} of everything a golden file records, computed by the torch layer."""
    x = x.clone().requires_grad_(True)
    y = layer(x)
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad((y * grad_output).sum(), [x] + list(trainable.values()))
    tensors = {
        "W0": layer.base.weight, "bias": layer.base.bias, "x": x, "grad_output": grad_output, "y": y,
        "merged_weight": layer.merged_weight(), "grad.x": grads[0],
    }  # fmt: skip
    tensors.update({n: t for n, t in layer.state_dict().items() if not n.startswith("base.") and n != "target_norm"})
    tensors.update({f"grad.{n}": gr for n, gr in zip(trainable, grads[1:])})
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}, list(trainable)


def check_against_reference(method, options, t):
    n = {k: v.numpy() for k, v in t.items()}
    params = {k: n[k] for k in ("lora_A", "lora_B", "magnitude", "lora_A_pos", "lora_B_pos", "lora_A_neg", "lora_B_neg", "tau") if k in n}
    project = options.get("project", True)
    np.testing.assert_allclose(ref.forward(method, n["x"], n["W0"], n["bias"], params, ALPHA, project=project), n["y"], atol=1e-12)
    np.testing.assert_allclose(ref.merged_weight(method, n["W0"], params, ALPHA, project=project), n["merged_weight"], atol=1e-12)
    grads = ref.gradients(method, n["x"], n["W0"], n["bias"], params, ALPHA, n["grad_output"], project=project,
                          detach_norm=options.get("detach_norm"))  # fmt: skip
    for k, v in n.items():
        if k.startswith("grad.") and k != "grad_output":
            np.testing.assert_allclose(grads[k[5:]], v, atol=1e-11, err_msg=k)


def main():
    for i, (name, (method, options, zero_row)) in enumerate(CASES.items()):
        layer, x, grad_output = build_case(method, options, zero_row, seed=1000 + i)
        tensors, trainable = outputs(layer, x, grad_output)
        check_against_reference(method, options, tensors)
        save_file(tensors, FOLDER / f"{name}.safetensors")
        meta = {
            "method": method, "r": R, "alpha": ALPHA, "scaling": ALPHA / R, "options": layer.options(),
            "trainable": trainable, "loss": "L = sum(y * grad_output)", "dtype": "float64",
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
        }  # fmt: skip
        (FOLDER / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
