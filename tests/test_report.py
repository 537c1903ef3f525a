"""The statistics of the comparison (d2lora_min/train/stats.py), on synthetic per-item outcomes whose true
difference is known: the interval covers it at the stated rate, identical methods show no difference, a large
difference gets the right verdict, and clustered items are not counted as independent."""

import numpy as np
import pytest

from d2lora_min.train.presets import CompareConfig
from d2lora_min.train.stats import cluster_ids, paired_bootstrap, seed_bootstrap_ratio, verdict
from d2lora_min.train.tables import headroom_lines

DEFAULT_SEEDS = len(CompareConfig().seeds)  # make compare's default number of seeds


def simulate(rng, delta, n_items=300, n_seeds=DEFAULT_SEEDS, tasks=2, cluster_size=5, effect_sd=0.1, seed_sd=0.02):
    """Per-item correctness of methods a and b on the same items and seeds. Each cluster of items (a person, a
    script) has its own difficulty and its own gain of a over b (mean delta, sd effect_sd); each seed shifts each
    method's skill a little (sd seed_sd). Items are a fresh draw from the population, so the true difference is delta."""
    a, b, clusters = {}, {}, {}
    for t in range(tasks):
        n_clusters = n_items // cluster_size
        difficulty = np.repeat(rng.uniform(0.25, 0.75, n_clusters), cluster_size)  # (N,)
        gain = np.repeat(rng.normal(delta, effect_sd, n_clusters), cluster_size)  # (N,): correlated within a cluster
        seed_a = rng.normal(0, seed_sd, (n_seeds, 1))
        seed_b = rng.normal(0, seed_sd, (n_seeds, 1))
        p_b = np.clip(difficulty + seed_b, 0, 1)
        p_a = np.clip(difficulty + gain + seed_a, 0, 1)
        u = rng.uniform(size=(n_seeds, n_items))  # shared noise: the paired design (same item, same seed)
        b[t] = (u < p_b).astype(float)
        a[t] = (u < p_a).astype(float)
        clusters[t] = np.repeat(np.arange(n_clusters), cluster_size)
    return a, b, clusters


def test_the_interval_covers_the_true_difference_at_about_95_percent():
    rng = np.random.default_rng(0)
    delta, sims, covered = 0.03, 150, 0
    for i in range(sims):
        a, b, clusters = simulate(rng, delta)
        boot = paired_bootstrap(a, b, clusters, n_boot=300, seed=i)
        covered += boot["lo"] <= delta <= boot["hi"]
    assert 0.9 <= covered / sims <= 0.99, covered / sims


def test_clustered_items_widen_the_interval():
    rng = np.random.default_rng(1)
    a, b, _ = simulate(rng, 0.0, n_items=300, cluster_size=10, effect_sd=0.15)
    as_clusters = paired_bootstrap(a, b, {t: np.repeat(np.arange(30), 10) for t in a}, n_boot=1000)
    as_items = paired_bootstrap(a, b, {t: np.arange(300) for t in a}, n_boot=1000)
    assert as_clusters["hi"] - as_clusters["lo"] > as_items["hi"] - as_items["lo"]


def test_identical_methods_show_no_detectable_difference():
    rng = np.random.default_rng(2)
    a, _, clusters = simulate(rng, 0.0)
    boot = paired_bootstrap(a, {t: v.copy() for t, v in a.items()}, clusters)  # the very same outcomes
    assert boot["diff"] == 0 and verdict(boot["lo"], boot["hi"]) == "no detectable difference"
    calls = []  # methods of equal skill (their own seed and item noise): "no difference" in about 95 % of runs
    for i in range(60):
        a, b, clusters = simulate(rng, 0.0)
        boot = paired_bootstrap(a, b, clusters, n_boot=200, seed=i)
        calls.append(verdict(boot["lo"], boot["hi"]))
    assert calls.count("no detectable difference") >= 0.88 * len(calls)


@pytest.mark.parametrize("delta, expected", [(0.15, "better"), (-0.15, "worse")])
def test_a_large_difference_gets_the_right_verdict(delta, expected):
    a, b, clusters = simulate(np.random.default_rng(3), delta)
    boot = paired_bootstrap(a, b, clusters)
    assert verdict(boot["lo"], boot["hi"]) == expected
    assert boot["lo"] <= delta <= boot["hi"]


