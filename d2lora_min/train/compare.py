"""`make compare`: fine-tune every method from the same base, with the same trainer, data budget and seeds,
and report how each differs from a reference method, with a confidence interval (the statistics: report.py).

    python -m d2lora_min.train.compare                                   # base, LoRA(4), LoRA(8), DoRA(4), D2-LoRA(4)
    python -m d2lora_min.train.compare --methods "lora d2lora:project=false" --seeds 0,1,2,3
    python -m d2lora_min.train.compare --preset ablate                   # the D2-LoRA ablations
    python -m d2lora_min.train.compare --preset replicate                # the paper's claims, 28 seeds

The budget is the paper's kind: n_train training items per task and `epochs` passes over them (the steps follow).
A method is written `name[:key=value,...]`. Names: the adapters in d2lora_min.nn.METHODS, plus `base` (the
pretrained model, not fine-tuned) and `full` (every parameter fine-tuned). Keys: r, alpha, dropout, lr, targets
(attn, mlp, all, or module names joined by +), and the method's own options (d2lora: tau_init, learn_tau,
project, readd_delta, detach_norm).

Each method runs at its tuned learning rate (tuned_lrs.json, written by `make tune`) unless its spec sets lr= or
--lr_source=shared puts every method at --train.lr. Results go to runs/compare/ (or --out): results.md,
results.json, loss_curves.png, and per (method, seed) run a JSON with every test item's result (runs/) and its
adapter (adapters/). A rerun reuses the runs whose settings match (their key) and computes only what is missing
(--fresh recomputes everything).
"""

import argparse
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..atomic import check_writable, write_json
from ..nn.checkpoint import ADAPTER_FILE
from .cache import read_cached, result_path, run_key, sealed, slug
from .cli import UsageError, apply_overrides, config_help, overridden, parse_value, run_cli
from .data import heldout_text
from .outputs import LOCK_FILE, check_paths, output_lock
from .presets import PRESETS, CompareConfig, apply_preset, budget_train_config, check_compare_config, load_tuned, protocol
from .pretrain import resolve_base
from .report import PUBLISHED, learning_rates_line, write_report
from .resume import CHECKPOINT
from .run import run_one
from .specs import split_methods
from .tasks import TASKS, build_splits, retention_probe, updated_facts
from .trainer import TrainConfig, init_distributed, pick_device, rank_and_world
from .world import World


@dataclass
class Setup:
    """What every run of a comparison shares: the base, its tokenizer, the task splits and the retention probe."""

    base_model: torch.nn.Module
    tokenizer: object
    base_meta: dict
    base_dir: Path
    splits: dict  # {task: tasks.Split}
    probe: tuple  # (held-out corpus tokens, facts-probe items)
    device: str


def prepare(cfg: CompareConfig):
    """Load the base (pretraining a new one only when cfg.pretrain differs from the shipped one's settings) and draw
    the task splits and the retention probe."""
    device = pick_device(cfg.train.device)
    base_model, tokenizer, base_meta, base_dir = resolve_base(cfg.pretrain)
    world = World(seed=cfg.pretrain.corpus.world_seed, n_people=cfg.pretrain.corpus.n_people)
    splits = build_splits(world, cfg.tasks, cfg.n_train, cfg.n_test, cfg.n_validation, seed=0)
    probe = (heldout_text(world, tokenizer, exclude_names=tuple(updated_facts(world))), retention_probe(world))
    return Setup(base_model.to(device), tokenizer, base_meta, base_dir, splits, probe, device)


def work_dir(out_dir, spec, seed, key):
    """Where a run keeps its training checkpoint until its result is written (keyed: other settings never resume it)."""
    return out_dir / "work" / f"{slug(spec.text)}_seed{seed}_{key}"


def planned_runs(cfg, specs):
    """(spec, seed) of every run of the comparison: the base runs once (it is not trained, so seeds would repeat it)."""
    return [(spec, seed) for spec in specs for seed in (cfg.seeds if spec.name != "base" else cfg.seeds[:1])]


