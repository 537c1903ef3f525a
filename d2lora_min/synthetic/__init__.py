"""The embedded data: a small synthetic world (people, their facts, cause-and-effect scripts), the pretraining corpus
written about it (world.py), and the eight downstream tasks asked about it (tasks.py). Seeded: every user gets the
same numbers, and nothing is downloaded. The harness (d2lora_min.train) runs on any tasks of its Task type; these are
the default.
"""
