"""The run cache: where a run's result lives, the key of the settings that produced it, and reading it back.

A run's JSON is written last (its presence, with the right key, marks the run as finished); a rerun reuses it
when it validates - the right method, seed and key, every field the report reads, a checksum that matches its
content, and the adapter file it names present and intact - and computes only what is missing.
"""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from ..atomic import read_json
from ..nn import METHODS
from ..nn.checkpoint import ADAPTER_FILE, read_adapter_file
from .presets import budget_train_config
from .pretrain import corpus_fingerprint, sha256_file
from .tasks import TASKS
from .trainer import pick_device, rank_and_world


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


def checksum(result):
    """SHA-256 of a result's content (every field but the checksum itself): an edited file no longer matches."""
    body = {k: v for k, v in result.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed(result):
    """The result with its checksum, as it is written."""
    return {**result, "sha256": checksum(result)}


def adapter_path(out_dir, spec, seed, key):
    """Where a run saves its adapter file: a folder named like its result (relative to out_dir), and the file in it."""
    folder = Path("adapters") / f"{slug(spec.text)}_seed{seed}_{key}"
    return folder, out_dir / folder / ADAPTER_FILE


def read_cached(path, spec=None, seed=None, key=None, cfg=None):
    """A finished run's JSON, or None when there is none or it is not a valid result of this spec, seed, key and
    config (then the run is recomputed, with one line saying why)."""
    if not path.exists():
        return None
    try:
        result = read_json(path)
        problem = None if spec is None else invalid(result, spec, seed, key, cfg) or adapter_problem(result, path.parent.parent)
    except (OSError, ValueError) as e:  # unreadable, a folder, a FIFO, not UTF-8, not JSON
        problem = f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    if problem:
        print(f"{path}: {problem}: recomputing that run", flush=True)
        return None
    return result


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def invalid(result, spec, seed, key, cfg):
    """Why `result` is not a finished run of (spec, seed, key) with every field the report reads, or None."""
    if not isinstance(result, dict):
        return f"not a run result (a {type(result).__name__})"
    if result.get("sha256") != checksum(result):
        return "its checksum does not match its content (an edited or damaged file)"
    expected = {"method": spec.text, "seed": seed, "key": key}
    for field_name, want in expected.items():
        if result.get(field_name) != want:
            return f"{field_name} is {result.get(field_name)!r}, expected {want!r}"
    kinds = {"label": str, "trainable_params": int, "items": dict, "scores": dict, "status": str}
    if cfg.split == "test":
        kinds.update({"heldout_loss": (int, float), "facts_probe": (int, float)})
    if spec.name != "base":
        kinds.update({"losses": list, "step_time": (int, float), "volatility": (int, float), "train_seconds": (int, float)})
    for field_name, kind in kinds.items():
        if not isinstance(result.get(field_name), kind) or isinstance(result.get(field_name), bool):
            return f"{field_name} is missing or has the wrong type"
    fields = {"mc": ("correct_sum", "correct_mean", "logp"), "gen": ("rouge", "exact", "answer")}
    n_items = cfg.n_test if cfg.split == "test" else cfg.n_validation
    for task in cfg.tasks:
        items = result["items"].get(task)
        if not isinstance(items, dict):
            return f"no items for task {task!r}"
        kind = TASKS[task].kind
        for field_name in fields[kind]:
            values = items.get(field_name)
            if not isinstance(values, list) or len(values) != n_items:
                return f"task {task!r}: {field_name} is missing or does not hold {n_items} items"
        flags = ("correct_sum", "correct_mean") if kind == "mc" else ("exact",)
        if not all(v in (0, 1) for f in flags for v in items[f]):
            return f"task {task!r}: a correctness flag is not 0 or 1"
        if not _is_number(result["scores"].get(task)):
            return f"no score for task {task!r}"
    return None


def adapter_problem(result, out_dir):
    """Why the adapter file a finished run names (relative to out_dir) is missing or damaged, or None (also when the
    run names none: base, full, the validation split)."""
    if "adapter" not in result:
        return None
    if not isinstance(result["adapter"], str) or not isinstance(result.get("adapter_sha256"), str):
        return "its adapter path or the adapter's SHA-256 is missing"
    path = out_dir / result["adapter"] / ADAPTER_FILE
    try:
        read_adapter_file(path)
    except (OSError, ValueError) as e:
        return f"its adapter file is missing or damaged ({str(e)[:160]})"
    if sha256_file(path) != result["adapter_sha256"]:
        return "its adapter file is not the one this run saved (another run's, or replaced)"
    return None


def run_key(spec, seed, cfg, base_meta, full_merge, by_settings=False):
    """Everything that changes a run's numbers; a cached run is reused only when this matches. by_settings=True
    names the method by what it runs (name, rank, alpha, dropout, lr, targets, options) instead of by how its spec
    is written: two specs with the same key then are the same run ("lora" at a tuned lr of 0.01 and "lora:lr=0.01")."""
    options = {**(METHODS[spec.name].OPTIONS if spec.name in METHODS else {}), **spec.options}  # defaults written out
    what = {"name": spec.name, "r": spec.r, "alpha": spec.alpha, "dropout": spec.dropout, "options": options} if by_settings else spec.text
    blob = {
        "spec": what, "seed": seed, "device": pick_device(cfg.train.device), "processes": rank_and_world()[1], "r": cfg.r, "alpha_over_r": cfg.alpha_over_r, "targets": list(spec.targets),
        "lr": spec.lr, "split": cfg.split, "n_test": cfg.n_test, "n_validation": cfg.n_validation,
        "tasks": list(cfg.tasks), "n_train": cfg.n_train, "epochs": cfg.epochs, "scoring": cfg.scoring,
        "warmup_frac": cfg.warmup_frac, "full_lr": cfg.full_lr, "full_merge": full_merge, "packed": cfg.packed, "fused": cfg.fused,
        "train": {k: v for k, v in asdict(budget_train_config(cfg)).items() if k not in ("progress", "desc")},
        "base": base_meta["sha256"], "world": corpus_fingerprint(cfg.pretrain.corpus), "version": 3,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


