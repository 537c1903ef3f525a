"""The settings of a comparison (settings.py), its method specs (specs.py) and the command-line plumbing (cli.py):
specs parse with their types and defaults or name what is wrong, each method listed once by what it runs, the roles
and the budget derived from the settings, every override checked, and the tuned learning rates read only from a file
that is one (a usage error naming it otherwise, never a hang)."""

import json
import math
import os

import pytest

from d2lora_min.train.cli import apply_overrides, config_help, first_line
from d2lora_min.train.compare import main as compare_main
from d2lora_min.train.settings import PRESETS, TUNED_FILE, CompareConfig, apply_preset, budget, preset, resolve
from d2lora_min.train.specs import SHARED_LR, parse_method_spec, roles, split_methods, with_lr


def usage_error(argv, capsys):
    """compare's stderr for argv, which must be a usage error (exit status 2) before any training."""
    with pytest.raises(SystemExit) as exit_:
        compare_main(argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and "s training" not in captured.out, captured
    return captured.err


# --- method specs -----------------------------------------------------------------------------------------------


def test_method_specs_parse_with_types_and_defaults():
    cfg = CompareConfig()
    s = parse_method_spec("d2lora:r=8,project=false,tau_init=0.25", cfg)
    assert (s.name, s.r, s.alpha, s.options) == ("d2lora", 8, 16.0, {"project": False, "tau_init": 0.25})
    assert parse_method_spec("lora", cfg).alpha == cfg.alpha_over_r * cfg.r
    assert parse_method_spec("full", cfg).lr == cfg.full_lr
    assert parse_method_spec("lora:alpha=3,lr=0.001", cfg).alpha == 3.0


@pytest.mark.parametrize(
    "spec, match",
    [
        ("lorra", "unknown method 'lorra'.*valid methods: lora, dora, d2lora, base, full"),
        ("d2lora:projekt=false", "unknown key 'projekt'.*valid keys: r, alpha, dropout, lr, targets, tau_init"),
        ("lora:tau_init=0.1", "unknown key 'tau_init' for method 'lora'"),
        ("d2lora:project", "is not key=value"),
        ("d2lora:project=maybe", "expected true or false"),
        ("d2lora:project=no", "expected true or false"),  # true and false only, as every bool setting
        ("d2lora:learn_tau=on", "expected true or false"),
        ("d2lora:learn_tau=1", "expected true or false"),
        ("lora:", "has a colon but no key=value"),
        ("lora:targets=q_proj++v_proj", "has an empty module name"),
        ("lora:targets=q_proj+", "has an empty module name"),
        ("lora:targets=", "has an empty module name"),
    ],
)
def test_bad_method_specs_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_method_spec(spec, CompareConfig())


def test_methods_take_commas_as_well_as_spaces(tmp_path):
    cfg = CompareConfig()
    for text in ("lora,d2lora:r=8,project=false", "lora d2lora:r=8,project=false", "lora, d2lora:r=8, project=false"):
        assert split_methods(text) == ["lora", "d2lora:r=8,project=false"]
    for text in ("lora r=4", "lora,r=4", "d2lora:r=8 project=false"):  # keys after a colon, never on their own
        with pytest.raises(ValueError, match="is not a method"):
            split_methods(text)
    assert [s.text for s in (parse_method_spec(m, cfg) for m in split_methods("base,lora,dora"))] == [
        "base",
        "lora",
        "dora",
    ]


def test_one_method_under_two_spellings_is_refused_but_two_lr_roles_are_not(tmp_path):
    tuned = tmp_path / "tuned.json"
    tuned.write_text('{"lrs": {"lora": 0.01, "d2lora": 0.01}}')
    twice = [("lora", "lora:r=4"), ("lora", "lora:alpha=8,dropout=0"), ("lora:lr=0.01", "lora:lr=1e-2,r=4"),
             ("d2lora", "d2lora:tau_init=0.5,project=true,targets=attn"), ("full:lr=1e-3", "full:lr=0.001"),
             ("base", "base")]  # fmt: skip
    for methods in twice:
        cfg = CompareConfig(methods=methods, reference=methods[0], tuned_file=str(tuned), lr_source="tuned")
        with pytest.raises(ValueError, match="a method is listed twice"):
            resolve(cfg).specs
    # the tuned (or shared) lr and a spec's own are two roles, even at one value: replicate lists both
    for lr_source in ("tuned", "shared"):
        cfg = CompareConfig(methods=("lora", "lora:lr=0.01", "d2lora", "d2lora:lr=0.01"), reference="lora",
                            tuned_file=str(tuned), lr_source=lr_source)  # fmt: skip
        specs = resolve(cfg).specs
        assert [s.lr for s in specs] == [0.01] * 4 and [s.lr_from for s in specs] == [lr_source, "spec"] * 2


# --- the roles, the presets and the budget -----------------------------------------------------------------------


def test_the_roles_and_the_presets_follow_the_rank():
    # LoRA(r), LoRA(2r), DoRA(r), D2-LoRA(r) from one place: with --r=8 every preset compares against LoRA(16)
    assert roles(4) == {"LoRA(r)": "lora", "LoRA(2r)": "lora:r=8", "DoRA(r)": "dora", "D2-LoRA(r)": "d2lora"}
    assert roles(8)["LoRA(2r)"] == "lora:r=16" and roles(4, SHARED_LR)["LoRA(2r)"] == with_lr("lora:r=8", SHARED_LR)
    assert (with_lr("lora", 0.01), with_lr("lora:r=8", 0.01)) == ("lora:lr=0.01", "lora:r=8,lr=0.01")
    for name in PRESETS:
        chosen = preset(name, r=8)
        assert chosen["reference"] in chosen["methods"], name
        if name != "ablate":
            assert "lora:r=16" in chosen["methods"] and chosen["reference"] == "lora:r=16", name
    assert CompareConfig().methods == preset("default")["methods"] == ("base", *roles(4).values())


def test_every_presets_reference_is_one_of_its_methods():
    for preset in PRESETS:
        cfg = apply_preset(CompareConfig(), preset)
        assert cfg.reference in cfg.methods, preset


def test_compare_steps_follow_the_budget():
    cfg = CompareConfig(n_train=100, epochs=2, tasks=("yesno", "who", "facts"))
    tcfg = budget(cfg)
    assert tcfg.steps == 2 * math.ceil(3 * 100 / cfg.train.batch_size)
    assert tcfg.warmup_steps == round(cfg.warmup_frac * tcfg.steps) and tcfg.checkpoint_every < tcfg.steps


# --- overrides and the command line --------------------------------------------------------------------------------


def test_config_overrides_and_their_errors():
    cfg = apply_overrides(CompareConfig(), ["--train.lr=0.5", "--pretrain.model.n_layer=3", "--seeds=1,2"])
    assert cfg.train.lr == 0.5 and cfg.pretrain.model.n_layer == 3 and cfg.seeds == (1, 2)
    with pytest.raises(ValueError, match="unknown setting 'train.stepz'"):
        apply_overrides(CompareConfig(), ["--train.stepz=3"])
    with pytest.raises(ValueError, match="two dashes"):  # one dash, or none, is not a setting
        apply_overrides(CompareConfig(), ["-n_test=3"])


def test_space_separated_overrides_work_like_the_equals_form():
    cfg = apply_overrides(CompareConfig(), ["--n_test", "200", "--train.lr=0.5"])
    assert cfg.n_test == 200 and cfg.train.lr == 0.5


def test_the_help_shows_bool_settings_as_the_parser_takes_them():
    shown = [
        line.strip() for line in config_help(CompareConfig()) if line.strip().startswith(("--packed=", "--fused="))
    ]
    assert shown == ["--packed=true", "--fused=false"]
    cfg = apply_overrides(CompareConfig(), shown)
    assert (cfg.packed, cfg.fused) == (True, False)
    with pytest.raises(ValueError, match="expected true or false, got 'yes'"):
        apply_overrides(CompareConfig(), ["--packed=yes"])


def test_a_usage_error_from_torch_shows_no_cpp_frames():
    error = RuntimeError("bad thing\nException raised from foo at bar.cpp:1\nframe #0: baz")
    assert first_line(error) == "bad thing"


# --- the tuned learning rates --------------------------------------------------------------------------------------


def test_a_method_runs_at_its_tuned_lr_unless_its_spec_sets_one(tmp_path):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"lrs": {"lora": 0.004, "lora:r=8": 0.002, "d2lora": 0.007}}))
    cfg = CompareConfig(methods=("lora", "lora:r=8", "lora:lr=0.05", "dora", "d2lora:readd_delta=false"), reference="lora",
                        tuned_file=str(tuned))  # fmt: skip
    specs = {s.text: s for s in resolve(cfg).specs}
    assert (specs["lora"].lr, specs["lora"].lr_from) == (0.004, "tuned")
    assert specs["lora:r=8"].lr == 0.002  # each rank its own
    assert (specs["lora:lr=0.05"].lr, specs["lora:lr=0.05"].lr_from) == (0.05, "spec")
    assert (specs["dora"].lr, specs["dora"].lr_from) == (cfg.train.lr, "shared")  # not tuned: the shared lr
    assert specs["d2lora:readd_delta=false"].lr == 0.007  # a variant runs at its method's tuned lr
    cfg.lr_source = "shared"
    assert all(s.lr == cfg.train.lr for s in resolve(cfg).specs if s.lr_from != "spec")


