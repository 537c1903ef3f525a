"""The settings of a comparison: CompareConfig (every knob, with its default), the presets (`make compare`,
`make ablate`, `make replicate`, the lr sweep), the training budget, and the check of every setting before any work.
"""

import copy
import math
from dataclasses import dataclass, field

from tiny_gpt import GPT, GPTConfig

from ..nn import DEFAULT_TARGETS, METHODS
from ..nn.inject import find_targets
from .cli import UsageError, check_range
from .pretrain import PretrainConfig, check_pretrain_config
from .specs import parse_method_spec
from .tasks import TASKS, steps_for
from .trainer import TrainConfig, check_train_config


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


def budget_train_config(cfg: CompareConfig):
    """The trainer's settings for one fine-tuning run: steps from the budget, warmup and checkpoint intervals as
    fractions of them (so a short run is not all warmup)."""
    tcfg = copy.deepcopy(cfg.train)
    tcfg.steps = steps_for(len(cfg.tasks) * cfg.n_train, cfg.epochs, tcfg.batch_size)
    tcfg.warmup_steps = max(1, round(cfg.warmup_frac * tcfg.steps))
    tcfg.checkpoint_every = max(1, math.ceil(tcfg.steps / cfg.checkpoints))
    return tcfg


# Upper bounds of the settings whose huge values would hang or allocate for minutes before failing.
MAX_ITEMS = 100_000  # n_train and n_test per task
MAX_EPOCHS = 1_000
MAX_SEED = 2**32 - 1  # seeds are combined with step and epoch numbers into 64-bit generator seeds


def check_compare_config(cfg: CompareConfig):
    """Every setting of a compare run, before any work -> the parsed method specs."""
    check_pretrain_config(cfg.pretrain, "pretrain")  # the base the runs start from (a new one is pretrained if it differs)
    if not cfg.methods:
        raise UsageError("no methods given")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise UsageError(f"a method is listed twice: {list(cfg.methods)}")
    check_range("r", cfg.r, 1, cfg.pretrain.model.d_model)  # before any spec builds a layer of that rank
    specs = [parse_method_spec(m, cfg) for m in cfg.methods]
    if not cfg.seeds:
        raise UsageError("no seeds given")
    for seed in cfg.seeds:
        check_range("seeds", seed, 0, MAX_SEED)
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise UsageError(f"a seed is listed twice: {list(cfg.seeds)} (a repeated seed would fake a narrow interval)")
    if not cfg.tasks:
        raise UsageError("no tasks given")
    for t in cfg.tasks:
        if t not in TASKS:
            raise UsageError(f"unknown task {t!r}; valid tasks: {', '.join(TASKS)}")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise UsageError(f"a task is listed twice: {list(cfg.tasks)}")
    check_range("alpha_over_r", cfg.alpha_over_r, kind=float)
    if cfg.alpha_over_r <= 0:
        raise UsageError(f"alpha_over_r must be > 0, got {cfg.alpha_over_r}")
    skeleton = model_skeleton(cfg.pretrain.model)  # the base's module names, to check every target against
    for where, targets in [("targets", cfg.targets)] + [(f"targets in {s.text!r}", s.targets) for s in specs if s.name in METHODS]:
        try:
            find_targets(skeleton, targets)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{where}: {e}") from None
    check_range("n_train", cfg.n_train, 1, MAX_ITEMS)
    check_range("epochs", cfg.epochs, 1, MAX_EPOCHS)
    check_range("n_test", cfg.n_test, 1, MAX_ITEMS)
    check_range("warmup_frac", cfg.warmup_frac, 0.0, 0.5, kind=float)
    check_range("checkpoints", cfg.checkpoints, 1, MAX_EPOCHS)
    check_range("full_lr", cfg.full_lr, kind=float)
    if cfg.full_lr <= 0:
        raise UsageError(f"full_lr must be > 0, got {cfg.full_lr}")
    if cfg.scoring not in ("task", "sum", "mean"):
        raise UsageError(f"scoring must be task, sum or mean, got {cfg.scoring!r}")
    if cfg.reference not in cfg.methods:
        raise UsageError(f"the reference {cfg.reference!r} is not among the methods {list(cfg.methods)}: add it to --methods "
                         f"or choose one of them with --reference")  # fmt: skip
    default = TrainConfig()
    if (cfg.train.steps, cfg.train.warmup_steps, cfg.train.checkpoint_every) != (default.steps, default.warmup_steps, default.checkpoint_every):
        raise UsageError("train.steps, train.warmup_steps and train.checkpoint_every follow from the budget: set --n_train, "
                         "--epochs, --warmup_frac, --checkpoints")  # fmt: skip
    check_range("train.batch_size", cfg.train.batch_size, 1, MAX_ITEMS)  # before the budget divides by it
    check_train_config(budget_train_config(cfg))
    return specs


def model_skeleton(model_cfg):
    """A GPT with the base's layers and names but 1-wide tensors: what targets are checked against, at no cost."""
    return GPT(GPTConfig(vocab_size=2, block_size=2, n_layer=model_cfg.n_layer, n_head=1, d_model=1, bias=model_cfg.bias))


def apply_preset(cfg, preset):
    settings = PRESETS[preset]
    cfg.methods, cfg.reference = settings["methods"], settings["reference"]
    cfg.seeds = settings.get("seeds", cfg.seeds)
    if preset == "lr":  # every method at every learning rate of the grid
        cfg.methods = tuple(f"{m}{',' if ':' in m else ':'}lr={lr:g}" for m in settings["methods"] for lr in LR_GRID)
        nearest = min(LR_GRID, key=lambda lr: abs(math.log(lr / cfg.train.lr)))  # a method of the sweep itself
        cfg.reference = f"lora:r=8,lr={nearest:g}"
    return cfg


