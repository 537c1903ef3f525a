"""The glue between your own model and data and the harness: what --model DIR, --tasks DIR and --heldout_text FILE
change, in one place, so that the harness itself keeps one path.

    d2lora compare --model DIR --tasks DIR      # a local Hugging Face causal LM (model.py), tasks from JSONL (tasks.py)
    d2lora tune --model DIR --tasks DIR         # its tuned file: runs/tune/tuned_lrs.json, never the package's

- defaults(): in compare's and tune's main, before anything is resolved: the settings a --model or --tasks DIR run
  would ignore are refused (item counts, pretraining, --publish), and the architecture's default targets are taken
  unless --targets is given.
- resolve_own(): called once by settings.resolve, before any work: reads and checks every line of the task folder
  and the model folder, the item counts, the model's width and module names, what the run key adds, and where the
  learning rates come from: a compare uses runs/tune/tuned_lrs.json when a tune of the same protocol wrote it (or
  another --tuned_file), else the shared lr for every method, and says which; the package's tuned lrs belong to the
  shipped base and are never read here. Nothing of it exists for the shipped base and tasks (Settings.own is None).
- prepare(): the Setup of a comparison: the model, the task splits, every item's length checked against the model's
  context (file:line for a file task), the retention probe (the loss on --heldout_text, or skipped with a note).
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files.io import sha256_file
from ..synthetic.tasks import TASKS
from ..synthetic.world import World
from ..train.cli import UsageError, check_range, overridden
from ..train.data import EOT, read_text_file
from ..train.settings import TUNED_FILE, load_tuned, protocol
from ..train.tasks import answer_text, build_splits
from ..train.trainer import rank_and_world
from . import model as own_model
from .tasks import FileTask, item_line, read_folder

TUNED_BESIDE_RUNS = Path("runs/tune/tuned_lrs.json")  # where `make tune` on your model and tasks writes its choice


def task_folder(cfg):
    """The folder --tasks names, or None: a single value that is no embedded task's name and a folder (or a path)."""
    (name, *more) = cfg.tasks or ("",)
    return name if name and not more and name not in TASKS and ("/" in name or Path(name).is_dir()) else None


def width_of(cfg):
    """The base's width (what a rank is bounded by): the --model's hidden size, else the tiny GPT's d_model."""
    return own_model.width(cfg.model) if cfg.model else cfg.pretrain.model.d_model


def defaults(cfg, overrides, tuning=False, publish=False):
    """The checks and defaults that depend on which settings were given (`overrides`, the command line's), before
    anything is resolved -> cfg (its targets the architecture's default for a --model without --targets)."""
    folder, given = task_folder(cfg), overridden(overrides)
    counts = sorted(given & {"n_train", "n_test", "n_validation"})
    if folder and counts:
        raise UsageError(f"--{counts[0]} with --tasks DIR: the task files decide the items (every line is used); "
                         f"keep the ones you want in the files")  # fmt: skip
    if cfg.model and any(g.startswith("pretrain.") for g in given):
        raise UsageError("--pretrain.* settings with --model: the base is your model; leave them out")
    if (cfg.model or folder) and publish:
        raise UsageError(
            "--publish writes into the package (docs/results/, and for tune its tuned lrs): on your model or "
            "tasks everything stays in --out (a tune's choice in <out>/tuned_lrs.json)"
        )
    if cfg.model and "targets" not in given:
        config, skeleton = own_model.skeleton(cfg.model)
        cfg.targets = own_model.default_targets(config, skeleton)
        if not tuning:
            print(
                f"targets: {', '.join(cfg.targets)} ({config.model_type}'s default; --targets=a,b chooses)", flush=True
            )
    return cfg


@dataclass
class Own:
    """What your model, tasks and held-out text resolve to (Settings.own): derived once, read by every stage."""

    model: str = None  # the model folder, or None (the tiny GPT base)
    folder: str = None  # the task folder, or None (the embedded tasks)
    tasks: dict = None  # {name: FileTask} of the folder
    counts: dict = None  # {task: {split: items}} of the folder's tasks
    width: int = 0  # what a rank is bounded by
    skeleton: object = None  # the model's modules on the meta device (what targets are checked against), or None
    key: dict = field(default_factory=dict)  # what the run key adds ({"user": {...}})
    protocol: dict = field(default_factory=dict)  # what the tuned lrs' protocol adds (held-out text trains nothing)
    notes: list = field(default_factory=list)  # lines announce prints


def resolve_own(cfg):
    """-> (cfg, Own), or (cfg, None) for the shipped base and tasks without --heldout_text. cfg comes back as a copy
    with the task files' names as its tasks and its learning-rate source decided; the caller's is left as it was."""
    folder = task_folder(cfg)
    if not (cfg.model or folder or cfg.heldout_text):
        return cfg, None
    own = Own(model=cfg.model, folder=folder, width=width_of(cfg))
    if folder:
        own.tasks = read_folder(folder)
        cfg = dataclasses.replace(cfg, tasks=tuple(own.tasks))
        own.counts = {name: task.counts for name, task in own.tasks.items()}
        for task in own.tasks.values():
            for split in ("train", cfg.split):
                if not task.counts[split]:
                    raise UsageError(f"{task.source}: no {split} items (a comparison trains on train items and scores "
                                     f"{cfg.split} items)")  # fmt: skip
    check_range("model_context", cfg.model_context, 8, 65536)
    if cfg.heldout_text:
        try:
            read_text_file(cfg.heldout_text)
        except (OSError, ValueError) as e:
            raise UsageError(f"--heldout_text: {e}") from None
    if cfg.model:
        own.skeleton = own_model.skeleton(cfg.model)[1]
    if cfg.model or folder:  # (nothing for the held-out text alone: the shipped base and tasks keep their keys)
        model = own_model.model_digest(str(Path(cfg.model))) if cfg.model else None
        tasks = {name: task.sha256 for name, task in (own.tasks or {}).items()}
        own.protocol = {"user": dict(tasks=tasks, context=cfg.model_context, model=model)}
    heldout = {"heldout_text": sha256_file(cfg.heldout_text)} if cfg.heldout_text else {}
    own.key = {"user": {**own.protocol.get("user", {}), **heldout}}
    if (cfg.model or folder) and cfg.lr_source == "tuned" and cfg.tuned_file == str(TUNED_FILE):
        cfg = choose_lr_source(cfg, own)
    return cfg, own


