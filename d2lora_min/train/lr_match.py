"""Does D2-LoRA(r) behave like LoRA(2r) at a larger learning rate? A check of the first-order picture on `make tune`'s
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

import math

import numpy as np

from . import stats

LOG10_K = np.round(np.arange(-0.5, 1.0001, 0.01), 2)  # factors from 0.32 to 10, in steps of 10^0.01
MIN_POINTS = 3  # D2-LoRA grid points that must map inside LoRA(2r)'s grid


def per_seed_curve(runs_by_lr, tasks, scoring):
    """{lr: (S,) mean multiple-choice accuracy of each seed} from {lr: that lr's runs, in seed order}."""
    mc = [t for t in tasks if tasks[t].kind == "mc"]
    return {lr: np.mean([stats.item_matrix(rs, t, stats.primary_field("mc", scoring, tasks[t].normalise)).mean(1) for t in mc], axis=0)
            for lr, rs in runs_by_lr.items()}  # fmt: skip


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


def match(d2, lora):
    """d2, lora: per-seed curves {lr: (S,)} of D2-LoRA(r) and LoRA(2r) on the same seeds -> {"k", "gap", "lo", "hi",
    "used", "k_per_seed"} (the gap in fractions of 1; lo, hi its 95 % CI over the seeds), or None for a grid too short."""
    best = best_factor(d2, lora)
    if best is None:
        return None
    k, used = best
    per_seed = (np.stack([d2[lr] for lr in used]) - _read_at(lora, [lr * k for lr in used])).mean(0)  # (S,)
    S = len(per_seed)
    half = stats.t_quantile(S - 1) * per_seed.std(ddof=1) / math.sqrt(S) if S > 1 else float("nan")
    seeds_k = [best_factor({lr: v[[s]] for lr, v in d2.items()}, {lr: v[[s]] for lr, v in lora.items()})[0] for s in range(S)]
    return {"k": k, "gap": float(per_seed.mean()), "lo": float(per_seed.mean() - half), "hi": float(per_seed.mean() + half),
            "used": used, "k_per_seed": seeds_k}  # fmt: skip


def describe(m, d2_label, lora_label, n_seeds):
    """The result in words, for the report."""
    return (f"{d2_label}'s validation curve matches {lora_label}'s read at k x its learning rate best for k = {m['k']:.2f} "
            f"(each development seed alone: {', '.join(f'{k:.2f}' for k in m['k_per_seed'])}); the remaining gap at that k, "
            f"{d2_label} minus {lora_label} over its learning rates {', '.join(f'{lr:.3g}' for lr in m['used'])}: "
            f"{100 * m['gap']:+.2f} pp [{100 * m['lo']:+.2f}, {100 * m['hi']:+.2f}] (95 % CI over {n_seeds} development seeds)")
