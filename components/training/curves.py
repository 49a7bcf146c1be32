"""The training curves as a picture: losses, accuracies and the learning rate by epoch."""

from __future__ import annotations

from pathlib import Path


def save_curves(history: list[dict], best_epoch: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], marker="o", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], marker="o", label="validation")
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch"), ax.set_title(metric), ax.legend()
    axes[2].plot(epochs, [r["lr"] for r in history], marker="o")
    axes[2].set_xlabel("epoch"), axes[2].set_title("learning rate (base group)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
