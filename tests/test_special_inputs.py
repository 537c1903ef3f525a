"""Bad inputs, damaged files and special files (a FIFO, a device, a folder where a file belongs): each must be a clear
error before any work (or a recomputation that says why), never a silent wrong result, a late failure, a hang or a
traceback."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import d2lora_min.train.compare as compare_mod
from d2lora_min.atomic import read_json
from d2lora_min.nn import inject_adapters, load_adapters, save_adapters
from d2lora_min.train import tune as tune_mod
from d2lora_min.train.cache import result_path, slug
from d2lora_min.train.compare import main as compare_main
from d2lora_min.train.data import heldout_text
from d2lora_min.train.presets import TUNED_FILE, CompareConfig, check_compare_config
from d2lora_min.train.pretrain import SHIPPED_BASE, base_fingerprint, load_base
from d2lora_min.train.specs import parse_method_spec
from d2lora_min.train.tasks import retention_probe

TINY = ["--seeds=0", "--tasks=who", "--n_train=8", "--epochs=1", "--n_test=8", "--train.batch_size=4", "--checkpoints=1",
        "--train.progress=false"]  # fmt: skip


@pytest.fixture
def small_probes(monkeypatch):
    monkeypatch.setattr(compare_mod, "retention_probe", lambda world: retention_probe(world, n_items=20))
    monkeypatch.setattr(compare_mod, "heldout_text", lambda world, tok, **kw: heldout_text(world, tok, n_docs=20, **kw))


def usage_error(argv, capsys):
    """compare's stderr for argv, which must be a usage error (exit status 2) before any training."""
    with pytest.raises(SystemExit) as exit_:
        compare_main(argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and "s training" not in captured.out, captured
    return captured.err


# --- the tuned learning rates file --------------------------------------------------------------------------------


def test_a_tuned_file_that_does_not_exist_is_a_usage_error_not_the_shared_lr(tmp_path, capsys):
    err = usage_error(TINY + ["--methods", "lora", "--tuned_file", str(tmp_path / "tuned_lr.json"), "--out", str(tmp_path)], capsys)
    assert "no tuned learning rates at" in err and "--lr_source=shared" in err


@pytest.mark.parametrize("given", ["", " "])
def test_an_empty_tuned_file_setting_says_it_is_empty(tmp_path, capsys, given):
    # Path("") is the current folder: the error must be about what was given, not about "."
    err = usage_error(TINY + ["--methods", "lora", f"--tuned_file={given}", "--out", str(tmp_path / "o")], capsys)
    assert "tuned_file is empty" in err and "is a folder" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder", "nested"])
def test_a_tuned_file_that_is_a_special_file_is_an_error_not_a_hang(tmp_path, capsys, kind):
    path = tmp_path / "tuned.json"
    if kind == "fifo":
        os.mkfifo(path)  # opening it would block until a writer came
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")  # reading it would never end
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_text('{"lrs": ' * 100_000 + "{}" + "}" * 100_000)
    err = usage_error(TINY + ["--methods", "lora", "--tuned_file", str(path), "--out", str(tmp_path / "o")], capsys)
    assert str(path) in err and "not readable" in err


def test_tune_never_reads_the_tuned_file(tmp_path):
    # a damaged tuned_lrs.json must not stop the command that regenerates it
    cfg = tune_mod.tune_config(("lora",), (100,), (0.01,))
    damaged = tmp_path / "tuned.json"
    damaged.write_text("{")
    cfg.tuned_file = str(damaged)
    assert all(s.lr_from == "spec" for s in check_compare_config(cfg))


def test_a_partial_publish_under_other_settings_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    tuned = tmp_path / "tuned_lrs.json"
    shutil.copyfile(TUNED_FILE, tuned)
    monkeypatch.setattr(tune_mod, "TUNED_FILE", tuned)
    before = tuned.read_text()
    with pytest.raises(SystemExit) as exit_:
        tune_mod.main(["--methods", "lora", "--n_train=8", "--publish", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--publish would drop the tuned learning rates of d2lora, dora, lora:r=8" in err
    assert tuned.read_text() == before
    # under the committed settings a partial publish keeps the others
    cfg = tune_mod.tune_config(("lora",))
    assert set(tune_mod.kept_lrs(("lora",), cfg)) == {"d2lora", "dora", "lora:r=8"}


# --- the run cache --------------------------------------------------------------------------------------------------


def test_a_run_whose_adapter_file_was_swapped_for_another_runs_is_recomputed(tmp_path, small_probes, capsys):
    out = tmp_path / "out"
    argv = TINY + ["--methods", "lora dora", "--reference=lora", "--out", str(out)]
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


@pytest.mark.parametrize("kind", ["symlink_to_folder", "fifo_result", "dev_zero_result", "file_for_a_folder"])
def test_a_special_file_in_the_way_of_a_runs_output_is_refused_before_any_work(tmp_path, small_probes, capsys, kind):
    out = tmp_path / "out"
    argv = TINY + ["--methods", "lora", "--out", str(out)]
    assert compare_main(argv) == 0
    (result_file,) = (out / "runs").glob("*.json")
    adapter = out / json.loads(result_file.read_text())["adapter"] / "adapter.safetensors"
    if kind == "symlink_to_folder":
        adapter.unlink()
        (tmp_path / "elsewhere").mkdir()
        adapter.symlink_to(tmp_path / "elsewhere")
    elif kind == "fifo_result":
        result_file.unlink()
        os.mkfifo(result_file)
    elif kind == "dev_zero_result":
        result_file.unlink()
        result_file.symlink_to("/dev/zero")
    else:  # a file where the adapter's folder belongs
        shutil.rmtree(adapter.parent)
        adapter.parent.write_text("")
    capsys.readouterr()
    err = usage_error(argv, capsys)
    assert "is in the way of a run's output" in err


def test_a_long_method_spec_gets_a_file_name_that_fits_and_stays_distinct():
    cfg = CompareConfig()
    long_a, long_b = "lora:lr=0.0" + "0" * 200 + "1", "lora:lr=0.0" + "0" * 200 + "2"
    specs = [parse_method_spec(t, cfg) for t in (long_a, long_b)]
    names = [result_path(Path("o"), s, 0, "k" * 16).name for s in specs]
    assert all(len(n.encode()) + len(".tmp.XXXXXXXX..") < 255 for n in names) and names[0] != names[1]
    assert slug(long_a) != slug(long_b)


def test_a_run_that_changes_no_weight_is_flagged_never_moved(tmp_path, small_probes):
    out = tmp_path / "out"
    assert compare_main(TINY + ["--methods", "lora:lr=1e-300", "--reference=lora:lr=1e-300", "--out", str(out)]) == 0
    (result,) = (json.loads(p.read_text()) for p in (out / "runs").glob("*.json"))
    assert result["status"] == "never moved"
    assert "never moved" in (out / "results.md").read_text()


# --- command lines --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, match", [
    (["--methods", "lora:r=８"], "expected an integer, got '８'"),
    (["--methods", "lora:r=1_6"], "expected an integer, got '1_6'"),
    (["--n_test=1_0"], "expected an integer"),
    (["-n_test=3"], "two dashes"),
    (["--methods", "lora,,dora"], "empty item"),
])  # fmt: skip
def test_settings_are_ascii_numbers_written_with_two_dashes(tmp_path, capsys, argv, match):
    assert match in usage_error(argv + ["--out", str(tmp_path)], capsys)


def test_methods_take_commas_as_well_as_spaces(tmp_path):
    cfg = CompareConfig()
    for text in ("lora,d2lora:r=8,project=false", "lora d2lora:r=8,project=false", "lora, d2lora:r=8, project=false"):
        assert compare_mod.split_methods(text) == ["lora", "d2lora:r=8,project=false"]
    for text in ("lora r=4", "lora,r=4", "d2lora:r=8 project=false"):  # keys after a colon, never on their own
        with pytest.raises(ValueError, match="is not a method"):
            compare_mod.split_methods(text)
    assert [s.text for s in (parse_method_spec(m, cfg) for m in compare_mod.split_methods("base,lora,dora"))] == ["base", "lora", "dora"]


def test_an_output_folder_that_is_a_file_says_so(tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("")
    assert compare_main(TINY + ["--methods", "lora", "--out", str(blocker)]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err


# --- adapter files and the base ---------------------------------------------------------------------------------------


def test_loading_onto_a_model_without_parameters_is_a_clear_error(tmp_path):
    save_adapters(inject_adapters(nn.Sequential(nn.Linear(4, 4)), "lora", r=2, alpha=4, targets=("0",)), tmp_path)
    with pytest.raises(ValueError, match="has no parameters"):
        load_adapters(nn.Sequential(), tmp_path)


class Conv1D(nn.Module):  # GPT-2's layer as transformers defines it: weight (in, out), x @ weight + bias
    def __init__(self, n_out, n_in):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))


def test_an_unconverted_conv1d_target_is_named_with_how_to_convert_it(tmp_path):
    save_adapters(inject_adapters(nn.Sequential(nn.Linear(4, 4)), "lora", r=2, alpha=4, targets=("0",)), tmp_path)
    with pytest.raises(ValueError, match="0 is a Conv1D, not an nn.Linear; Conv1D .* stores its weight as \\(in, out\\)"):
        load_adapters(nn.Sequential(Conv1D(4, 4)), tmp_path)


def test_a_float32_adapter_onto_a_bfloat16_model_says_how_to_load_it(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    save_adapters(inject_adapters(model, "lora", r=2, alpha=4, targets=("0",)), tmp_path)
    target = nn.Sequential(nn.Linear(4, 4))
    target.load_state_dict({"0.weight": model[0].base.weight, "0.bias": model[0].base.bias})
    with pytest.raises(ValueError, match=r"load it onto the model in torch.float32 and convert the model afterwards"):
        load_adapters(target.to(torch.bfloat16), tmp_path)


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
    assert "\n" not in message and "does not fit the model config" in message and "size mismatch for lm_head.weight" in message


def test_a_partial_publish_does_not_merge_into_an_unreadable_file(tmp_path, monkeypatch):
    damaged = tmp_path / "tuned_lrs.json"
    damaged.write_text("{")
    monkeypatch.setattr(tune_mod, "TUNED_FILE", damaged)
    with pytest.raises(ValueError, match="cannot merge into it"):
        tune_mod.kept_lrs(("lora",), tune_mod.tune_config(("lora",)))
    assert tune_mod.kept_lrs(tune_mod.COMPARED, tune_mod.tune_config()) == {}  # a complete tune replaces it


def test_bench_publish_writes_its_report_under_docs_results(tmp_path, monkeypatch):
    from d2lora_min.train import bench

    monkeypatch.setattr(bench, "PUBLISHED", tmp_path / "published")
    assert bench.main(["--only", "sweep", "--quick", "--out", str(tmp_path / "out"), "--publish", "run_a"]) == 0
    for folder in (tmp_path / "out", tmp_path / "published" / "run_a"):
        assert "fixed batch of 8 sequences" in (folder / "bench.md").read_text() and (folder / "bench.json").is_file()
    with pytest.raises(SystemExit):
        bench.main(["--only", "sweep", "--quick", "--out", str(tmp_path / "out"), "--publish", "../elsewhere"])
