"""One run of a comparison: fine-tune one method with one seed from a copy of the base, evaluate every test item,
measure retention, save the adapter, and check the merge (logits and, on the first seed, every item and the
throughput of the base, unmerged and merged models); and where its files live, named by the run's key.
"""

import copy
import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..files.adapter_file import ADAPTER_FILE
from ..files.checkpoints import CHECKPOINT
from ..files.io import LOCK_FILE, check_paths, sha256_file
from ..files.run_results import read_run
from ..nn import (
    METHODS,
    adapter_layers,
    inject_adapters,
    merge_adapters,
    save_adapters,
    set_fused,
    trainable_parameters,
)
from .data import EOT, finetune_batches
from .settings import PUBLISHED
from .evaluate import evaluate_items, logit_probe_batch, real_logits, retention, task_scores
from .measure import forward_throughput, memory_record, saved_in_step, start_peak
from .trainer import TrainingDiverged, rank_and_world, train

SLUG_CHARS = 48  # of a spec's readable part in file names (a long spec would overflow the 255 bytes a name may have)


def slug(text):
    """A file-name-safe form of a method spec, made injective by a short hash of the exact text
    ('tau_init=-0.5' and 'tau_init=+0.5' read alike once the signs are replaced, their hashes do not)."""
    readable = "".join(c if c.isascii() and c.isalnum() else "_" for c in text)[:SLUG_CHARS]
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def result_path(out_dir, spec, seed, key):
    """Where a run's JSON lives: named by spec, seed and key, so that a rerun with other settings writes beside it
    and never replaces a finished result of the earlier settings."""
    return out_dir / "runs" / f"{slug(spec.text)}_seed{seed}_{key}.json"


def adapter_path(out_dir, spec, seed, key):
    """Where a run saves its adapter file: a folder named like its result (relative to out_dir), and the file in it."""
    folder = Path("adapters") / f"{slug(spec.text)}_seed{seed}_{key}"
    return folder, out_dir / folder / ADAPTER_FILE


def work_dir(out_dir, spec, seed, key):
    """Where a run keeps its training checkpoint until its result is written (keyed: other settings never resume it)."""
    return out_dir / "work" / f"{slug(spec.text)}_seed{seed}_{key}"


def check_run_outputs(settings, out_dir, names, published=()):
    """Before any work (the base is loaded, or pretrained, later): what lies where this command writes. Under out_dir
    the report's files (`names`) and the lock file, the folders runs/, adapters/ and work/, and in them every entry of
    these runs (each (spec, seed), under any key: the keys need the base); under docs/results/ the files --publish
    writes (`published`)."""
    stems = tuple(f"{slug(spec.text)}_seed{seed}_" for spec, seed in settings.runs())  # + the key
    folders = {name: out_dir / name for name in ("runs", "adapters", "work")}
    check_paths(out_dir, files=[out_dir / name for name in (*names, LOCK_FILE)], folders=folders.values())
    entries = lambda f: [f / e for e in sorted(os.listdir(f)) if e.startswith(stems)] if f.is_dir() else []  # noqa: E731
    ours = {name: entries(f) for name, f in folders.items()}
    check_paths(out_dir, files=ours["runs"], folders=ours["adapters"] + ours["work"])
    check_paths(out_dir, files=[e / ADAPTER_FILE for e in ours["adapters"]] + [e / CHECKPOINT for e in ours["work"]])
    check_paths(PUBLISHED, files=[PUBLISHED / name for name in published], hint="leave out --publish")


def read_result(path, settings, setup, spec, seed, key):
    """The finished result of this run at `path`, or None (none there, or not this run's: then it is recomputed)."""
    cfg = settings.cfg
    n_items = {name: counts[cfg.split] for name, counts in settings.counts.items()}  # per task (a file task: its own)
    expected = {"method": spec.text, "seed": seed, "key": key}
    kinds = {name: task.kind for name, task in setup.tasks.items()}
    return read_run(path, expected, kinds, n_items, trained=spec.name != "base", tested=cfg.split == "test")


# The comparison's settings that change a run's numbers (with the run's own, below): part of every run key.
KEYED = ("r", "alpha_over_r", "split", "n_test", "n_validation", "tasks", "n_train", "epochs", "scoring", "warmup_frac",
         "full_lr", "packed", "fused")  # fmt: skip


