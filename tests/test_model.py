"""The tiny GPT itself, and adapters injected into whole models: identity at init, merge, frozen base,
adapter checkpoints, and clear errors for bad input."""

import copy

import pytest
import torch
import torch.nn as nn

from d2lora_min.nn import (
    METHODS,
    AdapterLinear,
    adapter_config,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapter_state_dict,
    load_adapters,
    merge_adapters,
    save_adapters,
    trainable_parameters,
)
from tiny_gpt import GPT, GPTConfig

from .helpers import DEVICES, assert_close, perturb_adapters

SMALL = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, d_model=16)
METHOD_NAMES = list(METHODS)


def small_gpt(seed=0, device="cpu", dtype=torch.float32, config=SMALL):
    torch.manual_seed(seed)
    return GPT(config).to(device=device, dtype=dtype)


def tokens(seed=0, batch=3, length=12, device="cpu", vocab=SMALL.vocab_size):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


# --- tiny_gpt ----------------------------------------------------------------------------------------------


def test_gpt_shapes_loss_and_tied_head():
    model = small_gpt()
    idx = tokens()
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 12, SMALL.vocab_size)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.lm_head.weight is model.wte.weight
    targets = idx.clone()
    targets[:, :6] = -1  # ignored positions do not count
    _, loss_half = model(idx, targets)
    assert not torch.isclose(loss, loss_half)


def test_gpt_is_causal():
    model = small_gpt()
    idx = tokens()
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.equal(a[:, 7:], b[:, 7:])


def test_gpt_rejects_sequences_longer_than_block_size():
    with pytest.raises(ValueError, match="block_size"):
        small_gpt()(tokens(length=SMALL.block_size + 1))


def test_generate_greedy_is_argmax_of_forward():
    model = small_gpt()
    idx = tokens(length=4)
    out = model.generate(idx, 5, greedy=True)
    assert out.shape == (3, 9) and torch.equal(out[:, :4], idx)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(out[:, 4:], logits[:, 3:].argmax(-1))


# --- adapters in a whole model -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHOD_NAMES)
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
@pytest.mark.parametrize("method", METHOD_NAMES)
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


@pytest.mark.parametrize("method", METHOD_NAMES)
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


