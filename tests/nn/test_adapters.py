"""Property tests of the layer-level invariants (docs/DESIGN.md, "Invariants"), for every method in METHODS, and
the layers' answers to bad input.

Each test draws random shapes (1-wide and non-square included), ranks, alphas, bias on/off, all four dtypes,
devices, method options, and - except where the property is about initialisation - random non-zero adapter
tensors, with rows of W0 that nearly cancel the update or are zero. Both implementations run: the plain one
written out in each method file (the default) and the opt-in fused one in fused.py (`fused` parametrises every
test that runs a layer). The tests that draw from every method run over helpers.TESTED_METHODS: tests/nn/test_registry.py
runs them on a toy method too.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from d2lora_min.nn import METHODS, D2LoRALinear, DoRALinear, LoRALinear, row_norm
from d2lora_min.nn.fused import set_fused

from ..helpers import (
    CANCEL_UNITS,
    RTOL,
    TESTED_METHODS,
    assert_close,
    cancellation_ratio,
    first_order_weight,
    layer_cases,
    make_layer,
    perturb_adapters,
    random_input,
)

FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])


def _base_output(base, x):
    return F.linear(x, base.weight, base.bias)


def _build(case, fused, perturb=True):
    base, layer = make_layer(case, perturb=perturb)
    set_fused(layer, fused)
    return base, layer


# 1. Identity at init -------------------------------------------------------------------------------


@FUSED
@given(layer_cases(rows=("random", "zero")))
def test_identity_at_init(fused, case):
    base, layer = _build(case, fused, perturb=False)
    x = random_input(case)
    assert_close(layer(x), _base_output(base, x))
    assert_close(layer.merged_weight(), base.weight)


@given(layer_cases(rows=("random",)))
def test_initialisation_matches_the_docstrings(case):
    base, layer = make_layer(case, perturb=False)
    bound = 1 / math.sqrt(case["in_features"])  # nn.Linear's Kaiming-uniform bound
    for name, p in layer.named_parameters():
        if name.startswith("lora_B"):
            assert p.shape == (case["out_features"], case["r"]) and (p == 0).all(), name
        elif name.startswith("lora_A"):
            assert p.shape == (case["r"], case["in_features"]), name
            assert p.abs().max() <= bound * (1 + RTOL[case["dtype"]]) and p.abs().max() > 0, name
    norms = base.weight.double().norm(dim=1)  # L2 over in_features
    if isinstance(layer, DoRALinear):
        assert layer.magnitude.shape == (case["out_features"],)
        assert_close(layer.magnitude, norms.to(case["dtype"]))
    if isinstance(layer, D2LoRALinear):
        assert_close(layer.target_norm, norms.to(case["dtype"]))
        assert layer.tau.item() == pytest.approx(
            case["options"]["tau_init"], abs=1e-2 if case["dtype"] in (torch.float16, torch.bfloat16) else 1e-6
        )


def test_row_norm_runs_over_in_features():
    w = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])  # (out=2, in=3)
    assert torch.equal(row_norm(w), torch.tensor([5.0, 2.0]))


def test_row_norm_does_not_overflow_or_underflow_in_float16():
    w = torch.tensor([[300.0, 400.0], [3e-4, 4e-4]], dtype=torch.float16)  # squares overflow / underflow in float16
    n = row_norm(w)
    assert n.dtype == torch.float32
    assert torch.allclose(n, torch.tensor([500.0, 5e-4]), rtol=2e-3)


# 2. Forward = merged weight, for outputs and for gradients -----------------------------------------


@FUSED
@given(layer_cases())
def test_forward_equals_merged_weight(fused, case):
    base, layer = _build(case, fused)
    ratio = cancellation_ratio(layer)  # 1 for ordinary rows; grows where a row nearly cancels
    x = random_input(case)
    y_layer = layer(x)
    y_dense = F.linear(x, layer.merged_weight(), base.bias)
    assert y_layer.dtype == x.dtype
    assert_close(y_layer, y_dense, factor=2, ratio=ratio)

    if case["dtype"] in (torch.float16, torch.bfloat16):
        return  # gradients in low precision: test_fused.py compares both paths against float64 instead
    # The layer (through the factors) and the dense formula must also agree on every gradient.
    params = [p for p in layer.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(case["seed"])
    w = torch.randn(y_layer.shape, generator=g, dtype=torch.float64).to(y_layer)
    grads_layer = torch.autograd.grad((y_layer * w).sum(), params)
    grads_dense = torch.autograd.grad((y_dense * w).sum(), params)
    for gf, gd in zip(grads_layer, grads_dense, strict=True):
        assert_close(gf, gd, factor=10, ratio=ratio)


# 3. Merge equivalence --------------------------------------------------------------------------------


@FUSED
@given(layer_cases())
def test_merge_gives_a_plain_linear_with_the_same_output(fused, case):
    base, layer = _build(case, fused)
    x = random_input(case)
    with torch.no_grad():
        y = layer(x)
        merged = layer.merge()
        y_merged = merged(x)
    assert type(merged) is nn.Linear
    assert merged.weight.dtype == base.weight.dtype and merged.weight.device == base.weight.device
    assert not any(p.requires_grad for p in merged.parameters())
    if case["bias"]:
        assert torch.equal(merged.bias, base.bias)
    else:
        assert merged.bias is None
    assert_close(y_merged, y, factor=2, ratio=cancellation_ratio(layer))
    if case["in_features"] > 1 and case["rows"] == "random":  # the perturbed adapter really changed the layer
        assert (y - _base_output(base, x)).abs().max() > RTOL[case["dtype"]]


# 4. Norm preservation --------------------------------------------------------------------------------


def _assert_rows_along(W, V, dtype, ratio):
    """Every non-zero row of W points along the same row of V (cosine 1 up to rounding)."""
    W, V = W.double(), V.double()
    live = (W.norm(dim=1) > 0) & (V.norm(dim=1) > 0)
    cos = (W[live] * V[live]).sum(1) / (W[live].norm(dim=1) * V[live].norm(dim=1))
    assert_close(cos.abs(), torch.ones_like(cos), dtype=dtype, factor=2, ratio=ratio)


def _projected(layer):
    """P(V) = (t / norm(V))[:, None] * V of a D2-LoRA layer: its merged weight in the exact-norm form (the same V)."""
    exact = copy.deepcopy(layer)
    exact.readd_delta = False
    return exact.merged_weight()


@given(layer_cases(methods=("d2lora",)))
def test_d2lora_projection_keeps_pretrained_row_norms_and_turns_rows_along_V(case):
    # both forms: P(V) keeps norm(W0) row by row exactly and points along V
    case["options"]["project"] = True
    base, layer = make_layer(case)
    with torch.no_grad():
        P, V = _projected(layer), base.weight + layer.delta_weight()
    ratio = cancellation_ratio(layer)
    assert_close(row_norm(P), row_norm(base.weight), dtype=case["dtype"], factor=2, ratio=ratio)
    _assert_rows_along(P, V, case["dtype"], ratio)  # the direction is V's: the projection only rescales
    if not layer.readd_delta:  # the exact-norm form applies P(V) itself
        assert_close(row_norm(layer.merge().weight), row_norm(base.weight), dtype=case["dtype"], factor=2, ratio=ratio)
    if case["rows"] == "random" and case["in_features"] > 1:  # and it did move (merged_weight() = W0 would pass above)
        assert (P - base.weight).abs().max() > RTOL[case["dtype"]]


@given(layer_cases(methods=("d2lora",)))
def test_d2lora_paper_form_is_the_projection_plus_the_update(case):
    # the paper's form: W = P(V) + dW
    case["options"].update(project=True, readd_delta=True)
    base, layer = make_layer(case)
    with torch.no_grad():
        W, P, dW = layer.merged_weight(), _projected(layer), layer.delta_weight()
    ratio = cancellation_ratio(layer)
    assert_close(W, P + dW, factor=2, ratio=ratio)  # the re-added update, exactly once
    # |norm(W_i) - norm(W0_i)| <= norm(dW_i): a bound, not a property of D2-LoRA's own (LoRA's W0 + dW meets it too,
    # by the triangle inequality); test_first_order_form_of_every_method says what tells the methods apart
    drift = (row_norm(W) - row_norm(base.weight)).abs()  # (out,)
    slack = 4 * max(RTOL[case["dtype"]], CANCEL_UNITS * torch.finfo(case["dtype"]).eps * ratio)
    assert (drift <= row_norm(dW) + slack * (row_norm(base.weight) + row_norm(dW) + 1)).all()
    if case["rows"] == "random" and case["in_features"] > 1:  # "close to", not "on": the rows do leave the sphere
        assert (drift > RTOL[case["dtype"]]).any() or (row_norm(dW) <= RTOL[case["dtype"]]).all()
    zero = (base.weight == 0).all(dim=1)  # a zero row of W0 (target norm 0) becomes the row of dW
    assert_close(W[zero], dW[zero], factor=2)


@torch.no_grad()
def _scaled_update(layer, size):
    """The layer with its update scaled so that the largest norm(dW_i) / norm(W0_i) is `size` (every B scaled; DoRA's
    magnitude moved from norm(W0) by the same factor), as a copy."""
    layer = copy.deepcopy(layer)
    W0 = layer.base.weight
    scale = size / (row_norm(layer.delta_weight()) / row_norm(W0)).max()
    for name, p in layer.named_parameters():
        if name.startswith("lora_B"):
            p.mul_(scale)
    if isinstance(layer, DoRALinear):
        layer.magnitude.copy_(row_norm(W0) + scale * (layer.magnitude - row_norm(W0)))
    return layer


@given(layer_cases(dtypes=(torch.float64,), rows=("random",)))
def test_first_order_form_of_every_method(case):
    # What each method does to a row, to first order: the remainder W - first_order_weight falls about 4x when the
    # update is halved (second order), where W0 + dW, LoRA's form, is off by a first-order term (it only halves).
    # (each method's form: helpers.FIRST_ORDER)
    _, layer = make_layer(case)
    assume((row_norm(layer.delta_weight()) > 0).any())  # an update to scale
    remainder, naive = [], []
    for size in (1e-2, 5e-3):
        scaled = _scaled_update(layer, size)
        with torch.no_grad():
            W, (first, exact) = scaled.merged_weight(), first_order_weight(scaled)
            W0_dW = scaled.base.weight + scaled.delta_weight()
        scale = row_norm(scaled.base.weight).max().item()
        remainder.append((W - first).abs().max().item() / scale)
        naive.append((W - W0_dW).abs().max().item() / scale)
    # exact: W = W0 + dW (LoRA, no projection); with one input a row cannot turn, and every form is exact
    if exact or case["in_features"] == 1:
        assert max(remainder) <= 1e-14, remainder
        return
    assert remainder[0] <= 4e-3 and 3.5 <= remainder[0] / remainder[1] <= 4.5, remainder  # second order
    assert naive[0] / naive[1] < 2.5, naive  # while W0 + dW is off at first order


@given(layer_cases(methods=("dora",)))
def test_dora_row_norms_equal_the_magnitude_and_rows_point_along_V(case):
    base, layer = make_layer(case)
    with torch.no_grad():
        W, V = layer.merged_weight(), base.weight + layer.delta_weight()
    live = row_norm(V) > 0  # a row of V that is exactly zero stays zero (its direction is undefined)
    ratio = cancellation_ratio(layer)
    assert_close(row_norm(W)[live], layer.magnitude.abs()[live], dtype=case["dtype"], factor=2, ratio=ratio)
    _assert_rows_along(W, V, case["dtype"], ratio)
    if case["rows"] == "random" and case["in_features"] > 1:
        assert (W - base.weight).abs().max() > RTOL[case["dtype"]]


@FUSED
@given(layer_cases(methods=("dora", "d2lora"), rows=("zero",)), st.booleans())
def test_zero_rows_stay_finite_and_d2lora_keeps_them_zero(fused, case, perturb):
    base, layer = _build(case, fused, perturb=perturb)
    x = random_input(case)
    y = layer(x)
    y.float().sum().backward()
    w = layer.merged_weight()
    assert torch.isfinite(w).all() and torch.isfinite(y).all()
    for p in layer.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    zero_rows = (base.weight == 0).all(dim=1)
    if isinstance(layer, D2LoRALinear) and layer.project:  # its target norm is 0, whatever the adapter:
        with torch.no_grad():
            dW = layer.delta_weight()
        expected = dW[zero_rows] if layer.readd_delta else torch.zeros_like(w[zero_rows])  # P(V)_i = 0 (+ dW_i)
        assert torch.equal(w[zero_rows], expected.to(w.dtype))
    if isinstance(layer, DoRALinear):  # finite, with norm |magnitude_i| (0 only where V_i is zero)
        V = base.weight + layer.delta_weight()
        live = zero_rows & (row_norm(V) > 0)
        assert_close(row_norm(w)[live], layer.magnitude.abs()[live], dtype=case["dtype"], factor=4)


# 5. Parameter-count matching -------------------------------------------------------------------------


def _trainable(layer):
    return sum(p.numel() for p in layer.parameters() if p.requires_grad)


@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 8), st.booleans())
def test_parameter_counts(n_in, n_out, r, learn_tau):
    base = nn.Linear(n_in, n_out)
    lora_r, lora_2r = LoRALinear(base, r=r, alpha=1.0), LoRALinear(base, r=2 * r, alpha=1.0)
    dora = DoRALinear(base, r=r, alpha=1.0)
    d2 = D2LoRALinear(base, r=r, alpha=1.0, learn_tau=learn_tau)
    assert _trainable(lora_r) == r * (n_in + n_out)
    assert _trainable(dora) == r * (n_in + n_out) + n_out
    assert _trainable(d2) == _trainable(lora_2r) + (1 if learn_tau else 0)
    assert not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)


# 6. Degenerate cases ---------------------------------------------------------------------------------

HIGH = (torch.float32, torch.float64)


@given(layer_cases(methods=("d2lora",), dtypes=HIGH, rows=("random",)))
def test_d2lora_without_projection_is_a_rank_2r_lora(case):
    case["options"]["project"] = False
    base, d2 = make_layer(case)
    # LoRA(2r) with the stacked factors; alpha doubled so that its scaling alpha'/(2r) is D2-LoRA's alpha/r.
    lora = LoRALinear(base, r=2 * case["r"], alpha=2 * case["alpha"])
    with torch.no_grad():
        lora.lora_A.copy_(torch.cat([d2.lora_A_pos, d2.lora_A_neg], dim=0))  # (2r, in)
        lora.lora_B.copy_(torch.cat([d2.lora_B_pos, -d2.tau * d2.lora_B_neg], dim=1))  # (out, 2r)
    x = random_input(case)
    assert_close(d2(x), lora(x))
    assert_close(d2.merged_weight(), lora.merged_weight())
    assert_close(d2.delta_weight(), lora.delta_weight())


@FUSED
@given(layer_cases(methods=("d2lora",), dtypes=HIGH, rows=("random",)))
def test_d2lora_with_tau_zero_and_detached_norm_is_dora_with_frozen_magnitude(fused, case):
    # the exact-norm form (P(V) alone); the paper's form adds dW = s * B_pos @ A_pos on top of this DoRA
    case["options"].update(tau_init=0.0, learn_tau=False, project=True, readd_delta=False, detach_norm=True)
    base, d2 = _build(case, fused)
    dora = DoRALinear(base, r=case["r"], alpha=case["alpha"], detach_norm=True)
    set_fused(dora, fused)
    with torch.no_grad():
        dora.lora_A.copy_(d2.lora_A_pos)
        dora.lora_B.copy_(d2.lora_B_pos)
    dora.magnitude.requires_grad_(False)  # frozen at norm(W0)
    x = random_input(case)
    y_d2, y_dora = d2(x), dora(x)
    ratio = cancellation_ratio(d2)  # with in_features = 1 a random row can nearly cancel: both round V differently
    assert_close(y_d2, y_dora, ratio=ratio)
    assert_close(d2.merged_weight(), dora.merged_weight(), ratio=ratio)
    # The same gradients for the shared branch, too.
    g_d2 = torch.autograd.grad(y_d2.square().sum(), [d2.lora_A_pos, d2.lora_B_pos])
    g_dora = torch.autograd.grad(y_dora.square().sum(), [dora.lora_A, dora.lora_B])
    for a, b in zip(g_d2, g_dora, strict=True):
        assert_close(a, b, factor=10)


# Options change what they say they change --------------------------------------------------------------


def _first_lora_B(layer):
    return next(p for name, p in layer.named_parameters() if name.startswith("lora_B"))


@FUSED
@given(layer_cases(methods=("d2lora", "dora"), dtypes=HIGH, rows=("random",)))
def test_detach_norm_changes_gradients_not_outputs(fused, case):
    if case["method"] == "d2lora":
        case["options"]["project"] = True
    _, attached = _build({**case, "options": {**case["options"], "detach_norm": False}}, fused)
    _, detached = _build({**case, "options": {**case["options"], "detach_norm": True}}, fused)
    x = random_input(case)
    y_a, y_d = attached(x), detached(x)
    assert_close(y_a, y_d)
    (g_a,) = torch.autograd.grad(y_a.square().sum(), _first_lora_B(attached))
    (g_d,) = torch.autograd.grad(y_d.square().sum(), _first_lora_B(detached))
    assert not torch.allclose(g_a, g_d, rtol=1e-4, atol=1e-6)


@given(layer_cases(methods=("d2lora",), dtypes=HIGH, rows=("random",)))
def test_d2lora_tau_scales_only_the_negative_branch(case):
    case["options"]["project"] = False
    base, d2 = make_layer(case)
    s = case["alpha"] / case["r"]
    expected = s * (d2.lora_B_pos @ d2.lora_A_pos - d2.tau * d2.lora_B_neg @ d2.lora_A_neg)  # (out, in)
    assert_close(d2.delta_weight(), expected)


# Dropout acts on the low-rank branch's input only ----------------------------------------------------------


@FUSED
@given(layer_cases(dtypes=HIGH, rows=("random",)), st.sampled_from([0.1, 0.5]))
def test_dropout_touches_only_the_low_rank_branch(fused, case, p):
    torch.manual_seed(case["seed"])
    base = nn.Linear(case["in_features"], case["out_features"], bias=case["bias"]).to(case["dtype"])
    layer = METHODS[case["method"]](base, r=case["r"], alpha=case["alpha"], dropout=p, **case["options"])
    set_fused(layer, fused)
    perturb_adapters(layer, case["seed"])
    x = random_input(case)
    layer.eval()  # eval mode: dropout is off, the layer equals its merged weight
    assert_close(layer(x), F.linear(x, layer.merged_weight(), base.bias), factor=4)
    layer.train()
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    xd = F.dropout(x, p, training=True)  # the same mask: dropout is the layer's only use of the RNG
    with torch.no_grad():
        if isinstance(layer, D2LoRALinear):
            A = torch.cat([layer.lora_A_pos, layer.lora_A_neg])
            B = torch.cat([layer.lora_B_pos, -layer.tau * layer.lora_B_neg], dim=1)
        else:
            A, B = layer.lora_A, layer.lora_B
        h = x @ base.weight.T + layer.scaling * (xd @ A.T) @ B.T  # W0 sees x, the low-rank branch dropout(x)
        V = base.weight + layer.delta_weight()  # the norm sees no dropout
        c = torch.ones(case["out_features"], dtype=x.dtype)  # LoRA, and D2-LoRA without projection
        if isinstance(layer, DoRALinear):
            c = layer.magnitude / V.norm(dim=1)
        elif isinstance(layer, D2LoRALinear) and layer.project:
            c = layer.target_norm / V.norm(dim=1)
        expected = c * h + (0 if base.bias is None else base.bias)
        if isinstance(layer, D2LoRALinear) and layer.project and layer.readd_delta:  # + the update once more
            expected = expected + layer.scaling * (xd @ A.T) @ B.T
    assert_close(y, expected, factor=10)


# 7. Gradients reach only the adapter ---------------------------------------------------------------------


@FUSED
@given(layer_cases())
def test_only_adapter_tensors_get_gradients(fused, case):
    base, layer = _build(case, fused)
    layer(random_input(case)).float().square().sum().backward()
    assert base.weight.grad is None and (base.bias is None or base.bias.grad is None)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith("base.") for n in trainable)
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n


# Mixed precision: every adapter returns what nn.Linear would --------------------------------------------------


@FUSED
@pytest.mark.parametrize("method", TESTED_METHODS)
def test_bf16_autocast_output_dtype_finiteness_and_closeness(method, fused):
    torch.manual_seed(0)
    plain_linear = nn.Linear(16, 8)
    layer = METHODS[method](plain_linear, r=2, alpha=4.0)
    set_fused(layer, fused)
    perturb_adapters(layer, 0)
    x = torch.randn(4, 16)
    params = [p for p in layer.parameters() if p.requires_grad]
    y32 = layer(x)
    exact = torch.autograd.grad(y32.square().sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected_dtype = plain_linear(x).dtype  # what a plain nn.Linear returns under autocast: bfloat16
    assert y.dtype == expected_dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    assert (y.float() - y32).norm() <= 0.02 * y32.norm()
    approx = torch.autograd.grad(y.float().square().sum(), params)
    for a, e in zip(approx, exact, strict=True):
        assert a.dtype == e.dtype and torch.isfinite(a).all()
        assert (a - e).norm() <= 0.05 * e.norm() + 1e-3


@FUSED
def test_bf16_autocast_keeps_a_factor_near_1(fused):
    # c = 1 - 1e-3, a typical factor during fine-tuning, is 1.0 once rounded to bfloat16 (numbers near 1 are 2^-8
    # apart), and so is c * h for a bfloat16 h: applied that way, every output of the row would miss the rescale.
    # Formed in float32 and rounded once (c * h + low), each output's rounding is its own, and the average over many
    # tokens shows the factor. Float32 weights under bfloat16 autocast, as on a GPU.
    torch.manual_seed(0)
    base = nn.Linear(64, 4, bias=False)
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.0)  # positive rows and inputs: every output of a row has the same sign
    layer = DoRALinear(base, r=2, alpha=4.0)
    set_fused(layer, fused)
    c = 1 - 1e-3
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)  # an update whose outputs vary by more than one bfloat16 step from token to token
        V = base.weight + layer.delta_weight()  # (out, in)
        layer.magnitude.copy_(c * row_norm(V))  # so c = magnitude / norm(V) = 1 - 1e-3
    x = torch.rand(4096, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    xb, W0, A = x.bfloat16().double(), base.weight.bfloat16().double(), layer.lora_A.bfloat16().double()
    h = xb @ W0.T + layer.scaling * (xb @ A.T) @ layer.lora_B.double().T  # (4096, 4): x @ V.T, autocast's inputs
    applied = y.double().sum(0) / h.sum(0)  # each row's factor, on average: (4,)
    assert (applied - c).abs().max() < 2e-4, applied  # a factor rounded to 1 is 1e-3 off


@FUSED
def test_a_float16_factor_beyond_its_range_keeps_a_zero_row_zero(fused):
    # DoRA with a row of V exactly zero and a non-zero magnitude: c = m / eps does not fit float16; inf * 0 would
    # be NaN. (Training never reaches this state from initialisation, where that magnitude is 0; a loaded one can.)
    torch.manual_seed(0)
    base = nn.Linear(4, 3).half()
    with torch.no_grad():
        base.weight[1] = 0
    layer = DoRALinear(base, r=2, alpha=2.0)
    set_fused(layer, fused)
    with torch.no_grad():
        layer.magnitude[1] = 0.5  # B is still 0, so V's row 1 is 0
    y = layer(torch.randn(5, 4, dtype=torch.float16))
    assert torch.isfinite(y).all() and torch.equal(y[:, 1], base.bias[1].expand(5))


@pytest.mark.parametrize("method", TESTED_METHODS)
def test_lora_A_is_drawn_like_nn_linear_weights_not_smaller(method):
    # Kaiming-uniform with a = sqrt(5) is U(-1/sqrt(in), 1/sqrt(in)): the largest |A| is near the bound and the
    # standard deviation is bound / sqrt(3) (a factor drawn 1000x too small would pass an upper bound alone)
    torch.manual_seed(0)
    n_in = 256
    layer = METHODS[method](nn.Linear(n_in, 64), r=8, alpha=8.0)
    bound = 1 / math.sqrt(n_in)
    for name, p in layer.named_parameters():
        if name.startswith("lora_A"):
            assert 0.95 * bound <= p.abs().max() <= bound, name
            assert abs(p.std().item() - bound / math.sqrt(3)) <= 0.05 * bound / math.sqrt(3), name


@pytest.mark.parametrize("method", TESTED_METHODS)
def test_the_options_table_matches_the_constructors_defaults(method):
    import inspect

    cls = METHODS[method]
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k in cls.OPTIONS}
    assert defaults == cls.OPTIONS  # every option is a keyword with the default the table states


# Bad input to a layer: a clear error, or the empty output an empty batch asks for --------------------------------------


@pytest.mark.parametrize("method", TESTED_METHODS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_an_empty_batch_gives_an_empty_output_and_a_wrong_width_names_the_features(method, fused):
    layer = METHODS[method](nn.Linear(4, 3), r=2, alpha=4.0)
    set_fused(layer, fused)
    for lead in [(0,), (2, 0), (0, 5)]:
        x = torch.zeros(*lead, 4, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == (*lead, 3) and x.grad.shape == x.shape
    with pytest.raises((ValueError, RuntimeError), match="features in its last dimension|shapes cannot be multiplied"):
        layer(torch.zeros(2, 5))


@pytest.mark.parametrize("method", TESTED_METHODS)
def test_wrapping_something_else_than_linear_is_a_type_error(method):
    with pytest.raises(TypeError, match="nn.Linear"):
        METHODS[method](nn.Conv1d(4, 4, 1), r=1, alpha=1.0)
