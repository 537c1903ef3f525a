"""Training checkpoints: what a killed run resumes from (trainer.py writes and reads them).

A checkpoint holds the trainable tensors, the optimizer state, the losses and step times so far, the RNG state, the
trainer's settings and the caller's run key. It is written atomically (serialised in memory, then one rename) and read
with weights_only=True (tensors and plain containers only: a planted pickle payload cannot run), and it is resumed only
when it is exactly this run's: same settings, same key, the model's trainable tensors by name, shape and dtype, every
value finite.
"""

import io
from dataclasses import asdict

import torch

from ..atomic import atomic_path

CHECKPOINT = "checkpoint.pt"


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
    buffer = io.BytesIO()  # serialised in memory, then written as plain bytes: a full disk is an ordinary OSError
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot be resumed: unreadable, not plain tensors, or made for another model or settings."""


# Settings that change the numbers a run produces: a checkpoint is resumed only when they all match.
RESUME_KEYS = ("steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas", "grad_clip", "seed")


def load_checkpoint(path, model, optimizer, result, cfg, key=None):
    """Resume from `path`: refuse (CheckpointMismatch, naming the file and the tensor) anything that is not
    exactly this model's finite trainable tensors (names, shapes, dtypes) saved with these settings and this run
    key (the caller's hash of everything else that changes the numbers: the base, the data, alpha, dropout...).

    weights_only=True: the file is read as tensors, numbers, lists and dicts only, never as arbitrary pickled
    objects, so a planted payload cannot run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or holding objects other than tensors and plain containers
        raise CheckpointMismatch(f"checkpoint {path} cannot be read as a plain-tensor checkpoint ({type(e).__name__}); "
                                 f"delete it to start this run over") from None  # fmt: skip
    fields = ("step", "trainable", "optimizer", "losses", "step_times", "skipped_updates", "rng", "config", "key")
    if not isinstance(state, dict) or any(k not in state for k in fields) or not isinstance(state["config"], dict):
        raise CheckpointMismatch(f"checkpoint {path} lacks the fields {', '.join(fields)}; delete it to start over")
    saved = state["config"]
    differ = [k for k in RESUME_KEYS if _plain(saved.get(k)) != _plain(getattr(cfg, k))]
    if state["key"] != key:
        differ.append("run key: the base, data or adapter settings")
    if differ:
        raise CheckpointMismatch(f"checkpoint {path} was made with other settings ({', '.join(differ)}); delete it to start over")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state["trainable"]) != set(params):
        diff = sorted(set(state["trainable"]) ^ set(params))
        raise CheckpointMismatch(f"checkpoint {path} is for another model or method (tensors differ: {diff[:5]})")
    for n, p in params.items():
        t = state["trainable"][n]
        if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype:
            got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointMismatch(f"checkpoint {path}, tensor {n}: saved {got}, the model has {(tuple(p.shape), p.dtype)}")
        if not torch.isfinite(t).all():
            raise CheckpointMismatch(f"checkpoint {path}, tensor {n}: holds NaN or Inf; delete it to start over")
    moments = [v for s in state["optimizer"].get("state", {}).values() if isinstance(s, dict) for v in s.values()]
    if not all(torch.isfinite(v).all() for v in moments if isinstance(v, torch.Tensor)):
        raise CheckpointMismatch(f"checkpoint {path}: the optimizer state holds NaN or Inf; delete it to start over")
    step = state["step"]
    if not isinstance(step, int) or not 0 < step <= cfg.steps or len(state["losses"]) != step:
        raise CheckpointMismatch(f"checkpoint {path} has an inconsistent step count; delete it to start over")
    with torch.no_grad():
        for n, t in state["trainable"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    result.losses[:] = state["losses"]
    result.step_times[:] = state["step_times"]
    result.skipped_updates = state["skipped_updates"]
    torch.set_rng_state(state["rng"])
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return step


def _plain(value):
    """Tuples and lists compare alike (a checkpoint stores a tuple as a list only after JSON, never here)."""
    return list(value) if isinstance(value, (tuple, list)) else value
