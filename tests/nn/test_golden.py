"""The checked-in golden vectors (tests/golden/) are reproduced by the torch layers (both paths) and by the NumPy
reference; the set covers what it claims to; and a port that gets one thing wrong fails them: no eps guard, dropout
on both branches, the norm over the wrong axis, no k_i = 0 rule below eps, or D2-LoRA's re-added dW forgotten in
the forward pass, the merge or the backward pass.

If this fails after an intended change of the math, regenerate with `make golden` and say why in the commit.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from d2lora_min import reference as ref
from d2lora_min.nn import METHODS
from d2lora_min.nn.fused import set_fused
from scripts.make_golden import (
    CASES,
    TOLERANCE,
    TOLERANCE_RULE,
    check_against_reference,
    outputs,
    reference_inputs,
    reference_options,
)

FOLDER = Path(__file__).resolve().parents[1] / "golden"


def load_case(name):
    return json.loads((FOLDER / f"{name}.json").read_text()), load_file(FOLDER / f"{name}.safetensors")


METAS = {name: load_case(name)[0] for name in CASES}


def names_where(pred):
    return [name for name, meta in METAS.items() if pred(meta)]


def is_paper_form(meta):  # D2-LoRA, W = P(V) + dW
    return meta["method"] == "d2lora" and meta["options"]["project"] and meta["options"]["readd_delta"]


def is_projected(meta):  # W = c[:, None] * V (+ dW) with a norm-based c
    return meta["method"] == "dora" or (meta["method"] == "d2lora" and meta["options"]["project"])


PAPER_FORM = names_where(is_paper_form)
EPS_CASES = names_where(lambda m: m["special_row"] in ("zero_v_row", "zero_v_row_magnitude"))
DROPOUT_CASES = names_where(lambda m: m["mode"] == "train")
SQUARE_CASES = names_where(lambda m: m["square"] and is_projected(m) and m["special_row"] is None)


def misses(got, want, tol):
    """Whether `got` fails the golden rule for `want` (per tensor: max |got - want| > tol * max(1, max |want|))."""
    err = np.abs(np.asarray(got) - np.asarray(want)).max()
    return not err <= tol * max(1.0, float(np.abs(want).max()))  # NaN counts as a miss


def reference_run(name, **changes):
    """The reference's (y, merged weight, gradients) for a case, with `changes` to the reference options."""
    meta, t = load_case(name)
    n, params = reference_inputs(t)
    form, grad_options = reference_options({**METHODS[meta["method"]].OPTIONS, **meta["options"]})
    form = {k: changes.get(k, v) for k, v in form.items()}
    grad_options = {k: changes.get(k, v) for k, v in grad_options.items()}
    drop = {"mask": n["dropout_mask"], "p": meta["dropout"]} if "dropout_mask" in n else {}
    args = (meta["method"], n["x"], n["W0"], n.get("bias"), params, meta["alpha"])
    y = ref.forward(*args, **form, **drop)
    W = ref.merged_weight(meta["method"], n["W0"], params, meta["alpha"], **form)
    grads = ref.gradients(*args, n["grad_output"], **grad_options, **drop)
    return meta, n, y, W, grads


# --- the files and what they hold ---------------------------------------------------------------------------


def test_every_case_has_its_files_and_nothing_is_stale():
    assert {p.stem for p in FOLDER.glob("*.json")} == set(CASES)
    assert {p.stem for p in FOLDER.glob("*.safetensors")} == set(CASES)


def test_every_json_records_every_option_the_mode_and_the_tolerance():
    for name, meta in METAS.items():
        assert set(meta["options"]) == set(METHODS[meta["method"]].OPTIONS), name
        assert meta["tolerance"] == {"tol": TOLERANCE[meta["dtype"]], "rule": TOLERANCE_RULE}, name
        assert meta["mode"] in ("train", "eval") and (meta["mode"] == "train") == ("dropout_mask" in meta["shapes"]), (
            name
        )
        assert meta["mode"] == "eval" or meta["dropout"] > 0, name
        assert ("grad.tau" in meta["shapes"]) == bool(meta["options"].get("learn_tau")), name  # tau fixed by default
        assert {f"grad.{k}" for k in meta["trainable"]} | {"grad.x", "grad_output"} == {
            k for k in meta["shapes"] if k.startswith("grad")
        }


def test_case_names_are_true():
    for name, meta in METAS.items():
        out_f, in_f = meta["shapes"]["W0"]
        assert meta["square"] == (out_f == in_f), name
        if "_3d" in name:
            assert len(meta["shapes"]["x"]) == 3, name
        if "rect" in name:
            assert out_f != in_f and in_f % meta["r"] and out_f % meta["r"], name
        if "nobias" in name:
            assert not meta["bias"], name
        if "float32" in name or "bfloat16" in name:
            assert meta["dtype"] in name, name
        if "dropout" in name:
            assert meta["dropout"] > 0 and meta["mode"] == ("eval" if name.endswith("_eval") else "train"), name
        if "exact" in name:
            assert meta["options"]["readd_delta"] is False, name


