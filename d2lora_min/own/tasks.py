"""Tasks from files (`--tasks DIR`): one `<task>.jsonl` per task, one item per line, read into the harness's task type
(train/tasks.py: MCItem, GenItem, Task, Split), so that training, scoring, statistics, report and tune do not care
where a task came from.

    {"split": "train", "prompt": "Q: Is the sky green?\\nA:", "choices": [" yes", " no"], "answer": 1}
    {"split": "test", "prompt": "Q: What does Mira have?\\nA:", "target": "the red cup"}

A line is multiple choice (choices: at least 2 distinct strings, answer: the right one's index; scored by
log-likelihood) or generation (target: the answer, greedy decoding scored by ROUGE-L and exact match); one file holds
one kind. split is train, validation (what `make tune` chooses on) or test (what is reported). An optional "cluster"
(a string) marks items that share an entity, so that the statistics resample them together. What a model is trained
to write after the prompt: the right choice as written (start choices with a space), or a space and the target; then
a newline. An optional `<task>.json` beside it sets {"scoring": "sum" | "mean"} (a multiple-choice task's
log-likelihood, summed or per token; default sum) or {"max_new_tokens": N} (generation; default the longest target's
tokens plus the newline, at least 10). Blank lines are skipped; anything else that is not a valid item stops the
command before any work with the file, the line number and the field. Tasks run in file-name order.

    d2lora export tasks --out runs/tasks          # the embedded tasks, written as such a folder (main, below)
"""

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..files.io import MAX_JSON_BYTES, check_paths, check_writable, read_json, write_text
from ..train.cli import UsageError, apply_overrides, run_cli
from ..train.tasks import GenItem, MCItem, Split, Task

SPLITS = ("train", "validation", "test")
MAX_ITEMS = 100_000  # per split of a task (the embedded tasks' bound on n_train and n_test)
MAX_CHOICES = 64
MAX_CHARS = 100_000  # of a prompt, a choice or a target
NAME = re.compile(r"[A-Za-z0-9_-]+")
FIELDS = {"mc": {"split", "prompt", "choices", "answer", "cluster"}, "gen": {"split", "prompt", "target", "cluster"}}


@dataclass
class FileTask(Task):
    """A task read from `source`: its items (parts), each item's line ({split: [line numbers]}), the items per split,
    the SHA-256 of its file and settings (part of every run key)."""

    source: str = ""
    lines: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    sha256: str = ""
    max_new_tokens_set: bool = False  # by the settings file (else from the tokenized targets, once a model is loaded)
    parts: Split = None


