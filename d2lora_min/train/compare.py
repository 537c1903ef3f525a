"""`make compare`: fine-tune every method from the same base, with the same trainer, data budget and seeds, and report
how each differs from a reference method, with a confidence interval (the statistics: stats.py).

    d2lora compare                                             # base, LoRA(4), LoRA(8), DoRA(4), D2-LoRA(4)
    d2lora compare --methods lora,d2lora:project=false --seeds 0,1,2,3
    d2lora compare --preset ablate                             # the D2-LoRA ablations
    d2lora compare --preset replicate                          # the paper's claims, 28 seeds

The budget is the paper's kind: n_train training items per task and `epochs` passes over them (the steps follow).
A method is written `name[:key=value,...]` (specs.py): the adapters in d2lora_min.nn.METHODS, plus `base` (the
pretrained model, not fine-tuned) and `full` (every parameter fine-tuned).

Each method runs at its tuned learning rate (docs/results/tuned_lrs.json, written by `make tune`) unless its spec
sets lr= or --lr_source=shared puts every method at --train.lr. Results go to runs/compare/ (or --out): results.md,
results.json, loss_curves.png, forest.png, and per (method, seed) run a JSON with every test item's result (runs/)
and its adapter (adapters/). A rerun reuses the runs whose settings match (their key) and computes only what is
missing (--fresh recomputes everything).
"""

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..files.io import check_writable, output_lock, write_json
from ..files.run_results import sealed
from ..synthetic.tasks import retention_probe, updated_facts
from ..synthetic.world import World
from .cli import UsageError, apply_overrides, config_help, overridden, parse_value, run_cli
from .data import heldout_text
from .pretrain import resolve_base
from .measure import Eta
from .report import learning_rates_line, terminal, write_report
from .runs import check_run_outputs, read_result, result_path, run_key, run_one, work_dir
from .settings import DERIVED, PRESETS, CompareConfig, preset, resolve
from .specs import split_methods
from .tasks import build_splits, of_kind
from .trainer import init_distributed, rank_and_world


@dataclass
class Setup:
    """What every run of a comparison shares: the base, its tokenizer, the tasks, their splits and the retention probe."""

    base_model: torch.nn.Module
    tokenizer: object
    base_meta: dict
    base_dir: Path
    tasks: dict  # {name: Task}
    splits: dict  # {task: tasks.Split}
    probe: tuple  # (held-out corpus tokens, facts-probe items)
    device: str


def prepare(settings):
    """Load the base (pretraining a new one only when the settings' pretrain config differs from the shipped base's)
    and draw the task splits and the retention probe."""
    if settings.own:  # your model, task folder or held-out text
        from ..own.session import prepare as prepare_own

        return Setup(**prepare_own(settings))
    cfg = settings.cfg
    base_model, tokenizer, base_meta, base_dir = resolve_base(cfg.pretrain)
    world = World(seed=cfg.pretrain.corpus.world_seed, n_people=cfg.pretrain.corpus.n_people)
    splits = build_splits(world, settings.tasks, cfg.n_train, cfg.n_test, cfg.n_validation, seed=0)
    probe = embedded_probe(world, tokenizer)
    return Setup(base_model.to(settings.device), tokenizer, base_meta, base_dir, settings.tasks, splits, probe,
                 settings.device)  # fmt: skip


def embedded_probe(world, tokenizer):
    """The retention probe of the embedded world: its held-out text (tokens) and its facts probe (items)."""
    return heldout_text(world, tokenizer, exclude_names=tuple(updated_facts(world))), retention_probe(world)


