"""The report of a compare run, from its per-run results: scores, the difference of every method from a reference
method with a paired-bootstrap 95 % confidence interval and a verdict, retention, cost, and the plots.

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
import os
import statistics

import numpy as np

N_BOOT = 2000


# --- per-item data ---------------------------------------------------------------------------------------------


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


# --- grouping runs into methods ----------------------------------------------------------------------------------


def group(runs):
    """{method spec: [runs, in seed order]} in the order the methods first appear."""
    out = {}
    for r in runs:
        out.setdefault(r["method"], []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["seed"])
    return out


def method_rows(runs, tasks, clusters, scoring, reference):
    """One row per method: scores, the paired difference from `reference` (CI, verdict, detectable), retention
    and cost. tasks: {name: Task}; clusters: {task: ids}."""
    by_method = group(runs)
    ref_runs = by_method.get(reference)
    rows = []
    for method, rs in by_method.items():
        row = {"method": method, "label": rs[0]["label"], "seeds": [r["seed"] for r in rs], "trainable_params": rs[0]["trainable_params"]}
        fields = {t: primary_field(tasks[t].kind, scoring, tasks[t].normalise) for t in tasks}
        mats = {t: item_matrix(rs, t, fields[t]) for t in tasks}
        row["scores"] = {t: float(m.mean()) for t, m in mats.items()}
        gen = [t for t in tasks if tasks[t].kind == "gen"]
        row["scores"].update({f"{t}_exact": float(item_matrix(rs, t, "exact").mean()) for t in gen})
        mc = [t for t in tasks if tasks[t].kind == "mc"]
        row["mean_mc"] = float(np.mean([row["scores"][t] for t in mc]))
        if ref_runs is not None and method != reference and [r["seed"] for r in ref_runs] == row["seeds"]:
            ref_mats = {t: item_matrix(ref_runs, t, fields[t]) for t in mc}
            boot = paired_bootstrap({t: mats[t] for t in mc}, ref_mats, {t: clusters[t] for t in mc})
            detectable = (t_quantile(boot["df"]) + 0.84) * boot["se"]
            row["vs_reference"] = {**boot, "verdict": verdict(boot["lo"], boot["hi"]), "detectable": detectable}
            if gen:
                g = paired_bootstrap({t: mats[t] for t in gen}, {t: item_matrix(ref_runs, t, fields[t]) for t in gen}, {t: clusters[t] for t in gen})
                row["gen_vs_reference"] = {**g, "verdict": verdict(g["lo"], g["hi"])}
        for k in ("step_time", "volatility", "heldout_loss", "facts_probe", "train_seconds"):
            vals = [r[k] for r in rs if r.get(k) is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
            row[k] = statistics.mean(vals) if vals else None
        first = rs[0]
        for k in ("eval_tokens_per_s", "merged_eval_tokens_per_s", "base_eval_tokens_per_s", "merge_gap_pp"):  # first seed only
            row[k] = first.get(k)
        row["max_logit_diff"] = max((r["max_logit_diff"] for r in rs if "max_logit_diff" in r), default=None)
        rows.append(row)
    return rows


# --- tables --------------------------------------------------------------------------------------------------------


def _fmt(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pp(x):
    return f"{100 * x:+.1f}"


def score_table(rows, tasks):
    mc = [t for t in tasks if tasks[t].kind == "mc"]
    gen = [t for t in tasks if tasks[t].kind == "gen"]
    head = ["method", "trainable"] + mc + ["mean acc"] + [f"{t} ROUGE-L" for t in gen] + [f"{t} EM" for t in gen]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"], f"{row['trainable_params']:,}"] + [f"{100 * row['scores'][t]:.1f}" for t in mc]
        cells += [f"**{100 * row['mean_mc']:.1f}**"] + [_fmt(row["scores"][t]) for t in gen] + [_fmt(row["scores"][f"{t}_exact"]) for t in gen]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_table(rows, tasks, reference_label):
    mc = [t for t in tasks if tasks[t].kind == "mc"]
    gen = [t for t in tasks if tasks[t].kind == "gen"]
    head = ["method", f"Δ mean acc vs {reference_label} (pp) [95 % CI]", "verdict", "detectable (pp)"] + mc + [f"Δ {t} ROUGE-L" for t in gen]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        v = row.get("vs_reference")
        if not v:
            continue
        cells = [row["label"], f"{_pp(v['diff'])} [{_pp(v['lo'])}, {_pp(v['hi'])}]", v["verdict"], f"{100 * v['detectable']:.1f}"]
        cells += [f"{_pp(v['per_task'][t][0])} [{_pp(v['per_task'][t][1])}, {_pp(v['per_task'][t][2])}]" for t in mc]
        g = row.get("gen_vs_reference")
        cells += [f"{g['per_task'][t][0]:+.3f} [{g['per_task'][t][1]:+.3f}, {g['per_task'][t][2]:+.3f}]" if g else "–" for t in gen]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(rows, base_row, speed_reference):
    """Retention (against the base when it is among the methods, else the absolute values) and cost; step times
    relative to `speed_reference`, or to the first method when that one did not run."""
    ref = next((r for r in rows if r["method"] == speed_reference), None) or next((r for r in rows if r["method"] != "base"), None)
    loss_head = "held-out text loss (Δ vs base)" if base_row else "held-out text loss (nats)"
    probe_head = "facts probe (base → after)" if base_row else "facts probe (after)"
    head = ["method", loss_head, probe_head, f"step time (× {ref['label'] if ref else '–'})",
            "loss volatility", "merge gap (pp, max over tasks)", "max abs logit diff", "merged / base tok/s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row["method"] == "base":
            continue
        rel = row["step_time"] / ref["step_time"] if ref and row["step_time"] and ref["step_time"] else None
        if base_row:
            d_loss = row["heldout_loss"] - base_row["heldout_loss"]
            probe = f"{100 * base_row['facts_probe']:.1f} → {100 * row['facts_probe']:.1f}"
        else:
            d_loss, probe = row["heldout_loss"], f"{100 * row['facts_probe']:.1f}"
        gaps = row.get("merge_gap_pp")
        gap = max(abs(g) for g in gaps.values()) if gaps else None
        speed = row["merged_eval_tokens_per_s"] / row["base_eval_tokens_per_s"] if row.get("base_eval_tokens_per_s") else None
        cells = [row["label"], _fmt(d_loss, "+.3f" if base_row else ".3f"), probe, _fmt(rel, ".2f"), _fmt(row["volatility"], ".4f"), _fmt(gap, ".2f"),
                 _fmt(row["max_logit_diff"], ".1e"), _fmt(speed, ".2f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headroom_lines(rows, tasks, chance):
    """The headroom bars, checked on this run: saturated tasks, the best mean, the lift over max(base, chance)."""
    methods = [r for r in rows if r["method"] not in ("base",)]
    base = next((r for r in rows if r["method"] == "base"), None)
    mc = [t for t in tasks if tasks[t].kind == "mc"]
    saturated = [t for t in mc if methods and max(r["scores"][t] for r in methods) >= 0.97]  # the best method's mean
    best_mean = max((r["mean_mc"] for r in methods), default=float("nan"))
    out = [f"saturated tasks (best method >= 97 %): {', '.join(saturated) or 'none'}; best mean accuracy {100 * best_mean:.1f} %"]
    if base:
        lifts = {t: max(r["scores"][t] for r in methods) - max(base["scores"][t], chance.get(t, 0.0)) for t in tasks if methods}
        low = [f"{t} ({100 * v:+.1f})" if tasks[t].kind == "mc" else f"{t} ({v:+.3f})" for t, v in lifts.items() if v < 0.15]
        out.append("lift of the best method over max(base, chance): " + (f"below 15 pp on {', '.join(low)}" if low else "at least 15 pp on every task"))
    return out


# --- plots -----------------------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    plt = pyplot()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def plot_losses(runs, path):
    """Training-loss curves (a moving average over 10 steps), one line per method and seed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if r.get("losses"):
            k = min(10, len(r["losses"]))
            smooth = np.convolve(r["losses"], np.ones(k) / k, mode="valid")
            ax.plot(smooth, label=f"{r['label']} s{r['seed']}", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving mean)")
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def plot_lr_sweep(points, path):
    """points: {method label: [(lr, mean accuracy, lo, hi)]} -> accuracy vs learning rate with 95 % CI bands."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, pts in points.items():
        pts = sorted(pts)
        lr = [p[0] for p in pts]
        ax.plot(lr, [100 * p[1] for p in pts], marker="o", label=label)
        ax.fill_between(lr, [100 * p[2] for p in pts], [100 * p[3] for p in pts], alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("mean accuracy over tasks (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def mean_ci(runs, tasks, clusters, scoring, n_boot=N_BOOT, seed=0):
    """One method's mean accuracy over its multiple-choice tasks with a bootstrap 95 % CI (seeds and clustered
    items resampled, as in paired_bootstrap, against a zero baseline)."""
    mc = [t for t in tasks if tasks[t].kind == "mc"]
    mats = {t: item_matrix(runs, t, primary_field(tasks[t].kind, scoring, tasks[t].normalise)) for t in mc}
    zero = {t: np.zeros_like(m) for t, m in mats.items()}
    b = paired_bootstrap(mats, zero, {t: clusters[t] for t in mc}, n_boot, seed)
    return b["diff"], max(0.0, b["lo"]), min(1.0, b["hi"])  # an accuracy lies in [0, 1]
