"""The settings of a comparison, resolved once: CompareConfig (every knob, with its default), the presets (`make
compare`, `make ablate`, `make replicate`), the training budget, the tuned learning rates, and `resolve`, which checks
every setting before any work and turns them into one Settings object that every stage reads (none re-derives it).

Seeds: 0-99 are reported seeds; 100 and above are development seeds, on which anything chosen from results (a learning
rate, a budget, a task's difficulty) is chosen, always on validation items (see tune.py).

Files the settings name are found from the repository root (files.io.repo_root: D2LORA_MIN_ROOT, else the current
folder or this checkout, whichever holds the shipped base).
"""

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tiny_gpt import GPT, GPTConfig

from ..files.io import read_json, repo_root
from ..nn import METHODS
from ..nn.inject import find_targets
from .cli import UsageError, check_range
from .data import steps_for
from .pretrain import PretrainConfig, check_pretrain_config, corpus_fingerprint
from .specs import SHARED_LR, TARGET_GROUPS, check_listed_once, parse_method_spec, roles
from ..synthetic.tasks import TASKS
from .trainer import TrainConfig, check_train_config, pick_device, rank_and_world


ROOT = repo_root()
PUBLISHED = ROOT / "docs" / "results"  # what the README and docs/RESULTS.md show (written with --publish)
TUNED_FILE = PUBLISHED / "tuned_lrs.json"  # the tuned learning rates, committed (make tune ARGS=--publish)
DEV_SEEDS = (100, 101, 102, 103)  # development seeds: what `make tune` (and any choice of defaults) runs on


def preset(name, r=4):
    """{"methods", "reference"[, "seeds"]} of a preset, its roles derived from the rank r."""
    compared, parity = tuple(roles(r).values()), roles(r)["LoRA(2r)"]
    if name == "default":
        return {"methods": ("base", *compared), "reference": parity}
    if name == "replicate":  # the claims at tuned lrs, and the same methods at the shared lr (the sensitivity table)
        shared = tuple(roles(r, SHARED_LR).values())
        return {"methods": compared + shared, "reference": parity, "seeds": tuple(range(28))}
    # ablate: D2-LoRA's open design questions, each against the default (the paper's form, tau 0.5 fixed, attached
    # norm, q, k, v, o): one variant per question
    variants = (
        "d2lora:readd_delta=false",  # the exact-norm form: W = P(V), every row exactly at norm(W0_i)
        "d2lora:tau_init=1.0",  # tau fixed at 1.0 (better on one backbone, per a review)
        "d2lora:tau_init=0.0",  # tau fixed at 0: no negative branch
        "d2lora:learn_tau=true",  # tau learned from 0.5
        "d2lora:detach_norm=true",  # norm(V) treated as a constant in backward, as DoRA does
        "d2lora:targets=all",  # every linear (q, k, v, o, fc_in, fc_out) instead of q, k, v, o
    )
    return {"methods": ("d2lora", *variants), "reference": "d2lora", "seeds": tuple(range(16))}


PRESETS = ("default", "ablate", "replicate")


def default_train_config():
    # steps, warmup_steps and checkpoint_every follow from the budget (n_train x epochs): see Settings.train
    return TrainConfig(batch_size=32, lr=SHARED_LR, min_lr_ratio=0.1, weight_decay=0.0, desc="fine-tune")


