"""Reliability: nothing trusted that can lie, nothing finished overwritten, every error up front.

Each test is one case of bad inputs, corrupted files, kills, full disks or concurrent runs: the model's mode after
loading, flagged runs, resume and cache validation, adapter files that lie, reruns that would overwrite, and settings
that must fail early, in one line, never with a traceback.
"""

import errno
import json
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import d2lora_min.train.compare as compare_mod
from d2lora_min.nn import adapter_layers, inject_adapters, load_adapters, load_adapter_state_dict, save_adapters
from d2lora_min.nn.checkpoint import ADAPTER_FILE, CONFIG_KEY, read_adapter_file
from d2lora_min.train import resume as resume_mod
from d2lora_min.train.compare import main as compare_main
from d2lora_min.train.data import heldout_text
from d2lora_min.train.pretrain import SHIPPED_BASE, load_base
from d2lora_min.train.tasks import retention_probe
from d2lora_min.train.resume import CHECKPOINT, CheckpointMismatch, read_checkpoint_state, write_checkpoint_state
from d2lora_min.train.trainer import TrainConfig, train
from tiny_gpt import GPT, GPTConfig

from .helpers import perturb_adapters

SMALL = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=8)
TINY = ["--seeds=0", "--tasks=who", "--n_train=8", "--epochs=2", "--n_test=8", "--train.batch_size=4",
        "--checkpoints=2", "--train.progress=false"]  # fmt: skip


def small_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(SMALL)


@pytest.fixture
def small_probes(monkeypatch):
    """Small retention probes: these tests are about what is written and trusted, not about the numbers."""
    monkeypatch.setattr(compare_mod, "retention_probe", lambda world: retention_probe(world, n_items=20))
    monkeypatch.setattr(compare_mod, "heldout_text", lambda world, tok, **kw: heldout_text(world, tok, n_docs=20, **kw))


def run_files(out):
    return sorted((out / "runs").glob("*.json"))


# --- 1. a loaded adapter takes the model's mode ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["inject", "load"])
def test_adapters_put_into_an_eval_model_are_in_eval_mode(how, tmp_path):
    trained = inject_adapters(small_gpt(), "d2lora", r=2, alpha=4, dropout=0.5)
    perturb_adapters(trained, seed=1)
    save_adapters(trained, tmp_path)
    model = small_gpt().eval()
    if how == "inject":
        inject_adapters(model, "d2lora", r=2, alpha=4, dropout=0.5)
    else:
        load_adapters(model, tmp_path)
    assert adapter_layers(model) and not any(m.training for m in model.modules())
    x = torch.randint(0, SMALL.vocab_size, (2, 8))
    with torch.no_grad():
        a, b = model(x)[0], model(x)[0]  # dropout would make two passes differ
    assert torch.equal(a, b)
    if how == "load":
        with torch.no_grad():
            assert torch.allclose(a, trained.eval()(x)[0], atol=1e-6)


def test_a_layer_shared_under_two_names_is_adapted_under_both_and_merges_under_both():
    from d2lora_min.nn import merge_adapters

    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    inject_adapters(model, "lora", r=1, alpha=1, targets=("1.0",))
    assert model[0][0] is model[1][0] and len(adapter_layers(model)) == 1
    merge_adapters(model)
    assert type(model[0][0]) is nn.Linear and model[0][0] is model[1][0]


def test_multihead_attention_out_proj_is_refused_not_bypassed():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="MultiheadAttention, which reads its weight directly"):
        inject_adapters(model, "lora", targets=("out_proj",))
    assert not adapter_layers(model)


# --- 2, 3. runs that diverged or never moved are said so, in every table -------------------------------------------


