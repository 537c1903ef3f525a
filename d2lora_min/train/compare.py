"""`make compare`: fine-tune every method from the same base, with the same trainer, data budget and seeds,
and report how each differs from a reference method, with a confidence interval (the statistics: report.py).

    python -m d2lora_min.train.compare                                   # base, LoRA(4), LoRA(8), DoRA(4), D2-LoRA(4)
    python -m d2lora_min.train.compare --methods "lora d2lora:project=false" --seeds 0,1,2,3
    python -m d2lora_min.train.compare --preset ablate                   # the D2-LoRA ablations
    python -m d2lora_min.train.compare --preset replicate                # the paper's claims, 28 seeds
    python -m d2lora_min.train.compare --preset lr                       # every method over 5 learning rates

The budget is the paper's kind: n_train training items per task and `epochs` passes over them (the steps follow).
A method is written `name[:key=value,...]`. Names: the adapters in d2lora_min.nn.METHODS, plus `base` (the
pretrained model, not fine-tuned) and `full` (every parameter fine-tuned). Keys: r, alpha, dropout, lr, targets
(attn, mlp, all, or module names joined by +), and the method's own options (d2lora: tau_init, learn_tau,
project, detach_norm).

Results go to runs/compare/ (or --out): results.md, results.json, loss_curves.png, and per (method, seed) run a
JSON with every test item's result (runs/) and its adapter (adapters/). A rerun reuses the runs whose settings
match (their key) and computes only what is missing (--fresh recomputes everything).
"""

import argparse
import copy
import hashlib
import json
import math
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
from . import report
from .cli import UsageError, apply_overrides, check_range, config_help, parse_value, run_cli
from .data import heldout_text
from .evaluate import greedy_generate, mc_accuracy, pad_rows, rouge_l_f1, score_choices, validation_loss
from .pretrain import PretrainConfig, corpus_fingerprint, resolve_base
from .tasks import TASKS, build_splits, finetune_batches, retention_probe, steps_for, updated_facts
from .tokenizer import EOT
from .trainer import TrainConfig, TrainingDiverged, check_train_config, init_distributed, pick_device, rank_and_world, train
from .world import World

