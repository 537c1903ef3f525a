"""A run's result file (d2lora_min/files/run_results.py): a finished run is reused only when its file says it is this run
(method, seed and key, not just a file name that says so), its checksum matches its content, every field the report
reads is there, and the adapter file it names is present, whole and the one it saved; anything else is recomputed with
one line saying why, never a traceback."""

import json
import shutil

import pytest

from d2lora_min.files.adapter_file import ADAPTER_FILE, read_adapter_file
from d2lora_min.files.run_results import read_run, sealed
from d2lora_min.nn import load_adapters
from d2lora_min.train.compare import main as compare_main
from d2lora_min.train.pretrain import load_base


def test_a_finished_run_copied_to_another_keys_path_is_recomputed(tmp_path, tiny, capsys):
    # the key is in the file name too, so only a file whose stored key differs from its name's tests that the stored
    # key is checked: full_lr changes every run's key (it is a setting of the comparison) but nothing the report reads
    first_out, second_out = tmp_path / "first", tmp_path / "second"
    assert tiny("--methods", "lora", out=first_out) == 0
    argv = ("--methods", "lora", "--full_lr=0.002")
    assert tiny(*argv, out=second_out) == 0
    (first,), (second,) = tiny.run_files(first_out), tiny.run_files(second_out)
    first_key, second_key = (json.loads(p.read_text())["key"] for p in (first, second))
    assert first_key != second_key
    shutil.copytree(first_out / "adapters", second_out / "adapters", dirs_exist_ok=True)  # the adapter it names, whole
    shutil.copyfile(first, second)  # a valid finished run, of the other key, under this key's name
    capsys.readouterr()
    assert tiny(*argv, out=second_out) == 0
    printed = capsys.readouterr().out
    assert f"key is {first_key!r}, expected {second_key!r}: recomputing" in printed and "0 of 1 runs reused" in printed
    assert json.loads(second.read_text())["key"] == second_key


def test_an_edited_or_relabelled_run_json_is_recomputed_not_trusted(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    argv = tiny.argv("--methods", "lora dora", "--reference=lora", out=out, epochs=2, checkpoints=2)
    compare_main(argv)
    clean = {p.name: json.loads(p.read_text()) for p in tiny.run_files(out)}
    dora_path = next(p for p in tiny.run_files(out) if clean[p.name]["method"] == "dora")
    edited = {**clean[dora_path.name], "items": {**clean[dora_path.name]["items"]}}
    edited["items"]["who"] = {**edited["items"]["who"], "correct_sum": [1] * 8}
    dora_path.write_text(json.dumps(edited))
    capsys.readouterr()
    compare_main(argv)
    assert "checksum does not match" in capsys.readouterr().out
    assert json.loads(dora_path.read_text())["items"] == clean[dora_path.name]["items"]

    relabelled = {**clean[dora_path.name], "method": "lora"}
    dora_path.write_text(json.dumps(sealed({k: v for k, v in relabelled.items() if k != "sha256"})))
    compare_main(argv)
    assert "method is 'lora', expected 'dora'" in capsys.readouterr().out
    methods = [r["method"] for r in json.loads((out / "results.json").read_text())["rows"]]
    assert methods == ["lora", "dora"]


@pytest.mark.parametrize("content", ['{"key": "x"}', "[1, 2]", '"text"', "3", "folder"])
def test_a_malformed_cached_run_is_recomputed_with_one_line(tmp_path, tiny, capsys, content):
    out = tmp_path / "out"
    argv = tiny.argv("--methods", "lora", out=out, epochs=2, checkpoints=2)
    compare_main(argv)
    path = tiny.run_files(out)[0]
    path.unlink()
    if content == "folder":
        path.mkdir()
    else:
        path.write_text(content)
    capsys.readouterr()
    if content == "folder":  # a folder where the result belongs: a usage error before any work, and nothing deleted
        with pytest.raises(SystemExit) as exit_:
            compare_main(argv)
        captured = capsys.readouterr()
        assert (
            exit_.value.code == 2
            and "is in the way of a run's output" in captured.err
            and "s training" not in captured.out
        )
        assert path.is_dir()
    else:
        assert compare_main(argv) == 0
        assert "recomputing" in capsys.readouterr().out
        assert json.loads(path.read_text())["method"] == "lora"


def test_a_truncated_cached_run_is_recomputed_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text('{"key": "abc", "scores": {')
    assert read_run(path) is None and "recomputing" in capsys.readouterr().out
    assert read_run(tmp_path / "absent.json") is None


@pytest.mark.parametrize("damage", ["delete", "truncate", "folder"])
def test_a_finished_run_whose_adapter_file_is_gone_or_damaged_is_recomputed(tmp_path, tiny, capsys, damage):
    out = tmp_path / "out"
    argv = tiny.argv("--methods", "lora:lr=0.01", out=out, epochs=2, checkpoints=2)
    assert compare_main(argv) == 0
    (result,) = [json.loads(p.read_text()) for p in tiny.run_files(out)]
    adapter = out / result["adapter"] / ADAPTER_FILE
    if damage == "delete":
        adapter.unlink()
    elif damage == "folder":
        adapter.unlink()
        adapter.mkdir()
    else:
        adapter.write_bytes(adapter.read_bytes()[:100])
    capsys.readouterr()
    if damage == "folder":  # in the way of the adapter file the rerun would write: refused before any work
        with pytest.raises(SystemExit):
            compare_main(argv)
        assert "is in the way of a run's output" in capsys.readouterr().err and adapter.is_dir()
        return
    assert compare_main(argv) == 0
    printed = capsys.readouterr().out
    assert "adapter file is missing or damaged" in printed and "s training" in printed
    (again,) = [json.loads(p.read_text()) for p in tiny.run_files(out)]
    assert again["items"] == result["items"]
    read_adapter_file(adapter)  # whole again


def test_a_run_whose_adapter_file_was_swapped_for_another_runs_is_recomputed(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    argv = tiny.argv("--methods", "lora dora", "--reference=lora", out=out)
    assert compare_main(argv) == 0
    runs = {r["method"]: r for r in (json.loads(p.read_text()) for p in (out / "runs").glob("*.json"))}
    lora_file, dora_file = (out / runs[m]["adapter"] / "adapter.safetensors" for m in ("lora", "dora"))
    shutil.copyfile(dora_file, lora_file)  # a valid adapter file, of another run
    capsys.readouterr()
    assert compare_main(argv) == 0
    printed = capsys.readouterr().out
    assert "not the one this run saved" in printed and "1 of 2 runs reused" in printed
    load_adapters(load_base()[0], lora_file.parent)  # whole again, and LoRA's
    assert json.loads(next(p for p in (out / "runs").glob("lora-*")).read_text())["adapter_sha256"]
