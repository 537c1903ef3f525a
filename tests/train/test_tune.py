"""make tune (tune.py): the rule, what it reads (validation items and development seeds, never test items or reported
seeds, never the tuned file it regenerates), and what --publish may and may not replace. How its choices become each
method's learning rate: tests/train/test_settings.py."""

import json
import shutil

import pytest

import d2lora_min.train.compare as compare_mod
import d2lora_min.train.tune as tune_mod
from d2lora_min.train.settings import TUNED_FILE, resolve
from d2lora_min.train.specs import roles
from d2lora_min.train.tasks import GenItem, MCItem, Split, build_splits
from d2lora_min.train.tune import choose, robustness


def test_the_rule_takes_the_best_eligible_lr_and_breaks_ties_towards_the_smaller():
    points = {"a": [(1e-3, 0.50, 0, 1), (1e-2, 0.70, 0, 1), (3e-2, 0.70, 0, 1)],  # a tie: the smaller lr
              "b": [(1e-3, 0.60, 0, 1), (1e-2, 0.90, 0, 1), (3e-2, 0.80, 0, 1)],  # the best diverged on a seed
              "c": [(1e-3, 0.40, 0, 1)]}  # fmt: skip
    flagged = {"a": {}, "b": {1e-2: True}, "c": {1e-3: True}}
    chosen = choose(points, flagged)
    assert chosen == {"a": 1e-2, "b": 3e-2}  # c: nothing eligible, so no tuned lr (it runs at the shared one)
    assert choose(points, flagged) == chosen  # a pure function of the points
    spans = robustness(points, chosen, flagged)
    assert spans["a"][:2] == (1e-2, 3e-2) and spans["b"][:2] == (3e-2, 3e-2)
    assert spans["a"][3] == pytest.approx(0.2) and spans["a"][4] == pytest.approx(0.0)  # lost one step below / above
    assert spans["b"][4] is None  # the grid's last point has no neighbour above


def poisoned(build):
    """build_splits whose test items are garbage: if tuning read them, its numbers would change."""

    def build_poisoned(*args, **kwargs):
        splits = build(*args, **kwargs)
        junk = lambda it: MCItem("junk", [" a", " b"], 1) if isinstance(it, MCItem) else GenItem("junk", "zzz")  # noqa: E731
        return {t: Split(s.train, s.validation, [junk(it) for it in s.test]) for t, s in splits.items()}

    return build_poisoned


def test_tuning_never_reads_test_items_or_reported_seeds(tmp_path, tiny, monkeypatch, capsys):
    budget = {"tasks": "who,span", "epochs": 2, "n_validation": 8, "checkpoints": 2}  # tune scores validation items
    argv = lambda seed, out: tiny.argv("--methods", "lora", "--grid", "0.003,0.03", out=out, seeds=seed, **budget)  # noqa: E731
    assert tune_mod.main(argv(100, tmp_path / "clean")) == 0
    clean = json.loads((tmp_path / "clean" / "tune.json").read_text())
    monkeypatch.setattr(compare_mod, "build_splits", poisoned(build_splits))
    assert tune_mod.main(argv(100, tmp_path / "poisoned")) == 0
    poisoned_result = json.loads((tmp_path / "poisoned" / "tune.json").read_text())
    assert poisoned_result["lrs"] == clean["lrs"] and poisoned_result["points"] == clean["points"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        tune_mod.main(argv(0, tmp_path / "x"))  # a reported seed
    assert "development seeds" in capsys.readouterr().err


def test_tune_never_reads_the_tuned_file(tmp_path):
    # a damaged tuned_lrs.json must not stop the command that regenerates it
    cfg = tune_mod.tune_config(("lora",), (100,), (0.01,))
    damaged = tmp_path / "tuned.json"
    damaged.write_text("{")
    cfg.tuned_file = str(damaged)
    assert all(s.lr_from == "spec" for s in resolve(cfg).specs)


@pytest.mark.parametrize("flag", ["--methods", "--seeds", "--grid"])
def test_an_empty_flag_is_a_usage_error_not_the_full_default_tune(tmp_path, capsys, flag):
    with pytest.raises(SystemExit):
        tune_mod.main([flag, "", "--out", str(tmp_path / "x")])
    assert f"{flag} is empty" in capsys.readouterr().err


# --- --publish ---------------------------------------------------------------------------------------------------


def test_a_partial_publish_under_other_settings_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    tuned = tmp_path / "tuned_lrs.json"
    shutil.copyfile(TUNED_FILE, tuned)
    monkeypatch.setattr(tune_mod, "TUNED_FILE", tuned)
    before = tuned.read_text()
    with pytest.raises(SystemExit) as exit_:
        tune_mod.main(["--methods", "lora", "--n_train=8", "--publish", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--publish would drop the tuned learning rates of d2lora, dora, lora:r=8" in err
    assert tuned.read_text() == before
    # under the committed settings a partial publish keeps the others
    cfg = tune_mod.tune_config(("lora",))
    assert set(tune_mod.kept_lrs(("lora",), cfg)) == {"d2lora", "dora", "lora:r=8"}


def test_a_partial_publish_does_not_merge_into_an_unreadable_file(tmp_path, monkeypatch):
    damaged = tmp_path / "tuned_lrs.json"
    damaged.write_text("{")
    monkeypatch.setattr(tune_mod, "TUNED_FILE", damaged)
    with pytest.raises(ValueError, match="cannot merge into it"):
        tune_mod.kept_lrs(("lora",), tune_mod.tune_config(("lora",)))
    assert tune_mod.kept_lrs(tuple(roles(4).values()), tune_mod.tune_config()) == {}  # a complete tune replaces it
