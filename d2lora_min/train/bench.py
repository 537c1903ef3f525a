"""`make bench`: the cost of each method, as ratios measured side by side in one process.

    python -m d2lora_min.train.bench                 # default grid; writes runs/bench/bench.json and bench.md
    python -m d2lora_min.train.bench --quick         # fewer repetitions, for a smoke test

For each shape, every method gets its own copy of one randomly initialised model, and the measurements are
interleaved: each repetition times every method once, in a fresh random order, so that a slow moment of a
shared machine or a fixed place in the order favours no method. Times are medians over the repetitions; a
ratio (to LoRA(r), to LoRA(2r), merged to base) is the median of the per-repetition ratios of two
measurements taken in the same repetition, which cancels most of the machine's drift.

  train step   forward + backward + AdamW step of a fine-tuning batch
  eval         forward-only tokens/s of the base model, of each method unmerged, and merged
  memory       bytes autograd saves for backward (the activation memory of a step; exact and repeatable,
               measured with saved-tensor hooks), and the step footprint: those plus every weight and the
               trainable tensors' gradients and Adam moments (where a step peaks, at the start of backward);
               on CUDA also torch.cuda.max_memory_allocated during the step
  PEFT         our LoRA and DoRA training step against PEFT's on the same model (when peft is installed)
  fused        DoRA and D2-LoRA through the opt-in fused autograd function of nn/fused.py instead of the plain
               forward() of their method files (the default), to show what fusing saves
  aten calls   operator calls per training step (torch.profiler), the cost at a dispatch-bound shape

Every model adapts q, k, v, o, as make compare does. Shapes: the compare shape (d_model 128, 2 blocks, a packed step
of make compare: 10 rows of 128 positions), the same model at 32 x 128, and one compute-bound shape (d_model 768,
2 blocks, sequence 512), where the D2-LoRA paper's training-overhead figure comes from. Last, a sweep of sequence
lengths at a fixed batch of sequences (tokens per step grow), for the paper's "overhead falls with longer
sequences".
"""

import argparse
import copy
import os
import platform
import random
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from ..atomic import check_writable, write_json, write_text
from ..nn import METHODS, display_name, inject_adapters, merge_adapters, set_fused
from .data import VOCAB_SIZE
from .cli import UsageError, run_cli
from .report import PUBLISHED
from .specs import TARGET_GROUPS
from .trainer import TrainConfig, make_optimizer, pick_device
from tiny_gpt import GPT, GPTConfig


# --- how it measures ----------------------------------------------------------------------------------


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


# --- what it measures ----------------------------------------------------------------------------------


# (label, method, options); every row runs the plain forward() of its method file (the default) but the "fused" rows,
# which run the opt-in autograd function of nn/fused.py (the same math; tests/test_fused.py checks they agree).
METHODS_BENCH = [
    ("LoRA(r)", "lora", {"r": 4}),
    ("LoRA(2r)", "lora", {"r": 8}),
    ("DoRA(r)", "dora", {"r": 4}),
    ("D2-LoRA(r)", "d2lora", {"r": 4}),  # the default: the paper's form, tau fixed
    ("D2-LoRA(r) exact-norm", "d2lora", {"r": 4, "readd_delta": False}),
    ("D2-LoRA(r) detach_norm", "d2lora", {"r": 4, "detach_norm": True}),
    ("D2-LoRA(r) project=false", "d2lora", {"r": 4, "project": False}),
    ("DoRA(r) fused", "dora", {"r": 4}),
    ("D2-LoRA(r) fused", "d2lora", {"r": 4}),
]


def bench_methods():
    """METHODS_BENCH, and a row at rank r for every other registered method."""
    named = {row[1] for row in METHODS_BENCH}
    return METHODS_BENCH + [(f"{display_name(m)}(r)", m, {"r": 4}) for m in METHODS if m not in named]
