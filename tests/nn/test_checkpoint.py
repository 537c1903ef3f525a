"""Adapter files through the nn API (checkpoint.py): what save_adapters writes and load_adapters rebuilds (the same
outputs, the model's mode, exactly the stored modules), and loads refused because the model does not fit the file.
The file format's own checks (checksum, config, tensors, base weights): tests/files/test_adapter_file.py."""

import pytest
import torch
import torch.nn as nn

from d2lora_min.nn import (
    adapter_config,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapter_state_dict,
    load_adapters,
    save_adapters,
)
from tiny_gpt import GPTConfig

from ..helpers import NARROW, TESTED_METHODS, Conv1D, narrow_gpt, perturb_adapters, small_gpt


def tokens(seed=0, batch=3, length=12, vocab=61):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@pytest.mark.parametrize("method", TESTED_METHODS)
def test_adapter_checkpoint_round_trip(method, tmp_path):
    options = {"learn_tau": False, "tau_init": 0.25} if method == "d2lora" else {}
    model = inject_adapters(small_gpt(), method, r=2, alpha=4, targets=("q_proj", "fc_out"), **options)
    perturb_adapters(model, seed=2)
    idx = tokens()
    with torch.no_grad():
        expected, _ = model(idx)
    save_adapters(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # tensors + config, one atomic file

    fresh = small_gpt()  # the same base, no adapters: load injects them from the config
    load_adapters(fresh, tmp_path)
    with torch.no_grad():
        got, _ = fresh(idx)
    assert torch.equal(got, expected)
    assert adapter_config(fresh) == adapter_config(model)
    assert not any(k.startswith("base.") or ".base." in k for k in adapter_state_dict(model))


@pytest.mark.parametrize("how", ["inject", "load"])
def test_adapters_put_into_an_eval_model_are_in_eval_mode(how, tmp_path):
    trained = inject_adapters(narrow_gpt(), "d2lora", r=2, alpha=4, dropout=0.5)
    perturb_adapters(trained, seed=1)
    save_adapters(trained, tmp_path)
    model = narrow_gpt().eval()
    if how == "inject":
        inject_adapters(model, "d2lora", r=2, alpha=4, dropout=0.5)
    else:
        load_adapters(model, tmp_path)
    assert adapter_layers(model) and not any(m.training for m in model.modules())
    x = torch.randint(0, NARROW.vocab_size, (2, 8))
    with torch.no_grad():
        a, b = model(x)[0], model(x)[0]  # dropout would make two passes differ
    assert torch.equal(a, b)
    if how == "load":
        with torch.no_grad():
            assert torch.allclose(a, trained.eval()(x)[0], atol=1e-6)


def test_loading_onto_a_model_where_a_stored_name_is_also_a_suffix_adapts_only_that_module(tmp_path):
    # Adapter files store full names; "0" read as a suffix would also select "1.0" (and then fail half-way).
    source = inject_adapters(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "lora", r=2, alpha=4, targets=("0",))
    save_adapters(source, tmp_path)
    target = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    with torch.no_grad():  # the same base weights where the adapter goes
        target[0].weight.copy_(source[0].base.weight)
        target[1][0].weight.copy_(source[0].base.weight)
    target = load_adapters(target, tmp_path)
    assert [name for name, _ in adapter_layers(target)] == ["0"]


# --- a model that does not fit the file: refused before it is changed -------------------------------------------


def test_loading_an_adapter_for_other_targets_or_shapes_is_refused(tmp_path):
    model = inject_adapters(small_gpt(), "lora", r=2, alpha=4, targets=("q_proj",))
    state, config = adapter_state_dict(model), adapter_config(model)

    other_targets = inject_adapters(small_gpt(), "lora", r=2, alpha=4, targets=("v_proj",))
    with pytest.raises(ValueError, match="other targets or shapes"):
        load_adapter_state_dict(other_targets, state, config)

    wider = small_gpt(config=GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, d_model=32))
    with pytest.raises(ValueError, match=r"blocks.0.attn.q_proj: adapter file \[16, 16\], model \[32, 32\]"):
        load_adapter_state_dict(wider, state, config)
    assert not adapter_layers(wider)  # refused before anything was changed

    other_rank = inject_adapters(small_gpt(), "lora", r=3, alpha=4, targets=("q_proj",))
    with pytest.raises(ValueError, match="r=2"):
        load_adapter_state_dict(other_rank, state, config)

    other_method = inject_adapters(small_gpt(), "dora", r=2, alpha=4, targets=("q_proj",))
    with pytest.raises(ValueError, match="method"):
        load_adapter_state_dict(other_method, state, config)

    state_missing = dict(state)
    state_missing.pop(next(iter(state_missing)))
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state_dict(small_gpt(), state_missing, config)


def test_loading_onto_a_model_without_parameters_is_a_clear_error(tmp_path):
    save_adapters(inject_adapters(nn.Sequential(nn.Linear(4, 4)), "lora", r=2, alpha=4, targets=("0",)), tmp_path)
    with pytest.raises(ValueError, match="has no parameters"):
        load_adapters(nn.Sequential(), tmp_path)


def test_an_unconverted_conv1d_target_is_named_with_how_to_convert_it(tmp_path):
    save_adapters(inject_adapters(nn.Sequential(nn.Linear(4, 4)), "lora", r=2, alpha=4, targets=("0",)), tmp_path)
    with pytest.raises(
        ValueError, match="0 is a Conv1D, not an nn.Linear; Conv1D .* stores its weight as \\(in, out\\)"
    ):
        load_adapters(nn.Sequential(Conv1D(4, 4)), tmp_path)
