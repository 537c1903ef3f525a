"""`make compare`: fine-tune every method from the same base, with the same trainer, data, step budget and
seeds, and report one table.

    python -m d2lora_min.train.compare                                   # LoRA(4), LoRA(8), DoRA(4), D2-LoRA(4)
    python -m d2lora_min.train.compare --methods "base lora d2lora:project=false" --seeds 0,1,2
    python -m d2lora_min.train.compare --preset ablate                   # the D2-LoRA ablations

A method is written `name[:key=value,...]`. Names: the adapters in d2lora_min.nn.METHODS, plus `base` (the
pretrained model, not fine-tuned) and `full` (every parameter fine-tuned). Keys: r, alpha, dropout, lr, and
the method's own options (e.g. d2lora: tau_init, learn_tau, project, detach_norm).

Results go to runs/compare/ (or --out): results.json, results.md, loss_curves.png, one adapter checkpoint
per run and one JSON per (method, seed) run. A rerun reuses the per-run JSONs whose settings match and
computes only what is missing (--fresh recomputes everything).
"""

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..atomic import check_writable, write_json, write_text
from ..nn import DEFAULT_TARGETS, METHODS, display_name, inject_adapters, merge_adapters, save_adapters, trainable_parameters
from ..nn.inject import check_targets
from .cli import UsageError, apply_overrides, check_range, config_help, parse_value, run_cli
from .evaluate import generation_scores, mc_accuracy
from .pretrain import PretrainConfig, corpus_fingerprint, resolve_base
from .tasks import TASKS, build_splits, finetune_batches
from .tokenizer import EOT
from .trainer import TrainConfig, check_train_config, init_distributed, pick_device, rank_and_world, train
from .world import World

DEFAULT_METHODS = ("base", "lora", "lora:r=8", "dora", "d2lora")
ABLATE_METHODS = (
    "d2lora",
    "d2lora:tau_init=0,learn_tau=false",  # no negative branch: tau fixed at 0
    "d2lora:project=false",  # the signed residual alone
    "d2lora:learn_tau=false",  # tau fixed at tau_init
    "d2lora:detach_norm=true",  # norm treated as a constant in backward, as DoRA does
    "d2lora:r=8",  # rank 2r
    "lora:r=8",  # the parameter-matched LoRA
)
COMMON_KEYS = ("r", "alpha", "dropout", "lr")


def default_train_config():
    return TrainConfig(steps=300, batch_size=32, lr=1e-2, min_lr_ratio=0.1, warmup_steps=20, weight_decay=0.0,
                       checkpoint_every=50, desc="fine-tune")  # fmt: skip


@dataclass
class CompareConfig:
    methods: tuple = DEFAULT_METHODS  # method specs, see the module docstring
    seeds: tuple = (0,)  # one run per (method, seed); more seeds give a +- sd
    r: int = 4  # rank when a spec does not say
    alpha_over_r: float = 2.0  # alpha = alpha_over_r * r unless a spec sets alpha: the same scaling at every rank
    targets: tuple = DEFAULT_TARGETS  # module-name suffixes to adapt
    tasks: tuple = tuple(TASKS)
    n_train: int = 2000  # training items per task (sampled with replacement by the batcher)
    n_test: int = 500  # test items per task: one accuracy then has a standard error near 2 pp
    full_lr: float = 1e-3  # learning rate of `full` fine-tuning unless its spec sets lr
    train: TrainConfig = field(default_factory=default_train_config)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # which base (the shipped one by default)


@dataclass
class MethodSpec:
    text: str  # as written, e.g. "d2lora:project=false"
    name: str  # registry name, "base" or "full"
    r: int
    alpha: float
    dropout: float
    lr: float
    options: dict

    @property
    def label(self):
        if self.name == "base":
            return "base"
        if self.name == "full":
            return f"full FT (lr={self.lr:g})"
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"{display_name(self.name)}(r={self.r}{opts})"


