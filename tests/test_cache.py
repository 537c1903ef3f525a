"""d2lora_min/train/cache.py: a finished run is reused only when its file says it is this run (method, seed and key,
not just a file name that says so), and nothing but folders and regular files lies where a run or a report writes."""

import json
import shutil

import pytest

import d2lora_min.train.compare as compare_mod
from d2lora_min.train.compare import main as compare_main
from d2lora_min.train.data import heldout_text
from d2lora_min.train.tasks import retention_probe

TINY = ["--seeds=0", "--tasks=who", "--n_train=8", "--epochs=1", "--n_test=8", "--train.batch_size=4",
        "--checkpoints=1", "--train.progress=false"]  # fmt: skip


@pytest.fixture
def small_probes(monkeypatch):
    monkeypatch.setattr(compare_mod, "retention_probe", lambda world: retention_probe(world, n_items=20))
    monkeypatch.setattr(compare_mod, "heldout_text", lambda world, tok, **kw: heldout_text(world, tok, n_docs=20, **kw))


def only_run(out):
    (path,) = (out / "runs").glob("*.json")
    return path


def test_a_finished_run_copied_to_another_keys_path_is_recomputed(tmp_path, small_probes, capsys):
    # the key is in the file name too, so only a file whose stored key differs from its name's tests that the stored
    # key is checked: full_lr changes every run's key (it is a setting of the comparison) but nothing the report reads
    first_out, second_out = tmp_path / "first", tmp_path / "second"
    assert compare_main(TINY + ["--methods", "lora", "--out", str(first_out)]) == 0
    argv = TINY + ["--methods", "lora", "--full_lr=0.002", "--out", str(second_out)]
    assert compare_main(argv) == 0
    first, second = only_run(first_out), only_run(second_out)
    first_key, second_key = (json.loads(p.read_text())["key"] for p in (first, second))
    assert first_key != second_key
    shutil.copytree(first_out / "adapters", second_out / "adapters", dirs_exist_ok=True)  # the adapter it names, whole
    shutil.copyfile(first, second)  # a valid finished run, of the other key, under this key's name
    capsys.readouterr()
    assert compare_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"key is {first_key!r}, expected {second_key!r}: recomputing" in printed and "0 of 1 runs reused" in printed
    assert json.loads(second.read_text())["key"] == second_key
