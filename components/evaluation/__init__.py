"""Evaluation and the gate: how good a model is on the test split, and whether it may replace the champion.

    metrics.py      accuracy, macro F1, per-class recall and precision, calibration
    comparison.py   the paired test of a challenger against the champion on the same images
    gate.py         the decision: thresholds, and not worse than the champion
    figures.py      the confusion matrix, the reliability diagram, the most confident mistakes
"""
