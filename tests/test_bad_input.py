"""Bad input, corrupted files and interrupted writes: each gets a specific error before any work, never a
traceback from a command line, never a silent wrong result, and a failed call leaves the model as it was."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from d2lora_min.nn.fused import is_fused, set_fused
from safetensors.torch import load_file, save_file

import d2lora_min.train.compare as compare_mod
import d2lora_min.train.pretrain as pretrain_mod
from d2lora_min.nn import METHODS, adapter_config, adapter_layers, adapter_state_dict, inject_adapters, load_adapter_state_dict, load_adapters, save_adapters
from d2lora_min.nn.checkpoint import ADAPTER_FILE
from d2lora_min.train.bench import main as bench_main
from d2lora_min.train.compare import main as compare_main
from d2lora_min.train.cache import read_cached
from d2lora_min.train.data import heldout_text
from d2lora_min.train.tasks import retention_probe
from d2lora_min.train.pretrain import SHIPPED_BASE, load_base
from d2lora_min.train.resume import CHECKPOINT, CheckpointMismatch, read_checkpoint_state, write_checkpoint_state
from d2lora_min.train.trainer import TrainConfig, train
from tiny_gpt import GPT, GPTConfig

from .helpers import perturb_adapters

SMALL = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=8)


def small_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(SMALL)


def snapshot(model):
    """Everything a failed call must leave alone: module types, parameter values and requires_grad flags."""
    return ([type(m).__name__ for m in model.modules()],
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})  # fmt: skip


def assert_untouched(model, before):
    types, params = snapshot(model)
    assert types == before[0]
    assert params.keys() == before[1].keys()
    for n, (t, flag) in params.items():
        assert torch.equal(t, before[1][n][0]) and flag == before[1][n][1], n


# --- the Python API: inject_adapters and the layer constructors ---------------------------------------------------

API_CASES = [
    # (method, keyword arguments, error type, message fragment)
    ("lora", {"r": 0}, ValueError, "rank r must be an integer >= 1, got 0"),
    ("d2lora", {"r": -1}, ValueError, "rank r"),
    ("dora", {"r": 2.5}, ValueError, "rank r"),
    ("lora", {"r": True}, ValueError, "rank r"),
    ("lora", {"r": "4"}, ValueError, "rank r"),
    ("lora", {"alpha": float("inf")}, ValueError, "alpha must be a finite number > 0"),
    ("dora", {"alpha": float("nan")}, ValueError, "alpha must be a finite number"),
    ("d2lora", {"alpha": 0.0}, ValueError, "alpha must be a finite number > 0"),
    ("d2lora", {"alpha": "8"}, TypeError, "alpha must be a number"),
    ("lora", {"dropout": 1.0}, ValueError, "dropout must be in"),
    ("lora", {"dropout": -0.1}, ValueError, "dropout must be in"),
    ("d2lora", {"project": "false"}, TypeError, "project must be a bool"),
    ("d2lora", {"learn_tau": "yes"}, TypeError, "learn_tau must be a bool"),
    ("dora", {"detach_norm": None}, TypeError, "detach_norm must be a bool"),
    ("d2lora", {"tau_init": float("inf")}, ValueError, "tau_init must be a finite number"),
    ("d2lora", {"tau_init": "0.5"}, TypeError, "tau_init must be a number"),
    ("d2lora", {"tau_init": 1e39}, ValueError, "tau_init=1e\\+39 is not finite in the weights' dtype torch.float32"),
    ("lorax", {}, ValueError, "unknown method 'lorax'; valid methods: lora, dora, d2lora"),
    (None, {}, ValueError, "unknown method None"),
    ("d2lora", {"projekt": False}, ValueError, "unknown option.*projekt.*valid options: tau_init"),
    ("lora", {"tau_init": 0.1}, ValueError, "unknown option.*tau_init.*'lora'"),
    ("lora", {"targets": ()}, ValueError, "targets is empty"),
    ("lora", {"targets": ("q_proj", "q_proj")}, ValueError, "targets has duplicates"),
    ("lora", {"targets": ("q_proj", "qproj")}, ValueError, "'qproj' matches no module.*q_proj"),
    ("lora", {"targets": ("ln_1",)}, TypeError, "'blocks.0.ln_1' is a LayerNorm, not an nn.Linear"),
    ("lora", {"targets": [1]}, TypeError, "targets must be module-name strings"),
]


@pytest.mark.parametrize("method, kwargs, error, match", API_CASES)
def test_bad_api_input_is_a_clear_error_and_leaves_the_model_as_it_was(method, kwargs, error, match):
    model = small_gpt()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        inject_adapters(model, method, **kwargs)
    assert_untouched(model, before)
    assert not adapter_layers(model)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_an_empty_batch_gives_an_empty_output_and_a_wrong_width_names_the_features(method, fused):
    layer = METHODS[method](nn.Linear(4, 3), r=2, alpha=4.0)
    set_fused(layer, fused)
    for lead in [(0,), (2, 0), (0, 5)]:
        x = torch.zeros(*lead, 4, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == (*lead, 3) and x.grad.shape == x.shape
    with pytest.raises((ValueError, RuntimeError), match="features in its last dimension|shapes cannot be multiplied"):
        layer(torch.zeros(2, 5))


@pytest.mark.parametrize("cls", list(METHODS.values()))
def test_wrapping_something_else_than_linear_is_a_type_error(cls):
    with pytest.raises(TypeError, match="nn.Linear"):
        cls(nn.Conv1d(4, 4, 1), r=1, alpha=1.0)


def test_injecting_twice_is_refused_and_changes_nothing():
    model = inject_adapters(small_gpt(), "lora")
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(model, "dora")
    assert_untouched(model, before)


# --- adapter checkpoints: every check before any change ---------------------------------------------------------


def saved_adapter(tmp_path, method="lora", r=2, **options):
    model = inject_adapters(small_gpt(), method, r=r, alpha=4, targets=("q_proj", "fc_out"), **options)
    perturb_adapters(model, seed=1)
    save_adapters(model, tmp_path)
    return model


def test_a_config_whose_rank_disagrees_with_its_tensors_changes_nothing_and_a_retry_works(tmp_path):
    model = saved_adapter(tmp_path)
    state, config = adapter_state_dict(model), adapter_config(model)
    target = small_gpt()
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"tensor .*lora_A: stored with shape \(2, 8\), the model needs \(3, 8\)"):
        load_adapter_state_dict(target, state, {**config, "r": 3})
    assert_untouched(target, before)
    load_adapter_state_dict(target, state, config)  # the right config still loads onto the same model
    assert all(torch.equal(a, b) for a, b in zip(adapter_state_dict(target).values(), state.values()))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda s: {**s, next(iter(s)): s[next(iter(s))].double()}, r"stored as torch.float64, the model's weights are torch.float32; load it onto the model in torch.float64"),
        (lambda s: {**s, next(iter(s)): torch.full_like(s[next(iter(s))], float("nan"))}, "holds NaN or Inf"),
        (lambda s: {k: v for i, (k, v) in enumerate(s.items()) if i}, "missing"),
        (lambda s: {**s, "blocks.0.attn.q_proj.extra": torch.zeros(1)}, "unexpected"),
        (lambda s: {**s, next(iter(s)): s[next(iter(s))][:1]}, "stored"),
    ],
    ids=["dtype", "nan", "missing", "extra", "shape"],
)
def test_adapter_tensors_that_do_not_fit_are_refused_before_any_change(tmp_path, corrupt, match):
    model = saved_adapter(tmp_path)
    target = small_gpt()
    before = snapshot(target)
    with pytest.raises(ValueError, match=match):
        load_adapter_state_dict(target, corrupt(adapter_state_dict(model)), adapter_config(model))
    assert_untouched(target, before)


@pytest.mark.parametrize(
    "config_change, match",
    [({"method": "lorax"}, "unknown method"), ({"r": "2"}, "'r' is missing or has the wrong type"),
     ({"options": {"projekt": 1}}, "unknown option"), ({"targets": {"blocks.0.attn.q_proj": [8]}}, "expected \\[out, in\\]")],
)  # fmt: skip
def test_a_bad_adapter_config_is_refused(tmp_path, config_change, match):
    model = saved_adapter(tmp_path)
    with pytest.raises(ValueError, match=match):
        load_adapter_state_dict(small_gpt(), adapter_state_dict(model), {**adapter_config(model), **config_change})


def test_missing_truncated_or_foreign_adapter_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        load_adapters(small_gpt(), tmp_path / "nowhere")
    (tmp_path / "folder" / ADAPTER_FILE).mkdir(parents=True)
    with pytest.raises(ValueError, match="not a regular file"):
        load_adapters(small_gpt(), tmp_path / "folder")
    with pytest.raises(ValueError, match="holds no tensors"):
        load_adapter_state_dict(small_gpt(), {}, adapter_config(inject_adapters(small_gpt(), "lora", r=2, alpha=4)))
    saved_adapter(tmp_path)
    path = tmp_path / ADAPTER_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    target = small_gpt()
    before = snapshot(target)
    with pytest.raises(ValueError, match="not a readable d2lora_min adapter file"):
        load_adapters(target, tmp_path)
    assert_untouched(target, before)
    save_file({"w": torch.zeros(2)}, str(path))  # a safetensors file without our config
    with pytest.raises(ValueError, match="not a readable d2lora_min adapter file"):
        load_adapters(small_gpt(), tmp_path)


# --- training checkpoints: never unpickled, checked exactly ----------------------------------------------------


def count_batches(step):
    g = torch.Generator().manual_seed(step)
    seq = (torch.randint(0, 32, (4, 1), generator=g) + torch.arange(9)) % 32
    return seq[:, :-1], seq[:, 1:]


def quiet(**kw):
    return TrainConfig(**{"progress": False, "lr": 1e-2, "warmup_steps": 1, **kw})


class Payload:
    """Pickling this object stores a call that writes a marker file when the pickle is loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_planted_pickle_payload_in_a_checkpoint_does_not_run(tmp_path):
    marker = tmp_path / "marker"
    model = inject_adapters(small_gpt(), "lora", r=2, alpha=4)
    torch.save({"step": 1, "payload": Payload(marker)}, tmp_path / CHECKPOINT)  # a bare pickle: no checksum header
    with pytest.raises(CheckpointMismatch, match="not a d2lora_min checkpoint"):
        train(model, count_batches, quiet(steps=3), out_dir=tmp_path)
    write_checkpoint_state(tmp_path / CHECKPOINT, {"step": 1, "payload": Payload(marker)})  # a valid header around it
    with pytest.raises(CheckpointMismatch, match="cannot be read as a plain-tensor checkpoint"):
        train(model, count_batches, quiet(steps=3), out_dir=tmp_path)
    assert not marker.exists()


