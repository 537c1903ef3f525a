"""A run's result file: one JSON per (method, seed, settings key), sealed by a SHA-256 of its content, written last (its
presence with the right key marks the run as finished). A rerun reuses it only when it validates: the right method,
seed and key, every field the report reads, a checksum that matches its content, and the adapter file it names
present, intact and the one this run saved; anything else is recomputed, with one line saying why.
"""

import hashlib
import json

from .adapter_file import ADAPTER_FILE, read_adapter_file
from .io import read_json, sha256_file


def checksum(result):
    """SHA-256 of a result's content (every field but the checksum itself): an edited file no longer matches."""
    body = {k: v for k, v in result.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed(result):
    """The result with its checksum, as it is written."""
    return {**result, "sha256": checksum(result)}


def read_run(path, expected=None, tasks=None, n_items=None, trained=True, tested=True):
    """A finished run's JSON, or None when there is none or it is not a valid result of the run `expected` describes
    ({"method": spec text, "seed", "key"}) with an entry for each of `tasks` ({name: "mc" or "gen"}), n_items each (a
    number, or {task: number}); then the run is recomputed, with one line saying why. trained: the run fine-tuned
    something (not `base`); tested: it was scored on test items (and so measured retention). Without `expected`, only
    whether the file is JSON."""
    if not path.exists():
        return None
    try:
        result = read_json(path)
        problem = (
            None
            if expected is None
            else invalid(result, expected, tasks, n_items, trained, tested)
            or adapter_problem(result, path.parent.parent)
        )
    except (OSError, ValueError) as e:  # unreadable, a folder, a FIFO, not UTF-8, not JSON
        problem = f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    if problem:
        print(f"{path}: {problem}: recomputing that run", flush=True)
        return None
    return result


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def invalid(result, expected, tasks, n_items, trained, tested):
    """Why `result` is not the finished run `expected` with every field the report reads, or None."""
    if not isinstance(result, dict):
        return f"not a run result (a {type(result).__name__})"
    if result.get("sha256") != checksum(result):
        return "its checksum does not match its content (an edited or damaged file)"
    for field_name, want in expected.items():
        if result.get(field_name) != want:
            return f"{field_name} is {result.get(field_name)!r}, expected {want!r}"
    kinds = {"label": str, "trainable_params": int, "items": dict, "scores": dict, "status": str}
    if tested:
        kinds.update({"heldout_loss": (int, float), "facts_probe": (int, float)})
    if trained:
        kinds.update(
            {"losses": list, "step_time": (int, float), "volatility": (int, float), "train_seconds": (int, float)}
        )
    for field_name, kind in kinds.items():
        if not isinstance(result.get(field_name), kind) or isinstance(result.get(field_name), bool):
            return f"{field_name} is missing or has the wrong type"
    fields = {"mc": ("correct_sum", "correct_mean", "logp"), "gen": ("rouge", "exact", "answer")}
    for task, kind in tasks.items():
        items, n = result["items"].get(task), n_items[task] if isinstance(n_items, dict) else n_items
        if not isinstance(items, dict):
            return f"no items for task {task!r}"
        for field_name in fields[kind]:
            values = items.get(field_name)
            if not isinstance(values, list) or len(values) != n:
                return f"task {task!r}: {field_name} is missing or does not hold {n} items"
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
