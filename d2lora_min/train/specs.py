"""Method specs: how a comparison names what it runs, `name[:key=value,...]`.

    "lora"                    LoRA at the comparison's rank (r), alpha = alpha_over_r * r, the comparison's targets
    "d2lora:r=8,project=false" D2-LoRA at rank 8 without the projection
    "dora:lr=5e-3"            DoRA at its own learning rate

Names: the adapters in d2lora_min.nn.METHODS, plus `base` (the pretrained model, not fine-tuned) and `full` (every
parameter fine-tuned). Keys: r, alpha, dropout, lr, targets (attn, mlp, all, or module names joined by +), and the
method's own options (d2lora: tau_init, learn_tau, project, readd_delta, detach_norm). Every value is checked when
it is parsed (a bool is true or false). A comparison lists each method once by what it runs (MethodSpec.identity):
"lora" and "lora:r=4" are one method listed twice.
"""

import re
from dataclasses import dataclass

import torch.nn as nn

from ..nn import DEFAULT_TARGETS, METHODS, display_name
from ..nn.inject import check_targets
from .cli import UsageError, check_range, parse_value


SHARED_LR = 1e-2  # the shared learning rate: the trainer's default, and every method's with --lr_source=shared


def roles(r, lr=None):
    """The four methods the paper compares, derived from the comparison's rank r -> {role: spec}; with lr, each at
    that learning rate (its spec sets lr=)."""
    specs = {"LoRA(r)": "lora", "LoRA(2r)": f"lora:r={2 * r}", "DoRA(r)": "dora", "D2-LoRA(r)": "d2lora"}
    return specs if lr is None else {role: with_lr(spec, lr) for role, spec in specs.items()}


def with_lr(spec, lr):
    """The spec at learning rate lr: "lora" -> "lora:lr=0.01", "lora:r=8" -> "lora:r=8,lr=0.01"."""
    return f"{spec}{',' if ':' in spec else ':'}lr={lr:g}"


