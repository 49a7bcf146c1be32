"""The live MLflow run of a fine-tune: one run is one fine-tune and its validation.

`training_run` opens it when training starts (parameters, lineage tags, the dataset input and the
upstream records as artifacts), the fine-tune logs each epoch as it ends, and the run ends FINISHED,
FAILED (with the error and the last finished epoch) or KILLED. components/tracking/validation.py adds
the test metrics, reports and the servable model to it. What a run records comes from the artifacts'
own records (components/artifacts/lineage.py: what produced the model, not what params.yaml says today).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import threading
import uuid
import warnings
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from components.artifacts.lineage import TrainingInputs
from components.artifacts.run_record import RunRecord
from components.config import TrackingConfig
from components.redaction import redact
from components.tracking.store import client, experiment_id, tracking_uri

SYSTEM_METRICS_INTERVAL = 5             # seconds between CPU, memory, disk and network samples
TRAINING_SECTIONS = ("data", "augment", "pretrained", "finetune")
CHANGES_IN_NAME = 3                     # changed parameters shown in a run name
EPOCH_FIELDS = ("epoch", "time")        # history columns that are not metrics


# ---- what a run records -------------------------------------------------------------------

def flatten(prefix: str, values: dict) -> dict[str, str]:
    return {f"{prefix}.{k}": redact(str(v)) for k, v in values.items()}


def training_params(inputs: TrainingInputs) -> dict[str, str]:
    """Parameters as the steps' own outputs record them."""
    return {**flatten("data", inputs.report["config"]),
            **flatten("augment", inputs.policy),
            **flatten("pretrained", {k: inputs.pretrained.get(k, "torchvision") for k in ("uri", "sha256", "library",
                                                                                        "arch")}),
            **flatten("finetune", inputs.finetune)}


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


def _shown(key: str, value) -> str:
    shown = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else value
    return redact(f"{key}={shown}")  # run names show them: no credentials


def experiment_changes(params_file: str | os.PathLike = "params.yaml",
                       sections: tuple[str, ...] = TRAINING_SECTIONS) -> list[str] | None:
    """In a DVC experiment: `key=value` for each parameter of `sections` that `params_file` sets differently
    from the experiment's baseline commit ($DVC_EXP_BASELINE_REV: `-S` overrides, uncommitted edits).
    None outside one (the run is named against the previous run instead: previous_run_changes)."""
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if not baseline:
        return None
    try:
        committed = yaml.safe_load(subprocess.run(["git", "show", f"{baseline}:./{Path(os.path.relpath(params_file)).as_posix()}"],
                                                  capture_output=True, text=True, check=True).stdout) or {}
        current = yaml.safe_load(Path(params_file).read_text()) or {}
    except (OSError, subprocess.CalledProcessError, yaml.YAMLError):
        return []
    changes = []
    for section in sections:
        before = committed.get(section) or {}
        changes += [_shown(key, value) for key, value in (current.get(section) or {}).items()
                    if before.get(key) != value]
    return changes


def previous_run_changes(mlflow_client, exp: str, params: dict[str, str]) -> list[str]:
    """`key=value` for each training parameter that differs from the latest run of the same architecture in
    the experiment (what a plain `make run` changed since the last one); empty for the first."""
    arch = params.get("pretrained.arch", "").replace("'", "")
    previous = mlflow_client.search_runs([exp], f"params.`pretrained.arch` = '{arch}'",
                                         order_by=["attributes.start_time DESC"], max_results=1)
    if not previous:
        return []
    before = previous[0].data.params
    return [_shown(key.split(".", 1)[1], value) for key, value in params.items()
            if key != "pretrained.sha256" and before.get(key) != value]  # the uri says which weights


def run_name(params: dict[str, str], changes: list[str], unique: str) -> str:
    """What tells runs apart first (the DVC experiment, the changed parameters, or a short
    unique id), then what was trained on what: `lr=0.003 · resnet18 → digits-5-9`."""
    shown = ", ".join(changes[:CHANGES_IN_NAME]) + (f" +{len(changes) - CHANGES_IN_NAME}"
                                                     if len(changes) > CHANGES_IN_NAME else "")
    first = " ".join(p for p in (os.environ.get("DVC_EXP_NAME", ""), shown) if p) or unique
    source = Path(params.get("data.source", "").rstrip("/")).name or "data"
    return f"{first} · {params.get('pretrained.arch', '')} → {source}"


def lineage_tags(inputs: TrainingInputs, params: dict[str, str], runner: str, pipeline_run_id: str) -> dict[str, str]:
    tags = {
        **git_state(),
        "params_hash": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest(),
        "data_fingerprint": inputs.report["fingerprint"],
        "data_source": inputs.report["source"],
        "pretrained_uri": inputs.pretrained["uri"],
        "pretrained_sha256": inputs.pretrained["sha256"],
        "pipeline_runner": runner,
        "pipeline_run_id": pipeline_run_id,
    }
    if "git_commit" in tags:
        tags["mlflow.source.git.commit"] = tags["git_commit"]
    if runner == "kfp" and pipeline_run_id:  # the fine-tune task has none (cached across runs): validate links it
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


def log_training_inputs(inputs: TrainingInputs, params: dict[str, str]) -> None:
    """Into the active run: parameters, the dataset input and the upstream steps' records."""
    mlflow.log_params(params)
    mlflow.log_input(_dataset_input(inputs.report), context="training")
    for folder, paths in inputs.files.items():
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path=folder)


