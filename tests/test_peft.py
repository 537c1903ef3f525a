"""Cross-checks against the reference library, PEFT (skipped when peft is not installed).

For random shapes and non-zero adapter tensors (float64): our LoRA equals PEFT's LoRA and our DoRA equals
PEFT's DoRA (outputs, gradients w.r.t. the input and every adapter tensor, merged weights), and D2-LoRA's
degenerate cases (docs/DESIGN.md, invariant 6) equal PEFT LoRA of rank 2r and PEFT DoRA with a frozen magnitude.
"""

import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

peft = pytest.importorskip("peft", reason="peft is not installed: pip install -e '.[peft]' to run the cross-checks")
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402

from d2lora_min.nn import D2LoRALinear, DoRALinear, LoRALinear  # noqa: E402

from .helpers import perturb_adapters  # noqa: E402

shapes = st.fixed_dictionaries(
    {"n_in": st.integers(1, 16), "n_out": st.integers(1, 16), "r": st.integers(1, 4),
     "alpha": st.sampled_from([1.0, 2.0, 8.0]), "bias": st.booleans(), "seed": st.integers(0, 999)}
)  # fmt: skip


class One(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.lin = base

    def forward(self, x):
        return self.lin(x)


def make_base(c):
    torch.manual_seed(c["seed"])
    base = nn.Linear(c["n_in"], c["n_out"], bias=c["bias"]).double()
    if c["bias"]:
        nn.init.normal_(base.bias)
    return base


def peft_layer(base, r, alpha, use_dora, dropout=0.0):
    """PEFT's layer around a copy of `base` -> (module, its lora layer)."""
    model = One(nn.Linear(base.in_features, base.out_features, bias=base.bias is not None).double())
    model.lin.load_state_dict(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=dropout, use_dora=use_dora), model)
    return model, model.lin


def set_peft(layer, A, B, magnitude=None):
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        if magnitude is not None:
            layer.lora_magnitude_vector["default"].weight.copy_(magnitude)


def peft_merged_weight(layer):
    with torch.no_grad():
        layer.merge()
    return layer.base_layer.weight.detach().clone()