def checkpoint_of(tmp_path, method="lora", r=2, steps=2, **cfg):
    model = inject_adapters(small_gpt(), method, r=r, alpha=4)
    train(model, count_batches, quiet(steps=steps, checkpoint_every=1, **cfg), out_dir=tmp_path)
    return read_checkpoint_state(tmp_path / CHECKPOINT)


@pytest.mark.parametrize(
    "method, r, dtype, cfg, match",
    [("lora", 1, torch.float32, {}, r"tensor .*lora_A: saved \(\(1, 8\).*has \(\(4, 8\)"),
     ("lora", 4, torch.float64, {}, r"saved .*float64.*has .*float32"),
     ("dora", 4, torch.float32, {}, "another model or method"),
     ("lora", 4, torch.float32, {"lr": 0.5}, "other settings \\(lr\\)")],
    ids=["rank", "dtype", "method", "settings"],
)  # fmt: skip
def test_resume_refuses_a_checkpoint_that_does_not_fit_exactly(tmp_path, method, r, dtype, cfg, match):
    state = checkpoint_of(tmp_path, method, r, **cfg)
    state["trainable"] = {k: v.to(dtype) for k, v in state["trainable"].items()}
    write_checkpoint_state(tmp_path / CHECKPOINT, state)
    model = inject_adapters(small_gpt(), "lora", r=4, alpha=4)
    with pytest.raises(CheckpointMismatch, match=match):
        train(model, count_batches, quiet(steps=2), out_dir=tmp_path)


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    checkpoint_of(tmp_path)
    data = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(data[:100])
    with pytest.raises(CheckpointMismatch, match="delete it"):
        train(inject_adapters(small_gpt(), "lora", r=2, alpha=4), count_batches, quiet(steps=2), out_dir=tmp_path)


