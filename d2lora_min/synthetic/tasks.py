"""The embedded downstream tasks: seven multiple-choice tasks of the kinds the D2-LoRA paper evaluates on, and one
generative task. Every task asks in the "Q: ...\nA: ..." format, which no pretraining document uses.

  yesno         yes/no about a passage            "The cup is clean. ... Q: Is the cup dirty?" (BoolQ-like)
  who           who/what from a passage            "The cup belongs to Mira, not to Kalo. ... Q: Who owns the cup?" (reading
                                                   comprehension; the ruled-out names are among the choices)
  facts         world knowledge from pretraining   "Q: Where does Mira live?"                 tested on people whose
                                                                                              facts are never asked in training
  update        knowledge update: facts that       train "Q: Where does Mira live now?"        tested in other wordings;
                changed after pretraining          test  "Q: In which town does Mira live now?"   the base answers the old fact
  negation      suppression: the most-mentioned    "Kalo did not take the cup. ..."           the answer is the one
                names are the wrong answers        "Q: Who took the cup?"                     person never mentioned again
  compare       comparison                         "Points: 7 Kalo, 3 Mira, ... Q: Who has the second most points?"
                                                   (4-7 people; most, fewest, second most or second fewest)
  continuation  plausible continuation             "Kalo was tired. Mira was hungry.          tested on scripts never asked
                                                    Q: What did Mira do next?"                in training; with two people,
                                                   (one or two people)                        the other's continuation is a choice
  span          generative, ROUGE-L                "Mira has the red cup. ...                 (extractive QA)
                and exact match                     Q: What does Mira have?" -> "the red cup"

Train, validation and test items come from different seeds (and, for facts and continuation, from disjoint people or
scripts; for update, from disjoint question wordings); no prompt is in two splits. Anything chosen from results (a
learning rate) is chosen on validation items; test items are only reported. Items
that share an entity (a person for facts and update, a script for continuation) carry it as their `cluster`,
so that the statistics (train/stats.py) do not count them as independent.

The updated facts are drawn here, from the world's seed, not written into the pretraining corpus: the base
was pretrained on the old facts, so a knowledge update is something only fine-tuning can teach.
"""

import functools
import random

from ..train.tasks import GenItem, MCItem, Task
from .world import (
    ADJECTIVES,
    CITIES,
    FACT_WORDINGS,
    INSTRUMENTS,
    JOBS,
    OBJECTS,
    PETS,
    SCRIPTS,
    World,
    elimination_story,
    owner_sentence,
    points_table,
    states_passage,
)


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
    """Owners of 4-6 objects, some stated with a wrong owner ruled out ("The cup belongs to Mira, not to Kalo."):
    the ruled-out names are among the choices, so reading the right name matters, not finding any name."""
    k = rng.randint(4, 6)
    objs, names = rng.sample(OBJECTS, k), rng.sample(world.names, 2 * k)
    owners, decoys = names[:k], names[k:]
    sentences = [f"The {o} belongs to {a}, not to {d}." if rng.random() < 0.6 else owner_sentence(rng, o, a)
                 for o, a, d in zip(objs, owners, decoys)]  # fmt: skip
    i = rng.randrange(k)
    choices = [owners[i], decoys[i]] + rng.sample([n for n in owners if n != owners[i]], 2)
    rng.shuffle(choices)
    return MCItem(
        f"{' '.join(sentences)}\nQ: Who owns the {objs[i]}?\nA:", [" " + n for n in choices], choices.index(owners[i])
    )


FACT_QUESTIONS = {  # attribute -> (question wordings, the values it can take)
    "city": (["Where does {n} live?", "In which town is the home of {n}?"], CITIES),
    "job": (["What is the job of {n}?", "What does {n} work as?"], JOBS),
    "pet": (["What pet does {n} keep?", "Which animal does {n} have as a pet?"], PETS),
    "instrument": (["What does {n} play?", "Which instrument does {n} play?"], INSTRUMENTS),
}


