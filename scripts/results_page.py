"""`make results` (python -m scripts.results_page): docs/RESULTS.md, written from the reports under docs/results/ (each the output of the command named
with it, with ARGS=--publish), so that the page cannot drift from them: every table is copied, not retyped.
tests/test_docs.py fails when the committed page differs from what this writes.
"""

import sys

from d2lora_min.files.io import write_text
from d2lora_min.train.settings import DEV_SEEDS, PUBLISHED, CompareConfig, preset
from d2lora_min.train.specs import SHARED_LR, roles
from d2lora_min.train.tune import GRID

PAGE = PUBLISHED.parent / "RESULTS.md"


def _report(name):
    path = PUBLISHED / name
    return path.read_text().strip() if path.exists() else f"(no report yet: {name} is written by the command above)"


def _figure(name, caption):
    return f"![{caption}](results/{name})" if (PUBLISHED / name).exists() else ""


def sections():
    cfg = CompareConfig()
    budget = f"{cfg.n_train} training items per task x {cfg.epochs} epochs, {cfg.n_test} test items per task"
    n_rep, n_abl = len(preset("replicate")["seeds"]), len(preset("ablate")["seeds"])
    return [
        (
            "The quick comparison: `make compare`",
            'make compare ARGS="--fresh --publish"',
            "default.md",
            f"LoRA(r), LoRA(2r), DoRA(r) and D2-LoRA(r) (r = {cfg.r}) fine-tuned from the shipped base on the same data "
            f"({budget}), each at its tuned learning rate, seeds {cfg.seeds[0]}-{cfg.seeds[-1]}; every difference is taken from "
            f'LoRA(2r), paired over seeds and test items. The "detectable" column is the smallest true difference the run '
            f"would find 80 % of the time: a quick look, not a verdict on effects of 1-2 pp.",
            [("default_forest.png", "difference from LoRA(2r), 95 % CI"), ("default_loss_curves.png", "training loss")],
        ),
        (
            "Learning rates: `make tune`",
            'make tune ARGS="--fresh --publish"',
            "tune.md",
            f"Each of {', '.join(roles(cfg.r).values())} at {len(GRID)} learning rates from {GRID[0]:g} to {GRID[-1]:.3g}, on development "
            f"seeds {DEV_SEEDS[0]}-{DEV_SEEDS[-1]} and validation items only; the choice goes to "
            f"docs/results/tuned_lrs.json, which compare, replicate and ablate read. The last section asks whether "
            f"D2-LoRA(r)'s curve is LoRA(2r)'s at a larger learning rate, as its first-order form suggests.",
            [
                ("tune_lr.png", "validation accuracy against learning rate"),
                ("tune_lr_match.png", "D2-LoRA(r)'s curve moved along the lr axis onto LoRA(2r)'s"),
            ],
        ),
        (
            "The paper's claims: `make replicate`",
            'make replicate ARGS="--fresh --publish"',
            "replicate.md",
            f"The compare defaults at {n_rep} seeds, every method at its tuned learning rate and, beside it, at the shared lr "
            f"{SHARED_LR:g}. Verdicts: replicated (the 95 % CI excludes 0 on the paper's side), not replicated (it contains "
            f'0), opposite; against DoRA, whose claim is "matches or exceeds", matched or exceeded.',
            [
                ("replicate_forest.png", "difference from LoRA(2r), 95 % CI, tuned and shared lr"),
                ("replicate_loss_curves.png", "training loss"),
            ],
        ),
        (
            "D2-LoRA's design questions: `make ablate`",
            'make ablate ARGS="--fresh --publish"',
            "ablate.md",
            f"The default D2-LoRA(r) against one variant per open question, at D2-LoRA's tuned learning rate, {n_abl} seeds; "
            f"the last table scores the same runs with both multiple-choice scorers.",
            [("ablate_forest.png", "difference from D2-LoRA(r), 95 % CI"), ("ablate_loss_curves.png", "training loss")],
        ),
        (
            "Speed and memory: `make bench`, run 1",
            'make bench ARGS="--publish --name bench_run1"',
            "bench_run1/bench.md",
            "Every method side by side in one process, in a fresh random order per repetition; a ratio is the median of "
            "per-repetition ratios of two times measured in the same repetition (so it need not equal the ratio of the two "
            "median times beside it). Memory is counted exactly (the bytes "
            'autograd saves for backward). The "fused" rows run the opt-in fused path; every other row the plain one.',
            [],
        ),
        (
            "Speed and memory: `make bench`, run 2",
            'make bench ARGS="--publish --name bench_run2"',
            "bench_run2/bench.md",
            "The same, a second time (a speed claim holds only if both runs show it).",
            [],
        ),
        (
            "Determinism: `make determinism`",
            "make determinism ARGS=--publish",
            "determinism.md",
            "`make compare ARGS=--fresh` twice, into two folders, and every run's losses and per-item results compared. "
            "Seeded runs repeat bit for bit on one machine; another CPU may round matrix products differently.",
            [],
        ),
    ]


def render():
    parts = [
        "# Results",
        "",
        "Every table on this page is a report under [docs/results/](results/), copied here by `make results`; the "
        "command above each one wrote it (`--publish` writes into docs/results/; `--fresh` trains every run anew "
        "instead of reusing finished ones, but a run that two method specs name alike, such as LoRA(4) at its tuned "
        "lr 1e-2 and at the shared lr 1e-2, is trained once: the headers count it as reused). Rerun a command to "
        "check a figure; the tests fail when this page differs from what `make results` writes.",
        "",
    ]
    for title, command, report, about, figures in sections():
        parts += [f"## {title}", "", about, "", f"`{command}` -> `docs/results/{report}`:", "", _report(report), ""]
        parts += [f for f in (_figure(name, caption) for name, caption in figures) if f] + [""] * bool(figures)
    return "\n".join(parts).rstrip() + "\n"


def main():
    write_text(PAGE, render())
    print(f"written: {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
