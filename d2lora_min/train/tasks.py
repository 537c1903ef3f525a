"""The downstream tasks: six multiple-choice tasks of the kinds the D2-LoRA paper evaluates on, and one
generative task. Every task asks in the "Q: ...\\nA: ..." format, which no pretraining document uses.

  yesno         yes/no about a passage            "The cup is clean. ... Q: Is the cup dirty?" (BoolQ-like)
  who           who/what from a passage            "Q: Who owns the cup?"                     (reading comprehension)
  facts         world knowledge from pretraining   "Q: Where does Mira live?"                 tested on people whose
                                                                                              facts are never asked in training
  negation      suppression: the most-mentioned    "Kalo did not take the cup. ..."           the answer is the one
                names are the wrong answers        "Q: Who took the cup?"                     person never mentioned again
  compare       comparison                         "Points: ... Q: Who has the most points?"
  continuation  plausible continuation             "Q: Mira was hungry. What did Mira do next?" tested on scripts
                                                                                              never asked in training
  span          generative, ROUGE-L                "Mira has the red cup. ...                 (extractive QA)
                and exact match                     Q: What does Mira have?" -> "the red cup"

Train and test items come from different seeds (and, for facts and continuation, from disjoint people or
scripts); a test prompt never equals a training prompt.
"""

import random
from dataclasses import dataclass
from typing import Callable

import torch

from .evaluate import GenItem, MCItem
from .world import ADJECTIVES, CITIES, INSTRUMENTS, JOBS, OBJECTS, PETS, SCRIPTS, World, elimination_story, owner_sentence, points_table, states_passage


def _passage(rng, world, k_range=(3, 5)):
    """k objects and their owners, key first, each sentence in a random wording -> (text, objs, names)."""
    k = rng.randint(*k_range)
    objs, names = rng.sample(OBJECTS, k), rng.sample(world.names, k)
    return " ".join(owner_sentence(rng, o, n) for o, n in zip(objs, names)), objs, names


def _choices(rng, right, others, n):
    """n answer strings with a leading space, the right one at a random place -> (choices, answer index)."""
    picked = rng.sample([o for o in others if o != right], n - 1) + [right]
    rng.shuffle(picked)
    return [" " + c for c in picked], picked.index(right)


def make_yesno(rng, world, split):
    text, objs, states, pair = states_passage(rng)
    i = rng.randrange(len(objs))
    asked = rng.choice(pair)
    return MCItem(f"{text}\nQ: Is the {objs[i]} {asked}?\nA:", [" yes", " no"], 0 if asked == states[i] else 1)


def make_who(rng, world, split):
    text, objs, names = _passage(rng, world)
    i = rng.randrange(len(objs))
    return MCItem(f"{text}\nQ: Who owns the {objs[i]}?\nA:", [" " + n for n in names], i)


FACT_QUESTIONS = {
    "city": ("Where does {n} live?", CITIES),
    "job": ("What is the job of {n}?", JOBS),
    "pet": ("What pet does {n} keep?", PETS),
    "instrument": ("What does {n} play?", INSTRUMENTS),
}


def people_split(world, split):
    """Disjoint halves of the world's people: facts about test people are never asked in training."""
    half = len(world.names) // 2
    return world.names[:half] if split == "train" else world.names[half:]


def make_facts(rng, world, split):
    n = rng.choice(people_split(world, split))
    attr = rng.choice(list(FACT_QUESTIONS))
    question, values = FACT_QUESTIONS[attr]
    choices, answer = _choices(rng, world.facts[n][attr], values, 4)
    return MCItem(f"Q: {question.format(n=n)}\nA:", choices, answer)


def make_negation(rng, world, split):
    story, names, taker, obj = elimination_story(rng, world)
    return MCItem(f"{story}\nQ: Who took the {obj}?\nA:", [" " + n for n in names], names.index(taker))


def make_compare(rng, world, split):
    table, names, points = points_table(rng, world)
    most = rng.random() < 0.5
    who = names[points.index(max(points) if most else min(points))]
    question = "Who has the most points?" if most else "Who has the fewest points?"
    return MCItem(f"{table}\nQ: {question}\nA:", [" " + n for n in names], names.index(who))


