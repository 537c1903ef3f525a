"""A small synthetic world and the pretraining corpus written about it (seeded: every user gets the same).

The world has 300 people, each with four fixed facts (home town, job, pet, instrument) and a set of
cause -> effect scripts ("was hungry" -> "ate some bread"). Facts and scripts can only be learned by
pretraining. The corpus is built so that *reading one's own context* pays early (a tiny GPT learns key-first look-up
within minutes of pretraining, and name-first look-up not at all):

  facts       biographies of people, in several wordings                 (world knowledge)
  lookup      "The cup belongs to Mira." ... then the same facts restated in another order and wording, always key
              first ("Mira has the red cup."): predictable only by looking the key up in context
  negation    "The cup belongs to Mira, not to Kalo." and elimination stories ("Kalo did not take the cup. ...")
  states      "The cup is clean. The hat is dirty. ..." then restated: a look-up of one of two states
  points      "Points: 7 Kalo, 3 Mira, 5 Tomo. Most points: Kalo. Fewest points: Mira." (comparison; the
              question word comes before the answer, and each number just before its name)
  scripts     "Kalo was hungry, so Kalo ate some bread." (plausible continuations)
  repeat      a random word sequence, then the same sequence again: copying is the first in-context skill a
              small transformer learns, and the look-up circuit builds on it
  dialogue    people asking each other about the above ("Kalo asked who owns the cup. / Mira said that Tomo owns
              the cup."): the words the fine-tuning questions use

No document uses the "Q: ...\nA: ..." format of the tasks (tasks.py): fine-tuning teaches the format, pretraining
the knowledge and the skills.
"""

import random
from dataclasses import dataclass, field

CITIES = "Brill Carrow Dunmore Elsby Fenwick Greyport Halden Ivel Jarrow Kestle Lowmoor Marsh".split()
JOBS = "baker farmer teacher doctor painter sailor miner weaver singer builder cook guard".split()
PETS = ["cat", "dog", "horse", "goat", "parrot", "rabbit", "fox", "owl"]
INSTRUMENTS = ["drum", "flute", "harp", "horn", "lute", "bell", "pipe", "fiddle"]
OBJECTS = [
    "cup", "book", "hat", "key", "lamp", "coat", "ring", "bag", "pen", "box", "clock", "shoe",
    "kite", "map", "mug", "bowl", "comb", "fork", "vase", "doll", "ball", "sock", "rope", "jar",
]  # fmt: skip
# (cause, effect): "<name> <cause>, so <name> <effect>."
SCRIPTS = [
    ("was hungry", "ate some bread"), ("was thirsty", "drank some water"), ("was tired", "went to bed"),
    ("was cold", "put on a coat"), ("was hot", "opened a window"), ("was bored", "read a book"),
    ("was sad", "called a friend"), ("was dirty", "took a bath"), ("was lost", "looked at a map"),
    ("was late", "ran to the bus"), ("was sick", "went to the doctor"), ("was happy", "sang a song"),
    ("saw the rain", "took an umbrella"), ("heard a knock", "opened the door"), ("found a coin", "put it in a purse"),
    ("smelled smoke", "called for help"), ("dropped a glass", "swept the floor"), ("cut a finger", "put on a bandage"),
    ("missed the train", "waited for the next one"), ("lost the keys", "searched the house"),
    ("won the race", "lifted the cup"), ("broke the chair", "fixed it with glue"), ("had a headache", "took a pill"),
    ("saw a mouse", "jumped on a chair"), ("got a letter", "wrote a reply"), ("felt lonely", "visited a neighbour"),
    ("spilled the milk", "wiped the table"), ("woke up early", "watched the sunrise"), ("had a birthday", "baked a cake"),
    ("heard a song", "started to dance"), ("saw a friend", "waved hello"), ("forgot the lunch", "bought a sandwich"),
    ("got wet", "changed the clothes"), ("was sleepy", "drank some coffee"), ("planted seeds", "watered the garden"),
    ("caught a fish", "cooked it for dinner"), ("tore a shirt", "sewed it up"), ("saw a storm", "closed the shutters"),
    ("had a test", "studied all night"), ("found a puppy", "gave it a name"),
]  # fmt: skip
STATES = [
    ("clean", "dirty"),
    ("open", "closed"),
    ("full", "empty"),
    ("wet", "dry"),
    ("hot", "cold"),
    ("heavy", "light"),
]
ADJECTIVES = ["red", "blue", "green", "old", "new", "big", "small", "white", "black", "round"]
WORDS = ["the", "a", "red", "old", "big", "small", "green", "quiet", "fast", "slow", "river", "hill", "road",
         "tree", "stone", "bird", "sun", "moon", "door", "bread", "water", "window", "garden", "table"]  # fmt: skip


