"""MLflow tracking: where runs go, the live run of a fine-tune, and what validation adds to it.

    python -m components.tracking target --out artifacts/tracking.json   # DVC: where runs go now

One MLflow run is one fine-tune and its validation. `training_run` opens it when training
starts (parameters, lineage tags, the dataset input and the step inputs as artifacts), the
fine-tune logs each epoch as it ends, and the run ends FINISHED, FAILED (with the error and the
last finished epoch) or KILLED. `record_validation` adds the test metrics, reports and the
servable model to that run; when the run is not in the store the pipeline now logs to (another
MLFLOW_TRACKING_URI) or was validated before, it records a new run there from the fine-tune's
own files, with the epochs at the times they ended, so nothing has to be trained again.

Where runs go: $MLFLOW_TRACKING_URI, else the SQLite store mlflow.db at the root of the DVC
workspace ($DVC_ROOT, which DVC sets for stages and for `dvc exp run --temp/--queue` copies
alike), else the working directory; artifacts of that default store go to mlruns/ beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
import warnings
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from components.atomic import read_json, write_json
from components.config import TrackingConfig, load_params
from components.redaction import redact

DEFAULT_STORE = "mlflow.db"
RUN_RECORD = "run.json"                 # in the model and the reports folders: which run they belong to
MODEL_ARTIFACT = "model"
SYSTEM_METRICS_INTERVAL = 5             # seconds between CPU, memory, disk and network samples
TRAINING_SECTIONS = ("data", "augment", "pretrained", "finetune")
CHANGES_IN_NAME = 3                     # changed parameters shown in a run name
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


# ---- what a run records -------------------------------------------------------------------

def _flatten(prefix: str, values: dict) -> dict[str, str]:
    return {f"{prefix}.{k}": redact(str(v)) for k, v in values.items()}


def training_params(dataset_dir, augment_dir, pretrained_dir, finetune_config: dict) -> dict[str, str]:
    """Parameters as the steps' own outputs record them (what produced the model, not what
    params.yaml says today)."""
    report = read_json(Path(dataset_dir) / "report.json")
    pretrained = read_json(Path(pretrained_dir) / "pretrained.json")
    return {**_flatten("data", report["config"]),
            **_flatten("augment", read_json(Path(augment_dir) / "policy.json")),
            **_flatten("pretrained", {k: pretrained[k] for k in ("uri", "sha256", "arch")}),
            **_flatten("finetune", finetune_config)}


def git_state() -> dict[str, str]:
    """The commit the code came from: $GIT_COMMIT (set in the component image), else git itself."""
    if os.environ.get("GIT_COMMIT"):
        return {"git_commit": os.environ["GIT_COMMIT"]}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        # dvc.yaml/dvc.lock, params.yaml and outputs change with experiments; the code is what counts
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)dvc.lock", ":(exclude)params.yaml", ":(exclude)artifacts"],
                               capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_commit": commit.strip(), "git_dirty": str(bool(dirty.strip())).lower()}


def changed_params(params_file: str | os.PathLike = "params.yaml") -> list[str]:
    """`key=value` for each training parameter that `params_file` sets differently from its
    committed version (a `dvc exp run -S` override, an edit not committed yet); empty outside git."""
    try:
        committed = yaml.safe_load(subprocess.run(["git", "show", f"HEAD:{Path(params_file).as_posix()}"],
                                                  capture_output=True, text=True, check=True).stdout) or {}
        current = yaml.safe_load(Path(params_file).read_text()) or {}
    except (OSError, subprocess.CalledProcessError, yaml.YAMLError):
        return []
    changes = []
    for section in TRAINING_SECTIONS:
        before = committed.get(section) or {}
        for key, value in (current.get(section) or {}).items():
            if before.get(key) != value:
                shown = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else value
                changes.append(redact(f"{key}={shown}"))  # run names show them: no credentials
    return changes


def run_name(params: dict[str, str], changes: list[str], unique: str) -> str:
    """What tells runs apart first (the DVC experiment, the changed parameters, or a short
    unique id), then what was trained on what: `lr=0.003 · resnet18 → digits-5-9`."""
    shown = ", ".join(changes[:CHANGES_IN_NAME]) + (f" +{len(changes) - CHANGES_IN_NAME}"
                                                     if len(changes) > CHANGES_IN_NAME else "")
    first = " ".join(p for p in (os.environ.get("DVC_EXP_NAME", ""), shown) if p) or unique
    source = Path(params.get("data.source", "").rstrip("/")).name or "data"
    return f"{first} · {params.get('pretrained.arch', '')} → {source}"


def lineage_tags(dataset_dir, pretrained_dir, params: dict[str, str], runner: str,
                 pipeline_run_id: str) -> dict[str, str]:
    report = read_json(Path(dataset_dir) / "report.json")
    pretrained = read_json(Path(pretrained_dir) / "pretrained.json")
    tags = {
        **git_state(),
        "params_hash": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest(),
        "data_fingerprint": report["fingerprint"],
        "data_source": report["source"],
        "pretrained_uri": pretrained["uri"],
        "pretrained_sha256": pretrained["sha256"],
        "pipeline_runner": runner,
        "pipeline_run_id": pipeline_run_id,
    }
    if "git_commit" in tags:
        tags["mlflow.source.git.commit"] = tags["git_commit"]
    if runner == "kfp":
        tags["kfp_run_id"] = pipeline_run_id
    for env, tag in (("DVC_EXP_NAME", "dvc_experiment"), ("DVC_EXP_BASELINE_REV", "dvc_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _dataset_input(report: dict):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    # MLflow caps dataset digests at 36 characters; the full fingerprint is in the tags.
    with warnings.catch_warnings():  # a local path matches two equivalent source kinds
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(report["source"])
    return MetaDataset(source=source, name=Path(report["source"]).name, digest=report["fingerprint"][:36])


def _log_training_inputs(dataset_dir, augment_dir, pretrained_dir, params: dict[str, str]) -> None:
    """Into the active run: parameters, the dataset input and the upstream steps' records."""
    dataset_dir, augment_dir, pretrained_dir = Path(dataset_dir), Path(augment_dir), Path(pretrained_dir)
    mlflow.log_params(params)
    mlflow.log_input(_dataset_input(read_json(dataset_dir / "report.json")), context="training")
    for folder, paths in (("data", [dataset_dir / "report.json"]),
                          ("augment", [augment_dir / "policy.json", augment_dir / "preview.png"]),
                          ("pretrained", [pretrained_dir / "pretrained.json"])):
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path=folder)