TARGETS = TARGET_GROUPS["attn"]  # what make compare adapts (q, k, v, o, as the paper)
COMPARE_ROWS = 10  # rows of 128 positions in a packed step of make compare (32 items of ~37 tokens: 10.0 rows on average)


def shapes(quick):
    """[(name, config, batch, seq, steps timed together per repetition, targets)]: short steps are timed in groups."""
    default = dict(vocab_size=VOCAB_SIZE, n_layer=2, n_head=4, d_model=128, block_size=128)
    mid = GPTConfig(vocab_size=VOCAB_SIZE, block_size=128, n_layer=4, n_head=4, d_model=256)
    big = GPTConfig(vocab_size=VOCAB_SIZE, block_size=512, n_layer=2, n_head=12, d_model=768)
    return [("compare d128, packed 10 x 128", GPTConfig(**default), COMPARE_ROWS, 128, 3, TARGETS),
            ("mid d256 4 blocks, 16 x 128, every linear", mid, 16, 128, 1, TARGET_GROUPS["all"]),
            ("compute-bound d768 seq512", big, 1 if quick else 2, 512, 1, TARGETS)]  # fmt: skip


def make_models(config, device, peft_ok, targets=TARGETS):
    """{label: model} for the base and every method (each its own copy), plus PEFT's LoRA and DoRA."""
    torch.manual_seed(0)
    base = GPT(config).to(device)
    models = {"base": base}
    for label, method, opts in bench_methods():
        opts = dict(opts)
        r = opts.pop("r")
        models[label] = inject_adapters(copy.deepcopy(base), method, r=r, alpha=2 * r, targets=targets, **opts)
        if label.endswith(" fused"):
            set_fused(models[label], True)
    if peft_ok:
        from peft import LoraConfig, inject_adapter_in_model

        for label, dora in (("PEFT LoRA(r)", False), ("PEFT DoRA(r)", True)):
            m = copy.deepcopy(base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0, use_dora=dora)
                models[label] = inject_adapter_in_model(cfg, m)
    return models


def train_step_fn(model, x, y):
    opt = make_optimizer(model, TrainConfig(lr=1e-4))  # the trainer's optimizer

    def step():
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, opt


@torch.no_grad()
def eval_times(models, x, device, reps, inner):
    """{name: [seconds per forward, per repetition]} of the base and of every method unmerged and merged (the merged
    copies made once, then every forward interleaved)."""
    evals = {"base": models["base"]}
    for label, _, _ in bench_methods():
        evals[f"{label} unmerged"] = models[label]
        evals[f"{label} merged"] = merge_adapters(copy.deepcopy(models[label]))
    for m in evals.values():
        m.eval()
        m(x)  # warm-up
    return interleaved({k: (lambda m=m: m(x)) for k, m in evals.items()}, device, reps, 3 * inner)


def bench_shape(name, config, batch, seq, inner, device, reps, peft_ok, targets=TARGETS):
    """Every measurement of one shape: training steps (interleaved), operator calls, memory, evaluation."""
    models = make_models(config, device, peft_ok, targets)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    y = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    trainable = [k for k in models if k != "base"]
    steps = {k: train_step_fn(models[k], x, y)[0] for k in trainable}
    for k in trainable:  # warm-up: allocator, optimizer state
        for _ in range(2):
            steps[k]()
    step_times = interleaved(steps, device, reps, inner)
    calls = {k: aten_calls(steps[k]) for k in trainable}
    memory = {k: memory_of(models[k], steps[k], x, y, device) for k in trainable}
    del steps
    evals = eval_times(models, x, device, reps, inner)
    tokens = batch * seq
    return {
        "name": name, "batch": batch, "seq": seq, "d_model": config.d_model, "n_layer": config.n_layer,
        "train_step_s": {k: statistics.median(v) for k, v in step_times.items()},
        "eval_tokens_per_s": {k: tokens / statistics.median(v) for k, v in evals.items()},
        "memory": memory, "aten_calls_per_step": calls,
        "train_step_reps_s": step_times, "eval_reps_s": evals,  # per repetition, for the paired ratios
    }  # fmt: skip


