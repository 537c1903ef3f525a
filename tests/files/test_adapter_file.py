"""The adapter file and its checks (d2lora_min/files/adapter_file.py): the format, a checksum over the config and the
tensors, every config field and tensor checked, the base weight it belongs to, the tensors derived from it, and an
atomic write. Each refusal is a clear error raised before the model is changed."""

import copy
import errno
import hashlib
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import d2lora_min.files.adapter_file as adapter_file_mod
from d2lora_min.files.adapter_file import ADAPTER_FILE, CHECKSUM_KEY, CONFIG_KEY, adapter_sha256, read_adapter_file
from d2lora_min.nn import (
    adapter_config,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapter_state_dict,
    load_adapters,
    merge_adapters,
    save_adapters,
)

from ..helpers import TESTED_METHODS, assert_untouched, narrow_gpt, perturb_adapters, small_gpt, snapshot


def saved(tmp_path, method="lora", r=2, **options):
    """A narrow GPT with perturbed adapters on q_proj and fc_out, saved into tmp_path -> the model."""
    model = inject_adapters(narrow_gpt(), method, r=r, alpha=4, targets=("q_proj", "fc_out"), **options)
    perturb_adapters(model, seed=1)
    save_adapters(model, tmp_path)
    return model


# --- the file: whole, of this format, sealed by its checksum ---------------------------------------------------


def test_a_save_that_fails_half_way_leaves_the_old_adapter_file_whole(tmp_path, monkeypatch):
    # a full disk (or a kill) while the new file is written must not cost the old one: the tensors are written to a
    # temporary file that takes the name only once complete
    model = inject_adapters(small_gpt(), "d2lora", r=2, alpha=4)
    perturb_adapters(model, seed=3)
    path = save_adapters(model, tmp_path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    real_save_file = adapter_file_mod.save_file

    def half_then_full_disk(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])  # what a writer had put down when the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_file_mod, "save_file", half_then_full_disk)
    perturb_adapters(model, seed=4)  # other values: the new file would differ from the old one
    with pytest.raises(OSError):
        save_adapters(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # and no temporary file left
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    load_adapters(small_gpt(), tmp_path)  # the old file, whole: it loads


def test_missing_truncated_or_foreign_adapter_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        load_adapters(narrow_gpt(), tmp_path / "nowhere")
    (tmp_path / "folder" / ADAPTER_FILE).mkdir(parents=True)
    with pytest.raises(ValueError, match="not a regular file"):
        load_adapters(narrow_gpt(), tmp_path / "folder")
    with pytest.raises(ValueError, match="holds no tensors"):
        load_adapter_state_dict(narrow_gpt(), {}, adapter_config(inject_adapters(narrow_gpt(), "lora", r=2, alpha=4)))
    saved(tmp_path)
    path = tmp_path / ADAPTER_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    target = narrow_gpt()
    before = snapshot(target)
    with pytest.raises(ValueError, match="not a readable d2lora_min adapter file"):
        load_adapters(target, tmp_path)
    assert_untouched(target, before)
    save_file({"w": torch.zeros(2)}, str(path))  # a safetensors file without our config
    with pytest.raises(ValueError, match="not a readable d2lora_min adapter file"):
        load_adapters(narrow_gpt(), tmp_path)


def _rewrite_config(path, change):
    """Rewrite an adapter file's config in place with a valid checksum (as a writer of another version would): the
    tensors stay, the checksum is recomputed over the changed config."""
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata[CONFIG_KEY])
    change(config)
    text = json.dumps(config, sort_keys=True)
    save_file(tensors, str(path), metadata={CONFIG_KEY: text, CHECKSUM_KEY: adapter_sha256(text, tensors)})


