"""What the whole suite shares: Hypothesis settings, the `docs` marker, and the `tiny` fixture for tiny comparisons.

Hypothesis: no deadline (unit tests never carry a wall-clock limit). The default profile is derandomized, so every run
of `make test` - in CI and on a laptop - draws the same examples; HYPOTHESIS_PROFILE=explore draws new ones.

Tests marked `docs` pin text a learner may edit (the README's line count of the method files): `make test` leaves
them out, CI runs them with `pytest -m docs`. Any -m given on the command line decides on its own.
"""

import json
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "docs: pins docs text a learner may edit; not in make test (pytest -m docs)")


def pytest_collection_modifyitems(config, items):
    if config.option.markexpr:  # the command line chose
        return
    kept = [item for item in items if item.get_closest_marker("docs") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("docs") is not None])
        items[:] = kept


class TinyCompare:
    """The smallest comparison that trains, scores and writes everything a real one does: one task, 8 items, one epoch
    in batches of 4, one checkpoint, seed 0. tiny.argv(...) is its command line, tiny(...) runs `d2lora compare` on it."""

    SETTINGS = {"seeds": "0", "tasks": "who", "n_train": 8, "epochs": 1, "n_test": 8, "train.batch_size": 4,
                "checkpoints": 1, "train.progress": "false"}  # fmt: skip

    def argv(self, *args, out=None, **settings):
        """The tiny settings (each one of them replaced by a keyword of the same name, dropped where it is None),
        then args, then --out."""
        chosen = {**self.SETTINGS, **settings}
        flags = [f"--{k}={v}" for k, v in chosen.items() if v is not None]
        return flags + list(args) + (["--out", str(out)] if out is not None else [])

    def __call__(self, *args, out, **settings):
        from d2lora_min.train.compare import main

        return main(self.argv(*args, out=out, **settings))

    @staticmethod
    def run_files(out):
        """The run JSONs under out/runs, sorted."""
        return sorted((out / "runs").glob("*.json"))

    def runs(self, out):
        """{method spec: its run's result} under out/runs."""
        results = [json.loads(p.read_text()) for p in self.run_files(out)]
        return {r["method"]: r for r in results}


@pytest.fixture
def tiny(monkeypatch):
    """Tiny comparisons (TinyCompare), with small retention probes: the tests that use them are about what is run,
    written and trusted, not about the numbers."""
    import d2lora_min.train.compare as compare_mod
    from d2lora_min.synthetic.tasks import retention_probe
    from d2lora_min.train.data import heldout_text

    monkeypatch.setattr(compare_mod, "retention_probe", lambda world: retention_probe(world, n_items=20))
    monkeypatch.setattr(compare_mod, "heldout_text", lambda world, tok, **kw: heldout_text(world, tok, n_docs=20, **kw))
    return TinyCompare()