def parse_method_spec(text, cfg: CompareConfig):
    """'d2lora:r=8,project=false' -> MethodSpec; a clear error for an unknown name, key or value."""
    name, _, rest = text.strip().partition(":")
    valid_names = list(METHODS) + ["base", "full"]
    if name not in valid_names:
        raise UsageError(f"unknown method {name!r} in {text!r}; valid methods: {', '.join(valid_names)}")
    option_defaults = METHODS[name].OPTIONS if name in METHODS else {}
    common = {"r": cfg.r, "alpha": None, "dropout": 0.0, "lr": cfg.full_lr if name == "full" else cfg.train.lr}
    like = {"r": 1, "alpha": 1.0, "dropout": 0.0, "lr": 1.0}
    options = {}
    for pair in rest.split(",") if rest else []:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"{pair!r} in {text!r} is not key=value")
        if key in common:
            common[key] = parse_value(value, like[key], f"{key} in {text!r}")
        elif key in option_defaults:
            options[key] = parse_value(value, option_defaults[key], f"{key} in {text!r}")
        else:
            valid = list(COMMON_KEYS) + list(option_defaults)
            raise UsageError(f"unknown key {key!r} for method {name!r} in {text!r}; valid keys: {', '.join(valid)}")
    alpha = common["alpha"] if common["alpha"] is not None else cfg.alpha_over_r * common["r"]
    spec = MethodSpec(text, name, common["r"], float(alpha), float(common["dropout"]), float(common["lr"]), options)
    check_range(f"lr in {text!r}", spec.lr, kind=float)
    if spec.lr <= 0:
        raise UsageError(f"lr in {text!r} must be > 0, got {spec.lr}")
    if name in METHODS:  # every value checked now, by building the layer around a 1x1 stand-in (no real work)
        try:
            METHODS[name](nn.Linear(1, 1), r=spec.r, alpha=spec.alpha, dropout=spec.dropout, **options)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{text!r}: {e}") from None
    return spec


# --- one run: fine-tune one method with one seed, evaluate unmerged and merged --------------------------------


def evaluate_all(model, tokenizer, splits):
    """{task: score}: accuracy, or ROUGE-L and exact match (`<task>_exact`) for generative tasks."""
    scores = {}
    for name, (_, test) in splits.items():
        task = TASKS[name]
        if task.kind == "mc":
            scores[name] = mc_accuracy(model, tokenizer, test, normalise=task.normalise)[0]
        else:
            rouge, exact, _, _ = generation_scores(model, tokenizer, test, task.max_new_tokens)
            scores[name], scores[name + "_exact"] = rouge, exact
    return scores


@torch.no_grad()
def forward_throughput(models, x, reps=7):
    """{name: tokens/s} of each model's forward pass on batch x: interleaved repetitions, median."""
    x = x.to(next(next(iter(models.values())).parameters()).device)
    times = {k: [] for k in models}
    for m in models.values():
        m(x)  # warm-up
    for _ in range(reps):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t0)
    return {k: x.numel() / statistics.median(v) for k, v in times.items()}


LOGIT_PROBE_PER_TASK = 16  # test prompts per task on which unmerged and merged logits are compared


def logit_probe_batch(tokenizer, splits, n_per_task=LOGIT_PROBE_PER_TASK):
    """A fixed batch of test prompts on which unmerged and merged logits are compared."""
    ids = [tokenizer.encode(item.prompt).ids for _, test in splits.values() for item in test[:n_per_task]]
    pad = tokenizer.token_to_id(EOT)
    x = torch.full((len(ids), max(map(len, ids))), pad, dtype=torch.long)
    for b, r in enumerate(ids):
        x[b, : len(r)] = torch.tensor(r)
    return x, [len(r) for r in ids]


@torch.no_grad()
def real_logits(model, x, lengths):
    logits, _ = model(x.to(next(model.parameters()).device))
    return torch.cat([logits[b, :n] for b, n in enumerate(lengths)]).float().cpu()  # (sum of lengths, vocab)