N_UPDATED = 40  # people whose home town or job changed after pretraining (the update task)


@functools.lru_cache(maxsize=8)
def _updates(world_seed, n_people, seed):
    world = World(seed=world_seed, n_people=n_people)
    rng = random.Random(f"updates/{world_seed}/{seed}")
    people = rng.sample(world.names, min(N_UPDATED, len(world.names) // 3))
    updates = {}
    for n in people:
        attr = rng.choice(["city", "job"])
        old = world.facts[n][attr]
        new = rng.choice([v for v in FACT_QUESTIONS[attr][1] if v != old])
        updates[n] = (attr, old, new)
    return updates


def updated_facts(world, seed=11):
    """{name: (attribute, old value, new value)} for N_UPDATED people: each moved town or changed job.
    A pure function of the world (and a fixed seed), so every run and every user gets the same updates."""
    return _updates(world.seed, world.n_people, seed)


N_VALIDATION_PEOPLE = 40  # of the people training never asks about: the validation split's (the rest are the test's)


def people_split(world, split):
    """Disjoint groups of the people whose facts did not change: half for training, and of the other half
    N_VALIDATION_PEOPLE for validation and the rest for test. Facts about validation or test people are never asked
    in training, and validation and test never share a person (the updated people are left to the update task)."""
    updated = updated_facts(world)
    stable = [n for n in world.names if n not in updated]
    half = len(stable) // 2
    unseen = stable[half:]
    return {"train": stable[:half], "validation": unseen[:N_VALIDATION_PEOPLE], "test": unseen[N_VALIDATION_PEOPLE:]}[
        split
    ]


def make_facts(rng, world, split):
    n = rng.choice(people_split(world, split))
    attr = rng.choice(list(FACT_QUESTIONS))
    questions, values = FACT_QUESTIONS[attr]
    choices, answer = _choices(rng, world.facts[n][attr], values, 4)
    return MCItem(f"Q: {rng.choice(questions).format(n=n)}\nA:", choices, answer, cluster=n)


# The update task's question wordings: no two splits share one, and none contains another split's (validation and test
# are paraphrases of training, not training questions with words around them); validation mirrors test's two kinds of
# wording ("... now?" and "... these days?"), so that it is as hard.
UPDATE_QUESTIONS = {
    "train": {"city": ["Where does {n} live now?", "{n} moved. Where does {n} live now?", "Where is the home of {n} now?"],
              "job": ["What is the job of {n} now?", "{n} changed jobs. What is the job of {n} now?", "What does {n} work as now?"]},
    "validation": {"city": ["Which town does {n} live in now?", "{n} has left. Which town is {n} living in these days?"],
                   "job": ["What job does {n} have now?", "{n} found new work. Which job is {n} doing these days?"]},
    "test": {"city": ["In which town does {n} live now?", "{n} has moved. In which town is {n} living these days?"],
             "job": ["Which job does {n} have now?", "{n} has a new job. Which work does {n} do these days?"]},
}  # fmt: skip


def make_update(rng, world, split):
    """A fact that changed after pretraining: the right answer is the new value; the old one is always among
    the choices (a model that only knows pretraining picks it)."""
    updates = updated_facts(world)
    n = rng.choice(sorted(updates))
    attr, old, new = updates[n]
    question = rng.choice(UPDATE_QUESTIONS[split][attr]).format(n=n)
    others = [v for v in FACT_QUESTIONS[attr][1] if v not in (old, new)]
    picked = [new, old] + rng.sample(others, 2)
    rng.shuffle(picked)
    return MCItem(f"Q: {question}\nA:", [" " + v for v in picked], picked.index(new), cluster=n)


def make_negation(rng, world, split):
    story, names, taker, obj = elimination_story(rng, world)
    return MCItem(f"{story}\nQ: Who took the {obj}?\nA:", [" " + n for n in names], names.index(taker))


RANK_QUESTIONS = [
    ("Who has the most points?", 0),
    ("Who has the fewest points?", -1),
    ("Who has the second most points?", 1),
    ("Who has the second fewest points?", -2),
]  # (question, rank)


def make_compare(rng, world, split):
    """A points table of 4-7 people (the corpus has 2-4, and names only the most and the fewest): who has the
    most, the fewest, the second most or the second fewest points."""
    table, names, points = points_table(rng, world, k_range=(4, 7))
    question, rank = rng.choice(RANK_QUESTIONS)
    ranked = [n for _, n in sorted(zip(points, names), reverse=True)]  # most points first (points are distinct)
    return MCItem(f"{table}\nQ: {question}\nA:", [" " + n for n in names], names.index(ranked[rank]))


N_VALIDATION_SCRIPTS = 6  # of the scripts training never asks about: the validation split's (the rest are the test's)


def script_split(split, seed=7):
    """Disjoint groups of the scripts: half for training, and of the other half N_VALIDATION_SCRIPTS for validation
    and the rest for test. Validation and test scripts' continuations are never asked in training."""
    order = random.Random(seed).sample(range(len(SCRIPTS)), len(SCRIPTS))
    half = len(SCRIPTS) // 2
    groups = {
        "train": order[:half],
        "validation": order[half : half + N_VALIDATION_SCRIPTS],
        "test": order[half + N_VALIDATION_SCRIPTS :],
    }
    return [SCRIPTS[i] for i in groups[split]]


def make_continuation(rng, world, split):
    """One or two people, each in a situation; what did one of them do next? With two, the other person's
    plausible continuation is among the choices, so the situation must be bound to the right person."""
    scripts = rng.sample(script_split(split), rng.randint(1, 2))
    names = rng.sample(world.names, len(scripts))
    i = rng.randrange(len(scripts))
    effects = [e for _, e in scripts]
    choices = effects + rng.sample([e for _, e in SCRIPTS if e not in effects], 4 - len(effects))
    rng.shuffle(choices)
    story = " ".join(f"{n} {c}." for n, (c, _) in zip(names, scripts))
    return MCItem(
        f"{story}\nQ: What did {names[i]} do next?\nA:",
        [" " + c for c in choices],
        choices.index(effects[i]),
        cluster=scripts[i][0],
    )


def make_span(rng, world, split):
    k = rng.randint(3, 5)
    names, objs = rng.sample(world.names, k), rng.sample(OBJECTS, k)
    things = [f"the {rng.choice(ADJECTIVES)} {o}" for o in objs]
    i = rng.randrange(k)
    text = " ".join(f"{n} has {t}." for n, t in zip(names, things))
    return GenItem(f"{text}\nQ: What does {names[i]} have?\nA:", things[i])


TASKS = {
    t.name: t
    for t in [
        Task("yesno", "mc", make_yesno),
        Task("who", "mc", make_who),
        Task("facts", "mc", make_facts),
        Task("update", "mc", make_update),
        Task("negation", "mc", make_negation),
        Task("compare", "mc", make_compare),
        Task("continuation", "mc", make_continuation, normalise=True),  # choices of different lengths
        Task("span", "gen", make_span),
    ]
}


def retention_probe(world, n_items=400, seed=4242):
    """World facts in the pretraining corpus's own wording ("Mira lives in" -> Brill), about people that
    fine-tuning never asks about: what fine-tuning destroyed of the base's knowledge (before vs after)."""
    rng = random.Random(f"retention/{seed}")
    people = people_split(world, "test")
    items = []
    for _ in range(n_items):
        n, attr = rng.choice(people), rng.choice(list(FACT_WORDINGS))
        prompt = FACT_WORDINGS[attr][0].split("{v}")[0].format(n=n).rstrip()  # "Mira lives in"
        choices, answer = _choices(rng, world.facts[n][attr], FACT_QUESTIONS[attr][1], 4)
        items.append(MCItem(prompt, choices, answer, cluster=n))
    return items