def check_outputs(cfg, specs, out_dir, names, published=()):
    """Before any work (the base is loaded, or pretrained, later): what lies where this command writes. Under out_dir
    the report's files (`names`) and the lock file, the folders runs/, adapters/ and work/, and in them every entry of
    these runs (each (spec, seed), under any key: the keys need the base); under docs/results/ the files --publish
    writes (`published`)."""
    stems = tuple(f"{slug(spec.text)}_seed{seed}_" for spec, seed in planned_runs(cfg, specs))  # + the key
    folders = {name: out_dir / name for name in ("runs", "adapters", "work")}
    check_paths(out_dir, files=[out_dir / name for name in (*names, LOCK_FILE)], folders=folders.values())
    ours = {name: [f / e for e in sorted(os.listdir(f)) if e.startswith(stems)] if f.is_dir() else []
            for name, f in folders.items()}  # fmt: skip
    check_paths(out_dir, files=ours["runs"], folders=ours["adapters"] + ours["work"])
    check_paths(out_dir, files=[e / ADAPTER_FILE for e in ours["adapters"]] + [e / CHECKPOINT for e in ours["work"]])
    check_paths(PUBLISHED, files=[PUBLISHED / name for name in published], hint="leave out --publish")


def run_all(cfg: CompareConfig, specs, setup: Setup, out_dir, fresh=False):
    """Every (method, seed) run of the comparison -> (runs, how many were reused). A finished run whose result
    validates is reused; a killed one resumes from its checkpoint; --fresh recomputes everything."""
    rank, n_procs = rank_and_world()
    planned = [(spec, seed, run_key(spec, seed, cfg, setup.base_meta, full_merge=seed == cfg.seeds[0]))
               for spec, seed in planned_runs(cfg, specs)]  # fmt: skip
    runs, reused, done = [], 0, {}  # done: the runs of this comparison by what they run (run_key by_settings)
    for spec, seed, key in planned:
        full_merge = seed == cfg.seeds[0]
        twin = run_key(spec, seed, cfg, setup.base_meta, full_merge, by_settings=True)
        path = result_path(out_dir, spec, seed, key)
        cached = None if fresh else read_cached(path, spec, seed, key, cfg)
        if cached is None and twin in done:  # the same run under another spec: computed once, written under both
            original = {k: v for k, v in done[twin].items() if k != "sha256"}
            cached = sealed({**original, "method": spec.text, "label": spec.label, "key": key, "lr_from": spec.lr_from,
                             "same_run_as": original["method"]})  # fmt: skip
            if rank == 0:
                write_json(path, cached)
        if cached:  # every process reads the same file (and holds the same `done`): the same decision
            if rank == 0:
                source = f"the same run as {cached['same_run_as']}" if "same_run_as" in cached else str(path)
                print(f"{spec.label} seed {seed}: reused {source}", flush=True)
            runs.append(cached)
            done.setdefault(twin, cached)
            reused += 1
            continue
        train_dir = work_dir(out_dir, spec, seed, key)
        if fresh and rank == 0:
            shutil.rmtree(train_dir, ignore_errors=True)
        if n_procs > 1:
            dist.barrier()
        result = run_one(spec, seed, setup, cfg, out_dir, train_dir, key, full_merge)
        if rank == 0:
            result["key"] = key
            write_json(path, sealed(result))  # written last: its presence (with this key) marks the run as finished
            shutil.rmtree(train_dir, ignore_errors=True)  # the result is safe: the checkpoint is not needed
            mc = [t for t in cfg.tasks if TASKS[t].kind == "mc"]
            mean = statistics.mean(result["scores"][t] for t in mc) if mc else float("nan")
            status = "" if result["status"] == "ok" else f" ({result['status']})"
            print(f"{spec.label} seed {seed}{status}: mean {cfg.split} accuracy {100 * mean:.1f}"
                  + (f", {result['train_seconds']:.0f} s training" if "train_seconds" in result else "")
                  + f", {result['eval_seconds']:.0f} s evaluation", flush=True)  # fmt: skip
            runs.append(result)
        done[twin] = result if rank == 0 else {"method": spec.text}  # every process knows which runs are done
        if n_procs > 1:
            dist.barrier()  # the others wait while rank 0 evaluates
    return runs, reused