def run_key(settings, spec, seed, base_sha, full_merge, by_settings=False):
    """Everything that changes a run's numbers; a cached run is reused only when this matches. by_settings=True
    names the method by what it runs (name, rank, alpha, dropout, lr, targets, options) instead of by how its spec
    is written: two specs with the same key then are the same run ("lora" at a tuned lr of 0.01 and "lora:lr=0.01")."""
    cfg = settings.cfg
    options = {**(METHODS[spec.name].OPTIONS if spec.name in METHODS else {}), **spec.options}  # defaults written out
    what = (
        dict(name=spec.name, r=spec.r, alpha=spec.alpha, dropout=spec.dropout, options=options)
        if by_settings
        else spec.text
    )
    blob = {k: getattr(cfg, k) for k in KEYED}  # (tuples are written as the lists they were)
    blob.update(spec=what, seed=seed, device=settings.device, processes=settings.processes, targets=list(spec.targets))
    blob.update(lr=spec.lr, full_merge=full_merge, base=base_sha, world=settings.corpus, version=3)
    blob["train"] = {k: v for k, v in asdict(settings.train).items() if k not in ("progress", "desc")}
    blob.update(settings.own.key if settings.own else {})  # your model, task files, held-out text (own/session.py)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def run_one(spec, seed, key, full_merge, settings, setup, out_dir):
    """Fine-tune `spec` from a copy of the base with `seed`, evaluate every item of cfg.split -> result dict.

    Training checkpoints go to work_dir(out_dir, spec, seed, key) so that a killed run resumes. On the test split the run also measures
    retention, saves its adapter and checks the merge: the merged model is evaluated on every item when full_merge
    (the first seed), else compared with the unmerged one on the logit probe only. On the validation split (tuning)
    it only scores. Under torchrun every process trains its shard; only rank 0 evaluates and writes (the others
    return None).
    """
    cfg, (rank, n_procs) = settings.cfg, rank_and_world()
    model = copy.deepcopy(setup.base_model).to(setup.device)
    torch.manual_seed(seed)  # the adapter initialisation
    if spec.name == "full":
        model.requires_grad_(True)
    elif spec.name in METHODS:
        inject_adapters(
            model, spec.name, r=spec.r, alpha=spec.alpha, targets=spec.targets, dropout=spec.dropout, **spec.options
        )
        set_fused(model, cfg.fused)  # the plain path (each method's forward()) unless --fused=true
    result = {
        "method": spec.text,
        "label": spec.label,
        "seed": seed,
        "trainable_params": 0,
        "processes": n_procs,
        "status": "ok",
    }
    if spec.name != "base":
        result.update(fine_tune(model, spec, seed, settings, setup, work_dir(out_dir, spec, seed, key), key))
    if rank != 0:
        return None
    model.eval()
    t0, counts = time.perf_counter(), {"positions": 0, "padding": 0}
    result["split"], result["lr"], result["lr_from"] = cfg.split, spec.lr, spec.lr_from
    result["items"] = evaluate_items(model, setup.tokenizer, setup.splits, setup.tasks, counts, cfg.split)
    result["eval_positions"] = counts
    result["scores"] = task_scores(result["items"], setup.tasks, cfg.scoring)
    if cfg.split == "test":
        result.update(retention(model, setup.tokenizer, setup.probe))
    if spec.name in METHODS and cfg.split == "test":
        folder, path = adapter_path(out_dir, spec, seed, key)  # keyed like the result
        save_adapters(model, out_dir / folder)
        result["adapter"], result["adapter_sha256"] = str(folder), sha256_file(path)  # a reuse checks it is this file
        result.update(merge_check(model, setup, cfg, result["scores"], full_merge))
    result["eval_seconds"] = time.perf_counter() - t0  # scoring, retention, the adapter file and the merge check
    return result


