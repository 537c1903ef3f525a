"""Adding a method is one file, one registry line and its first-order form in the tests (d2lora_min/nn/registry.py): a
toy method added that way (tests/nn/toy_method.py) passes the suite's method-generic tests, and inject_adapters,
adapter files, the comparison's method specs, make bench and make tour pick it up without naming it anywhere. What
else a method needs: golden cases (test_golden asks every registered method for them)."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from d2lora_min.nn import inject_adapters, load_adapters, merge_adapters, save_adapters
from tiny_gpt import GPT, GPTConfig

from . import toy_method

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def toy(monkeypatch):
    toy_method.register(monkeypatch.setitem)  # undone after the test
    yield toy_method.NAME


def test_a_registered_method_injects_saves_loads_and_merges(toy, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=8))
    reference = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=8))
    reference.load_state_dict(model.state_dict())
    inject_adapters(model, toy, r=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save_adapters(model, tmp_path)
    x = torch.randint(0, 32, (2, 8))
    loaded = load_adapters(reference, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
        before = model(x)[0]
        merge_adapters(model)
        assert torch.allclose(model(x)[0], before, atol=1e-5)


def test_the_comparison_bench_and_tour_pick_up_a_registered_method(toy):
    from d2lora_min import tour
    from d2lora_min.train import bench
    from d2lora_min.train.settings import CompareConfig
    from d2lora_min.train.specs import parse_method_spec

    spec = parse_method_spec("rslora:r=2,rank_stabilized=false", CompareConfig())
    assert (spec.name, spec.r, spec.options) == ("rslora", 2, {"rank_stabilized": False})
    assert spec.label == "rslora(r=2, rank_stabilized=False)"  # no display name registered: the name itself
    assert ("rslora(r)", toy, {"r": 4}) in bench.methods()
    paths, _, _ = tour.toy_paths(steps=3)
    assert "rslora" in paths


# The method-generic tests: every property test that draws from every method, the whole-model and adapter-file tests
# over every method, and the golden set's coverage.
GENERIC = ["tests/nn/test_adapters.py", "tests/nn/test_inject.py", "tests/nn/test_checkpoint.py", "tests/files/test_adapter_file.py",
           "tests/nn/test_golden.py::test_the_golden_set_covers_what_a_port_gets_wrong"]  # fmt: skip


def test_the_method_generic_tests_pass_on_a_method_added_as_the_docs_say(tmp_path):
    report = tmp_path / "report.xml"
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.nn.toy_method", "-p", "no:cacheprovider", "-q",
           f"--junitxml={report}", *GENERIC]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    cases = {f"{c.get('classname')}.{c.get('name')}": c for c in ET.parse(report).iter("testcase")}
    failed = {name: c for name, c in cases.items() if c.find("failure") is not None or c.find("error") is not None}
    golden = "tests.nn.test_golden.test_the_golden_set_covers_what_a_port_gets_wrong"
    # the one failure: golden cases, which a new method needs beside its file (d2lora_min/reference.py and
    # scripts/make_golden.py, then `make golden`)
    assert set(failed) == {golden}, out.stdout[-3000:]
    assert "rslora: no rectangular, no-bias, 3-D case" in failed[golden].find("failure").get("message")
    assert not any(c.find("skipped") is not None for c in cases.values())
    # the tests parametrised by method ran on the toy alone (the property tests draw from it alone likewise)
    by_method = ["test_adapters.test_lora_A_is_drawn_like_nn_linear_weights_not_smaller",
                 "test_inject.test_merge_adapters_keeps_the_logits_and_leaves_no_adapter",
                 "test_checkpoint.test_adapter_checkpoint_round_trip",
                 "test_adapter_file.test_an_adapter_loads_only_onto_the_base_it_was_trained_on"]  # fmt: skip
    for test in by_method:
        params = [set(name.split("[")[1].rstrip("]").split("-")) for name in cases if f".{test}[" in name]
        assert params and all("rslora" in p and not p & {"lora", "dora", "d2lora"} for p in params), (test, params)
