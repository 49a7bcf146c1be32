"""validate: test-split metrics, a pass/fail gate, and the MLflow run that records the whole pipeline.

    python -m components.validate --params params.yaml --data data/prepared --augment artifacts/augment \
        --pretrained artifacts/pretrained --model artifacts/model --out artifacts/validate

Writes metrics.json, gate.json (the decision and every check behind it), predictions.csv,
confusion_matrix.png, and run.json (the MLflow run id that register promotes from).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm

from components import models, tracking
from components.atomic import atomic_dir, write_json
from components.augment import eval_transform
from components.config import AugmentConfig, ValidateConfig, load_params
from components.dataset import ImageSplit


def load_model(model_dir) -> tuple[torch.nn.Module, dict]:
    """The fine-tuned network in eval mode, and its checkpoint (class names, preprocessing...)."""
    ckpt = torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True)
    net = models.build(ckpt["arch"], len(ckpt["class_names"]))
    models.load_weights(net, ckpt["state_dict"], ckpt["arch"])
    return net.eval(), ckpt


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


def decide(metrics: dict, cfg: ValidateConfig) -> dict:
    """Pass only when every threshold holds; each check is kept so a failure says which and by how much."""
    checks = [
        {"name": name, "value": metrics[name], "threshold": threshold, "passed": metrics[name] >= threshold}
        for name, threshold in (("accuracy", cfg.min_accuracy), ("macro_f1", cfg.min_macro_f1),
                                ("min_class_recall", cfg.min_class_recall))
    ]
    reasons = [f"{c['name']} {c['value']:.4f} < {c['threshold']}" for c in checks if not c["passed"]]
    return {"passed": not reasons, "checks": checks, "reasons": reasons, "config": cfg.model_dump(mode="json")}


def save_confusion_matrix(y_true, y_pred, class_names: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(class_names), 1 + 0.6 * len(class_names)))
    skm.ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(range(len(class_names))),
                                                display_labels=class_names, ax=ax, colorbar=False)
    ax.set_title("test split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def validate(dataset_dir, model_dir, out, cfg: ValidateConfig) -> dict:
    """Evaluate the model on the test split and decide pass/fail; write the reports to `out`."""
    net, ckpt = load_model(model_dir)
    class_names, prep = ckpt["class_names"], ckpt["preprocessing"]
    transform = eval_transform(AugmentConfig(image_size=prep["image_size"], mean=prep["mean"], std=prep["std"]))
    test = ImageSplit(dataset_dir, "test", transform, class_names)
    logits, targets = models.predict(net, torch.utils.data.DataLoader(test, batch_size=128))
    probs = torch.softmax(logits, 1)
    y_true, y_pred = targets.numpy(), probs.argmax(1).numpy()
    result = compute_metrics(y_true, y_pred, class_names)
    gate = decide(result, cfg)
    with atomic_dir(out) as tmp:
        write_json(tmp / "metrics.json", result)
        write_json(tmp / "gate.json", gate)
        with open(tmp / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "actual", "predicted", "confidence"])
            for (path, _), t, p, conf in zip(test.items, y_true, y_pred, probs.max(1).values.tolist()):
                writer.writerow([Path(path).relative_to(dataset_dir).as_posix(), class_names[t], class_names[p],
                                 f"{conf:.4f}"])
        save_confusion_matrix(y_true, y_pred, class_names, tmp / "confusion_matrix.png")
    return gate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (sections: validate, tracking)")
    parser.add_argument("--data", required=True, help="dataset artifact from components.data")
    parser.add_argument("--augment", required=True, help="policy folder from components.augment")
    parser.add_argument("--pretrained", required=True, help="weights folder from components.fetch_pretrained")
    parser.add_argument("--model", required=True, help="model folder from components.finetune")
    parser.add_argument("--out", required=True, help="folder for metrics, gate decision and run.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    gate = validate(args.data, args.model, args.out, params.gate)
    run = tracking.log_pipeline_run(args.data, args.augment, args.pretrained, args.model, args.out,
                                    params.tracking.experiment, runner="dvc")
    print(f"validate: {'PASSED' if gate['passed'] else 'FAILED: ' + '; '.join(gate['reasons'])}; "
          f"MLflow run {run['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