@dataclass
class CompareConfig:
    methods: tuple = preset("default")["methods"]  # method specs (specs.py); the preset's for its rank r by default
    reference: str = roles(4)["LoRA(2r)"]  # every other method's difference is taken from this one (paired, same seeds)
    seeds: tuple = (0, 1, 2, 3, 4)  # reported seeds (0-99); defaults are chosen on development seeds (DEV_SEEDS)
    r: int = 4  # rank when a spec does not say
    alpha_over_r: float = 2.0  # alpha = alpha_over_r * r unless a spec sets alpha: the same scaling at every rank
    targets: tuple = TARGET_GROUPS["attn"]  # module-name suffixes to adapt: q, k, v, o, as the paper
    tasks: tuple = tuple(TASKS)  # embedded task names, or one folder of <task>.jsonl files (own/tasks.py)
    n_train: int = 160  # training items per task
    epochs: int = 3  # passes over them: steps = epochs * ceil(n_tasks * n_train / batch_size)
    n_test: int = 500  # test items per task (what is reported)
    n_validation: int = 200  # validation items per task (what `make tune` chooses on)
    split: str = "test"  # which items the runs are scored on: "test", or "validation" (development work)
    lr_source: str = "tuned"  # a method's lr unless its spec sets one: "tuned" (tuned_file, if it has it) or "shared"
    tuned_file: str = str(TUNED_FILE)  # the tuned learning rates (written by make tune ARGS=--publish)
    scoring: str = "task"  # multiple-choice scorer: "task" (each task's own), "sum" or "mean" log-likelihood
    warmup_frac: float = 0.1  # warmup as a fraction of the run's steps
    checkpoints: int = 4  # checkpoints per run (what a killed run resumes from)
    full_lr: float = 1e-3  # learning rate of `full` fine-tuning unless its spec sets lr
    packed: bool = True  # pack a step's items into rows (no compute on padding); False: one item per padded row
    fused: bool = False  # DoRA and D2-LoRA through the opt-in fused path (nn/fused.py) instead of their forward()
    train: TrainConfig = field(default_factory=default_train_config)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # which base (the shipped one by default)
    # your own model and data (own/): a local Hugging Face causal LM as the base, instead of the tiny GPT (model.py)
    model: Optional[str] = None
    model_context: int = 1024  # with --model: the longest sequence the harness builds (at most the model's positions)
    heldout_text: Optional[str] = None  # UTF-8 text: retention is the loss on it (else the world's text, or skipped)


def apply_preset(cfg, name):
    """cfg with the preset's methods, reference and seeds (its roles at cfg.r)."""
    chosen = preset(name, cfg.r)
    cfg.methods, cfg.reference = chosen["methods"], chosen["reference"]
    cfg.seeds = chosen.get("seeds", cfg.seeds)
    return cfg


def budget(cfg: CompareConfig, n_items=None):
    """The trainer's settings for one fine-tuning run: steps from the budget (n_items training items, n_train per task
    unless given), warmup and checkpoint intervals as fractions of them (so a short run is not all warmup)."""
    tcfg = copy.deepcopy(cfg.train)
    tcfg.steps = steps_for(len(cfg.tasks) * cfg.n_train if n_items is None else n_items, cfg.epochs, tcfg.batch_size)
    tcfg.warmup_steps = max(1, round(cfg.warmup_frac * tcfg.steps))
    tcfg.checkpoint_every = max(1, math.ceil(tcfg.steps / cfg.checkpoints))
    return tcfg


@dataclass
class Settings:
    """Everything a comparison's stages read, derived once from the config by resolve()."""

    cfg: CompareConfig
    specs: list  # the parsed method specs, each with its learning rate
    train: TrainConfig  # one run's trainer settings (the budget's steps, warmup, checkpoint interval)
    device: str
    processes: int  # under torchrun, the number of processes
    tuned: dict  # the tuned learning rates file ({} when no spec reads it)
    corpus: str  # the corpus fingerprint (part of every run key)
    tasks: dict  # {name: Task}: the embedded tasks, or the task folder's
    counts: dict  # {task: {"train", "validation", "test": items}}
    own: object = None  # own.session.Own: your model, task folder or held-out text (None: the shipped base and tasks)

    @property
    def reference(self):
        return next(s for s in self.specs if s.text == self.cfg.reference)

    def runs(self):
        """(spec, seed) of every run: the base runs once (it is not trained, so seeds would repeat it)."""
        return [(s, seed) for s in self.specs for seed in (self.cfg.seeds if s.name != "base" else self.cfg.seeds[:1])]

    @property
    def protocol(self):
        return protocol(self.cfg, self.own.protocol if self.own else None)

    def describe(self):
        """The tasks and their training items, as announce and the report say them."""
        if self.own and self.own.folder:
            return f"{len(self.tasks)} tasks from files, {sum(c['train'] for c in self.counts.values())} training items"
        return f"{len(self.tasks)} tasks x {self.cfg.n_train} training items"


def protocol(cfg, own=None):
    """The settings a tuned lr holds for (own: what your model and task files add): compare notes other settings."""
    budget = dict(tasks=list(cfg.tasks), n_train=cfg.n_train, epochs=cfg.epochs, batch_size=cfg.train.batch_size)
    return {**budget, "targets": list(cfg.targets), "r": cfg.r, "alpha_over_r": cfg.alpha_over_r, "packed": cfg.packed,
            "base": cfg.pretrain.key(), **(own or {})}  # fmt: skip


