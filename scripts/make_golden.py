"""Regenerate the golden vectors for porters: `make golden` (python -m scripts.make_golden).

Each case is <name>.safetensors (the tensors, float64 or float32, readable with safetensors.numpy / JAX / Rust)
plus <name>.json (its description: method, every option, shapes, mode, tolerance, what it tests; the schema is in
docs/PORTING.md, section 10). Tensors:

  W0 (out, in), bias (out,) when the case has one, x (..., in), grad_output (..., out)      the inputs
  dropout_mask (..., in), 1 = kept, in training-mode cases (dropout > 0, mode "train")
  <adapter tensor names>                                                   e.g. lora_A, lora_B, magnitude, tau
  y (..., out)                                                             the layer's output (in the case's mode)
  merged_weight (out, in)                                                  what merge() produces (eval-mode W)
  grad.x, grad.<trainable name>                                            gradients of L = sum(y * grad_output)

The values come from the torch layers (the plain path, the default; float32 and bfloat16 cases hold exactly what the
layer produces in that dtype) and are checked against d2lora_min.reference (NumPy, written separately from the torch
code) before anything is written; tests/nn/test_peft.py checks the same layers against PEFT.

adapter_file/ holds a reference adapter file (what save_adapters writes: tensors, config, checksum) and the base
weights it belongs to, so that a port can check its reading of the file, its checksum and its base_sha256.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from d2lora_min import reference as ref
from d2lora_min.nn import METHODS, inject_adapters, save_adapters
from d2lora_min.files.adapter_file import ADAPTER_FILE, CHECKSUM_KEY

FOLDER = Path(__file__).resolve().parents[1] / "tests" / "golden"  # where the golden files live
# The basic layer is SQUARE (out == in): a port that takes the norm over the wrong axis gets no shape error there,
# only wrong numbers (tests/nn/test_golden.py checks that it fails). r = 2 divides neither side.
BASIC = dict(
    out_features=5, in_features=5, r=2, alpha=3.0, batch=(3,), bias=True, dtype="float64", dropout=0.0, mode="eval"
)
RECT_3D = dict(out_features=7, in_features=5, r=3, bias=False, batch=(2, 3))  # r = 3 divides neither 7 nor 5
EXACT = {"readd_delta": False}  # D2-LoRA's exact-norm form, W = P(V)

# name -> (method, options, shape and input settings, special row, what the case tests)
# Special rows (all on row 1): "zero_w0_row": W0's row is 0, its B rows are not (V's row is dW's);
# "zero_v_row": W0's row and every B row are 0, so V's row is exactly 0 (the eps guard), and DoRA's magnitude is 0
# there too, as at initialisation; "zero_v_row_magnitude": the same with a non-zero DoRA magnitude (c = m / eps);
# "tiny_v_row": W0's row has norm 1e-13 and every B row is 0, so 0 < norm(V_i) < eps (the k_i = 0 rule).
CASES = {
    "lora": ("lora", {}, {}, None, "LoRA: forward, merge, gradients (square layer)"),
    "lora_dropout": (
        "lora",
        {},
        dict(dropout=0.25, mode="train", batch=(6,)),
        None,
        "LoRA, dropout in training mode: only the low-rank branch sees the mask",
    ),
    "lora_rect_nobias_3d": ("lora", {}, RECT_3D, None, "LoRA, out != in, r dividing neither, no bias, 3-D x"),
    "lora_float32": ("lora", {}, dict(dtype="float32"), None, "LoRA in float32"),
    "dora": ("dora", {}, {}, None, "DoRA, detached norm (its default), square: the row-norm axis"),
    "dora_attached_norm": (
        "dora",
        {"detach_norm": False},
        {},
        None,
        "DoRA with the norm attached (gradient through norm(V))",
    ),
    "dora_dropout": (
        "dora",
        {},
        dict(dropout=0.25, mode="train", batch=(6,)),
        None,
        "DoRA, dropout in training mode: only the low-rank branch sees the mask",
    ),
    "dora_rect_nobias_3d": (
        "dora",
        {},
        dict(out_features=3, in_features=7, r=2, bias=False, batch=(4, 2)),
        None,
        "DoRA, out != in, r dividing neither, no bias, 3-D x",
    ),
    "dora_eps": ("dora", {}, {}, "zero_v_row", "DoRA, a row of V exactly 0 with magnitude 0: the eps guard (c = 0)"),
    "dora_eps_magnitude": (
        "dora",
        {},
        {},
        "zero_v_row_magnitude",
        "DoRA, a row of V exactly 0 with magnitude != 0: c = m / eps (-3e11 here) times a zero row, "
        "finite; grad.lora_B's row is of that size (2e12)",
    ),
    "dora_attached_eps": (
        "dora",
        {"detach_norm": False},
        {},
        "zero_v_row_magnitude",
        "DoRA with the norm attached and a row of V exactly 0 (magnitude != 0): k_i = 0 below eps",
    ),
    "dora_float32": ("dora", {}, dict(dtype="float32", out_features=6, in_features=4, r=3), None, "DoRA in float32"),
    "d2lora": (
        "d2lora",
        {},
        {},
        None,
        "D2-LoRA default: the paper's form W = P(V) + dW, fixed tau, attached norm (square)",
    ),
    "d2lora_exact_norm": ("d2lora", EXACT, {}, None, "D2-LoRA exact-norm form W = P(V) (readd_delta=False), square"),
    "d2lora_no_projection": (
        "d2lora",
        {"project": False},
        {},
        None,
        "D2-LoRA without projection: W = V, a LoRA of rank 2r",
    ),
    "d2lora_learned_tau": ("d2lora", {"learn_tau": True}, {}, None, "D2-LoRA with a learned tau: grad.tau"),
    "d2lora_detached_norm": (
        "d2lora",
        {"detach_norm": True},
        {},
        None,
        "D2-LoRA (paper's form) with the norm detached",
    ),
    "d2lora_tau_init": (
        "d2lora",
        {"tau_init": 0.3},
        {},
        None,
        "D2-LoRA with tau = 0.3 (fixed): tau is the stored tensor",
    ),
    "d2lora_zero_row": (
        "d2lora",
        {},
        {},
        "zero_w0_row",
        "D2-LoRA paper form, a zero row of W0 with non-zero B rows: t = 0, merged row = dW's row",
    ),
    "d2lora_exact_zero_row": (
        "d2lora",
        EXACT,
        {},
        "zero_w0_row",
        "D2-LoRA exact-norm form, a zero row of W0 with non-zero B rows: merged row = 0",
    ),
    "d2lora_eps": ("d2lora", {}, {}, "zero_v_row", "D2-LoRA paper form, a row of V exactly 0: the eps guard"),
    "d2lora_exact_eps": (
        "d2lora",
        EXACT,
        {},
        "zero_v_row",
        "D2-LoRA exact-norm form, a row of V exactly 0: the eps guard",
    ),
    "d2lora_below_eps": (
        "d2lora",
        {},
        {},
        "tiny_v_row",
        "D2-LoRA paper form, attached norm, 0 < norm(V_i) < eps: k_i = 0 in the norm's gradient",
    ),
    "d2lora_dropout": (
        "d2lora",
        {},
        dict(out_features=6, in_features=5, dropout=0.3, mode="train", batch=(2, 4)),
        None,
        "D2-LoRA paper form, dropout in training mode (3-D x): the mask reaches both uses of low",
    ),
    "d2lora_exact_dropout": (
        "d2lora",
        EXACT,
        dict(out_features=6, in_features=5, dropout=0.3, mode="train", batch=(2, 4)),
        None,
        "D2-LoRA exact-norm form, dropout in training mode (3-D x)",
    ),
    "d2lora_dropout_eval": (
        "d2lora",
        {},
        dict(dropout=0.3, mode="eval", batch=(4,)),
        None,
        "D2-LoRA, dropout 0.3 in eval mode: no mask, y = x @ merged_weight.T + b",
    ),
    "d2lora_rect_nobias_3d": ("d2lora", {}, RECT_3D, None, "D2-LoRA, out != in, r dividing neither, no bias, 3-D x"),
    "d2lora_float32": (
        "d2lora",
        {},
        dict(dtype="float32", out_features=6, in_features=4, r=3),
        None,
        "D2-LoRA (paper's form) in float32",
    ),
    "d2lora_bfloat16": (
        "d2lora",
        {},
        dict(dtype="bfloat16", out_features=6, in_features=4, r=3),
        None,
        "D2-LoRA (paper's form) in bfloat16: norms and c in float32, c rounded to bfloat16 before c * h",
    ),
}

# What a port should meet, per tensor: max |port - expected| <= tol * max(1, max |expected|). float64: a few
# rounding units over short sums. float32: the stored values are the float32 torch layer's own; a float32 port
# rounds differently (another summation order), and the float64 reference differs from them by float32 rounding.
TOLERANCE = {"float64": 1e-11, "float32": 1e-5, "bfloat16": 5e-2}
TOLERANCE_RULE = "per tensor: max |port - expected| <= tol * max(1, max |expected|)"
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
PARAM_NAMES = ("lora_A", "lora_B", "magnitude", "lora_A_pos", "lora_B_pos", "lora_A_neg", "lora_B_neg", "tau")


def settings(name):
    method, options, shape, special, _ = CASES[name]
    return method, options, {**BASIC, **shape}, special


def build_case(name, seed):
    """The layer (random non-zero adapter tensors, and the case's special row), its input and upstream gradient."""
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
        if special == "tiny_v_row":
            u = randn(c["in_features"])
            base.weight[1] = u * (1e-13 / u.norm())  # norm 1e-13 < eps, not 0
        elif special:
            base.weight[1] = 0.0
    torch.manual_seed(seed)  # the factors' initial values (Kaiming-uniform A) come from the global generator
    layer = METHODS[method](base, r=c["r"], alpha=c["alpha"], dropout=c["dropout"], **options)  # t = norm(W0) now
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if p.requires_grad:  # B from zero, the others around their initial value
                p.copy_(0.5 * randn(*p.shape) + (0 if pname.startswith("lora_B") else p))
        if special in ("zero_v_row", "zero_v_row_magnitude", "tiny_v_row"):
            for pname, p in layer.named_parameters():
                if pname.startswith("lora_B"):
                    p[1] = 0.0  # dW's row 1 is 0, so V's row 1 is W0's
        if special == "zero_v_row" and method == "dora":
            layer.magnitude[1] = 0.0
    x = randn(*c["batch"], c["in_features"])
    grad_output = randn(*c["batch"], c["out_features"])
    return layer, x, grad_output


def outputs(layer, x, grad_output, mode, mask_seed=0):
    """{tensor name: value} of everything a golden file records, computed by the torch layer in `mode`, and the
    list of trainable tensors. In training mode with dropout the mask the layer drew is recorded."""
    x = x.clone().requires_grad_(True)
    tensors = {}
    if mode == "train":
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
    with torch.no_grad():
        merged = layer.merged_weight()  # does not depend on the mode: eval-mode W, also in training-mode cases
    tensors.update(
        {
            "W0": layer.base.weight,
            "x": x,
            "grad_output": grad_output,
            "y": y,
            "merged_weight": merged,
            "grad.x": grads[0],
        }
    )
    if layer.base.bias is not None:
        tensors["bias"] = layer.base.bias
    tensors.update({n: t for n, t in layer.state_dict().items() if not n.startswith("base.") and n != "target_norm"})
    tensors.update({f"grad.{n}": gr for n, gr in zip(trainable, grads[1:])})
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}, list(trainable)


