"""`make tune`: each method's own learning rate, chosen on development seeds and validation items only.

    d2lora tune              # every compared method over the grid, seeds 100-103, validation items
    d2lora tune --publish    # also write docs/results/tune.md, tune_lr.png and tuned_lrs.json

A shared learning rate decides which method looks better (the README shows it), so every method runs at its own.
The rule, fixed before any run: for each method, the grid point with the highest mean validation accuracy (the mean
over the multiple-choice tasks and the development seeds); a learning rate at which any development run diverged or
never moved is not eligible; a tie (within 1e-9) goes to the smaller learning rate. Nothing here reads a test item
or a reported seed (seeds 0-99): the runs are scored on the validation split, whose items, people and scripts are
in neither the training nor the test split.

Robustness: for each method the span of grid learning rates whose validation accuracy is within 1 pp of its best
(in decades: how far the lr can be off before it costs a point).

Outputs under runs/tune/ (or --out): results.md, tune.json, tune_lr.png (accuracy against lr with 95 % CI bands
over the development seeds, each method's choice marked); with --publish the same under docs/results/ and the
choice in docs/results/tuned_lrs.json, which `make compare`, `make replicate` and `make ablate` read as each
method's default learning rate. Resumable like compare: finished runs are reused.
"""

import argparse
import math
import sys
import time
from pathlib import Path

from ..files.io import check_paths, check_writable, output_lock, write_json, write_text
from . import plots, stats
from .cli import UsageError, apply_overrides, config_help, parse_value, run_cli
from .compare import announce, prepare, run_all
from .report import cost_line
from .runs import check_run_outputs
from .settings import DERIVED, DEV_SEEDS, PUBLISHED, TUNED_FILE, CompareConfig, load_tuned, protocol, resolve
from .specs import parse_method_spec, roles, split_methods, with_lr
from .tables import table
from .trainer import rank_and_world

# 1e-3 ... 3.16e-2: 7 points over 1.5 decades, 1e-2 among them
GRID = tuple(round(10 ** (-3 + 0.25 * k), 7) for k in range(7))
RULE = (
    "the grid point with the highest mean validation accuracy (mean over the multiple-choice tasks and the development "
    "seeds); a learning rate at which any development run diverged or never moved is not eligible; ties go to the smaller lr"
)
WITHIN = 0.01  # robustness: the learning rates within 1 pp of the best


def tune_config(methods=tuple(roles(4).values()), seeds=DEV_SEEDS, grid=GRID):
    """The comparison's settings with every method at every grid lr, on development seeds and validation items."""
    cfg = CompareConfig(
        methods=tuple(with_lr(m, lr) for m in methods for lr in grid),
        seeds=tuple(seeds),
        split="validation",
        lr_source="shared",
    )  # every spec sets its lr: the tuned file is never read
    cfg.reference = cfg.methods[0]
    return cfg


def choose(points, flagged):
    """The rule: points {method: [(lr, mean, lo, hi)]}, flagged {method: {lr: True if a run diverged or never moved}}
    -> {method: chosen lr}."""
    chosen = {}
    for method, pts in points.items():
        eligible = [p for p in pts if not flagged[method].get(p[0])]
        if eligible:
            best = max(p[1] for p in eligible)
            chosen[method] = min(p[0] for p in eligible if p[1] >= best - 1e-9)
    return chosen


def robustness(points, chosen, flagged):
    """{method: (lowest lr, highest lr, decades, loss one grid step below, loss one grid step above)}: the span of
    the eligible grid points within WITHIN of the chosen one's accuracy, and the accuracy lost at its neighbours
    (None at the grid's end)."""
    out = {}
    for method, pts in points.items():
        if method in chosen:
            pts = sorted(pts)
            i = next(k for k, p in enumerate(pts) if p[0] == chosen[method])
            near = [p[0] for p in pts if p[1] >= pts[i][1] - WITHIN and not flagged[method].get(p[0])]
            below = pts[i][1] - pts[i - 1][1] if i > 0 else None
            above = pts[i][1] - pts[i + 1][1] if i + 1 < len(pts) else None
            out[method] = (min(near), max(near), math.log10(max(near) / min(near)), below, above)
    return out


