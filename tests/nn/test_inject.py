"""Adapters injected into whole models (inject.py): identity at init, merge back to plain nn.Linear, a frozen base,
targets chosen by name, and bad input refused with a clear error before the model is changed."""

import pytest
import torch
import torch.nn as nn

from d2lora_min.nn import (
    AdapterLinear,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    merge_adapters,
    trainable_parameters,
)

from ..helpers import (
    DEVICES,
    SMALL,
    TESTED_METHODS,
    assert_close,
    assert_untouched,
    narrow_gpt,
    perturb_adapters,
    small_gpt,
    snapshot,
)


def tokens(seed=0, batch=3, length=12, device="cpu", vocab=SMALL.vocab_size):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


# --- adapters in a whole model -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", TESTED_METHODS)
def test_identity_at_init_for_the_whole_model(method, device):
    model = small_gpt(device=device)
    idx = tokens(device=device)
    with torch.no_grad():
        before, _ = model(idx)
        inject_adapters(model, method, r=2, alpha=4)
        after, _ = model(idx)
    assert len(adapter_layers(model)) == 6 * SMALL.n_layer
    assert_close(after, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", TESTED_METHODS)
def test_merge_adapters_keeps_the_logits_and_leaves_no_adapter(method, device, dtype):
    model = small_gpt(device=device, dtype=dtype)
    idx = tokens(device=device)
    with torch.no_grad():
        base_logits, _ = model(idx)
        inject_adapters(model, method, r=2, alpha=4)
        perturb_adapters(model, seed=1)
        adapted, _ = model(idx)
        merge_adapters(model)
        merged, _ = model(idx)
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapters did change the model
    assert_close(merged, adapted, factor=10)
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("_proj", "fc_in", "fc_out")))


