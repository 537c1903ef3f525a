"""The torch layers against the NumPy reference (d2lora_min/reference.py), in float64, for random shapes,
ranks, options (D2-LoRA's both forms, with and without projection, tau learned or fixed, norm attached or detached)
and non-zero adapter tensors, zero and nearly cancelling rows: outputs, merged weights, gradients (also with dropout
in training mode), parameter counts; and the reference's hand-written gradients against its own forward pass."""

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from d2lora_min import reference as ref
from d2lora_min.nn import METHODS

from ..helpers import cancellation_ratio, layer_cases, make_layer, random_input


def numpy_params(layer):
    """The adapter tensors of a torch layer as {torch name: float64 array} (tau included when fixed)."""
    return {
        n: t.detach().cpu().double().numpy()
        for n, t in layer.state_dict().items()
        if not n.startswith("base.") and n != "target_norm"
    }


def form_options(case):
    """The options that change the weight: the reference's keywords for forward() and merged_weight()."""
    return {k: case["options"][k] for k in ("project", "readd_delta") if k in case["options"]}


def gradient_options(case):
    """form_options plus the options that change only the gradients."""
    return {
        **form_options(case),
        **{k: case["options"][k] for k in ("detach_norm", "learn_tau") if k in case["options"]},
    }


REF_METHODS = ("lora", "dora", "d2lora")  # the methods the reference implements


def _float64(case, **options):
    return {**case, "dtype": torch.float64, "options": {**case["options"], **options}}


# Every method with drawn options, and D2-LoRA's two projected forms on their own (so that each gets its examples)
CASES = {
    "any": layer_cases(methods=REF_METHODS).map(_float64),
    "d2lora_paper": layer_cases(methods=("d2lora",)).map(lambda c: _float64(c, project=True, readd_delta=True)),
    "d2lora_exact": layer_cases(methods=("d2lora",)).map(lambda c: _float64(c, project=True, readd_delta=False)),
}
KINDS = pytest.mark.parametrize("kind", list(CASES))


@KINDS
@given(data=st.data())
def test_forward_and_merged_weight_match_the_reference(kind, data):
    case = data.draw(CASES[kind])
    base, layer = make_layer(case)
    x = random_input(case)
    W0 = base.weight.detach().cpu().numpy()
    b = None if base.bias is None else base.bias.detach().cpu().numpy()
    p = numpy_params(layer)
    y_ref = ref.forward(case["method"], x.cpu().numpy(), W0, b, p, case["alpha"], **form_options(case))
    np.testing.assert_allclose(layer(x).detach().cpu().numpy(), y_ref, rtol=1e-10, atol=1e-10)
    W_ref = ref.merged_weight(case["method"], W0, p, case["alpha"], **form_options(case))
    np.testing.assert_allclose(layer.merged_weight().detach().cpu().numpy(), W_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        layer.delta_weight().detach().cpu().numpy(),
        ref.delta_weight(case["method"], p, case["alpha"]),
        rtol=1e-10,
        atol=1e-12,
    )


@KINDS
@given(data=st.data())
def test_gradients_match_the_reference(kind, data):
    case = data.draw(CASES[kind])
    base, layer = make_layer(case)
    x = random_input(case).requires_grad_(True)
    g = torch.Generator().manual_seed(case["seed"] + 2)
    y = layer(x)
    G = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = [p for n, p in layer.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * G).sum(), [x] + params)
    expected = ref.gradients(
        case["method"], x.detach().cpu().numpy(), base.weight.detach().cpu().numpy(),
        None if base.bias is None else base.bias.detach().cpu().numpy(), numpy_params(layer), case["alpha"],
        G.cpu().numpy(), **gradient_options(case),
    )  # fmt: skip
    assert set(expected) == {"x", *names}  # tau has a gradient exactly when it is learned
    ratio = cancellation_ratio(layer)  # rows that nearly cancel lose digits in both computations (tests/helpers.py)
    for name, got in zip(["x"] + names, grads):
        want = expected[name]
        scale = max(1.0, np.abs(want).max())
        np.testing.assert_allclose(got.detach().cpu().numpy(), want, rtol=0, atol=1e-9 * scale * ratio, err_msg=name)


@KINDS
@given(data=st.data(), p=st.sampled_from([0.2, 0.5]))
def test_gradients_with_dropout_in_training_mode_match_the_reference(kind, data, p):
    case = data.draw(CASES[kind])
    # the mask the torch layer draws is recovered by drawing again from the same seed (as tests/golden/ does)
    _, made = make_layer(case)
    layer = type(made)(copy.deepcopy(made.base), r=made.r, alpha=made.alpha, dropout=p, **made.options())
    layer.load_state_dict(made.state_dict())
    layer.train()
    x = random_input(case).requires_grad_(True)
    torch.manual_seed(case["seed"])
    y = layer(x)
    torch.manual_seed(case["seed"])
    mask = (F.dropout(torch.ones_like(x), p) != 0).double().cpu().numpy()
    G = torch.randn(y.shape, generator=torch.Generator().manual_seed(case["seed"] + 2), dtype=torch.float64).to(
        y.device
    )
    trainable = {n: q for n, q in layer.named_parameters() if q.requires_grad}
    grads = torch.autograd.grad((y * G).sum(), [x] + list(trainable.values()))
    W0 = layer.base.weight.detach().cpu().numpy()
    b = None if layer.base.bias is None else layer.base.bias.detach().cpu().numpy()
    args = (case["method"], x.detach().cpu().numpy(), W0, b, numpy_params(layer), case["alpha"])
    y_ref = ref.forward(*args, **form_options(case), mask=mask, p=p)
    np.testing.assert_allclose(y.detach().cpu().numpy(), y_ref, rtol=1e-10, atol=1e-10)
    expected = ref.gradients(*args, G.cpu().numpy(), **gradient_options(case), mask=mask, p=p)
    assert set(expected) == {"x", *trainable}
    ratio = cancellation_ratio(layer)
    for name, got in zip(["x", *trainable], grads):
        want = expected[name]
        np.testing.assert_allclose(
            got.detach().cpu().numpy(), want, rtol=0, atol=1e-9 * max(1.0, np.abs(want).max()) * ratio, err_msg=name
        )


