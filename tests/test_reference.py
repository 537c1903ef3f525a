"""The torch layers against the NumPy reference (d2lora_min/reference.py), in float64, for random shapes,
ranks, options and non-zero adapter tensors: outputs, merged weights, gradients, parameter counts."""

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from d2lora_min import reference as ref
from d2lora_min.nn import METHODS

from .helpers import layer_cases, make_layer, random_input


def numpy_params(layer):
    """The adapter tensors of a torch layer as {torch name: float64 array} (tau included when fixed)."""
    return {n: t.detach().cpu().double().numpy() for n, t in layer.state_dict().items() if not n.startswith("base.") and n != "target_norm"}


def reference_options(case):
    return {"project": case["options"].get("project", True)}


REF_METHODS = ("lora", "dora", "d2lora")  # the methods the reference implements
cases = layer_cases(methods=REF_METHODS).map(lambda c: {**c, "dtype": torch.float64})


@given(cases)
def test_forward_and_merged_weight_match_the_reference(case):
    base, layer = make_layer(case)
    x = random_input(case)
    W0 = base.weight.detach().cpu().numpy()
    b = None if base.bias is None else base.bias.detach().cpu().numpy()
    p = numpy_params(layer)
    y_ref = ref.forward(case["method"], x.cpu().numpy(), W0, b, p, case["alpha"], **reference_options(case))
    np.testing.assert_allclose(layer(x).detach().cpu().numpy(), y_ref, rtol=1e-10, atol=1e-10)
    W_ref = ref.merged_weight(case["method"], W0, p, case["alpha"], **reference_options(case))
    np.testing.assert_allclose(layer.merged_weight().detach().cpu().numpy(), W_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.delta_weight().detach().cpu().numpy(), ref.delta_weight(case["method"], p, case["alpha"]), rtol=1e-10, atol=1e-12)


@given(cases)
def test_gradients_match_the_reference(case):
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
        G.cpu().numpy(), project=case["options"].get("project", True), detach_norm=case["options"].get("detach_norm"),
    )  # fmt: skip
    for name, got in zip(["x"] + names, grads):
        want = expected[name]
        scale = max(1.0, np.abs(want).max())
        np.testing.assert_allclose(got.detach().cpu().numpy(), want, rtol=0, atol=1e-9 * scale, err_msg=name)


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
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"numpy"}, imported


def test_zero_row_stays_zero_in_the_reference():
    W0 = np.array([[0.0, 0.0], [3.0, 4.0]])
    p = {"lora_A_pos": np.ones((1, 2)), "lora_B_pos": np.zeros((2, 1)), "lora_A_neg": np.ones((1, 2)),
         "lora_B_neg": np.zeros((2, 1)), "tau": np.asarray(0.5)}  # fmt: skip
    W = ref.merged_weight("d2lora", W0, p, alpha=1.0)
    assert np.all(np.isfinite(W)) and np.all(W[0] == 0)