def run(module, x, G, tensors):
    """Output and gradients (w.r.t. x and `tensors`) of L = sum(module(x) * G)."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    return y.detach(), torch.autograd.grad((y * G).sum(), [x] + tensors)


def inputs(c):
    g = torch.Generator().manual_seed(c["seed"] + 1)
    x = torch.randn(3, 4, c["n_in"], generator=g, dtype=torch.float64)
    return x, torch.randn(3, 4, c["n_out"], generator=g, dtype=torch.float64)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def assert_same_layer(ours, y1, grads1, theirs, y2, grads2):
    """Same output, same gradients (tensor by tensor) and same merged weight."""
    close(y1, y2)
    for a, b in zip(grads1, grads2, strict=True):
        close(a, b)
    close(ours.merged_weight().detach(), peft_merged_weight(theirs))


@settings(max_examples=20)
@given(shapes)
def test_lora_equals_peft_lora(c):
    base = make_base(c)
    ours = LoRALinear(base, r=c["r"], alpha=c["alpha"])
    perturb_adapters(ours, c["seed"])
    _, theirs = peft_layer(base, c["r"], c["alpha"], use_dora=False)
    set_peft(theirs, ours.lora_A, ours.lora_B)
    x, G = inputs(c)
    y1, g1 = run(ours, x, G, [ours.lora_A, ours.lora_B])
    y2, g2 = run(theirs, x, G, [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight])
    assert_same_layer(ours, y1, g1, theirs, y2, g2)


@settings(max_examples=20)
@given(shapes)
def test_dora_equals_peft_dora(c):
    base = make_base(c)
    ours = DoRALinear(base, r=c["r"], alpha=c["alpha"])
    perturb_adapters(ours, c["seed"])
    _, theirs = peft_layer(base, c["r"], c["alpha"], use_dora=True)
    set_peft(theirs, ours.lora_A, ours.lora_B, ours.magnitude)
    x, G = inputs(c)
    y1, g1 = run(ours, x, G, [ours.lora_A, ours.lora_B, ours.magnitude])
    mag = theirs.lora_magnitude_vector["default"].weight
    y2, g2 = run(theirs, x, G, [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight, mag])
    assert_same_layer(ours, y1, g1, theirs, y2, g2)


@settings(max_examples=20)
@given(shapes, st.floats(-1.5, 1.5))
def test_d2lora_without_projection_equals_peft_lora_of_rank_2r(c, tau):
    base = make_base(c)
    d2 = D2LoRALinear(base, r=c["r"], alpha=c["alpha"], project=False, tau_init=tau)
    perturb_adapters(d2, c["seed"])
    # PEFT LoRA(2r) with alpha' = 2 alpha keeps the scaling alpha / r; factors stacked as in docs/DESIGN.md, invariant 6
    _, theirs = peft_layer(base, 2 * c["r"], 2 * c["alpha"], use_dora=False)
    A = torch.cat([d2.lora_A_pos, d2.lora_A_neg], dim=0)  # (2r, in)
    B = torch.cat([d2.lora_B_pos, -d2.tau * d2.lora_B_neg], dim=1)  # (out, 2r)
    set_peft(theirs, A, B)
    x, G = inputs(c)
    y1, (gx1, gAp, gAn, gBp, gBn) = run(d2, x, G, [d2.lora_A_pos, d2.lora_A_neg, d2.lora_B_pos, d2.lora_B_neg])
    y2, (gx2, gA, gB) = run(theirs, x, G, [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight])
    close(y1, y2)
    close(gx1, gx2)
    r = c["r"]
    close(torch.cat([gAp, gAn]), gA)  # dL/dA_cat = [dL/dA_pos; dL/dA_neg]
    close(gBp, gB[:, :r])
    close(gBn, -d2.tau.detach() * gB[:, r:])  # B_cat[:, r:] = -tau * B_neg
    close(d2.merged_weight().detach(), peft_merged_weight(theirs))


@settings(max_examples=20)
@given(shapes)
def test_d2lora_with_tau_zero_equals_peft_dora_with_frozen_magnitude(c):
    base = make_base(c)
    d2 = D2LoRALinear(base, r=c["r"], alpha=c["alpha"], tau_init=0.0, learn_tau=False, detach_norm=True)
    perturb_adapters(d2, c["seed"])
    _, theirs = peft_layer(base, c["r"], c["alpha"], use_dora=True)  # magnitude starts at norm(W0)
    set_peft(theirs, d2.lora_A_pos, d2.lora_B_pos)
    theirs.lora_magnitude_vector["default"].weight.requires_grad_(False)
    x, G = inputs(c)
    y1, g1 = run(d2, x, G, [d2.lora_A_pos, d2.lora_B_pos])
    y2, g2 = run(theirs, x, G, [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight])
    assert_same_layer(d2, y1, g1, theirs, y2, g2)


@settings(max_examples=10)
@given(shapes, st.sampled_from([0.1, 0.5]))
def test_dora_with_dropout_equals_peft_dora_in_eval_mode(c, p):
    # in training mode the two place dropout differently (docs/PORTING.md, section 4); in eval mode they agree
    base = make_base(c)
    ours = DoRALinear(base, r=c["r"], alpha=c["alpha"], dropout=p)
    perturb_adapters(ours, c["seed"])
    model, theirs = peft_layer(base, c["r"], c["alpha"], use_dora=True, dropout=p)
    set_peft(theirs, ours.lora_A, ours.lora_B, ours.magnitude)
    ours.eval()
    model.eval()
    x, G = inputs(c)
    y1, g1 = run(ours, x, G, [ours.lora_A, ours.lora_B, ours.magnitude])
    mag = theirs.lora_magnitude_vector["default"].weight
    y2, g2 = run(theirs, x, G, [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight, mag])
    assert_same_layer(ours, y1, g1, theirs, y2, g2)
