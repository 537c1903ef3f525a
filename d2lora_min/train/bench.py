"""`make bench`: the cost of each method, as ratios measured side by side in one process.

    d2lora bench                              # writes runs/bench/bench.json and bench.md
    d2lora bench --quick                      # 3 repetitions, for a smoke test
    d2lora bench --publish --name bench_run1  # also docs/results/bench_run1/

For each shape, every method gets its own copy of one randomly initialised model, and the measurements are
interleaved: each repetition times every method once, in a fresh random order, so that a slow moment of a shared
machine or a fixed place in the order favours no method. Times are medians over the repetitions; a ratio (to LoRA(r),
to LoRA(2r), merged to base) is the median of the per-repetition ratios of two measurements taken in the same
repetition, which cancels most of the machine's drift.

  train step   forward + backward + AdamW step of a fine-tuning batch
  eval         forward-only tokens/s of the base model, of each method unmerged, and merged
  memory       bytes autograd saves for backward (exact and repeatable, counted with saved-tensor hooks), and the
               step footprint: those plus every weight and the trainable tensors' gradients and Adam moments (where a
               step peaks); on CUDA also torch.cuda.max_memory_allocated during the step
  PEFT         our LoRA and DoRA training step against PEFT's on the same model (when peft is installed)
  fused        DoRA and D2-LoRA through the opt-in fused path (nn/fused.py) against their plain forward()

Shapes: the compare shape (d_model 128, 2 blocks, a packed step of make compare: 10 rows of 128 positions, q, k, v, o
adapted, at the compare rank), a mid shape (4 blocks, d_model 256, 16 x 128 tokens, every linear adapted) and a
compute-bound one (d_model 768, 2 blocks, sequence 512), where the paper's training-overhead figure comes from. Last,
D2-LoRA's and DoRA's step time over LoRA(r)'s at a fixed batch of sequences of growing length (the paper: the
overhead falls with longer sequences).
"""

import argparse
import copy
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from tiny_gpt import GPT, GPTConfig

from ..files.io import check_paths, check_writable, write_json, write_text
from ..nn import METHODS, display_name, inject_adapters, merge_adapters, set_fused
from .cli import UsageError, run_cli
from .data import VOCAB_SIZE
from .measure import interleaved, memory_of, paired_ratio
from .settings import PUBLISHED, CompareConfig
from .specs import TARGET_GROUPS
from .trainer import TrainConfig, make_optimizer, pick_device

R = CompareConfig().r  # the compare rank: LoRA(r), LoRA(2r), DoRA(r), D2-LoRA(r)
ATTN = TARGET_GROUPS["attn"]  # what make compare adapts (q, k, v, o, as the paper)


# D2-LoRA's default (the paper's form, tau fixed) and its variants: row label suffix -> options
D2_VARIANTS = {
    "": {},
    " exact-norm": {"readd_delta": False},
    " detach_norm": {"detach_norm": True},
    " project=false": {"project": False},
}


def methods():
    """[(label, method, options)]: the compared roles, D2-LoRA's variants, the fused path's rows (every other row runs
    the plain forward() of its method file), and a row at rank r for any other registered method."""
    rows = [("LoRA(r)", "lora", {"r": R}), ("LoRA(2r)", "lora", {"r": 2 * R}), ("DoRA(r)", "dora", {"r": R})]
    rows += [(f"D2-LoRA(r){label}", "d2lora", {"r": R, **opts}) for label, opts in D2_VARIANTS.items()]
    rows += [("DoRA(r) fused", "dora", {"r": R}), ("D2-LoRA(r) fused", "d2lora", {"r": R})]
    return rows + [(f"{display_name(m)}(r)", m, {"r": R}) for m in METHODS if m not in {row[1] for row in rows}]


def shapes(quick):
    """[(name, config, batch, seq, steps timed together per repetition, targets)]: short steps are timed in groups."""
    small = GPTConfig(vocab_size=VOCAB_SIZE, block_size=128, n_layer=2, n_head=4, d_model=128)
    mid = GPTConfig(vocab_size=VOCAB_SIZE, block_size=128, n_layer=4, n_head=4, d_model=256)
    big = GPTConfig(vocab_size=VOCAB_SIZE, block_size=512, n_layer=2, n_head=12, d_model=768)
    return [
        ("compare d128, packed 10 x 128", small, 10, 128, 3, ATTN),  # 32 items of ~37 tokens: 10 rows of 128
        ("mid d256 4 blocks, 16 x 128, every linear", mid, 16, 128, 1, TARGET_GROUPS["all"]),
        ("compute-bound d768 seq512", big, 1 if quick else 2, 512, 1, ATTN),
    ]