def test_a_diverged_run_is_marked_and_left_out_of_the_differences(tmp_path, small_probes, capsys):
    out = tmp_path / "out"
    assert compare_main(TINY + ["--methods", "lora lora:lr=1e30", "--reference=lora", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    runs = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in run_files(out)}
    assert runs["lora:lr=1e30"]["status"] == "diverged" and runs["lora"]["status"] == "ok"
    assert str(out / "work") not in printed  # the console never names the folder it then deletes
    results = (out / "results.md").read_text()
    assert "LoRA(r=4), lr=1e+30 [diverged: seed 0]" in results  # the score table marks it
    assert "left out of every difference" in results
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["lora:lr=1e30"]["flags"] == {"0": "diverged"} and "vs_reference" not in rows["lora:lr=1e30"]


def test_a_run_whose_gradient_always_overflows_is_marked_never_moved(tmp_path, small_probes):
    out = tmp_path / "out"
    assert compare_main(TINY + ["--methods", "lora", "--alpha_over_r=1e19", "--out", str(out)]) == 0
    run = json.loads(run_files(out)[0].read_text())
    assert run["status"] == "never moved" and run["skipped_updates"] == run["steps"]
    assert "[never moved: seed 0]" in (out / "results.md").read_text()


def test_weight_decay_that_flips_signs_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        compare_main(["--train.weight_decay=1e20"])
    assert "would flip the weights' signs" in capsys.readouterr().err


# --- 4. resume: the full run key, finite tensors only ----------------------------------------------------------------


def counting(step):
    g = torch.Generator().manual_seed(step)
    seq = (torch.randint(0, 32, (4, 1), generator=g) + torch.arange(9)) % 32
    return seq[:, :-1], seq[:, 1:]


def quiet(**kw):
    return TrainConfig(**{"progress": False, "lr": 1e-2, "warmup_steps": 1, **kw})


def test_resume_refuses_a_checkpoint_of_another_run_key(tmp_path):
    train(inject_adapters(small_gpt(), "lora", r=2, alpha=4), counting, quiet(steps=2), out_dir=tmp_path, key="alpha=4")
    other = inject_adapters(small_gpt(), "lora", r=2, alpha=8)  # same tensors, another alpha: another run
    with pytest.raises(CheckpointMismatch, match="run key"):
        train(other, counting, quiet(steps=4), out_dir=tmp_path, key="alpha=8")


def test_resume_refuses_non_finite_tensors(tmp_path):
    train(inject_adapters(small_gpt(), "lora", r=2, alpha=4), counting, quiet(steps=4), out_dir=tmp_path)
    state = read_checkpoint_state(tmp_path / CHECKPOINT)
    name = next(iter(state["trainable"]))
    state["trainable"][name] = torch.full_like(state["trainable"][name], float("nan"))
    write_checkpoint_state(tmp_path / CHECKPOINT, state)
    with pytest.raises(CheckpointMismatch, match="NaN or Inf"):
        train(inject_adapters(small_gpt(), "lora", r=2, alpha=4), counting, quiet(steps=4), out_dir=tmp_path)


def test_a_full_disk_during_a_checkpoint_is_a_plain_oserror(tmp_path, monkeypatch):
    real_open = open

    def full_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode:
            def write(_data):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr(resume_mod, "open", full_disk, raising=False)
    with pytest.raises(OSError) as e:
        train(inject_adapters(small_gpt(), "lora", r=2, alpha=4), counting, quiet(steps=2), out_dir=tmp_path)
    assert e.value.errno == errno.ENOSPC and not (tmp_path / CHECKPOINT).exists()


# --- 5, 6, 16. adapter files: derived tensors from the base, a checksum, bounded sizes ------------------------------


def saved(tmp_path, method="d2lora"):
    model = inject_adapters(small_gpt(), method, r=2, alpha=4, targets=("q_proj", "fc_out"))
    perturb_adapters(model, seed=1)
    save_adapters(model, tmp_path)
    return model


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_stored_target_norms_that_are_not_the_bases_are_refused(tmp_path, value):
    from d2lora_min.nn import adapter_config, adapter_state_dict

    model = saved(tmp_path)
    state = adapter_state_dict(model)
    key = next(k for k in state if k.endswith("target_norm"))
    edited = {**state, key: torch.full_like(state[key], value)}
    with pytest.raises(ValueError, match="not those of this model's base weight"):
        load_adapter_state_dict(small_gpt(), edited, adapter_config(model))


def test_an_adapter_for_another_base_is_refused(tmp_path):
    saved(tmp_path)
    with pytest.raises(ValueError, match="trained on another base weight"):
        load_adapters(small_gpt(seed=1), tmp_path)  # same shapes, other weights


def test_one_flipped_byte_in_an_adapter_file_is_refused(tmp_path):
    saved(tmp_path, "lora")
    path = tmp_path / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the last bytes are tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the checksum"):
        load_adapters(small_gpt(), tmp_path)


@pytest.mark.parametrize("edit", [("\"alpha\": 4.0", "\"alpha\": 5.0"), ("\"dropout\": 0.0", "\"dropout\": 0.2"),
                                  ("\"readd_delta\": true", "\"readd_delta\": false"), ("\"format\": 4, ", "")],
                         ids=["alpha", "dropout", "option", "format removed"])
def test_an_edited_config_in_an_adapter_file_is_refused(tmp_path, edit):
    """The checksum covers the config: one changed digit of alpha (a single flipped bit: '4' -> '5') is refused, and
    so is a file whose format entry was removed."""
    saved(tmp_path, "d2lora")
    path = tmp_path / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    assert edit[0] in metadata[CONFIG_KEY]
    save_file(tensors, str(path), metadata={**metadata, CONFIG_KEY: metadata[CONFIG_KEY].replace(*edit)})
    with pytest.raises(ValueError, match="do not match the checksum|has no format; this version"):
        load_adapters(small_gpt(), tmp_path)


def test_a_file_without_its_checksum_says_so(tmp_path):
    saved(tmp_path, "lora")
    path = tmp_path / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={CONFIG_KEY: metadata[CONFIG_KEY]})  # the checksum entry dropped
    with pytest.raises(ValueError, match="no checksum is stored"):
        load_adapters(small_gpt(), tmp_path)


