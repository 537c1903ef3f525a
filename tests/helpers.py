"""What the tests share: tolerances (stated once, per dtype), devices, strategies over every registered method,
adapter perturbation, rows built to nearly cancel or to be zero, each method's first-order form, small GPTs and a
tiny training task, and a snapshot of a model that a refused call must leave as it was."""

import copy

import torch
import torch.nn as nn
from hypothesis import strategies as st

from d2lora_min.nn import METHODS, adapter_layers, row_norm
from d2lora_min.nn.registry import method_name
from d2lora_min.train.trainer import TrainConfig
from tiny_gpt import GPT, GPTConfig

# The methods the method-generic tests run over: every registered one. tests/nn/test_registry.py runs those tests on a
# toy method alone (tests/nn/toy_method.py sets this to its name).
TESTED_METHODS = tuple(METHODS)

# Tolerances relative to the output's scale: |a - b| <= RTOL[dtype] * max(1, max|b|) (times a stated factor).
# float64/float32: a few units of rounding over short sums. bfloat16 (8-bit mantissa, u = 3.9e-3) and float16
# (11-bit, u = 4.9e-4): what their rounding of inputs, products and the output allows.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
DTYPES = list(RTOL)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Rows that nearly cancel: norm(V_i) / (norm(W0_i) + norm(dW_i)) down to this (the design's bar).
CANCEL_TO = 1e-3


# Near cancellation even the plain path loses digits: its error grows like the dtype's rounding unit times
# ratio = (norm(W0_i) + norm(dW_i)) / norm(V_i). Tolerances there are CANCEL_UNITS rounding units times that ratio
# (tight enough that an expansion whose error grows like ratio^2, such as norm(V)^2 from W0 A^T and A A^T, fails).
CANCEL_UNITS = 8


def assert_close(actual, expected, dtype=None, factor=1.0, ratio=1.0):
    """Assert two tensors agree to the dtype's tolerance, scaled by the expected tensor's magnitude; `ratio` is
    the layer's cancellation_ratio where rows may nearly cancel."""
    dtype = dtype or expected.dtype
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "non-finite values"
    actual, expected = actual.double(), expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    tol = factor * max(RTOL[dtype], CANCEL_UNITS * torch.finfo(dtype).eps * ratio) * scale
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
def layer_cases(draw, methods=None, dtypes=tuple(DTYPES), rows=("random", "cancel", "zero")):
    """One adapter-layer case: method (of TESTED_METHODS unless `methods` says), options, shapes (1-wide and non-square
    included), rank, alpha, bias, dtype, device, and which special rows W0 gets (none, rows that nearly cancel the
    update, zero rows)."""
    method = draw(st.sampled_from(methods or TESTED_METHODS))
    return dict(
        method=method,
        options=draw(option_strategy(METHODS[method])),
        in_features=draw(st.integers(1, 24)),
        out_features=draw(st.integers(1, 24)),
        r=draw(st.integers(1, 6)),
        alpha=draw(st.sampled_from([0.5, 1.0, 2.0, 8.0, 16.0])),
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        device=draw(st.sampled_from(DEVICES)),
        rows=draw(st.sampled_from(rows)),
        cancel_to=draw(st.sampled_from([CANCEL_TO, 1e-2, 1e-1])),
        seed=draw(st.integers(0, 2**16)),
    )


def make_layer(case, perturb=True):
    """Build the case's base nn.Linear and its adapter; with perturb=True, give every adapter tensor random values.

    case["rows"] == "cancel": every other row of W0 is rebuilt as -dW_i + a small vector, so that norm(V_i) is
    cancel_to * (norm(W0_i) + norm(dW_i)) or so (needs perturb). "zero": row 0 of W0 is zero (with B != 0 there),
    and with two or more rows the last row of W0 and of every B are zero too, so V_i = 0: the eps guard.
    """
    torch.manual_seed(case["seed"])
    base = nn.Linear(case["in_features"], case["out_features"], bias=case["bias"])
    if case["bias"]:
        nn.init.normal_(base.bias)  # a visible bias, so a merge that drops it shows
    base = base.to(device=case["device"], dtype=case["dtype"])
    rows = case.get("rows", "random")
    layer = METHODS[case["method"]](base, r=case["r"], alpha=case["alpha"], **case["options"])
    if perturb:
        perturb_adapters(layer, case["seed"])
    if rows == "cancel" and perturb:
        layer = _with_cancelling_rows(layer, case)
    elif rows == "zero":
        layer = _with_zero_rows(layer, perturb)
    return layer.base, layer


def _rebuilt(layer, weight):
    """The same adapter (same tensors) around a base whose weight is `weight`: wrapping again takes D2-LoRA's
    target norms from the new weight, as wrapping always does."""
    base = copy.deepcopy(layer.base)
    with torch.no_grad():
        base.weight.copy_(weight)
    new = type(layer)(base, r=layer.r, alpha=layer.alpha, dropout=layer.dropout, **layer.options())
    own = {k: v for k, v in layer.state_dict().items() if not k.startswith("base.") and k != "target_norm"}
    new.load_state_dict(own, strict=False)
    return new


@torch.no_grad()
def _with_cancelling_rows(layer, case):
    g = torch.Generator().manual_seed(case["seed"] + 7)
    dW = layer.delta_weight().double().cpu()  # (out, in)
    W0 = layer.base.weight.detach().double().cpu().clone()
    for i in range(0, W0.shape[0], 2):
        size = dW[i].norm()
        if size == 0:
            continue
        u = torch.randn(W0.shape[1], generator=g, dtype=torch.float64)  # a random direction
        W0[i] = -dW[i] + u / u.norm() * (2 * size * case["cancel_to"])  # norm(V_i) = 2 cancel_to norm(dW_i)
    return _rebuilt(layer, W0)


@torch.no_grad()
def _with_zero_rows(layer, perturb):
    W0 = layer.base.weight.detach().clone()
    W0[0] = 0.0
    if not perturb:  # a fresh adapter around the new weight (DoRA's magnitude starts at its norms)
        base = copy.deepcopy(layer.base)
        base.weight.copy_(W0)
        return type(layer)(base, r=layer.r, alpha=layer.alpha, dropout=layer.dropout, **layer.options())
    new = _rebuilt(layer, W0)
    if W0.shape[0] > 1:
        with torch.no_grad():
            new.base.weight[-1] = 0.0
            if hasattr(new, "target_norm"):
                new.target_norm[-1] = 0.0
            if hasattr(new, "magnitude"):  # DoRA: a zero row of V goes with a zero magnitude (as at init)
                new.magnitude[-1] = 0.0
            for name, p in new.named_parameters():
                if name.startswith("lora_B"):
                    p[-1] = 0.0  # V's last row is exactly zero: only the eps guard stands between it and NaN
    return new


def cancellation_ratio(layer):
    """max over rows of (norm(W0_i) + norm(dW_i)) / norm(V_i), computed in float64 from the layer's tensors: how
    many digits a row loses to cancellation. Tolerances near cancellation are multiplied by it (>= 1)."""
    with torch.no_grad():
        lay = copy.deepcopy(layer).double()
        W0, dW = lay.base.weight, lay.delta_weight()
        V = W0 + dW
        num = W0.norm(dim=1) + dW.norm(dim=1)
        v = V.norm(dim=1)
        live = v > 0
        ratio = (num[live] / v[live]).max().item() if live.any() else 1.0
    return max(1.0, ratio)


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


# --- what each method does, to first order ---------------------------------------------------------------------------


def _d2lora_first_order(layer, W0, u, tan, rad):
    if not layer.project:
        return W0 + tan + rad, True  # a rank-2r LoRA: W0 + dW, exactly
    return (W0 + 2 * tan + rad if layer.readd_delta else W0 + tan), False


# method name -> f(layer, W0, u, tan, rad) -> (the weight it applies to first order in its update, whether exactly):
#   LoRA, D2-LoRA without projection   W0 + tan + rad   (exactly: W0 + dW)
#   D2-LoRA, the paper's form          W0 + 2 tan + rad
#   D2-LoRA, the exact-norm form       W0 + tan
#   DoRA                               W0 + tan + (magnitude - norm(W0)) u
# A new method states its form here (tests/nn/test_adapters.py::test_first_order_form_of_every_method asks for it).
FIRST_ORDER = {
    "lora": lambda layer, W0, u, tan, rad: (W0 + tan + rad, True),
    "dora": lambda layer, W0, u, tan, rad: (W0 + tan + (layer.magnitude - row_norm(W0))[:, None] * u, False),
    "d2lora": _d2lora_first_order,
}


def first_order_weight(layer):
    """(the weight a layer applies to first order in its update, whether that form is exact) from FIRST_ORDER
    (docs/DESIGN.md, "What each method does, to first order"). Per row, u_i = W0_i / norm(W0_i), rad_i = (dW_i . u_i) u_i
    stretches the row, tan_i = dW_i - rad_i turns it."""
    name = method_name(layer)
    if name not in FIRST_ORDER:
        raise NotImplementedError(f"state the first-order form of {name!r} in FIRST_ORDER (tests/helpers.py)")
    W0, dW = layer.base.weight, layer.delta_weight()  # (out, in) each
    u = W0 / row_norm(W0)[:, None]  # (out, in): unit rows
    rad = (dW * u).sum(1, keepdim=True) * u  # (out, in): the part of each row's update along the row
    return FIRST_ORDER[name](layer, W0, u, tan=dW - rad, rad=rad)  # tan: the part across it


# --- small models, a tiny training task, and what a refused call leaves alone ---------------------------------------

SMALL = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, d_model=16)  # two blocks, 16 wide
NARROW = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=8)  # one block, 8 wide


