"""The statistics of the comparison (stats.py), on synthetic per-item outcomes whose true difference is known: the
interval covers it at the stated rate and is Student's t times the standard error, identical methods show no
difference, a large difference gets the right verdict, clustered items are not counted as independent, and the
learning-rate match recovers a known factor."""

import numpy as np
import pytest

from d2lora_min.train.stats import (
    cluster_ids,
    lr_match,
    mean_ci,
    paired_bootstrap,
    seed_bootstrap_ratio,
    t_quantile,
    verdict,
)

from .outcomes import MC_TASK, equal_within_seeds, simulate


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
    assert [round(t_quantile(df), 3) for df in (1, 2, 5, 30, float("inf"))] == [12.706, 4.303, 2.571, 2.042, 1.96]


def test_seed_ratio_interval():
    ratio, lo, hi = seed_bootstrap_ratio([0.6, 0.7, 0.65, 0.62], [1.0, 1.1, 0.95, 1.05])
    assert ratio == pytest.approx(np.mean([0.6, 0.7, 0.65, 0.62]) / np.mean([1.0, 1.1, 0.95, 1.05]) - 1)
    assert lo <= ratio <= hi < 0


# --- the interval and the verdict, pinned on hand-worked examples ----------------------------------------------------
# Student's t, 97.5 % quantiles (two-sided 95 %), as printed in standard tables (e.g. the NIST/SEMATECH e-Handbook of
# Statistical Methods, section 1.3.6.7.2, "Critical values of the Student's t distribution"):
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 27: 2.052}


@pytest.mark.parametrize("per_seed, df", [
    ([0.02, 0.04], 1),  # sd 0.014142, se 0.01: half-width 12.706 * 0.01 = 0.12706
    ([0.01, 0.03, 0.02, 0.05, 0.04], 4),  # sd 0.015811, se 0.0070711: half-width 2.776 * 0.0070711 = 0.019630
    ([0.02, 0.04] * 14, 27),  # sd 0.0101835, se 0.0019245: half-width 2.052 * 0.0019245 = 0.0039491
])  # fmt: skip
def test_the_interval_is_students_t_times_the_standard_error_at_2_5_and_28_seeds(per_seed, df):
    a, b, clusters = equal_within_seeds(per_seed)
    boot = paired_bootstrap(a, b, clusters)
    se = np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))
    assert boot["df"] == pytest.approx(df) and boot["se"] == pytest.approx(se, rel=1e-9)
    assert boot["diff"] == pytest.approx(0.03)
    assert boot["hi"] - boot["diff"] == pytest.approx(T975[df] * se, rel=1e-3)  # z = 1.96 would be 30-85 % too narrow
    assert boot["diff"] - boot["lo"] == pytest.approx(T975[df] * se, rel=1e-3)
    # one method's mean accuracy is the same interval against a zero baseline (here a's accuracies, 0.5 + d / 2)
    runs = [{"method": "a", "seed": s, "items": {"t": {"correct_sum": list(a["t"][s])}}} for s in range(len(per_seed))]
    mean, lo, hi = mean_ci(runs, {"t": MC_TASK}, clusters, "sum")
    assert mean == pytest.approx(0.515) and hi - mean == pytest.approx(T975[df] * se / 2, rel=1e-3)


@pytest.mark.parametrize("lo, hi, expected", [
    (-0.02, -0.01, "worse"), (-0.01, 0.01, "no detectable difference"), (0.01, 0.02, "better"),
    (0.0, 0.01, "no detectable difference"), (-0.01, 0.0, "no detectable difference"),  # 0 on the edge is inside
])  # fmt: skip
def test_the_verdict_rule_on_hand_made_intervals_either_way_round(lo, hi, expected):
    swapped = {"better": "worse", "worse": "better"}.get(expected, expected)
    assert verdict(lo, hi) == expected
    assert verdict(-hi, -lo) == swapped  # the same difference taken the other way round


# --- does D2-LoRA(r) behave like LoRA(2r) at a larger learning rate? ----------------------------------------------


def test_the_lr_match_recovers_a_known_factor_and_needs_enough_grid_points():
    grid = [round(10 ** (-3 + 0.25 * k), 7) for k in range(7)]
    bump = lambda lr: 0.75 - 0.1 * (np.log10(lr) + 2.1) ** 2  # noqa: E731  (accuracy against lr, best near 8e-3)
    seeds = np.array([0.0, 0.01, -0.01, 0.005])
    lora = {lr: bump(lr) + seeds for lr in grid}
    d2 = {lr: bump(1.6 * lr) + seeds for lr in grid}  # D2-LoRA as LoRA(2r) at 1.6 times the learning rate
    m = lr_match(d2, lora)
    assert 1.5 <= m["k"] <= 1.7 and abs(m["gap"]) < 0.005 and m["lo"] <= m["gap"] <= m["hi"]
    assert all(1.4 <= k <= 1.8 for k in m["k_per_seed"])
    assert lr_match({lr: d2[lr] for lr in grid[:2]}, {lr: lora[lr] for lr in grid[:2]}) is None  # two points: no fit