def summarise(cfg, runs, setup, methods, grid):
    """points, flags, choices and robustness from the runs of a tune."""
    tasks = setup.tasks
    clusters = {t: stats.cluster_ids([it.cluster for it in setup.splits[t].validation]) for t in tasks}
    by = stats.group(runs)
    points = {m: [] for m in methods}
    flagged = {m: {} for m in methods}
    for method in methods:
        for lr in grid:
            rs = by[with_lr(method, lr)]
            points[method].append((lr, *stats.mean_ci(rs, tasks, clusters, cfg.scoring)))
            flagged[method][lr] = bool(stats.flagged(rs))
    chosen = choose(points, flagged)
    curves = {m: stats.per_seed_curve({lr: by[with_lr(m, lr)] for lr in grid}, tasks, cfg.scoring) for m in methods}
    return points, flagged, chosen, robustness(points, chosen, flagged), curves


def lr_table(points, flagged, chosen, spans):
    lrs = sorted({p[0] for pts in points.values() for p in pts})
    head = [
        "method",
        *[f"lr {lr:.3g}" for lr in lrs],
        "chosen",
        "within 1 pp of the best",
        "lost one step below / above (pp)",
    ]
    body = []
    for method, pts in points.items():
        at, cells = {p[0]: p for p in pts}, [method]
        for lr in lrs:
            mark, note = "**" * (chosen.get(method) == lr), " (diverged)" * bool(flagged[method].get(lr))
            cells.append(
                f"{mark}{100 * at[lr][1]:.1f}{mark} [{100 * at[lr][2]:.1f}, {100 * at[lr][3]:.1f}]{note}"
                if lr in at
                else "–"
            )
        lo, hi, decades, below, above = spans.get(method, (None,) * 5)
        span = f"{lo:.3g} - {hi:.3g} ({decades:.2f} decades)" if lo else "–"
        steps = " / ".join("–" if d is None else f"{100 * d:.1f}" for d in (below, above)) if lo else "–"
        body.append(cells + [f"{chosen[method]:.3g}" if method in chosen else "none eligible", span, steps])
    return table(head, body)


def tune(cfg, methods, grid, out_dir="runs/tune", fresh=False, publish=False):
    t_start = time.time()
    out_dir = Path(out_dir)
    if any(s < min(DEV_SEEDS) for s in cfg.seeds):
        reported = f"seeds below are reported seeds: {list(cfg.seeds)}"
        raise UsageError(f"tune runs on development seeds (>= {min(DEV_SEEDS)}); {reported}")
    if cfg.split != "validation":
        raise UsageError("tune scores validation items only (split=validation)")
    settings = resolve(cfg)
    check_writable(out_dir)
    figures = ("tune_lr.png", "tune_lr_match.png")
    check_run_outputs(settings, out_dir, ("results.md", "tune.json", *figures), ["tune.md", *figures] * publish)
    if publish:
        check_paths(TUNED_FILE.parent, files=[TUNED_FILE], hint="leave out --publish")
    rank, _ = rank_and_world()
    with output_lock(out_dir, hold=rank == 0):
        return _tune(settings, methods, grid, out_dir, fresh, publish, t_start)