@pytest.mark.parametrize("method", TESTED_METHODS)
def test_fine_tuning_changes_only_adapter_tensors(method):
    model = small_gpt()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_adapters(model, method, r=2, alpha=4)
    adapter_before = {n: t.clone() for n, t in adapter_state_dict(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        idx = tokens(seed=step)
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        opt.step()
    # Every base tensor bit-for-bit unchanged (their names gain ".base" inside adapter layers).
    now = {n.replace(".base.", "."): p for n, p in model.named_parameters()}
    for n, before in frozen.items():
        assert torch.equal(now[n], before), n
    changed = [n for n, t in adapter_state_dict(model).items() if not torch.equal(t, adapter_before[n])]
    assert changed, "no adapter tensor moved"


def test_trainable_parameter_counts_in_a_model():
    d, L = SMALL.d_model, SMALL.n_layer
    per_block = 4 * (d + d) + (d + 4 * d) + (4 * d + d)  # (in + out) over q, k, v, o, fc_in, fc_out
    counts = {}
    for method, r in [("lora", 2), ("lora", 4), ("dora", 2), ("d2lora", 2)]:
        counts[method, r] = trainable_parameters(inject_adapters(small_gpt(), method, r=r, alpha=2 * r))
    learned_tau = trainable_parameters(inject_adapters(small_gpt(), "d2lora", r=2, alpha=4, learn_tau=True))
    assert counts["lora", 2] == 2 * per_block * L
    assert counts["dora", 2] == 2 * per_block * L + (4 * d + 4 * d + d) * L  # + out of each: 4 x d, 4d, d
    assert counts["d2lora", 2] == counts["lora", 4]  # tau fixed (the default): exactly LoRA(2r)
    assert learned_tau == counts["lora", 4] + 6 * L  # a learned tau: one per adapted layer


def test_targets_select_by_suffix():
    model = inject_adapters(small_gpt(), "lora", r=1, alpha=1, targets=("q_proj", "v_proj"))
    names = [n for n, _ in adapter_layers(model)]
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]


def test_works_on_any_module_built_from_linear():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    before = mlp(x)
    inject_adapters(mlp, "d2lora", r=2, alpha=4, targets=("0", "2"))
    assert_close(mlp(x), before)
    perturb_adapters(mlp, seed=3)
    adapted = mlp(x)
    merge_adapters(mlp)
    assert_close(mlp(x), adapted)
    assert type(mlp[0]) is nn.Linear and type(mlp[2]) is nn.Linear


def test_a_layer_shared_under_two_names_is_adapted_under_both_and_merges_under_both():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    inject_adapters(model, "lora", r=1, alpha=1, targets=("1.0",))
    assert model[0][0] is model[1][0] and len(adapter_layers(model)) == 1
    merge_adapters(model)
    assert type(model[0][0]) is nn.Linear and model[0][0] is model[1][0]


# --- bad input: a clear error, and the model as it was ------------------------------------------------------


API_CASES = [
    # (method, keyword arguments, error type, message fragment)
    ("lora", {"r": 0}, ValueError, "rank r must be an integer >= 1, got 0"),
    ("d2lora", {"r": 0}, ValueError, "rank r must be an integer >= 1, got 0"),
    ("d2lora", {"r": -1}, ValueError, "rank r"),
    ("dora", {"r": 2.5}, ValueError, "rank r"),
    ("lora", {"r": True}, ValueError, "rank r"),
    ("lora", {"r": "4"}, ValueError, "rank r"),
    ("lora", {"alpha": float("inf")}, ValueError, "alpha must be a finite number > 0"),
    ("dora", {"alpha": float("nan")}, ValueError, "alpha must be a finite number"),
    ("d2lora", {"alpha": 0.0}, ValueError, "alpha must be a finite number > 0"),
    ("d2lora", {"alpha": "8"}, TypeError, "alpha must be a number"),
    ("lora", {"dropout": 1.0}, ValueError, "dropout must be in"),
    ("lora", {"dropout": -0.1}, ValueError, "dropout must be in"),
    ("d2lora", {"project": "false"}, TypeError, "project must be a bool"),
    ("d2lora", {"learn_tau": "yes"}, TypeError, "learn_tau must be a bool"),
    ("dora", {"detach_norm": None}, TypeError, "detach_norm must be a bool"),
    ("d2lora", {"tau_init": float("inf")}, ValueError, "tau_init must be a finite number"),
    ("d2lora", {"tau_init": "0.5"}, TypeError, "tau_init must be a number"),
    ("d2lora", {"tau_init": 1e39}, ValueError, "tau_init=1e\\+39 is not finite in the weights' dtype torch.float32"),
    ("lorax", {}, ValueError, "unknown method 'lorax'; valid methods: lora, dora, d2lora"),
    (None, {}, ValueError, "unknown method None"),
    ("d2lora", {"projekt": False}, ValueError, "unknown option.*projekt.*valid options: tau_init"),
    ("lora", {"tau_init": 0.1}, ValueError, "unknown option.*tau_init.*'lora'"),
    ("lora", {"targets": ()}, ValueError, "targets is empty"),
    ("lora", {"targets": ("q_proj", "q_proj")}, ValueError, "targets has duplicates"),
    ("lora", {"targets": ("q_proj", "qproj")}, ValueError, "'qproj' matches no module.*q_proj"),
    ("lora", {"targets": ("ln_1",)}, TypeError, "'blocks.0.ln_1' is a LayerNorm, not an nn.Linear"),
    ("lora", {"targets": [1]}, TypeError, "targets must be module-name strings"),
]


@pytest.mark.parametrize("method, kwargs, error, match", API_CASES)
def test_bad_api_input_is_a_clear_error_and_leaves_the_model_as_it_was(method, kwargs, error, match):
    model = narrow_gpt()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        inject_adapters(model, method, **kwargs)
    assert_untouched(model, before)
    assert not adapter_layers(model)


def test_injecting_twice_is_refused_and_changes_nothing():
    model = inject_adapters(narrow_gpt(), "lora")
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(model, "dora")
    assert_untouched(model, before)


def test_multihead_attention_out_proj_is_refused_not_bypassed():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="MultiheadAttention, which reads its weight directly"):
        inject_adapters(model, "lora", targets=("out_proj",))
    assert not adapter_layers(model)