@pytest.mark.parametrize(
    "change",
    [lambda c: c.update(format=3), lambda c: c.pop("format"), lambda c: c.update(format="4")],
    ids=["format 3", "no format", "format as text"],
)
def test_a_file_of_another_format_is_refused_and_says_so(tmp_path, change):
    model = inject_adapters(small_gpt(), "d2lora", r=2, alpha=4)
    save_adapters(model, tmp_path)
    _rewrite_config(tmp_path / "adapter.safetensors", change)
    fresh = small_gpt()
    with pytest.raises(ValueError, match="reads adapter files of format 4 only"):
        load_adapters(fresh, tmp_path)
    assert not adapter_layers(fresh)


@pytest.mark.parametrize(
    "change",
    [lambda c: c.update(format=3), lambda c: c.pop("format"), lambda c: c.update(format="4")],
    ids=["format 3", "no format", "format as text"],
)
def test_a_config_of_another_format_is_refused_by_load_adapter_state_dict_too(change):
    # the direct API (tensors and config in memory, no file) passes the same format check as an adapter file
    model = inject_adapters(small_gpt(), "d2lora", r=2, alpha=4)
    config = adapter_config(model)
    change(config)
    fresh = small_gpt()
    with pytest.raises(ValueError, match="reads adapter files of format 4 only"):
        load_adapter_state_dict(fresh, adapter_state_dict(model), config)
    assert not adapter_layers(fresh)


def test_one_flipped_byte_in_an_adapter_file_is_refused(tmp_path):
    saved(tmp_path)
    path = tmp_path / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the last bytes are tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the checksum"):
        load_adapters(narrow_gpt(), tmp_path)


@pytest.mark.parametrize(
    "edit",
    [
        ('"alpha": 4.0', '"alpha": 5.0'),
        ('"dropout": 0.0', '"dropout": 0.2'),
        ('"readd_delta": true', '"readd_delta": false'),
        ('"format": 4, ', ""),
    ],
    ids=["alpha", "dropout", "option", "format removed"],
)
def test_an_edited_config_in_an_adapter_file_is_refused(tmp_path, edit):
    """The checksum covers the config: one changed digit of alpha (a single flipped bit: '4' -> '5') is refused, and
    so is a file whose format entry was removed."""
    saved(tmp_path, "d2lora")
    path = tmp_path / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    assert edit[0] in metadata[CONFIG_KEY]
    save_file(tensors, str(path), metadata={**metadata, CONFIG_KEY: metadata[CONFIG_KEY].replace(*edit)})
    with pytest.raises(ValueError, match="do not match the checksum|has no format; this version"):
        load_adapters(narrow_gpt(), tmp_path)


def test_a_file_without_its_checksum_says_so(tmp_path):
    saved(tmp_path)
    path = tmp_path / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={CONFIG_KEY: metadata[CONFIG_KEY]})  # the checksum entry dropped
    with pytest.raises(ValueError, match="no checksum is stored"):
        load_adapters(narrow_gpt(), tmp_path)


# --- the config: every field, every option -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_change, match",
    [({"method": "lorax"}, "unknown method"), ({"r": "2"}, "'r' is missing or has the wrong type"),
     ({"options": {"projekt": 1}}, "unknown option"), ({"targets": {"blocks.0.attn.q_proj": [8]}}, "expected \\[out, in\\]")],
)  # fmt: skip
def test_a_bad_adapter_config_is_refused(tmp_path, config_change, match):
    model = saved(tmp_path)
    with pytest.raises(ValueError, match=match):
        load_adapter_state_dict(narrow_gpt(), adapter_state_dict(model), {**adapter_config(model), **config_change})


def test_a_file_that_does_not_say_its_form_is_refused(tmp_path):
    model = inject_adapters(small_gpt(), "d2lora", r=2, alpha=4)
    save_adapters(model, tmp_path)
    _rewrite_config(tmp_path / "adapter.safetensors", lambda config: config["options"].pop("readd_delta"))
    with pytest.raises(ValueError, match="does not say readd_delta"):
        load_adapters(small_gpt(), tmp_path)


