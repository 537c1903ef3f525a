"""The report of a comparison, from its per-run results: one row per method (scores, the paired difference from the
reference with its CI and verdict, retention, cost), written as results.md and results.json with the plots, and,
with --publish, copied to docs/results/ (what the README shows); and the summary compare prints, at most 100 columns
wide (terminal). The statistics are in stats.py, the tables and the paper's claims in tables.py, the plots in plots.py.
"""

import math
import shutil
import statistics
import textwrap
from dataclasses import asdict

import numpy as np
import torch

from ..files.io import atomic_path, write_json, write_text
from . import plots, stats, tables
from .settings import PUBLISHED
from .specs import SHARED_LR, roles
from .tasks import of_kind, scored_field


def method_rows(runs, tasks, clusters, scoring, reference):
    """One row per method: scores, the paired difference from `reference` (CI, verdict, detectable), retention
    and cost. tasks: {name: Task}; clusters: {task: ids}."""
    by_method = stats.group(runs)
    ref_runs = by_method.get(reference)
    rows = []
    for method, rs in by_method.items():
        row = {
            "method": method,
            "label": rs[0]["label"],
            "seeds": [r["seed"] for r in rs],
            "trainable_params": rs[0]["trainable_params"],
            "flags": stats.flagged(rs),
        }
        fields = {t: scored_field(tasks[t], scoring) for t in tasks}
        mats = {t: stats.item_matrix(rs, t, fields[t]) for t in tasks}
        row["scores"] = {t: float(m.mean()) for t, m in mats.items()}
        gen = of_kind(tasks, "gen")
        row["scores"].update({f"{t}_exact": float(stats.item_matrix(rs, t, "exact").mean()) for t in gen})
        mc = of_kind(tasks, "mc")
        row["mean_mc"] = float(np.mean([row["scores"][t] for t in mc]))
        compared = ref_runs is not None and method not in (
            reference,
            "base",
        )  # the base is a row of its own, not a method
        mine, theirs, left_out = stats.paired_runs(rs, ref_runs) if compared else ([], [], {})
        if mine:  # paired over the seeds both methods ran, diverged runs left out (with their pair)
            a = {t: stats.item_matrix(mine, t, fields[t]) for t in tasks}
            b = {t: stats.item_matrix(theirs, t, fields[t]) for t in tasks}
            boot = stats.paired_bootstrap({t: a[t] for t in mc}, {t: b[t] for t in mc}, {t: clusters[t] for t in mc})
            detectable = (stats.t_quantile(boot["df"]) + 0.84) * boot["se"]
            row["vs_reference"] = {
                **boot,
                "verdict": stats.verdict(boot["lo"], boot["hi"]),
                "detectable": detectable,
                "left_out": left_out,
            }
            if gen:
                g = stats.paired_bootstrap(
                    {t: a[t] for t in gen}, {t: b[t] for t in gen}, {t: clusters[t] for t in gen}
                )
                row["gen_vs_reference"] = {**g, "verdict": stats.verdict(g["lo"], g["hi"])}
        for k in ("step_time", "volatility", "heldout_loss", "facts_probe", "train_seconds"):
            vals = [r[k] for r in rs if r.get(k) is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
            row[k] = statistics.mean(vals) if vals else None
        first = rs[0]
        for k in (
            "eval_tokens_per_s",
            "merged_eval_tokens_per_s",
            "base_eval_tokens_per_s",
            "merge_gap_pp",
        ):  # first seed only
            row[k] = first.get(k)
        row["max_logit_diff"] = max((r["max_logit_diff"] for r in rs if "max_logit_diff" in r), default=None)
        rows.append(row)
    return rows


def forest_groups(rows, runs, tasks, clusters, cfg, preset):
    """The panels of the forest plot -> ([(title, [row])], reference label, {row label: the paper's figure}): every
    method's difference from the reference; for replicate, D2-LoRA, DoRA and LoRA(r) against LoRA(2r) at their tuned
    learning rates and, in a second panel, all at the shared lr."""
    speed = next((r for r in rows if r["method"] == "lora"), None)

    def point(row):
        v = row["vs_reference"]
        step = row["step_time"] / speed["step_time"] if speed and row["step_time"] and speed["step_time"] else None
        return {
            "label": row["label"],
            "diff": v["diff"],
            "lo": v["lo"],
            "hi": v["hi"],
            "params": row["trainable_params"],
            "step": step,
        }

    label = {r["method"]: r["label"] for r in rows}
    tuned, shared = roles(cfg.r), roles(cfg.r, SHARED_LR)
    parity = tuned["LoRA(2r)"]  # LoRA(2r): the paper's +1.6 pp is D2-LoRA(r) against it
    if preset == "replicate" and all(m in label for m in (*tuned.values(), *shared.values())):
        groups = []
        for names, what in ((tuned, "at its tuned learning rate"), (shared, f"at the shared lr {SHARED_LR:g}")):
            ref = names["LoRA(2r)"]  # each panel against LoRA(2r) run the same way, whatever --reference says
            table = rows if ref == cfg.reference else method_rows(runs, tasks, clusters, cfg.scoring, ref)
            against = {r["method"]: r for r in table}
            order = [
                names[role] for role in ("D2-LoRA(r)", "DoRA(r)", "LoRA(r)") if against[names[role]].get("vs_reference")
            ]
            groups.append((f"every method {what}, against {label[ref]}", [point(against[m]) for m in order]))
        paper = {label[names["D2-LoRA(r)"]]: tables.PAPER["vs LoRA(2r)"] for names in (tuned, shared)}
        return groups, f"LoRA(2r) = {label[parity]}", paper
    points = [point(r) for r in rows if r.get("vs_reference")]
    paper = {
        r["label"]: tables.PAPER["vs LoRA(2r)"] for r in rows if cfg.reference == parity and r["method"] == "d2lora"
    }
    return (
        [(f"every method against {label.get(cfg.reference, cfg.reference)}", points)],
        label.get(cfg.reference, cfg.reference),
        paper,
    )


def learning_rates_line(specs):
    """Each trained method's learning rate and where it came from (tuned, its spec, the shared default)."""
    trained = [s for s in specs if s.name != "base"]
    return "learning rates: " + ", ".join(f"{s.label} {s.lr:.3g} ({s.lr_from})" for s in trained)


def cost_line(runs):
    """Where the time went (training and evaluation seconds over every run computed, as each recorded them) and how
    much of the compute was padding (positions that hold no token), in fine-tuning and in evaluation."""

    def share(key):
        counts = [r[key] for r in runs if isinstance(r.get(key), dict)]
        total = sum(c["positions"] for c in counts)
        return f"{100 * sum(c['padding'] for c in counts) / total:.1f} %" if total else "–"

    computed = [r for r in runs if "same_run_as" not in r]  # a run under two names was trained and scored once
    train = sum(r.get("train_seconds", 0.0) for r in computed)
    evaluation = sum(r.get("eval_seconds", 0.0) for r in computed)
    return (
        f"time over {len(computed)} runs: training {train:.0f} s, evaluation {evaluation:.0f} s; padding: "
        f"{share('train_positions')} of the positions computed in fine-tuning, {share('eval_positions')} in evaluation"
    )


def write_report(settings, setup, runs, wall, out_dir, preset, publish=False):
    cfg, tasks, specs = settings.cfg, setup.tasks, settings.specs
    scored = {t: getattr(setup.splits[t], cfg.split) for t in tasks}  # the items the runs were scored on
    clusters = {t: stats.cluster_ids([it.cluster for it in scored[t]]) for t in tasks}
    chance = {t: float(np.mean([1 / len(it.choices) for it in scored[t]])) for t in of_kind(tasks, "mc")}
    rows = method_rows(runs, tasks, clusters, cfg.scoring, cfg.reference)
    ref = settings.reference
    base_row = next((r for r in rows if r["method"] == "base"), None)
    steps, sha = settings.train.steps, setup.base_meta["sha256"]
    n_items = "-".join(str(n) for n in sorted({min(c[cfg.split] for c in settings.counts.values()),
                                               max(c[cfg.split] for c in settings.counts.values())}))  # fmt: skip
    header = (
        f"base {sha[:12]}; {settings.describe()} x {cfg.epochs} epochs "
        f"= {steps} steps of {cfg.train.batch_size}; {n_items} {cfg.split} items per task; seeds {list(cfg.seeds)}; "
        f"targets {'+'.join(cfg.targets)}; scoring {cfg.scoring}; {'fused' if cfg.fused else 'plain'} path; device "
        f"{settings.device}, {torch.get_num_threads()} threads; wall {wall}"
    )
    parts = [
        header,
        learning_rates_line(specs),
        cost_line(runs),
        "",
        "Accuracy (%, mean over seeds; span: ROUGE-L F1 and exact match):",
        "",
        tables.score_table(rows, tasks),
    ]
    twins = tables.same_run_lines(runs)  # two specs that ran the same thing
    parts += ["", *twins] if twins else []
    parts += [
        "",
        f"Difference from {ref.label}, paired over seeds and {cfg.split} items (bootstrap, items resampled by cluster):",
        "",
        tables.difference_table(rows, tasks, ref.label),
    ]
    parts += ["", "Retention and cost:", "", tables.cost_table(rows, base_row, "lora")]
    parts += ["", "Step time and memory per method:", "", tables.memory_table(rows, runs)]
    parts += ["", *tables.headroom_lines(rows, tasks, chance), *tables.flag_lines(rows)]
    summary = {"config": asdict(cfg), "rows": rows, "wall": wall, "base": sha, "steps": steps}
    if preset == "ablate":
        parts += [
            "",
            "Scoring function (the same runs, each multiple-choice task scored both ways):",
            "",
            tables.scoring_table(runs, tasks, clusters),
        ]
    if preset == "replicate":
        claims = tables.replicate_claims(runs, tasks, clusters, cfg.scoring, roles(cfg.r))
        shared = tables.replicate_claims(runs, tasks, clusters, cfg.scoring, roles(cfg.r, SHARED_LR))
        summary["claims"], summary["claims_at_shared_lr"] = claims, shared
        parts += [
            "",
            "The paper's claims at this scale, every method at its tuned learning rate:",
            "",
            tables.claims_table(claims),
        ]
        if shared:
            parts += [
                "",
                f"Sensitivity: the same claims with every method at the shared lr {SHARED_LR:g} and at its tuned lr:",
                "",
                tables.sensitivity_table(shared, claims),
            ]
    text = "\n".join(parts) + "\n"
    write_text(out_dir / "results.md", text)
    write_json(out_dir / "results.json", summary)
    plots.plot_losses(runs, out_dir / "loss_curves.png")
    groups, reference_label, paper = forest_groups(rows, runs, tasks, clusters, cfg, preset)
    if any(points for _, points in groups):
        plots.plot_forest(groups, out_dir / "forest.png", reference_label, paper)
    elif (out_dir / "forest.png").exists():  # (no differences to draw: no plot of an earlier run left behind)
        (out_dir / "forest.png").unlink()
    if publish:  # the tables and figures the README shows live in the repository, regenerated by this command
        PUBLISHED.mkdir(parents=True, exist_ok=True)
        write_text(PUBLISHED / f"{preset}.md", text)
        for png in ("loss_curves.png", "forest.png"):
            if (out_dir / png).exists():
                with atomic_path(PUBLISHED / f"{preset}_{png}") as tmp:
                    shutil.copyfile(out_dir / png, tmp)
    return text, summary


WIDTH = 100  # columns of the summary compare prints
SHORT = {"no detectable difference": "no detectable diff"}  # the one verdict too long for its column


def compact(n):
    """1234 -> '1.23k', 2_345_678 -> '2.35M': a parameter count in at most 7 characters."""
    return next((f"{n / size:.3g}{unit}" for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if n >= size), str(n))


def summary_table(rows, runs, reference_label, width=WIDTH):
    """One fixed-width line per method, at most `width` columns: trainable parameters, mean accuracy, the difference
    from the reference with its 95 % CI, the verdict, step time, memory (the label cut with … to what is left)."""
    memory, _ = tables.memory_of(runs)
    head = ["method", "trainable", "mean %", "Δ pp [95 % CI]", "verdict", "step", "memory"]
    body = []
    for r in rows:
        v = r.get("vs_reference")
        diff = f"{100 * v['diff']:+.1f} [{100 * v['lo']:+.1f}, {100 * v['hi']:+.1f}]" if v else "–"
        diff, verdict = ("(reference)", "") if r["label"] == reference_label else (diff, v["verdict"] if v else "–")
        mean = "–" if math.isnan(r["mean_mc"]) else f"{100 * r['mean_mc']:.1f}"
        body.append([tables.marked(r), compact(r["trainable_params"]), mean, diff, SHORT.get(verdict, verdict),
                     tables.step(r.get("step_time")), tables.size(memory.get(r["method"]))])  # fmt: skip
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    widths[0] = min(widths[0], width - sum(widths[1:]) - 2 * (len(head) - 1))  # what the other columns leave

    def line(c):
        c = [c[0] if len(c[0]) <= widths[0] else c[0][: widths[0] - 1] + "…"] + c[1:]
        return "  ".join(x.rjust(w) if i in (1, 2, 5, 6) else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths)))

    return [line(c).rstrip() for c in [head, ["-" * w for w in widths], *body]]


def terminal(settings, rows, runs, wall, out_dir, width=WIDTH):
    """The summary compare prints at the end (every line at most `width` columns); every table is in results.md."""
    cfg, specs = settings.cfg, settings.specs
    ref = next((r["label"] for r in rows if r["method"] == cfg.reference), cfg.reference)
    tuned = f"; tuned lrs from {cfg.tuned_file}" if any(s.lr_from == "tuned" for s in specs) else ""
    written = f"wall {wall}; written: {out_dir}/results.md (every table), results.json, loss_curves.png, forest.png"
    notes = [f"Summary, against {ref}: mean {cfg.split} accuracy over the multiple-choice tasks (%), the paired "
             f"difference with its 95 % CI over seeds {list(cfg.seeds)} and items. Every table: {out_dir}/results.md.",
             learning_rates_line(specs) + tuned, tables.MEMORY[tables.memory_of(runs)[1]] + "; step: the median step",
             "", *summary_table(rows, runs, ref, width), "", written]  # fmt: skip
    wrap = lambda t: textwrap.wrap(t, width, break_long_words=True, break_on_hyphens=False) if t else [""]  # noqa: E731
    return "\n".join(w for n in notes for w in (wrap(n) if len(n) > width else [n]))
