"""Is the challenger worse than the champion? A paired test on per-image correctness.

Both models are judged on the same test images, so the question is about paired outcomes: the
images only one of them gets right. Two numbers (accuracy 0.951 vs 0.948) say nothing on their
own; the paired bootstrap says how far below the champion the challenger could really be.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest


def paired_comparison(challenger_correct, champion_correct, margin: float, confidence: float,
                      samples: int, seed: int = 0) -> dict:
    """Non-inferiority of the challenger's accuracy, within `margin`, at `confidence`.

    Passes when the one-sided lower confidence bound of (challenger - champion) accuracy,
    from a paired bootstrap over test images, is at least -margin. McNemar's exact test on the
    discordant pairs is reported beside it (two-sided: do the two models differ at all?).
    """
    a = np.asarray(challenger_correct, dtype=bool)
    b = np.asarray(champion_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired comparison needs two equally long, non-empty correctness vectors")
    d = a.astype(np.int8) - b.astype(np.int8)  # +1 only challenger right, -1 only champion right
    rng = np.random.default_rng(seed)
    diffs = np.empty(samples)
    chunk = max(1, 2_000_000 // len(d))  # bounded memory for large test sets
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        diffs[start:start + n] = d[rng.integers(0, len(d), (n, len(d)))].mean(axis=1)
    lower = float(np.quantile(diffs, 1 - confidence))
    only_challenger, only_champion = int((d == 1).sum()), int((d == -1).sum())
    discordant = only_challenger + only_champion
    p_value = float(binomtest(only_challenger, discordant, 0.5).pvalue) if discordant else 1.0
    return {
        "n": int(len(d)),
        "challenger_accuracy": float(a.mean()),
        "champion_accuracy": float(b.mean()),
        "accuracy_difference": float(d.mean()),
        "lower_bound": lower,
        "confidence": confidence,
        "margin": margin,
        "bootstrap_samples": samples,
        "only_challenger_correct": only_challenger,
        "only_champion_correct": only_champion,
        "mcnemar_p_value": p_value,
        "passed": lower >= -margin,
    }
