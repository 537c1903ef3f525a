"""examples/hf_recipe.py does what it says on a Hugging Face model, and inject_adapters refuses GPT-2's Conv1D
with how to convert it.

The example's tests need transformers (skipped without it); the refusal by class name does not.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from d2lora_min.nn import METHODS, adapter_layers, inject_adapters

from .helpers import Conv1D  # stands in for transformers' Conv1D

ROOT = Path(__file__).resolve().parents[1]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers is not installed: pip install transformers"
)


def load_recipe():
    spec = importlib.util.spec_from_file_location("hf_recipe", ROOT / "examples" / "hf_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    return load_recipe()


@pytest.fixture(scope="module")
def results(recipe):
    return recipe.main(steps=8, seed=0)  # every method on both models, once for the whole file


# --- every method on a tiny Llama and on a converted tiny GPT-2 -------------------------------------------------

CASES = [(model, method, layers) for model, layers in (("llama", 8), ("gpt2", 4)) for method in METHODS]


@needs_transformers
@pytest.mark.parametrize("model, method, layers", CASES)
def test_adapters_train_only_themselves(results, model, method, layers):
    row = results[model][method]
    assert row["adapted_layers"] == layers  # q, k, v, o x 2 layers; c_attn, attn.c_proj x 2 layers
    assert row["only_adapters_trainable"]
    assert row["adapters_moved"], "some adapter tensor did not change in training"
    assert row["base_unchanged"], "a base weight changed in training"
    assert row["loss_after"] < row["loss_before"]


@needs_transformers
@pytest.mark.parametrize("model, method, layers", CASES)
def test_merged_model_has_the_same_logits_and_no_adapter(recipe, results, model, method, layers):
    row = results[model][method]
    assert row["adapters_left"] == 0
    assert row["merged_max_abs_diff"] <= recipe.MERGE_TOL


# --- GPT-2's Conv1D: refused with how to convert; the conversion changes nothing -------------------------------


@needs_transformers
def test_gpt2_conv1d_is_refused_with_the_conversion_and_left_as_it_was(recipe):
    gpt2 = recipe.tiny_gpt2(seed=0)
    before = {n: p.clone() for n, p in gpt2.named_parameters()}
    with pytest.raises(TypeError) as error:
        inject_adapters(gpt2, "d2lora", targets=recipe.GPT2_TARGETS)
    message = str(error.value)
    for fragment in ("'transformer.h.0.attn.c_attn' is a Conv1D", "(in, out)", "nn.Linear(in_features, out_features)",
                     "conv.weight.T", "conv.bias", "conv1d_to_linear", "examples/hf_recipe.py"):  # fmt: skip
        assert fragment in message, fragment
    assert not adapter_layers(gpt2)
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in gpt2.named_parameters())


@needs_transformers
def test_results_carry_the_refusal_and_an_exact_conversion(recipe, results):
    conversion = results["gpt2_conversion"]
    assert "conv1d_to_linear" in conversion["refusal"]
    assert conversion["conv1d_left"] == 0
    assert conversion["max_abs_diff"] <= recipe.CONVERT_TOL


@needs_transformers
def test_conv1d_to_linear_keeps_logits_with_nonzero_biases(recipe):
    """GPT-2 initialises Conv1D biases to zero; a pretrained one has none at zero, so give them values."""
    from transformers.pytorch_utils import Conv1D

    gpt2 = recipe.tiny_gpt2(seed=1)
    with torch.no_grad():
        for m in gpt2.modules():
            if isinstance(m, Conv1D):
                m.bias.normal_(0.0, 0.1)
    tokens = recipe.counting_batch(torch.Generator().manual_seed(0), batch=4)
    with torch.no_grad():
        before = gpt2(input_ids=tokens).logits
        recipe.conv1d_to_linear(gpt2)
        after = gpt2(input_ids=tokens).logits
    c_attn = gpt2.transformer.h[0].attn.c_attn
    assert type(c_attn) is nn.Linear and c_attn.weight.shape == (96, 32)  # (out = 3 x n_embd, in)
    assert (after - before).abs().max().item() <= recipe.CONVERT_TOL


# --- without transformers: the refusal goes by class name --------------------------------------------------------


def test_any_module_named_conv1d_is_refused_with_the_conversion():
    model = nn.Sequential(nn.Linear(4, 4), Conv1D(6, 4))
    with pytest.raises(TypeError, match=r"'1' is a Conv1D, not an nn.Linear; .*\(in, out\).*conv\.weight\.T"):
        inject_adapters(model, "lora", targets=("0", "1"))
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad  # left as it was


def test_other_modules_get_the_plain_message():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="is a Conv1d, not an nn.Linear$"):
        inject_adapters(model, "lora", targets=("1",))