# Module groups a method spec can name as targets=...
TARGET_GROUPS = {"all": DEFAULT_TARGETS, "attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("fc_in", "fc_out")}

PRESETS = {
    "default": {"methods": ("base", "lora", "lora:r=8", "dora", "d2lora"), "reference": "lora:r=8"},
    "ablate": {
        "methods": (
            "d2lora",
            "d2lora:tau_init=0,learn_tau=false",  # no negative branch: tau fixed at 0
            "d2lora:project=false",  # the signed residual alone
            "d2lora:learn_tau=false",  # tau fixed at tau_init
            "d2lora:detach_norm=true",  # norm treated as a constant in backward, as DoRA does
            "d2lora:r=8",  # rank 2r
            "d2lora:targets=attn",  # attention projections only
            "d2lora:targets=mlp",  # MLP only
            "lora:r=8",  # the parameter-matched LoRA
        ),
        "reference": "d2lora",
    },
    "replicate": {"methods": ("lora", "lora:r=8", "dora", "d2lora"), "reference": "lora:r=8", "seeds": tuple(range(28))},
    "lr": {"methods": ("lora", "lora:r=8", "dora", "d2lora"), "reference": "lora:r=8", "seeds": (0, 1)},
}
LR_GRID = tuple(round(10 ** (-3 + 0.375 * k), 6) for k in range(5))  # 1e-3 to 3.16e-2: 1.5 decades, log-even


def default_train_config():
    # steps and warmup_steps are set from the budget (n_train x epochs) by budget_train_config
    return TrainConfig(batch_size=32, lr=1e-2, min_lr_ratio=0.1, weight_decay=0.0, desc="fine-tune")


@dataclass
class CompareConfig:
    methods: tuple = PRESETS["default"]["methods"]  # method specs, see the module docstring
    reference: str = "lora:r=8"  # every other method's difference is taken from this one (paired, same seeds)
    seeds: tuple = (0, 1, 2)  # reported seeds; the defaults were chosen on seeds 100-102 (and 103-105), never reported
    r: int = 4  # rank when a spec does not say
    alpha_over_r: float = 2.0  # alpha = alpha_over_r * r unless a spec sets alpha: the same scaling at every rank
    targets: tuple = DEFAULT_TARGETS  # module-name suffixes to adapt (a spec's targets= overrides)
    tasks: tuple = tuple(TASKS)
    n_train: int = 160  # training items per task
    epochs: int = 3  # passes over them: steps = epochs * ceil(n_tasks * n_train / batch_size)
    n_test: int = 500  # test items per task
    scoring: str = "task"  # multiple-choice scorer: "task" (each task's own), "sum" or "mean" log-likelihood
    warmup_frac: float = 0.1  # warmup as a fraction of the run's steps
    checkpoints: int = 4  # checkpoints per run (what a killed run resumes from)
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
    targets: tuple
    options: dict
    lr_set: bool = False  # the spec names its own lr (then the label shows it)

    @property
    def label(self):
        return self.method_label + (f", lr={self.lr:g}" if self.lr_set and self.name not in ("base", "full") else "")

    @property
    def method_label(self):
        """The label without a spec's own lr: what an lr sweep groups by."""
        if self.name == "base":
            return "base"
        if self.name == "full":
            return f"full FT (lr={self.lr:g})"
        extra = dict(self.options)
        if self.targets != DEFAULT_TARGETS:
            extra["targets"] = next((g for g, t in TARGET_GROUPS.items() if t == self.targets), "+".join(self.targets))
        opts = "".join(f", {k}={v}" for k, v in extra.items())
        return f"{display_name(self.name)}(r={self.r}{opts})"


COMMON_KEYS = {"r": 1, "alpha": 1.0, "dropout": 0.0, "lr": 1.0, "targets": ""}  # key -> a value of its type


def parse_targets(text, where):
    targets = TARGET_GROUPS.get(text) or tuple(t for t in text.split("+") if t)
    try:
        return check_targets(targets)
    except (ValueError, TypeError) as e:
        raise UsageError(f"targets in {where}: {e}") from None


def parse_method_spec(text, cfg: CompareConfig):
    """'d2lora:r=8,project=false' -> MethodSpec; a UsageError naming the spec and the key otherwise."""
    name, _, rest = text.strip().partition(":")
    valid_names = list(METHODS) + ["base", "full"]
    if name not in valid_names:
        raise UsageError(f"unknown method {name!r} in {text!r}; valid methods: {', '.join(valid_names)}")
    option_defaults = METHODS[name].OPTIONS if name in METHODS else {}
    common = {"r": cfg.r, "alpha": None, "dropout": 0.0, "lr": cfg.full_lr if name == "full" else cfg.train.lr, "targets": cfg.targets}
    options = {}
    for pair in rest.split(",") if rest else []:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"{pair!r} in {text!r} is not key=value")
        if key == "targets":
            common[key] = parse_targets(value, repr(text))
        elif key in common:
            common[key] = parse_value(value, COMMON_KEYS[key], f"{key} in {text!r}")
        elif key in option_defaults:
            options[key] = parse_value(value, option_defaults[key], f"{key} in {text!r}")
        else:
            valid = list(COMMON_KEYS) + list(option_defaults)
            raise UsageError(f"unknown key {key!r} for method {name!r} in {text!r}; valid keys: {', '.join(valid)}")
    alpha = common["alpha"] if common["alpha"] is not None else cfg.alpha_over_r * common["r"]
    lr_set = any(pair.partition("=")[0] == "lr" for pair in rest.split(",")) if rest else False
    spec = MethodSpec(text, name, common["r"], float(alpha), float(common["dropout"]), float(common["lr"]), tuple(common["targets"]), options, lr_set)
    check_range(f"lr in {text!r}", spec.lr, kind=float)
    if spec.lr <= 0:
        raise UsageError(f"lr in {text!r} must be > 0, got {spec.lr}")
    if name in METHODS:  # every value checked now, by building the layer around a 1x1 stand-in (no real work)
        try:
            METHODS[name](nn.Linear(1, 1), r=spec.r, alpha=spec.alpha, dropout=spec.dropout, **options)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{text!r}: {e}") from None
    return spec


