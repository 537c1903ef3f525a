"""The opt-in fused path (nn/fused.py) against the plain path written out in dora.py and d2lora.py.

The bar: against a float64 computation, the fused path's error stays within a small factor of the plain path's
error in the same dtype - for every shape and dtype, on rows that nearly cancel (norm(V_i) down to 1e-3 of
norm(W0_i) + norm(dW_i)) and on zero rows: outputs and every gradient; and the hand-written backward against
torch.autograd.gradcheck in float64. The plain path is the default, and set_fused switches with a bool only.
"""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given

from d2lora_min.nn import METHODS, D2LoRALinear, adapter_layers, d2lora, dora, inject_adapters
from d2lora_min.nn.fused import is_fused, set_fused

from ..helpers import (
    CANCEL_UNITS,
    RTOL,
    cancellation_ratio,
    layer_cases,
    make_layer,
    narrow_gpt,
    perturb_adapters,
    random_input,
)

WORSE_BY_AT_MOST = 10  # the fused path may be this many times less accurate than the plain one, never more


def _run(layer, x, grad_out):
    """Output and gradients (w.r.t. x and every trainable tensor) of L = sum(layer(x) * grad_out)."""
    x = x.clone().requires_grad_(True)
    y = layer(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * grad_out).sum(), [x] + params)
    return [y.detach()] + [g.detach() for g in grads]


def _err(a, ref):
    return (a.double() - ref).abs().max().item() if ref.numel() else 0.0


@given(layer_cases(methods=("dora", "d2lora")))
def test_fused_path_is_as_accurate_as_the_plain_path(case):
    _, layer = make_layer(case)
    x = random_input(case)
    g = torch.Generator().manual_seed(case["seed"] + 3)
    grad_out = torch.randn(*x.shape[:-1], case["out_features"], generator=g, dtype=torch.float64)

    # the reference: the plain path in float64 on the same (rounded) tensors and inputs
    ref_layer = copy.deepcopy(layer).double()
    set_fused(ref_layer, False)
    reference = _run(ref_layer, x.double(), grad_out)

    set_fused(layer, True)
    fused = _run(layer, x, grad_out.to(x.dtype))
    set_fused(layer, False)
    plain = _run(layer, x, grad_out.to(x.dtype))
    names = ["y", "x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    ratio = cancellation_ratio(layer)  # digits lost to a row that nearly cancels (1 for ordinary rows)
    for name, f, p, r in zip(names, fused, plain, reference, strict=True):
        assert f.dtype == p.dtype and f.shape == p.shape, name
        assert torch.isfinite(f).all(), name
        # rounding of the result itself (in float64 the reference is the plain path, whose error is then 0)
        floor = max(RTOL[case["dtype"]], CANCEL_UNITS * torch.finfo(case["dtype"]).eps * ratio) * max(
            1.0, r.abs().max().item()
        )
        assert _err(f, r) <= WORSE_BY_AT_MOST * _err(p, r) + floor, (name, _err(f, r), _err(p, r), floor)


def test_a_bias_that_dominates_the_output_keeps_the_gradient_of_the_factor_exact():
    # DoRA keeps y and recovers h = (y - b) / c for dL/dc; where the bias is far larger than c * h that would lose
    # most digits of c * h (float32: 35 % off for bias 10, magnitude 1e-4), so the fused path keeps h there.
    from d2lora_min.nn import DoRALinear

    torch.manual_seed(0)
    base = nn.Linear(6, 3)
    with torch.no_grad():
        base.bias[1] = 10.0
    layer = DoRALinear(base, r=2, alpha=2.0)
    set_fused(layer, True)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude[1] = 1e-4
    x, g = torch.randn(5, 6), torch.randn(5, 3)
    reference = copy.deepcopy(layer).double()
    set_fused(reference, False)
    (want,) = torch.autograd.grad((reference(x.double()) * g.double()).sum(), reference.magnitude)
    (got,) = torch.autograd.grad((layer(x) * g).sum(), layer.magnitude)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6)


# The true gradient, so the norm attached (a detached norm's backward is not the derivative on purpose: test_fused's
# comparison with the plain path covers it).
@pytest.mark.parametrize("readd, branches, dropout", [
    (False, False, False), (False, False, True),  # DoRA's shape: one pair, with and without dropout
    (True, True, False), (True, True, True),  # D2-LoRA's paper form
    (False, True, True),  # D2-LoRA's exact-norm form
])  # fmt: skip
def test_the_hand_written_backward_passes_gradcheck_in_float64(readd, branches, dropout):
    from d2lora_min.nn.fused import RowScaledLowRank, Settings

    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    n_in, n_out, r = 5, 4, 2
    x, W0, bias = (
        rand(2, 3, n_in),
        torch.randn(n_out, n_in, generator=g, dtype=torch.float64),
        torch.randn(n_out, generator=g, dtype=torch.float64),
    )
    keep = torch.rand(x.shape, generator=g, dtype=torch.float64) > 0.3  # dropout(x), an input of its own
    xd = (x.detach() * keep / 0.7).requires_grad_(True) if dropout else None
    A, B, target = rand(r, n_in), rand(n_out, r), rand(n_out)
    negative = (rand(r, n_in), rand(n_out, r), rand(())) if branches else (None, None, None)
    settings = Settings(s=1.5, detach_norm=False, readd=readd, keep_h=False, grad=True)
    inputs = (x, xd, W0, bias, A, B, target, *negative, settings)
    assert torch.autograd.gradcheck(RowScaledLowRank.apply, inputs, eps=1e-6, atol=1e-6)


