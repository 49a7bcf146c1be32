"""Where runs go, and the one place the MLflow client is set up.

Runs go to $MLFLOW_TRACKING_URI, else the SQLite store mlflow.db at the root of the DVC workspace
($DVC_ROOT, which DVC sets for stages and for `dvc exp run --temp/--queue` copies alike), else the
working directory; artifacts of that default store go to mlruns/ beside it.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from components.config import TrackingConfig
from components.redaction import redact

DEFAULT_STORE = "mlflow.db"
# The MLflow UI opens an experiment of this kind on its training runs, not on the GenAI overview.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def workspace_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace_root() / DEFAULT_STORE}"


_READY: set[str] = set()  # SQLite stores this process has seen created


def client() -> mlflow.MlflowClient:
    """The one place the MLflow client is set up (fluent API and client point at the same store)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///") or uri in _READY:
        return mlflow.MlflowClient()
    # MLflow creates and migrates a new SQLite store's tables when a client first opens it; two
    # pipelines doing that at once collide ("duplicate column name"). One at a time, under a lock
    # on the store's folder.
    folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        mlflow_client = mlflow.MlflowClient()
        mlflow_client.search_experiments(max_results=1)
    finally:
        os.close(fd)  # releases the lock
    _READY.add(uri)
    return mlflow_client


def experiment_id(mlflow_client: mlflow.MlflowClient, name: str) -> str:
    """The experiment's id, created when missing. With a SQLite store its artifacts go to mlruns/
    beside the database, not to the working directory (a `dvc exp run --temp` copy is deleted)."""
    found = mlflow_client.get_experiment_by_name(name)
    if found:
        if EXPERIMENT_KIND[0] not in found.tags:
            mlflow_client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    location, uri = None, tracking_uri()
    if uri.startswith("sqlite:///"):
        store = Path(uri.removeprefix("sqlite:///")).resolve()
        location = (store.parent / "mlruns" / re.sub(r"[^A-Za-z0-9._-]+", "-", name)).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except MlflowException as err:  # created by a pipeline running beside this one
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow_client.get_experiment_by_name(name).experiment_id


def target(cfg: TrackingConfig) -> dict:
    """Where this workspace's runs go now, as DVC compares it between runs: a changed
    MLFLOW_TRACKING_URI, experiment, or a store that was wiped (the experiment is new) all differ."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment(experiment_id(mlflow_client, cfg.experiment))
    return {"tracking_uri": redact(tracking_uri()), "experiment": cfg.experiment,
            "experiment_id": experiment.experiment_id, "experiment_created": experiment.creation_time}