def test_one_flipped_bit_in_a_checkpoint_is_refused(tmp_path):
    checkpoint_of(tmp_path)
    path = tmp_path / CHECKPOINT
    data = bytearray(path.read_bytes())
    for offset in (200, len(data) // 2, len(data) - 20):  # inside the pickle, inside the tensor data
        flipped = bytearray(data)
        flipped[offset] ^= 0x04
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointMismatch, match="does not match its checksum"):
            train(inject_adapters(small_gpt(), "lora", r=2, alpha=4), count_batches, quiet(steps=2), out_dir=tmp_path)


def wrong_moment(state):
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)


def unknown_parameter(state):
    state["optimizer"]["state"][99] = state["optimizer"]["state"][0]


def bad_cuda_rng(state):
    state["cuda_rng"] = ["not a state"]


def fewer_groups(state):
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]


def other_betas(state):
    for group in state["optimizer"]["param_groups"]:
        group["betas"] = (0.5, 0.5)


def bad_rng(state):
    state["rng"] = torch.zeros(3, dtype=torch.uint8)


def negative_adam_step(state):
    state["optimizer"]["state"][0]["step"] = torch.tensor(-5.0)


def bool_step(state):
    state["step"], state["losses"], state["step_times"] = True, state["losses"][:1], state["step_times"][:1]