def script_split(split, seed=7):
    """Disjoint halves of the scripts: the test scripts' continuations are never asked in training."""
    order = random.Random(seed).sample(range(len(SCRIPTS)), len(SCRIPTS))
    half = order[: len(SCRIPTS) // 2] if split == "train" else order[len(SCRIPTS) // 2 :]
    return [SCRIPTS[i] for i in half]


def make_continuation(rng, world, split):
    n = rng.choice(world.names)
    cause, effect = rng.choice(script_split(split))
    choices, answer = _choices(rng, effect, [e for _, e in SCRIPTS], 4)
    return MCItem(f"Q: {n} {cause}. What did {n} do next?\nA:", choices, answer)


def make_span(rng, world, split):
    k = rng.randint(3, 5)
    names, objs = rng.sample(world.names, k), rng.sample(OBJECTS, k)
    things = [f"the {rng.choice(ADJECTIVES)} {o}" for o in objs]
    i = rng.randrange(k)
    text = " ".join(f"{n} has {t}." for n, t in zip(names, things))
    return GenItem(f"{text}\nQ: What does {names[i]} have?\nA:", things[i])


@dataclass
class Task:
    name: str
    kind: str  # "mc" (accuracy) or "gen" (ROUGE-L and exact match)
    make: Callable  # make(rng, world, split) -> MCItem or GenItem
    normalise: bool = False  # score MC choices by mean rather than summed log-likelihood
    max_new_tokens: int = 10  # for "gen" tasks


TASKS = {
    t.name: t
    for t in [
        Task("yesno", "mc", make_yesno),
        Task("who", "mc", make_who),
        Task("facts", "mc", make_facts),
        Task("negation", "mc", make_negation),
        Task("compare", "mc", make_compare),
        Task("continuation", "mc", make_continuation, normalise=True),  # choices of different lengths
        Task("span", "gen", make_span),
    ]
}


def answer_text(item):
    """What a training example teaches the model to write after the prompt (ends with a newline)."""
    return (item.choices[item.answer] if isinstance(item, MCItem) else " " + item.reference) + "\n"


def task_items(task, world, split, n, seed, exclude_prompts=()):
    """n items of `task` for `split` ("train" or "test"), seeded; prompts in exclude_prompts are skipped.

    Test sets hold distinct prompts when enough exist (for facts and bio the held-out people bound them).
    """
    rng = random.Random(f"{task.name}/{split}/{seed}")
    items, seen, tries = [], set(exclude_prompts), 0
    while len(items) < n:
        item = task.make(rng, world, split)
        tries += 1
        if item.prompt in exclude_prompts:
            continue
        if split == "test" and item.prompt in seen and tries < 50 * n:
            continue  # prefer distinct test prompts
        seen.add(item.prompt)
        items.append(item)
    return items


def build_splits(world: World, task_names, n_train, n_test, seed=0):
    """{task: (train items, test items)} with no test prompt among the training prompts."""
    splits = {}
    for name in task_names:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
        task = TASKS[name]
        train = task_items(task, world, "train", n_train, seed)
        test = task_items(task, world, "test", n_test, seed, exclude_prompts={it.prompt for it in train})
        splits[name] = (train, test)
    return splits


def encode_examples(tokenizer, items):
    """[(prompt ids, answer ids)]: the answer is what the fine-tuning loss is computed on."""
    return [(tokenizer.encode(it.prompt).ids, tokenizer.encode(answer_text(it)).ids) for it in items]


def finetune_batches(tokenizer, train_sets, batch_size, seed, pad_id):
    """get_batch(step) -> (x, y) over a uniform mixture of tasks; y is -1 everywhere but on the answer tokens.

    train_sets: {task: train items}. Like window_batches, the batch depends only on (seed, step).
    """
    pools = [encode_examples(tokenizer, items) for items in train_sets.values()]

    def get_batch(step):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        picks = []
        for t in torch.randint(0, len(pools), (batch_size,), generator=g).tolist():
            picks.append(pools[t][torch.randint(0, len(pools[t]), (1,), generator=g).item()])
        T = max(len(p) + len(a) for p, a in picks) - 1
        x = torch.full((batch_size, T), pad_id, dtype=torch.long)  # (B, T), right-padded
        y = torch.full((batch_size, T), -1, dtype=torch.long)  # (B, T), -1 = no loss
        for b, (p, a) in enumerate(picks):
            seq = p + a
            x[b, : len(seq) - 1] = torch.tensor(seq[:-1])
            y[b, len(p) - 1 : len(seq) - 1] = torch.tensor(a)  # position i predicts token i + 1
        return x, y

    return get_batch
