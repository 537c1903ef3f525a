"""Training checkpoints: what a killed run resumes from (train/trainer.py writes and reads them).

A checkpoint holds the trainable tensors, the optimizer state, the losses and step times so far, the RNG state, the
trainer's settings and the caller's run key. It is written atomically (serialised in memory, then one rename), as one
header line with the SHA-256 of what follows and then torch.save's bytes, so a damaged file (one flipped bit) is
refused rather than resumed with other numbers. It is read with weights_only=True (tensors and plain containers only:
a planted pickle payload cannot run), and resumed only when it is exactly this run's: same settings, same key, the
model's trainable tensors and their Adam moments by name, shape and dtype, every value finite. Every check runs
before anything is changed.
"""

import hashlib
import io
import math
import os
from dataclasses import asdict

import torch

from .io import atomic_path

CHECKPOINT = "checkpoint.pt"
# The first line of a checkpoint file: this text, the hex SHA-256 of the bytes after the line, and a newline.
MAGIC = b"d2lora_min checkpoint, sha256 of the rest: "
HEADER_LEN = len(MAGIC) + 64 + 1


def trainable_state(model):
    """The tensors training changes: {name: tensor} for parameters with requires_grad."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path, model, optimizer, step, result, cfg, key=None):
    state = {
        "step": step,
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "losses": result.losses,
        "step_times": result.step_times,
        "skipped_updates": result.skipped_updates,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],  # dropout on CUDA
        "config": asdict(cfg),
        "key": key,
    }
    write_checkpoint_state(path, state)


def write_checkpoint_state(path, state):
    """Write the dict `state` as a checkpoint file: the header line, then torch.save's bytes, in one atomic rename."""
    buffer = io.BytesIO()  # serialised in memory, then written as plain bytes: a full disk is an ordinary OSError
    torch.save(state, buffer)
    payload = buffer.getvalue()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def read_checkpoint_state(path):
    """The dict a checkpoint file holds, after its checksum; CheckpointMismatch for a file that is not one, is damaged,
    or holds anything but tensors and plain containers (weights_only=True: nothing else is unpickled)."""
    if not os.path.isfile(path):
        raise CheckpointMismatch(
            f"checkpoint {path} is not a regular file (a folder?); delete it to start this run over"
        )
    with open(path, "rb") as f:
        data = f.read()
    start = HEADER_LEN  # the payload starts after MAGIC, 64 hex digits and a newline
    if not data.startswith(MAGIC) or len(data) < start or data[start - 1 : start] != b"\n":
        raise CheckpointMismatch(
            f"checkpoint {path} is not a d2lora_min checkpoint (no checksum header); delete it to start this run over"
        )
    if hashlib.sha256(data[start:]).hexdigest().encode() != data[len(MAGIC) : start - 1]:
        raise CheckpointMismatch(
            f"checkpoint {path} does not match its checksum (a damaged or edited file); delete it "
            f"to start this run over"
        )
    try:
        return torch.load(io.BytesIO(data[start:]), map_location="cpu", weights_only=True)
    except Exception as e:  # holding objects other than tensors and plain containers
        raise CheckpointMismatch(
            f"checkpoint {path} cannot be read as a plain-tensor checkpoint ({type(e).__name__}); "
            f"delete it to start this run over"
        ) from None


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot be resumed: unreadable, damaged, not plain tensors, or made for another model or settings."""


# Settings that change the numbers a run produces: a checkpoint is resumed only when they all match.
RESUME_KEYS = (
    "steps",
    "batch_size",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "betas",
    "grad_clip",
    "seed",
)


def load_checkpoint(path, model, optimizer, result, cfg, key=None):
    """Resume from `path`: refuse (CheckpointMismatch, naming the file and the tensor) anything that is not
    exactly this model's finite trainable tensors (names, shapes, dtypes) and their optimizer state, saved with these
    settings and this run key (the caller's hash of everything else that changes the numbers: the base, the data,
    alpha, dropout...). Every check runs before the model, the optimizer, the result or the RNG is changed."""
    state = read_checkpoint_state(path)
    fields = ("step", "trainable", "optimizer", "losses", "step_times", "skipped_updates", "rng", "config", "key")
    if not isinstance(state, dict) or any(k not in state for k in fields) or not isinstance(state["config"], dict):
        raise CheckpointMismatch(f"checkpoint {path} lacks the fields {', '.join(fields)}; delete it to start over")
    saved = state["config"]
    differ = [k for k in RESUME_KEYS if _plain(saved.get(k)) != _plain(getattr(cfg, k))]
    if state["key"] != key:
        differ.append("run key: the base, data or adapter settings")
    if differ:
        raise CheckpointMismatch(
            f"checkpoint {path} was made with other settings ({', '.join(differ)}); delete it to start over"
        )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not isinstance(state["trainable"], dict) or set(state["trainable"]) != set(params):
        diff = sorted(set(state["trainable"]) ^ set(params)) if isinstance(state["trainable"], dict) else "not a dict"
        raise CheckpointMismatch(f"checkpoint {path} is for another model or method (tensors differ: {diff[:5]})")
    for n, p in params.items():
        _check_tensor(path, f"tensor {n}", state["trainable"][n], p)
    step = state["step"]
    _check_progress(path, state, step, cfg)
    _check_optimizer(path, state["optimizer"], optimizer)
    rng, cuda_rng = state["rng"], state.get("cuda_rng", [])
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape):
        raise CheckpointMismatch(f"checkpoint {path}: its RNG state is not one; delete it to start over")
    if not (
        isinstance(cuda_rng, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda_rng)
    ):
        raise CheckpointMismatch(
            f"checkpoint {path}: its CUDA RNG states are not a list of them; delete it to start over"
        )
    with torch.no_grad():
        for n, t in state["trainable"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    result.losses[:] = state["losses"]
    result.step_times[:] = state["step_times"]
    result.skipped_updates = state["skipped_updates"]
    torch.set_rng_state(rng)
    if torch.cuda.is_available() and cuda_rng:  # the devices present (a checkpoint may come from a machine with more)
        torch.cuda.set_rng_state_all(cuda_rng[: torch.cuda.device_count()])
    return step


def _check_tensor(path, what, t, like):
    """t is a finite tensor with like's shape and dtype, else a CheckpointMismatch naming `what`."""
    if not isinstance(t, torch.Tensor) or t.shape != like.shape or t.dtype != like.dtype:
        got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
        raise CheckpointMismatch(
            f"checkpoint {path}, {what}: saved {got}, the model has {(tuple(like.shape), like.dtype)}"
        )
    if not torch.isfinite(t).all():
        raise CheckpointMismatch(f"checkpoint {path}, {what}: holds NaN or Inf; delete it to start over")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_progress(path, state, step, cfg):
    """step, losses, step times and skipped updates agree with one another and with the budget."""
    losses, times, skipped = state["losses"], state["step_times"], state["skipped_updates"]
    ok = (
        _is_int(step)
        and 0 < step <= cfg.steps
        and _is_int(skipped)
        and 0 <= skipped <= step
        and isinstance(losses, list)
        and isinstance(times, list)
        and len(losses) == len(times) == step
        and all(isinstance(v, float) and math.isfinite(v) for v in losses + times)
    )
    if not ok:
        raise CheckpointMismatch(
            f"checkpoint {path} has an inconsistent step count, losses or step times; delete it to start over"
        )