def run_one(spec, seed, base_model, tokenizer, splits, cfg, out_dir, device, train_dir, key):
    """Fine-tune `spec` from a copy of the base with `seed`; evaluate unmerged and merged -> result dict.

    Training checkpoints go to train_dir so that a killed run resumes. Under torchrun every process trains
    its shard; only rank 0 evaluates and writes (the others return None).
    """
    rank, n_procs = rank_and_world()
    model = copy.deepcopy(base_model).to(device)
    torch.manual_seed(seed)  # the adapter initialisation
    if spec.name == "full":
        model.requires_grad_(True)
    elif spec.name in METHODS:
        inject_adapters(model, spec.name, r=spec.r, alpha=spec.alpha, targets=cfg.targets, dropout=spec.dropout, **spec.options)
    result = {"method": spec.text, "label": spec.label, "seed": seed, "trainable_params": 0, "processes": n_procs}
    if spec.name != "base":
        result["trainable_params"] = trainable_parameters(model)
        tcfg = copy.deepcopy(cfg.train)
        tcfg.lr, tcfg.seed, tcfg.device, tcfg.desc = spec.lr, seed, device, f"{spec.label} seed {seed}"
        get_batch = finetune_batches(tokenizer, {k: tr for k, (tr, _) in splits.items()}, tcfg.batch_size, seed,
                                     tokenizer.token_to_id(EOT))  # fmt: skip
        t0 = time.perf_counter()
        trained = train(model, get_batch, tcfg, out_dir=train_dir)
        result["train_seconds"] = time.perf_counter() - t0
        result["resumed_from_step"] = trained.resumed_from
        result["losses"] = trained.losses
        result["step_time"] = statistics.median(trained.step_times[5:] or trained.step_times)
        second_half = np.asarray(trained.losses[len(trained.losses) // 2 :])
        result["volatility"] = float(np.std(np.diff(second_half))) if len(second_half) > 2 else float("nan")
    if rank != 0:
        return None
    model.eval()
    result["scores"] = evaluate_all(model, tokenizer, splits)
    if spec.name in METHODS:
        result["adapter"] = str(Path("adapters") / f"{slug(spec.text)}_seed{seed}_{key}")  # keyed like the result
        save_adapters(model, out_dir / result["adapter"])
        x, lengths = logit_probe_batch(tokenizer, splits)
        merged = merge_adapters(copy.deepcopy(model))
        result["max_logit_diff"] = (real_logits(merged, x, lengths) - real_logits(model, x, lengths)).abs().max().item()
        speed = forward_throughput({"base": base_model, "unmerged": model, "merged": merged}, x)
        result["eval_tokens_per_s"], result["merged_eval_tokens_per_s"] = speed["unmerged"], speed["merged"]
        result["base_eval_tokens_per_s"] = speed["base"]
        result["merged_scores"] = evaluate_all(merged, tokenizer, splits)
        result["merge_gap_pp"] = {k: 100 * (result["scores"][k] - result["merged_scores"][k]) for k in result["scores"]}
    return result


def slug(text):
    """A file-name-safe form of a method spec, made injective by a short hash of the exact text
    ('tau_init=-0.5' and 'tau_init=+0.5' read alike once the signs are replaced, their hashes do not)."""
    readable = "".join(c if c.isalnum() else "_" for c in text)
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def read_cached(path):
    """A finished run's JSON, or None when there is none or it cannot be read (then the run is recomputed)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"{path} is unreadable (an interrupted write from an older version?): recomputing that run", flush=True)
        return None


def run_key(spec, seed, cfg, base_meta):
    """Everything that changes a run's numbers; a cached run is reused only when this matches."""
    blob = {
        "spec": spec.text, "seed": seed, "r": cfg.r, "alpha_over_r": cfg.alpha_over_r, "targets": list(cfg.targets),
        "tasks": list(cfg.tasks), "n_train": cfg.n_train, "n_test": cfg.n_test, "full_lr": cfg.full_lr,
        "train": {k: v for k, v in asdict(cfg.train).items() if k not in ("progress", "desc")},
        "base": base_meta["sha256"], "world": corpus_fingerprint(cfg.pretrain.corpus),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# --- the table -------------------------------------------------------------------------------------------


def summarise(runs, task_names, n_test):
    """Group runs by method -> rows of mean and spread (sd over seeds, or the binomial standard error)."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        row = {"method": method, "label": rs[0]["label"], "seeds": [r["seed"] for r in rs], "trainable_params": rs[0]["trainable_params"]}
        mc = [t for t in task_names if TASKS[t].kind == "mc"]
        for t in list(task_names) + [t + "_exact" for t in task_names if TASKS[t].kind == "gen"] + ["mean_mc"]:
            values = [statistics.mean(r["scores"][m] for m in mc) if t == "mean_mc" else r["scores"][t] for r in rs]
            mean = statistics.mean(values)
            if len(values) > 1:
                spread = statistics.stdev(values)
            else:  # one seed: binomial standard error of an accuracy over n_test items (of the mean: over all items)
                n = n_test * (len(mc) if t == "mean_mc" else 1)
                spread = math.sqrt(mean * (1 - mean) / n) if t in mc or t == "mean_mc" else float("nan")
            row[t] = (mean, spread)
        for k in ("step_time", "volatility", "max_logit_diff", "eval_tokens_per_s", "merged_eval_tokens_per_s", "base_eval_tokens_per_s", "train_seconds"):
            vals = [r[k] for r in rs if k in r]
            row[k] = statistics.median(vals) if vals else None
        gaps = [abs(g) for r in rs for g in r.get("merge_gap_pp", {}).values()]
        row["max_merge_gap_pp"] = max(gaps) if gaps else None
        rows.append(row)
    return rows


def _fmt(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_tables(rows, task_names, reference_label):
    """Two Markdown tables: quality (per task) and cost (time, volatility, merge, throughput)."""
    mc = [t for t in task_names if TASKS[t].kind == "mc"]
    gen = [t for t in task_names if TASKS[t].kind == "gen"]
    head = ["method", "trainable"] + mc + ["mean acc"] + [f"{t} ROUGE-L" for t in gen] + [f"{t} EM" for t in gen]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"], f"{row['trainable_params']:,}"]
        for t in mc + ["mean_mc"]:
            m, s = row[t]
            cells.append(f"{100 * m:.1f} ± {100 * s:.1f}" if not math.isnan(s) else f"{100 * m:.1f}")
        cells += [_fmt(row[t][0]) for t in gen] + [_fmt(row[t + "_exact"][0]) for t in gen]
        lines.append("| " + " | ".join(cells) + " |")
    ref = next((r for r in rows if r["label"] == reference_label), None)
    head2 = ["method", f"step time (× {reference_label})", "loss volatility", "merge gap (pp, max over tasks)",
             "max abs logit diff", "forward tok/s unmerged", "merged", "merged / base"]  # fmt: skip
    lines += ["", "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for row in rows:
        if row["method"] == "base":
            continue
        rel = row["step_time"] / ref["step_time"] if ref and row["step_time"] and ref["step_time"] else None
        merged_vs_base = row["merged_eval_tokens_per_s"] / row["base_eval_tokens_per_s"] if row["base_eval_tokens_per_s"] else None
        cells = [row["label"], _fmt(rel, ".2f"), _fmt(row["volatility"], ".4f"), _fmt(row["max_merge_gap_pp"], ".2f"),
                 _fmt(row["max_logit_diff"], ".1e"), _fmt(row["eval_tokens_per_s"], ",.0f"),
                 _fmt(row["merged_eval_tokens_per_s"], ",.0f"), _fmt(merged_vs_base, ".2f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_losses(runs, path):
    """Training-loss curves (a moving average over 10 steps), one line per method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if r.get("losses"):
            smooth = np.convolve(r["losses"], np.ones(10) / 10, mode="valid")
            ax.plot(smooth, label=f"{r['label']} s{r['seed']}", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = str(path) + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def check_compare_config(cfg: CompareConfig):
    """Every setting of a compare run, before any work -> the parsed method specs."""
    if not cfg.methods:
        raise UsageError("no methods given")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise UsageError(f"a method is listed twice: {list(cfg.methods)}")
    specs = [parse_method_spec(m, cfg) for m in cfg.methods]
    if not cfg.seeds:
        raise UsageError("no seeds given")
    for seed in cfg.seeds:
        check_range("seeds", seed, 0)
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise UsageError(f"a seed is listed twice: {list(cfg.seeds)} (a repeated seed would fake a spread of 0)")
    if not cfg.tasks:
        raise UsageError("no tasks given")
    for t in cfg.tasks:
        if t not in TASKS:
            raise UsageError(f"unknown task {t!r}; valid tasks: {', '.join(TASKS)}")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise UsageError(f"a task is listed twice: {list(cfg.tasks)}")
    check_range("r", cfg.r, 1)
    check_range("alpha_over_r", cfg.alpha_over_r, kind=float)
    if cfg.alpha_over_r <= 0:
        raise UsageError(f"alpha_over_r must be > 0, got {cfg.alpha_over_r}")
    check_targets_usage(cfg.targets)
    check_range("n_train", cfg.n_train, 1)
    check_range("n_test", cfg.n_test, 1)
    check_range("full_lr", cfg.full_lr, kind=float)
    check_train_config(cfg.train)
    return specs


def check_targets_usage(targets):
    try:
        check_targets(targets)
    except (ValueError, TypeError) as e:
        raise UsageError(f"targets: {e}") from None


def compare(cfg: CompareConfig, out_dir="runs/compare", fresh=False):
    t_start = time.time()
    if not str(out_dir):
        raise UsageError("the output folder is empty")
    out_dir = Path(out_dir)
    specs = check_compare_config(cfg)  # all errors before any work
    check_writable(out_dir)
    device = pick_device(cfg.train.device)
    rank, n_procs = rank_and_world()
    base_model, tokenizer, base_meta, base_dir = resolve_base(cfg.pretrain)
    if rank == 0:
        print(f"base: {base_dir} (probe {base_meta.get('probe_accuracy')}, sha256 {base_meta['sha256'][:12]}) | device {device}"
              f" | {torch.get_num_threads()} threads | {n_procs} process(es)", flush=True)  # fmt: skip
    world = World(seed=cfg.pretrain.corpus.world_seed, n_people=cfg.pretrain.corpus.n_people)
    splits = build_splits(world, cfg.tasks, cfg.n_train, cfg.n_test, seed=0)
    base_model.to(device)

    runs = []
    for spec in specs:
        for seed in (cfg.seeds if spec.name != "base" else cfg.seeds[:1]):
            path = out_dir / "runs" / f"{slug(spec.text)}_seed{seed}.json"
            key = run_key(spec, seed, cfg, base_meta)
            cached = None if fresh else read_cached(path)
            if cached and cached.get("key") == key:  # every process reads the same file: the same decision
                if rank == 0:
                    print(f"{spec.label} seed {seed}: reused {path}", flush=True)
                runs.append(cached)
                continue
            train_dir = out_dir / "work" / f"{slug(spec.text)}_seed{seed}_{key}"  # keyed: other settings never resume it
            if fresh and rank == 0:
                shutil.rmtree(train_dir, ignore_errors=True)
            if n_procs > 1:
                dist.barrier()
            result = run_one(spec, seed, base_model, tokenizer, splits, cfg, out_dir, device, train_dir, key)
            if rank == 0:
                result["key"] = key
                write_json(path, result)
                shutil.rmtree(train_dir, ignore_errors=True)  # the result is safe: the checkpoint is not needed
                mean = statistics.mean(v for k, v in result["scores"].items() if TASKS.get(k) and TASKS[k].kind == "mc")
                print(f"{spec.label} seed {seed}: mean accuracy {100 * mean:.1f}"
                      + (f", {result['train_seconds']:.0f} s training" if "train_seconds" in result else ""), flush=True)  # fmt: skip
                runs.append(result)
            if n_procs > 1:
                dist.barrier()  # the others wait while rank 0 evaluates
    if rank != 0:
        return None

    rows = summarise(runs, cfg.tasks, cfg.n_test)
    reference = specs[0].label if specs[0].name != "base" else (specs[1].label if len(specs) > 1 else specs[0].label)
    table = markdown_tables(rows, cfg.tasks, reference)
    wall = time.time() - t_start
    spread = "± = sd over seeds" if len(cfg.seeds) > 1 else f"± = binomial standard error over {cfg.n_test} test items"
    header = (f"base {base_meta['sha256'][:12]}, {cfg.train.steps} steps x batch {cfg.train.batch_size}, seeds {list(cfg.seeds)}, "
              f"device {device}, {torch.get_num_threads()} threads, wall {wall:.0f} s; {spread}")  # fmt: skip
    write_text(out_dir / "results.md", f"{header}\n\n{table}\n")
    write_json(out_dir / "results.json", {"config": asdict(cfg), "rows": rows, "wall_seconds": wall, "base": base_meta["sha256"]})
    plot_losses(runs, out_dir / "loss_curves.png")
    print(f"\n{header}\n\n{table}\n\nwritten: {out_dir}/results.md, results.json, loss_curves.png")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune LoRA, DoRA and D2-LoRA from the same base and compare them.",
        epilog=__doc__ + "\nsettings (override with --section.field=value):\n" + "\n".join(config_help(CompareConfig())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", help=f"method specs separated by spaces or ';' (default: \"{' '.join(DEFAULT_METHODS)}\")")
    parser.add_argument("--preset", choices=["default", "ablate"], default="default")
    parser.add_argument("--seeds", help="comma-separated seeds (default: 0)")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per run")
    parser.add_argument("--out", default=None, help="output folder (default: runs/compare or runs/ablate)")
    parser.add_argument("--fresh", action="store_true", help="recompute every run instead of reusing matching results")
    args, overrides = parser.parse_known_args(argv)

    def body():
        cfg = apply_overrides(CompareConfig(), overrides)
        if cfg.train.seed != TrainConfig().seed:
            raise UsageError("--train.seed is not used by compare: each run's seed comes from --seeds")
        if args.preset == "ablate":
            cfg.methods = ABLATE_METHODS
        if args.methods is not None:
            cfg.methods = tuple(m for m in args.methods.replace(";", " ").split() if m)
        if args.seeds is not None:
            cfg.seeds = parse_value(args.seeds, (0,), "--seeds")
        if args.steps is not None:
            cfg.train.steps = args.steps
        out = args.out if args.out is not None else ("runs/ablate" if args.preset == "ablate" else "runs/compare")
        check_compare_config(cfg)  # before joining a process group or loading anything
        init_distributed()  # under torchrun: join the process group; otherwise a no-op
        compare(cfg, out, fresh=args.fresh)
        return 0

    return run_cli(parser, body)


if __name__ == "__main__":
    sys.exit(main())