def test_cluster_ids_keep_unlabelled_items_apart():
    assert list(cluster_ids(["Mira", "", "Mira", "Kalo", ""])) == [0, 1, 0, 2, 3]


def test_t_quantiles():
    from d2lora_min.train.stats import t_quantile

    assert [round(t_quantile(df), 3) for df in (1, 2, 5, 30, float("inf"))] == [12.706, 4.303, 2.571, 2.042, 1.96]


def test_seed_ratio_interval():
    ratio, lo, hi = seed_bootstrap_ratio([0.6, 0.7, 0.65, 0.62], [1.0, 1.1, 0.95, 1.05])
    assert ratio == pytest.approx(np.mean([0.6, 0.7, 0.65, 0.62]) / np.mean([1.0, 1.1, 0.95, 1.05]) - 1)
    assert lo <= ratio <= hi < 0


def test_headroom_lines_flag_a_task_whose_best_method_saturates_and_a_small_lift():
    from d2lora_min.train.tasks import TASKS

    tasks = {t: TASKS[t] for t in ("yesno", "who", "facts")}
    rows = [{"method": "base", "scores": {"yesno": 0.50, "who": 0.30, "facts": 0.70}, "mean_mc": 0.5},
            {"method": "lora", "scores": {"yesno": 0.60, "who": 0.97, "facts": 0.90}, "mean_mc": 0.82},
            {"method": "d2lora", "scores": {"yesno": 0.62, "who": 0.80, "facts": 0.96}, "mean_mc": 0.79}]  # fmt: skip
    saturated, lift = headroom_lines(rows, tasks, chance={"yesno": 0.5, "who": 0.25, "facts": 0.25})
    assert saturated.startswith("saturated tasks (best method >= 97 %): who;")  # one method at 97 % is enough
    assert "82.0 %" in saturated
    assert lift == "lift of the best method over max(base, chance): below 15 pp on yesno (+12.0)"


def test_a_claim_is_replicated_on_the_papers_side_of_zero_whatever_its_sign():
    from d2lora_min.train.claims import _claim

    assert _claim("gain", 2.2, 1.0, 0.5, 1.5)["verdict"] == "replicated"
    assert _claim("gain", 2.2, -1.0, -1.5, -0.5)["verdict"] == "opposite"
    assert _claim("volatility", -36.0, -10.0, -14.0, -5.0)["verdict"] == "replicated"  # the paper's figure is negative
    assert _claim("volatility", -36.0, 10.0, 5.0, 14.0)["verdict"] == "opposite"
    assert _claim("volatility", -36.0, 1.0, -3.0, 4.0)["verdict"] == "not replicated"
    assert _claim("ahead", None, 1.0, 0.2, 1.8, sign=1)["verdict"] == "replicated"
    assert [_claim("vs DoRA", None, d, lo, hi, sign=0)["verdict"] for d, lo, hi in ((1, 0.5, 1.5), (0, -1, 1), (-1, -1.5, -0.5))] == [
        "exceeded", "matched", "opposite"]  # "matches or exceeds"
    assert _claim("gain", 2.2, 1.0, 0.5, 2.5)["paper_in_ci"] and not _claim("gain", 2.2, 1.0, 0.5, 1.5)["paper_in_ci"]


def test_volatility_is_the_spread_of_step_to_step_changes_not_of_the_loss():
    from d2lora_min.train.run import volatility

    falling = [10.0 - 0.1 * k for k in range(40)]  # a straight line: every change is -0.1, no volatility
    assert volatility(falling) == pytest.approx(0.0, abs=1e-12)
    zigzag = [1.0 + (0.2 if k % 2 else 0.0) for k in range(40)]  # changes of +-0.2 over the second half
    assert volatility(zigzag) == pytest.approx(0.2, rel=0.01)
    assert volatility([1.0, 2.0]) != volatility([1.0, 2.0])  # nan below 4 steps


# --- the interval and the "detectable" column, pinned on hand-worked examples -----------------------------------------
# Student's t, 97.5 % quantiles (two-sided 95 %), as printed in standard tables (e.g. the NIST/SEMATECH e-Handbook of
# Statistical Methods, section 1.3.6.7.2, "Critical values of the Student's t distribution"):
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 27: 2.052}


