"""The report (report.py, tables.py, plots.py): the table rows and their "detectable" column, the verdict that
follows which method is ahead, the saturated tasks and lifts, the claims' verdicts, the forest plot's panels, plots
written through a temporary file of their own (a full disk is one line and leaves no stale plot), and the summary
compare prints: at most 100 columns whatever the methods are called and whatever their numbers."""

import errno
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from d2lora_min.train.report import WIDTH, forest_groups, method_rows, summary_table, terminal
from d2lora_min.train.settings import CompareConfig
from d2lora_min.train.specs import SHARED_LR, roles
from d2lora_min.train.tables import _claim, headroom_lines, memory_table

from .outcomes import MC_TASK, fake_runs


def test_the_detectable_column_is_t_plus_0_84_standard_errors():
    # three seeds, a ahead by 1, 3 and 5 pp: se = 0.02 / sqrt(3) = 0.011547, df = 2, t = 4.303; the smallest true
    # difference found 80 % of the time at the 5 % level is (t + z_0.8) * se = (4.303 + 0.84) * 0.011547 = 0.059386
    # (from the full CI width instead it would be 2 * 4.303 * 0.011547 = 0.099375)
    rows = {
        r["method"]: r
        for r in method_rows(fake_runs([0.01, 0.03, 0.05]), {"t": MC_TASK}, {"t": np.arange(40)}, "sum", "ref")
    }
    v = rows["a"]["vs_reference"]
    assert v["diff"] == pytest.approx(0.03) and v["se"] == pytest.approx(0.02 / np.sqrt(3))
    assert v["detectable"] == pytest.approx(0.059386, rel=1e-3)
    assert v["hi"] - v["diff"] == pytest.approx(4.303 * 0.02 / np.sqrt(3), rel=1e-3)


def test_the_verdict_in_the_table_follows_which_method_is_ahead():
    ahead = fake_runs([0.05, 0.06, 0.07])
    behind = [
        {**r, "method": {"a": "ref", "ref": "a"}[r["method"]], "label": {"a": "ref", "ref": "a"}[r["label"]]}
        for r in ahead
    ]
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
    assert [
        _claim("vs DoRA", None, d, lo, hi, sign=0)["verdict"]
        for d, lo, hi in ((1, 0.5, 1.5), (0, -1, 1), (-1, -1.5, -0.5))
    ] == ["exceeded", "matched", "opposite"]  # "matches or exceeds"
    assert _claim("gain", 2.2, 1.0, 0.5, 2.5)["paper_in_ci"] and not _claim("gain", 2.2, 1.0, 0.5, 1.5)["paper_in_ci"]


def test_the_replicate_forest_compares_each_panel_with_lora_2r_run_the_same_way():
    tuned, shared = roles(4), roles(4, SHARED_LR)
    ahead = {"D2-LoRA(r)": 0.03, "DoRA(r)": 0.01, "LoRA(r)": -0.02, "LoRA(2r)": 0.0}  # over LoRA(2r), on every item
    runs = []
    for names, shift in ((tuned, 0.0), (shared, -0.05)):  # at the shared lr everyone 5 pp lower
        for role, spec in names.items():
            for seed in range(3):
                score = [0.5 + shift + ahead[role] + 0.002 * seed] * 40
                runs.append(
                    {
                        "method": spec,
                        "label": spec,
                        "seed": seed,
                        "trainable_params": 1,
                        "items": {"t": {"correct_sum": score}},
                    }
                )
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


# --- the summary compare prints ----------------------------------------------------------------------------------------

labels = st.text(st.characters(codec="ascii", categories=("L", "N", "P")), min_size=1, max_size=160)
fraction = st.floats(-1.0, 1.0, allow_nan=False)
verdicts = st.sampled_from(["better", "worse", "no detectable difference"])


