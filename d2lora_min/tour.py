"""`make tour`: the pictures a learner would rather look at than read, written to docs/ (docs/TOUR.md shows them).

  d2lora tour

tour_toy.png      a 2x2 weight: the path of one row under every method (and D2-LoRA's exact-norm form) on the same
                  toy loss, against the circle of radius norm(W0_0)
tour_drift.png    the tiny GPT fine-tuned with each of them: per layer, the mean row-norm ratio norm(W_i)/norm(W0_i)
                  (the exact-norm form stays on 1)
tour_tau.png      D2-LoRA's tau in each layer over that fine-tuning, with learn_tau=True (the default keeps it fixed)
tour_radial.png   the gradient reaching each D2-LoRA layer's rows through V, split into its radial part (along the
                  row: it would stretch the row) and its tangential part, with the norm attached and detached
tour_turn.png     per row of every trained model, how far the applied weight turned and stretched against how far
                  the update dW did: each method's first-order form, measured
"""

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .files.io import check_paths, check_writable
from .nn import METHODS, adapter_layers, display_name, inject_adapters, row_factor, row_norm
from .synthetic.tasks import TASKS
from .synthetic.world import World
from .train.cli import UsageError, check_range, run_cli
from .train.data import EOT, finetune_batches
from .train.plots import pyplot, save_figure
from .train.pretrain import load_base
from .train.settings import ROOT, CompareConfig, budget
from .train.tasks import build_splits
from .train.trainer import train


def variants():
    """What the pictures show: every registered method at its defaults, and beside D2-LoRA's default (the paper's
    form, W = P(V) + dW) its exact-norm form (W = P(V)) -> [(label, method, options)]."""
    out = [(display_name(m), m, {}) for m in METHODS]
    if "d2lora" in METHODS:
        out.append((f"{display_name('d2lora')} exact-norm", "d2lora", {"readd_delta": False}))
    return out


def toy_paths(steps=300, lr=0.03):
    """{label: (steps + 1, 2) path of row 0 of the merged 2x2 weight}, for every variant trained by Adam to fit a
    target row that is longer than W0's and turned by 100 degrees."""
    W0 = torch.tensor([[1.0, 0.0], [0.3, 0.8]], dtype=torch.float64)
    angle = np.deg2rad(100)
    target = torch.tensor([[1.6 * np.cos(angle), 1.6 * np.sin(angle)], [0.3, 0.8]], dtype=torch.float64)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    paths = {}
    for label, method, options in variants():
        torch.manual_seed(0)
        base = nn.Linear(2, 2, bias=False).double()
        with torch.no_grad():
            base.weight.copy_(W0)
        layer = METHODS[method](base, r=1, alpha=1.0, **options)
        opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=lr)
        path = [layer.merged_weight()[0].detach().clone()]
        for _ in range(steps):
            loss = (layer(x) - x @ target.T).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            path.append(layer.merged_weight()[0].detach().clone())
        paths[label] = torch.stack(path).numpy()
    return paths, W0[0].numpy(), target[0].numpy()


def plot_toy(path):
    paths, w0, target = toy_paths()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    t = np.linspace(0, 2 * np.pi, 200)
    r = np.linalg.norm(w0)
    ax.plot(r * np.cos(t), r * np.sin(t), color="grey", linestyle="--", linewidth=1, label="norm(W0_0) circle")
    for label, p in paths.items():
        ax.plot(p[:, 0], p[:, 1], label=label, linewidth=2)
    ax.scatter(*w0, color="black", zorder=3, label="W0 row 0 (start)")
    ax.scatter(*target, color="red", marker="*", s=120, zorder=3, label="target row")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("one row of a 2x2 weight during training")
    fig.tight_layout()
    save_figure(fig, path)


