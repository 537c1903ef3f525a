"""The plots of a comparison: training-loss curves and accuracy by learning rate (matplotlib, no display)."""

import os

import numpy as np

from ..files.io import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Write the figure as a PNG atomically (a temporary file of this process's own, renamed into place). If it
    cannot be written (a full disk), an older plot of that name is removed, so that no stale plot stays behind."""
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    except OSError as e:
        if os.path.exists(path):
            os.remove(path)
        raise OSError(e.errno, f"could not write the plot {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def plot_losses(runs, path):
    """Training-loss curves (a moving average over 10 steps), one line per method and seed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if r.get("losses"):
            k = min(10, len(r["losses"]))
            smooth = np.convolve(r["losses"], np.ones(k) / k, mode="valid")
            ax.plot(smooth, label=f"{r['label']} s{r['seed']}", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving mean)")
    ax.set_yscale("log")
    if ax.lines:  # (a comparison of `base` alone has no training curve)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def plot_lr_sweep(points, path, chosen=None):
    """points: {method: [(lr, mean accuracy, lo, hi)]} -> accuracy vs learning rate with 95 % CI bands; chosen
    {method: lr}, if given, is marked with a star."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, pts in points.items():
        pts = sorted(pts)
        lr = [p[0] for p in pts]
        line = ax.plot(lr, [100 * p[1] for p in pts], marker="o", label=label)[0]
        ax.fill_between(lr, [100 * p[2] for p in pts], [100 * p[3] for p in pts], alpha=0.2)
        if chosen and label in chosen:
            best = next(p for p in pts if p[0] == chosen[label])
            ax.plot([best[0]], [100 * best[1]], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("mean accuracy over tasks (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_forest(groups, path, reference_label, paper=None):
    """The answer as a forest plot: each method's difference from the reference (pp of mean accuracy) with its 95 % CI.

    groups: [(title, [row])], one panel each, row = {"label", "diff", "lo", "hi", "params", "step"} (fractions of 1 for
    the difference; step time as a multiple of LoRA(r)'s or None). paper: {label: the paper's figure in pp}, drawn as
    an open diamond on that row."""
    plt = pyplot()
    n_rows = sum(len(rows) for _, rows in groups)
    fig, axes = plt.subplots(
        len(groups),
        1,
        figsize=(7.5, 0.9 + 0.45 * n_rows + 0.5 * len(groups)),
        squeeze=False,
        gridspec_kw={"height_ratios": [max(1, len(rows)) for _, rows in groups]},
        sharex=True,
    )
    for ax, (title, rows) in zip(axes[:, 0], groups):
        ys = np.arange(len(rows))[::-1]
        for y, row in zip(ys, rows):
            color = "tab:blue" if row["lo"] > 0 else "tab:red" if row["hi"] < 0 else "tab:grey"
            ax.errorbar(
                100 * row["diff"],
                y,
                xerr=[[100 * (row["diff"] - row["lo"])], [100 * (row["hi"] - row["diff"])]],
                fmt="o",
                color=color,
                capsize=3,
            )
            if paper and row["label"] in paper:
                ax.plot(
                    [paper[row["label"]]],
                    [y],
                    marker="D",
                    markerfacecolor="none",
                    color="black",
                    markersize=7,
                    label="the paper's figure",
                )
            step = "" if row.get("step") is None else f", step {row['step']:.2f}x LoRA(r)"
            ax.annotate(
                f"{row['params']:,} params{step}",
                xy=(1.01, y),
                xycoords=("axes fraction", "data"),
                va="center",
                fontsize=7,
            )
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(ys, [row["label"] for row in rows], fontsize=8)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    beside = "trainable parameters" + (
        " and training step time" if any(row.get("step") for _, rows in groups for row in rows) else ""
    )
    axes[-1, 0].set_xlabel(
        f"difference in mean accuracy from {reference_label} (pp), 95 % CI; right: {beside}", fontsize=8
    )
    fig.tight_layout()
    save_figure(fig, path)


def plot_lr_match(d2, lora, k, path, d2_label, lora_label):
    """d2, lora: [(lr, mean, lo, hi)] -> LoRA(2r)'s validation accuracy against lr, and D2-LoRA's twice: at its own lr
    (faint) and moved to k times it, k fitted by stats.lr_match."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for pts, scale, label, style in (
        (lora, 1.0, lora_label, dict(color="tab:blue")),
        (d2, 1.0, f"{d2_label} at its lr", dict(color="tab:orange", alpha=0.35, linestyle=":")),
        (d2, k, f"{d2_label} at {k:.2f} x its lr", dict(color="tab:orange")),
    ):
        pts = sorted(pts)
        lr = [scale * p[0] for p in pts]
        ax.plot(lr, [100 * p[1] for p in pts], marker="o", label=label, **style)
        if style.get("alpha") is None:
            ax.fill_between(lr, [100 * p[2] for p in pts], [100 * p[3] for p in pts], alpha=0.15, color=style["color"])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (D2-LoRA's multiplied by k where said)")
    ax.set_ylabel("mean validation accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
