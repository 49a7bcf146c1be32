"""The fine-tune step across nodes (pipelines/trainjob.py, infra/k8s/trainjob): generated from params.yaml,
checked offline against the Kubeflow Trainer 2.3 TrainJob schema (its API models, kubeflow-trainer-api)
and the Kubernetes schemas; no cluster here, so nothing is submitted."""

import subprocess
import sys

import pytest
import yaml
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from pydantic import ValidationError

from components.config import override
from helpers import ROOT
from pipelines import trainjob
from test_infra import BIN, restricted_violations

K8S = ROOT / "infra" / "k8s" / "trainjob"


def _checked(doc: dict) -> dict:
    """The TrainJob as Trainer's API reads it: a misspelt or misplaced field is dropped by the model
    (so the round trip differs), a wrong type is an error."""
    return TrainerV1alpha1TrainJob.from_dict(doc).to_dict()


def test_the_committed_trainjob_is_what_params_yaml_makes(tmp_path, params):
    assert trainjob.write(params, tmp_path / "trainjob.yaml").read_text() == (K8S / "trainjob.yaml").read_text(), \
        "infra/k8s/trainjob/trainjob.yaml is stale: run `make generate` and commit it"


def test_the_trainjob_is_valid_against_the_trainer_schema_and_the_check_catches_mistakes(params):
    doc = yaml.safe_load((K8S / "trainjob.yaml").read_text())
    assert _checked(doc) == doc
    misspelt = yaml.safe_load((K8S / "trainjob.yaml").read_text())
    misspelt["spec"]["trainer"]["numNode"] = misspelt["spec"]["trainer"].pop("numNodes")
    assert _checked(misspelt) != misspelt
    wrong_type = yaml.safe_load((K8S / "trainjob.yaml").read_text())
    wrong_type["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(ValidationError, match="numNodes"):
        _checked(wrong_type)


def test_it_runs_dvc_yamls_finetune_command_under_torchrun_on_the_pipelines_image(params):
    from pipelines.finetune_pipeline import IMAGE

    doc = yaml.safe_load((K8S / "trainjob.yaml").read_text())
    trainer = doc["spec"]["trainer"]
    assert trainer["image"] == IMAGE
    dvc_cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["finetune"]["cmd"]
    assert trainer["command"][-1].endswith(dvc_cmd.removeprefix("python -m components.finetune"))
    assert "exec torchrun --module components.finetune --params params.yaml" in trainer["command"][-1]
    env = {e["name"]: e["valueFrom"] for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_URI"]["configMapKeyRef"]["name"] == params.pipeline.mlflow_config_map
    assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == params.pipeline.mlflow_secret
    assert not any("value" in e for e in trainer["env"])  # credentials by reference only


def test_gpus_node_selector_and_tolerations_come_from_params_yaml(params):
    gpu = override(params.pipeline, finetune_gpus=4,
                   gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"})
    doc = trainjob.manifest(params.model_copy(update={"pipeline": gpu}), nodes=3, name="big")
    assert _checked(doc) == doc
    trainer = doc["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    pod = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"] == [t.model_dump(exclude_none=True) for t in params.pipeline.gpu_tolerations]
    assert restricted_violations("node", pod) == []
    cpu_only = yaml.safe_load((K8S / "trainjob.yaml").read_text())
    assert "nodeSelector" not in str(cpu_only) and "nvidia.com/gpu" not in str(cpu_only)  # params.yaml: 0 GPUs


def test_the_kustomization_builds_and_its_claim_validates_against_the_kubernetes_schemas(tmp_path):
    out = subprocess.run([BIN / "kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(d["kind"] for d in docs) == ["PersistentVolumeClaim", "TrainJob"]
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node mounts it
    (tmp_path / "claim.yaml").write_text(yaml.safe_dump(claim))
    proc = subprocess.run([BIN / "kubernetes-validate", "--strict", str(tmp_path / "claim.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = next(d for d in docs if d["kind"] == "TrainJob")
    assert _checked(job) == job


def test_the_command_prints_it_for_another_node_count():
    out = subprocess.run([sys.executable, "-m", "pipelines", "trainjob", "--nodes", "5", "--name", "nightly"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    doc = yaml.safe_load(out)
    assert (doc["metadata"]["name"], doc["spec"]["trainer"]["numNodes"]) == ("nightly", 5)
    assert _checked(doc) == doc
