"""The task type the harness runs on: multiple-choice and generative items, a Task that draws them (or holds them),
and its train / validation / test Split. Nothing here knows where a task comes from: the embedded synthetic tasks
(d2lora_min/synthetic/tasks.py) are one source.

Every split is drawn with its own seed and no prompt is in two splits. Anything chosen from results (a learning rate)
is chosen on validation items; test items are only reported. Items that share an entity (a person, a script) carry it
as their `cluster`, so that the statistics (stats.py) do not count them as independent.
"""

import random
from dataclasses import dataclass
from typing import Callable


@dataclass
class MCItem:
    prompt: str
    choices: list  # the answer strings, each starting with a space: [" Mira", " Kalo", ...]
    answer: int  # index of the right choice
    cluster: str = ""  # items sharing an entity (a person, a script) share it; "" = independent (see report.py)


@dataclass
class GenItem:
    prompt: str
    reference: str  # the expected answer, without the final newline
    cluster: str = ""


@dataclass
class Task:
    name: str
    kind: str  # "mc" (accuracy) or "gen" (ROUGE-L and exact match)
    make: Callable  # make(rng, world, split) -> MCItem or GenItem
    normalise: bool = False  # score MC choices by mean rather than summed log-likelihood
    max_new_tokens: int = 10  # for "gen" tasks


def scored_field(task, scoring="task"):
    """The per-item result a task is scored by: "rouge" for a generative task; for multiple choice "correct_sum" or
    "correct_mean" (summed or length-normalised log-likelihood): the task's own scorer, unless `scoring` says "sum" or
    "mean"."""
    if task.kind == "gen":
        return "rouge"
    if scoring == "task":
        return "correct_mean" if task.normalise else "correct_sum"
    return f"correct_{scoring}"


def of_kind(tasks, kind):
    """The names of the tasks of one kind ("mc" or "gen") in {name: Task}, in order; the mean accuracy is taken over
    the multiple-choice ones."""
    return [name for name, task in tasks.items() if task.kind == kind]


def answer_text(item):
    """What a training example teaches the model to write after the prompt (ends with a newline)."""
    return (item.choices[item.answer] if isinstance(item, MCItem) else " " + item.reference) + "\n"


def task_items(task, world, split, n, seed, exclude_prompts=()):
    """n items of `task` for `split` ("train", "validation" or "test"), seeded; prompts in exclude_prompts are skipped.

    Validation and test sets hold distinct prompts when enough exist; where the entities bound them (the update task's
    40 people in 2 wordings per split), an item repeats a question with other choices, and its cluster says so.
    """
    rng = random.Random(f"{task.name}/{split}/{seed}")
    items, seen, tries = [], set(exclude_prompts), 0
    while len(items) < n:
        item = task.make(rng, world, split)
        tries += 1
        if tries > 1000 * n:
            raise ValueError(
                f"task {task.name!r}: could not draw {n} {split} items whose prompts are not training prompts"
            )
        if item.prompt in exclude_prompts:
            continue
        if split != "train" and item.prompt in seen and tries < 50 * n:
            continue  # prefer distinct evaluation prompts
        seen.add(item.prompt)
        items.append(item)
    return items


@dataclass
class Split:
    """One task's items: training, validation (what anything chosen from results is chosen on) and test (what is
    reported). No prompt is in two of them; where the task tests unseen people, scripts or wordings, validation and
    test have their own, and neither is ever asked about in training."""

    train: list
    validation: list
    test: list


def build_splits(world, tasks, n_train, n_test, n_validation=0, seed=0):
    """{task: Split} of the tasks {name: Task} (each drawing items from `world`), with no prompt shared by two splits."""
    splits = {}
    for name, task in tasks.items():
        train = task_items(task, world, "train", n_train, seed)
        test = task_items(task, world, "test", n_test, seed, exclude_prompts={it.prompt for it in train})
        seen = {it.prompt for it in train + test}
        validation = (
            task_items(task, world, "validation", n_validation, seed, exclude_prompts=seen) if n_validation else []
        )
        splits[name] = Split(train, validation, test)
    return splits
