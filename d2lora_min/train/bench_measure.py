"""How `make bench` measures (bench.py): interleaved timing, the bytes autograd saves for backward, operator calls,
and a step's memory footprint."""

import random
import time

import torch


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, inner=1):
    """Seconds per call of fn, over `inner` consecutive calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def interleaved(fns, device, reps, inner, seed=0):
    """{name: [seconds per call, one per repetition]}. Each repetition times every fn once, in a fresh random
    (seeded) order."""
    rng = random.Random(seed)
    order = list(fns)
    times = {k: [] for k in fns}
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            times[k].append(timed(fns[k], device, inner))
    return times


def saved_bytes(model, x, y):
    """Bytes of the tensors autograd saves for backward in one forward pass (each storage counted once)."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    del loss
    # parameters and buffers are not activation memory
    params = {(p.untyped_storage().data_ptr(), p.device) for p in list(model.parameters()) + list(model.buffers())}
    return sum(v for k, v in seen.items() if k not in params)


def aten_calls(fn):
    """Operator calls (aten::*, nested ones included) that one call of fn makes, counted by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def memory_of(model, step, x, y, device):
    """Saved activations, trainable state (parameters + gradients + 2 Adam moments), the step footprint, and on
    CUDA the peak allocated during one step."""
    n_trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    act = saved_bytes(model, x, y)
    # the footprint at the start of backward, where a step peaks: every weight, the gradients and Adam's
    # two moments of the trainable tensors, and every activation autograd kept
    memory = {"saved_activation_bytes": act, "trainable_state_bytes": 3 * n_trainable, "weight_bytes": weights,
              "step_footprint_bytes": weights + 3 * n_trainable + act}  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync(device)
        memory["cuda_peak_step_bytes"] = torch.cuda.max_memory_allocated() - before
    return memory