def _equal_within_seeds(per_seed, n_items=40):
    """Outcomes of methods a and b whose item differences are the same within each seed (per_seed[s] on every item of
    seed s): the item part of the variance is then 0, and the interval is the seeds' alone, with S - 1 degrees of
    freedom: diff +- t(S - 1) * sd(per_seed) / sqrt(S)."""
    d = np.repeat(np.asarray(per_seed, float)[:, None], n_items, axis=1)  # (S, N)
    a, b = {"t": 0.5 + d / 2}, {"t": 0.5 - d / 2}
    return a, b, {"t": np.arange(n_items)}


@pytest.mark.parametrize("per_seed, df", [
    ([0.02, 0.04], 1),  # sd 0.014142, se 0.01: half-width 12.706 * 0.01 = 0.12706
    ([0.01, 0.03, 0.02, 0.05, 0.04], 4),  # sd 0.015811, se 0.0070711: half-width 2.776 * 0.0070711 = 0.019630
    ([0.02, 0.04] * 14, 27),  # sd 0.0101835, se 0.0019245: half-width 2.052 * 0.0019245 = 0.0039491
])  # fmt: skip
def test_the_interval_is_students_t_times_the_standard_error_at_2_5_and_28_seeds(per_seed, df):
    from d2lora_min.train.stats import mean_ci

    a, b, clusters = _equal_within_seeds(per_seed)
    boot = paired_bootstrap(a, b, clusters)
    se = np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))
    assert boot["df"] == pytest.approx(df) and boot["se"] == pytest.approx(se, rel=1e-9)
    assert boot["diff"] == pytest.approx(0.03)
    assert boot["hi"] - boot["diff"] == pytest.approx(T975[df] * se, rel=1e-3)  # z = 1.96 would be 30-85 % too narrow
    assert boot["diff"] - boot["lo"] == pytest.approx(T975[df] * se, rel=1e-3)
    # one method's mean accuracy is the same interval against a zero baseline (here a's accuracies, 0.5 + d / 2)
    runs = [{"method": "a", "seed": s, "items": {"t": {"correct_sum": list(a["t"][s])}}} for s in range(len(per_seed))]
    task = type("Task", (), {"kind": "mc", "normalise": False})()
    mean, lo, hi = mean_ci(runs, {"t": task}, clusters, "sum")
    assert mean == pytest.approx(0.515) and hi - mean == pytest.approx(T975[df] * se / 2, rel=1e-3)


def _fake_runs(per_seed, n_items=40):
    """Runs of methods "a" and "ref" as method_rows reads them, a ahead of ref by per_seed[s] on every item of seed s."""
    a, b, _ = _equal_within_seeds(per_seed, n_items)
    make = lambda m, x, s: {"method": m, "label": m, "seed": s, "trainable_params": 1, "items": {"t": {"correct_sum": list(x["t"][s])}}}  # noqa: E731
    return [make(m, x, s) for m, x in (("ref", b), ("a", a)) for s in range(len(per_seed))]


def test_the_detectable_column_is_t_plus_0_84_standard_errors():
    # three seeds, a ahead by 1, 3 and 5 pp: se = 0.02 / sqrt(3) = 0.011547, df = 2, t = 4.303; the smallest true
    # difference found 80 % of the time at the 5 % level is (t + z_0.8) * se = (4.303 + 0.84) * 0.011547 = 0.059386
    # (from the full CI width instead it would be 2 * 4.303 * 0.011547 = 0.099375)
    from d2lora_min.train.report import method_rows

    task = type("Task", (), {"kind": "mc", "normalise": False})()
    rows = {r["method"]: r for r in method_rows(_fake_runs([0.01, 0.03, 0.05]), {"t": task}, {"t": np.arange(40)}, "sum", "ref")}
    v = rows["a"]["vs_reference"]
    assert v["diff"] == pytest.approx(0.03) and v["se"] == pytest.approx(0.02 / np.sqrt(3))
    assert v["detectable"] == pytest.approx(0.059386, rel=1e-3)
    assert v["hi"] - v["diff"] == pytest.approx(4.303 * 0.02 / np.sqrt(3), rel=1e-3)