def make_names(n, seed):
    """n distinct two-syllable names such as 'Mira' or 'Talo'."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    names = set()
    while len(names) < n:
        names.add((rng.choice(syllables) + rng.choice(syllables)).capitalize())
    names = sorted(names)  # a set's order depends on the process's hash seed: sort before shuffling
    rng.shuffle(names)
    return names


@dataclass
class World:
    """People and their fixed facts. `seed` decides everything."""

    seed: int = 0
    n_people: int = 300
    names: list = field(init=False)
    facts: dict = field(init=False)  # name -> {"city": ..., "job": ..., "pet": ..., "instrument": ...}

    def __post_init__(self):
        rng = random.Random(self.seed)
        self.names = make_names(self.n_people, self.seed)
        self.facts = {
            name: {
                "city": rng.choice(CITIES),
                "job": rng.choice(JOBS),
                "pet": rng.choice(PETS),
                "instrument": rng.choice(INSTRUMENTS),
            }
            for name in self.names
        }


# Wordings of each fact (all statements, never questions).
FACT_WORDINGS = {
    "city": ["{n} lives in {v}.", "{n} has a home in {v}.", "The home of {n} is in {v}."],
    "job": ["{n} works as a {v}.", "{n} is a {v} by trade.", "The job of {n} is {v}."],
    "pet": ["{n} has a pet {v}.", "{n} keeps a {v} at home.", "The pet of {n} is a {v}."],
    "instrument": ["{n} plays the {v}.", "{n} can play the {v}.", "The instrument of {n} is the {v}."],
}
# Ownership, always key first: the object comes before its owner.
OWNER_WORDINGS = ["The {o} belongs to {n}.", "The owner of the {o} is {n}.", "The {o} is owned by {n}.", "{o}: {n}."]


def owner_sentence(rng, obj, name, wording=None):
    return (wording or rng.choice(OWNER_WORDINGS)).format(o=obj, n=name)


def join_names(names):
    """['A', 'B', 'C'] -> 'A, B and C'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def doc_facts(rng, world):
    people = rng.sample(world.names, rng.randint(1, 3))
    sentences = []
    for n in people:
        for attr in rng.sample(list(FACT_WORDINGS), rng.randint(2, 4)):
            sentences.append(rng.choice(FACT_WORDINGS[attr]).format(n=n, v=world.facts[n][attr]))
    return " ".join(sentences)


def doc_lookup(rng, world):
    k = rng.randint(2, 6)
    objs, names = rng.sample(OBJECTS, k), rng.sample(world.names, k)
    order = rng.sample(range(k), k)
    if rng.random() < 0.3:  # person first: "Mira has the red cup."
        adjs = [rng.choice(ADJECTIVES) for _ in range(k)]
        facts = [f"{n} has the {a} {o}." for n, a, o in zip(names, adjs, objs)]
        return " ".join(facts) + " " + " ".join(facts[i] for i in order)
    first, second = rng.choice(OWNER_WORDINGS), rng.choice(OWNER_WORDINGS)
    intro = " ".join(owner_sentence(rng, o, n, first) for o, n in zip(objs, names))
    recap = " ".join(owner_sentence(rng, objs[i], names[i], second) for i in order)
    return intro + " " + recap


