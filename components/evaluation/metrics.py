"""Test-split metrics of a classifier's predictions, and how well its confidence is calibrated."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

BINS = 10  # reliability diagram bins


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    labels = list(range(len(class_names)))
    recall = skm.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    precision = skm.precision_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "min_class_recall": float(recall.min()),
        "per_class_recall": {c: float(r) for c, r in zip(class_names, recall)},
        "per_class_precision": {c: float(p) for c, p in zip(class_names, precision)},
        "num_test_images": int(len(y_true)),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),  # rows: actual
        "class_names": list(class_names),
    }


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> tuple[float, list[dict]]:
    """Expected calibration error and the reliability table (equal-width confidence bins)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
            ece += mask.mean() * abs(acc - conf)
            table.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]), "confidence": conf,
                          "accuracy": acc, "count": int(mask.sum())})
    return float(ece), table
