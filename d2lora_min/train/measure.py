"""How speed and memory are measured, side by side: interleaved timing (every candidate once per repetition, in a fresh
random order, so that a slow moment of a shared machine favours none), medians of paired per-repetition ratios, the
bytes autograd saves for backward (exact, counted with saved-tensor hooks) and a step's memory footprint. bench.py
and each run's merge check (runs.py) measure with these; each run also records its memory (memory_record) and compare
says how long the runs still to do will take (Eta).

A run's memory, as honestly as each device allows, and labelled as what it is: on every device the bytes autograd
saves for the backward pass of one training step (the activations a method adds, where the methods differ; weights,
gradients and optimizer state not counted), and on CUDA also torch.cuda.max_memory_allocated over the training run.
"""

import random
import statistics
import time
from contextlib import nullcontext

import torch


def timed(fn, device, inner=1):
    """Seconds per call of fn, over `inner` consecutive calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - t0) / inner


def interleaved(fns, device, reps, inner, seed=0):
    """{name: [seconds per call, one per repetition]}: each repetition times every fn once, in a fresh random order."""
    rng, order, times = random.Random(seed), list(fns), {k: [] for k in fns}
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            times[k].append(timed(fns[k], device, inner))
    return times


def saved_bytes(model, x, y, *extra):
    """Bytes of the tensors autograd saves for backward in one forward pass model(x, y, *extra) (each storage counted
    once; parameters and buffers are not activation memory)."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y, *extra)
    weights = {(p.untyped_storage().data_ptr(), p.device) for p in list(model.parameters()) + list(model.buffers())}
    return sum(v for k, v in seen.items() if k not in weights)


def memory_of(model, step, x, y, device):
    """Saved activations, trainable state (parameters, gradients, 2 Adam moments), the step footprint (where a step
    peaks, at the start of backward), and on CUDA the peak allocated during one step."""
    n_trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    act = saved_bytes(model, x, y)
    memory = dict(saved_activation_bytes=act, trainable_state_bytes=3 * n_trainable, weight_bytes=weights)
    memory["step_footprint_bytes"] = weights + 3 * n_trainable + act
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        memory["cuda_peak_step_bytes"] = torch.cuda.max_memory_allocated() - before
    return memory


def paired_ratio(times, k, ref):
    """Median over repetitions of times[k] / times[ref], both measured in the same repetition."""
    return statistics.median(a / b for a, b in zip(times[k], times[ref]))


THROUGHPUT_REPS = 7  # interleaved forward passes per model; the median is reported


@torch.no_grad()
def forward_throughput(models, x, reps=THROUGHPUT_REPS):
    """{name: tokens/s} of each model's forward pass on batch x: interleaved repetitions, median."""
    x = x.to(next(next(iter(models.values())).parameters()).device)
    for m in models.values():
        m(x)  # warm-up
    times = interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, x.device.type, reps, inner=1)
    return {k: x.numel() / statistics.median(v) for k, v in times.items()}


def saved_in_step(model, batch, device, amp):
    """saved_bytes of one training step on `batch` (x, y, *extra), the model in training mode under the trainer's
    autocast (bf16 on CUDA when amp). Nothing changes: no gradient is made, and train() seeds every generator itself."""
    x, y, *extra = (t.to(device) for t in batch)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.startswith("cuda") else nullcontext():
        return saved_bytes(model, x, y, *extra)


def start_peak(device):
    """Start counting the CUDA peak now (a no-op off CUDA)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def memory_record(device, saved):
    """{"saved_for_backward": bytes of one step, "cuda_peak": bytes since start_peak, or None off CUDA}."""
    return {
        "saved_for_backward": saved,
        "cuda_peak": torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None,
    }


class Eta:
    """After each run that trained: 'about N min left', the mean time of the trained runs so far times the trained
    runs still planned (a planned run that turns out to be cached takes no time: then it is an upper bound)."""

    def __init__(self, planned):
        self.left, self.seconds, self.done, self.started = planned, 0.0, 0, None

    def start(self):
        self.started = time.perf_counter()

    def skip(self, trained=True):
        """A planned run reused from its cached result."""
        self.left -= trained

    def finished(self, trained=True):
        """Record the run started last -> the line to print, or None (nothing left, or the run trained nothing: the
        base, whose evaluation alone says little about a training run's time)."""
        if not trained:
            return None
        self.left, self.done, self.seconds = (
            self.left - 1,
            self.done + 1,
            self.seconds + time.perf_counter() - self.started,
        )
        if self.left <= 0:
            return None
        remaining = self.left * self.seconds / self.done
        when = "under a minute" if remaining < 60 else f"about {round(remaining / 60)} min"
        return f"{when} left ({self.left} run{'s' if self.left > 1 else ''} to go)"