def reference_options(options):
    """The layer's options as the reference's keywords: (what changes the weight, what changes only gradients)."""
    form = {k: options[k] for k in ("project", "readd_delta") if k in options}
    train = {k: options[k] for k in ("detach_norm", "learn_tau") if k in options}
    return form, {**form, **train}


def reference_inputs(t):
    """The stored tensors as float64 arrays, and the adapter's among them as the reference's parameter dict."""
    n = {k: v.double().numpy() for k, v in t.items()}
    return n, {k: n[k] for k in PARAM_NAMES if k in n}


def check_against_reference(name, t):
    """The stored (torch) values against the NumPy reference, computed in float64 from the stored inputs."""
    method, options, c, _ = settings(name)
    n, params = reference_inputs(t)
    form, grad_options = reference_options({**METHODS[method].OPTIONS, **options})
    drop = {"mask": n["dropout_mask"], "p": c["dropout"]} if "dropout_mask" in n else {}
    tol = TOLERANCE[c["dtype"]]

    def close(got, want, what):
        assert np.all(np.isfinite(want)), f"{name}: {what} is not finite"
        scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale, err_msg=f"{name}: {what}")

    close(ref.forward(method, n["x"], n["W0"], n.get("bias"), params, c["alpha"], **form, **drop), n["y"], "y")
    close(ref.merged_weight(method, n["W0"], params, c["alpha"], **form), n["merged_weight"], "merged_weight")
    grads = ref.gradients(
        method, n["x"], n["W0"], n.get("bias"), params, c["alpha"], n["grad_output"], **grad_options, **drop
    )
    stored = {k[5:] for k in n if k.startswith("grad.")}
    assert stored == set(grads), f"{name}: stored gradients {sorted(stored)}, reference {sorted(grads)}"
    for k in stored:
        close(grads[k], n[f"grad.{k}"], f"grad.{k}")