def budget_train_config(cfg: CompareConfig):
    """The trainer's settings for one fine-tuning run: steps from the budget, warmup and checkpoint intervals as
    fractions of them (so a short run is not all warmup)."""
    tcfg = copy.deepcopy(cfg.train)
    tcfg.steps = steps_for(len(cfg.tasks) * cfg.n_train, cfg.epochs, tcfg.batch_size)
    tcfg.warmup_steps = max(1, round(cfg.warmup_frac * tcfg.steps))
    tcfg.checkpoint_every = max(1, math.ceil(tcfg.steps / cfg.checkpoints))
    return tcfg


# --- one run: fine-tune one method with one seed, evaluate every test item ---------------------------------------


def evaluate_items(model, tokenizer, splits):
    """{task: per-item results}: for multiple choice each choice's summed log-likelihood and whether the summed
    and the length-normalised scorer pick the right choice; for generative tasks the greedy answer, its ROUGE-L
    and exact match."""
    out = {}
    for name, (_, test) in splits.items():
        task = TASKS[name]
        if task.kind == "mc":
            summed, per_token, _ = score_choices(model, tokenizer, test)
            out[name] = {
                "correct_sum": [int(np.argmax(s) == it.answer) for s, it in zip(summed, test)],
                "correct_mean": [int(np.argmax(s) == it.answer) for s, it in zip(per_token, test)],
                "logp": [[round(v, 4) for v in s] for s in summed],
            }
        else:
            answers, _ = greedy_generate(model, tokenizer, [it.prompt for it in test], task.max_new_tokens)
            out[name] = {
                "rouge": [rouge_l_f1(a, it.reference) for a, it in zip(answers, test)],
                "exact": [int(a.strip() == it.reference.strip()) for a, it in zip(answers, test)],
                "answer": answers,
            }
    return out


def task_scores(items, scoring):
    """{task: score} from evaluate_items' per-item results (accuracy, or ROUGE-L and `<task>_exact`)."""
    scores = {}
    for name, res in items.items():
        task = TASKS[name]
        if task.kind == "mc":
            scores[name] = float(np.mean(res[report.primary_field("mc", scoring, task.normalise)]))
        else:
            scores[name], scores[name + "_exact"] = float(np.mean(res["rouge"])), float(np.mean(res["exact"]))
    return scores


def retention(model, tokenizer, probe):
    """What fine-tuning kept of pretraining: held-out corpus loss (nats) and the facts probe in corpus wording."""
    tokens, items = probe
    facts = mc_accuracy(model, tokenizer, items)[0]
    return {"heldout_loss": validation_loss(model, tokens, model.config.block_size), "facts_probe": facts}


THROUGHPUT_REPS = 7  # interleaved forward passes per model; the median is reported


@torch.no_grad()
def forward_throughput(models, x, reps=THROUGHPUT_REPS):
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
    return pad_rows(ids, tokenizer.token_to_id(EOT)), [len(r) for r in ids]


@torch.no_grad()
def real_logits(model, x, lengths):
    logits, _ = model(x.to(next(model.parameters()).device))
    return torch.cat([logits[b, :n] for b, n in enumerate(lengths)]).float().cpu()  # (sum of lengths, vocab)