EPOCH_FIELDS = ("epoch", "time")  # history.json columns that are not metrics


def log_training_outputs(model_dir) -> None:
    """Into the active run: the fine-tune's summary metrics and files."""
    model_dir = Path(model_dir)
    summary = read_json(model_dir / "summary.json")
    mlflow.log_metrics({"best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
                        "trainable_parameters": summary["parameters"]["trainable"],
                        "training_seconds": summary["training_seconds"]})
    mlflow.set_tag("weights_sha256", summary["weights_sha256"])
    for name in ("history.json", "summary.json", "training_curves.png"):
        mlflow.log_artifact(str(model_dir / name), artifact_path="finetune")


# ---- the live run of a fine-tune ----------------------------------------------------------

class TrainingRun:
    """The active run while a fine-tune trains: `log_epoch` is its per-epoch callback."""

    def __init__(self, run_id: str, name: str):
        self.run_id, self.name = run_id, name

    def log_epoch(self, row: dict) -> None:
        metrics = {k: float(v) for k, v in row.items() if k not in EPOCH_FIELDS}
        mlflow.log_metrics(metrics, step=row["epoch"], timestamp=int(row["time"] * 1000))
        mlflow.set_tag("last_finished_epoch", str(row["epoch"]))


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Kubeflow and `dvc exp remove --queue` stop a step with SIGTERM: end the run as KILLED, not
    leave it RUNNING for ever."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


@contextlib.contextmanager
def training_run(dataset_dir, augment_dir, pretrained_dir, finetune_config: dict, cfg: TrackingConfig,
                 runner: str, pipeline_run_id: str, changes: list[str] = (), resume_run_id: str | None = None):
    """Open (or, resuming an interrupted fine-tune, reopen) the run; yields a TrainingRun.
    `changes` (changed_params) lead its name.

    The run ends FINISHED when the block does, FAILED with tags `error` and
    `last_finished_epoch` when it raises, KILLED on Ctrl-C or SIGTERM.
    """
    mlflow_client = client()
    exp = experiment_id(mlflow_client, cfg.experiment)
    resumable = False
    if resume_run_id:
        with contextlib.suppress(MlflowException):
            resumable = mlflow_client.get_run(resume_run_id).info.experiment_id == exp
    params = training_params(dataset_dir, augment_dir, pretrained_dir, finetune_config)
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)
    mlflow.set_system_metrics_samples_before_logging(1)
    start = dict(run_id=resume_run_id) if resumable else dict(
        experiment_id=exp, run_name=run_name(params, list(changes), pipeline_run_id[-8:]),
        tags=lineage_tags(dataset_dir, pretrained_dir, params, runner, pipeline_run_id))
    with _sigterm_as_interrupt(), mlflow.start_run(log_system_metrics=cfg.system_metrics, **start) as active:
        live = TrainingRun(active.info.run_id, active.info.run_name)
        if not resumable:
            _log_training_inputs(dataset_dir, augment_dir, pretrained_dir, params)
        elif "error" in active.data.tags:  # the interrupted attempt's error is history now
            mlflow_client.delete_tag(live.run_id, "error")
        try:
            yield live
        except BaseException as err:
            mlflow.set_tag("error", _one_line(err))
            if isinstance(err, KeyboardInterrupt):  # MLflow would call it FAILED
                mlflow.end_run("KILLED")
            raise


def run_record(live: TrainingRun) -> dict:
    """What the model folder says about its run (RUN_RECORD)."""
    return {"run_id": live.run_id, "run_name": live.name, "tracking_uri": redact(tracking_uri())}


