"""The checked-in golden vectors (tests/golden/) are reproduced by the torch layers and by the NumPy reference.

If this fails after an intended change of the math, regenerate with `make golden` and say why in the commit.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from d2lora_min.nn import METHODS

from .golden.make_golden import CASES, check_against_reference, outputs

FOLDER = Path(__file__).parent / "golden"


def test_every_case_has_its_files_and_nothing_is_stale():
    on_disk = {p.stem for p in FOLDER.glob("*.json")}
    assert on_disk == set(CASES)
    assert {p.stem for p in FOLDER.glob("*.safetensors")} == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_layers_reproduce_the_golden_vectors(name):
    meta = json.loads((FOLDER / f"{name}.json").read_text())
    stored = load_file(FOLDER / f"{name}.safetensors")
    out_f, in_f = stored["W0"].shape
    base = nn.Linear(in_f, out_f).double()
    with torch.no_grad():
        base.weight.copy_(stored["W0"])
        base.bias.copy_(stored["bias"])
    layer = METHODS[meta["method"]](base, r=meta["r"], alpha=meta["alpha"], **meta["options"])
    with torch.no_grad():
        for n, t in layer.state_dict().items():
            if n in stored:
                t.copy_(stored[n])
    got, trainable = outputs(layer, stored["x"], stored["grad_output"])
    assert trainable == meta["trainable"]
    assert set(got) == set(stored)
    for k, want in stored.items():
        scale = max(1.0, want.abs().max().item())
        assert (got[k] - want).abs().max().item() <= 1e-12 * scale, k


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_reference_reproduces_the_golden_vectors(name):
    meta = json.loads((FOLDER / f"{name}.json").read_text())
    check_against_reference(meta["method"], meta["options"], load_file(FOLDER / f"{name}.safetensors"))