def finetune_with_trace(method, options, base_model, tokenizer, splits, cfg, record_every=2):
    """Fine-tune a copy of the base with `method`; record each layer's mean row-norm ratio (and tau)."""
    model = copy.deepcopy(base_model)
    torch.manual_seed(0)
    inject_adapters(model, method, r=4, alpha=8, targets=cfg.targets, **options)
    names = [n for n, _ in adapter_layers(model)]
    trace = {"step": [], "ratio": [], "tau": []}

    @torch.no_grad()
    def record(step, m, result):
        if step % record_every:
            return
        layers = [layer for _, layer in adapter_layers(m)]
        trace["step"].append(step)
        trace["ratio"].append(
            [(row_norm(layer.merged_weight()) / row_norm(layer.base.weight)).mean().item() for layer in layers]
        )
        trace["tau"].append([layer.tau.item() if hasattr(layer, "tau") else np.nan for layer in layers])

    tcfg = budget(cfg)
    tcfg.progress, tcfg.desc = False, method
    get_batch = finetune_batches(
        tokenizer,
        {k: parts.train for k, parts in splits.items()},
        tcfg.batch_size,
        0,
        tokenizer.token_to_id(EOT),
        capacity=base_model.config.block_size,
    )
    record(0, model, None)
    train(model, get_batch, tcfg, callback=record)
    return model, names, trace, get_batch