def fine_tune(model, spec, seed, settings, setup, train_dir, key):
    """Train `model` (its adapters, or all of it for `full`) on the budget -> what the run records of its training:
    status (ok, diverged, never moved), losses, step time, volatility, seconds, positions and padding."""
    _, n_procs = rank_and_world()
    tokenizer, pad = setup.tokenizer, setup.tokenizer.token_to_id(EOT)
    out = {"trainable_params": trainable_parameters(model), "status": "ok"}
    cfg, tcfg = settings.cfg, copy.deepcopy(settings.train)
    tcfg.lr, tcfg.seed, tcfg.device, tcfg.desc = spec.lr, seed, setup.device, f"{spec.label} seed {seed}"
    capacity = setup.base_model.config.block_size if cfg.packed else None  # packed rows, or one item per padded row
    get_batch = finetune_batches(
        tokenizer,
        {k: parts.train for k, parts in setup.splits.items()},
        tcfg.batch_size,
        seed,
        pad,
        capacity=capacity,
        n_shards=n_procs,
    )
    out["train_positions"] = positions_in(get_batch, tcfg.steps, pad)
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]  # did training move anything?
    saved = saved_in_step(model, get_batch(0), setup.device, tcfg.amp)  # one step's activations (train() reseeds)
    start_peak(setup.device)
    t0 = time.perf_counter()
    try:
        trained = train(model, get_batch, tcfg, out_dir=train_dir, key=key)
        moved = any(not torch.equal(p, q) for p, q in zip((p for p in model.parameters() if p.requires_grad), start))
        out["status"] = "ok" if moved else "never moved"  # every update skipped, or too small to change a weight
    except TrainingDiverged as e:  # kept as a result (an lr sweep expects some), flagged in every table
        print(
            f"{spec.label} seed {seed}: the loss became {e.loss} at step {e.step}: scored as it stands, marked "
            f"diverged (try a lower lr)",
            flush=True,
        )
        trained = e.result
        out["status"] = "diverged"
    if trained.skipped_updates:
        print(
            f"{spec.label} seed {seed}: {trained.skipped_updates} of {tcfg.steps} updates skipped (gradient not finite)",
            flush=True,
        )
    warm = len(trained.step_times) // 10  # the first tenth warms up the allocator and caches: left out
    # no step time at all only when the loss was not finite at the very first step: NaN then (the run is flagged diverged)
    out["memory"] = memory_record(setup.device, saved)
    out.update(
        train_seconds=time.perf_counter() - t0,
        steps=tcfg.steps,
        resumed_from_step=trained.resumed_from,
        skipped_updates=trained.skipped_updates,
        losses=trained.losses,
        volatility=volatility(trained.losses),
        step_time=statistics.median(trained.step_times[warm:] or trained.step_times or [float("nan")]),
    )
    return out


def merge_check(model, setup, cfg, scores, full_merge):
    """Merge a copy of the adapted model and measure what merging changed: the largest logit difference on the
    probe batch, and on the first seed every item's score and the throughput of the base, unmerged and merged."""
    x, lengths = logit_probe_batch(setup.tokenizer, setup.splits)
    merged = merge_adapters(copy.deepcopy(model))
    out = {
        "merged_adapter_layers": len(adapter_layers(merged)),  # 0: the merged model is plain nn.Linear
        "max_logit_diff": (real_logits(merged, x, lengths) - real_logits(model, x, lengths)).abs().max().item(),
    }
    if full_merge:
        speed = forward_throughput({"base": setup.base_model, "unmerged": model, "merged": merged}, x)
        out["eval_tokens_per_s"], out["merged_eval_tokens_per_s"] = speed["unmerged"], speed["merged"]
        out["base_eval_tokens_per_s"] = speed["base"]
        merged_scores = task_scores(
            evaluate_items(merged, setup.tokenizer, setup.splits, setup.tasks, split=cfg.split),
            setup.tasks,
            cfg.scoring,
        )
        out["merge_gap_pp"] = {k: 100 * (scores[k] - merged_scores[k]) for k in scores}
    return out


def positions_in(get_batch, steps, pad_id):
    """{"positions", "padding"} over a run's batches: every (row, position) computed, and those that hold a pad (the
    pad token never occurs in an item), from the batches themselves (cheap to rebuild: they depend on the step)."""
    positions = padding = 0
    for step in range(steps):
        x = get_batch(step)[0]
        positions += x.numel()
        padding += int((x == pad_id).sum())
    return {"positions": positions, "padding": padding}


def volatility(losses):
    """Training-loss volatility: the standard deviation of step-to-step changes of the loss over the second half
    of training, where the schedule no longer drives the loss down fast (nan for fewer than 4 steps)."""
    second_half = np.asarray(losses[len(losses) // 2 :])
    return float(np.std(np.diff(second_half))) if len(second_half) > 2 else float("nan")