# Module groups a method spec can name as targets=...
TARGET_GROUPS = {"all": DEFAULT_TARGETS, "attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("fc_in", "fc_out")}


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
    lr_from: str = (
        "shared"  # where lr comes from: "spec" (its own lr=, shown in the label), "tuned", "shared", "full_lr"
    )
    default_r: int = 4  # the comparison's rank (what tuned_key leaves out)
    default_targets: tuple = DEFAULT_TARGETS  # the comparison's targets (what the label leaves out)

    @property
    def lr_set(self):
        return self.lr_from == "spec"

    @property
    def identity(self):
        """What the spec runs and where its learning rate comes from, however it is written: "lora" and "lora:r=4"
        (at the default rank 4) have one identity, and so have "lora:lr=0.01" and "lora:lr=1e-2"; "lora" and
        "lora:lr=0.01" do not (the tuned or shared lr, and a spec's own: two roles, even when the values agree)."""
        options = {
            **(METHODS[self.name].OPTIONS if self.name in METHODS else {}),
            **self.options,
        }  # defaults written out
        lr = ("lr", self.lr) if self.lr_set else ("lr from", self.lr_from)
        return (self.name, self.r, self.alpha, self.dropout, self.targets, tuple(sorted(options.items())), lr)

    @property
    def tuned_key(self):
        """The name a tuned learning rate is stored under: the method at its rank ("lora", "lora:r=8"); variants of
        a method (other options, targets) run at their method's tuned lr."""
        return self.name if self.r == self.default_r else f"{self.name}:r={self.r}"

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
        if self.targets != self.default_targets:
            extra["targets"] = next((g for g, t in TARGET_GROUPS.items() if t == self.targets), "+".join(self.targets))
        opts = "".join(f", {k}={v}" for k, v in extra.items())
        return f"{display_name(self.name)}(r={self.r}{opts})"


def split_methods(text):
    """--methods as a list of specs, separated by spaces, ';' or commas: "lora dora", "lora,dora", "lora, dora". A
    comma also separates a spec's own keys ("d2lora:r=8,project=false"), so a key=value piece after a comma continues
    the spec before it, if that spec has keys of its own (a ':')."""
    specs = []
    for word in re.sub(r",\s+", ",", text.strip()).replace(";", " ").split():
        previous = None  # the spec this word's last piece started, for its keys
        for piece in word.split(","):
            if not piece:
                raise UsageError(f"--methods {text!r} has an empty item (two commas in a row, or a comma at an end)")
            if "=" in piece.partition(":")[0]:  # key=value, no method name before it
                if previous is None or ":" not in specs[previous]:
                    raise UsageError(
                        f"{piece!r} in --methods {text!r} is not a method; a method's keys follow it after a "
                        f"colon, e.g. lora:r=8,lr=1e-3"
                    )
                specs[previous] += "," + piece
            else:
                specs.append(piece)
                previous = len(specs) - 1
    return specs


COMMON_KEYS = {"r": 1, "alpha": 1.0, "dropout": 0.0, "lr": 1.0, "targets": ""}  # key -> a value of its type


def parse_targets(text, where):
    if text not in TARGET_GROUPS and not all(text.split("+")):
        raise UsageError(f"targets in {where}: {text!r} has an empty module name (a '+' doubled, or at an end)")
    targets = TARGET_GROUPS.get(text) or tuple(text.split("+"))
    try:
        return check_targets(targets)
    except (ValueError, TypeError) as e:
        raise UsageError(f"targets in {where}: {e}") from None


def parse_method_spec(text, cfg, tuned=None, width=None):
    """'d2lora:r=8,project=false' -> MethodSpec; a UsageError naming the spec and the key otherwise. width: the base's
    (what a rank is bounded by; the tiny GPT's d_model unless given).

    The learning rate: the spec's own lr= if it sets one; else, with cfg.lr_source == "tuned", the tuned lr of its
    method at its rank from `tuned` ({"lora": 0.0056, "lora:r=8": ...}, see tune.py) when there is one; else the shared
    cfg.train.lr (cfg.full_lr for full fine-tuning)."""
    name, colon, rest = text.strip().partition(":")
    valid_names = list(METHODS) + ["base", "full"]
    if name not in valid_names:
        raise UsageError(f"unknown method {name!r} in {text!r}; valid methods: {', '.join(valid_names)}")
    if colon and not rest:
        raise UsageError(f"{text!r} has a colon but no key=value after it; write {name!r} alone for its defaults")
    option_defaults = METHODS[name].OPTIONS if name in METHODS else {}
    common = {
        "r": cfg.r,
        "alpha": None,
        "dropout": 0.0,
        "lr": cfg.full_lr if name == "full" else cfg.train.lr,
        "targets": cfg.targets,
    }
    options, seen = {}, set()
    takes = {"base": (), "full": ("lr",)}.get(name)  # the keys base and full take (they have no adapter)
    for pair in rest.split(",") if rest else []:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"{pair!r} in {text!r} is not key=value")
        if key in seen:
            raise UsageError(f"{key!r} is given twice in {text!r}")
        seen.add(key)
        if takes is not None and key not in takes:
            raise UsageError(f"{name!r} takes {'only lr' if takes else 'no keys'}, got {key!r} in {text!r}")
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
    lr_from = "spec" if lr_set else "full_lr" if name == "full" else "shared"
    spec = MethodSpec(
        text,
        name,
        common["r"],
        float(alpha),
        float(common["dropout"]),
        float(common["lr"]),
        tuple(common["targets"]),
        options,
        lr_from,
        cfg.r,
        tuple(cfg.targets),
    )
    if lr_from == "shared" and name in METHODS and cfg.lr_source == "tuned" and spec.tuned_key in (tuned or {}):
        spec.lr, spec.lr_from = float(tuned[spec.tuned_key]), "tuned"
    check_range(f"lr in {text!r}", spec.lr, kind=float)
    if spec.lr <= 0:
        raise UsageError(f"lr in {text!r} must be > 0, got {spec.lr}")
    width = width or cfg.pretrain.model.d_model
    if name in METHODS and isinstance(spec.r, int) and spec.r > width:  # before the stand-in allocates r numbers
        raise UsageError(f"r in {text!r} is {spec.r}: larger than the model's width ({width})")
    if name in METHODS:  # every value checked now, by building the layer around a 1x1 stand-in (no real work)
        try:
            METHODS[name](nn.Linear(1, 1), r=spec.r, alpha=spec.alpha, dropout=spec.dropout, **options)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{text!r}: {e}") from None
    return spec


LR_FROM = {"spec": "", "tuned": " at its tuned lr", "shared": " at the shared lr", "full_lr": " at full_lr"}


def check_listed_once(specs):
    """No method twice by what it runs, however written: the same method twice would compare a run with itself."""
    listed = {}  # identity -> the first spec with it
    for s in specs:
        if s.identity in listed:
            source = "" if s.name == "base" else LR_FROM[s.lr_from]  # the base is not trained: no lr
            raise UsageError(f"a method is listed twice: {listed[s.identity]!r} and {s.text!r} are the same method, "
                             f"settings and learning rate ({s.label}{source})")  # fmt: skip
        listed[s.identity] = s.text