def run_all(settings, setup, out_dir, fresh=False):
    """Every (method, seed) run of the comparison -> (runs, how many were reused). A finished run whose result
    validates is reused; a killed one resumes from its checkpoint; --fresh recomputes everything. Two specs that run
    the same thing (the same settings and lr, e.g. "lora" at a tuned lr of 0.01 and "lora:lr=0.01") are run once."""
    rank, n_procs = rank_and_world()
    sha, first_seed = setup.base_meta["sha256"], settings.cfg.seeds[0]
    runs, reused, done = [], 0, {}  # done: the runs of this comparison by what they run (run_key by_settings)
    eta = Eta(sum(spec.name != "base" for spec, _ in settings.runs()))  # "about N min left" after each trained run
    for spec, seed in settings.runs():
        key = run_key(settings, spec, seed, sha, full_merge=seed == first_seed)
        same = run_key(settings, spec, seed, sha, full_merge=seed == first_seed, by_settings=True)
        path = result_path(out_dir, spec, seed, key)
        cached = None if fresh else read_result(path, settings, setup, spec, seed, key)
        if cached is None and same in done:  # the same run under another spec: computed once, written under both
            original = {k: v for k, v in done[same].items() if k != "sha256"}
            cached = sealed(
                {
                    **original,
                    "method": spec.text,
                    "label": spec.label,
                    "key": key,
                    "lr_from": spec.lr_from,
                    "same_run_as": original["method"],
                }
            )
            if rank == 0:
                write_json(path, cached)
        if cached:  # every process reads the same file (and holds the same `done`): the same decision
            if rank == 0:
                source = f"the same run as {cached['same_run_as']}" if "same_run_as" in cached else str(path)
                print(f"{spec.label} seed {seed}: reused {source}", flush=True)
            runs.append(cached)
            done.setdefault(same, cached)
            reused += 1
            eta.skip(spec.name != "base")
            continue
        if fresh and rank == 0:
            shutil.rmtree(work_dir(out_dir, spec, seed, key), ignore_errors=True)
        if n_procs > 1:
            dist.barrier()
        eta.start()
        result = run_one(spec, seed, key, seed == first_seed, settings, setup, out_dir)
        left = eta.finished(spec.name != "base")
        if rank == 0:
            write_json(path, sealed({**result, "key": key}))  # written last: its presence marks the run as finished
            shutil.rmtree(work_dir(out_dir, spec, seed, key), ignore_errors=True)  # the result is safe
            mc = of_kind(setup.tasks, "mc")
            mean = statistics.mean(result["scores"][t] for t in mc) if mc else float("nan")
            status = "" if result["status"] == "ok" else f" ({result['status']})"
            took = f", {result['train_seconds']:.0f} s training" if "train_seconds" in result else ""
            print(
                f"{spec.label} seed {seed}{status}: mean {settings.cfg.split} accuracy {100 * mean:.1f}{took}, "
                f"{result['eval_seconds']:.0f} s evaluation" + (f"; {left}" if left else ""),
                flush=True,
            )
            runs.append({**result, "key": key})
        done[same] = result if rank == 0 else {"method": spec.text}  # every process knows which runs are done
        if n_procs > 1:
            dist.barrier()  # the others wait while rank 0 evaluates
    return runs, reused


def announce(settings, setup):
    """The first lines of a comparison: the base, the machine, the budget, and each method's learning rate with
    where it came from (and a note when the tuned ones were chosen under other settings)."""
    cfg, meta, tcfg = settings.cfg, setup.base_meta, settings.train
    print(
        f"base: {setup.base_dir} (probe {meta.get('probe_accuracy')}, sha256 {meta['sha256'][:12]}) | device "
        f"{settings.device} | {torch.get_num_threads()} threads | {settings.processes} process(es) | "
        f"{settings.describe()} x {cfg.epochs} epochs = {tcfg.steps} steps of {tcfg.batch_size} | scored on "
        f"{cfg.split} items",
        flush=True,
    )
    print(learning_rates_line(settings.specs), flush=True)
    for note in settings.own.notes if settings.own else ():  # where your model's learning rates came from
        print(note, flush=True)
    tuned = settings.tuned if any(s.lr_from == "tuned" for s in settings.specs) else {}
    tuned_under = tuned.get("protocol", {})
    if tuned and tuned_under != settings.protocol:
        differ = ", ".join(k for k, v in settings.protocol.items() if tuned_under.get(k) != v)
        print(f"note: the tuned learning rates were chosen under other settings ({differ}); they are used as they are")
    own = [s for s in settings.specs if s.lr_from == "tuned" and s.targets != tuple(cfg.targets)]  # a spec's targets=
    moved = [s.label for s in own if list(s.targets) != tuned_under.get("targets")]
    if tuned and moved:  # they run at their method's lr, tuned on other targets
        tuned_on = "+".join(tuned_under.get("targets") or [])
        print(f"note: {', '.join(moved)} run at a learning rate tuned with the targets {tuned_on}", flush=True)