def announce(cfg, specs, setup):
    """The first lines of a comparison: the base, the machine, the budget, and each method's learning rate with
    where it came from."""
    tcfg = budget_train_config(cfg)
    _, n_procs = rank_and_world()
    meta = setup.base_meta
    print(f"base: {setup.base_dir} (probe {meta.get('probe_accuracy')}, sha256 {meta['sha256'][:12]}) | device {setup.device}"
          f" | {torch.get_num_threads()} threads | {n_procs} process(es) | {len(cfg.tasks)} tasks x {cfg.n_train} items x "
          f"{cfg.epochs} epochs = {tcfg.steps} steps of {tcfg.batch_size} | scored on {cfg.split} items", flush=True)  # fmt: skip
    print(learning_rates_line(specs), flush=True)
    tuned = load_tuned(cfg.tuned_file) if any(s.lr_from == "tuned" for s in specs) else {}
    if tuned and tuned.get("protocol") != protocol(cfg):
        differ = [k for k in protocol(cfg) if tuned.get("protocol", {}).get(k) != protocol(cfg)[k]]
        print(f"note: the tuned learning rates were chosen under other settings ({', '.join(differ)}); they are used as they are", flush=True)


def compare(cfg: CompareConfig, out_dir="runs/compare", fresh=False, preset="default", publish=False):
    t_start = time.time()
    if not str(out_dir):
        raise UsageError("the output folder is empty")
    out_dir = Path(out_dir)
    specs = check_compare_config(cfg)  # all errors before any work
    check_writable(out_dir)
    check_outputs(cfg, specs, out_dir, ("results.md", "results.json", "loss_curves.png", "forest.png"),
                  [f"{preset}.md", f"{preset}_loss_curves.png", f"{preset}_forest.png"] if publish else [])  # fmt: skip
    rank, n_procs = rank_and_world()
    last = (len(cfg.tasks) * cfg.n_train) % cfg.train.batch_size  # the items of an epoch's last, smaller step
    if n_procs > 1 and 0 < last < n_procs:
        raise UsageError(f"an epoch's last step has {last} items, fewer than the {n_procs} processes: choose n_train or "
                         f"batch_size so that every process gets a row")  # fmt: skip
    with output_lock(out_dir, hold=rank == 0):  # only rank 0 writes (under torchrun, its exit ends the others)
        setup = prepare(cfg)
        if rank == 0:
            announce(cfg, specs, setup)
        runs, reused = run_all(cfg, specs, setup, out_dir, fresh)
        if rank != 0:
            return None
        wall = f"{time.time() - t_start:.0f} s ({reused} of {len(runs)} runs reused)"
        text, summary = write_report(cfg, specs, runs, setup.splits, setup.base_meta, setup.device, wall, out_dir,
                                     preset, publish)  # fmt: skip
    print(f"\n{text}\nwritten: {out_dir}/results.md, results.json, loss_curves.png, forest.png")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune LoRA, DoRA and D2-LoRA from the same base and compare them.",
        epilog=__doc__ + "\nsettings (override with --section.field=value):\n" + "\n".join(config_help(CompareConfig())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", help="method specs separated by spaces, ';' or commas (default: the preset's)")
    parser.add_argument("--preset", choices=list(PRESETS), default="default")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<preset>, runs/compare for default)")
    parser.add_argument("--fresh", action="store_true", help="recompute every run instead of reusing matching results")
    parser.add_argument("--publish", action="store_true", help="also write the report and plots to docs/results/ (what docs/RESULTS.md shows)")
    args, overrides = parser.parse_known_args(argv)

    def body():
        cfg = apply_preset(CompareConfig(), args.preset)
        cfg = apply_overrides(cfg, overrides)
        if cfg.train.seed != TrainConfig().seed:
            raise UsageError("--train.seed is not used by compare: each run's seed comes from --seeds")
        if args.methods is not None:
            cfg.methods = tuple(split_methods(args.methods))
            if cfg.reference not in cfg.methods and "reference" not in overridden(overrides):  # said, never silent
                preset_reference, cfg.reference = cfg.reference, next((m for m in cfg.methods if m != "base"), cfg.reference)
                print(f"reference: {cfg.reference} ({preset_reference} is not among --methods; --reference=... chooses)", flush=True)
        if args.seeds is not None:
            cfg.seeds = parse_value(args.seeds, (0,), "--seeds")
        out = args.out if args.out is not None else ("runs/compare" if args.preset == "default" else f"runs/{args.preset}")
        check_compare_config(cfg)  # before joining a process group or loading anything
        init_distributed()  # under torchrun: join the process group; otherwise a no-op
        compare(cfg, out, fresh=args.fresh, preset=args.preset, publish=args.publish)
        return 0

    return run_cli(parser, body)


if __name__ == "__main__":
    sys.exit(main())
