"""validate and register against a real `mlflow server` started on loopback (conftest.mlflow_server)."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from components.config import ValidateConfig
from components.artifacts import dataset
from components.finetune import finetune
from components.storage.images import load_rgb
from components.register import register
from components import validate as validate_step
from components.evaluation.gate import decide
from components.evaluation.metrics import compute_metrics
from helpers import finetune_cfg, register_cfg, tracking_cfg, validate_cfg


def test_metrics_match_hand_computed_values():
    m = compute_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 2]), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["per_class_recall"] == {"a": 0.5, "b": 1.0, "c": 1.0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1.0) / 3)
    assert m["min_class_recall"] == 0.5
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]


def test_gate_fails_naming_every_threshold_missed():
    metrics = {"accuracy": 0.8, "macro_f1": 0.82, "min_class_recall": 0.5}
    gate = decide(metrics, validate_cfg(min_accuracy=0.9, min_macro_f1=0.8, min_class_recall=0.6))
    assert not gate["passed"]
    assert gate["reasons"] == ["accuracy 0.8000 < 0.9", "min_class_recall 0.5000 < 0.6"]
    assert decide(metrics, validate_cfg(min_accuracy=0.8))["passed"]


@pytest.fixture
def tracked(trained, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    return trained


def _validate_and_log(tracked, cfg: ValidateConfig, experiment: str, model_name: str = "no-champion-yet"):
    return validate_step.run(tracked / "data", tracked / "aug", tracked / "pre", tracked / "model", tracked / "val",
                             cfg, register_cfg(model_name), tracking_cfg(experiment), "test", "run-42")


def test_passing_model_is_registered_with_alias_and_lineage_and_a_retry_adds_no_version(tracked):
    gate, run = _validate_and_log(tracked, validate_cfg(), "test-register-pass")
    assert gate["passed"]
    for name in ("metrics.json", "gate.json", "predictions.csv", "confusion_matrix.png", "run.json"):
        assert (tracked / "val" / name).exists(), name

    cfg = register_cfg(model_name="shapes-pass", alias="champion")
    first = register(tracked / "val", tracked / "registration.json", cfg)
    again = register(tracked / "val", tracked / "registration.json", cfg)
    assert first["registered"] and first["version"] == 1
    assert again["version"] == 1 and again["reused_existing_version"]

    client = mlflow.MlflowClient()
    assert len(client.search_model_versions("name = 'shapes-pass'")) == 1
    version = client.get_model_version_by_alias("shapes-pass", "champion")
    report = json.loads((tracked / "data" / "report.json").read_text())
    pretrained = json.loads((tracked / "pre" / "pretrained.json").read_text())
    assert version.run_id == run.run_id
    assert version.tags["data_fingerprint"] == report["fingerprint"]
    assert version.tags["pretrained_sha256"] == pretrained["sha256"]
    assert version.tags["pipeline_run_id"] == "run-42"

    logged = client.get_run(run.run_id)
    assert logged.data.params["finetune.max_epochs"] == "4"
    assert logged.data.params["data.val_fraction"] == "0.15"
    assert logged.data.tags["data_fingerprint"] == report["fingerprint"]
    assert [m.step for m in client.get_metric_history(run.run_id, "val_loss")] == [1, 2, 3, 4]
    assert "test_accuracy" in logged.data.metrics
    assert logged.inputs.dataset_inputs[0].dataset.digest == report["fingerprint"][:36]
    artifacts = {f.path for folder in ("validate", "augment", "finetune")
                 for f in client.list_artifacts(run.run_id, folder)}
    assert {"validate/confusion_matrix.png", "augment/preview.png", "finetune/training_curves.png"} <= artifacts


def test_champion_loads_as_pyfunc_and_predicts_class_names_for_a_folder_of_image_files(tracked):
    _validate_and_log(tracked, validate_cfg(), "test-register-pyfunc")
    register(tracked / "val", tracked / "registration.json", register_cfg(model_name="shapes-pyfunc"))
    model = mlflow.pyfunc.load_model("models:/shapes-pyfunc@champion")
    evaluated = pd.read_csv(tracked / "val" / "predictions.csv")  # what validate measured
    files = [p for p, *_ in dataset.images(tracked / "data", "test")]  # in the order validate read them
    out = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))  # raw file bytes
    assert list(out.columns) == ["label", "confidence"] and len(out) == len(files)
    assert list(out["label"]) == list(evaluated["predicted"])  # the served model is the evaluated one
    assert np.allclose(out["confidence"], evaluated["confidence"], atol=1e-4)
    # decoded uint8 images, in-process (the served signature takes bytes)
    decoded = model.unwrap_python_model().predict(None, [np.asarray(load_rgb(f)) for f in files[:3]])
    assert list(decoded["label"]) == list(out["label"][:3])


def test_failed_gate_registers_nothing_and_records_why(artifacts, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    # An untrained new head (learning rate ~0): about one image in three right, far below the gate.
    finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "model",
             finetune_cfg(lr=1e-12, max_epochs=1, batch_size=16))
    gate, run = _validate_and_log(artifacts, validate_cfg(min_accuracy=0.9), "test-register-fail")
    assert not gate["passed"]
    result = register(artifacts / "val", artifacts / "registration.json", register_cfg(model_name="shapes-fail"))
    assert not result["registered"] and result["reason"].startswith("validation gate failed: accuracy ")
    client = mlflow.MlflowClient()
    assert client.search_model_versions("name = 'shapes-fail'") == []
    assert client.get_run(run.run_id).data.tags["registration"].startswith("skipped: validation gate failed")


def test_weights_identical_to_the_champions_are_not_registered_again(tracked):
    """A nightly run whose inputs did not change trains the same weights: no duplicate version."""
    _validate_and_log(tracked, validate_cfg(), "test-register-same", model_name="shapes-same")
    first = register(tracked / "val", tracked / "r1.json", register_cfg("shapes-same"))
    _, again = _validate_and_log(tracked, validate_cfg(), "test-register-same", model_name="shapes-same")
    second = register(tracked / "val", tracked / "r2.json", register_cfg("shapes-same"))
    assert first["registered"] and first["promoted"] and not second["registered"]
    assert second["reason"].startswith("weights identical to v1 (@champion), sha256 ")
    client = mlflow.MlflowClient()
    assert len(client.search_model_versions("name = 'shapes-same'")) == 1
    assert client.get_run(again.run_id).data.tags["registration"].startswith("skipped: weights identical")
    assert client.get_model_version("shapes-same", "1").tags["weights_sha256"] == \
        client.get_run(again.run_id).data.tags["weights_sha256"]
