"""The checked-in golden vectors (tests/golden/) are reproduced by the torch layers (both paths) and by the NumPy
reference, and a port that skips the eps guard or puts dropout on the wrong branch fails them.

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

from .golden.make_golden import CASES, TOLERANCE, check_against_reference, outputs

FOLDER = Path(__file__).parent / "golden"


def load_case(name):
    return json.loads((FOLDER / f"{name}.json").read_text()), load_file(FOLDER / f"{name}.safetensors")


def test_every_case_has_its_files_and_nothing_is_stale():
    assert {p.stem for p in FOLDER.glob("*.json")} == set(CASES)
    assert {p.stem for p in FOLDER.glob("*.safetensors")} == set(CASES)


def test_the_golden_set_covers_what_a_port_gets_wrong():
    metas = {name: load_case(name)[0] for name in CASES}
    assert {m["method"] for m in metas.values() if not m["bias"]} == set(METHODS)  # every method without bias
    assert any(len(m["shapes"]["x"]) == 3 for m in metas.values())  # a 3-D input
    assert any(m["shapes"]["W0"][0] != m["shapes"]["W0"][1] and m["r"] > 1 and all(d % m["r"] for d in m["shapes"]["W0"]) for m in metas.values())
    assert any(m["dropout"] > 0 and "dropout_mask" in m["shapes"] for m in metas.values())
    assert {m["dtype"] for m in metas.values()} == {"float32", "float64"}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_layers_reproduce_the_golden_vectors(name, fast):
    meta, stored = load_case(name)
    out_f, in_f = stored["W0"].shape
    base = nn.Linear(in_f, out_f, bias=meta["bias"]).to(stored["W0"].dtype)
    with torch.no_grad():
        base.weight.copy_(stored["W0"])
        if meta["bias"]:
            base.bias.copy_(stored["bias"])
    layer = METHODS[meta["method"]](base, r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"], **meta["options"])
    layer.fast = fast
    with torch.no_grad():
        for n, t in layer.state_dict().items():
            if n in stored:
                t.copy_(stored[n])
    got, trainable = outputs(layer, stored["x"], stored["grad_output"])
    assert trainable == meta["trainable"]
    assert set(got) == set(stored)
    for k, want in stored.items():
        scale = max(1.0, want.abs().max().item())
        assert (got[k] - want).abs().max().item() <= TOLERANCE[meta["dtype"]] * scale, k


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_reference_reproduces_the_golden_vectors(name):
    check_against_reference(name, load_case(name)[1])


def _reference_inputs(name):
    meta, t = load_case(name)
    n = {k: v.double().numpy() for k, v in t.items()}
    params = {k: n[k] for k in ("lora_A", "lora_B", "magnitude", "lora_A_pos", "lora_B_pos", "lora_A_neg", "lora_B_neg", "tau") if k in n}
    return meta, n, params


@pytest.mark.parametrize("name", ["d2lora_eps", "dora_eps"])
def test_a_port_without_the_eps_guard_fails_the_eps_cases(name, monkeypatch):
    meta, n, params = _reference_inputs(name)
    monkeypatch.setattr(ref, "NORM_EPS", 0.0)  # a port that divides by the raw norm
    with np.errstate(invalid="ignore", divide="ignore"):
        y = ref.forward(meta["method"], n["x"], n["W0"], n.get("bias"), params, meta["alpha"])
    assert not np.allclose(y, n["y"], equal_nan=False)  # 0 / 0 = NaN where the golden file has a number


@pytest.mark.parametrize("name", ["dora_dropout", "d2lora_dropout"])
def test_a_port_with_dropout_on_both_branches_fails_the_dropout_cases(name):
    meta, n, params = _reference_inputs(name)
    xd = n["x"] * n["dropout_mask"] / (1 - meta["dropout"])
    y_wrong = ref.forward(meta["method"], xd, n["W0"], n.get("bias"), params, meta["alpha"])  # W0 sees dropout(x) too
    assert not np.allclose(y_wrong, n["y"], atol=1e-6)
