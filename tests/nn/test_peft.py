"""Cross-checks against the reference library, PEFT (skipped when peft is not installed).

For random shapes and non-zero adapter tensors (float64): our LoRA equals PEFT's LoRA and our DoRA equals
PEFT's DoRA (outputs, gradients w.r.t. the input and every adapter tensor, merged weights). PEFT has no D2-LoRA;
with its stacked factors A = [A_pos; A_neg] (2r, in), B = [B_pos, -tau * B_neg] (out, 2r) and alpha' = 2 alpha
(so that PEFT's scaling alpha' / 2r is D2-LoRA's alpha / r), these identities hold, each tested below:
  - project=False                                   == PEFT LoRA(2r)                      (any tau, either readd_delta)
  - exact-norm form (readd_delta=False), tau = 0,
    detach_norm=True                                == PEFT DoRA(r), magnitude frozen at norm(W0), alpha itself
  - exact-norm form, detach_norm=True               == PEFT DoRA(2r), magnitude frozen at norm(W0)     (any tau;
                                                       outputs also with the norm attached)
  - the paper's form (the default)                  == PEFT DoRA(2r) + PEFT LoRA(2r) - the base layer   (any tau;
                                                       outputs always, gradients with detach_norm=True)
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

from ..helpers import perturb_adapters  # noqa: E402

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
        model = inject_adapter_in_model(
            LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=dropout, use_dora=use_dora), model
        )
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


def stacked(d2):
    """D2-LoRA's two branches as one rank-2r pair: A = [A_pos; A_neg] (2r, in), B = [B_pos, -tau * B_neg] (out, 2r)."""
    with torch.no_grad():
        return torch.cat([d2.lora_A_pos, d2.lora_A_neg], dim=0), torch.cat(
            [d2.lora_B_pos, -d2.tau * d2.lora_B_neg], dim=1
        )


def peft_rank_2r(base, d2, use_dora):
    """PEFT LoRA or DoRA of rank 2r holding D2-LoRA's stacked factors, with alpha' = 2 alpha (so that its scaling
    alpha' / 2r is D2-LoRA's alpha / r); DoRA's magnitude frozen at norm(W0), where PEFT starts it."""
    model, theirs = peft_layer(base, 2 * d2.r, 2 * d2.alpha, use_dora=use_dora)
    set_peft(theirs, *stacked(d2))
    if use_dora:
        theirs.lora_magnitude_vector["default"].weight.requires_grad_(False)
    return model, theirs


def peft_factors(theirs):
    return [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight]


def d2_factors(d2):
    return [d2.lora_A_pos, d2.lora_A_neg, d2.lora_B_pos, d2.lora_B_neg]


def assert_branch_gradients(d2, g_d2, g_stacked):
    """D2-LoRA's (dA_pos, dA_neg, dB_pos, dB_neg) against the stacked pair's (dA, dB), B_stacked = [B_pos, -tau * B_neg]."""
    gAp, gAn, gBp, gBn = g_d2
    gA, gB = g_stacked
    r = d2.r
    close(torch.cat([gAp, gAn]), gA)  # dL/dA_stacked = [dL/dA_pos; dL/dA_neg]
    close(gBp, gB[:, :r])
    close(gBn, -d2.tau.detach() * gB[:, r:])


@settings(max_examples=20)
@given(shapes, st.floats(-1.5, 1.5), st.booleans())
def test_d2lora_without_projection_equals_peft_lora_of_rank_2r(c, tau, readd_delta):
    """project=False: y = x @ (W0 + dW).T + b, dW = s * B @ A with the stacked pair, which is PEFT LoRA(2r) with those
    factors and alpha' = 2 alpha (same scaling alpha / r): outputs, dL/dx, the branch gradients from the stacked
    ones, merged weights; for any tau, and readd_delta changes nothing without the projection."""
    base = make_base(c)
    d2 = D2LoRALinear(base, r=c["r"], alpha=c["alpha"], project=False, readd_delta=readd_delta, tau_init=tau)
    perturb_adapters(d2, c["seed"])
    _, theirs = peft_rank_2r(base, d2, use_dora=False)
    x, G = inputs(c)
    y1, (gx1, *g_d2) = run(d2, x, G, d2_factors(d2))
    y2, (gx2, *g_lora) = run(theirs, x, G, peft_factors(theirs))
    close(y1, y2)
    close(gx1, gx2)
    assert_branch_gradients(d2, g_d2, g_lora)
    close(d2.merged_weight().detach(), peft_merged_weight(theirs))


