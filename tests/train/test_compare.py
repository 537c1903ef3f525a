"""`make compare` (compare.py) and its runs (runs.py): every bad setting a usage error before any work, one line each;
runs that diverged or never moved marked in every table; two specs that run the same thing computed once; a rerun with
other settings beside the earlier results; a learner's edit of a method's plain math changes what compare trains and
scores (and --fused=true runs the fused path as runs of their own); and the runs' file names and volatility."""

import json
import warnings
from pathlib import Path

import pytest
import torch

import d2lora_min.train.compare as compare_mod
from d2lora_min.nn import d2lora, dora
from d2lora_min.train.compare import main as compare_main
from d2lora_min.train.runs import result_path, slug, volatility
from d2lora_min.train.settings import CompareConfig
from d2lora_min.train.specs import parse_method_spec


# --- every setting checked before any work, one line each ---------------------------------------------------------


USAGE_ERRORS = [
    (["--epochs", "0"], "epochs must be in [1, 1000], got 0"),
    (["--epochs", "-3"], "epochs must be in [1, 1000]"),
    (["--train.steps=100"], "follow from the budget"),
    (["--scoring=best"], "scoring must be task, sum or mean"),
    (["--methods", "lora:targets=attn+attn"], "targets has duplicates"),
    (["--methods", "lora:r=2,r=3"], "'r' is given twice"),
    (["--methods", "full:r=4"], "'full' takes only lr, got 'r'"),
    (["--methods", "base:lr=5"], "'base' takes no keys, got 'lr'"),
    (["--pretrain.corpus.text_file=/etc"], "is not a regular file"),
    (["--methods", ""], "no methods given"),
    (["--out", ""], "output folder is empty"),
    (["--seeds", "0,0"], "a seed is listed twice"),
    (["--seeds", "abc"], "--seeds: expected an integer, got 'abc'"),
    (["--seeds", "-1"], "seeds must be in [0, 4294967295]"),
    (["--methods", "lora lora"], "a method is listed twice"),
    (["--methods", "lora lora:r=4"], "a method is listed twice: 'lora' and 'lora:r=4' are the same method"),
    (["--methods", "lora:lr=0.01 lora:lr=1e-2"], "a method is listed twice: 'lora:lr=0.01' and 'lora:lr=1e-2'"),
    (["--methods", "lora:"], "'lora:' has a colon but no key=value after it"),
    (["--methods", "lora:targets=q_proj++v_proj"], "'q_proj++v_proj' has an empty module name"),
    (["--methods", "d2lora:learn_tau=yes"], "learn_tau in 'd2lora:learn_tau=yes': expected true or false, got 'yes'"),
    (["--packed=1"], "packed: expected true or false, got '1'"),
    (["--n_test=0"], "n_test must be in [1, 100000]"),
    (["--n_train=0"], "n_train must be in [1, 100000]"),
    (["--train.batch_size=0"], "train.batch_size must be in [1, 100000]"),
    (["--tasks="], "tasks: expected a comma-separated list"),
    (["--tasks=yesno,yesno"], "a task is listed twice"),
    (["--tasks=yesno,nope"], "unknown task 'nope'"),
    (["--methods", "lora:r=abc"], "r in 'lora:r=abc': expected an integer, got 'abc'"),
    (["--methods", "lora dora d2lora:r=0"], "'d2lora:r=0': rank r must be an integer >= 1, got 0"),
    (["--methods", "d2lora:project=maybe"], "expected true or false"),
    (["--methods", "lora:alpha=inf"], "alpha in 'lora:alpha=inf': expected a finite number"),
    (["--methods", "lora:dropout=1"], "dropout must be in"),
    (["--methods", "lora:lr=-1"], "must be > 0"),
    (["--train.lr=nan"], "train.lr: expected a finite number"),
    (["--train.device=tpu"], "train.device must be auto, cpu, cuda"),
    (["--train.seed=3"], "comes from --seeds"),
    (["--trian.steps=3"], "unknown config section 'trian'"),
    (["--r=0"], "r must be in [1, 128], got 0"),
    (["--targets=q_proj,q_proj"], "targets has duplicates"),
    # settings that used to fail late, after minutes of work:
    (["--pretrain.model.n_head=3"], "pretrain.model.n_head=3 must divide pretrain.model.d_model=128"),
    (["--pretrain.train.steps=0"], "pretrain.train.steps must be >= 1"),
    (["--methods", "lora lora:targets=nope"], "targets in 'lora:targets=nope': target 'nope' matches no module"),
    (["--targets=q_proj,nope"], "target 'nope' matches no module"),
    (["--seeds", "0,99999999999999999999"], "seeds must be in [0, 4294967295]"),
    (["--r=1000000000"], "r must be in [1, 128]"),
    (["--methods", "lora:r=99999999999999999999"], "larger than the model's width"),
    (["--n_train=100000000000000000000"], "n_train must be in [1, 100000]"),
    (["--epochs=100000000000000000000"], "epochs must be in [1, 1000]"),
    (["--n_test=100000000000000000000"], "n_test must be in [1, 100000]"),
    (["--train.checkpoint_every=-1"], "follow from the budget"),
    (["--full_lr=-1"], "full_lr must be > 0"),
    (["--methods", "lora d2lora", "--reference=dora"], "the reference 'dora' is not among the methods"),
    # numbers in ASCII digits, settings with two dashes, no empty list item:
    (["--methods", "lora:r=８"], "expected an integer, got '８'"),
    (["--methods", "lora:r=1_6"], "expected an integer, got '1_6'"),
    (["--n_test=1_0"], "expected an integer"),
    (["-n_test=3"], "two dashes"),
    (["--methods", "lora,,dora"], "empty item"),
    (["--train.weight_decay=1e20"], "would flip the weights' signs"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Make any real work an error, so that a bad input is proven to be refused before it."""

    def forbidden(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(compare_mod, "resolve_base", forbidden)
    monkeypatch.setattr(compare_mod, "run_one", forbidden)


@pytest.mark.parametrize("argv, match", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_compare_refuses_bad_input_with_a_usage_error(argv, match, no_work, capsys, tmp_path):
    argv = argv if "--out" in argv else argv + ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        compare_main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and "frame #" not in err and "usage:" in err and "s training" not in captured.out
    assert match in err, err
    assert len(err.strip().splitlines()[-1]) < 300


def test_ctrl_c_ends_with_one_line(monkeypatch, capsys, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_mod, "compare", interrupted)
    assert compare_main(["--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- what the runs were, said in every table -------------------------------------------------------------------------


def test_a_diverged_run_is_marked_and_left_out_of_the_differences(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    assert tiny("--methods", "lora lora:lr=1e30", "--reference=lora", out=out, epochs=2, checkpoints=2) == 0
    printed = capsys.readouterr().out
    runs = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in tiny.run_files(out)}
    assert runs["lora:lr=1e30"]["status"] == "diverged" and runs["lora"]["status"] == "ok"
    assert str(out / "work") not in printed  # the console never names the folder it then deletes
    results = (out / "results.md").read_text()
    assert "LoRA(r=4), lr=1e+30 [diverged: seed 0]" in results  # the score table marks it
    assert "left out of every difference" in results
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["lora:lr=1e30"]["flags"] == {"0": "diverged"} and "vs_reference" not in rows["lora:lr=1e30"]


@pytest.mark.parametrize("args, every_update_skipped, budget", [
    (["--methods", "lora", "--alpha_over_r=1e19"], True, {"epochs": 2, "checkpoints": 2}),  # the gradient overflows
    (["--methods", "lora:lr=1e-300", "--reference=lora:lr=1e-300"], False, {}),  # updates too small to change a weight
], ids=["gradient always overflows", "changes no weight"])  # fmt: skip
def test_a_run_that_never_moves_is_marked_never_moved(tmp_path, tiny, args, every_update_skipped, budget):
    out = tmp_path / "out"
    assert tiny(*args, out=out, **budget) == 0
    (run,) = tiny.runs(out).values()
    assert run["status"] == "never moved"
    if every_update_skipped:
        assert run["skipped_updates"] == run["steps"]
    assert "[never moved: seed 0]" in (out / "results.md").read_text()


def test_comparing_the_base_alone_prints_no_plot_warning(tmp_path, tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" would fail here
        assert tiny("--methods", "base", "--reference=base", out=tmp_path / "out", epochs=2, checkpoints=2) == 0


def test_two_specs_that_run_the_same_thing_are_computed_once(tmp_path, tiny, capsys):
    # a spec's own lr and a tuned lr that happens to equal it: two roles (replicate lists both), one run
    # (one method listed twice under two spellings is refused: tests/train/test_settings.py)
    out, tuned = tmp_path / "out", tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"lrs": {"lora": 0.01}}))
    argv = tiny.argv("--methods", "lora:lr=0.01 lora", "--tuned_file", str(tuned), out=out, epochs=2, checkpoints=2)
    assert compare_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("s training") == 1 and "the same run as lora:lr=0.01" in printed
    first, second = (
        json.loads(p.read_text()) for p in sorted(tiny.run_files(out), key=lambda p: not p.name.startswith("lora_lr"))
    )
    assert (
        second["same_run_as"] == "lora:lr=0.01" and second["items"] == first["items"] and second["lr_from"] == "tuned"
    )
    assert (
        "one run under two names (computed once): LoRA(r=4) is LoRA(r=4), lr=0.01" in (out / "results.md").read_text()
    )
    assert compare_main(argv) == 0  # both reused
    assert "s training" not in capsys.readouterr().out


def test_a_rerun_with_other_settings_keeps_the_earlier_finished_result(tmp_path, tiny):
    out = tmp_path / "out"
    tiny("--methods", "lora", out=out, epochs=2, checkpoints=2)
    first = tiny.run_files(out)
    tiny("--methods", "lora", "--n_test=7", out=out, epochs=2, checkpoints=2)
    assert len(tiny.run_files(out)) == 2 and all(p.exists() for p in first)
    run = json.loads(first[0].read_text())  # and the run checked a merge that really happened
    assert run["merged_adapter_layers"] == 0 and run["max_logit_diff"] <= 1e-4 and set(run["merge_gap_pp"]) == {"who"}


def test_an_output_folder_that_is_a_file_says_so(tmp_path, tiny, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("")
    assert tiny("--methods", "lora", out=blocker) == 1
    assert "is a file, not a folder" in capsys.readouterr().err


# --- the code a learner edits is the code that runs ------------------------------------------------------------------


def _differ(a, b):
    """Whether two runs of one method trained (losses) and scored (every choice's log-likelihood) differently."""
    return a["losses"] != b["losses"] and a["items"]["who"]["logp"] != b["items"]["who"]["logp"]


def test_editing_a_methods_plain_math_changes_what_compare_trains_and_scores(tmp_path, tiny, monkeypatch):
    methods = ("--methods", "lora dora d2lora", "--reference=lora")
    assert tiny(*methods, out=tmp_path / "clean") == 0
    clean = tiny.runs(tmp_path / "clean")

    # a learner's edits: DoRA's per-row factor halved (a helper its forward() calls), D2-LoRA without its negative
    # branch (its stacked_factors())
    def half_factor(target, V, detach_norm):
        return 0.5 * target.to(V.dtype) / V.norm(dim=1).clamp_min(1e-12)

    def positive_branch_only(self):
        A = torch.cat([self.lora_A_pos, self.lora_A_neg], dim=0)  # (2r, in)
        B = torch.cat([self.lora_B_pos, 0.0 * self.lora_B_neg], dim=1)  # (out, 2r)
        return A, B

    monkeypatch.setattr(dora, "row_factor", half_factor)
    monkeypatch.setattr(d2lora.D2LoRALinear, "stacked_factors", positive_branch_only)
    assert tiny(*methods, out=tmp_path / "edited") == 0
    edited = tiny.runs(tmp_path / "edited")

    assert clean["lora"]["losses"] == edited["lora"]["losses"]  # the edits touch DoRA and D2-LoRA only
    assert _differ(clean["dora"], edited["dora"])
    assert _differ(clean["d2lora"], edited["d2lora"])


def test_the_fused_setting_runs_the_fused_path_as_runs_of_their_own(tmp_path, tiny, monkeypatch):
    from d2lora_min.nn import fused

    calls = []
    original = fused.FusedDoRALinear.forward
    monkeypatch.setattr(fused.FusedDoRALinear, "forward", lambda layer, x: calls.append(1) or original(layer, x))
    assert tiny("--methods", "lora dora", "--reference=lora", out=tmp_path / "out") == 0
    plain = tiny.runs(tmp_path / "out")
    assert not calls  # the default: DoRALinear.forward's plain math
    assert tiny("--methods", "lora dora", "--reference=lora", "--fused=true", out=tmp_path / "out") == 0
    assert calls
    runs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("dora*.json")]
    assert len(runs) == 2  # the fused run did not reuse the plain one: the setting is part of the run key
    fused_run = next(r for r in runs if r["key"] != plain["dora"]["key"])
    assert (
        max(abs(a - b) for a, b in zip(fused_run["losses"], plain["dora"]["losses"])) < 1e-3
    )  # same math, other rounding


# --- the runs' files and what they record -------------------------------------------------------------------------


def test_a_long_method_spec_gets_a_file_name_that_fits_and_stays_distinct():
    cfg = CompareConfig()
    long_a, long_b = "lora:lr=0.0" + "0" * 200 + "1", "lora:lr=0.0" + "0" * 200 + "2"
    specs = [parse_method_spec(t, cfg) for t in (long_a, long_b)]
    names = [result_path(Path("o"), s, 0, "k" * 16).name for s in specs]
    assert all(len(n.encode()) + len(".tmp.XXXXXXXX..") < 255 for n in names) and names[0] != names[1]
    assert slug(long_a) != slug(long_b)


def test_volatility_is_the_spread_of_step_to_step_changes_not_of_the_loss():
    falling = [10.0 - 0.1 * k for k in range(40)]  # a straight line: every change is -0.1, no volatility
    assert volatility(falling) == pytest.approx(0.0, abs=1e-12)
    zigzag = [1.0 + (0.2 if k % 2 else 0.0) for k in range(40)]  # changes of +-0.2 over the second half
    assert volatility(zigzag) == pytest.approx(0.2, rel=0.01)
    assert volatility([1.0, 2.0]) != volatility([1.0, 2.0])  # nan below 4 steps