def _row_norms_of_V(name):
    meta, t = load_case(name)
    n, params = reference_inputs(t)
    dW = ref.delta_weight(meta["method"], params, meta["alpha"])  # (out, in)
    return n["W0"], dW, ref.row_norm(n["W0"] + dW), params


def _rect_odd_nobias_3d(meta):  # out != in, a rank dividing neither, no bias, a 3-D input
    out_f, in_f = meta["shapes"]["W0"]
    return (
        out_f != in_f and out_f % meta["r"] and in_f % meta["r"] and not meta["bias"] and len(meta["shapes"]["x"]) == 3
    )


def test_the_golden_set_covers_what_a_port_gets_wrong():
    for method, cls in METHODS.items():
        of = [METAS[name] for name in CASES if METAS[name]["method"] == method]
        assert any(map(_rect_odd_nobias_3d, of)), f"{method}: no rectangular, no-bias, 3-D case"
        assert any(m["mode"] == "train" for m in of), f"{method}: no dropout in training mode"
        assert any(m["dtype"] == "float32" for m in of), f"{method}: no float32 case"
        for option, default in cls.OPTIONS.items():  # every option away from its default somewhere
            assert any(m["options"][option] != default for m in of), f"{method}: {option} never changed"
        if method != "lora":  # the norm axis: a square case with the method's default options
            assert any(m["square"] and m["options"] == cls.OPTIONS for m in of), f"{method}: no square default case"
    for readd in (True, False):  # both projected D2-LoRA forms: a zero W0 row, a zero V row, dropout in training mode
        of = [
            m
            for m in METAS.values()
            if m["method"] == "d2lora" and m["options"]["project"] and m["options"]["readd_delta"] == readd
        ]
        assert {"zero_w0_row", "zero_v_row"} <= {m["special_row"] for m in of}, readd
        assert any(m["mode"] == "train" for m in of), readd
    dora_rows = {m["special_row"] for m in METAS.values() if m["method"] == "dora"}
    assert {"zero_v_row", "zero_v_row_magnitude"} <= dora_rows  # DoRA's eps row with magnitude 0 and with m != 0
    assert any(m["special_row"] == "tiny_v_row" and not m["options"]["detach_norm"] for m in METAS.values())  # k_i = 0
    assert any(m["method"] == "dora" and m["special_row"] and not m["options"]["detach_norm"] for m in METAS.values())
    assert any(m["dtype"] == "bfloat16" for m in METAS.values())  # c rounded to the layer's dtype before c * h
    assert names_where(lambda m: m["mode"] == "eval" and m["dropout"] > 0)  # dropout > 0 in eval mode: no mask


def test_the_special_rows_are_what_they_claim():
    for name, meta in METAS.items():
        if meta["special_row"] is None:
            continue
        W0, dW, v_norm, params = _row_norms_of_V(name)
        if meta["special_row"] == "zero_w0_row":
            assert (W0[1] == 0).all() and (dW[1] != 0).any(), name
        elif meta["special_row"] == "tiny_v_row":
            assert 0 < v_norm[1] < ref.NORM_EPS and not meta["options"]["detach_norm"], name
        else:  # V's row exactly zero; DoRA's magnitude zero there or not
            assert (W0[1] + dW[1] == 0).all(), name
            if meta["method"] == "dora":
                assert (params["magnitude"][1] != 0) == (meta["special_row"] == "zero_v_row_magnitude"), name


# --- the torch layers and the reference reproduce them -------------------------------------------------------