@settings(max_examples=20)
@given(shapes)
def test_d2lora_exact_norm_form_with_tau_zero_equals_peft_dora_with_frozen_magnitude(c):
    """The exact-norm form W = P(V) (readd_delta=False) with tau = 0 and detach_norm=True is PEFT DoRA(r) with the
    positive branch's factors, the same alpha and the magnitude frozen at norm(W0): outputs, dL/dx, dL/dA_pos,
    dL/dB_pos and merged weights."""
    base = make_base(c)
    d2 = D2LoRALinear(base, r=c["r"], alpha=c["alpha"], tau_init=0.0, readd_delta=False, detach_norm=True)
    perturb_adapters(d2, c["seed"])
    _, theirs = peft_layer(base, c["r"], c["alpha"], use_dora=True)  # magnitude starts at norm(W0)
    set_peft(theirs, d2.lora_A_pos, d2.lora_B_pos)
    theirs.lora_magnitude_vector["default"].weight.requires_grad_(False)
    x, G = inputs(c)
    y1, g1 = run(d2, x, G, [d2.lora_A_pos, d2.lora_B_pos])
    y2, g2 = run(theirs, x, G, peft_factors(theirs))
    assert_same_layer(d2, y1, g1, theirs, y2, g2)


@settings(max_examples=20)
@given(shapes, st.floats(-1.5, 1.5), st.booleans())
def test_d2lora_exact_norm_form_with_detached_norm_equals_peft_dora_of_rank_2r(c, tau, detach_norm):
    """The exact-norm form W = P(V) (readd_delta=False) with detach_norm=True is PEFT DoRA(2r) with the stacked
    factors, alpha' = 2 alpha and the magnitude frozen at norm(W0), for any tau: outputs, dL/dx, the branch gradients
    from the stacked ones, merged weights. With the norm attached (D2-LoRA's default) the outputs and merged weights
    still agree, the gradients do not: PEFT's DoRA always detaches."""
    base = make_base(c)
    d2 = D2LoRALinear(base, r=c["r"], alpha=c["alpha"], tau_init=tau, readd_delta=False, detach_norm=detach_norm)
    perturb_adapters(d2, c["seed"])
    _, theirs = peft_rank_2r(base, d2, use_dora=True)
    x, G = inputs(c)
    y1, (gx1, *g_d2) = run(d2, x, G, d2_factors(d2))
    y2, (gx2, *g_dora) = run(theirs, x, G, peft_factors(theirs))
    close(y1, y2)
    close(d2.merged_weight().detach(), peft_merged_weight(theirs))
    if detach_norm:
        close(gx1, gx2)
        assert_branch_gradients(d2, g_d2, g_dora)


@settings(max_examples=20)
@given(shapes, st.floats(-1.5, 1.5), st.booleans())
def test_d2lora_paper_form_is_peft_dora_2r_plus_peft_lora_2r_minus_the_base(c, tau, detach_norm):
    """The paper's form W = P(V) + dW (the default) applies y = c * (x @ V.T) + x @ dW.T + b, which is

        y_paper = y_dora2r + y_lora2r - y_base

    with PEFT DoRA(2r) (magnitude frozen at norm(W0)) and PEFT LoRA(2r), both holding the stacked factors with
    alpha' = 2 alpha, and y_base = x @ W0.T + b; likewise W_paper = W_dora2r + W_lora2r - W0, for any tau and either
    detach_norm. With detach_norm=True (PEFT's DoRA detaches) the gradients add up too: the branch gradients are
    those of the stacked pair dL/dA = dA_dora2r + dA_lora2r, dL/dB = dB_dora2r + dB_lora2r, and
    dL/dx = dx_dora2r + dx_lora2r - G @ W0."""
    base = make_base(c)
    d2 = D2LoRALinear(base, r=c["r"], alpha=c["alpha"], tau_init=tau, detach_norm=detach_norm)  # readd_delta=True
    perturb_adapters(d2, c["seed"])
    _, dora = peft_rank_2r(base, d2, use_dora=True)
    _, lora = peft_rank_2r(base, d2, use_dora=False)
    x, G = inputs(c)
    y1, (gx1, *g_d2) = run(d2, x, G, d2_factors(d2))
    y_dora, (gx_dora, *g_dora) = run(dora, x, G, peft_factors(dora))
    y_lora, (gx_lora, *g_lora) = run(lora, x, G, peft_factors(lora))
    with torch.no_grad():
        y_base, W0 = base(x), base.weight
    close(y1, y_dora + y_lora - y_base)
    close(d2.merged_weight().detach(), peft_merged_weight(dora) + peft_merged_weight(lora) - W0)
    if detach_norm:
        close(gx1, gx_dora + gx_lora - G @ W0)
        assert_branch_gradients(d2, g_d2, [a + b for a, b in zip(g_dora, g_lora)])


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