def main():
    for i, name in enumerate(CASES):
        method, options, c, special = settings(name)
        layer, x, grad_output = build_case(name, seed=1000 + i)
        tensors, trainable = outputs(layer, x, grad_output, c["mode"])
        check_against_reference(name, tensors)
        save_file(tensors, FOLDER / f"{name}.safetensors")
        out_f, in_f = c["out_features"], c["in_features"]
        meta = {
            "method": method,
            "r": c["r"],
            "alpha": c["alpha"],
            "scaling": c["alpha"] / c["r"],
            "options": layer.options(),
            "bias": c["bias"],
            "dropout": c["dropout"],
            "mode": c["mode"],
            "trainable": trainable,
            "loss": "L = sum(y * grad_output)",
            "dtype": c["dtype"],
            "square": out_f == in_f,
            "special_row": special,
            "tests": CASES[name][4],
            "tolerance": {"tol": TOLERANCE[c["dtype"]], "rule": TOLERANCE_RULE},
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
        }
        (FOLDER / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        print(f"wrote {name}")
    write_adapter_file(FOLDER / "adapter_file")


def write_adapter_file(folder):
    """A reference adapter file: D2-LoRA (r=2, alpha=4, the paper's form) on two layers of a small float32 model, with
    non-zero tensors, and base.safetensors with the two base weights it belongs to."""
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    base = {f"{name}.weight": layer.weight.detach().clone() for name, layer in model.named_children()}
    torch.manual_seed(7)
    inject_adapters(model, "d2lora", r=2, alpha=4.0, targets=("0", "1"))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=g) + (0 if ".lora_B" in name else p))
    folder.mkdir(exist_ok=True)
    save_file(base, folder / "base.safetensors")
    # safetensors writes the two metadata entries in no fixed order: keep the file when its content (checksum) is the same
    fresh = Path(save_adapters(model, folder / "new"))
    if (folder / ADAPTER_FILE).exists() and _checksum(folder / ADAPTER_FILE) == _checksum(fresh):
        print(f"kept {folder / ADAPTER_FILE} (the same content)")
    else:
        fresh.replace(folder / ADAPTER_FILE)
        print(f"wrote {folder / ADAPTER_FILE}")
    fresh.unlink(missing_ok=True)
    (folder / "new").rmdir()


def _checksum(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()[CHECKSUM_KEY]


if __name__ == "__main__":
    main()
