"""One trainer for pretraining (all parameters) and for fine-tuning with every method (adapter parameters).

It knows nothing about the model beyond `model(x, y) -> (logits, loss)` and "optimise what has
requires_grad" (the pattern of minGPT's trainer): pretraining leaves every parameter trainable,
inject_adapters freezes the base, and the same loop serves both.

    AdamW, linear warmup then cosine decay, gradient clipping, seeded; per-step loss and step time;
    a tqdm progress bar; atomic checkpoints that a rerun resumes from (only a rerun of the same run: the caller's
    run key is stored and compared); a guard that stops on a NaN/Inf loss and keeps the last good checkpoint; an
    update whose gradient is not finite is skipped and counted; bf16 autocast on CUDA.

Batches come from `get_batch(step) -> (x, y, *extra)`, a pure function of the step number, so that a resumed run
sees exactly the batches an uninterrupted one would have seen; the model is called as `model(x, y, *extra)` (packed
fine-tuning batches pass position ids and an attention mask as extra tensors, see data.finetune_batches).

Data-parallel: started under `torchrun --nproc_per_node=N`, every process draws the same global batch and
keeps its rows rank, rank + N, ...; DistributedDataParallel averages the gradients (of the adapter tensors
only, when the base is frozen). The loss is rescaled so that this average is exactly the gradient of the
single-process loss, even when the shards hold different numbers of answer tokens. Only rank 0 writes.
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..files.checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint
from ..files.io import check_writable
from .cli import UsageError, check_range


@dataclass
class TrainConfig:
    steps: int = 300  # optimiser steps
    batch_size: int = 32  # sequences per step (get_batch decides how they are drawn)
    lr: float = 1e-2  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup from lr / warmup_steps
    weight_decay: float = 0.0  # decoupled (AdamW), on matrices only: see param_groups()
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu
    amp: bool = True  # bf16 autocast, used on CUDA only
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end); needs out_dir
    progress: bool = True  # tqdm bar
    desc: str = "train"  # the bar's label


def check_train_config(cfg, prefix="train"):
    """Every setting in range, before any work; a UsageError naming the first one that is not."""
    check_range(f"{prefix}.steps", cfg.steps, 1)
    check_range(f"{prefix}.batch_size", cfg.batch_size, 1)
    check_range(f"{prefix}.lr", cfg.lr, kind=float)
    if cfg.lr <= 0:
        raise UsageError(f"{prefix}.lr must be > 0, got {cfg.lr!r}")
    check_range(f"{prefix}.min_lr_ratio", cfg.min_lr_ratio, 0.0, 1.0, kind=float)
    check_range(f"{prefix}.warmup_steps", cfg.warmup_steps, 0)
    check_range(f"{prefix}.weight_decay", cfg.weight_decay, 0.0, kind=float)
    if cfg.lr * cfg.weight_decay > 1:  # AdamW multiplies every decayed weight by 1 - lr * weight_decay each step
        raise UsageError(
            f"{prefix}.lr x {prefix}.weight_decay = {cfg.lr * cfg.weight_decay:g} > 1: decoupled weight decay "
            f"would flip the weights' signs every step"
        )
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise UsageError(f"{prefix}.betas must be two numbers in [0, 1), got {cfg.betas!r}")
    check_range(f"{prefix}.grad_clip", cfg.grad_clip, 0.0, kind=float)
    check_range(f"{prefix}.seed", cfg.seed, 0)
    check_range(f"{prefix}.checkpoint_every", cfg.checkpoint_every, 0)
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise UsageError(f"{prefix}.device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if pick_device(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{prefix}.device={cfg.device} but CUDA is not available here")
    return cfg


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; training stopped without saving the bad state. Attributes: step, loss, result
    (the TrainResult so far), last_saved (the step of the last checkpoint written, or None), checkpoint (its path)."""


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)  # training loss per step
    step_times: list = field(default_factory=list)  # wall seconds per step (forward + backward + update)
    resumed_from: int = 0  # the step a checkpoint resumed from (0 = fresh start)
    skipped_updates: int = 0  # steps whose gradient norm was not finite: no update was made (all of them: never moved)


