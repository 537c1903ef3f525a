"""A tiny command-line override parser for the config dataclasses: `--section.field=value` (or `--section.field value`).

    d2lora pretrain --train.steps=2000 --model.n_layer=3
    d2lora compare --lr_source=shared --train.lr=5e-3 --methods lora,d2lora:project=false

Values are parsed with the type of the field's default, so tests build the same configs in code. Every error
names the setting; `run_cli` turns them into usage errors (exit status 2, no traceback).
"""

import dataclasses
import errno
import math
import re
import sys

from ..files.io import Refused


class UsageError(Refused):
    """Bad command-line input or settings, found before any work."""


INT = re.compile(r"[+-]?[0-9]+")
FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def parse_value(text, like, name="value"):
    """Parse `text` as the type of `like` (bool, int, float, str, tuple/list of those, or None -> str)."""
    if isinstance(like, bool):  # one spelling (any case): true or false, not yes/on/1 or no/off/0
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise UsageError(f"{name}: expected true or false, got {text!r}")
    if isinstance(like, (tuple, list)):
        parts = [t.strip() for t in text.split(",")]
        if not text.strip() or not all(parts):
            raise UsageError(f"{name}: expected a comma-separated list without empty items, got {text!r}")
        return type(like)(parse_value(t, like[0], name) if like else t for t in parts)
    try:  # ASCII digits only: Python's int() and float() also take '1_6', '８' and 'infinity'
        if isinstance(like, int):
            if not INT.fullmatch(text.strip()):
                raise ValueError
            return int(text)
        if isinstance(like, float):
            value = float(text) if FLOAT.fullmatch(text.strip()) else math.nan
            if not math.isfinite(value):  # 1e400 overflows to inf
                raise ValueError
            return value
    except ValueError:
        kind = "an integer" if isinstance(like, int) else "a finite number"
        raise UsageError(f"{name}: expected {kind}, got {text!r}") from None
    return text


def pair_up(args):
    """['--a.b', '3', '--c=4'] -> ['--a.b=3', '--c=4']: the space-separated form becomes the '=' form."""
    out, i = [], 0
    while i < len(args):
        item = args[i]
        if "=" not in item and item.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{item}={args[i + 1]}")
            i += 2
        else:
            out.append(item)
            i += 1
    return out


def apply_overrides(config, overrides):
    """Set fields of the dataclass tree `config` from ["--section.field=value", ...]; clear error on unknown names."""
    for item in pair_up(list(overrides)):
        if "=" not in item or not item.startswith("--"):
            raise UsageError(f"{item!r} is not of the form --section.field=value (two dashes)")
        path, text = item[2:].split("=", 1)  # "section.field", "value"
        *parents, name = path.split(".")
        target = config
        for p in parents:
            if not dataclasses.is_dataclass(target) or not hasattr(target, p):
                raise UsageError(f"unknown config section {p!r} in {path!r}")
            target = getattr(target, p)
        fields = {f.name for f in dataclasses.fields(target)}
        if name not in fields:
            raise UsageError(f"unknown setting {path!r}; valid here: {', '.join(sorted(fields))}")
        if dataclasses.is_dataclass(getattr(target, name)):
            raise UsageError(f"{path!r} is a section; set one of its fields, e.g. --{path}.<field>=...")
        setattr(target, name, parse_value(text, getattr(target, name), path))
    return config


def overridden(overrides):
    """The setting paths a list of overrides sets: ["--train.lr=1", "--seeds", "3"] -> {"train.lr", "seeds"}."""
    return {item.split("=", 1)[0].lstrip("-") for item in pair_up(list(overrides)) if "=" in item}


def config_help(config, prefix="", derived=()):
    """One line per setting, written as the parser takes it back: --section.field=default (bools true/false, lists
    comma-separated). derived: the paths the command sets itself (not listed)."""
    lines = []
    for f in dataclasses.fields(config):
        value, path = getattr(config, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            lines += config_help(value, path + ".", derived)
        elif path not in derived:
            shown = str(value).lower() if isinstance(value, bool) else value
            shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else shown
            lines.append(f"  --{path}={shown}")
    return lines


def check_range(name, value, low=None, high=None, kind=int):
    """value is a `kind` (int: not a bool) within [low, high]; a UsageError naming the setting otherwise."""
    ok_type = (
        isinstance(value, kind) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
    )
    if not ok_type or (kind is float and not math.isfinite(value)):
        raise UsageError(f"{name} must be {'an integer' if kind is int else 'a finite number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise UsageError(f"{name} must be {span}, got {value!r}")
    return value


def run_cli(parser, body):
    """Run body() and turn what it raises into what a command-line user should see: a usage error (exit 2)
    for bad input, a one-line error (exit 1) for anything else that the program reports on purpose (a full disk
    included), and one line for Ctrl-C (exit 130: a rerun of the same command resumes)."""
    try:
        return body()
    except Refused as e:  # a UsageError, or a path in the way of an output
        parser.error(first_line(e))
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:  # FileNotFoundError and PermissionError are OSErrors too
        full = " (the disk is full)" if e.errno == errno.ENOSPC else ""
        print(f"{parser.prog}: error{full}: {first_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"{parser.prog}: error: {first_line(e)}", file=sys.stderr)
        return 1


def first_line(error):
    """An error's message without what follows its first line (torch appends C++ stack frames to some)."""
    return str(error).strip().split("\n")[0]