def test_a_deeply_nested_or_huge_rank_config_is_a_clear_error_before_any_allocation(tmp_path):
    saved(tmp_path)
    path = tmp_path / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(
        tensors, str(path), metadata={CONFIG_KEY: '{"x": ' * 100_000 + "{}" + "}" * 100_000}
    )  # nested 100,000 deep
    with pytest.raises(ValueError, match="not a readable d2lora_min adapter file"):
        load_adapters(narrow_gpt(), tmp_path)
    saved(tmp_path)
    tensors, config = read_adapter_file(tmp_path / ADAPTER_FILE)
    with pytest.raises(ValueError, match="unknown option"):
        load_adapter_state_dict(narrow_gpt(), tensors, {**config, "options": {"x": {"x": {}}}})
    with pytest.raises(ValueError, match="rank r=1000000000 is larger than any dimension"):
        load_adapter_state_dict(narrow_gpt(), tensors, {**config, "r": 10**9})


# --- the tensors: exactly the expected ones, in the model's dtype ---------------------------------------------


def test_a_config_whose_rank_disagrees_with_its_tensors_changes_nothing_and_a_retry_works(tmp_path):
    model = saved(tmp_path)
    state, config = adapter_state_dict(model), adapter_config(model)
    target = narrow_gpt()
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"tensor .*lora_A: stored with shape \(2, 8\), the model needs \(3, 8\)"):
        load_adapter_state_dict(target, state, {**config, "r": 3})
    assert_untouched(target, before)
    load_adapter_state_dict(target, state, config)  # the right config still loads onto the same model
    assert all(torch.equal(a, b) for a, b in zip(adapter_state_dict(target).values(), state.values()))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (
            lambda s: {**s, next(iter(s)): s[next(iter(s))].double()},
            r"stored as torch.float64, the model's weights are torch.float32; load it onto the model in torch.float64",
        ),
        (lambda s: {**s, next(iter(s)): torch.full_like(s[next(iter(s))], float("nan"))}, "holds NaN or Inf"),
        (lambda s: {k: v for i, (k, v) in enumerate(s.items()) if i}, "missing"),
        (lambda s: {**s, "blocks.0.attn.q_proj.extra": torch.zeros(1)}, "unexpected"),
        (lambda s: {**s, next(iter(s)): s[next(iter(s))][:1]}, "stored"),
    ],
    ids=["dtype", "nan", "missing", "extra", "shape"],
)
def test_adapter_tensors_that_do_not_fit_are_refused_before_any_change(tmp_path, corrupt, match):
    model = saved(tmp_path)
    target = narrow_gpt()
    before = snapshot(target)
    with pytest.raises(ValueError, match=match):
        load_adapter_state_dict(target, corrupt(adapter_state_dict(model)), adapter_config(model))
    assert_untouched(target, before)


def test_a_float32_adapter_onto_a_bfloat16_model_says_how_to_load_it(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    save_adapters(inject_adapters(model, "lora", r=2, alpha=4, targets=("0",)), tmp_path)
    target = nn.Sequential(nn.Linear(4, 4))
    target.load_state_dict({"0.weight": model[0].base.weight, "0.bias": model[0].base.bias})
    with pytest.raises(ValueError, match=r"load it onto the model in torch.float32 and convert the model afterwards"):
        load_adapters(target.to(torch.bfloat16), tmp_path)


# --- the base weight it was trained on, and what a layer derives from it -----------------------------------------


@pytest.mark.parametrize("method", TESTED_METHODS)
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


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_stored_target_norms_that_are_not_the_bases_are_refused(tmp_path, value):
    model = saved(tmp_path, "d2lora")
    state = adapter_state_dict(model)
    key = next(k for k in state if k.endswith("target_norm"))
    edited = {**state, key: torch.full_like(state[key], value)}
    with pytest.raises(ValueError, match="not those of this model's base weight"):
        load_adapter_state_dict(narrow_gpt(), edited, adapter_config(model))


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