def elimination_story(rng, world):
    """3-4 people, all but one said (some twice) not to have taken an object -> (story, names, taker, obj)."""
    names, obj = rng.sample(world.names, rng.randint(3, 4)), rng.choice(OBJECTS)
    taker = rng.choice(names)
    others = [n for n in names if n != taker]
    lines = [f"{join_names(names)} were in the room."]
    for n in rng.sample(others * 2, len(others) + rng.randint(0, len(others))):
        lines.append(rng.choice([f"{n} did not take the {obj}.", f"The {obj} was not taken by {n}."]))
    return " ".join(lines), names, taker, obj


def doc_negation(rng, world):
    if rng.random() < 0.5:  # "belongs to X, not to Y", then the true owners again
        k = rng.randint(2, 4)
        objs, names = rng.sample(OBJECTS, k), rng.sample(world.names, 2 * k)
        intro = " ".join(f"The {o} belongs to {names[2 * i]}, not to {names[2 * i + 1]}." for i, o in enumerate(objs))
        recap = " ".join(f"The {objs[i]} belongs to {names[2 * i]}." for i in rng.sample(range(k), k))
        return intro + " " + recap
    story, _, taker, obj = elimination_story(rng, world)
    return f"{story} So {taker} took the {obj}."


def states_passage(rng, k_range=(3, 6)):
    """k objects, each in one of a pair of states -> ('The cup is clean. The hat is dirty.', objs, states, pair)."""
    pair = rng.choice(STATES)
    objs = rng.sample(OBJECTS, rng.randint(*k_range))
    states = [rng.choice(pair) for _ in objs]
    return " ".join(f"The {o} is {st}." for o, st in zip(objs, states)), objs, states, pair


def doc_states(rng, world):
    text, objs, states, _ = states_passage(rng)
    order = rng.sample(range(len(objs)), len(objs))
    form = rng.choice(["The {o} is {s}.", "{o}: {s}.", "The {o} was {s}."])
    return text + " " + " ".join(form.format(o=objs[i], s=states[i]) for i in order)


def points_table(rng, world, k_range=(2, 4)):
    """k people (2-4 in the corpus) with distinct points 1-9 -> ('Points: 7 Kalo, 3 Mira.', names, points)."""
    k = rng.randint(*k_range)
    names, points = rng.sample(world.names, k), rng.sample(range(1, 10), k)
    return "Points: " + ", ".join(f"{p} {n}" for n, p in zip(names, points)) + ".", names, points


def doc_points(rng, world):
    table, names, points = points_table(rng, world)
    best, worst = names[points.index(max(points))], names[points.index(min(points))]
    ending = [f"Most points: {best}.", f"Fewest points: {worst}."]
    rng.shuffle(ending)
    return f"{table} " + " ".join(ending)


def doc_scripts(rng, world):
    sentences = []
    for _ in range(rng.randint(1, 3)):
        n = rng.choice(world.names)
        cause, effect = rng.choice(SCRIPTS)
        form = rng.choice(["{n} {c}, so {n} {e}.", "Because {n} {c}, {n} {e}.", "{n} {c}. Soon {n} {e}."])
        sentences.append(form.format(n=n, c=cause, e=effect))
    return " ".join(sentences)