def make_models(config, device, peft_ok, targets):
    """{label: model} for the base and every method (each its own copy), plus PEFT's LoRA and DoRA."""
    torch.manual_seed(0)
    models = {"base": GPT(config).to(device)}
    for label, method, opts in methods():
        opts = dict(opts)
        r = opts.pop("r")
        model = copy.deepcopy(models["base"])
        models[label] = inject_adapters(model, method, r=r, alpha=2 * r, targets=targets, **opts)
        set_fused(models[label], label.endswith(" fused"))
    if peft_ok:
        from peft import LoraConfig, inject_adapter_in_model

        for label, dora in (("PEFT LoRA(r)", False), ("PEFT DoRA(r)", True)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=list(targets), lora_dropout=0.0, use_dora=dora)
                models[label] = inject_adapter_in_model(cfg, copy.deepcopy(models["base"]))
    return models


def train_step(model, x, y):
    """One training step of `model` on (x, y), with the trainer's optimizer."""
    opt = make_optimizer(model, TrainConfig(lr=1e-4))

    def step():
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_shape(name, config, batch, seq, inner, device, reps, peft_ok, targets):
    """Every measurement of one shape: training steps (interleaved), memory, evaluation unmerged and merged."""
    models = make_models(config, device, peft_ok, targets)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device) for _ in range(2))
    steps = {k: train_step(m, x, y) for k, m in models.items() if k != "base"}
    for step in [*steps.values()] * 2:  # warm-up: allocator, optimizer state
        step()
    step_times = interleaved(steps, device, reps, inner)
    memory = {k: memory_of(models[k], step, x, y, device) for k, step in steps.items()}
    with torch.no_grad():
        evals = {"base": models["base"]}
        for label, _, _ in methods():
            evals[f"{label} unmerged"] = models[label]
            evals[f"{label} merged"] = merge_adapters(copy.deepcopy(models[label]))
        for m in evals.values():
            m.eval()(x)  # warm-up
        eval_times = interleaved({k: (lambda m=m: m(x)) for k, m in evals.items()}, device, reps, 3 * inner)
    result = dict(name=name, batch=batch, seq=seq, d_model=config.d_model, n_layer=config.n_layer, memory=memory)
    result["train_step_s"] = {k: statistics.median(v) for k, v in step_times.items()}
    result["eval_tokens_per_s"] = {k: batch * seq / statistics.median(v) for k, v in eval_times.items()}
    return {**result, "train_step_reps_s": step_times, "eval_reps_s": eval_times}  # per repetition: paired ratios


