"""Shared fixtures: small real datasets, checkpoints, and a real MLflow server on loopback."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "infra"))  # local_stack: the same server start-up as `make stack`


def make_imagefolder(root: Path, counts: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """Learnable RGB images: each class a bright bar at its own row, plus noise."""
    rng = np.random.default_rng(seed)
    for k, (label, n) in enumerate(counts.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            row = (k * size) // len(counts)
            img[row: row + max(2, size // len(counts) // 2), :, :] = 255 - rng.integers(0, 40)
            Image.fromarray(img).save(root / label / f"img-{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "raw", {"circle": 30, "square": 30, "triangle": 30})


@pytest.fixture
def params():
    from components.config import load_params

    return load_params(ROOT / "params.yaml")


def save_checkpoint(path: Path, arch: str, class_names: list[str], seed: int = 0) -> Path:
    """A zoo checkpoint (checkpoint-v1) of a randomly initialised torchvision model."""
    import torch

    from components import models

    torch.manual_seed(seed)
    net = models.build(arch, len(class_names))
    torch.save({"format": models.CHECKPOINT_FORMAT, "arch": arch, "class_names": class_names,
                "state_dict": net.state_dict()}, path)
    return path


POLICY = {"image_size": 16, "resize_scale": (0.9, 1.0), "hflip": 0.0, "preview_images": 2}


@pytest.fixture
def artifacts(image_folder, tmp_path) -> Path:
    """data, augment and fetch_pretrained outputs: a 3-class task and a 4-class source model."""
    from components.augment import augment
    from components.config import AugmentConfig, DataConfig, PretrainedConfig
    from components.data import prepare
    from components.fetch_pretrained import fetch

    prepare(image_folder, tmp_path / "data", DataConfig(source=str(image_folder), workers=1))
    augment(tmp_path / "data", tmp_path / "aug", AugmentConfig(**POLICY))
    zoo = save_checkpoint(tmp_path / "zoo.pt", "resnet18", ["w", "x", "y", "z"])
    fetch(PretrainedConfig(uri=str(zoo), arch="resnet18"), tmp_path / "pre")
    return tmp_path


@pytest.fixture
def trained(artifacts) -> Path:
    """`artifacts` plus a model fine-tuned for a few epochs in artifacts/"model"."""
    from components.config import FinetuneConfig
    from components.finetune import finetune

    finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "model",
             FinetuneConfig(freeze=["conv1", "bn1"], lr=0.01, batch_size=16, max_epochs=4, patience=4))
    return artifacts


def free_port() -> int:
    # Below 55536: SeaweedFS derives gRPC ports as port + 10000.
    while True:
        port = random.randint(20000, 55000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


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


def _run(cmd, cwd, env) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def dvc_data_repo(repo: Path, endpoint: str, folder: str, versions) -> dict:
    """A git repository whose `folder` is tracked by DVC with an S3 remote at `endpoint`.

    `versions` is a list of (tag, write(folder_path)); each is added, committed, tagged and pushed.
    Afterwards the local cache and the data are deleted: the data can only come from the remote.
    Returns the environment for running dvc there.
    """
    import shutil

    repo.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["dvc", "remote", "add", "-d", "store", "s3://data/dvcstore"], repo, env)
    _run(["dvc", "remote", "modify", "store", "endpointurl", endpoint], repo, env)
    for tag, write in versions:
        write(repo / folder)
        _run(["dvc", "add", folder], repo, env)
        _run([*git, "add", "-A"], repo, env)
        _run([*git, "commit", "-qm", tag], repo, env)
        _run([*git, "tag", tag], repo, env)
        _run(["dvc", "push"], repo, env)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / folder)
    return env