def test_the_shipped_tuned_lrs_cover_the_compared_methods():
    tuned = json.loads(TUNED_FILE.read_text())
    assert set(roles(4).values()) <= set(tuned["lrs"])
    assert all(seed >= 100 for seed in tuned["dev_seeds"])  # chosen on development seeds only
    assert len(tuned["grid"]) >= 6 and max(tuned["grid"]) / min(tuned["grid"]) >= 10**1.5 * 0.999


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "0", "1", "-1"])
def test_a_tuned_lr_that_is_not_in_0_1_is_a_usage_error_nan_included(tmp_path, capsys, literal):
    # json.loads takes the literals NaN and Infinity: a NaN lr compares false with everything, so it must be refused
    # for not being in (0, 1), not let through for not being outside it
    bad = tmp_path / "tuned.json"
    bad.write_text('{"lrs": {"lora": %s}}' % literal)
    with pytest.raises(SystemExit) as exit_:
        compare_main(["--methods", "lora", "--tuned_file", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "lrs must map method names to learning rates in (0, 1)" in err, err
    assert "regenerate it with `make tune ARGS=--publish`" in err
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
        compare_main(["--methods", "lora", "--tuned_file", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and match in err, err
    bad.write_text(json.dumps({"lrs": {"lora": 0.004, "lora:r=4": 0.002}, "protocol": {"r": 2}}))  # two ranks: fine
    cfg = CompareConfig(methods=("lora", "lora:r=4"), reference="lora", tuned_file=str(bad), r=2)
    assert [s.lr for s in resolve(cfg).specs] == [0.004, 0.002]


def test_a_tuned_file_that_does_not_exist_is_a_usage_error_not_the_shared_lr(tmp_path, tiny, capsys):
    err = usage_error(
        tiny.argv("--methods", "lora", "--tuned_file", str(tmp_path / "tuned_lr.json"), out=tmp_path), capsys
    )
    assert "no tuned learning rates at" in err and "--lr_source=shared" in err


@pytest.mark.parametrize("given", ["", " "])
def test_an_empty_tuned_file_setting_says_it_is_empty(tmp_path, tiny, capsys, given):
    # Path("") is the current folder: the error must be about what was given, not about "."
    err = usage_error(tiny.argv("--methods", "lora", f"--tuned_file={given}", out=tmp_path / "o"), capsys)
    assert "tuned_file is empty" in err and "is a folder" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder", "nested"])
def test_a_tuned_file_that_is_a_special_file_is_an_error_not_a_hang(tmp_path, tiny, capsys, kind):
    path = tmp_path / "tuned.json"
    if kind == "fifo":
        os.mkfifo(path)  # opening it would block until a writer came
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")  # reading it would never end
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_text('{"lrs": ' * 100_000 + "{}" + "}" * 100_000)
    err = usage_error(tiny.argv("--methods", "lora", "--tuned_file", str(path), out=tmp_path / "o"), capsys)
    assert str(path) in err and "not readable" in err
