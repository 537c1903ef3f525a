"""make tune: the rule, what it reads (validation items and development seeds, never test items or reported seeds),
and how its choices become each method's default learning rate."""

import json

import pytest

import d2lora_min.train.compare as compare_mod
import d2lora_min.train.tune as tune_mod
from d2lora_min.train.data import heldout_text
from d2lora_min.train.evaluate import GenItem, MCItem
from d2lora_min.train.presets import CompareConfig, check_compare_config
from d2lora_min.train.tasks import Split, build_splits, retention_probe
from d2lora_min.train.tune import choose, robustness

TINY = ["--tasks=who,span", "--n_train=8", "--epochs=2", "--n_test=8", "--n_validation=8", "--train.batch_size=4",
        "--checkpoints=2", "--train.progress=false"]  # fmt: skip


@pytest.fixture
def small_probes(monkeypatch):
    monkeypatch.setattr(compare_mod, "retention_probe", lambda world: retention_probe(world, n_items=20))
    monkeypatch.setattr(compare_mod, "heldout_text", lambda world, tok, **kw: heldout_text(world, tok, n_docs=20, **kw))


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
        junk = lambda it: (MCItem("junk", [" a", " b"], 1) if isinstance(it, MCItem) else GenItem("junk", "zzz"))  # noqa: E731
        return {t: Split(s.train, s.validation, [junk(it) for it in s.test]) for t, s in splits.items()}

    return build_poisoned


def test_tuning_never_reads_test_items_or_reported_seeds(tmp_path, small_probes, monkeypatch, capsys):
    argv = TINY + ["--methods", "lora", "--grid", "0.003,0.03", "--seeds", "100"]
    assert tune_mod.main(argv + ["--out", str(tmp_path / "clean")]) == 0
    clean = json.loads((tmp_path / "clean" / "tune.json").read_text())
    monkeypatch.setattr(compare_mod, "build_splits", poisoned(build_splits))
    assert tune_mod.main(argv + ["--out", str(tmp_path / "poisoned")]) == 0
    poisoned_result = json.loads((tmp_path / "poisoned" / "tune.json").read_text())
    assert poisoned_result["lrs"] == clean["lrs"] and poisoned_result["points"] == clean["points"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        tune_mod.main(argv[:-2] + ["--seeds", "0", "--out", str(tmp_path / "x")])  # a reported seed
    assert "development seeds" in capsys.readouterr().err


def test_a_method_runs_at_its_tuned_lr_unless_its_spec_sets_one(tmp_path):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"lrs": {"lora": 0.004, "lora:r=8": 0.002, "d2lora": 0.007}}))
    cfg = CompareConfig(methods=("lora", "lora:r=8", "lora:lr=0.05", "dora", "d2lora:readd_delta=false"), reference="lora",
                        tuned_file=str(tuned))  # fmt: skip
    specs = {s.text: s for s in check_compare_config(cfg)}
    assert (specs["lora"].lr, specs["lora"].lr_from) == (0.004, "tuned")
    assert specs["lora:r=8"].lr == 0.002  # each rank its own
    assert (specs["lora:lr=0.05"].lr, specs["lora:lr=0.05"].lr_from) == (0.05, "spec")
    assert (specs["dora"].lr, specs["dora"].lr_from) == (cfg.train.lr, "shared")  # not tuned: the shared lr
    assert specs["d2lora:readd_delta=false"].lr == 0.007  # a variant runs at its method's tuned lr
    cfg.lr_source = "shared"
    assert all(s.lr == cfg.train.lr for s in check_compare_config(cfg) if s.lr_from != "spec")


def test_a_tuned_file_that_is_not_one_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "tuned.json"
    bad.write_text(json.dumps({"lrs": {"lora": -1}}))
    with pytest.raises(SystemExit):
        compare_mod.main(["--tuned_file", str(bad), "--out", str(tmp_path / "o")])
    assert "regenerate it with `make tune ARGS=--publish`" in capsys.readouterr().err


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "0", "1"])
def test_a_tuned_lr_that_is_not_in_0_1_is_a_usage_error_nan_included(tmp_path, capsys, literal):
    # json.loads takes the literals NaN and Infinity: a NaN lr compares false with everything, so it must be refused
    # for not being in (0, 1), not let through for not being outside it
    bad = tmp_path / "tuned.json"
    bad.write_text('{"lrs": {"lora": %s}}' % literal)
    with pytest.raises(SystemExit) as exit_:
        compare_mod.main(["--methods", "lora", "--tuned_file", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "lrs must map method names to learning rates in (0, 1)" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("lrs, protocol, match", [
    ({"lora": 0.004, "lora:r=4": 0.002}, None, "'lora' and 'lora:r=4' both give the lr of lora at rank 4"),
    ({"lora": 0.004, "lora:r=2": 0.002}, {"r": 2}, "'lora' and 'lora:r=2' both give the lr of lora at rank 2"),
    ({"lora:r=04": 0.004}, None, "'lora:r=04' is not a method name or name:r=rank"),
    ({"lora:alpha=2": 0.004}, None, "'lora:alpha=2' is not a method name or name:r=rank"),
])  # fmt: skip
def test_a_tuned_file_with_two_keys_for_one_method_and_rank_is_a_usage_error(tmp_path, capsys, lrs, protocol, match):
    # compare would look one of them up and silently ignore the other
    bad = tmp_path / "tuned.json"
    bad.write_text(json.dumps({"lrs": lrs, **({"protocol": protocol} if protocol else {})}))
    with pytest.raises(SystemExit) as exit_:
        compare_mod.main(["--methods", "lora", "--tuned_file", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and match in err, err
    bad.write_text(json.dumps({"lrs": {"lora": 0.004, "lora:r=4": 0.002}, "protocol": {"r": 2}}))  # two ranks: fine
    cfg = CompareConfig(methods=("lora", "lora:r=4"), reference="lora", tuned_file=str(bad), r=2)
    assert [s.lr for s in check_compare_config(cfg)] == [0.004, 0.002]


def test_the_shipped_tuned_lrs_cover_the_compared_methods():
    from d2lora_min.train.presets import COMPARED, TUNED_FILE

    tuned = json.loads(TUNED_FILE.read_text())
    assert set(COMPARED) <= set(tuned["lrs"])
    assert all(seed >= 100 for seed in tuned["dev_seeds"])  # chosen on development seeds only
    assert len(tuned["grid"]) >= 6 and max(tuned["grid"]) / min(tuned["grid"]) >= 10**1.5 * 0.999


@pytest.mark.parametrize("flag", ["--methods", "--seeds", "--grid"])
def test_an_empty_flag_is_a_usage_error_not_the_full_default_tune(tmp_path, capsys, flag):
    with pytest.raises(SystemExit):
        tune_mod.main([flag, "", "--out", str(tmp_path / "x")])
    assert f"{flag} is empty" in capsys.readouterr().err
