"""Training checkpoints (d2lora_min/files/checkpoints.py): never unpickled beyond plain tensors, sealed by a checksum,
and resumed only when they fit this run exactly (its key, its tensors, its optimizer, its progress); anything else is a
clear error before anything changes. A full disk is a plain OSError that leaves no checkpoint behind."""

import errno
from pathlib import Path

import pytest
import torch

from d2lora_min.files import checkpoints as checkpoints_mod
from d2lora_min.files.checkpoints import CHECKPOINT, CheckpointMismatch, read_checkpoint_state, write_checkpoint_state
from d2lora_min.nn import inject_adapters
from d2lora_min.train.trainer import train

from ..helpers import counting, narrow_gpt, quiet


class Payload:
    """Pickling this object stores a call that writes a marker file when the pickle is loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_planted_pickle_payload_in_a_checkpoint_does_not_run(tmp_path):
    marker = tmp_path / "marker"
    model = inject_adapters(narrow_gpt(), "lora", r=2, alpha=4)
    torch.save({"step": 1, "payload": Payload(marker)}, tmp_path / CHECKPOINT)  # a bare pickle: no checksum header
    with pytest.raises(CheckpointMismatch, match="not a d2lora_min checkpoint"):
        train(model, counting, quiet(steps=3), out_dir=tmp_path)
    write_checkpoint_state(tmp_path / CHECKPOINT, {"step": 1, "payload": Payload(marker)})  # a valid header around it
    with pytest.raises(CheckpointMismatch, match="cannot be read as a plain-tensor checkpoint"):
        train(model, counting, quiet(steps=3), out_dir=tmp_path)
    assert not marker.exists()


def checkpoint_of(tmp_path, method="lora", r=2, steps=2, **cfg):
    model = inject_adapters(narrow_gpt(), method, r=r, alpha=4)
    train(model, counting, quiet(steps=steps, checkpoint_every=1, **cfg), out_dir=tmp_path)
    return read_checkpoint_state(tmp_path / CHECKPOINT)


def test_one_flipped_bit_in_a_checkpoint_is_refused(tmp_path):
    checkpoint_of(tmp_path)
    path = tmp_path / CHECKPOINT
    data = bytearray(path.read_bytes())
    for offset in (200, len(data) // 2, len(data) - 20):  # inside the pickle, inside the tensor data
        flipped = bytearray(data)
        flipped[offset] ^= 0x04
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointMismatch, match="does not match its checksum"):
            train(inject_adapters(narrow_gpt(), "lora", r=2, alpha=4), counting, quiet(steps=2), out_dir=tmp_path)


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    checkpoint_of(tmp_path)
    data = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(data[:100])
    with pytest.raises(CheckpointMismatch, match="delete it"):
        train(inject_adapters(narrow_gpt(), "lora", r=2, alpha=4), counting, quiet(steps=2), out_dir=tmp_path)


def test_a_folder_where_the_checkpoint_file_should_be_is_a_clear_error(tmp_path):
    (tmp_path / CHECKPOINT).mkdir()
    with pytest.raises(CheckpointMismatch, match="not a regular file"):
        train(inject_adapters(narrow_gpt(), "lora", r=2, alpha=4), counting, quiet(steps=2), out_dir=tmp_path)


# --- resumed only when it fits this run exactly ---------------------------------------------------------------------


def test_resume_refuses_a_checkpoint_of_another_run_key(tmp_path):
    train(
        inject_adapters(narrow_gpt(), "lora", r=2, alpha=4), counting, quiet(steps=2), out_dir=tmp_path, key="alpha=4"
    )
    other = inject_adapters(narrow_gpt(), "lora", r=2, alpha=8)  # same tensors, another alpha: another run
    with pytest.raises(CheckpointMismatch, match="run key"):
        train(other, counting, quiet(steps=4), out_dir=tmp_path, key="alpha=8")


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
    model = inject_adapters(narrow_gpt(), "lora", r=4, alpha=4)
    with pytest.raises(CheckpointMismatch, match=match):
        train(model, counting, quiet(steps=2), out_dir=tmp_path)


def test_resume_refuses_non_finite_tensors(tmp_path):
    train(inject_adapters(narrow_gpt(), "lora", r=2, alpha=4), counting, quiet(steps=4), out_dir=tmp_path)
    state = read_checkpoint_state(tmp_path / CHECKPOINT)
    name = next(iter(state["trainable"]))
    state["trainable"][name] = torch.full_like(state["trainable"][name], float("nan"))
    write_checkpoint_state(tmp_path / CHECKPOINT, state)
    with pytest.raises(CheckpointMismatch, match="NaN or Inf"):
        train(inject_adapters(narrow_gpt(), "lora", r=2, alpha=4), counting, quiet(steps=4), out_dir=tmp_path)


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
    model = inject_adapters(narrow_gpt(), "lora", r=2, alpha=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatch, match=match):
        train(model, counting, quiet(steps=3), out_dir=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- a full disk -----------------------------------------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_is_a_plain_oserror(tmp_path, monkeypatch):
    real_open = open

    def full_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode:

            def write(_data):
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = write
        return f

    monkeypatch.setattr(checkpoints_mod, "open", full_disk, raising=False)
    with pytest.raises(OSError) as e:
        train(inject_adapters(narrow_gpt(), "lora", r=2, alpha=4), counting, quiet(steps=2), out_dir=tmp_path)
    assert e.value.errno == errno.ENOSPC and not (tmp_path / CHECKPOINT).exists()
