"""The base model (pretrain.py): the shipped base (base/) loads, matches its recorded config and SHA-256, is the base that
the default settings ask for, and reproduces the probe score recorded with it; every file that changes its behaviour is
covered by that SHA-256, a damaged or missing base is an error that says how to restore it (never a silent pretrain),
and pretrain never overwrites the shipped base by accident."""

import json
import os
import shutil
from pathlib import Path

import pytest

import d2lora_min.train.pretrain as pretrain_mod
from d2lora_min.files.io import base_fingerprint, read_json
from d2lora_min.train.evaluate import mc_accuracy
from d2lora_min.train.pretrain import SHIPPED_BASE, PretrainConfig, load_base, probe_items

META = json.loads((SHIPPED_BASE / "base.json").read_text())


@pytest.fixture(scope="module")
def shipped():
    return load_base(SHIPPED_BASE)


def test_shipped_base_loads_with_its_recorded_config(shipped):
    model, tokenizer, meta = shipped
    assert meta["sha256"] == META["sha256"]
    assert model.config.__dict__ == META["config"]["model"]
    assert tokenizer.get_vocab_size() == model.config.vocab_size


def test_shipped_base_is_what_the_default_settings_describe():
    # If this fails, the model, corpus or pretraining defaults (or world.py) changed without a new base:
    # run `make pretrain` and commit base/ (make compare would otherwise pretrain a new base itself).
    assert PretrainConfig().key() == META["key"]


def test_shipped_base_reproduces_its_recorded_probe_score(shipped):
    model, tokenizer, meta = shipped
    probes = probe_items(PretrainConfig().corpus)
    accuracy = mc_accuracy(model, tokenizer, probes["probe"])[0]
    # Equal up to one item of 300: float rounding on another CPU may flip a near-tie, nothing more.
    assert abs(accuracy - meta["probe_accuracy"]) <= 1 / len(probes["probe"]) + 1e-9
    assert meta["probe_accuracy"] >= 0.8  # a comparison needs a base that can read its context


# --- every file that changes its behaviour is covered --------------------------------------------------------------


def copy_of_base(tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(SHIPPED_BASE, folder)
    return folder


def test_a_corrupted_base_is_refused(tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(SHIPPED_BASE, folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # flip the last weight byte
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        load_base(folder)
    with pytest.raises(FileNotFoundError, match="make pretrain"):
        load_base(Path(tmp_path / "nowhere"))


def test_a_swapped_token_in_the_tokenizer_is_refused(tmp_path):
    folder = copy_of_base(tmp_path)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizer.json does not match the SHA-256"):
        load_base(folder)


def test_an_edited_model_config_is_refused(tmp_path):
    folder = copy_of_base(tmp_path)
    meta = json.loads((folder / "base.json").read_text())
    meta["config"]["model"]["dropout"] = 0.5
    (folder / "base.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model config does not match"):
        load_base(folder)


@pytest.mark.parametrize("files", [["model.safetensors"], "model.safetensors", None])
def test_a_base_json_whose_files_field_is_not_a_mapping_is_a_clear_error(tmp_path, files):
    folder = tmp_path / "base"
    shutil.copytree(SHIPPED_BASE, folder)
    meta = json.loads((folder / "base.json").read_text())
    meta["files"] = files
    (folder / "base.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="base.json is unreadable"):
        load_base(folder)
    (folder / "base.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=r"base/base.json is unreadable"):
        load_base(folder)


def test_a_base_whose_weights_do_not_fit_its_config_is_one_clear_line(tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(SHIPPED_BASE, folder)
    meta = read_json(folder / "base.json")
    meta["config"]["model"]["vocab_size"] += 8  # consistent checksums, weights of another vocabulary size
    meta["files"], meta["sha256"] = base_fingerprint(folder, meta)
    (folder / "base.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as error:
        load_base(folder)
    message = str(error.value)
    assert (
        "\n" not in message
        and "does not fit the model config" in message
        and "size mismatch for lm_head.weight" in message
    )


def test_a_missing_shipped_base_is_an_error_not_a_silent_pretrain(tmp_path, monkeypatch):
    folder = copy_of_base(tmp_path)
    (folder / "base.json").unlink()
    monkeypatch.setattr(pretrain_mod, "SHIPPED_BASE", folder)
    monkeypatch.setattr(pretrain_mod, "pretrain", lambda *a, **k: pytest.fail("started pretraining"))
    with pytest.raises(FileNotFoundError, match="git checkout -- base/"):
        pretrain_mod.resolve_base(pretrain_mod.PretrainConfig())
    os.remove(folder / "tokenizer.json")
    with pytest.raises(FileNotFoundError):
        load_base(folder)


# --- the command line ------------------------------------------------------------------------------------------------


def test_pretrain_refuses_to_overwrite_the_shipped_base(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain_mod.main(["--out", str(SHIPPED_BASE)])
    assert exit_info.value.code == 2 and "--replace_shipped" in capsys.readouterr().err
