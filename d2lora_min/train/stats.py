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

The lr match (`make tune`): does D2-LoRA(r) behave like LoRA(2r) at a larger learning rate? A check of the first-order picture on `make tune`'s
runs (development seeds, validation items).

To first order D2-LoRA's paper form is LoRA(2r) with the turning part of its update doubled (d2lora.py). Under Adam
that acts like a larger learning rate for that part, so the hypothesis is that D2-LoRA's accuracy-vs-lr curve looks
like LoRA(2r)'s shifted left by a factor k somewhere between 1 and 2. The fit: for each k on a fine log grid,
LoRA(2r)'s curve is read at k * lr (linear in log lr between its grid points) for every D2-LoRA grid lr where that
stays inside LoRA(2r)'s grid (at least MIN_POINTS of them), and k is the one with the smallest mean squared
difference of the two mean curves. At that k, the gap is D2-LoRA minus LoRA(2r) averaged over those points, per
development seed, with a 95 % CI from Student's t over the seeds; the CI is conditional on the fitted k (it leaves
out k's own uncertainty, which each seed's own best k shows).
"""

import functools
import math

import numpy as np

from .tasks import of_kind, scored_field


N_BOOT = 2000


def item_matrix(runs, task, field):
    """(seeds, items) array of one method's per-item results on `task` (seeds in the runs' order)."""
    return np.asarray([r["items"][task][field] for r in runs], dtype=np.float64)


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
        return math.exp(
            math.lgamma((df + 1) / 2)
            - math.lgamma(df / 2)
            - 0.5 * math.log(df * math.pi)
            - (df + 1) / 2 * math.log1p(x * x / df)
        )

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
    83 % coverage instead of 95 % in tests/train/test_stats.py's simulation; this interval covers 92-95 %.)
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
    diff, lo, hi, se, df = interval(
        np.mean([p[0] for p in parts.values()], axis=0), np.mean([p[1] for p in parts.values()], axis=0)
    )
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
    bad = {
        **{s: f"{st} (first)" for s, st in flagged(a).items()},
        **{s: f"{st} (second)" for s, st in flagged(b).items()},
    }
    seeds = [r["seed"] for r in a if r["seed"] in {q["seed"] for q in b} and r["seed"] not in bad]
    pick = lambda runs: sorted((r for r in runs if r["seed"] in seeds), key=lambda r: r["seed"])  # noqa: E731
    return pick(a), pick(b), {s: why for s, why in bad.items() if s in {r["seed"] for r in a} | {r["seed"] for r in b}}


def mean_ci(runs, tasks, clusters, scoring, n_boot=N_BOOT, seed=0):
    """One method's mean accuracy over its multiple-choice tasks with a 95 % CI computed as in paired_bootstrap
    against a zero baseline: the seeds through their sample variance (Student's t), the items by a cluster bootstrap."""
    mc = of_kind(tasks, "mc")
    mats = {t: item_matrix(runs, t, scored_field(tasks[t], scoring)) for t in mc}
    zero = {t: np.zeros_like(m) for t, m in mats.items()}
    b = paired_bootstrap(mats, zero, {t: clusters[t] for t in mc}, n_boot, seed)
    return b["diff"], max(0.0, b["lo"]), min(1.0, b["hi"])  # an accuracy lies in [0, 1]


LOG10_K = np.round(np.arange(-0.5, 1.0001, 0.01), 2)  # factors from 0.32 to 10, in steps of 10^0.01
MIN_POINTS = 3  # D2-LoRA grid points that must map inside LoRA(2r)'s grid


def per_seed_curve(runs_by_lr, tasks, scoring):
    """{lr: (S,) mean multiple-choice accuracy of each seed} from {lr: that lr's runs, in seed order}."""
    mc = of_kind(tasks, "mc")
    return {
        lr: np.mean([item_matrix(rs, t, scored_field(tasks[t], scoring)).mean(1) for t in mc], axis=0)
        for lr, rs in runs_by_lr.items()
    }


def _read_at(curve, lrs):
    """curve {lr: (S,)} read at the learning rates lrs, linear in log10(lr): (len(lrs), S)."""
    grid = sorted(curve)
    x, y = np.log10(grid), np.stack([curve[lr] for lr in grid])  # (G,), (G, S)
    return np.stack([[np.interp(np.log10(lr), x, y[:, s]) for s in range(y.shape[1])] for lr in lrs])


def _fit(d2, lora, log10_k):
    """(mean squared difference of the mean curves, D2-LoRA lrs used) at factor 10^log10_k, or None if too few overlap."""
    lo, hi = min(lora), max(lora)
    used = [lr for lr in sorted(d2) if lo * (1 - 1e-9) <= lr * 10**log10_k <= hi * (1 + 1e-9)]
    if len(used) < MIN_POINTS:
        return None
    gap = np.stack([d2[lr] for lr in used]) - _read_at(lora, [lr * 10**log10_k for lr in used])  # (points, S)
    return float(np.mean(gap.mean(1) ** 2)), used


def best_factor(d2, lora):
    """(k, the D2-LoRA lrs the fit used) minimising the mean squared difference of the mean curves; None when no k
    leaves MIN_POINTS grid points to compare (a grid too short)."""
    fits = [(f[0], lk, f[1]) for lk in LOG10_K if (f := _fit(d2, lora, lk)) is not None]
    if not fits:
        return None
    _, lk, used = min(fits)
    return float(10**lk), used


def lr_match(d2, lora):
    """d2, lora: per-seed curves {lr: (S,)} of D2-LoRA(r) and LoRA(2r) on the same seeds -> {"k", "gap", "lo", "hi",
    "used", "k_per_seed"} (the gap in fractions of 1; lo, hi its 95 % CI over the seeds), or None for a grid too short."""
    best = best_factor(d2, lora)
    if best is None:
        return None
    k, used = best
    per_seed = (np.stack([d2[lr] for lr in used]) - _read_at(lora, [lr * k for lr in used])).mean(0)  # (S,)
    S = len(per_seed)
    half = t_quantile(S - 1) * per_seed.std(ddof=1) / math.sqrt(S) if S > 1 else float("nan")
    seeds_k = [
        best_factor({lr: v[[s]] for lr, v in d2.items()}, {lr: v[[s]] for lr, v in lora.items()})[0] for s in range(S)
    ]
    return {
        "k": k,
        "gap": float(per_seed.mean()),
        "lo": float(per_seed.mean() - half),
        "hi": float(per_seed.mean() + half),
        "used": used,
        "k_per_seed": seeds_k,
    }


def describe_lr_match(m, d2_label, lora_label, n_seeds):
    """The result in words, for the report."""
    return (
        f"{d2_label}'s validation curve matches {lora_label}'s read at k x its learning rate best for k = {m['k']:.2f} "
        f"(each development seed alone: {', '.join(f'{k:.2f}' for k in m['k_per_seed'])}); the remaining gap at that k, "
        f"{d2_label} minus {lora_label} over its learning rates {', '.join(f'{lr:.3g}' for lr in m['used'])}: "
        f"{100 * m['gap']:+.2f} pp [{100 * m['lo']:+.2f}, {100 * m['hi']:+.2f}] (95 % CI over {n_seeds} development seeds)"
    )