def test_a_deeply_nested_or_huge_rank_config_is_a_clear_error_before_any_allocation(tmp_path):
    saved(tmp_path, "lora")
    path = tmp_path / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={CONFIG_KEY: '{"x": ' * 100_000 + "{}" + "}" * 100_000})  # nested 100,000 deep
    with pytest.raises(ValueError, match="not a readable d2lora_min adapter file"):
        load_adapters(small_gpt(), tmp_path)
    saved(tmp_path, "lora")
    tensors, config = read_adapter_file(tmp_path / ADAPTER_FILE)
    with pytest.raises(ValueError, match="unknown option"):
        load_adapter_state_dict(small_gpt(), tensors, {**config, "options": {"x": {"x": {}}}})
    with pytest.raises(ValueError, match="rank r=1000000000 is larger than any dimension"):
        load_adapter_state_dict(small_gpt(), tensors, {**config, "r": 10**9})


# --- 7, 8, 10. the run cache: validated, checksummed, never overwritten by other settings --------------------------


def test_an_edited_or_relabelled_run_json_is_recomputed_not_trusted(tmp_path, small_probes, capsys):
    out = tmp_path / "out"
    argv = TINY + ["--methods", "lora dora", "--reference=lora", "--out", str(out)]
    compare_main(argv)
    clean = {p.name: json.loads(p.read_text()) for p in run_files(out)}
    dora_path = next(p for p in run_files(out) if clean[p.name]["method"] == "dora")
    edited = {**clean[dora_path.name], "items": {**clean[dora_path.name]["items"]}}
    edited["items"]["who"] = {**edited["items"]["who"], "correct_sum": [1] * 8}
    dora_path.write_text(json.dumps(edited))
    capsys.readouterr()
    compare_main(argv)
    assert "checksum does not match" in capsys.readouterr().out
    assert json.loads(dora_path.read_text())["items"] == clean[dora_path.name]["items"]

    relabelled = {**clean[dora_path.name], "method": "lora"}
    from d2lora_min.train.cache import sealed

    dora_path.write_text(json.dumps(sealed({k: v for k, v in relabelled.items() if k != "sha256"})))
    compare_main(argv)
    assert "method is 'lora', expected 'dora'" in capsys.readouterr().out
    methods = [r["method"] for r in json.loads((out / "results.json").read_text())["rows"]]
    assert methods == ["lora", "dora"]


