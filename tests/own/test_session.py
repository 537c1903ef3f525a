"""Your own model and data through compare and tune (d2lora_min/own/session.py): the shipped base exported as OPT and
compared through --model gives the native accuracies and verdicts; a tiny random Llama with tiny JSONL tasks runs end
to end; a tune on them writes its tuned file beside its runs, which compare then uses; the settings such a run would
ignore are refused; retention is the loss on the held-out text you give."""

import json

import pytest

pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")

from d2lora_min.own.export import export_base  # noqa: E402
from d2lora_min.train.compare import main as compare_main  # noqa: E402
from d2lora_min.train.tune import main as tune_main  # noqa: E402

from .folders import model_folder, write_tasks  # noqa: E402

QUIET = ["--train.progress=false", "--checkpoints=1"]


def rows_of(out):
    return {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}


def test_the_shipped_base_through_model_gives_the_native_accuracies_and_verdicts(tmp_path, tiny):
    """Proof (b): the same comparison on the shipped base and on its OPT export through --model."""
    folder = export_base(tmp_path / "opt")
    runs = ("--methods", "lora dora d2lora", "--reference=lora", "--lr_source=shared")
    budget = dict(tasks="who,facts,span", n_train=16, n_test=16, **{"train.batch_size": 8})
    assert tiny(*runs, out=tmp_path / "native", **budget) == 0
    assert tiny(*runs, "--model", str(folder), out=tmp_path / "hf", **budget) == 0
    native, through = rows_of(tmp_path / "native"), rows_of(tmp_path / "hf")
    gaps = [abs(native[m]["scores"][t] - through[m]["scores"][t]) for m in native for t in native[m]["scores"]]
    print(f"proof (b): largest per-task score difference, native against --model: {max(gaps):.4f}")
    assert max(gaps) <= 1 / 16 + 1e-12  # within rounding: at most one of the 16 test items of a task scored otherwise
    for m in ("lora", "dora", "d2lora"):  # the same training
        assert tiny.runs(tmp_path / "hf")[m]["losses"] == pytest.approx(
            tiny.runs(tmp_path / "native")[m]["losses"], rel=1e-4
        )
    for m in ("dora", "d2lora"):
        assert native[m]["vs_reference"]["verdict"] == through[m]["vs_reference"]["verdict"]
        assert native[m]["heldout_loss"] == pytest.approx(through[m]["heldout_loss"], rel=1e-4)


def test_a_tiny_llama_with_jsonl_tasks_runs_end_to_end(tmp_path, capsys):
    """Proof (c): a random 2-layer Llama and two tiny JSONL tasks, multiple choice and generation, two seeds."""
    model = model_folder(tmp_path / "llama")
    tasks = write_tasks(tmp_path / "tasks")
    argv = ["--model", str(model), "--tasks", str(tasks), "--seeds=0,1", "--methods", "lora dora d2lora",
            "--reference=lora", "--epochs=2", "--train.batch_size=8", *QUIET,
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert compare_main(argv) == 0
    printed = capsys.readouterr().out
    assert "targets: q_proj, k_proj, v_proj, o_proj (llama's default" in printed
    assert "every method at the shared lr" in printed and "retention: skipped" in printed
    assert "2 tasks from files, 24 training items x 2 epochs = 6 steps of 8" in printed
    assert "left (5 runs to go)" in printed  # the time estimate after the first run
    summary = printed[printed.index("\nSummary") :]
    print(summary)
    assert max(len(line) for line in summary.splitlines()) <= 100
    assert all(label in summary for label in ("LoRA(r=4)", "DoRA(r=4)", "D2-LoRA(r=4)", "(reference)"))
    rows = rows_of(tmp_path / "out")
    for m in ("dora", "d2lora"):
        v = rows[m]["vs_reference"]
        assert v["lo"] <= v["diff"] <= v["hi"] and v["verdict"] and "what" in rows[m]["gen_vs_reference"]["per_task"]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")]
    assert len(runs) == 6 and all(len(r["items"]["who"]["logp"]) == 8 for r in runs)  # every test line scored
    assert all(r["memory"]["saved_for_backward"] > 0 and r["step_time"] > 0 for r in runs)
    assert rows["d2lora"]["trainable_params"] == rows["lora"]["trainable_params"] * 2
    assert "8 test items per task" in (tmp_path / "out" / "results.md").read_text()
    assert compare_main(argv) == 0 and "6 of 6 runs reused" in capsys.readouterr().out  # the same keys again


def test_tune_on_your_model_writes_its_tuned_file_beside_the_runs_and_compare_uses_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model, tasks = model_folder(tmp_path / "llama"), write_tasks(tmp_path / "tasks")
    common = ["--model", str(model), "--tasks", str(tasks), "--epochs=1", "--train.batch_size=8", *QUIET]
    assert tune_main(common + ["--methods", "lora", "--seeds=100", "--grid=0.001,0.01"]) == 0
    tuned = json.loads((tmp_path / "runs" / "tune" / "tuned_lrs.json").read_text())
    assert set(tuned["lrs"]) == {"lora"} and tuned["protocol"]["user"]["model"]
    capsys.readouterr()
    assert compare_main(common + ["--methods", "lora lora:r=8", "--reference=lora", "--seeds=0"]) == 0
    printed = capsys.readouterr().out
    assert "learning rates: tuned, from runs/tune/tuned_lrs.json" in printed
    assert f"LoRA(r=4) {tuned['lrs']['lora']:.3g} (tuned)" in printed and "LoRA(r=8) 0.01 (shared)" in printed
    with pytest.raises(SystemExit):
        tune_main(common + ["--methods", "lora", "--publish"])  # never into the package
    assert "--publish writes into the package" in capsys.readouterr().err


def refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_settings_that_would_be_ignored_are_refused(tmp_path, capsys):
    model, tasks = model_folder(tmp_path / "llama"), write_tasks(tmp_path / "tasks")
    out = ["--out", str(tmp_path / "o")]
    msg = refused(["--tasks", str(tasks), "--n_test=4", *out], capsys)
    assert "--n_test with --tasks DIR: the task files decide the items" in msg
    msg = refused(["--model", str(model), "--pretrain.model.n_layer=3", *out], capsys)
    assert "--pretrain.* settings with --model" in msg
    assert "--heldout_text: corpus file" in refused(["--tasks", str(tasks), "--heldout_text=nowhere.txt", *out], capsys)
    assert "--publish writes into the package" in refused(["--tasks", str(tasks), "--publish", *out], capsys)


def test_retention_is_the_loss_on_the_held_out_text_you_give(tmp_path, capsys):
    text = tmp_path / "heldout.txt"
    text.write_text("Mira has the cup and Kalo has the map. " * 40)
    argv = ["--model", str(model_folder(tmp_path / "llama")), "--tasks", str(write_tasks(tmp_path / "tasks")),
            "--heldout_text", str(text), "--methods", "base lora", "--reference=lora", "--seeds=0", "--epochs=1",
            *QUIET, "--out", str(tmp_path / "out")]  # fmt: skip
    assert compare_main(argv) == 0
    assert f"retention: the loss on {text}" in capsys.readouterr().out
    rows = rows_of(tmp_path / "out")
    assert 0 < rows["base"]["heldout_loss"] != rows["lora"]["heldout_loss"] > 0 and rows["lora"]["facts_probe"] is None
    table = (tmp_path / "out" / "results.md").read_text().split("Retention and cost:")[1]
    assert f"| LoRA(r=4) | {rows['lora']['heldout_loss'] - rows['base']['heldout_loss']:+.3f} | – |" in table