def nan_loss(state):
    state["losses"][0] = float("nan")


@pytest.mark.parametrize(
    "edit, match",
    [(wrong_moment, "exp_avg of parameter 0: saved"), (unknown_parameter, "names parameters this optimizer does not have"),
     (bad_cuda_rng, "CUDA RNG states"), (fewer_groups, "groups differ"),
     (other_betas, "other optimizer settings"), (bad_rng, "RNG state"), (negative_adam_step, "step count is not a number >= 0"), (bool_step, "inconsistent step count"),
     (nan_loss, "inconsistent step count")],
    ids=lambda v: getattr(v, "__name__", ""),
)  # fmt: skip
def test_a_checkpoint_whose_contents_do_not_fit_is_refused_before_anything_changes(tmp_path, edit, match):
    """Edits that pass the checksum (a writer's bug, or a hand edit): each is named, and nothing is loaded. A moment of
    another shape would reach Adam and crash the process."""
    state = checkpoint_of(tmp_path, steps=3)
    edit(state)
    write_checkpoint_state(tmp_path / CHECKPOINT, state)
    model = inject_adapters(small_gpt(), "lora", r=2, alpha=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatch, match=match):
        train(model, count_batches, quiet(steps=3), out_dir=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class WithAnUnusedParameter(nn.Module):
    """A model with a trainable tensor that no loss reaches: AdamW makes no state for it."""

    def __init__(self):
        super().__init__()
        self.gpt, self.unused = small_gpt(), nn.Linear(2, 2)

    def forward(self, x, y):
        return self.gpt(x, y)


@pytest.mark.parametrize(
    "make, cfg",
    [(lambda: inject_adapters(small_gpt(), "d2lora", r=2, alpha=4, learn_tau=True), {"weight_decay": 0.1}),
     (lambda: inject_adapters(small_gpt(), "dora", r=2, alpha=4), {"weight_decay": 0.1}),
     (lambda: small_gpt().requires_grad_(True), {}),
     (WithAnUnusedParameter, {})],
    ids=["d2lora-learned-tau-decay", "dora-decay", "full", "unused-parameter"],
)  # fmt: skip
def test_a_run_resumes_from_its_own_checkpoint_whatever_its_optimizer_state_holds(tmp_path, make, cfg):
    def stop_after_2(done, model, result):  # the callback runs before step 2's checkpoint: step 1's is the last
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make(), count_batches, quiet(steps=4, checkpoint_every=1, **cfg), out_dir=tmp_path, callback=stop_after_2)
    resumed = train(make(), count_batches, quiet(steps=4, checkpoint_every=1, **cfg), out_dir=tmp_path)
    assert resumed.resumed_from == 1 and len(resumed.losses) == 4


def test_a_folder_where_the_checkpoint_file_should_be_is_a_clear_error(tmp_path):
    (tmp_path / CHECKPOINT).mkdir()
    with pytest.raises(CheckpointMismatch, match="not a regular file"):
        train(inject_adapters(small_gpt(), "lora", r=2, alpha=4), count_batches, quiet(steps=2), out_dir=tmp_path)


