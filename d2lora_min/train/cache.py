"""The run cache: where a run's result lives, the key of the settings that produced it, and reading it back.

A run's JSON is written last (its presence, with the right key, marks the run as finished); a rerun reuses it
when the key matches and computes only what is missing.
"""

import hashlib
import json
from dataclasses import asdict

from .presets import budget_train_config
from .pretrain import corpus_fingerprint


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