# Upper bounds of the settings whose huge values would hang or allocate for minutes before failing.
MAX_ITEMS = 100_000  # n_train and n_test per task
MAX_EPOCHS = 1_000
MAX_SEED = 2**32 - 1  # seeds are combined with step and epoch numbers into 64-bit generator seeds
RANGES = dict(n_train=MAX_ITEMS, epochs=MAX_EPOCHS, n_test=MAX_ITEMS, n_validation=MAX_ITEMS, checkpoints=MAX_EPOCHS)
CHOICES = {"lr_source": ("tuned", "shared"), "split": ("test", "validation"), "scoring": ("task", "sum", "mean")}


# What a comparison derives itself, and so refuses as a setting (its help leaves them out): the budget's steps
# and intervals, and each run's seed.
DERIVED = ("train.steps", "train.warmup_steps", "train.checkpoint_every", "train.seed", "train.desc")


def resolve(cfg: CompareConfig):
    """Check every setting of a comparison before any work -> Settings; a UsageError naming the first one wrong."""
    from ..own.session import resolve_own  # your model, task folder or held-out text: a copy of cfg and Own, or None

    check_pretrain_config(cfg.pretrain, "pretrain")  # the base the runs start from (pretrained anew if it differs)
    cfg, own = resolve_own(cfg)  # (every line of a task folder checked)
    known = own.tasks if own and own.folder else TASKS
    check_lists(cfg, known)
    # the base's width and module names, to check every rank and target against (a --model's on the meta device)
    width, skeleton = (own.width, own.skeleton) if own and own.model else (cfg.pretrain.model.d_model, None)
    check_range("r", cfg.r, 1, width)  # before any spec builds a layer of that rank
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise UsageError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {getattr(cfg, name)!r}")
    specs = [parse_method_spec(m, cfg, width=width) for m in cfg.methods]
    tuned = {}
    if cfg.lr_source == "tuned" and any(s.lr_from == "shared" and s.name in METHODS for s in specs):  # one reads it
        tuned = load_tuned(cfg.tuned_file)
        specs = [parse_method_spec(m, cfg, tuned["lrs"], width) for m in cfg.methods]
    check_listed_once(specs)
    check_range("alpha_over_r", cfg.alpha_over_r, kind=float)
    if cfg.alpha_over_r <= 0:
        raise UsageError(f"alpha_over_r must be > 0, got {cfg.alpha_over_r}")
    skeleton = model_skeleton(cfg.pretrain.model) if skeleton is None else skeleton
    targets_of = [(f"targets in {s.text!r}", s.targets) for s in specs if s.name in METHODS]
    for where, targets in [("targets", cfg.targets)] + targets_of:
        try:
            find_targets(skeleton, targets)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{where}: {e}") from None
    for name, high in RANGES.items():
        check_range(name, getattr(cfg, name), 1, high)
    check_range("warmup_frac", cfg.warmup_frac, 0.0, 0.5, kind=float)
    check_range("full_lr", cfg.full_lr, kind=float)
    if cfg.full_lr <= 0:
        raise UsageError(f"full_lr must be > 0, got {cfg.full_lr}")
    default = TrainConfig()
    derived = ("steps", "warmup_steps", "checkpoint_every")
    if any(getattr(cfg.train, k) != getattr(default, k) for k in derived):
        raise UsageError("train.steps, train.warmup_steps and train.checkpoint_every follow from the budget: set "
                         "--n_train, --epochs, --warmup_frac, --checkpoints")  # fmt: skip
    if cfg.train.seed != default.seed:
        raise UsageError("--train.seed is not used by compare: each run's seed comes from --seeds")
    check_range("train.batch_size", cfg.train.batch_size, 1, MAX_ITEMS)  # before the budget divides by it
    tasks = {name: known[name] for name in cfg.tasks}
    each = dict(train=cfg.n_train, validation=cfg.n_validation, test=cfg.n_test)  # items per task and split
    counts = own.counts if own and own.folder else {name: dict(each) for name in tasks}
    n_items = sum(c["train"] for c in counts.values())  # training items over all tasks
    train = check_train_config(budget(cfg, n_items))
    _, processes = rank_and_world()
    last = n_items % train.batch_size  # the items of an epoch's last, smaller step
    if processes > 1 and 0 < last < processes:
        raise UsageError(f"an epoch's last step has {last} items, fewer than the {processes} processes: choose "
                         f"n_train or batch_size so that every process gets a row")  # fmt: skip
    device, corpus = pick_device(cfg.train.device), corpus_fingerprint(cfg.pretrain.corpus)
    return Settings(cfg, specs, train, device, processes, tuned, corpus, tasks, counts, own)