def compare(cfg: CompareConfig, out_dir="runs/compare", fresh=False, preset="default", publish=False, settings=None):
    """Run the comparison `cfg` into out_dir and write its report -> the report's summary (None on ranks > 0).
    settings: resolve(cfg), if the caller has it already."""
    t_start = time.time()
    if not str(out_dir):
        raise UsageError("the output folder is empty")
    out_dir = Path(out_dir)
    settings = settings or resolve(cfg)  # every setting checked before any work
    check_writable(out_dir)
    names = ("results.md", "results.json", "loss_curves.png", "forest.png")
    published = [f"{preset}.md", f"{preset}_loss_curves.png", f"{preset}_forest.png"] if publish else []
    check_run_outputs(settings, out_dir, names, published)
    rank, _ = rank_and_world()
    with output_lock(out_dir, hold=rank == 0):  # only rank 0 writes (under torchrun, its exit ends the others)
        setup = prepare(settings)
        if rank == 0:
            announce(settings, setup)
        runs, reused = run_all(settings, setup, out_dir, fresh)
        if rank != 0:
            return None
        wall = f"{time.time() - t_start:.0f} s ({reused} of {len(runs)} runs reused)"
        _, summary = write_report(settings, setup, runs, wall, out_dir, preset, publish)
    print("\n" + terminal(settings, summary["rows"], runs, wall, out_dir))  # 100 columns; every table in results.md
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="d2lora compare",
        description="Fine-tune LoRA, DoRA and D2-LoRA from the same base and compare them.",
        epilog=__doc__
        + "\nsettings (override with --section.field=value):\n"
        + "\n".join(config_help(CompareConfig(), derived=DERIVED)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", help="method specs separated by commas or spaces (default: the preset's)")
    parser.add_argument("--preset", choices=PRESETS, default="default")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<preset>, runs/compare for default)")
    parser.add_argument("--fresh", action="store_true", help="recompute every run instead of reusing matching results")
    parser.add_argument("--publish", action="store_true", help="also write the report and plots to docs/results/")
    args, overrides = parser.parse_known_args(argv)

    def body():
        cfg = apply_overrides(CompareConfig(), overrides)
        chosen, given = preset(args.preset, cfg.r), overridden(overrides)
        cfg.methods = tuple(split_methods(args.methods)) if args.methods is not None else chosen["methods"]
        if args.seeds is not None:
            cfg.seeds = parse_value(args.seeds, (0,), "--seeds")
        elif "seeds" not in given:
            cfg.seeds = chosen.get("seeds", cfg.seeds)
        if "reference" not in given:
            cfg.reference = chosen["reference"]
            if cfg.reference not in cfg.methods:  # said, never silent
                cfg.reference = next((m for m in cfg.methods if m != "base"), cfg.reference)
                print(
                    f"reference: {cfg.reference} ({chosen['reference']} is not among --methods; --reference=... "
                    f"chooses)",
                    flush=True,
                )
        out = (
            args.out
            if args.out is not None
            else ("runs/compare" if args.preset == "default" else f"runs/{args.preset}")
        )
        from ..own.session import defaults  # --model DIR, --tasks DIR: what depends on the settings given

        cfg = defaults(cfg, overrides, publish=args.publish)
        settings = resolve(cfg)  # before joining a process group or loading anything
        init_distributed()  # under torchrun: join the process group; otherwise a no-op
        if settings.processes == 1 and rank_and_world()[1] > 1:  # joined just now: the budget's check per process
            settings = resolve(cfg)
        compare(cfg, out, fresh=args.fresh, preset=args.preset, publish=args.publish, settings=settings)
        return 0

    return run_cli(parser, body)


if __name__ == "__main__":
    sys.exit(main())
