"""The plots of a comparison: training-loss curves and accuracy by learning rate (matplotlib, no display)."""

import os

import numpy as np

from ..atomic import atomic_path


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