# D2-LoRA's forms (projection on/off, dW re-added or not) with an attached norm and a learned tau
D2_FORMS = [
    dict(project=pr, readd_delta=rd, detach_norm=False, learn_tau=True)
    for pr, rd in itertools.product([True, False], repeat=2)
]
ATTACHED = [("lora", {}), ("dora", {"detach_norm": False})] + [("d2lora", o) for o in D2_FORMS]


@pytest.mark.parametrize(
    "method, options",
    ATTACHED,
    ids=["lora", "dora", "d2lora", "d2lora_exact", "d2lora_noproj", "d2lora_noproj_noreadd"],
)
@pytest.mark.parametrize("dropout", [False, True], ids=["eval", "dropout"])
def test_reference_gradients_are_the_derivatives_of_its_forward(method, options, dropout):
    """Central differences of L = sum(forward * G) against gradients(), independent of torch. With an attached norm
    this is the whole gradient; a detached norm is not a derivative of the forward pass, so only attached ones here
    (and a learned tau, so that dL/dtau is checked too)."""
    rng = np.random.default_rng(ATTACHED.index((method, options)) + 10 * dropout)
    out_f, in_f, r, alpha, p = 4, 3, 2, 3.0, 0.4
    W0, b = rng.normal(size=(out_f, in_f)), rng.normal(size=out_f)
    x, G = rng.normal(size=(2, 3, in_f)), rng.normal(size=(2, 3, out_f))
    names = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "magnitude"),
             "d2lora": ("lora_A_pos", "lora_B_pos", "lora_A_neg", "lora_B_neg", "tau")}[method]  # fmt: skip
    shapes = {
        "lora_B": (out_f, r),
        "lora_B_pos": (out_f, r),
        "lora_B_neg": (out_f, r),
        "magnitude": (out_f,),
        "tau": (),
    }
    params = {n: np.asarray(rng.normal(size=shapes.get(n, (r, in_f)))) for n in names}
    drop = {"mask": (rng.random(x.shape) > p).astype(float), "p": p} if dropout else {}
    form = {k: options[k] for k in ("project", "readd_delta") if k in options}

    def loss(xx, pp):
        return np.sum(ref.forward(method, xx, W0, b, pp, alpha, **form, **drop) * G)

    grads = ref.gradients(method, x, W0, b, params, alpha, G, **options, **drop)
    for name in ("x",) + names:
        value = x if name == "x" else params[name]
        numeric = np.zeros(value.shape)
        for i in np.ndindex(value.shape):

            def bumped(h):
                v = value.copy()
                v[i] += h
                return loss(v, params) if name == "x" else loss(x, {**params, name: v})

            numeric[i] = (bumped(1e-6) - bumped(-1e-6)) / 2e-6
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-6, err_msg=name)


@given(st.sampled_from(REF_METHODS), st.integers(1, 40), st.integers(1, 40), st.integers(1, 8), st.booleans())
def test_parameter_counts_match_the_reference(method, n_in, n_out, r, learn_tau):
    options = {"learn_tau": learn_tau} if method == "d2lora" else {}
    layer = METHODS[method](torch.nn.Linear(n_in, n_out), r=r, alpha=1.0, **options)
    count = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert count == ref.trainable_parameter_count(method, n_in, n_out, r, learn_tau=learn_tau)


def test_reference_does_not_import_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(ref))
    imported = {
        a.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for a in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= {"numpy"}, imported


def test_zero_rows_in_the_reference():
    # a zero row of W0 with a non-zero B row: t = 0, so P(V)'s row is 0; the paper's form re-adds dW's row
    W0 = np.array([[0.0, 0.0], [3.0, 4.0]])
    p = {"lora_A_pos": np.ones((1, 2)), "lora_B_pos": np.array([[2.0], [0.0]]), "lora_A_neg": np.ones((1, 2)),
         "lora_B_neg": np.zeros((2, 1)), "tau": np.asarray(0.5)}  # fmt: skip
    dW = ref.delta_weight("d2lora", p, alpha=1.0)  # (2, 2): row 0 is [2, 2]
    exact = ref.merged_weight("d2lora", W0, p, alpha=1.0, readd_delta=False)
    paper = ref.merged_weight("d2lora", W0, p, alpha=1.0)
    assert np.all(np.isfinite(exact)) and np.all(exact[0] == 0)
    assert np.array_equal(paper[0], dW[0]) and np.array_equal(paper[0], [2.0, 2.0])
    # a row of V exactly zero (B's row 0 too): the eps guard keeps it zero and finite in both forms
    p["lora_B_pos"] = np.zeros((2, 1))
    for readd in (True, False):
        W = ref.merged_weight("d2lora", W0, p, alpha=1.0, readd_delta=readd)
        assert np.all(np.isfinite(W)) and np.all(W[0] == 0)