def log_training_outputs(summary: dict, files: list[Path]) -> None:
    """Into the active run: the fine-tune's summary metrics and files."""
    mlflow.log_metrics({"best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
                        "trainable_parameters": summary["parameters"]["trainable"],
                        "training_seconds": summary["training_seconds"]})
    mlflow.set_tag("weights_sha256", summary["weights_sha256"])
    if summary.get("diagnosis"):  # searchable: tags.diagnosis LIKE '%overfitting%'
        mlflow.set_tag("diagnosis", summary["diagnosis"]["tag"])
        mlflow.log_text(summary["diagnosis"]["report"], "finetune/diagnosis.md")
    for path in files:
        mlflow.log_artifact(str(path), artifact_path="finetune")


# ---- the live run of a fine-tune ----------------------------------------------------------

class TrainingRun:
    """The active run while a fine-tune trains: `log_epoch` is its per-epoch callback.

    The run's first metrics are its first epoch's, validation loss first: MLflow's compare view plots the
    first metric two runs share (its parallel-coordinates default), so system metrics start after them."""

    def __init__(self, run_id: str, name: str, system_metrics: bool = False, resumed: bool = False):
        self.run_id, self.name, self.last_epoch = run_id, name, None
        self._system_metrics, self._resumed, self._monitor = system_metrics, resumed, None

    def log_epoch(self, row: dict) -> None:
        metrics = {k: float(v) for k, v in sorted(row.items(), key=lambda kv: kv[0] != "val_loss")
                   if k not in EPOCH_FIELDS}
        mlflow.log_metrics(metrics, step=row["epoch"], timestamp=int(row["time"] * 1000))
        mlflow.set_tag("last_finished_epoch", str(row["epoch"]))
        self.last_epoch = row["epoch"]
        if self._system_metrics and self._monitor is None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL,
                                                 resume_logging=self._resumed, tracking_uri=tracking_uri())
            self._monitor.start()

    def log_lr_finding(self, finding) -> None:
        """The range test (finetune.lr auto): the rate it chose, its curve and plot."""
        import tempfile

        from components.training.lr_find import save_plot

        mlflow.log_param("finetune.lr_found", f"{finding.suggestion:.6g}")
        mlflow.log_metric("lr_found", finding.suggestion)
        mlflow.log_dict({"lrs": finding.lrs, "losses": finding.losses, **finding.summary()}, "finetune/lr_find.json")
        with tempfile.TemporaryDirectory(prefix="lr-find-") as tmp:
            save_plot(finding, Path(tmp) / "lr_find.png")
            mlflow.log_artifact(str(Path(tmp) / "lr_find.png"), artifact_path="finetune")

    def stop(self) -> None:
        """The system metrics' last samples logged, before the run ends."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def record(self) -> RunRecord:
        """What the model folder says about its run."""
        return RunRecord(self.run_id, self.name, redact(tracking_uri()))


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
    text = redact(str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


@contextlib.contextmanager
def training_run(inputs: TrainingInputs, cfg: TrackingConfig, runner: str, pipeline_run_id: str,
                 changes: list[str] | None = None, resume_run_id: str | None = None):
    """Open (or, resuming an interrupted fine-tune, reopen) the run; yields a TrainingRun.
    `changes` (experiment_changes; None: previous_run_changes) lead its name.

    The run ends FINISHED when the block does, FAILED with tags `error` and
    `last_finished_epoch` when it raises, KILLED on Ctrl-C or SIGTERM.
    """
    mlflow_client = client()
    exp = experiment_id(mlflow_client, cfg.experiment)
    resumable = False
    if resume_run_id:
        with contextlib.suppress(MlflowException):
            resumable = mlflow_client.get_run(resume_run_id).info.experiment_id == exp
    params = training_params(inputs)
    start = dict(run_id=resume_run_id) if resumable else dict(
        experiment_id=exp, run_name=run_name(params, previous_run_changes(mlflow_client, exp, params)
                                             if changes is None else changes, pipeline_run_id[-8:]),
        tags=lineage_tags(inputs, params, runner, pipeline_run_id))
    with _sigterm_as_interrupt(), mlflow.start_run(log_system_metrics=False, **start) as active:
        live = TrainingRun(active.info.run_id, active.info.run_name, cfg.system_metrics, resumable)
        if not resumable:
            log_training_inputs(inputs, params)
        elif "error" in active.data.tags:  # the interrupted attempt's error is history now
            mlflow_client.delete_tag(live.run_id, "error")
        try:
            yield live
            live.stop()
        except BaseException as err:
            live.stop()
            mlflow.set_tag("error", _one_line(err))
            if isinstance(err, KeyboardInterrupt):  # MLflow would call it FAILED
                mlflow.end_run("KILLED")
                err.last_finished_epoch = live.last_epoch  # for the one line components/cli.py prints
            raise


def runner_identity() -> tuple[str, str]:
    """(runner, pipeline run id) for a step started from the command line: DVC or by hand."""
    runner = "dvc" if os.environ.get("DVC_ROOT") or os.environ.get("DVC_STAGE") else "cli"
    return runner, f"{runner}-{uuid.uuid4().hex[:12]}"