def pick_device(device="auto"):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_distributed():
    """Join the process group torchrun describes in the environment -> (rank, world_size); (0, 1) otherwise.

    Backend: nccl on CUDA (one GPU per process, by LOCAL_RANK), gloo on CPU.
    """
    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lr_at(step, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def param_groups(model, weight_decay):
    """Weight decay on matrices (dim >= 2: linear weights, embeddings, lora_A/lora_B) and on nothing else.

    Biases, LayerNorm gains, DoRA's magnitude and D2-LoRA's tau are left alone: decaying a magnitude
    or tau towards zero would pull the model away from the pretrained weights instead of towards them.
    Decaying lora_B towards zero pulls the adapter towards the base model, a sensible prior.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model, cfg):
    """AdamW over what has requires_grad. fused=True runs the update of every tensor in one kernel instead of a
    dozen operator calls per tensor; D2-LoRA has 4 tensors per layer to LoRA's 2, so on a dispatch-bound step
    the plain loop would charge it for its tensor count (make bench uses this same function)."""
    params = param_groups(model, cfg.weight_decay)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in params for p in g["params"])
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, fused=fused)


def shard_loss(forward, batch, rank, world, device):
    """(this process's loss to backpropagate, the global mean loss) of a batch. Under torchrun every process takes
    the rows rank, rank + world, ... and its mean loss is reweighted by its share of the target tokens, so that the
    gradients DDP averages are exactly those of the single-process mean loss."""
    n_targets = (batch[1] != -1).sum()
    if not n_targets:  # a mean over no tokens is NaN, which would read as a diverged run
        raise ValueError("a batch has no target tokens (every label is -1): its mean loss is undefined")
    if world > 1:
        batch = [t[rank::world] for t in batch]
    x, y, *extra = [t.to(device, non_blocking=True) for t in batch]
    _, loss = forward(x, y, *extra)
    if world == 1:
        return loss, loss.detach()
    loss = loss * ((y != -1).sum() * world / n_targets.to(device))  # DDP averages: scale to d(global mean loss)
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)  # sum of the scaled shard losses = world * global mean
    return loss, global_loss / world


def update(optimizer, loss, grad_clip):
    """Backpropagate, clip the global gradient norm and step -> True; or, when that norm is not finite (an
    overflow that would turn the weights into NaN, or, clipped, into a zero update), skip the step -> False."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.get_total_norm(
        [p.grad for p in params if p.grad is not None]
    )  # the same in every process
    if not torch.isfinite(grad_norm):
        return False
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
    optimizer.step()
    return True


def diverged(step, loss, result, last_saved, ckpt_path):
    """The TrainingDiverged error for a non-finite loss at `step` (it carries the result so far)."""
    where = (
        f"the last good checkpoint (step {last_saved}) is kept at {ckpt_path}"
        if last_saved
        else "no checkpoint was written"
    )
    error = TrainingDiverged(f"loss is {loss} at step {step}: training stopped; {where}. Try a lower lr.")
    error.step, error.loss, error.result, error.last_saved, error.checkpoint = step, loss, result, last_saved, ckpt_path
    return error


def train(model, get_batch, cfg: TrainConfig, out_dir=None, resume=True, callback=None, key=None):
    """Optimise every parameter of `model` that has requires_grad on batches from get_batch(step).

    With out_dir, checkpoints go to out_dir/checkpoint.pt (atomically) and a rerun with resume=True
    continues from the last one, if it was saved with the same settings and the same `key` (a string the caller
    derives from everything else that changes the run). callback(steps_done, model, result), if given, runs after
    every step in every process (for periodic evaluation; it must leave the model in train mode). Returns a
    TrainResult. Raises TrainingDiverged on a NaN/Inf loss; the model then holds the weights that gave it (finite:
    an update whose gradient is not finite is skipped).
    """
    check_train_config(cfg)
    device = pick_device(cfg.device)
    rank, world = rank_and_world()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    model.to(device)
    model.train()
    torch.manual_seed(cfg.seed)  # dropout and anything else random inside the model
    optimizer = make_optimizer(model, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.amp and device == "cuda") else nullcontext()
    # Under torchrun, DDP all-reduces the gradients of the trainable tensors (the frozen base has none).
    forward = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model

    result = TrainResult()
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if out_dir and rank == 0:
        check_writable(out_dir)  # now, not at the first checkpoint
    start, last_saved = 0, None
    if ckpt_path and resume and os.path.exists(ckpt_path):
        start = last_saved = load_checkpoint(ckpt_path, model, optimizer, result, cfg, key)
        result.resumed_from = start

    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc=cfg.desc,
        disable=not cfg.progress or rank != 0,
        leave=False,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = get_batch(step)  # (x, y, *extra): the global batch, the same in every process
        t0 = time.perf_counter()  # step time: forward, backward and update, not the batch's construction
        with autocast:
            loss, global_loss = shard_loss(forward, batch, rank, world, device)
        if not torch.isfinite(global_loss):  # the same decision in every process
            bar.close()
            model.eval()
            raise diverged(step, global_loss.item(), result, last_saved, ckpt_path)
        if not update(optimizer, loss, cfg.grad_clip):
            result.skipped_updates += 1
        if device == "cuda":
            torch.cuda.synchronize()  # so that step_times measure the step, not the launch
        result.step_times.append(time.perf_counter() - t0)
        result.losses.append(global_loss.item())
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
        done = step + 1
        if callback is not None:
            callback(done, model, result)
        if ckpt_path and (done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
            if rank == 0:  # one writer; every process resumes from the same file
                save_checkpoint(ckpt_path, model, optimizer, done, result, cfg, key)
            last_saved = done
    bar.close()
    model.eval()
    return result