def layer_from_case(meta, stored, fused):
    out_f, in_f = stored["W0"].shape
    base = nn.Linear(in_f, out_f, bias=meta["bias"]).to(stored["W0"].dtype)
    with torch.no_grad():
        base.weight.copy_(stored["W0"])
        if meta["bias"]:
            base.bias.copy_(stored["bias"])
    layer = METHODS[meta["method"]](base, r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"], **meta["options"])
    set_fused(layer, fused)
    with torch.no_grad():
        for n, t in layer.state_dict().items():
            if n in stored:
                t.copy_(stored[n])
    return layer


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_layers_reproduce_the_golden_vectors(name, fused):
    meta, stored = load_case(name)
    layer = layer_from_case(meta, stored, fused)
    got, trainable = outputs(layer, stored["x"], stored["grad_output"], meta["mode"])
    assert trainable == meta["trainable"]
    assert set(got) == set(stored)
    wrong = [
        k
        for k, want in stored.items()
        if misses(got[k].double().numpy(), want.double().numpy(), meta["tolerance"]["tol"])
    ]
    assert not wrong, f"tensors that differ from the golden file: {wrong}"


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_reference_reproduces_the_golden_vectors(name):
    check_against_reference(name, load_case(name)[1])


def test_eval_mode_cases_apply_their_merged_weight():
    for name in names_where(lambda m: m["mode"] == "eval"):
        meta, t = load_case(name)
        n, _ = reference_inputs(t)
        y = n["x"] @ n["merged_weight"].T + (n["bias"] if meta["bias"] else 0)
        assert not misses(y, n["y"], 10 * meta["tolerance"]["tol"]), name


def test_zero_w0_rows_merge_to_dW_in_the_paper_form_and_to_zero_in_the_exact_norm_form():
    for name in names_where(lambda m: m["special_row"] == "zero_w0_row"):
        meta, t = load_case(name)
        _, dW, _, _ = _row_norms_of_V(name)
        row = t["merged_weight"][1].numpy()
        if meta["options"]["readd_delta"]:
            np.testing.assert_allclose(row, dW[1], rtol=0, atol=1e-14, err_msg=name)  # P's row is 0 (t = 0), + dW's
        else:
            assert (row == 0).all(), name


@pytest.mark.parametrize("name", ["dora_eps_magnitude", "dora_attached_eps"])
def test_dora_eps_magnitude_row_is_finite_and_large_where_it_should_be(name):
    meta, t = load_case(name)
    n, _ = reference_inputs(t)
    assert all(np.isfinite(v).all() for v in n.values())  # the torch layer (float64) gave finite values throughout
    assert (n["y"][:, 1] == n["bias"][1]).all()  # c = m / eps multiplies a zero row: the output is the bias
    assert (n["merged_weight"][1] == 0).all()
    # dL/dB_1 = s * c_1 * sum_t G_t1 z_t with c_1 = m_1 / eps: about 2e12 here; the other rows, at their own scale
    grads = reference_run(name)[4]
    assert np.abs(n["grad.lora_B"][1]).max() > 1e10
    for i in range(n["grad.lora_B"].shape[0]):
        assert not misses(grads["lora_B"][i], n["grad.lora_B"][i], meta["tolerance"]["tol"]), i


# --- a port that gets one thing wrong fails them --------------------------------------------------------------


@pytest.mark.parametrize("name", EPS_CASES)
def test_a_port_without_the_eps_guard_fails_the_eps_cases(name, monkeypatch):
    monkeypatch.setattr(ref, "NORM_EPS", 0.0)  # a port that divides by the raw norm
    with np.errstate(invalid="ignore", divide="ignore"):
        meta, n, y, _, _ = reference_run(name)
    assert misses(y, n["y"], meta["tolerance"]["tol"])  # 0 / 0 or m / 0 times 0 = NaN where the file has a number


@pytest.mark.parametrize("name", DROPOUT_CASES)
def test_a_port_with_dropout_on_both_branches_fails_the_dropout_cases(name):
    meta, t = load_case(name)
    n, params = reference_inputs(t)
    xd = n["x"] * n["dropout_mask"] / (1 - meta["dropout"])
    form, _ = reference_options({**METHODS[meta["method"]].OPTIONS, **meta["options"]})
    y_wrong = ref.forward(
        meta["method"], xd, n["W0"], n.get("bias"), params, meta["alpha"], **form
    )  # W0 sees dropout(x) too
    assert misses(y_wrong, n["y"], meta["tolerance"]["tol"])


@pytest.mark.parametrize("name", SQUARE_CASES)
def test_a_port_with_the_norm_over_the_wrong_axis_fails_the_square_cases(name, monkeypatch):
    monkeypatch.setattr(ref, "row_norm", lambda W: np.sqrt(np.sum(W * W, axis=0)))  # column norms: same shape here
    meta, n, y, W, _ = reference_run(name)
    assert misses(y, n["y"], meta["tolerance"]["tol"]) and misses(W, n["merged_weight"], meta["tolerance"]["tol"])


def test_a_port_without_the_k_rule_below_eps_fails_the_below_eps_case(monkeypatch):
    def k_without_rule(grad_c, c, norm):  # divides by the raw norm where norm(V_i) < eps
        return -grad_c * c / norm**2

    monkeypatch.setattr(ref, "norm_gradient_factor", k_without_rule)
    meta, n, y, W, grads = reference_run("d2lora_below_eps")
    assert not misses(y, n["y"], meta["tolerance"]["tol"])  # the forward pass is unchanged ...
    assert misses(grads["lora_B_pos"], n["grad.lora_B_pos"], meta["tolerance"]["tol"])  # ... its gradient is not


@pytest.mark.parametrize("name", PAPER_FORM)
def test_a_port_that_forgets_the_re_added_dW_fails_the_paper_form_cases(name):
    meta, n, y, W, grads = reference_run(name, readd_delta=False)  # the exact-norm form throughout
    tol = meta["tolerance"]["tol"]
    assert misses(y, n["y"], tol)  # forgotten in the forward pass
    assert misses(W, n["merged_weight"], tol)  # forgotten in the merge
    assert misses(grads["lora_B_pos"], n["grad.lora_B_pos"], tol)  # forgotten in the backward pass (dL/dlow = G * c)