def run_one(spec, seed, base_model, tokenizer, splits, probe, cfg, out_dir, device, train_dir, key, full_merge):
    """Fine-tune `spec` from a copy of the base with `seed`, evaluate every test item -> result dict.

    Training checkpoints go to train_dir so that a killed run resumes. The merged model is evaluated on every item
    when full_merge (the first seed), else compared with the unmerged one on the logit probe only. Under torchrun
    every process trains its shard; only rank 0 evaluates and writes (the others return None).
    """
    rank, n_procs = rank_and_world()
    model = copy.deepcopy(base_model).to(device)
    torch.manual_seed(seed)  # the adapter initialisation
    if spec.name == "full":
        model.requires_grad_(True)
    elif spec.name in METHODS:
        inject_adapters(model, spec.name, r=spec.r, alpha=spec.alpha, targets=spec.targets, dropout=spec.dropout, **spec.options)
    result = {"method": spec.text, "label": spec.label, "seed": seed, "trainable_params": 0, "processes": n_procs}
    if spec.name != "base":
        result["trainable_params"] = trainable_parameters(model)
        tcfg = budget_train_config(cfg)
        tcfg.lr, tcfg.seed, tcfg.device, tcfg.desc = spec.lr, seed, device, f"{spec.label} seed {seed}"
        get_batch = finetune_batches(tokenizer, {k: tr for k, (tr, _) in splits.items()}, tcfg.batch_size, seed,
                                     tokenizer.token_to_id(EOT))  # fmt: skip
        t0 = time.perf_counter()
        try:
            trained = train(model, get_batch, tcfg, out_dir=train_dir)
        except TrainingDiverged as e:  # kept as a result (an lr sweep expects some): the last finite weights are scored
            print(f"{spec.label} seed {seed}: {e}", flush=True)
            trained = e.result
            result["diverged"] = True
        result["train_seconds"] = time.perf_counter() - t0
        result["steps"], result["resumed_from_step"] = tcfg.steps, trained.resumed_from
        result["losses"] = trained.losses
        warm = len(trained.step_times) // 10  # the first tenth warms up the allocator and caches: left out
        result["step_time"] = statistics.median(trained.step_times[warm:] or trained.step_times)
        result["volatility"] = volatility(trained.losses)
    if rank != 0:
        return None
    model.eval()
    result["items"] = evaluate_items(model, tokenizer, splits)
    result["scores"] = task_scores(result["items"], cfg.scoring)
    result.update(retention(model, tokenizer, probe))
    if spec.name in METHODS:
        result["adapter"] = str(Path("adapters") / f"{slug(spec.text)}_seed{seed}_{key}")  # keyed like the result
        save_adapters(model, out_dir / result["adapter"])
        x, lengths = logit_probe_batch(tokenizer, splits)
        merged = merge_adapters(copy.deepcopy(model))
        result["max_logit_diff"] = (real_logits(merged, x, lengths) - real_logits(model, x, lengths)).abs().max().item()
        if full_merge:
            speed = forward_throughput({"base": base_model, "unmerged": model, "merged": merged}, x)
            result["eval_tokens_per_s"], result["merged_eval_tokens_per_s"] = speed["unmerged"], speed["merged"]
            result["base_eval_tokens_per_s"] = speed["base"]
            merged_scores = task_scores(evaluate_items(merged, tokenizer, splits), cfg.scoring)
            result["merge_gap_pp"] = {k: 100 * (result["scores"][k] - merged_scores[k]) for k in result["scores"]}
    return result