def small_gpt(seed=0, device="cpu", dtype=torch.float32, config=SMALL):
    torch.manual_seed(seed)
    return GPT(config).to(device=device, dtype=dtype)


def narrow_gpt(seed=0):
    return small_gpt(seed, config=NARROW)


def counting(step):
    """A batch of 4 counting sequences for narrow_gpt ('k, k+1, ...' mod 32 from a random start), by step."""
    g = torch.Generator().manual_seed(step)
    seq = (torch.randint(0, 32, (4, 1), generator=g) + torch.arange(9)) % 32
    return seq[:, :-1], seq[:, 1:]


def quiet(**kw):
    """A TrainConfig for tiny runs: no progress bar, lr 1e-2, one warmup step."""
    return TrainConfig(**{"progress": False, "lr": 1e-2, "warmup_steps": 1, **kw})


def snapshot(model):
    """Everything a failed call must leave alone: module types, parameter values and requires_grad flags."""
    return ([type(m).__name__ for m in model.modules()],
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})  # fmt: skip


def assert_untouched(model, before):
    types, params = snapshot(model)
    assert types == before[0]
    assert params.keys() == before[1].keys()
    for n, (t, flag) in params.items():
        assert torch.equal(t, before[1][n][0]) and flag == before[1][n][1], n


class Conv1D(nn.Module):
    """Stands in for transformers.pytorch_utils.Conv1D (GPT-2's layer): weight (in, out), x @ weight + bias."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias
