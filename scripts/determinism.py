"""`make determinism`: does a seeded comparison give the same numbers twice? It runs `make compare` twice from scratch
(--fresh, into two folders) and compares every run's per-item results and training losses.

    python -m scripts.determinism                   # two fresh default compares, then the comparison (make determinism)
    python -m scripts.determinism --only DIR DIR    # compare two finished compare folders (no runs)

A run is "identical" when its training losses and every per-item result (each choice's log-likelihood, each
correctness flag, each generated answer) are equal to the last bit. With --publish the table goes to
docs/results/determinism.md.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from d2lora_min.files.io import check_paths, read_json, write_text
from d2lora_min.train.cli import UsageError, run_cli
from d2lora_min.train.compare import main as compare_main
from d2lora_min.train.settings import PUBLISHED

ARGS = ["--fresh", "--train.progress=false"]


def runs_in(folder):
    """{file name: run result} of a compare folder (runs/*.json; the names carry method, seed and settings key)."""
    files = sorted((Path(folder) / "runs").glob("*.json"))
    if not files:
        raise UsageError(f"{folder} holds no finished runs (runs/*.json)")
    return {p.name: read_json(p) for p in files}


def largest_gap(a, b):
    """The largest |a - b| over two equally nested lists of numbers (inf when their shapes differ)."""
    if isinstance(a, list) and isinstance(b, list):
        return max((largest_gap(x, y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("inf")
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if a == b or (math.isnan(a) and math.isnan(b)):
            return 0.0
        return float("inf") if math.isnan(a) or math.isnan(b) else abs(a - b)
    return 0.0 if a == b else float("inf")


def compare_folders(first, second):
    """-> (rows, summary line): per method, how many of its runs are identical, and the largest differences."""
    a, b = runs_in(first), runs_in(second)
    common = sorted(set(a) & set(b))
    if not common:
        raise UsageError(f"{first} and {second} share no run (other settings?)")
    rows = {}
    for name in common:
        x, y = a[name], b[name]
        row = rows.setdefault(x["label"], {"runs": 0, "identical": 0, "loss": 0.0, "logp": 0.0, "flags": 0})
        row["runs"] += 1
        same = lambda u, v: json.dumps(u) == json.dumps(v)  # noqa: E731  (NaN equals NaN here, as a repeat should)
        row["identical"] += same(x.get("losses"), y.get("losses")) and same(x["items"], y["items"])
        row["loss"] = max(row["loss"], largest_gap(x.get("losses", []), y.get("losses", [])))
        for task, items in x["items"].items():
            other = y["items"].get(task, {})
            row["logp"] = max(row["logp"], largest_gap(items.get("logp", []), other.get("logp", [])))
            row["flags"] += any(
                not same(items[f], other.get(f))
                for f in ("correct_sum", "correct_mean", "exact", "answer")
                if f in items
            )
    lines = [
        "| method | runs | identical | largest loss difference | largest log-likelihood difference | (run, task) pairs whose flags or answers differ |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['runs']} | {r['identical']} | {r['loss']:.3g} | {r['logp']:.3g} | {r['flags']} |")
    same = sum(r["identical"] for r in rows.values())
    summary = f"{same} of {len(common)} runs identical to the last bit ({len(set(a) ^ set(b))} runs in only one folder)"
    return "\n".join(lines), summary


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m scripts.determinism", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", nargs=2, metavar="DIR", help="compare these two finished compare folders; run nothing"
    )
    parser.add_argument(
        "--out", default="runs/determinism", help="where the two fresh compares go (default: %(default)s)"
    )
    parser.add_argument("--publish", action="store_true", help="also write docs/results/determinism.md")
    args = parser.parse_args(argv)

    def body():
        if args.publish:
            check_paths(PUBLISHED, files=[PUBLISHED / "determinism.md"], hint="leave out --publish")
        if args.only:
            first, second = args.only
            if Path(first).resolve() == Path(second).resolve():  # a folder compared with itself always agrees
                raise UsageError(f"--only names one folder twice ({first}, {second}): give two compare folders")
            command = f"python -m scripts.determinism --only {first} {second}"
        else:
            first, second = (str(Path(args.out) / name) for name in ("first", "second"))
            check_paths(args.out, folders=[first, second])  # each compare then checks what it writes below its folder
            for folder in (first, second):
                if compare_main(ARGS + ["--out", folder]) != 0:
                    return 1
            command = "make determinism"
        table, summary = compare_folders(first, second)
        text = f"{command}: {summary}\n\n{table}\n"
        print("\n" + text)
        if args.publish:
            write_text(PUBLISHED / "determinism.md", text)
        return 0

    return run_cli(parser, body)


if __name__ == "__main__":
    sys.exit(main())