def volatility(losses):
    """Training-loss volatility: the standard deviation of step-to-step changes of the loss over the second half
    of training, where the schedule no longer drives the loss down fast (nan for fewer than 4 steps)."""
    second_half = np.asarray(losses[len(losses) // 2 :])
    return float(np.std(np.diff(second_half))) if len(second_half) > 2 else float("nan")


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


def run_key(spec, seed, cfg, base_meta, full_merge):
    """Everything that changes a run's numbers; a cached run is reused only when this matches."""
    blob = {
        "spec": spec.text, "seed": seed, "r": cfg.r, "alpha_over_r": cfg.alpha_over_r, "targets": list(spec.targets),
        "tasks": list(cfg.tasks), "n_train": cfg.n_train, "epochs": cfg.epochs, "n_test": cfg.n_test, "scoring": cfg.scoring,
        "warmup_frac": cfg.warmup_frac, "full_lr": cfg.full_lr, "full_merge": full_merge,
        "train": {k: v for k, v in asdict(budget_train_config(cfg)).items() if k not in ("progress", "desc")},
        "base": base_meta["sha256"], "world": corpus_fingerprint(cfg.pretrain.corpus), "version": 2,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# --- the whole comparison ------------------------------------------------------------------------------------


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
        raise UsageError(f"a seed is listed twice: {list(cfg.seeds)} (a repeated seed would fake a narrow interval)")
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
    try:
        check_targets(cfg.targets)
    except (ValueError, TypeError) as e:
        raise UsageError(f"targets: {e}") from None
    check_range("n_train", cfg.n_train, 1)
    check_range("epochs", cfg.epochs, 1)
    check_range("n_test", cfg.n_test, 1)
    check_range("warmup_frac", cfg.warmup_frac, 0.0, 0.5, kind=float)
    check_range("checkpoints", cfg.checkpoints, 1)
    check_range("full_lr", cfg.full_lr, kind=float)
    if cfg.scoring not in ("task", "sum", "mean"):
        raise UsageError(f"scoring must be task, sum or mean, got {cfg.scoring!r}")
    if cfg.reference not in cfg.methods:
        ref_name = cfg.reference.partition(":")[0]
        if ref_name not in METHODS and ref_name not in ("base", "full"):
            raise UsageError(f"unknown reference method {cfg.reference!r}")
    if cfg.train.steps != TrainConfig().steps or cfg.train.warmup_steps != TrainConfig().warmup_steps:
        raise UsageError("train.steps and train.warmup_steps follow from the budget: set --n_train, --epochs, --warmup_frac")
    check_range("train.batch_size", cfg.train.batch_size, 1)  # before the budget divides by it
    check_train_config(budget_train_config(cfg))
    return specs


def compare(cfg: CompareConfig, out_dir="runs/compare", fresh=False, preset="default", publish=False):
    t_start = time.time()
    if not str(out_dir):
        raise UsageError("the output folder is empty")
    out_dir = Path(out_dir)
    specs = check_compare_config(cfg)  # all errors before any work
    check_writable(out_dir)
    device = pick_device(cfg.train.device)
    rank, n_procs = rank_and_world()
    base_model, tokenizer, base_meta, base_dir = resolve_base(cfg.pretrain)
    tcfg = budget_train_config(cfg)
    if rank == 0:
        print(f"base: {base_dir} (probe {base_meta.get('probe_accuracy')}, sha256 {base_meta['sha256'][:12]}) | device {device}"
              f" | {torch.get_num_threads()} threads | {n_procs} process(es) | {len(cfg.tasks)} tasks x {cfg.n_train} items x "
              f"{cfg.epochs} epochs = {tcfg.steps} steps of {tcfg.batch_size}", flush=True)  # fmt: skip
    world = World(seed=cfg.pretrain.corpus.world_seed, n_people=cfg.pretrain.corpus.n_people)
    splits = build_splits(world, cfg.tasks, cfg.n_train, cfg.n_test, seed=0)
    probe = (heldout_text(world, tokenizer, exclude_names=tuple(updated_facts(world))), retention_probe(world))
    base_model.to(device)

    runs, reused = [], 0
    for spec in specs:
        for seed in cfg.seeds if spec.name != "base" else cfg.seeds[:1]:
            full_merge = seed == cfg.seeds[0]
            path = out_dir / "runs" / f"{slug(spec.text)}_seed{seed}.json"
            key = run_key(spec, seed, cfg, base_meta, full_merge)
            cached = None if fresh else read_cached(path)
            if cached and cached.get("key") == key:  # every process reads the same file: the same decision
                if rank == 0:
                    print(f"{spec.label} seed {seed}: reused {path}", flush=True)
                runs.append(cached)
                reused += 1
                continue
            train_dir = out_dir / "work" / f"{slug(spec.text)}_seed{seed}_{key}"  # keyed: other settings never resume it
            if fresh and rank == 0:
                shutil.rmtree(train_dir, ignore_errors=True)
            if n_procs > 1:
                dist.barrier()
            result = run_one(spec, seed, base_model, tokenizer, splits, probe, cfg, out_dir, device, train_dir, key, full_merge)
            if rank == 0:
                result["key"] = key
                write_json(path, result)  # written last: its presence (with this key) marks the run as finished
                shutil.rmtree(train_dir, ignore_errors=True)  # the result is safe: the checkpoint is not needed
                mc = [t for t in cfg.tasks if TASKS[t].kind == "mc"]
                mean = statistics.mean(result["scores"][t] for t in mc) if mc else float("nan")
                print(f"{spec.label} seed {seed}: mean accuracy {100 * mean:.1f}"
                      + (f", {result['train_seconds']:.0f} s training" if "train_seconds" in result else ""), flush=True)  # fmt: skip
                runs.append(result)
            if n_procs > 1:
                dist.barrier()  # the others wait while rank 0 evaluates
    if rank != 0:
        return None
    wall = time.time() - t_start
    text, summary = write_report(cfg, specs, runs, splits, base_meta, device, f"{wall:.0f} s ({reused} of {len(runs)} runs reused)", out_dir, preset, publish)
    print(f"\n{text}\nwritten: {out_dir}/results.md, results.json, loss_curves.png" + (", lr_sweep.png" if preset == "lr" else ""))
    return summary


PUBLISHED = Path(__file__).resolve().parents[2] / "docs" / "results"


def write_report(cfg, specs, runs, splits, base_meta, device, wall, out_dir, preset, publish=False):
    tasks = {t: TASKS[t] for t in cfg.tasks}
    clusters = {t: report.cluster_ids([it.cluster for it in splits[t][1]]) for t in cfg.tasks}
    chance = {t: float(np.mean([1 / len(it.choices) for it in splits[t][1]])) for t in cfg.tasks if TASKS[t].kind == "mc"}
    rows = report.method_rows(runs, tasks, clusters, cfg.scoring, cfg.reference)
    ref = next((s for s in specs if s.text == cfg.reference), None)
    base_row = next((r for r in rows if r["method"] == "base"), None)
    steps = budget_train_config(cfg).steps
    header = (f"base {base_meta['sha256'][:12]}; {len(cfg.tasks)} tasks x {cfg.n_train} training items x {cfg.epochs} epochs "
              f"= {steps} steps of {cfg.train.batch_size}; {cfg.n_test} test items per task; seeds {list(cfg.seeds)}; "
              f"scoring {cfg.scoring}; device {device}, {torch.get_num_threads()} threads; wall {wall}")  # fmt: skip
    parts = [header, "", "Accuracy (%, mean over seeds; span: ROUGE-L F1 and exact match):", "", report.score_table(rows, tasks)]
    if ref:
        parts += ["", f"Difference from {ref.label}, paired over seeds and test items (bootstrap, items resampled by cluster):", "",
                  report.difference_table(rows, tasks, ref.label)]  # fmt: skip
    parts += ["", "Retention and cost:", "", report.cost_table(rows, base_row, "lora")]
    parts += ["", *report.headroom_lines(rows, tasks, chance)]
    summary = {"config": asdict(cfg), "rows": rows, "wall": wall, "base": base_meta["sha256"], "steps": steps}
    if preset == "ablate":
        parts += ["", "Scoring function (the same runs, each multiple-choice task scored both ways):", "", scoring_table(runs, tasks, clusters)]
    if preset == "replicate":
        claims = replicate_claims(runs, tasks, clusters, cfg.scoring)
        summary["claims"] = claims
        parts += ["", "The paper's claims at this scale:", "", claims_table(claims)]
    if preset == "lr":
        points = lr_points(runs, specs, tasks, clusters, cfg.scoring)
        summary["lr_sweep"] = points
        report.plot_lr_sweep(points, out_dir / "lr_sweep.png")
        parts += ["", "Accuracy by learning rate (mean over tasks, 95 % CI):", "", lr_table(points)]
    text = "\n".join(parts) + "\n"
    write_text(out_dir / "results.md", text)
    write_json(out_dir / "results.json", summary)
    report.plot_losses(runs, out_dir / "loss_curves.png")
    if publish:  # the tables and figures the README shows live in the repository, regenerated by this command
        PUBLISHED.mkdir(parents=True, exist_ok=True)
        write_text(PUBLISHED / f"{preset}.md", text)
        for png in ("loss_curves.png", "lr_sweep.png"):
            if (out_dir / png).exists():
                shutil.copyfile(out_dir / png, PUBLISHED / f"{preset}_{png}")
    return text, summary


def scoring_table(runs, tasks, clusters):
    """Per method: mean accuracy with the summed and with the length-normalised scorer, and their paired difference."""
    mc = [t for t in tasks if tasks[t].kind == "mc"]
    lines = ["| method | summed log-likelihood | length-normalised | Δ (pp) [95 % CI] |", "|---|---|---|---|"]
    for method, rs in report.group(runs).items():
        a = {t: report.item_matrix(rs, t, "correct_sum") for t in mc}
        b = {t: report.item_matrix(rs, t, "correct_mean") for t in mc}
        boot = report.paired_bootstrap(b, a, {t: clusters[t] for t in mc})
        sa, sb = np.mean([a[t].mean() for t in mc]), np.mean([b[t].mean() for t in mc])
        lines.append(f"| {rs[0]['label']} | {100 * sa:.1f} | {100 * sb:.1f} | {100 * boot['diff']:+.1f} [{100 * boot['lo']:+.1f}, {100 * boot['hi']:+.1f}] |")
    return "\n".join(lines)


# --- make replicate: the paper's claims ------------------------------------------------------------------------

PAPER = {  # the paper's figures (Fujisawa & Kondo, 2026, arXiv 2602.14728), as its abstract states them
    "vs LoRA(r)": 2.2, "vs LoRA(2r)": 1.6, "vs DoRA(r)": None, "ROUGE-L vs LoRA(r)": 1.2, "volatility": -36.0,
    "merge gap mean": 0.03, "merge gap worst": 0.7, "merged / unmerged throughput": 1.91, "training overhead": 19.0,
}  # fmt: skip  (vs DoRA: the paper reports D2-LoRA ahead; no single figure is quoted here)


def _claim(name, paper, diff, lo, hi, unit="pp", sign=None):
    """A claim with a CI: replicated / not replicated / opposite, by which side of 0 the CI lies on (the paper's
    side is the sign of its figure, or `sign` where it gives a direction without a figure)."""
    side = sign if paper is None else (1 if paper > 0 else -1)
    if lo > 0:
        v = "replicated" if side > 0 else "opposite"
    elif hi < 0:
        v = "replicated" if side < 0 else "opposite"
    else:
        v = "not replicated"
    inside = None if paper is None else lo <= paper <= hi
    return {"claim": name, "paper": paper, "ours": diff, "lo": lo, "hi": hi, "unit": unit, "verdict": v, "paper_in_ci": inside}


def replicate_claims(runs, tasks, clusters, scoring):
    by = report.group(runs)
    need = ("lora", "lora:r=8", "dora", "d2lora")
    if not all(m in by for m in need):
        return []
    mc = [t for t in tasks if tasks[t].kind == "mc"]
    gen = [t for t in tasks if tasks[t].kind == "gen"]

    def mats(m, ts, fld=None):
        return {t: report.item_matrix(by[m], t, fld or report.primary_field(tasks[t].kind, scoring, tasks[t].normalise)) for t in ts}

    claims = []
    for name, other in (("vs LoRA(r)", "lora"), ("vs LoRA(2r)", "lora:r=8"), ("vs DoRA(r)", "dora")):
        b = report.paired_bootstrap(mats("d2lora", mc), mats(other, mc), {t: clusters[t] for t in mc})
        claims.append(_claim(f"D2-LoRA(r) mean accuracy {name}", PAPER[name], 100 * b["diff"], 100 * b["lo"], 100 * b["hi"], sign=1))
    if gen:
        b = report.paired_bootstrap(mats("d2lora", gen), mats("lora", gen), {t: clusters[t] for t in gen})
        claims.append(_claim("D2-LoRA(r) generative ROUGE-L vs LoRA(r) (points)", PAPER["ROUGE-L vs LoRA(r)"], 100 * b["diff"], 100 * b["lo"], 100 * b["hi"], "points"))
    vol_d2, vol_lora = [r["volatility"] for r in by["d2lora"]], [r["volatility"] for r in by["lora"]]
    ratio, lo, hi = report.seed_bootstrap_ratio(vol_d2, vol_lora)
    claims.append(_claim("training-loss volatility, D2-LoRA(r) vs LoRA(r)", PAPER["volatility"], 100 * ratio, 100 * lo, 100 * hi, "%"))
    gaps = [abs(g) for m in need for r in by[m] for g in r.get("merge_gap_pp", {}).values()]
    speed = [r["merged_eval_tokens_per_s"] / r["eval_tokens_per_s"] for r in by["d2lora"] if r.get("eval_tokens_per_s")]
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
        paper = "ahead" if c["paper"] is None else f"{c['paper']:+g}"
        lines.append(f"| {c['claim']} | {paper} | {ours} | {c['verdict']} | {inside} |")
    return "\n".join(lines)


# --- the learning-rate preset ---------------------------------------------------------------------------------


def lr_points(runs, specs, tasks, clusters, scoring):
    """{method label without lr: [(lr, mean accuracy, lo, hi)]} from runs of `name:lr=...` specs."""
    by, points = report.group(runs), {}
    for spec in specs:
        if spec.text in by:
            points.setdefault(spec.method_label, []).append((spec.lr, *report.mean_ci(by[spec.text], tasks, clusters, scoring)))
    return points


def lr_table(points):
    lrs = sorted({p[0] for pts in points.values() for p in pts})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |", "|---|" + "---|" * (len(lrs) + 1)]
    for label, pts in points.items():
        at = {p[0]: p for p in pts}
        cells = [f"{100 * at[lr][1]:.1f} [{100 * at[lr][2]:.1f}, {100 * at[lr][3]:.1f}]" if lr in at else "–" for lr in lrs]
        best = max(pts, key=lambda p: p[1])[0]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {best:g} |")
    return "\n".join(lines)


def apply_preset(cfg, preset):
    settings = PRESETS[preset]
    cfg.methods, cfg.reference = settings["methods"], settings["reference"]
    cfg.seeds = settings.get("seeds", cfg.seeds)
    if preset == "lr":  # every method at every learning rate of the grid
        cfg.methods = tuple(f"{m}{',' if ':' in m else ':'}lr={lr:g}" for m in settings["methods"] for lr in LR_GRID)
        cfg.reference = f"lora:r=8,lr={cfg.train.lr:g}"
    return cfg


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune LoRA, DoRA and D2-LoRA from the same base and compare them.",
        epilog=__doc__ + "\nsettings (override with --section.field=value):\n" + "\n".join(config_help(CompareConfig())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", help="method specs separated by spaces or ';' (default: the preset's)")
    parser.add_argument("--preset", choices=list(PRESETS), default="default")
    parser.add_argument("--seeds", help="comma-separated seeds (default: 0,1,2; replicate: 0-27; lr: 0,1)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<preset>, runs/compare for default)")
    parser.add_argument("--fresh", action="store_true", help="recompute every run instead of reusing matching results")
    parser.add_argument("--publish", action="store_true", help="also write the report and plots to docs/results/ (what the README shows)")
    args, overrides = parser.parse_known_args(argv)

    def body():
        cfg = apply_preset(CompareConfig(), args.preset)
        cfg = apply_overrides(cfg, overrides)
        if cfg.train.seed != TrainConfig().seed:
            raise UsageError("--train.seed is not used by compare: each run's seed comes from --seeds")
        if args.methods is not None:
            cfg.methods = tuple(m for m in args.methods.replace(";", " ").split() if m)
            if cfg.reference not in cfg.methods and args.preset == "default" and "--reference" not in " ".join(overrides):
                cfg.reference = next((m for m in cfg.methods if m != "base"), cfg.reference)
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