def _string(where, name, value):
    if not isinstance(value, str):
        raise UsageError(f"{where}: {name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise UsageError(f"{where}: {name} is empty")
    if len(value) > MAX_CHARS:
        raise UsageError(f"{where}: {name} has {len(value)} characters, more than {MAX_CHARS}")
    return value


def parse_line(where, text):
    """One line -> (split, kind, item); a UsageError naming `where` (file:line) and the field otherwise."""
    try:
        line = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{where}: not valid JSON ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(line, dict):
        raise UsageError(f"{where}: a line must be a JSON object, got {type(line).__name__}")
    kind = "mc" if "choices" in line or "answer" in line else "gen" if "target" in line else None
    if kind is None:
        raise UsageError(f"{where}: no choices/answer and no target: a line is multiple choice or generation")
    for name in sorted(set(line) - FIELDS[kind]):
        raise UsageError(f"{where}: unknown field {name!r} (fields: {', '.join(sorted(FIELDS[kind]))})")
    for name in sorted(FIELDS[kind] - {"cluster"} - set(line)):
        raise UsageError(f"{where}: missing field {name!r}")
    split = line["split"]
    if split not in SPLITS:
        raise UsageError(f"{where}: split must be train, validation or test, got {split!r}")
    prompt = _string(where, "prompt", line["prompt"])
    cluster = line.get("cluster", "")
    if not isinstance(cluster, str):
        raise UsageError(f"{where}: cluster must be a string, got {type(cluster).__name__}")
    if kind == "gen":
        target = _string(where, "target", line["target"])
        if "\n" in target:
            raise UsageError(f"{where}: target holds a newline: generation stops at the first one, so it never matches")
        return split, kind, GenItem(prompt, target, cluster)
    choices, answer = line["choices"], line["answer"]
    if not isinstance(choices, list):
        raise UsageError(f"{where}: choices must be a list of strings, got {type(choices).__name__}")
    if not 2 <= len(choices) <= MAX_CHOICES:
        raise UsageError(f"{where}: choices must hold 2 to {MAX_CHOICES} strings, got {len(choices)}")
    for i, choice in enumerate(choices):
        _string(where, f"choices[{i}]", choice)
    if len(set(choices)) != len(choices):
        raise UsageError(f"{where}: choices holds the same string twice")
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise UsageError(f"{where}: answer must be an integer (the right choice's index), got {answer!r}")
    if not 0 <= answer < len(choices):
        raise UsageError(
            f"{where}: answer {answer} is out of range for {len(choices)} choices (0 to {len(choices) - 1})"
        )
    return split, kind, MCItem(prompt, choices, answer, cluster)


def read_task(path):
    """One task file (and its optional settings file) -> FileTask (its items in .parts); every line checked."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: not readable ({e.strerror})") from None
    if len(data) > MAX_JSON_BYTES:
        raise UsageError(f"{path}: more than {MAX_JSON_BYTES} bytes")
    items, lines, kind_of = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}, None
    seen = {}  # training prompt -> its line: validation and test items must not be training items
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{where}: not UTF-8 (byte {e.start})") from None
        if not text.strip():
            continue
        split, kind, item = parse_line(where, text)
        if kind_of is None:
            kind_of = (kind, number)
        elif kind != kind_of[0]:
            names = {"mc": "multiple-choice", "gen": "generation"}
            raise UsageError(
                f"{where}: a {names[kind]} line in a {names[kind_of[0]]} task (line {kind_of[1]}): one kind per file"
            )
        if len(items[split]) == MAX_ITEMS:
            raise UsageError(f"{where}: more than {MAX_ITEMS} {split} items")
        items[split].append(item)
        lines[split].append(number)
        if split == "train":
            seen.setdefault(item.prompt, number)
    for split in ("validation", "test"):
        for item, number in zip(items[split], lines[split]):
            if item.prompt in seen:
                raise UsageError(
                    f"{path}:{number}: prompt is also a training prompt (line {seen[item.prompt]}): {split} items "
                    f"must be unseen in training"
                )
    if kind_of is None:
        raise UsageError(f"{path}: no items")
    counts = {s: len(v) for s, v in items.items()}
    parts = Split(items["train"], items["validation"], items["test"])
    task = FileTask(path.stem, kind_of[0], None, source=str(path), lines=lines, counts=counts,
                    sha256=hashlib.sha256(data).hexdigest(), parts=parts)  # fmt: skip
    apply_settings(task, path.with_suffix(".json"))
    return task


def apply_settings(task, path):
    """A task's optional settings file: scoring (multiple choice) or max_new_tokens (generation)."""
    if not path.exists():
        return
    try:
        settings = read_json(path)
    except (ValueError, OSError) as e:
        raise UsageError(f"{path}: {e}") from None
    allowed = {"mc": {"scoring"}, "gen": {"max_new_tokens"}}[task.kind]
    if not isinstance(settings, dict) or set(settings) - allowed:
        raise UsageError(
            f"{path}: must be a JSON object with at most {', '.join(sorted(allowed))} (a {task.kind} task)"
        )
    if "scoring" in settings:
        if settings["scoring"] not in ("sum", "mean"):
            raise UsageError(f"{path}: scoring must be sum or mean, got {settings['scoring']!r}")
        task.normalise = settings["scoring"] == "mean"
    if "max_new_tokens" in settings:
        n = settings["max_new_tokens"]
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4096:
            raise UsageError(f"{path}: max_new_tokens must be an integer in [1, 4096], got {n!r}")
        task.max_new_tokens, task.max_new_tokens_set = n, True
    task.sha256 = hashlib.sha256((task.sha256 + json.dumps(settings, sort_keys=True)).encode()).hexdigest()


def read_folder(folder):
    """Every `<task>.jsonl` of a folder -> {name: FileTask}, in file-name order; a UsageError before any work."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--tasks {folder}: no such folder")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise UsageError(f"--tasks {folder}: no <task>.jsonl file in it")
    for orphan in sorted(p for p in folder.glob("*.json") if not p.with_suffix(".jsonl").exists()):
        raise UsageError(f"{orphan}: a settings file without its {orphan.stem}.jsonl")
    out = {}
    for path in files:
        if not NAME.fullmatch(path.stem):
            raise UsageError(f"{path}: a task's name may hold only letters, digits, '_' and '-'")
        out[path.stem] = read_task(path)
    if not any(task.kind == "mc" for task in out.values()):
        raise UsageError(
            f"--tasks {folder}: no multiple-choice task; the verdicts are on mean multiple-choice accuracy"
        )
    return out


def item_line(task, split, index):
    """Where an item comes from, for an error message: file:line for a file task."""
    if isinstance(task, FileTask):
        return f"{task.source}:{task.lines[split][index]}"
    return f"task {task.name}, {split} item {index}"


def write_folder(tasks, splits, out):
    """{task: Split} of the tasks {name: Task} -> out/<task>.jsonl (and <task>.json where the task's scoring or
    decoding length is not the default): every item as a line, each split in order."""
    out = Path(out)
    for name, parts in splits.items():
        task, lines = tasks[name], []
        for split in SPLITS:
            for it in getattr(parts, split):
                row = {"split": split, "prompt": it.prompt}
                row.update(
                    dict(choices=it.choices, answer=it.answer) if task.kind == "mc" else dict(target=it.reference)
                )
                row.update({"cluster": it.cluster} if it.cluster else {})
                lines.append(json.dumps(row, ensure_ascii=False))
        write_text(out / f"{name}.jsonl", "\n".join(lines) + "\n")
        if task.kind == "gen":
            write_text(out / f"{name}.json", json.dumps({"max_new_tokens": task.max_new_tokens}) + "\n")
        elif task.normalise:
            write_text(out / f"{name}.json", json.dumps({"scoring": "mean"}) + "\n")
    return out


def main(argv=None, prog="d2lora export tasks"):
    parser = argparse.ArgumentParser(prog=prog, description="Write the embedded tasks as a --tasks folder of JSONL "
                                     "files, drawn as compare draws them (--tasks=a,b, --n_train, --n_test, "
                                     "--n_validation as in compare).")  # fmt: skip
    parser.add_argument("--out", required=True, help="the folder to write <task>.jsonl files into")
    args, overrides = parser.parse_known_args(argv)

    def body():
        from ..synthetic.world import World
        from ..train.settings import CompareConfig, resolve
        from ..train.tasks import build_splits

        settings = resolve(apply_overrides(CompareConfig(), overrides))
        if settings.own and settings.own.folder:
            raise UsageError(f"--tasks {settings.own.folder}: these are files already; name embedded tasks (a,b)")
        cfg, corpus = settings.cfg, settings.cfg.pretrain.corpus
        names = [f"{t}.{ext}" for t in settings.tasks for ext in ("jsonl", "json")]
        check_writable(args.out)
        check_paths(args.out, files=[Path(args.out) / name for name in names])
        world = World(seed=corpus.world_seed, n_people=corpus.n_people)
        splits = build_splits(world, settings.tasks, cfg.n_train, cfg.n_test, cfg.n_validation, seed=0)  # compare's
        print(f"written: {write_folder(settings.tasks, splits, args.out)} ({', '.join(f'{t}.jsonl' for t in splits)})")
        return 0

    return run_cli(parser, body)


if __name__ == "__main__":
    sys.exit(main())
