"""validate: test-split metrics, the gate (thresholds and the current champion), and the MLflow run.

    python -m components.validate --params params.yaml --dataset data/prepared --policy artifacts/augment \
        --weights artifacts/pretrained --model artifacts/model --out artifacts/validate

The model is evaluated as it will be served (components.serving: uint8 images in, its own
preprocessing inside), and so is the champion, on the same images. Writes metrics.json,
gate.json (the decision and every check behind it), per_class.csv, predictions.csv,
calibration.csv, confusion_matrix.png, reliability.png, misclassified.png, and run.json
(the MLflow run that register promotes from: the fine-tune's run, completed, see components.tracking).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from sklearn import metrics as skm
from tqdm import tqdm

from components import tracking
from components.atomic import atomic_dir, write_json
from components.compare import paired_comparison
from components.config import RegisterConfig, TrackingConfig, ValidateConfig, load_params
from components.dataset import read_manifest, read_split
from components.images import load_rgb
from components.serving import ImageClassifier

CHUNK = 256          # test images decoded at a time: memory stays flat on large test sets
BINS = 10            # reliability diagram bins
WORST = 16           # misclassified images shown


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


def find_champion(registry: RegisterConfig) -> dict | None:
    """The model `registry.alias` points at now: {version, run_id, model}, or None if there is none.

    The champion's weights are loaded from its checkpoint with weights_only=True and today's
    code, never by unpickling the code it was logged with.
    """
    import mlflow

    from components.registry import current_version

    client = tracking.client()
    version = current_version(client, registry.model_name, registry.alias)
    if version is None:
        return None
    champion = {"version": version, "run_id": client.get_model_version(registry.model_name, version).run_id,
                "model": None}
    try:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{registry.model_name}/{version}"))
        checkpoint = next(local.glob("artifacts/*.pt"), None)
        if checkpoint is None:
            champion["unusable"] = "it holds no pipeline checkpoint (registered by other means or an older version)"
        else:
            champion["model"] = ImageClassifier.from_checkpoint(checkpoint)
    except Exception as err:  # an unreadable champion must not stop a challenger from being judged
        champion["unusable"] = f"it could not be loaded ({type(err).__name__}: {err})"
    return champion


def _compare(champion: dict | None, challenger: ImageClassifier, y_true: np.ndarray, y_pred: np.ndarray,
             champion_pred: np.ndarray | None, cfg: ValidateConfig) -> dict | None:
    if not cfg.compare_with_champion:
        return {"skipped": "validate.compare_with_champion is false"}
    if champion is None:
        return {"skipped": "no champion yet: the thresholds alone decide"}
    if champion["model"] is None:
        return {"skipped": f"champion v{champion['version']} is not comparable: {champion['unusable']}",
                "champion_version": champion["version"]}
    if champion["model"].class_names != challenger.class_names:
        return {"skipped": f"champion v{champion['version']} has classes {champion['model'].class_names}, "
                           f"the challenger {challenger.class_names}: not comparable",
                "champion_version": champion["version"]}
    result = paired_comparison(y_pred == y_true, champion_pred == y_true, cfg.champion_margin, cfg.confidence,
                               cfg.bootstrap_samples, cfg.seed)
    metrics = compute_metrics(y_true, champion_pred, challenger.class_names)
    return {"champion_version": champion["version"], "champion_run_id": champion["run_id"], **result,
            "champion_metrics": {k: metrics[k] for k in ("accuracy", "macro_f1", "min_class_recall")}}


def validate(dataset_dir, model_dir, out, cfg: ValidateConfig, champion: dict | None = None) -> dict:
    """Evaluate on the test split, compare with `champion` (from find_champion), decide, write reports."""
    challenger = ImageClassifier.from_checkpoint(Path(model_dir) / "model.pt")
    class_names = challenger.class_names
    index = {c: i for i, c in enumerate(class_names)}
    test = read_split(dataset_dir, "test")
    comparable = champion is not None and champion["model"] is not None and \
        champion["model"].class_names == class_names
    probs, champion_pred = [], []
    for start in tqdm(range(0, len(test), CHUNK), desc="validate", unit="chunk", file=sys.stderr, disable=None):
        images = [np.asarray(load_rgb(path)) for path, _ in test[start:start + CHUNK]]
        probs.append(challenger.predict_proba(images))
        if comparable:
            champion_pred.append(champion["model"].predict_proba(images).argmax(1))
    probs = np.concatenate(probs)
    y_true = np.array([index[label] for _, label in test])
    y_pred, confidence = probs.argmax(1), probs.max(1)
    correct = y_pred == y_true

    result = compute_metrics(y_true, y_pred, class_names)
    result["ece"], reliability = calibration(confidence, correct)
    comparison = _compare(champion, challenger, y_true, y_pred,
                          np.concatenate(champion_pred) if comparable else None, cfg)
    gate = decide(result, cfg, comparison)
    rel_paths = [row["path"] for row in read_manifest(dataset_dir, "test")]  # as the manifest names them
    with atomic_dir(out) as tmp:
        write_json(tmp / "metrics.json", result)
        write_json(tmp / "gate.json", gate)
        _write_csv(tmp / "predictions.csv", ["path", "actual", "predicted", "confidence"],
                   [[p, class_names[t], class_names[q], f"{c:.4f}"]
                    for p, t, q, c in zip(rel_paths, y_true, y_pred, confidence)])
        _write_csv(tmp / "per_class.csv", ["class", "precision", "recall", "support"],
                   [[c, f"{result['per_class_precision'][c]:.4f}", f"{result['per_class_recall'][c]:.4f}",
                     int((y_true == i).sum())] for i, c in enumerate(class_names)])
        _write_csv(tmp / "calibration.csv", list(reliability[0]), [list(r.values()) for r in reliability])
        save_confusion_matrix(y_true, y_pred, class_names, tmp / "confusion_matrix.png")
        save_reliability(reliability, result["ece"], tmp / "reliability.png")
        worst = [i for i in np.argsort(-confidence) if not correct[i]][:WORST]
        save_misclassified([(test[i][0], class_names[y_true[i]], class_names[y_pred[i]], confidence[i])
                            for i in worst], tmp / "misclassified.png")
    return gate


def _write_csv(path: Path, header: list, rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


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
    """The most confident mistakes: (path, true label, predicted label, confidence) each."""
    plt = _pyplot()
    cols = 4
    rows = max(1, -(-len(items) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img_path, actual, predicted, conf) in zip(axes.flat, items):
        ax.imshow(load_rgb(img_path))
        ax.set_title(f"true {actual}\npred {predicted} ({conf:.2f})", fontsize=8)
    if not items:
        axes[0][0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(dataset_dir, policy_dir, weights_dir, model_dir, out, cfg: ValidateConfig, registry: RegisterConfig,
        tracking_cfg: TrackingConfig, runner: str, pipeline_run_id: str) -> tuple[dict, dict]:
    """The step as DVC, Kubeflow and the tests run it: find the champion, validate, record the run.
    Returns the gate decision and the run record (run.json)."""
    champion = find_champion(registry) if cfg.compare_with_champion else None
    gate = validate(dataset_dir, model_dir, out, cfg, champion)
    record = tracking.record_validation(dataset_dir, policy_dir, weights_dir, model_dir, out, tracking_cfg,
                                        runner, pipeline_run_id)
    return gate, record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml",
                        help="parameters file (sections: validate, register for the champion, tracking)")
    parser.add_argument("--dataset", required=True, help="dataset artifact from components.data")
    parser.add_argument("--policy", required=True, help="policy folder from components.augment")
    parser.add_argument("--weights", required=True, help="weights folder from components.fetch_pretrained")
    parser.add_argument("--model", required=True, help="model folder from components.finetune")
    parser.add_argument("--out", required=True, help="folder for metrics, gate decision and run.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    gate, record = run(args.dataset, args.policy, args.weights, args.model, args.out, params.validation,
                       params.registry, params.tracking, *tracking.runner_identity())
    skipped = (gate.get("champion") or {}).get("skipped")
    print(f"validate: {'PASSED' if gate['passed'] else 'FAILED: ' + '; '.join(gate['reasons'])}"
          f"{f' (champion: {skipped})' if skipped else ''}; MLflow run {record['run_id']} ({record['run_name']})")
    return 0


if __name__ == "__main__":
    from components import cli

    sys.exit(cli.run(main))
