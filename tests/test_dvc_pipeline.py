"""`dvc repro` of the whole pipeline, demo stages included, in a temporary copy of the repository."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.e2e

STAGES = ["demo_digits", "demo_zoo", "data", "augment", "fetch_pretrained", "finetune", "validate", "register"]


def _dvc(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the default local store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"   # `python` in dvc.yaml = this venv
    proc = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _repro(repo: Path) -> list[str]:
    """Run `dvc repro`; return the names of the stages that ran."""
    return re.findall(r"Running stage '([^']+)'", _dvc(repo, "repro"))


def _set_params(repo: Path, mutate) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    mutate(raw)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The repository's files (committed or not, minus ignored ones) in a fresh git repository."""
    dest = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith("tests/") and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)

    def tiny(p):
        p["demo"]["epochs"] = 1
        p["augment"]["preview_images"] = 2
        p["finetune"]["max_epochs"] = 2
        # the champion comparison runs, but a 2-epoch model may lose to the last one: any loss is allowed
        p["validate"].update(min_accuracy=0.3, min_macro_f1=0.0, min_class_recall=0.0, champion_margin=1.0)

    _set_params(dest, tiny)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def test_repro_runs_every_stage_then_nothing_then_only_what_a_parameter_touches(repo):
    assert _repro(repo) == STAGES

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("digits-5-9-resnet18", "champion")
    run = client.get_run(version.run_id)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_commit"] == head == version.tags["git_commit"]
    assert len(run.data.tags["data_fingerprint"]) == 64 and len(run.data.tags["pretrained_sha256"]) == 64
    assert run.data.params["finetune.max_epochs"] == "2" and run.data.params["pretrained.arch"] == "resnet18"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert {"test_accuracy", "test_macro_f1", "val_accuracy", "val_loss"} <= set(run.data.metrics)
    artifacts = {f.path for folder in ("validate", "augment") for f in client.list_artifacts(run.info.run_id, folder)}
    assert {"validate/confusion_matrix.png", "augment/preview.png"} <= artifacts
    assert (repo / "data" / "raw" / "digits-5-9" / "7").is_dir() and (repo / "zoo" / "resnet18-digits-0-4.pt").exists()

    assert _repro(repo) == []  # nothing changed: nothing runs, nothing is logged
    experiment = client.get_experiment_by_name("finetune-digits").experiment_id
    assert len(client.search_runs([experiment])) == 1

    _set_params(repo, lambda p: p["finetune"].update(lr=0.02))
    assert _repro(repo) == ["finetune", "validate", "register"]
    assert len(client.search_runs([experiment])) == 2
    assert int(client.get_model_version_by_alias("digits-5-9-resnet18", "champion").version) == 2

    gate = yaml.safe_load((repo / "artifacts" / "validate" / "gate.json").read_text())
    assert gate["champion"]["champion_version"] == "1" and "lower_bound" in gate["champion"]

    metrics = _dvc(repo, "metrics", "show", "--json")
    assert '"accuracy"' in metrics and '"ece"' in metrics
    shown = set(json.loads(_dvc(repo, "plots", "show", "--json"))["data"])
    assert {"loss", "accuracy", "confusion", "calibration", "artifacts/validate/reliability.png",
            "artifacts/validate/misclassified.png", "artifacts/augment/preview.png"} <= shown