def doc_dialogue(rng, world):
    asker, teller = rng.sample(world.names, 2)
    kind = rng.choice(["owner", "check", "fact", "took", "points", "next"])
    if kind == "owner":
        k = rng.randint(2, 5)
        objs, names = rng.sample(OBJECTS, k), rng.sample(world.names, k)
        context = " ".join(owner_sentence(rng, o, n) for o, n in zip(objs, names))
        i = rng.randrange(k)
        q, a = f"who owns the {objs[i]}", f"{names[i]} owns the {objs[i]}"
    elif kind == "check":
        context, objs, states, pair = states_passage(rng)
        i = rng.randrange(len(objs))
        asked = rng.choice(pair)
        q = f"if the {objs[i]} is {asked}"
        a = "yes" if asked == states[i] else f"no, the {objs[i]} is {states[i]}"
    elif kind == "fact":
        n = rng.choice(world.names)
        attr = rng.choice(list(FACT_WORDINGS))
        question = {"city": "where {n} lives", "job": "what job {n} has", "pet": "what pet {n} keeps",
                    "instrument": "what {n} plays"}[attr]  # fmt: skip
        context, q = "", question.format(n=n)
        a = FACT_WORDINGS[attr][0].format(n=n, v=world.facts[n][attr]).rstrip(".")
    elif kind == "took":
        context, _, taker, obj = elimination_story(rng, world)
        q, a = f"who took the {obj}", f"{taker} took the {obj}"
    elif kind == "points":
        context, names, points = points_table(rng, world)
        most = rng.random() < 0.5
        who = names[points.index(max(points) if most else min(points))]
        word = "most" if most else "fewest"
        q, a = f"who has the {word} points", f"{who} has the {word} points"
    else:  # "next"
        n = rng.choice(world.names)
        cause, effect = rng.choice(SCRIPTS)
        context, q, a = f"{n} {cause}.", f"what {n} did next", f"{n} {effect}"
    lines = ([context] if context else []) + [f"{asker} asked {q}.", f"{teller} said {a}."]
    return "\n".join(lines)


def doc_repeat(rng, world):
    vocab = WORDS + OBJECTS + world.names[:60] + list("ABCDQRSTXYZ")
    seq = " ".join(rng.choice(vocab) for _ in range(rng.randint(6, 20)))
    return f"{seq}. {seq}."


# Share of documents of each kind in the corpus.
DOC_KINDS = {"facts": (doc_facts, 0.18), "lookup": (doc_lookup, 0.20), "states": (doc_states, 0.06),
             "negation": (doc_negation, 0.08), "points": (doc_points, 0.10), "scripts": (doc_scripts, 0.06),
             "repeat": (doc_repeat, 0.20), "dialogue": (doc_dialogue, 0.12)}  # fmt: skip


def corpus_documents(world, n_docs, seed):
    """n_docs documents drawn from DOC_KINDS by their shares; the same seed gives the same documents."""
    rng = random.Random(seed)
    kinds = list(DOC_KINDS)
    weights = [DOC_KINDS[k][1] for k in kinds]
    return [DOC_KINDS[kind][0](rng, world) for kind in rng.choices(kinds, weights, k=n_docs)]


def lookup_probe(world, n_items, seed):
    """The held-out look-up probe, in plain corpus wording: facts, then 'The <obj> belongs to' -> owner.

    Returns [(prompt, choices, answer_index)]: the choices are the passage's three owners (chance 1/3).
    """
    rng = random.Random(seed)
    items = []
    for _ in range(n_items):
        objs, names = rng.sample(OBJECTS, 3), rng.sample(world.names, 3)
        passage = " ".join(owner_sentence(rng, o, n, OWNER_WORDINGS[0]) for o, n in zip(objs, names))
        i = rng.randrange(3)
        items.append((f"{passage} The {objs[i]} belongs to", [" " + n for n in names], i))
    return items


def skill_probes(world, n_items, seed):
    """Diagnostics logged during pretraining, in corpus wording: {name: [(prompt, choices, answer_index)]}.

    points: "Points: 7 Kalo, 3 Mira. Most points:" -> Kalo (chance 1/2 to 1/4)
    states: "The cup is clean. The hat is dirty. ... The hat is" -> dirty (chance 1/2)
    """
    rng = random.Random(seed)
    probes = {"points": [], "states": []}
    for _ in range(n_items):
        table, names, points = points_table(rng, world)
        most = rng.random() < 0.5
        who = names.index(names[points.index(max(points) if most else min(points))])
        probes["points"].append((f"{table} {'Most' if most else 'Fewest'} points:", [" " + n for n in names], who))
        text, objs, states, pair = states_passage(rng)
        i = rng.randrange(len(objs))
        probes["states"].append((f"{text} The {objs[i]} is", [" " + pair[0], " " + pair[1]], pair.index(states[i])))
    return probes
