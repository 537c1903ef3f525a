"""The report (report.py, tables.py, plots.py): the table rows and their "detectable" column, the verdict that
follows which method is ahead, the saturated tasks and lifts, the claims' verdicts, the forest plot's panels, and plots
written through a temporary file of their own (a full disk is one line and leaves no stale plot)."""

import errno

import numpy as np
import pytest

from d2lora_min.train.report import forest_groups, method_rows
from d2lora_min.train.settings import CompareConfig
from d2lora_min.train.specs import SHARED_LR, roles
from d2lora_min.train.tables import _claim, headroom_lines

from .outcomes import MC_TASK, fake_runs


def test_the_detectable_column_is_t_plus_0_84_standard_errors():
    # three seeds, a ahead by 1, 3 and 5 pp: se = 0.02 / sqrt(3) = 0.011547, df = 2, t = 4.303; the smallest true
    # difference found 80 % of the time at the 5 % level is (t + z_0.8) * se = (4.303 + 0.84) * 0.011547 = 0.059386
    # (from the full CI width instead it would be 2 * 4.303 * 0.011547 = 0.099375)
    rows = {r["method"]: r for r in method_rows(fake_runs([0.01, 0.03, 0.05]), {"t": MC_TASK}, {"t": np.arange(40)}, "sum", "ref")}
    v = rows["a"]["vs_reference"]
    assert v["diff"] == pytest.approx(0.03) and v["se"] == pytest.approx(0.02 / np.sqrt(3))
    assert v["detectable"] == pytest.approx(0.059386, rel=1e-3)
    assert v["hi"] - v["diff"] == pytest.approx(4.303 * 0.02 / np.sqrt(3), rel=1e-3)


def test_the_verdict_in_the_table_follows_which_method_is_ahead():
    ahead = fake_runs([0.05, 0.06, 0.07])
    behind = [{**r, "method": {"a": "ref", "ref": "a"}[r["method"]], "label": {"a": "ref", "ref": "a"}[r["label"]]} for r in ahead]
    for runs, expected in ((ahead, "better"), (behind, "worse")):
        rows = {r["method"]: r for r in method_rows(runs, {"t": MC_TASK}, {"t": np.arange(40)}, "sum", "ref")}
        assert rows["a"]["vs_reference"]["verdict"] == expected


def test_headroom_lines_flag_a_task_whose_best_method_saturates_and_a_small_lift():
    from d2lora_min.synthetic.tasks import TASKS

    tasks = {t: TASKS[t] for t in ("yesno", "who", "facts")}
    rows = [{"method": "base", "scores": {"yesno": 0.50, "who": 0.30, "facts": 0.70}, "mean_mc": 0.5},
            {"method": "lora", "scores": {"yesno": 0.60, "who": 0.97, "facts": 0.90}, "mean_mc": 0.82},
            {"method": "d2lora", "scores": {"yesno": 0.62, "who": 0.80, "facts": 0.96}, "mean_mc": 0.79}]  # fmt: skip
    saturated, lift = headroom_lines(rows, tasks, chance={"yesno": 0.5, "who": 0.25, "facts": 0.25})
    assert saturated.startswith("saturated tasks (best method >= 97 %): who;")  # one method at 97 % is enough
    assert "82.0 %" in saturated
    assert lift == "lift of the best method over max(base, chance): below 15 pp on yesno (+12.0)"


def test_a_claim_is_replicated_on_the_papers_side_of_zero_whatever_its_sign():
    assert _claim("gain", 2.2, 1.0, 0.5, 1.5)["verdict"] == "replicated"
    assert _claim("gain", 2.2, -1.0, -1.5, -0.5)["verdict"] == "opposite"
    assert _claim("volatility", -36.0, -10.0, -14.0, -5.0)["verdict"] == "replicated"  # the paper's figure is negative
    assert _claim("volatility", -36.0, 10.0, 5.0, 14.0)["verdict"] == "opposite"
    assert _claim("volatility", -36.0, 1.0, -3.0, 4.0)["verdict"] == "not replicated"
    assert _claim("ahead", None, 1.0, 0.2, 1.8, sign=1)["verdict"] == "replicated"
    assert [_claim("vs DoRA", None, d, lo, hi, sign=0)["verdict"] for d, lo, hi in ((1, 0.5, 1.5), (0, -1, 1), (-1, -1.5, -0.5))] == [
        "exceeded", "matched", "opposite"]  # "matches or exceeds"
    assert _claim("gain", 2.2, 1.0, 0.5, 2.5)["paper_in_ci"] and not _claim("gain", 2.2, 1.0, 0.5, 1.5)["paper_in_ci"]


def test_the_replicate_forest_compares_each_panel_with_lora_2r_run_the_same_way():
    tuned, shared = roles(4), roles(4, SHARED_LR)
    ahead = {"D2-LoRA(r)": 0.03, "DoRA(r)": 0.01, "LoRA(r)": -0.02, "LoRA(2r)": 0.0}  # over LoRA(2r), on every item
    runs = []
    for names, shift in ((tuned, 0.0), (shared, -0.05)):  # at the shared lr everyone 5 pp lower
        for role, spec in names.items():
            for seed in range(3):
                score = [0.5 + shift + ahead[role] + 0.002 * seed] * 40
                runs.append({"method": spec, "label": spec, "seed": seed, "trainable_params": 1, "items": {"t": {"correct_sum": score}}})
    cfg = CompareConfig()
    cfg.reference = tuned["DoRA(r)"]  # another reference for the tables: the plot still takes LoRA(2r)
    rows = method_rows(runs, {"t": MC_TASK}, {"t": np.arange(40)}, "sum", cfg.reference)
    groups, reference_label, paper = forest_groups(rows, runs, {"t": MC_TASK}, {"t": np.arange(40)}, cfg, "replicate")
    assert reference_label == "LoRA(2r) = lora:r=8" and len(groups) == 2
    for (title, points), names in zip(groups, (tuned, shared)):
        assert title.endswith(f"against {names['LoRA(2r)']}")
        got = {p["label"]: p["diff"] for p in points}
        assert got == pytest.approx({names[role]: ahead[role] for role in ("D2-LoRA(r)", "DoRA(r)", "LoRA(r)")})
    assert paper == {tuned["D2-LoRA(r)"]: 1.6, shared["D2-LoRA(r)"]: 1.6}


# --- plots ------------------------------------------------------------------------------------------------------


def test_a_plot_is_written_through_a_temporary_file_of_its_own(tmp_path):
    from d2lora_min.train.plots import plot_losses

    path = tmp_path / "loss_curves.png"
    (tmp_path / "loss_curves.png.tmp.png").mkdir()  # a fixed temporary name, taken by another writer
    plot_losses([{"label": "m", "seed": 0, "losses": [3.0, 2.0, 1.0]}], path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_a_full_disk_while_plotting_is_one_line_and_leaves_no_stale_plot(tmp_path, tiny, monkeypatch, capsys):
    import matplotlib.figure

    out = tmp_path / "out"
    tiny("--methods", "lora", out=out, epochs=2, checkpoints=2)
    assert (out / "loss_curves.png").exists()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    capsys.readouterr()
    assert tiny("--methods", "lora", out=out, epochs=2, checkpoints=2) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "loss_curves.png" in err and "Traceback" not in err
    assert not (out / "loss_curves.png").exists() and (out / "results.md").exists()
