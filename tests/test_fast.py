"""The fast path (nn/fast.py) against the plain path written out in dora.py and d2lora.py.

The bar: against a float64 computation, the fast path's error stays within a small factor of the plain path's
error in the same dtype - for every shape and dtype, on rows that nearly cancel (norm(V_i) down to 1e-3 of
norm(W0_i) + norm(dW_i)) and on zero rows: outputs, merged weights and every gradient.
"""

import copy

import torch
from hypothesis import given

from .helpers import CANCEL_UNITS, RTOL, cancellation_ratio, layer_cases, make_layer, random_input

WORSE_BY_AT_MOST = 10  # the fast path may be this many times less accurate than the plain one, never more


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
def test_fast_path_is_as_accurate_as_the_plain_path(case):
    _, layer = make_layer(case)
    x = random_input(case)
    g = torch.Generator().manual_seed(case["seed"] + 3)
    grad_out = torch.randn(*x.shape[:-1], case["out_features"], generator=g, dtype=torch.float64)

    # the reference: the plain path in float64 on the same (rounded) tensors and inputs
    ref_layer = copy.deepcopy(layer).double()
    ref_layer.fast = False
    reference = _run(ref_layer, x.double(), grad_out)

    layer.fast = True
    fast = _run(layer, x, grad_out.to(x.dtype))
    layer.fast = False
    plain = _run(layer, x, grad_out.to(x.dtype))
    names = ["y", "x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    ratio = cancellation_ratio(layer)  # digits lost to a row that nearly cancels (1 for ordinary rows)
    for name, f, p, r in zip(names, fast, plain, reference, strict=True):
        assert f.dtype == p.dtype and f.shape == p.shape, name
        assert torch.isfinite(f).all(), name
        # rounding of the result itself (in float64 the reference is the plain path, whose error is then 0)
        floor = max(RTOL[case["dtype"]], CANCEL_UNITS * torch.finfo(case["dtype"]).eps * ratio) * max(1.0, r.abs().max().item())
        assert _err(f, r) <= WORSE_BY_AT_MOST * _err(p, r) + floor, (name, _err(f, r), _err(p, r), floor)


@given(layer_cases(methods=("dora", "d2lora")))
def test_fast_and_plain_paths_merge_to_the_same_weight(case):
    _, layer = make_layer(case)
    with torch.no_grad():
        layer.fast = True
        fast = layer.merged_weight()
        layer.fast = False
        plain = layer.merged_weight()
    assert torch.equal(fast, plain)  # merged_weight() is one function: the flag only changes forward()