# ---- validation ---------------------------------------------------------------------------

def _run_to_continue(mlflow_client, model_dir: Path, exp: str) -> str | None:
    """The fine-tune's run, if validation can complete it: in this store and experiment, not
    validated yet."""
    record = model_dir / RUN_RECORD
    if not record.exists():
        return None
    try:
        run = mlflow_client.get_run(read_json(record)["run_id"])
    except MlflowException:
        return None  # another store (MLFLOW_TRACKING_URI changed) or a wiped one
    if run.info.experiment_id != exp or run.data.tags.get("validated") == "true":
        return None
    return run.info.run_id


def _replay_training(mlflow_client, exp: str, dataset_dir, augment_dir, pretrained_dir, model_dir: Path,
                     runner: str, pipeline_run_id: str) -> str:
    """A new run holding what the fine-tune recorded, from its files; returns its id."""
    ckpt_config = read_json(model_dir / "summary.json")["config"]
    params = training_params(dataset_dir, augment_dir, pretrained_dir, ckpt_config)
    tags = lineage_tags(dataset_dir, pretrained_dir, params, runner, pipeline_run_id)
    name = run_name(params, [], pipeline_run_id[-8:])
    if (model_dir / RUN_RECORD).exists():  # the same training, recorded again here: the same name
        trained = read_json(model_dir / RUN_RECORD)
        tags["trained_in_run"], name = trained["run_id"], trained.get("run_name", name)
    run_id = mlflow_client.create_run(exp, run_name=name, tags=tags).info.run_id
    history = read_json(model_dir / "history.json")
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), int(row["time"] * 1000), row["epoch"])
                                             for row in history for k, v in row.items() if k not in EPOCH_FIELDS])
    with mlflow.start_run(run_id=run_id):
        _log_training_inputs(dataset_dir, augment_dir, pretrained_dir, params)
        log_training_outputs(model_dir)
    return run_id


def record_validation(dataset_dir, augment_dir, pretrained_dir, model_dir, validate_dir, cfg: TrackingConfig,
                      runner: str, pipeline_run_id: str) -> dict:
    """Complete the fine-tune's run with validation (or record a new one, see the module doc).

    Writes `validate_dir`/run.json ({run_id, model_uri, ...}) for the register step; returns it.
    """
    from components import serving
    from components.dataset import read_split

    dataset_dir, model_dir, validate_dir = Path(dataset_dir), Path(model_dir), Path(validate_dir)
    mlflow_client = client()
    exp = experiment_id(mlflow_client, cfg.experiment)
    run_id = _run_to_continue(mlflow_client, model_dir, exp) or _replay_training(
        mlflow_client, exp, dataset_dir, augment_dir, pretrained_dir, model_dir, runner, pipeline_run_id)
    metrics = read_json(validate_dir / "metrics.json")
    gate = read_json(validate_dir / "gate.json")
    test_metrics = {"test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
                    "test_min_class_recall": metrics["min_class_recall"], "test_ece": metrics["ece"],
                    **{f"test_recall_{c}": r for c, r in metrics["per_class_recall"].items()}}
    if gate.get("champion") and "lower_bound" in gate["champion"]:
        test_metrics.update({"champion_accuracy": gate["champion"]["champion_accuracy"],
                             "accuracy_difference_lower_bound": gate["champion"]["lower_bound"],
                             "mcnemar_p_value": gate["champion"]["mcnemar_p_value"]})
    examples = [p for p, _ in read_split(dataset_dir, "test", pick=lambda rows: rows[:2])]
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.log_params(_flatten("validate", gate["config"]))
        mlflow.log_metrics(test_metrics)
        for path in sorted(p for p in validate_dir.iterdir() if p.name != RUN_RECORD):
            mlflow.log_artifact(str(path), artifact_path="validate")
        info = serving.log_model(model_dir / "model.pt", examples, name=MODEL_ARTIFACT)
        mlflow.set_tags({"validated": "true", "gate_passed": str(gate["passed"]).lower(),
                         "validation_pipeline_run_id": pipeline_run_id})
    result = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "model_uri": info.model_uri,
              "run_name": run.info.run_name, "tracking_uri": redact(tracking_uri())}
    write_json(validate_dir / RUN_RECORD, result)
    return result


def runner_identity() -> tuple[str, str]:
    """(runner, pipeline run id) for a step started from the command line: DVC or by hand."""
    runner = "dvc" if os.environ.get("DVC_ROOT") or os.environ.get("DVC_STAGE") else "cli"
    return runner, f"{runner}-{uuid.uuid4().hex[:12]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="python -m components.tracking target: where runs go now")
    parser.add_argument("command", choices=["target"])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section: tracking)")
    parser.add_argument("--out", required=True, help="JSON file to write (a DVC dependency of validate)")
    args = parser.parse_args(argv)
    result = target(load_params(args.params).tracking)
    write_json(args.out, result)
    print(f"tracking: runs go to {result['tracking_uri']}, experiment {result['experiment']!r}")
    return 0


if __name__ == "__main__":
    from components import cli

    sys.exit(cli.run(main))
