"""The Markdown tables of a comparison's report: scores, differences from the reference, retention and cost, the
headroom checks, the runs that did not train normally, the two scorers side by side, and the paper's claims.

The paper's claims at this scale (`make replicate`): each claim of the D2-LoRA paper (Fujisawa & Kondo, 2026,
arXiv 2602.14728, as its abstract states them) with our figure, its 95 % CI and a verdict.

  replicated      the CI excludes 0 on the paper's side
  not replicated  the CI contains 0
  opposite        the CI excludes 0 on the other side
The claim against DoRA is "matches or exceeds" (no figure): its CI containing 0 is "matched", above 0 "exceeded".
"""

import math

import numpy as np

from .stats import group, item_matrix, paired_bootstrap, paired_runs, seed_bootstrap_ratio
from .tasks import of_kind, scored_field


def _fmt(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pp(x):
    return f"{100 * x:+.1f}"


def _ci(diff, lo, hi, fmt=_pp):
    """A difference with its interval: "+1.2 [-0.3, +2.7]"."""
    return f"{fmt(diff)} [{fmt(lo)}, {fmt(hi)}]"


def table(head, rows):
    """A Markdown table: a header row of `head`, its rule, a row per list of cells."""
    lines = ["| " + " | ".join(map(str, cells)) + " |" for cells in [head, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(head), *lines[1:]])


def marked(row):
    """A method's label, with the seeds whose runs did not train normally: "LoRA(r=4) [diverged: seed 3]"."""
    by_status = {}
    for seed, status in sorted(row.get("flags", {}).items()):
        by_status.setdefault(status, []).append(str(seed))
    notes = "; ".join(
        f"{status}: seed{'s' * (len(seeds) > 1)} {', '.join(seeds)}" for status, seeds in by_status.items()
    )
    return f"{row['label']} [{notes}]" if notes else row["label"]


def flag_lines(rows):
    """One line per method with runs that diverged or never moved: what the tables mark, and that the differences
    leave those seeds out (with the other method's run on the same seed)."""
    told = "these runs are scored as they stand in the accuracy table and left out of every difference"
    return [f"{marked(r)}: {told}" for r in rows if r.get("flags")]


def same_run_lines(runs):
    """One line naming the methods whose runs are another method's (the same settings under two specs, computed once
    and written under both names), so that two identical rows do not read as a coincidence."""
    label = {r["method"]: r["label"] for r in runs}
    pairs = sorted({(r["label"], label.get(r["same_run_as"], r["same_run_as"])) for r in runs if "same_run_as" in r})
    return [f"one run under two names (computed once): {'; '.join(f'{a} is {b}' for a, b in pairs)}"] if pairs else []


def score_table(rows, tasks):
    mc, gen = of_kind(tasks, "mc"), of_kind(tasks, "gen")
    head = ["method", "trainable", *mc, "mean acc", *[f"{t} ROUGE-L" for t in gen], *[f"{t} EM" for t in gen]]
    body = []
    for row in rows:
        scores = row["scores"]
        cells = [marked(row), f"{row['trainable_params']:,}", *[f"{100 * scores[t]:.1f}" for t in mc]]
        cells += [
            f"**{100 * row['mean_mc']:.1f}**",
            *[_fmt(scores[t]) for t in gen],
            *[_fmt(scores[f"{t}_exact"]) for t in gen],
        ]
        body.append(cells)
    return table(head, body)


def difference_table(rows, tasks, reference_label):
    mc, gen = of_kind(tasks, "mc"), of_kind(tasks, "gen")
    head = ["method", f"Δ mean acc vs {reference_label} (pp) [95 % CI]", "verdict", "detectable (pp)", *mc]
    body = []
    for row in rows:
        v, g = row.get("vs_reference"), row.get("gen_vs_reference")
        if not v:
            continue
        left_out = f" (seeds {', '.join(str(s) for s in sorted(v['left_out']))} left out)" if v.get("left_out") else ""
        cells = [marked(row), _ci(v["diff"], v["lo"], v["hi"]), v["verdict"] + left_out, f"{100 * v['detectable']:.1f}"]
        cells += [_ci(*v["per_task"][t]) for t in mc]
        body.append(cells + [_ci(*g["per_task"][t], fmt=lambda x: f"{x:+.3f}") if g else "–" for t in gen])
    return table(head + [f"Δ {t} ROUGE-L" for t in gen], body)


def cost_table(rows, base_row, speed_reference):
    """Retention (against the base when it is among the methods, else the absolute values) and cost; step times
    relative to `speed_reference`, or to the first method when that one did not run."""
    trained = [r for r in rows if r["method"] != "base"]
    ref = next((r for r in rows if r["method"] == speed_reference), trained[0] if trained else None)
    head = ["method", "held-out text loss (Δ vs base)" if base_row else "held-out text loss (nats)",
            "facts probe (base → after)" if base_row else "facts probe (after)",
            f"step time (× {ref['label'] if ref else '–'})", "loss volatility", "merge gap (pp, max over tasks)",
            "max abs logit diff", "merged / base tok/s"]  # fmt: skip
    body = []
    for row in trained:
        rel = row["step_time"] / ref["step_time"] if ref and row["step_time"] and ref["step_time"] else None
        if row["heldout_loss"] is None:  # (validation runs measure no retention)
            d_loss, probe = None, "–"
        elif row["facts_probe"] is None:  # held-out text of your own: no facts probe
            d_loss, probe = row["heldout_loss"] - (base_row["heldout_loss"] if base_row else 0.0), "–"
        elif base_row:
            d_loss = row["heldout_loss"] - base_row["heldout_loss"]
            probe = f"{100 * base_row['facts_probe']:.1f} → {100 * row['facts_probe']:.1f}"
        else:
            d_loss, probe = row["heldout_loss"], f"{100 * row['facts_probe']:.1f}"
        gap = max(abs(g) for g in row["merge_gap_pp"].values()) if row.get("merge_gap_pp") else None
        base_speed = row.get("base_eval_tokens_per_s")
        speed = row["merged_eval_tokens_per_s"] / base_speed if base_speed else None
        body.append([marked(row), _fmt(d_loss, "+.3f" if base_row else ".3f"), probe, _fmt(rel, ".2f"),
                     _fmt(row["volatility"], ".4f"), _fmt(gap, ".2f"), _fmt(row["max_logit_diff"], ".1e"),
                     _fmt(speed, ".2f")])  # fmt: skip
    return table(head, body)


def size(nbytes):
    """Bytes as "3.0 MB" ("–" for none)."""
    if nbytes is None:
        return "–"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def step(seconds):
    """A step time as "15 ms" or "12.3 s" ("–" for none)."""
    if seconds is None or math.isnan(seconds):
        return "–"
    return f"{1000 * seconds:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


MEMORY = {"cuda_peak": "memory: the peak CUDA memory allocated while training (torch.cuda.max_memory_allocated)",
          "saved_for_backward": "memory: what autograd saves for backward in one training step (activations; weights, "
                                "gradients and optimizer state not counted), the largest over seeds"}  # fmt: skip


def memory_of(runs):
    """({method: bytes}, kind): the largest over a method's runs, of CUDA's peak where every run has it, else of the
    bytes saved for backward (runs.py records both)."""
    out = {}
    for r in runs:
        if isinstance(r.get("memory"), dict):
            out.setdefault(r["method"], []).append(r["memory"])
    peak = out and all(m.get("cuda_peak") is not None for ms in out.values() for m in ms)
    kind = "cuda_peak" if peak else "saved_for_backward"
    return {method: max(m[kind] for m in ms) for method, ms in out.items()}, kind


def memory_table(rows, runs):
    """results.md's table of step time and memory per method (what it measures said above it)."""
    memory, kind = memory_of(runs)
    body = [[marked(r), step(r.get("step_time")), size(memory.get(r["method"]))] for r in rows if r["method"] != "base"]
    return f"{MEMORY[kind]}.\n\n" + table(["method", "step time (median)", "memory"], body)


def headroom_lines(rows, tasks, chance):
    """The headroom bars, checked on this run: saturated tasks, the best mean, the lift over max(base, chance)."""
    methods = [r for r in rows if r["method"] != "base"]
    base = next((r for r in rows if r["method"] == "base"), None)
    saturated = [t for t in of_kind(tasks, "mc") if methods and max(r["scores"][t] for r in methods) >= 0.97]
    best_mean = max((r["mean_mc"] for r in methods), default=float("nan"))
    out = [
        f"saturated tasks (best method >= 97 %): {', '.join(saturated) or 'none'}; best mean accuracy {100 * best_mean:.1f} %"
    ]
    if base:
        best = {t: max(r["scores"][t] for r in methods) for t in tasks if methods}
        lifts = {t: best[t] - max(base["scores"][t], chance.get(t, 0.0)) for t in best}
        low = [
            f"{t} ({100 * v:+.1f})" if tasks[t].kind == "mc" else f"{t} ({v:+.3f})"
            for t, v in lifts.items()
            if v < 0.15
        ]
        said = f"below 15 pp on {', '.join(low)}" if low else "at least 15 pp on every task"
        out.append(f"lift of the best method over max(base, chance): {said}")
    return out


def scoring_table(runs, tasks, clusters):
    """Per method: mean accuracy with the summed and with the length-normalised scorer, and their paired difference."""
    mc, body = of_kind(tasks, "mc"), []
    for method, rs in group(runs).items():
        a, b = ({t: item_matrix(rs, t, f"correct_{kind}") for t in mc} for kind in ("sum", "mean"))
        boot = paired_bootstrap(b, a, {t: clusters[t] for t in mc})
        means = [f"{100 * np.mean([m[t].mean() for t in mc]):.1f}" for m in (a, b)]
        body.append([rs[0]["label"], *means, _ci(boot["diff"], boot["lo"], boot["hi"])])
    return table(["method", "summed log-likelihood", "length-normalised", "Δ (pp) [95 % CI]"], body)


# The paper's figures (Fujisawa & Kondo, 2026, arXiv 2602.14728; the worst merge gap from the OpenReview abstract). Against
# DoRA its abstract says "matches or exceeds performance on most tasks", with no figure.
PAPER = {"vs LoRA(r)": 2.2, "vs LoRA(2r)": 1.6, "vs DoRA(r)": None, "ROUGE-L vs LoRA(r)": 1.2, "volatility": -36.0,
         "merge gap mean": 0.03, "merge gap worst": 0.7, "merged / unmerged throughput": 1.91, "training overhead": 19.0}  # fmt: skip


def _claim(name, paper, diff, lo, hi, unit="pp", sign=None):
    """A claim with a CI: replicated / not replicated / opposite, by which side of 0 the CI lies on (the paper's
    side is the sign of its figure, or `sign` where it gives a direction without a figure)."""
    side = sign if paper is None else (1 if paper > 0 else -1)
    if side == 0:  # "matches or exceeds": anything but a CI below 0 agrees
        v = "opposite" if hi < 0 else "exceeded" if lo > 0 else "matched"
    elif lo > 0 or hi < 0:
        v = "replicated" if (lo > 0) == (side > 0) else "opposite"
    else:
        v = "not replicated"
    inside = None if paper is None else lo <= paper <= hi
    return dict(claim=name, paper=paper, ours=diff, lo=lo, hi=hi, unit=unit, verdict=v, paper_in_ci=inside)


def replicate_claims(runs, tasks, clusters, scoring, names):
    """The claims from the runs of the four roles (names: role -> spec text, specs.roles); [] when one did not run."""
    grouped = group(runs)
    if not all(spec in grouped for spec in names.values()):
        return []
    by = {role: grouped[spec] for role, spec in names.items()}  # role -> that method's runs

    def difference(ts, other):  # D2-LoRA(r) minus `other` on tasks ts, over the seeds neither flagged, in pp
        mine, theirs, _ = paired_runs(by["D2-LoRA(r)"], by[other])
        fields = {t: scored_field(tasks[t], scoring) for t in ts}
        a, b = ({t: item_matrix(rs, t, fields[t]) for t in ts} for rs in (mine, theirs))
        boot = paired_bootstrap(a, b, {t: clusters[t] for t in ts})
        return 100 * boot["diff"], 100 * boot["lo"], 100 * boot["hi"]

    claims = []
    for other, sign in (("LoRA(r)", 1), ("LoRA(2r)", 1), ("DoRA(r)", 0)):  # vs DoRA: matches or exceeds
        claims.append(
            _claim(
                f"D2-LoRA(r) mean accuracy vs {other}",
                PAPER[f"vs {other}"],
                *difference(of_kind(tasks, "mc"), other),
                sign=sign,
            )
        )
    if of_kind(tasks, "gen"):
        rouge = difference(of_kind(tasks, "gen"), "LoRA(r)")
        claims.append(
            _claim("D2-LoRA(r) generative ROUGE-L vs LoRA(r) (points)", PAPER["ROUGE-L vs LoRA(r)"], *rouge, "points")
        )
    d2_runs, lora_runs, _ = paired_runs(by["D2-LoRA(r)"], by["LoRA(r)"])
    ratio = seed_bootstrap_ratio([r["volatility"] for r in d2_runs], [r["volatility"] for r in lora_runs])
    claims.append(
        _claim("training-loss volatility, D2-LoRA(r) vs LoRA(r)", PAPER["volatility"], *[100 * x for x in ratio], "%")
    )
    gaps = [abs(g) for rs in by.values() for r in rs for g in r.get("merge_gap_pp", {}).values()]
    speed = [
        r["merged_eval_tokens_per_s"] / r["eval_tokens_per_s"] for r in by["D2-LoRA(r)"] if r.get("eval_tokens_per_s")
    ]
    measured = [("merge gap, mean over tasks and methods (pp)", "merge gap mean", float(np.mean(gaps)) if gaps else None),
                ("merge gap, worst task (pp)", "merge gap worst", max(gaps) if gaps else None),
                ("merged / unmerged evaluation throughput, D2-LoRA", "merged / unmerged throughput",
                 float(np.median(speed)) if speed else None)]  # fmt: skip
    claims += [dict(claim=name, paper=PAPER[key], ours=ours, verdict="measured") for name, key, ours in measured]
    overhead = "training overhead over LoRA(r) (%)"
    return claims + [dict(claim=overhead, paper=PAPER["training overhead"], ours=None, verdict="see make bench")]


def claims_table(claims):
    body = []
    for c in claims:
        signed = "lo" in c  # a difference has a sign; a measured size or ratio (merge gap, throughput) has none
        if signed:
            ours = f"{c['ours']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}] {c['unit']}"
            inside = "–" if c["paper_in_ci"] is None else "yes" if c["paper_in_ci"] else "no"
        else:
            ours, inside = (f"{c['ours']:.3g}" if c["ours"] is not None else "–"), "–"
        paper = "matches or exceeds" if c["paper"] is None else f"{c['paper']:+g}" if signed else f"{c['paper']:g}"
        body.append([c["claim"], paper, ours, c["verdict"], inside])
    return table(["claim", "paper", "ours [95 % CI]", "verdict", "paper's figure in our CI"], body)


def sensitivity_table(shared, tuned):
    """The accuracy claims side by side: every method at the shared lr, and every method at its tuned lr."""
    head = ["claim", "paper", "shared lr [95 % CI]", "verdict", "tuned lrs [95 % CI]", "verdict"]
    ci = lambda c: [f"{c['ours']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}] {c['unit']}", c["verdict"]]  # noqa: E731
    body = [[a["claim"], "matches or exceeds" if a["paper"] is None else f"{a['paper']:+g}", *ci(a), *ci(b)]
            for a, b in zip(shared, tuned) if "lo" in a]  # fmt: skip
    return table(head, body)