@pytest.mark.parametrize("content", ['{"key": "x"}', "[1, 2]", '"text"', "3", "folder"])
def test_a_malformed_cached_run_is_recomputed_with_one_line(tmp_path, small_probes, capsys, content):
    out = tmp_path / "out"
    argv = TINY + ["--methods", "lora", "--out", str(out)]
    compare_main(argv)
    path = run_files(out)[0]
    path.unlink()
    if content == "folder":
        path.mkdir()
    else:
        path.write_text(content)
    capsys.readouterr()
    if content == "folder":  # a folder where the result belongs: a usage error before any work, and nothing deleted
        with pytest.raises(SystemExit) as exit_:
            compare_main(argv)
        captured = capsys.readouterr()
        assert exit_.value.code == 2 and "is in the way of a run's output" in captured.err and "s training" not in captured.out
        assert path.is_dir()
    else:
        assert compare_main(argv) == 0
        assert "recomputing" in capsys.readouterr().out
        assert json.loads(path.read_text())["method"] == "lora"


def test_a_rerun_with_other_settings_keeps_the_earlier_finished_result(tmp_path, small_probes):
    out = tmp_path / "out"
    compare_main(TINY + ["--methods", "lora", "--out", str(out)])
    first = run_files(out)
    compare_main(TINY + ["--methods", "lora", "--out", str(out), "--n_test=7"])
    assert len(run_files(out)) == 2 and all(p.exists() for p in first)
    run = json.loads(first[0].read_text())  # and the run checked a merge that really happened
    assert run["merged_adapter_layers"] == 0 and run["max_logit_diff"] <= 1e-4 and set(run["merge_gap_pp"]) == {"who"}


