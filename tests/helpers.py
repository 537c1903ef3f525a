"""What the tests share: tolerances, devices, strategies over every registered method, and adapter perturbation."""

import torch
import torch.nn as nn
from hypothesis import strategies as st

from d2lora_min.nn import METHODS, adapter_layers

# Tolerances relative to the output's scale: |a - b| <= RTOL[dtype] * max(1, max|b|).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = list(RTOL)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_close(actual, expected, dtype=None, factor=1.0):
    """Assert two tensors agree to the dtype's tolerance, scaled by the expected tensor's magnitude."""
    dtype = dtype or expected.dtype
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "non-finite values"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    tol = factor * RTOL[dtype] * scale
    assert err <= tol, f"max |difference| {err:.3e} > tolerance {tol:.3e}"


def option_strategy(cls):
    """A hypothesis strategy over a method's options, built from their defaults' types (so new methods are covered)."""
    fields = {}
    for name, default in cls.OPTIONS.items():
        if isinstance(default, bool):
            fields[name] = st.booleans()
        elif isinstance(default, float):
            fields[name] = st.floats(-2.0, 2.0, allow_nan=False).map(lambda v: round(v, 3))
        else:
            fields[name] = st.just(default)
    return st.fixed_dictionaries(fields)


@st.composite
def layer_cases(draw, methods=tuple(METHODS)):
    """One adapter-layer case: method, options, shapes (1-wide and non-square included), rank, alpha, bias, dtype, device."""
    method = draw(st.sampled_from(methods))
    return dict(
        method=method,
        options=draw(option_strategy(METHODS[method])),
        in_features=draw(st.integers(1, 24)),
        out_features=draw(st.integers(1, 24)),
        r=draw(st.integers(1, 6)),
        alpha=draw(st.sampled_from([0.5, 1.0, 2.0, 8.0, 16.0])),
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        device=draw(st.sampled_from(DEVICES)),
        seed=draw(st.integers(0, 2**16)),
    )


def make_layer(case, perturb=True):
    """Build the case's base nn.Linear and its adapter; with perturb=True, give every adapter tensor random values."""
    torch.manual_seed(case["seed"])
    base = nn.Linear(case["in_features"], case["out_features"], bias=case["bias"])
    base = base.to(device=case["device"], dtype=case["dtype"])
    if case["bias"]:
        nn.init.normal_(base.bias)  # a visible bias, so a merge that drops it shows
    layer = METHODS[case["method"]](base, r=case["r"], alpha=case["alpha"], **case["options"])
    if perturb:
        perturb_adapters(layer, case["seed"])
    return base, layer


@torch.no_grad()
def perturb_adapters(module, seed=0):
    """Add noise to every trainable adapter tensor (B included), so that B != 0 and merges can go wrong.

    At initialisation B = 0 and magnitude = norm(W0): a merge bug is invisible there.
    """
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(module):  # the module itself when it is one adapter layer
        for p in layer.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p)
                p.add_(0.5 * noise)


def random_input(case, batch=(3, 5)):
    g = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(*batch, case["in_features"], generator=g, dtype=torch.float64)
    return x.to(device=case["device"], dtype=case["dtype"])
