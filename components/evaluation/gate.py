"""The gate: a model passes when every threshold holds and it is not worse than the champion.

`compare` says how the challenger stands against the champion (`status`: compared, disabled,
no_champion or not_comparable, with the reason when not compared); `decide` turns the metrics and
that comparison into the decision gate.json records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from components.config import ValidateConfig
from components.evaluation.comparison import paired_comparison
from components.evaluation.metrics import compute_metrics


@dataclass(frozen=True)
class Champion:
    """The model `register.alias` points at when validation starts."""
    version: str
    run_id: str
    model: object | None     # something with .class_names and .predict_proba(images); None when unusable
    unusable: str = ""       # why it could not be loaded


def comparable(champion: Champion | None, class_names: list[str]) -> bool:
    return champion is not None and champion.model is not None and champion.model.class_names == class_names


def compare(champion: Champion | None, class_names: list[str], y_true: np.ndarray, y_pred: np.ndarray,
            champion_pred: np.ndarray | None, cfg: ValidateConfig) -> dict:
    """The challenger against the champion on the same test images (a paired test), or why not."""
    if not cfg.compare_with_champion:
        return {"status": "disabled", "skipped": "validate.compare_with_champion is false"}
    if champion is None:
        return {"status": "no_champion", "skipped": "no champion yet: the thresholds alone decide"}
    if champion.model is None:
        return {"status": "not_comparable", "skipped": f"champion v{champion.version} is not comparable: "
                f"{champion.unusable}", "champion_version": champion.version}
    if champion.model.class_names != class_names:
        return {"status": "not_comparable", "skipped": f"champion v{champion.version} has classes "
                f"{champion.model.class_names}, the challenger {class_names}: not comparable",
                "champion_version": champion.version}
    result = paired_comparison(y_pred == y_true, champion_pred == y_true, cfg.champion_margin, cfg.confidence,
                               cfg.bootstrap_samples, cfg.seed)
    metrics = compute_metrics(y_true, champion_pred, class_names)
    return {"status": "compared", "champion_version": champion.version, "champion_run_id": champion.run_id,
            **result, "champion_metrics": {k: metrics[k] for k in ("accuracy", "macro_f1", "min_class_recall")}}


def decide(metrics: dict, cfg: ValidateConfig, comparison: dict | None = None) -> dict:
    """Pass only when every threshold holds and the champion comparison (if any) passed."""
    checks = [
        {"name": name, "value": metrics[name], "threshold": threshold, "passed": metrics[name] >= threshold}
        for name, threshold in (("accuracy", cfg.min_accuracy), ("macro_f1", cfg.min_macro_f1),
                                ("min_class_recall", cfg.min_class_recall))
    ]
    reasons = [f"{c['name']} {c['value']:.4f} < {c['threshold']}" for c in checks if not c["passed"]]
    if comparison and comparison.get("passed") is False:
        reasons.append(f"worse than champion v{comparison['champion_version']}: accuracy difference lower bound "
                       f"{comparison['lower_bound']:.4f} < -{comparison['margin']} "
                       f"(at {comparison['confidence']:.0%} confidence)")
    return {"passed": not reasons, "checks": checks, "reasons": reasons, "champion": comparison,
            "config": cfg.model_dump(mode="json")}