def test_a_file_where_the_checkpoint_folder_should_be_fails_before_training(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    steps = []
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        train(inject_adapters(small_gpt(), "lora", r=2, alpha=4), count_batches, quiet(steps=3), out_dir=blocker,
              callback=lambda done, model, result: steps.append(done))  # fmt: skip
    assert steps == []


# --- the command lines: usage errors before any work ----------------------------------------------------------------

COMPARE_CASES = [
    (["--epochs", "0"], "epochs must be in [1, 1000], got 0"),
    (["--epochs", "-3"], "epochs must be in [1, 1000]"),
    (["--train.steps=100"], "follow from the budget"),
    (["--scoring=best"], "scoring must be task, sum or mean"),
    (["--methods", "lora:targets=attn+attn"], "targets has duplicates"),
    (["--methods", "lora:r=2,r=3"], "'r' is given twice"),
    (["--methods", "full:r=4"], "'full' takes only lr, got 'r'"),
    (["--methods", "base:lr=5"], "'base' takes no keys, got 'lr'"),
    (["--pretrain.corpus.text_file=/etc"], "is not a regular file"),
    (["--methods", ""], "no methods given"),
    (["--out", ""], "output folder is empty"),
    (["--seeds", "0,0"], "a seed is listed twice"),
    (["--seeds", "abc"], "--seeds: expected an integer, got 'abc'"),
    (["--seeds", "-1"], "seeds must be in [0, 4294967295]"),
    (["--methods", "lora lora"], "a method is listed twice"),
    (["--methods", "lora lora:r=4"], "a method is listed twice: 'lora' and 'lora:r=4' are the same method"),
    (["--methods", "lora:lr=0.01 lora:lr=1e-2"], "a method is listed twice: 'lora:lr=0.01' and 'lora:lr=1e-2'"),
    (["--methods", "lora:"], "'lora:' has a colon but no key=value after it"),
    (["--methods", "lora:targets=q_proj++v_proj"], "'q_proj++v_proj' has an empty module name"),
    (["--methods", "d2lora:learn_tau=yes"], "learn_tau in 'd2lora:learn_tau=yes': expected true or false, got 'yes'"),
    (["--packed=1"], "packed: expected true or false, got '1'"),
    (["--n_test=0"], "n_test must be in [1, 100000]"),
    (["--n_train=0"], "n_train must be in [1, 100000]"),
    (["--train.batch_size=0"], "train.batch_size must be in [1, 100000]"),
    (["--tasks="], "tasks: expected a comma-separated list"),
    (["--tasks=yesno,yesno"], "a task is listed twice"),
    (["--tasks=yesno,nope"], "unknown task 'nope'"),
    (["--methods", "lora:r=abc"], "r in 'lora:r=abc': expected an integer, got 'abc'"),
    (["--methods", "lora dora d2lora:r=0"], "'d2lora:r=0': rank r must be an integer >= 1, got 0"),
    (["--methods", "d2lora:project=maybe"], "expected true or false"),
    (["--methods", "lora:alpha=inf"], "alpha in 'lora:alpha=inf': expected a finite number"),
    (["--methods", "lora:dropout=1"], "dropout must be in"),
    (["--methods", "lora:lr=-1"], "must be > 0"),
    (["--train.lr=nan"], "train.lr: expected a finite number"),
    (["--train.device=tpu"], "train.device must be auto, cpu, cuda"),
    (["--train.seed=3"], "comes from --seeds"),
    (["--trian.steps=3"], "unknown config section 'trian'"),
    (["--r=0"], "r must be in [1, 128], got 0"),
    (["--targets=q_proj,q_proj"], "targets has duplicates"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Make any real work an error, so that a bad input is proven to be refused before it."""

    def forbidden(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(compare_mod, "resolve_base", forbidden)
    monkeypatch.setattr(compare_mod, "run_one", forbidden)


@pytest.mark.parametrize("argv, match", COMPARE_CASES, ids=[" ".join(a) for a, _ in COMPARE_CASES])
def test_compare_refuses_bad_input_with_a_usage_error(argv, match, no_work, capsys, tmp_path):
    argv = argv if "--out" in argv else argv + ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        compare_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" in err
    assert match in err, err


def test_space_separated_overrides_work_like_the_equals_form():
    from d2lora_min.train.cli import apply_overrides
    from d2lora_min.train.presets import CompareConfig

    cfg = apply_overrides(CompareConfig(), ["--n_test", "200", "--train.lr=0.5"])
    assert cfg.n_test == 200 and cfg.train.lr == 0.5


def test_pretrain_refuses_to_overwrite_the_shipped_base(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain_mod.main(["--out", str(SHIPPED_BASE)])
    assert exit_info.value.code == 2 and "--replace_shipped" in capsys.readouterr().err


def test_bench_refuses_an_unwritable_output_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert bench_main(["--out", str(blocker / "bench"), "--quick"]) == 1
    err = capsys.readouterr().err
    assert "not writable" in err and "Traceback" not in err


# --- the shipped base: every file that changes its behaviour is covered -----------------------------------------


def copy_of_base(tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(SHIPPED_BASE, folder)
    return folder


def test_a_swapped_token_in_the_tokenizer_is_refused(tmp_path):
    folder = copy_of_base(tmp_path)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizer.json does not match the SHA-256"):
        load_base(folder)


def test_an_edited_model_config_is_refused(tmp_path):
    folder = copy_of_base(tmp_path)
    meta = json.loads((folder / "base.json").read_text())
    meta["config"]["model"]["dropout"] = 0.5
    (folder / "base.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model config does not match"):
        load_base(folder)


def test_a_missing_shipped_base_is_an_error_not_a_silent_pretrain(tmp_path, monkeypatch):
    folder = copy_of_base(tmp_path)
    (folder / "base.json").unlink()
    monkeypatch.setattr(pretrain_mod, "SHIPPED_BASE", folder)
    monkeypatch.setattr(pretrain_mod, "pretrain", lambda *a, **k: pytest.fail("started pretraining"))
    with pytest.raises(FileNotFoundError, match="git checkout -- base/"):
        pretrain_mod.resolve_base(pretrain_mod.PretrainConfig())
    os.remove(folder / "tokenizer.json")
    with pytest.raises(FileNotFoundError):
        load_base(folder)


def test_a_truncated_cached_run_is_recomputed_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text('{"key": "abc", "scores": {')
    assert read_cached(path) is None and "recomputing" in capsys.readouterr().out
    assert read_cached(tmp_path / "absent.json") is None


# --- kills at every write: the old complete state or the new one, never a mix ------------------------------------

TINY_COMPARE = ["--methods", "d2lora", "--seeds=0", "--tasks=who", "--n_train=8", "--epochs=2", "--n_test=8",
                "--train.batch_size=4", "--checkpoints=2", "--train.progress=false"]  # fmt: skip


class Killed(BaseException):
    """Stands for a kill: raised at a write, before the file takes its name."""


def consistent(out):
    """Every finished file parses, and every finished run points at an adapter that exists and loads."""
    for p in out.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".safetensors":
                load_file(p)
            elif p.suffix == ".pt":
                read_checkpoint_state(p)
    for run in (out / "runs").glob("*.json") if (out / "runs").exists() else []:
        result = json.loads(run.read_text())
        load_file(out / result["adapter"] / ADAPTER_FILE)


def test_a_kill_at_any_write_leaves_a_consistent_state_that_resumes_to_the_same_result(tmp_path, monkeypatch):
    # smaller retention probes: this test is about the order of the writes, and it runs 2 x (writes + 1) compares
    monkeypatch.setattr(compare_mod, "retention_probe", lambda world: retention_probe(world, n_items=20))
    monkeypatch.setattr(compare_mod, "heldout_text", lambda world, tok, **kw: heldout_text(world, tok, n_docs=20, **kw))
    real_replace = os.replace
    compare_main(TINY_COMPARE + ["--out", str(tmp_path / "clean")])
    clean = json.loads(next((tmp_path / "clean" / "runs").glob("*.json")).read_text())
    calls = {"n": 0, "kill_at": None}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    calls["kill_at"] = -1
    compare_main(TINY_COMPARE + ["--out", str(tmp_path / "count")])
    n_writes = calls["n"]
    assert n_writes >= 5  # checkpoints, adapter, run JSON, results.md, results.json, plot
    for k in range(1, n_writes + 1):
        out = tmp_path / f"kill{k}"
        calls.update(n=0, kill_at=k)
        with pytest.raises(Killed):
            compare_main(TINY_COMPARE + ["--out", str(out)])
        consistent(out)
        calls.update(n=0, kill_at=None)
        compare_main(TINY_COMPARE + ["--out", str(out)])  # the rerun resumes or recomputes what is missing
        consistent(out)
        resumed = json.loads(next((out / "runs").glob("*.json")).read_text())
        assert resumed["losses"] == clean["losses"] and resumed["scores"] == clean["scores"], k


def test_set_fused_takes_a_bool_not_the_string_false():

    model = inject_adapters(small_gpt(), "d2lora", r=2, alpha=4)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_fused(model, "false")
    assert not any(is_fused(layer) for _, layer in adapter_layers(model))  # the plain path is the default
    assert all(is_fused(layer) for _, layer in adapter_layers(set_fused(model, True)))
    assert not any(is_fused(layer) for _, layer in adapter_layers(set_fused(model, False)))


def test_a_batch_without_target_tokens_is_a_clear_error_not_a_divergence():
    def no_targets(step):
        x, y = count_batches(step)
        return x, torch.full_like(y, -1)

    with pytest.raises(ValueError, match="no target tokens"):
        train(inject_adapters(small_gpt(), "lora", r=2, alpha=4), no_targets, quiet(steps=2))
