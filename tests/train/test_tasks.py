"""The tasks (train/tasks.py) and the embedded synthetic world they are drawn from (d2lora_min/synthetic/): a corpus
that repeats across hash seeds and never uses the task format, splits that share no prompt (and, where a task tests
unseen people, scripts or wordings, no entity either), answers that are the ones the question asks for, and a retention
probe of what fine-tuning never sees."""

import os
import random
import subprocess
import sys

from d2lora_min.synthetic.tasks import TASKS, UPDATE_QUESTIONS, retention_probe, updated_facts
from d2lora_min.synthetic.world import SCRIPTS, World, corpus_documents
from d2lora_min.train.data import heldout_text, train_tokenizer
from d2lora_min.train.tasks import MCItem, build_splits


def test_corpus_generation_is_deterministic_even_across_hash_seeds():
    code = "from d2lora_min.synthetic.world import *; import hashlib; w = World(); print(hashlib.sha256(repr((w.facts, corpus_documents(w, 300, 1))).encode()).hexdigest())"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": s}
        ).stdout
        for s in ("1", "2")
    }
    assert len(outs) == 1 and len(next(iter(outs))) == 65
    w = World()
    assert corpus_documents(w, 50, 1) == corpus_documents(w, 50, 1) != corpus_documents(w, 50, 2)


def test_no_pretraining_document_uses_the_task_format():
    docs = corpus_documents(World(), 3000, seed=1)
    assert not any("Q:" in d or "\nA:" in d for d in docs)


def test_splits_are_disjoint_deterministic_and_large_enough():
    world = World()
    splits = build_splits(world, TASKS, n_train=300, n_test=500, n_validation=200, seed=0)
    again = build_splits(world, TASKS, n_train=300, n_test=500, n_validation=200, seed=0)
    for name, parts in splits.items():
        assert len(parts.test) == 500 and len(parts.validation) == 200
        distinct = {(it.prompt, tuple(getattr(it, "choices", ()))) for it in parts.test}
        assert len(distinct) >= (300 if name == "update" else 500), name  # (update: 80 questions, other choices)
        prompts = {k: {it.prompt for it in getattr(parts, k)} for k in ("train", "validation", "test")}
        assert not prompts["train"] & prompts["test"] and not prompts["validation"] & (
            prompts["train"] | prompts["test"]
        ), name
        assert [it.prompt for it in parts.test] == [it.prompt for it in again[name].test]
        assert [it.prompt for it in parts.validation] == [it.prompt for it in again[name].validation]
        for it in parts.test + parts.validation:
            if isinstance(it, MCItem):
                assert 0 <= it.answer < len(it.choices) and len(set(it.choices)) == len(it.choices)
    # facts and continuation are tested (and validated) on people / scripts that training never asks about, and
    # validation and test never share one
    people = {k: {it.cluster for it in getattr(splits["facts"], k)} for k in ("train", "validation", "test")}
    assert all(people.values()) and not people["train"] & (people["validation"] | people["test"])
    assert not people["validation"] & people["test"]

    def causes(items):  # every situation a story mentions, asked about or not
        return {c for it in items for c, _ in SCRIPTS if f" {c}." in it.prompt.split("\nQ:")[0]}

    scripts = {k: causes(getattr(splits["continuation"], k)) for k in ("train", "validation", "test")}
    assert all(scripts.values()) and not scripts["train"] & (scripts["validation"] | scripts["test"])
    assert not scripts["validation"] & scripts["test"]


def test_compare_and_continuation_answers_are_the_ones_the_question_asks_for():
    world, rng = World(), random.Random(0)
    for _ in range(200):
        item = TASKS["compare"].make(rng, world, "test")
        table = item.prompt.split("\n")[0].removeprefix("Points: ").rstrip(".").split(", ")
        points = {name: int(p) for p, name in (entry.split(" ") for entry in table)}
        ranked = sorted(points, key=points.get, reverse=True)  # most first
        rank = {"most": 0, "fewest": -1, "second most": 1, "second fewest": -2}[
            item.prompt.split("has the ")[1].split(" points")[0]
        ]
        assert item.choices[item.answer] == " " + ranked[rank] and sorted(item.choices) == sorted(
            " " + n for n in points
        )
    effect, two_people = dict(SCRIPTS), 0
    for _ in range(200):
        item = TASKS["continuation"].make(rng, world, "test")
        story, question = item.prompt.split("\nQ: What did ")
        asked = question.split(" do next?")[0]
        said = {s.split(" ", 1)[0]: s.split(" ", 1)[1] for s in story.rstrip(".").split(". ")}  # name -> situation
        assert item.choices[item.answer] == " " + effect[said[asked]]
        assert all(" " + effect[c] in item.choices for c in said.values())  # the other person's continuation too
        two_people += len(said) == 2
    assert 50 < two_people < 150


def test_the_update_task_never_shows_a_test_wording_in_training_and_the_base_answer_is_a_choice():
    world = World()
    updates = updated_facts(world)
    parts = build_splits(world, {"update": TASKS["update"]}, n_train=400, n_test=300, n_validation=200, seed=0)[
        "update"
    ]
    wording = lambda it, n: it.prompt.replace(n, "{n}")  # noqa: E731
    words = {k: {wording(it, it.cluster) for it in getattr(parts, k)} for k in ("train", "validation", "test")}
    assert all(words.values()) and not words["train"] & words["test"]
    assert not words["validation"] & (words["train"] | words["test"])
    # no split's question is another split's with words around it
    for a, b in ((a, b) for a in UPDATE_QUESTIONS for b in UPDATE_QUESTIONS if a != b):
        for attr in ("city", "job"):
            assert not any(q in p for q in UPDATE_QUESTIONS[a][attr] for p in UPDATE_QUESTIONS[b][attr]), (a, b, attr)
    for it in parts.test + parts.validation:
        attr, old, new = updates[it.cluster]
        assert it.choices[it.answer] == " " + new and " " + old in it.choices and old != new
    # the updated people are kept out of the facts task, whose answers are the pretrained facts
    facts = build_splits(world, {"facts": TASKS["facts"]}, 300, 300, n_validation=100, seed=0)["facts"]
    assert not {it.cluster for it in facts.train + facts.validation + facts.test} & set(updates)


def test_retention_is_measured_on_what_fine_tuning_never_sees():
    world = World()
    probe = retention_probe(world)
    splits = build_splits(world, TASKS, n_train=300, n_test=50, seed=0)
    asked = {
        it.cluster for t in ("facts", "update") for it in splits[t].train
    }  # people whose facts training asks about
    assert not {it.cluster for it in probe} & asked  # the probe's facts are never asked or taught in fine-tuning
    assert not any("Q:" in it.prompt for it in probe)  # corpus wording, not the task format
    tok = train_tokenizer(corpus_documents(world, 300, 1), 300)
    tokens = heldout_text(world, tok, n_docs=50, exclude_names=tuple(updated_facts(world)))
    assert len(tokens) > 100