def choose_lr_source(cfg, own):
    """Tuned lrs from a tune of this very protocol (runs/tune/tuned_lrs.json), else the shared lr -> cfg (a copy)."""
    found = load_tuned(TUNED_BESIDE_RUNS, required=False) if TUNED_BESIDE_RUNS.is_file() else {"lrs": {}}
    if found["lrs"] and found.get("protocol") == protocol(cfg, own.protocol):
        own.notes.append(f"learning rates: tuned, from {TUNED_BESIDE_RUNS} (a tune of this model, tasks and budget)")
        return dataclasses.replace(cfg, tuned_file=str(TUNED_BESIDE_RUNS))
    own.notes.append(
        f"learning rates: every method at the shared lr {cfg.train.lr:g} (the package's tuned lrs belong to the "
        f"shipped base; `make tune` with the same arguments writes {TUNED_BESIDE_RUNS}, which compare then uses)"
    )
    return dataclasses.replace(cfg, lr_source="shared")


def prepare(settings):
    """The fields of compare.Setup on your model, tasks or held-out text."""
    from ..train.compare import embedded_probe
    from ..train.pretrain import resolve_base

    cfg, own, device = settings.cfg, settings.own, settings.device
    if own.model:
        model, tokenizer, meta, base_dir = own_model.load(own.model, cfg.model_context, device)
    else:
        model, tokenizer, meta, base_dir = resolve_base(cfg.pretrain)
    world = World(seed=cfg.pretrain.corpus.world_seed, n_people=cfg.pretrain.corpus.n_people)
    if own.folder:
        splits = {name: task.parts for name, task in settings.tasks.items()}
    else:
        splits = build_splits(world, settings.tasks, cfg.n_train, cfg.n_test, cfg.n_validation, seed=0)
    tasks = decoding_lengths(settings.tasks, tokenizer, splits)
    check_lengths(tasks, tokenizer, splits, model.config.block_size)
    say = print if rank_and_world()[0] == 0 else (lambda *a, **k: None)
    if cfg.heldout_text:
        eot = tokenizer.token_to_id(EOT)
        encoded = tokenizer.encode_batch([read_text_file(cfg.heldout_text)])
        tokens = [t for enc in encoded for t in enc.ids + [eot]]
        if len(tokens) < 2:
            raise UsageError(f"--heldout_text {cfg.heldout_text}: fewer than 2 tokens")
        probe = (np.asarray(tokens, dtype=np.int64), [])  # the loss on your text; no facts probe
        say(
            f"retention: the loss on {cfg.heldout_text} ({len(tokens)} tokens) before and after fine-tuning", flush=True
        )
    elif not own.folder:  # the embedded tasks: their world's held-out text and facts probe, as always
        probe = embedded_probe(world, tokenizer)
    else:
        probe = (None, [])
        say("retention: skipped (give held-out text with --heldout_text=FILE to measure it)", flush=True)
    return dict(base_model=model.to(device), tokenizer=tokenizer, base_meta=meta, base_dir=base_dir, tasks=tasks,
                splits=splits, probe=probe, device=device)  # fmt: skip


def decoding_lengths(tasks, tokenizer, splits):
    """The tasks, a generation file task without max_new_tokens in its settings given the length of its longest
    target and the newline that ends it, and at least 10 tokens (the embedded span task's) -> {name: Task}."""
    out = dict(tasks)
    for name, task in tasks.items():
        if task.kind == "gen" and isinstance(task, FileTask) and not task.max_new_tokens_set:
            items = [it for split in ("train", "validation", "test") for it in getattr(splits[name], split)]
            longest = max(len(tokenizer.encode(answer_text(it)).ids) for it in items)
            out[name] = dataclasses.replace(task, max_new_tokens=max(10, longest))
    return out


def check_lengths(tasks, tokenizer, splits, block):
    """Every item fits the model's context, before any training: a training item's prompt and answer, a
    multiple-choice prompt with its longest choice, a generation prompt with the tokens it may decode."""
    for name, task in tasks.items():
        for split in ("train", "validation", "test"):
            for i, it in enumerate(getattr(splits[name], split)):
                n = len(tokenizer.encode(it.prompt).ids)
                if split == "train":
                    n, what = n + len(tokenizer.encode(answer_text(it)).ids), "prompt and answer"
                elif task.kind == "mc":
                    n, what = n + max(len(tokenizer.encode(c).ids) for c in it.choices), "prompt and its longest choice"
                else:
                    n, what = n + task.max_new_tokens, f"prompt and {task.max_new_tokens} decoded tokens"
                if n > block:
                    raise UsageError(
                        f"{item_line(task, split, i)}: {what} take {n} tokens, more than the context of {block} "
                        f"(the model's positions, or --model_context)"
                    )
