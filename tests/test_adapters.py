"""Property tests of the layer-level invariants of DESIGN section 2, for every method in METHODS.

Each test draws random shapes (1-wide and non-square included), ranks, alphas, bias on/off, dtypes,
devices and method options, and - except where the property is about initialisation - random non-zero
adapter tensors.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from d2lora_min.nn import METHODS, D2LoRALinear, DoRALinear, LoRALinear, inject_adapters, row_norm
from d2lora_min.train.bench import with_dense_norm

from .helpers import assert_close, layer_cases, make_layer, perturb_adapters, random_input


def _base_output(base, x):
    return F.linear(x, base.weight, base.bias)


# 1. Identity at init -------------------------------------------------------------------------------


@given(layer_cases())
def test_identity_at_init(case):
    base, layer = make_layer(case, perturb=False)
    x = random_input(case)
    assert_close(layer(x), _base_output(base, x))
    assert_close(layer.merged_weight(), base.weight)


@given(layer_cases())
def test_initialisation_matches_the_docstrings(case):
    base, layer = make_layer(case, perturb=False)
    bound = 1 / math.sqrt(case["in_features"])  # nn.Linear's Kaiming-uniform bound
    for name, p in layer.named_parameters():
        if name.startswith("lora_B"):
            assert p.shape == (case["out_features"], case["r"]) and (p == 0).all(), name
        elif name.startswith("lora_A"):
            assert p.shape == (case["r"], case["in_features"]), name
            assert p.abs().max() <= bound and p.abs().max() > 0, name
    if isinstance(layer, DoRALinear):
        assert layer.magnitude.shape == (case["out_features"],)
        assert torch.equal(layer.magnitude, base.weight.norm(dim=1))  # L2 over in_features
    if isinstance(layer, D2LoRALinear):
        assert torch.equal(layer.target_norm, base.weight.norm(dim=1))
        assert layer.tau.item() == pytest.approx(case["options"]["tau_init"], abs=1e-6)


def test_row_norm_runs_over_in_features():
    w = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])  # (out=2, in=3)
    assert torch.equal(row_norm(w), torch.tensor([5.0, 2.0]))


# 2. Forward = merged weight, for outputs and for gradients -----------------------------------------


@given(layer_cases())
def test_forward_equals_merged_weight(case):
    base, layer = make_layer(case)
    x = random_input(case)
    y_fast = layer(x)
    y_dense = F.linear(x, layer.merged_weight(), base.bias)
    assert_close(y_fast, y_dense)

    # The fast path (through the factors) and the dense formula must also agree on every gradient.
    params = [p for p in layer.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(case["seed"])
    w = torch.randn(y_fast.shape, generator=g, dtype=torch.float64).to(y_fast)
    grads_fast = torch.autograd.grad((y_fast * w).sum(), params)
    grads_dense = torch.autograd.grad((y_dense * w).sum(), params)
    for gf, gd in zip(grads_fast, grads_dense):
        assert_close(gf, gd, factor=10)


# 3. Merge equivalence --------------------------------------------------------------------------------


@given(layer_cases())
def test_merge_gives_a_plain_linear_with_the_same_output(case):
    base, layer = make_layer(case)
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
    assert_close(y_merged, y)
    if case["in_features"] > 1:  # the perturbed adapter really changed the layer (else this proves nothing)
        assert (y - _base_output(base, x)).abs().max() > 1e3 * (1e-10 if case["dtype"] == torch.float64 else 1e-5)


# 4. Norm preservation --------------------------------------------------------------------------------


@given(layer_cases(methods=("d2lora",)))
def test_d2lora_projection_keeps_pretrained_row_norms(case):
    case["options"]["project"] = True
    base, layer = make_layer(case)
    assert_close(row_norm(layer.merged_weight()), row_norm(base.weight))
    assert_close(row_norm(layer.merge().weight), row_norm(base.weight))


@given(layer_cases(methods=("dora",)))
def test_dora_row_norms_equal_the_magnitude(case):
    base, layer = make_layer(case)
    assert_close(row_norm(layer.merged_weight()), layer.magnitude.abs())


@given(layer_cases(methods=("dora", "d2lora")), st.integers(0, 23))
def test_zero_row_gives_zero_row_not_nan(case, row):
    base, layer = make_layer(case, perturb=False)
    row = row % case["out_features"]
    with torch.no_grad():
        base.weight[row] = 0.0
    layer = METHODS[case["method"]](base, r=case["r"], alpha=case["alpha"], **case["options"])
    x = random_input(case)
    y = layer(x)
    y.sum().backward()
    w = layer.merged_weight()
    assert torch.isfinite(w).all() and torch.isfinite(y).all()
    assert (w[row] == 0).all()
    for p in layer.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


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


@given(layer_cases(methods=("d2lora",)))
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


@given(layer_cases(methods=("d2lora",)))
def test_d2lora_with_tau_zero_and_detached_norm_is_dora_with_frozen_magnitude(case):
    case["options"].update(tau_init=0.0, learn_tau=False, project=True, detach_norm=True)
    base, d2 = make_layer(case)
    dora = DoRALinear(base, r=case["r"], alpha=case["alpha"], detach_norm=True)
    with torch.no_grad():
        dora.lora_A.copy_(d2.lora_A_pos)
        dora.lora_B.copy_(d2.lora_B_pos)
    dora.magnitude.requires_grad_(False)  # frozen at norm(W0)
    x = random_input(case)
    y_d2, y_dora = d2(x), dora(x)
    assert_close(y_d2, y_dora)
    assert_close(d2.merged_weight(), dora.merged_weight())
    # The same gradients for the shared branch, too.
    g_d2 = torch.autograd.grad(y_d2.square().sum(), [d2.lora_A_pos, d2.lora_B_pos])
    g_dora = torch.autograd.grad(y_dora.square().sum(), [dora.lora_A, dora.lora_B])
    for a, b in zip(g_d2, g_dora):
        assert_close(a, b, factor=10)


# Options change what they say they change --------------------------------------------------------------


def _first_lora_B(layer):
    return next(p for name, p in layer.named_parameters() if name.startswith("lora_B"))


@given(layer_cases(methods=("d2lora", "dora")))
def test_detach_norm_changes_gradients_not_outputs(case):
    if case["method"] == "d2lora":
        case["options"]["project"] = True
    attached_case = {**case, "options": {**case["options"], "detach_norm": False}}
    detached_case = {**case, "options": {**case["options"], "detach_norm": True}}
    _, attached = make_layer(attached_case)
    _, detached = make_layer(detached_case)
    x = random_input(case)
    y_a, y_d = attached(x), detached(x)
    assert_close(y_a, y_d)
    (g_a,) = torch.autograd.grad(y_a.square().sum(), _first_lora_B(attached))
    (g_d,) = torch.autograd.grad(y_d.square().sum(), _first_lora_B(detached))
    assert not torch.allclose(g_a, g_d, rtol=1e-4, atol=1e-6)


@given(layer_cases(methods=("d2lora",)))
def test_d2lora_tau_scales_only_the_negative_branch(case):
    case["options"]["project"] = False
    base, d2 = make_layer(case)
    s = case["alpha"] / case["r"]
    expected = s * (d2.lora_B_pos @ d2.lora_A_pos - d2.tau * d2.lora_B_neg @ d2.lora_A_neg)  # (out, in)
    assert_close(d2.delta_weight(), expected)


# 7. Gradients reach only the adapter ---------------------------------------------------------------------


@given(layer_cases())
def test_only_adapter_tensors_get_gradients(case):
    base, layer = make_layer(case)
    layer(random_input(case)).square().sum().backward()
    assert base.weight.grad is None and (base.bias is None or base.bias.grad is None)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith("base.") for n in trainable)
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n


# Bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(METHODS.values()))
@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_bad_rank_is_a_clear_error(cls, r):
    with pytest.raises(ValueError, match="rank"):
        cls(nn.Linear(4, 4), r=r, alpha=1.0)


@pytest.mark.parametrize("cls", list(METHODS.values()))
def test_wrapping_something_else_than_linear_is_a_type_error(cls):
    with pytest.raises(TypeError, match="nn.Linear"):
        cls(nn.Conv1d(4, 4, 1), r=1, alpha=1.0)


# scale_rows: y = c * h + b, keeping y instead of h for backward ---------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_scale_rows_gradients_are_exact(bias):
    from d2lora_min.nn.base import scale_rows

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    c = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(scale_rows, (h, c, b))


def test_scale_rows_returns_zero_gradient_where_c_is_zero():
    from d2lora_min.nn.base import scale_rows

    h = torch.randn(4, 3, dtype=torch.float64)
    c = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    scale_rows(h, c).sum().backward()
    assert c.grad[1] == 0 and torch.allclose(c.grad[[0, 2]], h.sum(0)[[0, 2]])


def test_an_inplace_change_of_a_d2lora_output_is_a_loud_error():
    torch.manual_seed(0)
    layer = D2LoRALinear(nn.Linear(4, 3), r=1, alpha=1.0)
    y = layer(torch.randn(2, 4))
    y.relu_()  # documented: the output is kept for backward, so it must not be changed in place
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_autocast_forward_and_backward(method):
    torch.manual_seed(0)
    layer = METHODS[method](nn.Linear(16, 8), r=2, alpha=4.0)
    perturb_adapters(layer, 0)
    x = torch.randn(4, 16)
    params = [p for p in layer.parameters() if p.requires_grad]
    exact = torch.autograd.grad(layer(x).square().sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    approx = torch.autograd.grad(y.float().square().sum(), params)
    for a, e in zip(approx, exact):
        assert a.dtype == e.dtype and torch.isfinite(a).all()
        assert (a - e).norm() <= 0.05 * e.norm() + 1e-3


def test_the_benchmarks_plain_d2lora_equals_the_fast_one():
    # make bench's "dense norm" row (V formed, plain autograd) must compute the same function and gradients
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4))
    perturb_adapters(inject_adapters(model, "d2lora", r=2, alpha=4, targets=("0", "2")), 1)
    dense = with_dense_norm(copy.deepcopy(model))
    x = torch.randn(3, 6)
    assert_close(dense(x), model(x))
    for (n, a), (_, b) in zip(model.named_parameters(), dense.named_parameters()):
        if a.requires_grad:
            (ga,) = torch.autograd.grad(model(x).square().sum(), a)
            (gb,) = torch.autograd.grad(dense(x).square().sum(), b)
            assert_close(ga, gb, factor=10)
