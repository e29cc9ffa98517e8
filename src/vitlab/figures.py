"""Figures people look at, rendered headless to PNG (each written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from vitlab import io


def plot_training_curves(history: list[dict[str, float]], path: str | Path) -> None:
    """Loss, accuracy and learning rate per epoch, train beside validation, in one row of three panels."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    for ax, metric in zip(axes[:2], ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], label="train", marker=".")
        if "val_" + metric in history[0]:
            ax.plot(epochs, [row[f"val_{metric}"] for row in history], label="validation", marker=".")
        ax.set(title=metric, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].plot(epochs, [row["lr"] for row in history], color="tab:green")
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