@pytest.mark.parametrize("lo, hi, expected", [
    (-0.02, -0.01, "worse"), (-0.01, 0.01, "no detectable difference"), (0.01, 0.02, "better"),
    (0.0, 0.01, "no detectable difference"), (-0.01, 0.0, "no detectable difference"),  # 0 on the edge is inside
])  # fmt: skip
def test_the_verdict_rule_on_hand_made_intervals_either_way_round(lo, hi, expected):
    swapped = {"better": "worse", "worse": "better"}.get(expected, expected)
    assert verdict(lo, hi) == expected
    assert verdict(-hi, -lo) == swapped  # the same difference taken the other way round


def test_the_verdict_in_the_table_follows_which_method_is_ahead():
    from d2lora_min.train.report import method_rows

    task = type("Task", (), {"kind": "mc", "normalise": False})()
    ahead = _fake_runs([0.05, 0.06, 0.07])
    behind = [{**r, "method": {"a": "ref", "ref": "a"}[r["method"]], "label": {"a": "ref", "ref": "a"}[r["label"]]} for r in ahead]
    for runs, expected in ((ahead, "better"), (behind, "worse")):
        rows = {r["method"]: r for r in method_rows(runs, {"t": task}, {"t": np.arange(40)}, "sum", "ref")}
        assert rows["a"]["vs_reference"]["verdict"] == expected


# --- the forest plot's panels and the learning-rate match ---------------------------------------------------------


def test_the_replicate_forest_compares_each_panel_with_lora_2r_run_the_same_way():
    from d2lora_min.train import claims
    from d2lora_min.train.report import forest_groups, method_rows

    ahead = {"D2-LoRA(r)": 0.03, "DoRA(r)": 0.01, "LoRA(r)": -0.02, "LoRA(2r)": 0.0}  # over LoRA(2r), on every item
    runs = []
    for names, shift in ((claims.TUNED, 0.0), (claims.SHARED, -0.05)):  # at the shared lr everyone 5 pp lower
        for role, spec in names.items():
            for seed in range(3):
                score = [0.5 + shift + ahead[role] + 0.002 * seed] * 40
                runs.append({"method": spec, "label": spec, "seed": seed, "trainable_params": 1, "items": {"t": {"correct_sum": score}}})
    task = type("Task", (), {"kind": "mc", "normalise": False})()
    cfg = CompareConfig()
    cfg.reference = claims.TUNED["DoRA(r)"]  # another reference for the tables: the plot still takes LoRA(2r)
    rows = method_rows(runs, {"t": task}, {"t": np.arange(40)}, "sum", cfg.reference)
    groups, reference_label, paper = forest_groups(rows, runs, {"t": task}, {"t": np.arange(40)}, cfg, "replicate")
    assert reference_label == "LoRA(2r) = lora:r=8" and len(groups) == 2
    for (title, points), names in zip(groups, (claims.TUNED, claims.SHARED)):
        assert title.endswith(f"against {names['LoRA(2r)']}")
        got = {p["label"]: p["diff"] for p in points}
        assert got == pytest.approx({names[role]: ahead[role] for role in ("D2-LoRA(r)", "DoRA(r)", "LoRA(r)")})
    assert paper == {claims.TUNED["D2-LoRA(r)"]: 1.6, claims.SHARED["D2-LoRA(r)"]: 1.6}


def test_the_lr_match_recovers_a_known_factor_and_needs_enough_grid_points():
    from d2lora_min.train.lr_match import match

    grid = [round(10 ** (-3 + 0.25 * k), 7) for k in range(7)]
    bump = lambda lr: 0.75 - 0.1 * (np.log10(lr) + 2.1) ** 2  # noqa: E731  (accuracy against lr, best near 8e-3)
    seeds = np.array([0.0, 0.01, -0.01, 0.005])
    lora = {lr: bump(lr) + seeds for lr in grid}
    d2 = {lr: bump(1.6 * lr) + seeds for lr in grid}  # D2-LoRA as LoRA(2r) at 1.6 times the learning rate
    m = match(d2, lora)
    assert 1.5 <= m["k"] <= 1.7 and abs(m["gap"]) < 0.005 and m["lo"] <= m["gap"] <= m["hi"]
    assert all(1.4 <= k <= 1.8 for k in m["k_per_seed"])
    assert match({lr: d2[lr] for lr in grid[:2]}, {lr: lora[lr] for lr in grid[:2]}) is None  # two points: no fit
