"""The paper's claims at this scale (`make replicate`): each claim of the D2-LoRA paper (Fujisawa & Kondo, 2026,
arXiv 2602.14728, as its abstract states them) with our figure, its 95 % CI and a verdict.

  replicated      the CI excludes 0 on the paper's side
  not replicated  the CI contains 0
  opposite        the CI excludes 0 on the other side
The claim against DoRA is "matches or exceeds" (no figure): its CI containing 0 is "matched", above 0 "exceeded".
"""

import numpy as np

from . import stats
from .presets import SHARED_LR


PAPER = {  # the paper's figures (Fujisawa & Kondo, 2026, arXiv 2602.14728; the worst merge gap from the OpenReview abstract)
    "vs LoRA(r)": 2.2, "vs LoRA(2r)": 1.6, "vs DoRA(r)": None, "ROUGE-L vs LoRA(r)": 1.2, "volatility": -36.0,
    "merge gap mean": 0.03, "merge gap worst": 0.7, "merged / unmerged throughput": 1.91, "training overhead": 19.0,
}  # fmt: skip  (vs DoRA: "matches or exceeds performance on most tasks", no figure)


def _claim(name, paper, diff, lo, hi, unit="pp", sign=None):
    """A claim with a CI: replicated / not replicated / opposite, by which side of 0 the CI lies on (the paper's
    side is the sign of its figure, or `sign` where it gives a direction without a figure)."""
    side = sign if paper is None else (1 if paper > 0 else -1)
    if side == 0:  # "matches or exceeds": anything but a CI below 0 agrees
        v = "opposite" if hi < 0 else "exceeded" if lo > 0 else "matched"
    elif lo > 0:
        v = "replicated" if side > 0 else "opposite"
    elif hi < 0:
        v = "replicated" if side < 0 else "opposite"
    else:
        v = "not replicated"
    inside = None if paper is None else lo <= paper <= hi
    return {"claim": name, "paper": paper, "ours": diff, "lo": lo, "hi": hi, "unit": unit, "verdict": v, "paper_in_ci": inside}


# The spec of each role in the claims: every method at its tuned lr (the claims), or all at the shared lr
# (the sensitivity table beside them).
TUNED = {"LoRA(r)": "lora", "LoRA(2r)": "lora:r=8", "DoRA(r)": "dora", "D2-LoRA(r)": "d2lora"}
SHARED = {role: f"{spec}{',' if ':' in spec else ':'}lr={SHARED_LR:g}" for role, spec in TUNED.items()}


def replicate_claims(runs, tasks, clusters, scoring, names=TUNED):
    """The claims from the runs of the four roles (names: role -> spec text); [] when one of them did not run."""
    grouped = stats.group(runs)
    if not all(spec in grouped for spec in names.values()):
        return []
    by = {role: grouped[spec] for role, spec in names.items()}  # role -> that method's runs
    mc = [t for t in tasks if tasks[t].kind == "mc"]
    gen = [t for t in tasks if tasks[t].kind == "gen"]

    def difference(ts, other):  # D2-LoRA(r) minus `other` on tasks ts, over the seeds neither flagged
        mine, theirs, _ = stats.paired_runs(by["D2-LoRA(r)"], by[other])
        fields = {t: stats.primary_field(tasks[t].kind, scoring, tasks[t].normalise) for t in ts}
        return stats.paired_bootstrap({t: stats.item_matrix(mine, t, fields[t]) for t in ts},
                                      {t: stats.item_matrix(theirs, t, fields[t]) for t in ts}, {t: clusters[t] for t in ts})  # fmt: skip

    claims = []
    for other, sign in (("LoRA(r)", 1), ("LoRA(2r)", 1), ("DoRA(r)", 0)):  # vs DoRA: matches or exceeds
        b = difference(mc, other)
        claims.append(_claim(f"D2-LoRA(r) mean accuracy vs {other}", PAPER[f"vs {other}"], 100 * b["diff"], 100 * b["lo"], 100 * b["hi"], sign=sign))
    if gen:
        b = difference(gen, "LoRA(r)")
        claims.append(_claim("D2-LoRA(r) generative ROUGE-L vs LoRA(r) (points)", PAPER["ROUGE-L vs LoRA(r)"], 100 * b["diff"], 100 * b["lo"], 100 * b["hi"], "points"))
    d2_runs, lora_runs, _ = stats.paired_runs(by["D2-LoRA(r)"], by["LoRA(r)"])
    ratio, lo, hi = stats.seed_bootstrap_ratio([r["volatility"] for r in d2_runs], [r["volatility"] for r in lora_runs])
    claims.append(_claim("training-loss volatility, D2-LoRA(r) vs LoRA(r)", PAPER["volatility"], 100 * ratio, 100 * lo, 100 * hi, "%"))
    gaps = [abs(g) for rs in by.values() for r in rs for g in r.get("merge_gap_pp", {}).values()]
    speed = [r["merged_eval_tokens_per_s"] / r["eval_tokens_per_s"] for r in by["D2-LoRA(r)"] if r.get("eval_tokens_per_s")]
    claims += [
        {"claim": "merge gap, mean over tasks and methods (pp)", "paper": PAPER["merge gap mean"], "ours": float(np.mean(gaps)) if gaps else None, "verdict": "measured"},
        {"claim": "merge gap, worst task (pp)", "paper": PAPER["merge gap worst"], "ours": max(gaps) if gaps else None, "verdict": "measured"},
        {"claim": "merged / unmerged evaluation throughput, D2-LoRA", "paper": PAPER["merged / unmerged throughput"], "ours": float(np.median(speed)) if speed else None, "verdict": "measured"},
        {"claim": "training overhead over LoRA(r) (%)", "paper": PAPER["training overhead"], "ours": None, "verdict": "see make bench"},
    ]  # fmt: skip
    return claims


def claims_table(claims):
    lines = ["| claim | paper | ours [95 % CI] | verdict | paper's figure in our CI |", "|---|---|---|---|---|"]
    for c in claims:
        if "lo" in c:
            ours = f"{c['ours']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}] {c['unit']}"
            inside = "–" if c["paper_in_ci"] is None else "yes" if c["paper_in_ci"] else "no"
        else:
            ours, inside = (f"{c['ours']:.3g}" if c["ours"] is not None else "–"), "–"
        signed = "lo" in c  # a difference has a sign; a measured size or ratio (merge gap, throughput) has none
        paper = "matches or exceeds" if c["paper"] is None else f"{c['paper']:+g}" if signed else f"{c['paper']:g}"
        lines.append(f"| {c['claim']} | {paper} | {ours} | {c['verdict']} | {inside} |")
    return "\n".join(lines)


def sensitivity_table(shared, tuned):
    """The accuracy claims side by side: every method at the shared lr, and every method at its tuned lr."""
    lines = ["| claim | paper | shared lr [95 % CI] | verdict | tuned lrs [95 % CI] | verdict |", "|---|---|---|---|---|---|"]
    for a, b in zip(shared, tuned):
        if "lo" not in a:
            continue
        paper = "matches or exceeds" if a["paper"] is None else f"{a['paper']:+g}"
        cell = lambda c: f"{c['ours']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}] {c['unit']} | {c['verdict']}"  # noqa: E731
        lines.append(f"| {a['claim']} | {paper} | {cell(a)} | {cell(b)} |")
    return "\n".join(lines)