def _tune(settings, methods, grid, out_dir, fresh, publish, t_start):
    """tune() once its outputs are checked and its folder is locked."""
    cfg, setup, (rank, _) = settings.cfg, prepare(settings), rank_and_world()
    if rank == 0:
        announce(settings, setup)
    runs, reused = run_all(settings, setup, out_dir, fresh)
    if rank != 0:
        return None
    points, flagged, chosen, spans, curves = summarise(cfg, runs, setup, methods, grid)
    wall = f"{time.time() - t_start:.0f} s ({reused} of {len(runs)} runs reused)"
    what = f"{len(methods)} methods x {len(grid)} learning rates x development seeds {list(cfg.seeds)}"
    text = (
        f"make tune: {what}, scored on {cfg.n_validation} validation items per task; wall {wall}\n{cost_line(runs)}\n\n"
    )
    text += "Mean validation accuracy over the multiple-choice tasks (%, 95 % CI over development seeds and items; the "
    text += f"choice in bold):\n\n{lr_table(points, flagged, chosen, spans)}\n\nRule: {RULE}.\n"
    keys = tuned_keys(methods, cfg, settings.own and settings.own.width)  # what compare looks an lr up by: "lora", ...
    result = dict(lrs={keys[m]: lr for m, lr in chosen.items()}, rule=RULE, grid=list(grid), dev_seeds=list(cfg.seeds))
    result.update(protocol=settings.protocol, points=points, within_1pp=spans, n_validation=cfg.n_validation)
    result["command"] = "make tune ARGS=--publish"
    d2, parity = "d2lora", f"lora:r={2 * cfg.r}"  # D2-LoRA(r) and LoRA(2r), the first-order picture's pair
    pictures = ["tune_lr.png"]
    pair = d2 in methods and parity in methods and len(cfg.seeds) > 1
    match = stats.lr_match(curves[d2], curves[parity]) if pair else None
    if match:
        result["lr_match"] = match
        labels = {
            m: parse_method_spec(m, cfg, width=settings.own and settings.own.width).method_label for m in (d2, parity)
        }
        described = stats.describe_lr_match(match, labels[d2], labels[parity], len(cfg.seeds))
        text += f"\nDoes D2-LoRA(r) behave like LoRA(2r) at a larger learning rate?\n\n{described}.\n"
        pictures.append("tune_lr_match.png")
    write_text(out_dir / "results.md", text)
    write_json(out_dir / "tune.json", result)
    own = bool(settings.own and (settings.own.model or settings.own.folder))  # your model or tasks: never the package's
    kept = ("lrs", "rule", "grid", "dev_seeds", "protocol", "n_validation")
    if own:  # the choice beside the runs, where compare on the same model and tasks looks for it
        write_json(out_dir / "tuned_lrs.json", {k: result[k] for k in kept})
        pictures.append("tuned_lrs.json (compare reads runs/tune/tuned_lrs.json, or --tuned_file=...)")
    for folder in [out_dir] + ([PUBLISHED] if publish else []):
        folder.mkdir(parents=True, exist_ok=True)
        plots.plot_lr_sweep(points, folder / "tune_lr.png", chosen)
        if "lr_match" in result:
            k, path = result["lr_match"]["k"], folder / "tune_lr_match.png"
            plots.plot_lr_match(points[d2], points[parity], k, path, labels[d2], labels[parity])
    if publish:
        write_text(PUBLISHED / "tune.md", text)
        published = {k: result[k] for k in (*kept, "command")}
        published["lrs"] = {**kept_lrs(methods, cfg, chosen=set(published["lrs"])), **published["lrs"]}
        for key in sorted(set(keys.values()) - set(published["lrs"])):
            print(f"{key}: no eligible learning rate, so none is published for it (compare runs it at the shared lr)")
        write_json(TUNED_FILE, published)
    hint = "" if own else "; add --publish to make them the defaults"
    hint = f"; published to {PUBLISHED} and {TUNED_FILE}" if publish else hint
    print(f"\n{text}\nchosen: {chosen}\nwritten: {out_dir}/results.md, tune.json, {', '.join(pictures)}{hint}")
    return result


