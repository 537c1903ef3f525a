"""The statistics of a comparison: paired differences with 95 % confidence intervals, verdicts, and the per-item
matrices they are computed from.

The statistics. Every method is trained with the same seeds and scored on the same test items, so differences are
paired. The uncertainty of a difference has two sources: which test items were drawn, and which seeds. Items: a
bootstrap resamples the test items *by cluster* (items that share an entity - the same person for facts and
update, the same script for continuation - are drawn together, so correlated items are not counted as
independent). Seeds: the spread of the per-seed differences. The 95 % CI is the difference +- t * standard error,
with Student's t at the Welch-Satterthwaite degrees of freedom (see paired_bootstrap for why not a bootstrap over
3 seeds).
  verdict: "better" (CI above 0), "worse" (CI below 0), "no detectable difference" (CI contains 0)
  detectable: (t + 0.84) x the standard error: the smallest true difference this run would find with 80 %
              probability at the 5 % level
With one seed only the items count: the CI then says nothing about seed-to-seed variation.
"""

import functools
import math

import numpy as np


N_BOOT = 2000


def item_matrix(runs, task, field):
    """(seeds, items) array of one method's per-item results on `task` (seeds in the runs' order)."""
    return np.asarray([r["items"][task][field] for r in runs], dtype=np.float64)


def primary_field(task_kind, scoring, task_default_mean):
    """Which per-item field a task is scored by: 'correct_sum' / 'correct_mean' for multiple choice (the task's
    own scorer unless `scoring` overrides it), 'rouge' for generative tasks."""
    if task_kind == "gen":
        return "rouge"
    if scoring == "task":
        return "correct_mean" if task_default_mean else "correct_sum"
    return f"correct_{scoring}"


def cluster_ids(labels):
    """Cluster labels (strings; "" = the item alone) -> integer ids 0..C-1."""
    ids, seen = [], {}
    for i, label in enumerate(labels):
        key = label if label else f"#{i}"
        ids.append(seen.setdefault(key, len(seen)))
    return np.asarray(ids)


def t_quantile(df, p=0.975):
    """Student's t quantile, by bisection on its CDF (integrated numerically); df = inf gives the normal's."""
    return _t_quantile(round(min(df, 1e6), 1), p)


@functools.lru_cache(maxsize=None)
def _t_quantile(df, p):

    def pdf(x):
        return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi) - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x, n=600):  # 0.5 + the integral of the pdf from 0 to x (Simpson's rule)
        h = x / n
        total = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
        return 0.5 + total * h / 3

    lo, hi = 0.0, 50.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_bootstrap(a, b, clusters, n_boot=N_BOOT, seed=0):
    """The paired difference of two methods' mean score over tasks, with a 95 % confidence interval.

    a, b: {task: (S, N) arrays} of per-item scores on the same S seeds and N items; clusters: {task: (N,) ids}.
    The variance has two parts. Items: a bootstrap that resamples clusters of test items (the seed-averaged
    per-item differences). Seeds: the sample variance of the per-seed differences over S. The interval is
    diff +- t * sqrt(both), with t from Student's distribution at the Welch-Satterthwaite degrees of freedom, since
    the seed part rests on only S - 1 of them. (A bootstrap that also resamples the seeds is too narrow at 3 seeds:
    83 % coverage instead of 95 % in tests/test_report.py's simulation; this interval covers 92-95 %.)
    Returns {"diff", "lo", "hi", "se", "df", "per_task": {task: (diff, lo, hi)}}.
    """
    rng = np.random.default_rng(seed)
    parts = {}
    for task in a:
        d = a[task] - b[task]  # (S, N)
        ids = clusters[task]
        C = int(ids.max()) + 1
        sums = np.bincount(ids, weights=d.mean(0), minlength=C)  # per-cluster sums of the seed-averaged differences
        n_c = np.bincount(ids, minlength=C).astype(np.float64)
        cw = rng.multinomial(C, np.full(C, 1 / C), size=n_boot)  # (B, C): how often each cluster is drawn
        parts[task] = (d.mean(1), (cw @ sums) / (cw @ n_c))  # per-seed differences (S,), item replicates (B,)

    def interval(per_seed, reps):
        S = len(per_seed)
        v_seed = per_seed.var(ddof=1) / S if S > 1 else 0.0
        v_item = reps.var(ddof=1)
        v = v_seed + v_item
        df = v * v / (v_seed * v_seed / (S - 1)) if v_seed > 0 else math.inf
        half = t_quantile(df) * math.sqrt(v)
        diff = float(per_seed.mean())
        return diff, diff - half, diff + half, math.sqrt(v), df

    per_task = {t: interval(*parts[t])[:3] for t in parts}
    diff, lo, hi, se, df = interval(np.mean([p[0] for p in parts.values()], axis=0), np.mean([p[1] for p in parts.values()], axis=0))
    return {"diff": diff, "lo": lo, "hi": hi, "se": se, "df": df, "per_task": per_task}


def verdict(lo, hi):
    return "better" if lo > 0 else "worse" if hi < 0 else "no detectable difference"


def seed_bootstrap_ratio(x, y, n_boot=N_BOOT, seed=0):
    """x, y: per-seed values of two methods (paired by seed) -> (mean(x) / mean(y) - 1, 95 % CI lo, hi)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    reps = x[idx].mean(1) / y[idx].mean(1) - 1
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return float(x.mean() / y.mean() - 1), float(lo), float(hi)


def group(runs):
    """{method spec: [runs, in seed order]} in the order the methods first appear."""
    out = {}
    for r in runs:
        out.setdefault(r["method"], []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["seed"])
    return out


def flagged(runs):
    """{seed: status} of the runs that did not train normally ("diverged", "never moved")."""
    return {r["seed"]: r["status"] for r in runs if r.get("status", "ok") != "ok"}


def paired_runs(a, b):
    """The runs of two methods on the seeds both ran and neither flagged -> (a's runs, b's runs, {left-out seed:
    why}). A diverged run is left out of every difference, together with the other method's run on that seed."""
    bad = {**{s: f"{st} (first)" for s, st in flagged(a).items()}, **{s: f"{st} (second)" for s, st in flagged(b).items()}}
    seeds = [r["seed"] for r in a if r["seed"] in {q["seed"] for q in b} and r["seed"] not in bad]
    pick = lambda runs: sorted((r for r in runs if r["seed"] in seeds), key=lambda r: r["seed"])  # noqa: E731
    return pick(a), pick(b), {s: why for s, why in bad.items() if s in {r["seed"] for r in a} | {r["seed"] for r in b}}


def mean_ci(runs, tasks, clusters, scoring, n_boot=N_BOOT, seed=0):
    """One method's mean accuracy over its multiple-choice tasks with a 95 % CI computed as in paired_bootstrap
    against a zero baseline: the seeds through their sample variance (Student's t), the items by a cluster bootstrap."""
    mc = [t for t in tasks if tasks[t].kind == "mc"]
    mats = {t: item_matrix(runs, t, primary_field(tasks[t].kind, scoring, tasks[t].normalise)) for t in mc}
    zero = {t: np.zeros_like(m) for t, m in mats.items()}
    b = paired_bootstrap(mats, zero, {t: clusters[t] for t in mc}, n_boot, seed)
    return b["diff"], max(0.0, b["lo"]), min(1.0, b["hi"])  # an accuracy lies in [0, 1]


