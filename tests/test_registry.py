"""Adding a method is one file and one registry line: a toy method registered here is picked up by
inject_adapters, adapter files, the comparison's method specs, make bench and make tour without naming it anywhere."""

import pytest
import torch
import torch.nn as nn

import d2lora_min.nn.registry as registry
from d2lora_min.nn import LoRALinear, inject_adapters, load_adapters, merge_adapters, save_adapters
from tiny_gpt import GPT, GPTConfig


class HalfLoRALinear(LoRALinear):
    """A toy method: LoRA whose update is halved. W = W0 + 0.5 * s * B @ A."""

    OPTIONS = {"half": True}

    def __init__(self, base, r, alpha, dropout=0.0, half=True):
        super().__init__(base, r, alpha, dropout)
        self.half = half
        self.factor = 0.5 if half else 1.0

    def delta_weight(self):
        return self.factor * super().delta_weight()

    def forward(self, x):
        return nn.functional.linear(x, self.base.weight, self.base.bias) + self.factor * self._low_rank(x, self.lora_A, self.lora_B)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "halflora", HalfLoRALinear)  # the one registry line
    yield "halflora"


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
    from d2lora_min.train import bench, tour
    from d2lora_min.train.presets import CompareConfig
    from d2lora_min.train.specs import parse_method_spec

    spec = parse_method_spec("halflora:r=2,half=false", CompareConfig())
    assert (spec.name, spec.r, spec.options) == ("halflora", 2, {"half": False})
    assert spec.label == "halflora(r=2, half=False)"  # no display name registered: the name itself
    assert ("halflora(r)", toy, {"r": 4}) in bench.bench_methods()
    paths, _, _ = tour.toy_paths(steps=3)
    assert "halflora" in paths