def sequence_sweep(device, reps, batch=8, seqs=(64, 128, 256, 512)):
    """D2-LoRA's and DoRA's step time over LoRA(r)'s at a fixed batch of sequences (tokens per step grow with
    the sequence), the setting of the paper's 'overhead falls with longer sequences'. Default model."""
    config = GPTConfig(vocab_size=VOCAB_SIZE, block_size=max(seqs), n_layer=2, n_head=4, d_model=128)
    torch.manual_seed(0)
    base = GPT(config).to(device)
    models = {label: inject_adapters(copy.deepcopy(base), method, r=4, alpha=8, targets=TARGETS)
              for label, method in (("LoRA(r)", "lora"), ("DoRA(r)", "dora"), ("D2-LoRA(r)", "d2lora"))}  # fmt: skip
    rows = []
    for seq in seqs:
        g = torch.Generator().manual_seed(seq)
        x = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
        steps = {k: train_step_fn(m, x, x)[0] for k, m in models.items()}
        for f in steps.values():
            f()
        times = interleaved(steps, device, reps, inner=3, seed=seq)
        rows.append({"seq": seq, "tokens": batch * seq, "D2-LoRA(r) / LoRA(r)": paired_ratio(times, "D2-LoRA(r)", "LoRA(r)"),
                     "DoRA(r) / LoRA(r)": paired_ratio(times, "DoRA(r)", "LoRA(r)"),
                     "LoRA(r) step ms": 1000 * statistics.median(times["LoRA(r)"])})  # fmt: skip
    return rows


# --- the report -----------------------------------------------------------------------------------------


def paired_ratio(times, k, ref):
    """Median over repetitions of times[k] / times[ref], both measured in the same repetition."""
    return statistics.median(a / b for a, b in zip(times[k], times[ref]))


def ratios(result):
    st = result["train_step_reps_s"]
    out = {k: {"vs LoRA(r)": paired_ratio(st, k, "LoRA(r)"), "vs LoRA(2r)": paired_ratio(st, k, "LoRA(2r)")} for k in st}
    for k, label in (("PEFT LoRA(r)", "LoRA(r)"), ("PEFT DoRA(r)", "DoRA(r)")):
        if k in st:
            out[label]["ours / PEFT"] = paired_ratio(st, label, k)
    for k in st:  # the opt-in fused path against the plain one it optimises
        if k.endswith(" fused") and k[: -len(" fused")] in st:
            out[k]["fused / plain"] = paired_ratio(st, k, k[: -len(" fused")])
    ev = result["eval_reps_s"]
    for label in st:  # throughput merged / base = time base / time merged
        if f"{label} merged" in ev:
            out[label]["merged / base"] = paired_ratio(ev, "base", f"{label} merged")
    return out