def _check_optimizer(path, saved, optimizer):
    """The saved optimizer state fits `optimizer` exactly: as many groups with as many parameters, the same settings
    but the learning rate (the schedule sets it every step), and for each parameter that has a state (AdamW makes one
    at the first update that gives the parameter a gradient) finite moments of its shape and dtype. Loading moments
    of other shapes can crash torch."""
    where = f"checkpoint {path}: the optimizer state"
    groups = optimizer.param_groups
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("state"), dict)
        and isinstance(saved.get("param_groups"), list)
        and len(saved["param_groups"]) == len(groups)
    ):
        raise CheckpointMismatch(f"{where} is not this optimizer's (its groups differ); delete it to start over")
    param_at = {}  # the saved state's parameter index -> the live parameter it belongs to
    for live, stored in zip(groups, saved["param_groups"]):
        ids = stored.get("params") if isinstance(stored, dict) else None
        if not isinstance(ids, list) or len(ids) != len(live["params"]) or not all(_is_int(i) for i in ids):
            raise CheckpointMismatch(f"{where} has other parameter groups; delete it to start over")
        settings = {k: _plain(v) for k, v in live.items() if k not in ("params", "lr")}
        if {k: _plain(stored.get(k)) for k in settings} != settings:
            raise CheckpointMismatch(f"{where} was made with other optimizer settings; delete it to start over")
        param_at.update(zip(ids, live["params"]))
    if len(param_at) != sum(len(g["params"]) for g in groups) or set(saved["state"]) - set(param_at):
        raise CheckpointMismatch(f"{where} names parameters this optimizer does not have; delete it to start over")
    for i, entry in saved["state"].items():
        if not isinstance(entry, dict) or not {"exp_avg", "exp_avg_sq", "step"} <= set(entry):
            raise CheckpointMismatch(f"{where}, parameter {i}: not Adam's moments; delete it to start over")
        for name in ("exp_avg", "exp_avg_sq"):
            _check_tensor(path, f"the optimizer's {name} of parameter {i}", entry[name], param_at[i])
        count = entry["step"]
        if not (
            isinstance(count, torch.Tensor) and count.numel() == 1 and torch.isfinite(count).all() and count.item() >= 0
        ):
            raise CheckpointMismatch(
                f"{where}, parameter {i}: its step count is not a number >= 0; delete it to start over"
            )


def _plain(value):
    """Tuples and lists compare alike (a checkpoint stores a tuple as a list only after JSON, never here)."""
    return list(value) if isinstance(value, (tuple, list)) else value
