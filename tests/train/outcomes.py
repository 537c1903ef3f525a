"""Per-item outcomes of two methods whose true difference is known, shaped like the runs the report reads: what the
statistics tests (test_stats.py) and the report tests (test_report.py) feed in."""

import numpy as np

from d2lora_min.train.settings import CompareConfig

DEFAULT_SEEDS = len(CompareConfig().seeds)  # make compare's default number of seeds
MC_TASK = type(
    "Task", (), {"kind": "mc", "normalise": False}
)()  # a multiple-choice task scored by summed log-likelihood


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


def equal_within_seeds(per_seed, n_items=40):
    """Outcomes of methods a and b whose item differences are the same within each seed (per_seed[s] on every item of
    seed s): the item part of the variance is then 0, and the interval is the seeds' alone, with S - 1 degrees of
    freedom: diff +- t(S - 1) * sd(per_seed) / sqrt(S)."""
    d = np.repeat(np.asarray(per_seed, float)[:, None], n_items, axis=1)  # (S, N)
    a, b = {"t": 0.5 + d / 2}, {"t": 0.5 - d / 2}
    return a, b, {"t": np.arange(n_items)}


def fake_runs(per_seed, n_items=40):
    """Runs of methods "a" and "ref" as method_rows reads them, a ahead of ref by per_seed[s] on every item of seed s."""
    a, b, _ = equal_within_seeds(per_seed, n_items)
    make = lambda m, x, s: {
        "method": m,
        "label": m,
        "seed": s,
        "trainable_params": 1,
        "items": {"t": {"correct_sum": list(x["t"][s])}},
    }  # noqa: E731
    return [make(m, x, s) for m, x in (("ref", b), ("a", a)) for s in range(len(per_seed))]
