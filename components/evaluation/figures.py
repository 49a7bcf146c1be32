"""The pictures of a validation: confusion matrix, reliability diagram, the most confident mistakes."""

from __future__ import annotations

from pathlib import Path

from sklearn import metrics as skm

from components.evaluation.metrics import BINS


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_confusion_matrix(y_true, y_pred, class_names: list[str], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(class_names), 1 + 0.6 * len(class_names)))
    skm.ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(range(len(class_names))),
                                                display_labels=class_names, ax=ax, colorbar=False)
    ax.set_title("test split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_reliability(table: list[dict], ece: float, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.bar([r["bin_low"] for r in table], [r["accuracy"] for r in table], width=1 / BINS, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.set_xlabel("confidence"), ax.set_ylabel("accuracy"), ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_title(f"reliability (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_misclassified(items: list[tuple], path: Path) -> None:
    """The most confident mistakes: (RGB image, true label, predicted label, confidence) each."""
    plt = _pyplot()
    cols = 4
    rows = max(1, -(-len(items) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, actual, predicted, conf) in zip(axes.flat, items):
        ax.imshow(image)
        ax.set_title(f"true {actual}\npred {predicted} ({conf:.2f})", fontsize=8)
    if not items:
        axes[0][0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
