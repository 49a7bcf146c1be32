"""The MLflow run of one pipeline execution, logged from the artifacts the steps wrote.

Every step writes its configuration and results into its own artifact, so the run records
what produced the model, not what params.yaml says today. MLFLOW_TRACKING_URI is respected;
without it runs go to a SQLite store in the working directory (mlflow.db, git-ignored).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import warnings
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_ARTIFACT = "model"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def git_state() -> dict[str, str]:
    """The commit the code came from: $GIT_COMMIT (set in the component image), else git itself."""
    if os.environ.get("GIT_COMMIT"):
        return {"git_commit": os.environ["GIT_COMMIT"]}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        # dvc.lock and the uncached reports in artifacts/ change with every run; the code is what counts
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)dvc.lock", ":(exclude)artifacts"],
                               capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_commit": commit.strip(), "git_dirty": str(bool(dirty.strip())).lower()}


def _flatten(prefix: str, values: dict) -> dict[str, str]:
    return {f"{prefix}.{k}": str(v) for k, v in values.items()}


def log_pipeline_run(dataset_dir, augment_dir, pretrained_dir, model_dir, validate_dir, experiment: str,
                     runner: str, pipeline_run_id: str = "") -> dict:
    """Log one run with every step's parameters, metrics, pictures and the servable model.

    Writes `validate_dir`/run.json ({run_id, model_uri, ...}) for the register step; returns it.
    """
    import mlflow
    import torch
    from mlflow.entities import Metric

    from components import serving
    from components.atomic import read_json, write_json
    from components.dataset import read_split

    dataset_dir, augment_dir, pretrained_dir = Path(dataset_dir), Path(augment_dir), Path(pretrained_dir)
    model_dir, validate_dir = Path(model_dir), Path(validate_dir)
    report = read_json(dataset_dir / "report.json")
    policy = read_json(augment_dir / "policy.json")
    pretrained = read_json(pretrained_dir / "pretrained.json")
    history = read_json(model_dir / "history.json")
    summary = read_json(model_dir / "summary.json")
    metrics = read_json(validate_dir / "metrics.json")
    gate = read_json(validate_dir / "gate.json")
    ckpt = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)

    params = {
        **_flatten("data", report["config"]),
        **_flatten("augment", policy),
        **_flatten("pretrained", {"uri": pretrained["uri"], "sha256": pretrained["sha256"],
                                  "arch": pretrained["arch"]}),
        **_flatten("finetune", ckpt["config"]),
        **_flatten("validate", gate["config"]),
    }
    tags = {
        **git_state(),
        "params_hash": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest(),
        "data_fingerprint": report["fingerprint"],
        "data_source": report["source"],
        "pretrained_uri": pretrained["uri"],
        "pretrained_sha256": pretrained["sha256"],
        "pipeline_runner": runner,
        "gate_passed": str(gate["passed"]).lower(),
    }
    if "git_commit" in tags:
        tags["mlflow.source.git.commit"] = tags["git_commit"]
    if pipeline_run_id:
        tags["pipeline_run_id"] = pipeline_run_id
        if runner == "kfp":
            tags["kfp_run_id"] = pipeline_run_id
    now = int(time.time() * 1000)
    history_metrics = [Metric(key, float(row[key]), now, row["epoch"])
                       for row in history for key in row if key != "epoch"]
    test_metrics = {"test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
                    "test_min_class_recall": metrics["min_class_recall"], "test_ece": metrics["ece"],
                    **{f"test_recall_{c}": r for c, r in metrics["per_class_recall"].items()},
                    "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
                    "trainable_parameters": summary["parameters"]["trainable"]}

    if gate.get("champion") and "lower_bound" in gate["champion"]:
        test_metrics.update({"champion_accuracy": gate["champion"]["champion_accuracy"],
                             "accuracy_difference_lower_bound": gate["champion"]["lower_bound"],
                             "mcnemar_p_value": gate["champion"]["mcnemar_p_value"]})
    examples = [p for p, _ in read_split(dataset_dir, "test")[:2]]

    source_name = Path(report["source"].rstrip("/")).name
    run_name = f"{ckpt['arch']} {Path(pretrained['uri']).name} -> {source_name} ({report['fingerprint'][:8]})"
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        client = mlflow.MlflowClient()
        mlflow.log_params(params)
        client.log_batch(run.info.run_id, metrics=history_metrics)
        mlflow.log_metrics(test_metrics)
        mlflow.log_input(_dataset_input(report), context="training")
        for folder, paths in (("data", [dataset_dir / "report.json"]),
                              ("augment", [augment_dir / "policy.json", augment_dir / "preview.png"]),
                              ("pretrained", [pretrained_dir / "pretrained.json"]),
                              ("finetune", [model_dir / n for n in ("history.json", "summary.json",
                                                                    "training_curves.png")]),
                              ("validate", sorted(p for p in validate_dir.iterdir() if p.name != "run.json"))):
            for path in paths:
                mlflow.log_artifact(str(path), artifact_path=folder)
        info = serving.log_model(model_dir / "model.pt", examples, name=MODEL_ARTIFACT)
    result = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "model_uri": info.model_uri,
              "run_name": run_name}
    write_json(validate_dir / "run.json", result)
    return result


def _dataset_input(report: dict):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    # MLflow caps dataset digests at 36 characters; the full fingerprint is in the tags.
    with warnings.catch_warnings():  # a local path matches two equivalent source kinds
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(report["source"])
    return MetaDataset(source=source, name=Path(report["source"]).name, digest=report["fingerprint"][:36])