def plot_drift(traces, names, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(traces), figsize=(4 * len(traces), 3.6), sharey=True)
    for ax, (label, trace) in zip(axes, traces.items()):
        ratio = np.asarray(trace["ratio"])  # (records, layers)
        for j, name in enumerate(names):
            ax.plot(
                trace["step"],
                ratio[:, j],
                linewidth=1,
                label=name.replace("blocks.", "").replace(".attn", "").replace(".mlp", ""),
            )
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(label)
        ax.set_xlabel("step")
    axes[0].set_ylabel("mean over rows of norm(W_i) / norm(W0_i)")
    axes[-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def plot_tau(trace, names, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    tau = np.asarray(trace["tau"])
    for j, name in enumerate(names):
        ax.plot(
            trace["step"],
            tau[:, j],
            linewidth=1,
            label=name.replace("blocks.", "").replace(".attn", "").replace(".mlp", ""),
        )
    ax.set_xlabel("step")
    ax.set_ylabel("tau")
    ax.set_title("D2-LoRA, learn_tau=True: tau per layer (default: fixed at 0.5)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


@torch.no_grad()
def turn_and_stretch(model):
    """Per row of every adapted layer, relative to norm(W0_i): how far the update dW turns and stretches the row, and how
    far the weight the layer applies, W, does -> {"turn": (rows, 2), "stretch": (rows, 2)}, columns (dW's, W - W0's).
    The turn is the length of the part across the row, tan; the stretch the signed length of the part along it, rad."""
    turn, stretch = [], []
    for _, layer in adapter_layers(model):
        W0 = layer.base.weight
        size = row_norm(W0)[:, None]  # (out, 1)
        u = W0 / size  # (out, in): unit rows
        for change in (layer.delta_weight(), layer.merged_weight() - W0):  # the update, and what the layer makes of it
            rad = (change * u).sum(1, keepdim=True)  # (out, 1): signed length along the row
            turn.append(((change - rad * u).norm(dim=1, keepdim=True) / size).numpy())
            stretch.append((rad / size).numpy())
    turn = [np.concatenate(turn[0::2]), np.concatenate(turn[1::2])]  # every layer's rows: dW's, then W - W0's
    stretch = [np.concatenate(stretch[0::2]), np.concatenate(stretch[1::2])]
    return {"turn": np.hstack(turn), "stretch": np.hstack(stretch)}


def plot_turn_and_stretch(models, path):
    """Two panels, a point per row of every trained model: how far W turned against how far dW turned, and how far W
    stretched against how far dW stretched (first order: LoRA 1 and 1, the paper's form 2 and 1, exact-norm 1 and 0)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    data = {label: turn_and_stretch(model) for label, model in models.items()}
    for ax, key, slopes in ((axes[0], "turn", (1, 2)), (axes[1], "stretch", (0, 1))):
        top = max(float(np.abs(d[key][:, 0]).max()) for d in data.values())
        for label, d in data.items():
            ax.scatter(d[key][:, 0], d[key][:, 1], s=4, alpha=0.35, label=label)
        for k in slopes:
            xs = np.array([-top if key == "stretch" else 0.0, top])
            ax.plot(xs, k * xs, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"slope {k}", xy=(top, k * top), fontsize=8, color="grey", ha="right", va="bottom")
        what = "turn (across the row)" if key == "turn" else "stretch (along the row)"
        ax.set_xlabel(f"the update dW's {what} / norm(W0_i)", fontsize=9)
        ax.set_ylabel(f"the applied W's {what} / norm(W0_i)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, markerscale=3)
    fig.suptitle("each row of every adapted layer after fine-tuning: what the layer makes of its update", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(fig, path)


def radial_fractions(model, get_batch, detach):
    """Per layer: |radial part| / |dL/dV| for the trained D2-LoRA model on one more batch.

    dL/dV is what moves the rows (dL/dB = s dL/dV A^T, dL/dA = s B^T dL/dV); its radial part, along each row V_i,
    is the part that would stretch the row. Each layer runs its dense form W = (t / norm(V)) V (+ V - W0, the
    re-added dW, in the paper's form) with V a leaf."""
    model = copy.deepcopy(model)
    leaves = {}
    for name, layer in adapter_layers(model):

        def forward(x, layer=layer, name=name):
            A, B = layer.stacked_factors()
            V = (layer.base.weight + layer.scaling * B @ A).detach().requires_grad_(True)  # (out, in)
            leaves[name] = V
            c = row_factor(layer.target_norm, V, detach)  # (out,)
            W = c[:, None] * V + (V - layer.base.weight if layer.readd_delta else 0)  # P(V) (+ dW): (out, in)
            return nn.functional.linear(x, W, layer.base.bias)

        layer.forward = forward
    _, loss = model(*get_batch(10_000))
    loss.backward()
    out = []
    for name, V in leaves.items():
        g = V.grad  # (out, in)
        v_hat = V.detach() / row_norm(V.detach())[:, None]
        radial = (g * v_hat).sum(1, keepdim=True) * v_hat  # the component along each row
        out.append((radial.norm() / g.norm()).item())
    return out


def plot_radial(model, names, get_batch, path):
    attached = radial_fractions(model, get_batch, detach=False)
    detached = radial_fractions(model, get_batch, detach=True)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    idx = np.arange(len(names))
    ax.bar(idx - 0.2, detached, width=0.4, label="norm detached (as DoRA)", color="tab:red")
    ax.bar(idx + 0.2, attached, width=0.4, label="norm attached (D2-LoRA default)", color="tab:green")
    ax.set_xticks(
        idx, [n.replace("blocks.", "").replace(".attn", "").replace(".mlp", "") for n in names], rotation=45, fontsize=7
    )
    ax.set_ylabel("|radial part| / |dL/dV|")
    ax.set_title("the gradient on D2-LoRA's rows: the part that would stretch them")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def draw(out, n_train):
    """Every picture into the folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plot_toy(out / "tour_toy.png")
    print(f"wrote {out / 'tour_toy.png'}", flush=True)
    base_model, tokenizer, _ = load_base()
    cfg = CompareConfig(n_train=n_train, epochs=2)
    splits = build_splits(World(), TASKS, cfg.n_train, 10, seed=0)
    traces, models = {}, {}
    for label, method, options in variants():
        models[label], names, traces[label], get_batch = finetune_with_trace(
            method, options, base_model, tokenizer, splits, cfg
        )
    plot_drift(traces, names, out / "tour_drift.png")
    _, names, learned, _ = finetune_with_trace("d2lora", {"learn_tau": True}, base_model, tokenizer, splits, cfg)
    plot_tau(learned, names, out / "tour_tau.png")
    plot_radial(models[display_name("d2lora")], names, get_batch, out / "tour_radial.png")
    plot_turn_and_stretch(models, out / "tour_turn.png")
    print(f"wrote {out}/tour_drift.png, tour_tau.png, tour_radial.png, tour_turn.png")


def main(argv=None):
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="d2lora tour", description=__doc__, formatter_class=raw)
    parser.add_argument(
        "--out", default=str(ROOT / "docs"), help="where the pictures go (default: the committed docs/)"
    )
    parser.add_argument("--n_train", type=int, default=64, help="training items per task for the GPT pictures")
    args = parser.parse_args(argv)

    def body():
        check_range("--n_train", args.n_train, 1, 10_000)
        if not args.out:
            raise UsageError("--out is empty")
        out = Path(args.out)
        check_writable(out)
        check_paths(out, files=[out / f"tour_{name}.png" for name in ("toy", "drift", "tau", "radial", "turn")])
        draw(out, args.n_train)
        return 0

    return run_cli(parser, body)


if __name__ == "__main__":
    sys.exit(main())