# --- 9. base.json ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [["model.safetensors"], "model.safetensors", None])
def test_a_base_json_whose_files_field_is_not_a_mapping_is_a_clear_error(tmp_path, files):
    import shutil

    folder = tmp_path / "base"
    shutil.copytree(SHIPPED_BASE, folder)
    meta = json.loads((folder / "base.json").read_text())
    meta["files"] = files
    (folder / "base.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="base.json is unreadable"):
        load_base(folder)
    (folder / "base.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=r"base/base.json is unreadable"):
        load_base(folder)


# --- 11, 15. plots: unique temporary files, a full disk is one line -----------------------------------------------------


def test_a_plot_is_written_through_a_temporary_file_of_its_own(tmp_path):
    from d2lora_min.train.plots import plot_losses

    path = tmp_path / "loss_curves.png"
    (tmp_path / "loss_curves.png.tmp.png").mkdir()  # a fixed temporary name, taken by another writer
    plot_losses([{"label": "m", "seed": 0, "losses": [3.0, 2.0, 1.0]}], path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_a_full_disk_while_plotting_is_one_line_and_leaves_no_stale_plot(tmp_path, small_probes, monkeypatch, capsys):
    import matplotlib.figure

    out = tmp_path / "out"
    compare_main(TINY + ["--methods", "lora", "--out", str(out)])
    assert (out / "loss_curves.png").exists()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    capsys.readouterr()
    assert compare_main(TINY + ["--methods", "lora", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "loss_curves.png" in err and "Traceback" not in err
    assert not (out / "loss_curves.png").exists() and (out / "results.md").exists()


# --- 12, 13, 14 and the cosmetic ones: every setting checked before any work, one line each -----------------------

EARLY_CASES = [
    (["--pretrain.model.n_head=3"], "pretrain.model.n_head=3 must divide pretrain.model.d_model=128"),
    (["--pretrain.train.steps=0"], "pretrain.train.steps must be >= 1"),
    (["--methods", "lora lora:targets=nope"], "targets in 'lora:targets=nope': target 'nope' matches no module"),
    (["--targets=q_proj,nope"], "target 'nope' matches no module"),
    (["--seeds", "0,99999999999999999999"], "seeds must be in [0, 4294967295]"),
    (["--r=1000000000"], "r must be in [1, 128]"),
    (["--methods", "lora:r=99999999999999999999"], "larger than the model's width"),
    (["--n_train=100000000000000000000"], "n_train must be in [1, 100000]"),
    (["--epochs=100000000000000000000"], "epochs must be in [1, 1000]"),
    (["--n_test=100000000000000000000"], "n_test must be in [1, 100000]"),
    (["--train.checkpoint_every=-1"], "follow from the budget"),
    (["--full_lr=-1"], "full_lr must be > 0"),
    (["--methods", "lora d2lora", "--reference=dora"], "the reference 'dora' is not among the methods"),
]


@pytest.fixture
def no_work(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(compare_mod, "resolve_base", forbidden)
    monkeypatch.setattr(compare_mod, "run_one", forbidden)


@pytest.mark.parametrize("argv, match", EARLY_CASES, ids=[" ".join(a) for a, _ in EARLY_CASES])
def test_settings_that_failed_late_are_usage_errors_before_any_work(argv, match, no_work, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        compare_main(argv + ["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and "frame #" not in err, err
    assert len(err.strip().splitlines()[-1]) < 300


def test_ctrl_c_ends_with_one_line(monkeypatch, capsys, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_mod, "compare", interrupted)
    assert compare_main(["--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_comparing_the_base_alone_prints_no_plot_warning(tmp_path, small_probes):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" would fail here
        assert compare_main(TINY + ["--methods", "base", "--reference=base", "--out", str(tmp_path / "out")]) == 0


def test_a_usage_error_from_torch_shows_no_cpp_frames():
    from d2lora_min.train.cli import first_line

    error = RuntimeError("bad thing\nException raised from foo at bar.cpp:1\nframe #0: baz")
    assert first_line(error) == "bad thing"


def test_every_presets_reference_is_one_of_its_methods():
    from d2lora_min.train.presets import PRESETS, CompareConfig, apply_preset

    for preset in PRESETS:
        cfg = apply_preset(CompareConfig(), preset)
        assert cfg.reference in cfg.methods, preset


def test_two_specs_that_run_the_same_thing_are_computed_once(tmp_path, small_probes, capsys):
    # a spec's own lr and a tuned lr that happens to equal it: two roles (replicate lists both), one run
    # (one method listed twice under two spellings is refused: tests/test_bad_input.py)
    out, tuned = tmp_path / "out", tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"lrs": {"lora": 0.01}}))
    argv = TINY + ["--methods", "lora:lr=0.01 lora", "--tuned_file", str(tuned), "--out", str(out)]
    assert compare_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("s training") == 1 and "the same run as lora:lr=0.01" in printed
    first, second = (json.loads(p.read_text()) for p in sorted(run_files(out), key=lambda p: not p.name.startswith("lora_lr")))
    assert second["same_run_as"] == "lora:lr=0.01" and second["items"] == first["items"] and second["lr_from"] == "tuned"
    assert "one run under two names (computed once): LoRA(r=4) is LoRA(r=4), lr=0.01" in (out / "results.md").read_text()
    assert compare_main(argv) == 0  # both reused
    assert "s training" not in capsys.readouterr().out


def test_loading_onto_a_model_where_a_stored_name_is_also_a_suffix_adapts_only_that_module(tmp_path):
    # Adapter files store full names; "0" read as a suffix would also select "1.0" (and then fail half-way).
    source = inject_adapters(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "lora", r=2, alpha=4, targets=("0",))
    save_adapters(source, tmp_path)
    target = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    with torch.no_grad():  # the same base weights where the adapter goes
        target[0].weight.copy_(source[0].base.weight)
        target[1][0].weight.copy_(source[0].base.weight)
    target = load_adapters(target, tmp_path)
    assert [name for name, _ in adapter_layers(target)] == ["0"]


@pytest.mark.parametrize("damage", ["delete", "truncate", "folder"])
def test_a_finished_run_whose_adapter_file_is_gone_or_damaged_is_recomputed(tmp_path, small_probes, capsys, damage):
    out = tmp_path / "out"
    argv = TINY + ["--methods", "lora:lr=0.01", "--out", str(out)]
    assert compare_main(argv) == 0
    (result,) = [json.loads(p.read_text()) for p in run_files(out)]
    adapter = out / result["adapter"] / ADAPTER_FILE
    if damage == "delete":
        adapter.unlink()
    elif damage == "folder":
        adapter.unlink()
        adapter.mkdir()
    else:
        adapter.write_bytes(adapter.read_bytes()[:100])
    capsys.readouterr()
    if damage == "folder":  # in the way of the adapter file the rerun would write: refused before any work
        with pytest.raises(SystemExit):
            compare_main(argv)
        assert "is in the way of a run's output" in capsys.readouterr().err and adapter.is_dir()
        return
    assert compare_main(argv) == 0
    printed = capsys.readouterr().out
    assert "adapter file is missing or damaged" in printed and "s training" in printed
    (again,) = [json.loads(p.read_text()) for p in run_files(out)]
    assert again["items"] == result["items"]
    read_adapter_file(adapter)  # whole again
