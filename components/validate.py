"""validate: test-split metrics, the gate (thresholds and the current champion), and the MLflow run.

    python -m components.validate --params params.yaml --dataset data/prepared --policy artifacts/augment \
        --weights artifacts/pretrained --model artifacts/model --out artifacts/validate

The model is evaluated as it will be served (components/models/serving.py: uint8 images in, its own
preprocessing inside), and so is the champion, on the same images. Writes the reports artifact
(components/artifacts/reports.py): the metrics, the gate's decision and every check behind it, the
tables and pictures, and the MLflow run that register promotes from (the fine-tune's run, completed
with the test metrics and the servable model: components/tracking/validation.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from components.artifacts import dataset, model as model_artifact, reports
from components.artifacts.lineage import training_inputs
from components.config import RegisterConfig, TrackingConfig, ValidateConfig, load_params
from components.evaluation import figures
from components.evaluation.gate import Champion, comparable, compare, decide
from components.evaluation.metrics import calibration, compute_metrics
from components.tracking import runs, store
from components.tracking.registry import current_version
from components.models import serving
from components.models.serving import ImageClassifier
from components.tracking.validation import record_validation

CHUNK = 256          # test images decoded at a time: memory stays flat on large test sets
WORST = 16           # misclassified images shown


def find_champion(registry: RegisterConfig) -> Champion | None:
    """The model `registry.alias` points at now, or None if there is none.

    The champion's weights are loaded from its checkpoint with weights_only=True and today's
    code, never by unpickling the code it was logged with.
    """
    import mlflow

    client = store.client()
    version = current_version(client, registry.model_name, registry.alias)
    if version is None:
        return None
    run_id = client.get_model_version(registry.model_name, version).run_id
    try:
        with tempfile.TemporaryDirectory(prefix="champion-") as tmp:  # loaded into memory, then gone
            uri = f"models:/{registry.model_name}/{version}"
            local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
            checkpoint = next(local.glob("artifacts/*.pt"), None)
            if checkpoint is None:
                return Champion(version, run_id, None, "it holds no pipeline checkpoint (registered by other "
                                                       "means or an older version)")
            return Champion(version, run_id, ImageClassifier.from_checkpoint(checkpoint))
    except Exception as err:  # an unreadable champion must not stop a challenger from being judged
        return Champion(version, run_id, None, f"it could not be loaded ({type(err).__name__}: {err})")


def evaluate(dataset_dir, model_dir, cfg: ValidateConfig, champion: Champion | None, draft: reports.Draft) -> dict:
    """Evaluate on the test split, compare with `champion`, decide; write the reports into `draft`."""
    challenger = ImageClassifier.from_checkpoint(model_artifact.checkpoint_file(model_dir))
    class_names = challenger.class_names
    index = {c: i for i, c in enumerate(class_names)}
    test = dataset.images(dataset_dir, "test")
    against = comparable(champion, class_names)
    probs, champion_pred = [], []
    for start in tqdm(range(0, len(test), CHUNK), desc="validate", unit="chunk", file=sys.stderr, disable=None):
        images = [np.asarray(dataset.load(image)) for image in test[start:start + CHUNK]]
        probs.append(challenger.predict_proba(images))
        if against:
            champion_pred.append(champion.model.predict_proba(images).argmax(1))
    probs = np.concatenate(probs)
    y_true = np.array([index[image.label] for image in test])
    y_pred, confidence = probs.argmax(1), probs.max(1)
    correct = y_pred == y_true

    result = compute_metrics(y_true, y_pred, class_names)
    result["ece"], reliability = calibration(confidence, correct)
    comparison = compare(champion, class_names, y_true, y_pred, np.concatenate(champion_pred) if against else None,
                         cfg)
    gate = decide(result, cfg, comparison)
    paths = [row.path for row in dataset.rows(dataset_dir, "test")]  # as the manifest names them
    draft.write(result, gate, {
        reports.PREDICTIONS: (["path", "actual", "predicted", "confidence"],
                              [[p, class_names[t], class_names[q], f"{c:.4f}"]
                               for p, t, q, c in zip(paths, y_true, y_pred, confidence)]),
        reports.PER_CLASS: (["class", "precision", "recall", "support"],
                            [[c, f"{result['per_class_precision'][c]:.4f}", f"{result['per_class_recall'][c]:.4f}",
                              int((y_true == i).sum())] for i, c in enumerate(class_names)]),
        reports.CALIBRATION: (list(reliability[0]), [list(r.values()) for r in reliability]),
    })
    figures.save_confusion_matrix(y_true, y_pred, class_names, draft.picture(reports.CONFUSION))
    figures.save_reliability(reliability, result["ece"], draft.picture(reports.RELIABILITY))
    worst = [i for i in np.argsort(-confidence) if not correct[i]][:WORST]
    figures.save_misclassified([(dataset.load(test[i]), class_names[y_true[i]], class_names[y_pred[i]],
                                 confidence[i]) for i in worst], draft.picture(reports.MISCLASSIFIED))
    return {"metrics": result, "gate": gate}


def run(dataset_dir, policy_dir, weights_dir, model_dir, out, cfg: ValidateConfig, registry: RegisterConfig,
        tracking_cfg: TrackingConfig, runner: str, pipeline_run_id: str, headline: str | Path | None = None,
        plots: str | Path | None = None, changes: list[str] | None = None):
    """The step as DVC, Kubeflow and the tests run it: find the champion, validate, record the run; the
    reports appear at `out` only when the run holds them. Returns the gate decision and the run record."""
    champion = find_champion(registry) if cfg.compare_with_champion else None
    model = model_artifact.read(model_dir)
    inputs = training_inputs(dataset_dir, policy_dir, weights_dir, model.summary["config"])
    first_two = dataset.images(dataset_dir, "test", pick=lambda rows: rows[:2])
    examples = [dataset.read_bytes(image) for image in first_two]  # the served model's input example
    with reports.publish(out) as draft:
        result = evaluate(dataset_dir, model_dir, cfg, champion, draft)
        record = record_validation(inputs, model, result["metrics"], result["gate"], draft.files(),
                                   lambda: serving.log_model(model.checkpoint, examples), tracking_cfg, runner,
                                   pipeline_run_id, changes)
        draft.record(record)
    if headline:
        reports.write_headline(headline, result["metrics"], result["gate"], model.summary)
    if plots:
        reports.write_plots(out, plots)
    return result["gate"], record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml",
                        help="parameters file (sections: validate, register for the champion, tracking)")
    parser.add_argument("--dataset", required=True, help="dataset artifact from components.data")
    parser.add_argument("--policy", required=True, help="policy folder from components.augment")
    parser.add_argument("--weights", required=True, help="weights folder from components.fetch_pretrained")
    parser.add_argument("--model", required=True, help="model folder from components.finetune")
    parser.add_argument("--out", required=True, help="folder for metrics, gate decision and run.json")
    parser.add_argument("--headline", help="also the headline figures here (a small file git keeps: DVC's metrics)")
    parser.add_argument("--plots", help="also what DVC's plots draw here (a folder DVC caches)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    gate, record = run(args.dataset, args.policy, args.weights, args.model, args.out, params.validation,
                       params.registry, params.tracking, *runs.runner_identity(), headline=args.headline,
                       plots=args.plots, changes=runs.experiment_changes(args.params, (*runs.TRAINING_SECTIONS,
                                                                                        "validate")))
    skipped = (gate.get("champion") or {}).get("skipped")
    print(f"validate: {'PASSED' if gate['passed'] else 'FAILED: ' + '; '.join(gate['reasons'])}"
          f"{f' (champion: {skipped})' if skipped else ''}; MLflow run {record.run_id} ({record.run_name})")
    return 0


if __name__ == "__main__":
    from components import cli

    cli.run_process(main)