# --- adapter checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_to_16_bits_after_inject_gets_an_error_that_says_so(tmp_path, dtype):
    # the cast rounds D2-LoRA's target_norm and the base weight each on its own: the stored norm is no longer the
    # one this base gives, and the error must say why (not "another base, or edited") and what to do
    model = inject_adapters(small_gpt(), "d2lora", r=2, alpha=4)
    model.to(dtype).float()
    save_adapters(model, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="only to 16-bit rounding: a model was cast to float16 or bfloat16 after "
                                         "inject_adapters.*cast a model before inject_adapters, never after"):  # fmt: skip
        load_adapters(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    cast_first = inject_adapters(small_gpt().to(dtype).float(), "d2lora", r=2, alpha=4)  # the way round that works
    save_adapters(cast_first, tmp_path)
    load_adapters(cast_first, tmp_path)
    load_adapters(small_gpt().to(dtype).float(), tmp_path)


def test_a_save_that_fails_half_way_leaves_the_old_adapter_file_whole(tmp_path, monkeypatch):
    # a full disk (or a kill) while the new file is written must not cost the old one: the tensors are written to a
    # temporary file that takes the name only once complete
    import errno
    import hashlib

    import d2lora_min.nn.checkpoint as checkpoint_mod

    model = inject_adapters(small_gpt(), "d2lora", r=2, alpha=4)
    perturb_adapters(model, seed=3)
    path = save_adapters(model, tmp_path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    real_save_file = checkpoint_mod.save_file

    def half_then_full_disk(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])  # what a writer had put down when the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_mod, "save_file", half_then_full_disk)
    perturb_adapters(model, seed=4)  # other values: the new file would differ from the old one
    with pytest.raises(OSError):
        save_adapters(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # and no temporary file left
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    load_adapters(small_gpt(), tmp_path)  # the old file, whole: it loads


def _rewrite_config(path, change):
    """Rewrite an adapter file's config in place with a valid checksum (as a writer of another version would): the
    tensors stay, the checksum is recomputed over the changed config."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from d2lora_min.nn.checkpoint import CHECKSUM_KEY, CONFIG_KEY, adapter_sha256

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata[CONFIG_KEY])
    change(config)
    text = json.dumps(config, sort_keys=True)
    save_file(tensors, str(path), metadata={CONFIG_KEY: text, CHECKSUM_KEY: adapter_sha256(text, tensors)})


@pytest.mark.parametrize("change", [lambda c: c.update(format=3), lambda c: c.pop("format"), lambda c: c.update(format="4")],
                         ids=["format 3", "no format", "format as text"])
def test_a_file_of_another_format_is_refused_and_says_so(tmp_path, change):
    model = inject_adapters(small_gpt(), "d2lora", r=2, alpha=4)
    save_adapters(model, tmp_path)
    _rewrite_config(tmp_path / "adapter.safetensors", change)
    fresh = small_gpt()
    with pytest.raises(ValueError, match="reads adapter files of format 4 only"):
        load_adapters(fresh, tmp_path)
    assert not adapter_layers(fresh)


@pytest.mark.parametrize("change", [lambda c: c.update(format=3), lambda c: c.pop("format"), lambda c: c.update(format="4")],
                         ids=["format 3", "no format", "format as text"])
def test_a_config_of_another_format_is_refused_by_load_adapter_state_dict_too(change):
    # the direct API (tensors and config in memory, no file) passes the same format check as an adapter file
    model = inject_adapters(small_gpt(), "d2lora", r=2, alpha=4)
    config = adapter_config(model)
    change(config)
    fresh = small_gpt()
    with pytest.raises(ValueError, match="reads adapter files of format 4 only"):
        load_adapter_state_dict(fresh, adapter_state_dict(model), config)
    assert not adapter_layers(fresh)


@pytest.mark.parametrize("method", list(METHODS))
def test_an_adapter_loads_only_onto_the_base_it_was_trained_on(tmp_path, method):
    # another base of the same shapes, the model the adapter was merged into, a square weight transposed (GPT-2's
    # Conv1D converted without the transpose): each refused before anything changes
    model = inject_adapters(small_gpt(), method, r=2, alpha=4)
    perturb_adapters(model, seed=5)
    save_adapters(model, tmp_path)
    other = small_gpt(seed=1)
    merged = merge_adapters(copy.deepcopy(model))
    transposed = small_gpt()
    with torch.no_grad():
        transposed.blocks[0].attn.q_proj.weight.copy_(transposed.blocks[0].attn.q_proj.weight.T.clone())
    for target in (other, merged, transposed):
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError, match="trained on another base weight"):
            load_adapters(target, tmp_path)
        assert not adapter_layers(target) and all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    load_adapters(small_gpt(), tmp_path)  # the base it was trained on


def test_a_file_that_does_not_say_its_form_is_refused(tmp_path):
    model = inject_adapters(small_gpt(), "d2lora", r=2, alpha=4)
    save_adapters(model, tmp_path)
    _rewrite_config(tmp_path / "adapter.safetensors", lambda config: config["options"].pop("readd_delta"))
    with pytest.raises(ValueError, match="does not say readd_delta"):
        load_adapters(small_gpt(), tmp_path)


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


# --- bad input ----------------------------------------------------------------------------------------------


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'lorax'.*lora, dora, d2lora"):
        inject_adapters(small_gpt(), "lorax")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown option.*projekt.*valid options: tau_init"):
        inject_adapters(small_gpt(), "d2lora", projekt=False)
    with pytest.raises(ValueError, match="unknown option.*tau_init.*'lora'"):
        inject_adapters(small_gpt(), "lora", tau_init=0.1)


def test_targets_that_match_nothing_are_named():
    with pytest.raises(ValueError, match="'qproj' matches no module.*q_proj"):
        inject_adapters(small_gpt(), "lora", targets=("q_proj", "qproj"))
    with pytest.raises(ValueError, match="targets is empty"):
        inject_adapters(small_gpt(), "lora", targets=())


def test_a_target_that_is_not_linear_is_a_type_error():
    with pytest.raises(TypeError, match="'blocks.0.ln_1' is a LayerNorm, not an nn.Linear"):
        inject_adapters(small_gpt(), "lora", targets=("ln_1",))


def test_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="rank r must be an integer >= 1, got 0"):
        inject_adapters(small_gpt(), "d2lora", r=0)


def test_injecting_twice_is_refused():
    model = inject_adapters(small_gpt(), "lora")
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(model, "dora")
