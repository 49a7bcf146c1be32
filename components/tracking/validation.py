"""What validation adds to a fine-tune's MLflow run: the test metrics, the reports and the servable
model, then the tag `validated`.

When that run is not in the store the pipeline now logs to (another MLFLOW_TRACKING_URI) or was
validated before, a new run is recorded there from the model artifact's own records, with each epoch
at the time it ended and tagged `trained_in_run`, so nothing has to be trained again.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from components.artifacts.lineage import TrainingInputs
from components.artifacts.model import Model
from components.artifacts.run_record import RunRecord
from components.config import TrackingConfig
from components.redaction import redact
from components.tracking.runs import (EPOCH_FIELDS, flatten, lineage_tags, log_training_inputs, log_training_outputs,
                                      run_name, training_params)
from components.tracking.store import client, experiment_id, tracking_uri



def _run_to_continue(mlflow_client, model: Model, exp: str) -> str | None:
    """The fine-tune's run, if validation can complete it: in this store and experiment, not
    validated yet."""
    if model.run is None:
        return None
    try:
        run = mlflow_client.get_run(model.run.run_id)
    except MlflowException:
        return None  # another store (MLFLOW_TRACKING_URI changed) or a wiped one
    if run.info.experiment_id != exp or run.data.tags.get("validated") == "true":
        return None
    return run.info.run_id


def _replay_training(mlflow_client, exp: str, inputs: TrainingInputs, model: Model, runner: str,
                     pipeline_run_id: str, changes: list[str] | None) -> str:
    """A new run holding what the fine-tune recorded, from its files; returns its id."""
    params = training_params(inputs)
    tags = lineage_tags(inputs, params, runner, pipeline_run_id)
    name = run_name(params, changes or [], pipeline_run_id[-8:])
    if model.run is not None:
        tags["trained_in_run"] = model.run.run_id
        if changes is None:  # the same training, recorded again here: the same name
            name = model.run.run_name or name
    run_id = mlflow_client.create_run(exp, run_name=name, tags=tags).info.run_id
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), int(row["time"] * 1000), row["epoch"])
                                             for row in model.history for k, v in row.items()
                                             if k not in EPOCH_FIELDS])
    with mlflow.start_run(run_id=run_id):
        log_training_inputs(inputs, params)
        log_training_outputs(model.summary, model.files)
    return run_id


def record_validation(inputs: TrainingInputs, model: Model, metrics: dict, gate: dict, report_files: list[Path],
                      log_model, cfg: TrackingConfig, runner: str, pipeline_run_id: str,
                      changes: list[str] | None = None) -> RunRecord:
    """Complete the fine-tune's run with validation (or record a new one, see the module doc); `log_model()`
    logs the servable model into it (components/models/serving.py) and returns MLflow's ModelInfo. In a DVC
    experiment, `changes` (runs.experiment_changes) name a new run. Returns the record register registers from."""
    mlflow_client = client()
    exp = experiment_id(mlflow_client, cfg.experiment)
    continued = _run_to_continue(mlflow_client, model, exp)
    run_id = continued or _replay_training(mlflow_client, exp, inputs, model, runner, pipeline_run_id,
                                                    changes)
    test_metrics = {"test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
                    "test_min_class_recall": metrics["min_class_recall"], "test_ece": metrics["ece"],
                    **{f"test_recall_{c}": r for c, r in metrics["per_class_recall"].items()}}
    if gate.get("champion") and "lower_bound" in gate["champion"]:
        test_metrics.update({"champion_accuracy": gate["champion"]["champion_accuracy"],
                             "accuracy_difference_lower_bound": gate["champion"]["lower_bound"],
                             "mcnemar_p_value": gate["champion"]["mcnemar_p_value"]})
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.log_params(flatten("validate", gate["config"]))
        mlflow.log_metrics(test_metrics)
        for path in report_files:
            mlflow.log_artifact(str(path), artifact_path="validate")
        info = log_model()
        tags = {"validated": "true", "gate_passed": str(gate["passed"]).lower(),
                "validation_pipeline_run_id": pipeline_run_id}
        if continued and pipeline_run_id and not run.data.tags.get("pipeline_run_id"):
            # Kubeflow's fine-tune task takes no run id (its cache key would change every run): the run it
            # belongs to is the one validating it, and its name gets that run's short id first, as others have
            tags.update(pipeline_run_id=pipeline_run_id, **({"kfp_run_id": pipeline_run_id} if runner == "kfp" else {}))
            if run.info.run_name.startswith(" · "):
                tags["mlflow.runName"] = pipeline_run_id[-8:] + run.info.run_name
        mlflow.set_tags(tags)
    return RunRecord(run.info.run_id, tags.get("mlflow.runName", run.info.run_name), redact(tracking_uri()),
                     run.info.experiment_id, info.model_uri)