def kept_lrs(methods, cfg, chosen=None):
    """The tuned lrs that publishing `methods` keeps from the committed file: those of the other methods, which must have
    been tuned under the same settings (protocol), and, given the keys this tune `chosen`, the earlier choice of a method
    tuned here without an eligible learning rate. A UsageError, before any work, when publishing would drop any other
    method's: the file holds one protocol, so a method tuned under other settings cannot stay beside these."""
    mine = set(tuned_keys(methods, cfg).values())
    try:
        earlier = load_tuned(TUNED_FILE, required=False)
    except UsageError as e:  # unreadable: a tune of every compared method replaces it, a partial one cannot merge
        if mine >= set(tuned_keys(tuple(roles(cfg.r).values()), cfg).values()):
            return {}
        raise UsageError(
            f"{e}; --publish of a partial tune cannot merge into it: tune every compared method (leave out "
            f"--methods) or restore the file"
        ) from None
    same = earlier.get("protocol") == protocol(cfg)
    keep = set(earlier["lrs"]) - mine
    if keep and not same:
        raise UsageError(
            f"--publish would drop the tuned learning rates of {', '.join(sorted(keep))} from {TUNED_FILE}: they "
            f"were tuned under other settings. Tune them too (--methods ...), or leave out --publish"
        )
    if chosen is not None and same:  # tuned here, but no learning rate was eligible: the earlier choice stays
        keep |= (mine - set(chosen)) & set(earlier["lrs"])
    return {k: earlier["lrs"][k] for k in sorted(keep)}


def tuned_keys(methods, cfg, width=None):
    """{method as given: the name its tuned lr is stored under}; two methods with one name are a usage error."""
    keys = {m: parse_method_spec(m, cfg, width=width).tuned_key for m in methods}
    if len(set(keys.values())) != len(keys):
        raise UsageError(f"--methods {list(methods)} name one method twice ({keys}): a tuned lr is per method and rank")
    return keys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="d2lora tune",
        description="Choose each method's learning rate on development seeds and validation items.",
        epilog=__doc__
        + "\nsettings (override with --section.field=value):\n"
        + "\n".join(config_help(tune_config(), derived=DERIVED + ("methods", "seeds", "split", "lr_source"))),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--methods", help="method specs without lr, separated by commas or spaces (default: the four roles at r)"
    )
    parser.add_argument("--seeds", help=f"development seeds (default: {','.join(map(str, DEV_SEEDS))})")
    parser.add_argument("--grid", help="learning rates, comma-separated (default: 7 points from 1e-3 to 3.16e-2)")
    parser.add_argument("--out", default="runs/tune", help="output folder")
    parser.add_argument("--fresh", action="store_true", help="recompute every run instead of reusing matching results")
    parser.add_argument(
        "--publish", action="store_true", help="also write docs/results/tune.* and docs/results/tuned_lrs.json"
    )
    args, overrides = parser.parse_known_args(argv)

    def body():
        for flag in ("methods", "seeds", "grid"):  # given but empty: an error, not the defaults (as in compare)
            if getattr(args, flag) is not None and not getattr(args, flag).strip():
                raise UsageError(f"--{flag} is empty; leave it out for the default")
        r = apply_overrides(CompareConfig(), overrides).r  # the roles' rank
        methods = tuple(split_methods(args.methods)) if args.methods else tuple(roles(r).values())
        if any("lr=" in m for m in methods):
            raise UsageError("--methods for tune take no lr= (the grid sets it)")
        seeds = parse_value(args.seeds, (0,), "--seeds") if args.seeds else DEV_SEEDS
        grid = parse_value(args.grid, (0.1,), "--grid") if args.grid else GRID
        if len(set(grid)) != len(grid) or not all(0 < lr < 1 for lr in grid):
            raise UsageError(f"--grid must be distinct learning rates in (0, 1), got {list(grid)}")
        from ..own.session import defaults, width_of  # --model DIR, --tasks DIR: what depends on the settings given

        cfg = defaults(apply_overrides(tune_config(methods, seeds, grid), overrides), overrides, True, args.publish)
        tuned_keys(methods, cfg, width_of(cfg))  # before any work
        if args.publish:
            kept_lrs(methods, cfg)
        tune(cfg, methods, grid, args.out, fresh=args.fresh, publish=args.publish)
        return 0

    return run_cli(parser, body)


if __name__ == "__main__":
    sys.exit(main())