def markdown(results, facts, sweep=None):
    lines = [f"machine: {facts}", ""]
    for r in results:
        rat = ratios(r)
        ev = r["eval_tokens_per_s"]
        mem = r["memory"]
        lines += [f"### {r['name']} (batch {r['batch']} x seq {r['seq']})", "",
                  "| method | train step (ms) | × LoRA(r) | × LoRA(2r) | ours / PEFT | fused / plain | aten calls / step | saved activations (MB) | step footprint (MB) | footprint × LoRA(2r) | eval tok/s unmerged | merged | merged / base |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for k, t in r["train_step_s"].items():
            unmerged, merged = ev.get(f"{k} unmerged"), ev.get(f"{k} merged")
            act, foot = mem[k]["saved_activation_bytes"], mem[k]["step_footprint_bytes"]
            cells = [k, f"{1000 * t:.1f}", f"{rat[k]['vs LoRA(r)']:.2f}", f"{rat[k]['vs LoRA(2r)']:.2f}",
                     f"{rat[k]['ours / PEFT']:.2f}" if "ours / PEFT" in rat[k] else "–",
                     f"{rat[k]['fused / plain']:.2f}" if "fused / plain" in rat[k] else "–", f"{r['aten_calls_per_step'][k]:,}", f"{act / 2**20:.1f}",
                     f"{foot / 2**20:.1f}", f"{foot / mem['LoRA(2r)']['step_footprint_bytes']:.2f}",
                     f"{unmerged:,.0f}" if unmerged else "–", f"{merged:,.0f}" if merged else "–",
                     f"{rat[k]['merged / base']:.2f}" if merged else "–"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"base model eval: {ev['base']:,.0f} tok/s", ""]
    if sweep:
        lines += ["", "### fixed batch of 8 sequences, default model (tokens per step grow with the sequence)", "",
                  "| seq | tokens/step | LoRA(r) step (ms) | DoRA(r) / LoRA(r) | D2-LoRA(r) / LoRA(r) |", "|---|---|---|---|---|"]  # fmt: skip
        for row in sweep:
            lines.append(f"| {row['seq']} | {row['tokens']} | {row['LoRA(r) step ms']:.1f} | {row['DoRA(r) / LoRA(r)']:.2f} | {row['D2-LoRA(r) / LoRA(r)']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per measurement (median reported)")
    parser.add_argument("--quick", action="store_true", help="3 repetitions and a smaller compute-bound batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--only", default=None, help="run only shapes whose name contains this text")
    parser.add_argument("--publish", default=None, metavar="NAME", help="also write the report to docs/results/NAME/")
    args = parser.parse_args(argv)

    def body():
        if args.only is not None:  # before anything is written: a report of nothing would replace the last one
            names = [name for name, *_ in shapes(args.quick)]
            if not args.only.strip():
                raise UsageError("--only is empty; leave it out to measure every shape and the sequence sweep")
            if not any(args.only in name for name in names) and args.only not in "sweep":
                raise UsageError(f"--only {args.only!r} matches nothing to measure; shapes: {'; '.join(names)}, and "
                                 f"'sweep' (the sequence sweep)")  # fmt: skip
        check_writable(args.out)  # now, not after all the measurements
        if args.publish is not None:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", args.publish):
                raise UsageError(f"--publish takes a folder name of ASCII letters, digits, _ and -, got {args.publish!r}")
            check_writable(PUBLISHED / args.publish)
        if args.reps < 1:
            raise UsageError(f"--reps must be >= 1, got {args.reps}")
        if args.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {args.device!r}")
        device = pick_device(args.device)
        reps = 3 if args.quick else args.reps
        try:
            import peft  # noqa: F401  (only whether it is installed)

            peft_ok = True
        except ImportError:
            peft_ok = False
            print("peft not installed: skipping the comparison with PEFT (pip install -e '.[peft]')")
        facts = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads, device {device}"
                 + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "") + f", {reps} interleaved reps, medians")  # fmt: skip
        print(facts, flush=True)
        results = []
        for name, config, batch, seq, inner, targets in shapes(args.quick):
            if args.only and args.only not in name:
                continue
            t0 = time.time()
            results.append(bench_shape(name, config, batch, seq, inner, device, reps, peft_ok, targets))
            print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        sweep = None
        if not args.only or args.only in "sweep":
            t0 = time.time()
            sweep = sequence_sweep(device, reps)
            print(f"fixed-batch sequence sweep: {time.time() - t0:.0f} s", flush=True)
        text = markdown(results, facts, sweep)
        folders = [Path(args.out)] + ([PUBLISHED / args.publish] if args.publish else [])
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / "bench.json", {"machine": facts, "results": results, "ratios": [ratios(r) for r in results], "sequence_sweep": sweep})
            write_text(folder / "bench.md", text)
        print("\n" + text + f"\nwritten: {', '.join(f'{f}/bench.json, bench.md' for f in folders)}")
        return 0

    return run_cli(parser, body)


if __name__ == "__main__":
    sys.exit(main())