@st.composite
def rows_and_runs(draw):
    rows, runs = [], []
    for i in range(draw(st.integers(1, 8))):
        lo, hi = sorted([draw(fraction), draw(fraction)])
        vs = {"diff": (lo + hi) / 2, "lo": lo, "hi": hi, "verdict": draw(verdicts)} if i else None
        rows.append({"method": f"m{i}", "label": draw(labels), "trainable_params": draw(st.integers(0, 10**12)),
                     "mean_mc": draw(st.floats(0.0, 1.0)), "step_time": draw(st.one_of(st.none(), st.floats(0.0, 1e5))),
                     "flags": draw(st.sampled_from([{}, {3: "diverged"}, {0: "never moved", 7: "diverged"}])),
                     "vs_reference": vs})  # fmt: skip
        peak = draw(st.one_of(st.none(), st.integers(0, 2**50)))
        memory = {"saved_for_backward": draw(st.integers(0, 2**50)), "cuda_peak": peak}
        runs.append({"method": f"m{i}", "memory": memory})
    return rows, runs


@given(rows_and_runs(), st.text(min_size=1, max_size=300))
def test_no_line_of_the_summary_is_wider_than_100_columns(case, out_dir):
    rows, runs = case
    cfg = SimpleNamespace(reference="m0", split="test", seeds=tuple(range(28)), tuned_file="/a/very/long/path/" * 9)
    specs = [SimpleNamespace(name="lora", label="LoRA(r=4)", lr=0.01, lr_from="tuned")] * 20
    text = terminal(SimpleNamespace(cfg=cfg, specs=specs), rows, runs, "12 s (0 of 9 runs reused)", out_dir)
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    lines = summary_table(rows, runs, rows[0]["label"])
    assert len(lines) == len(rows) + 2 and all(len(line) <= WIDTH for line in lines)
    for row, line in zip(rows, lines[2:]):
        shown = line[: len(lines[1].split("  ")[0])].rstrip()  # the method column
        assert row["label"].startswith(shown.rstrip("…")) or shown.startswith(row["label"][:10])
        if row["vs_reference"] and row["label"] != rows[0]["label"]:
            assert f"[{100 * row['vs_reference']['lo']:+.1f}, {100 * row['vs_reference']['hi']:+.1f}]" in line


def test_the_summary_shows_each_number_a_reader_needs():
    interval = {"diff": 0.0019, "lo": -0.008, "hi": 0.0119, "verdict": "no detectable difference"}
    rows = [{"method": "lora:r=8", "label": "LoRA(r=8)", "trainable_params": 16384, "mean_mc": 0.612,
             "step_time": 0.0151, "vs_reference": None, "flags": {}},
            {"method": "d2lora", "label": "D2-LoRA(r=4)", "trainable_params": 16384, "mean_mc": 0.6139,
             "step_time": 0.0203, "vs_reference": interval, "flags": {}}]  # fmt: skip
    runs = [{"method": "lora:r=8", "memory": {"saved_for_backward": 3 * 2**20, "cuda_peak": None}},
            {"method": "d2lora", "memory": {"saved_for_backward": 5 * 2**20, "cuda_peak": None}}]  # fmt: skip
    head, _, ref, d2 = summary_table(rows, runs, "LoRA(r=8)")
    assert head.split() == "method trainable mean % Δ pp [95 % CI] verdict step memory".split()
    assert ref.split() == ["LoRA(r=8)", "16.4k", "61.2", "(reference)", "15", "ms", "3.0", "MB"]
    assert d2.split() == "D2-LoRA(r=4) 16.4k 61.4 +0.2 [-0.8, +1.2] no detectable diff 20 ms 5.0 MB".split()
    assert memory_table(rows, runs).splitlines()[-1] == "| D2-LoRA(r=4) | 20 ms | 5.0 MB |"
    runs[0]["memory"]["cuda_peak"] = runs[1]["memory"]["cuda_peak"] = 7 * 2**30  # on CUDA: the peak, said so
    assert "peak CUDA memory" in memory_table(rows, runs)
    assert summary_table(rows, runs, "LoRA(r=8)")[3].endswith("7.0 GB")