def check_lists(cfg: CompareConfig, known=TASKS):
    """The methods, the reference, the seeds and the tasks (`known`: {name: Task}): given, each once, within range (the
    methods each once by what they run, however written: check_listed_once, once they are parsed)."""
    for name in ("methods", "seeds", "tasks"):
        if not getattr(cfg, name):
            raise UsageError(f"no {name} given")
    if cfg.reference not in cfg.methods:
        choose = "add it to --methods or choose one of them with --reference"
        raise UsageError(f"the reference {cfg.reference!r} is not among the methods {list(cfg.methods)}: {choose}")
    for seed in cfg.seeds:
        check_range("seeds", seed, 0, MAX_SEED)
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise UsageError(f"a seed is listed twice: {list(cfg.seeds)} (a repeated seed would fake a narrow interval)")
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        raise UsageError(f"unknown task {unknown[0]!r}; valid tasks: {', '.join(known)}, or a folder of <task>.jsonl")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise UsageError(f"a task is listed twice: {list(cfg.tasks)}")


TUNED_KEY = re.compile(r"([A-Za-z0-9_]+)(?::r=([1-9][0-9]*))?")  # what MethodSpec.tuned_key gives: lora, lora:r=8


def load_tuned(path, required=True):
    """The tuned learning rates file ({"lrs": {"lora": ..., ...}, and how they were chosen}). A UsageError for a file
    that cannot be read or is not one, and for a missing one when `required` (else {"lrs": {}})."""
    if not str(path).strip():  # Path("") is ".", the current folder: say what was given
        raise UsageError(f"tuned_file is empty: give the file that `make tune ARGS=--publish` wrote, or leave out "
                         f"--tuned_file for the committed one ({TUNED_FILE})")  # fmt: skip
    path = Path(path)
    try:
        tuned = read_json(path)
    except FileNotFoundError:
        if not required:
            return {"lrs": {}}
        raise UsageError(
            f"no tuned learning rates at {path}: give the file that `make tune ARGS=--publish` wrote "
            f"(--tuned_file=...), or run every method at the shared lr (--lr_source=shared)"
        ) from None
    except (ValueError, OSError) as e:  # a folder, a FIFO, a device, not JSON; a path through a file, no permission
        raise UsageError(f"tuned learning rates {path}: not readable ({e})") from None
    try:
        if not isinstance(tuned, dict) or not isinstance(tuned.get("lrs"), dict):
            raise ValueError('it must hold {"lrs": {method: learning rate}}')
        lrs = tuned["lrs"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in lrs.values()):
            raise ValueError("lrs must map method names to learning rates in (0, 1)")
        if not isinstance(tuned.get("protocol", {}), dict):
            raise ValueError("protocol must be a mapping of settings")
        rank = tuned.get("protocol", {}).get("r")  # the rank a bare name ("lora") was tuned at
        rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else CompareConfig.r
        keys = {}
        for key in lrs:
            written = TUNED_KEY.fullmatch(key)
            if not written:
                raise ValueError(f"{key!r} is not a method name or name:r=rank (e.g. lora, lora:r=8)")
            method = (written[1], int(written[2]) if written[2] else rank)
            if method in keys:  # one would be used and the other silently ignored
                raise ValueError(f"{keys[method]!r} and {key!r} both give the lr of {method[0]} at rank {method[1]}")
            keys[method] = key
    except ValueError as e:
        raise UsageError(
            f"tuned learning rates {path}: not readable ({e}); restore it with `git checkout -- {path}` if "
            f"it is the committed one, or regenerate it with `make tune ARGS=--publish`"
        ) from None
    return tuned


def model_skeleton(model_cfg):
    """A GPT with the base's layers and names but 1-wide tensors: what targets are checked against, at no cost."""
    return GPT(GPTConfig(2, block_size=2, n_layer=model_cfg.n_layer, n_head=1, d_model=1, bias=model_cfg.bias))
