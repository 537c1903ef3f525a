"""The report of `make bench` (bench.py): ratios from the interleaved measurements (each the median of per-repetition
paired ratios) and the Markdown tables."""

import statistics


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