def sequence_sweep(device, reps, batch=8, seqs=(64, 128, 256, 512)):
    """DoRA's and D2-LoRA's step time over LoRA(r)'s at a fixed batch of sequences of each length, default model."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=VOCAB_SIZE, block_size=max(seqs), n_layer=2, n_head=4, d_model=128)).to(device)
    models = {f"{display_name(m)}(r)": copy.deepcopy(base) for m in ("lora", "dora", "d2lora")}
    for label, model in models.items():
        inject_adapters(
            model, {"LoRA(r)": "lora", "DoRA(r)": "dora"}.get(label, "d2lora"), r=R, alpha=2 * R, targets=ATTN
        )
    rows = []
    for seq in seqs:
        g = torch.Generator().manual_seed(seq)
        x = torch.randint(0, base.config.vocab_size, (batch, seq), generator=g).to(device)
        steps = {k: train_step(m, x, x) for k, m in models.items()}
        for step in steps.values():
            step()
        times = interleaved(steps, device, reps, inner=3, seed=seq)
        row = {"seq": seq, "tokens": batch * seq, "LoRA(r) step ms": 1000 * statistics.median(times["LoRA(r)"])}
        rows.append({**row, **{f"{k} / LoRA(r)": paired_ratio(times, k, "LoRA(r)") for k in ("DoRA(r)", "D2-LoRA(r)")}})
    return rows


def ratios(result):
    st, ev = result["train_step_reps_s"], result["eval_reps_s"]
    out = {k: {f"vs {ref}": paired_ratio(st, k, ref) for ref in ("LoRA(r)", "LoRA(2r)")} for k in st}
    for k, label in (("PEFT LoRA(r)", "LoRA(r)"), ("PEFT DoRA(r)", "DoRA(r)")):
        if k in st:
            out[label]["ours / PEFT"] = paired_ratio(st, label, k)
    for k in st:
        if k.endswith(" fused") and k[: -len(" fused")] in st:  # the opt-in fused path against the plain one
            out[k]["fused / plain"] = paired_ratio(st, k, k[: -len(" fused")])
        if f"{k} merged" in ev:  # throughput merged / base = time base / time merged
            out[k]["merged / base"] = paired_ratio(ev, "base", f"{k} merged")
    return out


HEAD = (
    "method | train step (ms) | × LoRA(r) | × LoRA(2r) | ours / PEFT | fused / plain | saved activations (MB) | "
    "step footprint (MB) | footprint × LoRA(2r) | eval tok/s unmerged | merged | merged / base"
)


def markdown(results, facts, sweep=None):
    lines = [f"machine: {facts}", ""]
    for r in results:
        rat, ev, mem = ratios(r), r["eval_tokens_per_s"], r["memory"]
        lines += [f"### {r['name']} (batch {r['batch']} x seq {r['seq']})", "", f"| {HEAD} |", "|---" * 12 + "|"]
        for k, t in r["train_step_s"].items():
            merged, foot = ev.get(f"{k} merged"), mem[k]["step_footprint_bytes"]
            ratios_of = [
                f"{rat[k][n]:.2f}" if n in rat[k] else "–" for n in ("vs LoRA(r)", "vs LoRA(2r)", "ours / PEFT")
            ]
            ratios_of.append(f"{rat[k]['fused / plain']:.2f}" if "fused / plain" in rat[k] else "–")
            sizes = [
                mem[k]["saved_activation_bytes"] / 2**20,
                foot / 2**20,
                foot / mem["LoRA(2r)"]["step_footprint_bytes"],
            ]
            speed = (
                [f"{ev[f'{k} unmerged']:,.0f}", f"{merged:,.0f}", f"{rat[k]['merged / base']:.2f}"]
                if merged
                else ["–"] * 3
            )
            cells = [k, f"{1000 * t:.1f}", *ratios_of, f"{sizes[0]:.1f}", f"{sizes[1]:.1f}", f"{sizes[2]:.2f}", *speed]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"base model eval: {ev['base']:,.0f} tok/s", ""]
    if sweep:
        lines += ["", "### fixed batch of 8 sequences, default model (tokens per step grow with the sequence)", ""]
        lines += [
            "| seq | tokens/step | LoRA(r) step (ms) | DoRA(r) / LoRA(r) | D2-LoRA(r) / LoRA(r) |",
            "|---|---|---|---|---|",
        ]
        for row in sweep:
            cells = [row["seq"], row["tokens"], f"{row['LoRA(r) step ms']:.1f}", f"{row['DoRA(r) / LoRA(r)']:.2f}"]
            lines.append("| " + " | ".join(map(str, cells + [f"{row['D2-LoRA(r) / LoRA(r)']:.2f}"])) + " |")
    return "\n".join(lines) + "\n"


def check_args(args):
    """Every flag, before anything is measured or written (a report of nothing would replace the last one)."""
    names = [name for name, *_ in shapes(args.quick)]
    if args.only is not None and not args.only.strip():
        raise UsageError("--only is empty; leave it out to measure every shape and the sequence sweep")
    if args.only is not None and not any(args.only in n for n in [*names, "sweep"]):
        raise UsageError(f"--only {args.only!r} matches nothing to measure; shapes: {'; '.join(names)}, and 'sweep'")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        raise UsageError(f"--name takes a folder name of ASCII letters, digits, _ and -, got {args.name!r}")
    if args.reps < 1 or args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--reps must be >= 1 and --device auto, cpu or cuda, got {args.reps} and {args.device!r}")
    folders = [Path("runs") / args.name] + ([PUBLISHED / args.name] if args.publish else [])
    for folder in folders:
        check_paths(folder.parent, files=[folder / "bench.json", folder / "bench.md"], folders=[folder])
        check_writable(folder)
    return folders


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="d2lora bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (medians reported)")
    parser.add_argument("--quick", action="store_true", help="3 repetitions and a smaller compute-bound batch")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--only", help="only the shapes whose name contains this text ('sweep': the sweep)")
    parser.add_argument("--name", default="bench", help="the report's folder in runs/ (and in docs/results/)")
    parser.add_argument("--publish", action="store_true", help="also write the report to docs/results/<name>/")
    args = parser.parse_args(argv)

    def body():
        folders = check_args(args)
        device, reps = pick_device(args.device), 3 if args.quick else args.reps
        try:
            import peft  # noqa: F401  (only whether it is installed)
        except ImportError:
            peft = None
            print("peft not installed: skipping the comparison with PEFT (pip install -e '.[peft]')")
        gpu = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
        facts = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        facts += f"{torch.get_num_threads()} threads, device {device}{gpu}, {reps} interleaved reps, medians"
        print(facts, flush=True)
        results = []
        for name, config, batch, seq, inner, targets in shapes(args.quick):
            if not args.only or args.only in name:
                t0 = time.time()
                results.append(bench_shape(name, config, batch, seq, inner, device, reps, peft is not None, targets))
                print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        sweep = sequence_sweep(device, reps) if not args.only or args.only in "sweep" else None
        report = {"machine": facts, "results": results, "ratios": [ratios(r) for r in results], "sequence_sweep": sweep}
        for folder in folders:
            write_json(folder / "bench.json", report)
            write_text(folder / "bench.md", markdown(results, facts, sweep))
        print(
            "\n"
            + markdown(results, facts, sweep)
            + f"\nwritten: {', '.join(f'{f}/bench.json, bench.md' for f in folders)}"
        )
        return 0

    return run_cli(parser, body)


if __name__ == "__main__":
    sys.exit(main())
