"""A tiny command-line override parser for the config dataclasses: `--section.field=value`.

    python -m d2lora_min.train.pretrain --train.steps=2000 --model.n_layer=3
    python -m d2lora_min.train.compare --train.lr=5e-3 --methods lora,d2lora:project=false

Values are parsed with the type of the field's default, so tests build the same configs in code.
"""

import dataclasses


def parse_value(text, like):
    """Parse `text` as the type of `like` (bool, int, float, str, tuple/list of those, or None -> str)."""
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(like, (tuple, list)):
        parts = [t for t in text.split(",") if t]
        return type(like)(parse_value(t, like[0]) if like else t for t in parts)
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    return text


def apply_overrides(config, overrides):
    """Set fields of the dataclass tree `config` from ["section.field=value", ...]; clear error on unknown names."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        path, text = item.split("=", 1)
        *parents, name = path.lstrip("-").split(".")
        target = config
        for p in parents:
            if not dataclasses.is_dataclass(target) or not hasattr(target, p):
                raise ValueError(f"unknown config section {p!r} in {path!r}")
            target = getattr(target, p)
        fields = {f.name for f in dataclasses.fields(target)}
        if name not in fields:
            raise ValueError(f"unknown setting {path!r}; valid here: {', '.join(sorted(fields))}")
        setattr(target, name, parse_value(text, getattr(target, name)))
    return config


def config_help(config, prefix=""):
    """One line per setting: --section.field=default."""
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            lines += config_help(value, prefix + f.name + ".")
        else:
            lines.append(f"  --{prefix}{f.name}={value}")
    return lines
