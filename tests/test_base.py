"""The shipped base model (base/): it loads, matches its recorded config and SHA-256, is the base that the
default settings ask for, and reproduces the probe score recorded with it."""

import json
import shutil
from pathlib import Path

import pytest

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
