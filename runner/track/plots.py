"""Plots logged to MLflow: the answer distribution over training, like the dice post's charts."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def distribution_over_steps(
    history: Sequence[tuple[int, Mapping[str, float]]],
    eval_history: Sequence[tuple[int, Mapping[str, float]]],
    keys: Sequence[str],
    valid: Sequence[str],
    path: Path,
    title: str,
) -> Path:
    """Stacked areas: fraction of each answer per step, rollouts on top, evaluations below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("training rollouts", history)] + ([("evaluation (T=1)", eval_history)] if eval_history else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    colors = {k: ("#bbbbbb" if k not in valid and k == keys[-1] else cmap(i % 10)) for i, k in enumerate(keys)}
    for ax, (label, rows) in zip(axes[:, 0], panels):
        steps = [s for s, _ in rows]
        ys = [[d.get(k, 0.0) for _, d in rows] for k in keys]
        labels = [f"{k}{'' if k in valid else ' (no reward)'}" for k in keys]
        ax.stackplot(steps, ys, labels=labels, colors=[colors[k] for k in keys], alpha=0.9)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(0, 1)
        lo, hi = min(steps, default=0), max(steps, default=1)
        ax.set_xlim(lo - 0.5, hi + 0.5) if lo == hi else ax.set_xlim(lo, hi)
        ax.set_ylabel("fraction")
        ax.set_title(f"{title}: {label}")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