def test_evaluation_keeps_nothing_for_backward(monkeypatch):
    # under torch.no_grad the fused path does no backward-only work (the bias check, V @ A.T), as a plain layer would
    from d2lora_min.nn import DoRALinear, fused

    def forbidden(*args):
        raise AssertionError("backward-only work in evaluation")

    monkeypatch.setattr(fused, "bias_dominates", forbidden)
    x = torch.randn(4, 6)
    for layer in (
        DoRALinear(nn.Linear(6, 3), r=2, alpha=2.0),
        D2LoRALinear(nn.Linear(6, 3), r=2, alpha=2.0, readd_delta=False),
    ):
        set_fused(layer, True)
        with torch.no_grad():
            y = layer(x)
        assert not y.requires_grad and y.grad_fn is None


@pytest.mark.parametrize("method", ["dora", "d2lora"])
def test_a_second_derivative_is_right_on_the_plain_path_and_refused_by_the_fused_one(method):
    # A gradient penalty differentiates the gradient: the plain path's autograd does it right (checked against the
    # dense merged weight's), the fused backward is written for one derivative only and says so rather than answer.
    torch.manual_seed(0)
    layer = METHODS[method](nn.Linear(6, 4).double(), r=2, alpha=4.0)
    perturb_adapters(layer, 0)
    x = torch.randn(5, 6, dtype=torch.float64)
    params = [p for p in layer.parameters() if p.requires_grad]

    def penalty_gradient(forward):
        (gx,) = torch.autograd.grad(forward(x.requires_grad_(True)).square().sum(), [x], create_graph=True)
        return torch.autograd.grad(gx.square().sum(), params)

    plain = penalty_gradient(layer)
    dense = penalty_gradient(lambda v: nn.functional.linear(v, layer.merged_weight(), layer.base.bias))
    for a, b in zip(plain, dense, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    set_fused(layer, True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        penalty_gradient(layer)


# The fused path keeps the layer's output for backward ------------------------------------------------------


@pytest.mark.parametrize("method, options", [("d2lora", {"readd_delta": False}), ("dora", {})])
def test_an_inplace_change_of_a_fused_output_is_a_loud_error(method, options):
    torch.manual_seed(0)
    layer = METHODS[method](nn.Linear(4, 3), r=1, alpha=1.0, **options)
    set_fused(layer, True)
    y = layer(torch.randn(2, 4))
    y.relu_()  # documented: the output is kept for backward, so it must not be changed in place
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_the_paper_form_keeps_h_so_its_output_may_change_in_place():
    torch.manual_seed(0)
    layer = D2LoRALinear(nn.Linear(4, 3), r=1, alpha=1.0)  # the paper's form: h is kept, not y
    set_fused(layer, True)
    perturb_adapters(layer, 0)
    x = torch.randn(2, 4)
    expected = torch.autograd.grad(layer(x).relu().sum(), layer.lora_B_pos)[0]
    y = layer(x)
    y.relu_()
    assert torch.equal(torch.autograd.grad(y.sum(), layer.lora_B_pos)[0], expected)


# The plain path is the default, and the only one a learner's edit of a method file needs to change -------------------


def test_a_new_layer_runs_the_plain_forward_of_its_method_file(monkeypatch):
    # the library's default, outside compare: a freshly wrapped layer computes what its file's forward() says
    # (train/test_compare.py: and so does a tiny `make compare`)
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    layers = [
        dora.DoRALinear(torch.nn.Linear(6, 4), r=2, alpha=4.0),
        d2lora.D2LoRALinear(torch.nn.Linear(6, 4), r=2, alpha=4.0),
    ]
    for layer in layers:
        perturb_adapters(layer, 0)
    before = [layer(x) for layer in layers]
    monkeypatch.setattr(dora, "row_factor", lambda target, V, detach: 0.5 * target / V.norm(dim=1))
    monkeypatch.setattr(d2lora, "row_factor", lambda target, V, detach: 0.5 * target / V.norm(dim=1))
    after = [layer(x) for layer in layers]
    assert all(not torch.allclose(a, b) for a, b in zip(before, after))


def test_set_fused_takes_a_bool_not_the_string_false():
    model = inject_adapters(narrow_gpt(), "d2lora", r=2, alpha=4)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_fused(model, "false")
    assert not any(is_fused(layer) for _, layer in adapter_layers(model))  # the plain path is the default
    assert all(is_fused(layer) for _, layer in adapter_layers(set_fused(model, True)))
    assert not any(is_fused(layer) for _, layer in adapter_layers(set_fused(model, False)))
