"""The MLflow run as the pipeline keeps it: live while it trains, honest about how it ended, and
recorded in whichever store it is asked for."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import yaml

from components import finetune as finetune_step
from components.tracking import store as tracking
from components import validate as validate_step
from helpers import PLAIN_TRAINING, ROOT, finetune_cfg, register_cfg, tracking_cfg, validate_cfg

EXPERIMENT = "tracking-tests"


def _finetune_process(artifacts, **finetune_changes) -> subprocess.Popen:
    """The finetune step's command line, as DVC runs it, on the `artifacts` fixture's inputs."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetune"].update({**PLAIN_TRAINING, "batch_size": 16, **finetune_changes})
    raw["tracking"].update(experiment=EXPERIMENT, system_metrics=False)
    (artifacts / "params.yaml").write_text(yaml.safe_dump(raw))
    # as a terminal's foreground process has it: SIGINT at its default, even when the tests themselves were
    # started in the background of a script, which ignores SIGINT (a shell without job control does that,
    # and Python then keeps it ignored: no KeyboardInterrupt)
    return subprocess.Popen([sys.executable, "-m", "components.finetune", "--params", str(artifacts / "params.yaml"),
                             "--dataset", str(artifacts / "data"), "--policy", str(artifacts / "aug"),
                             "--weights", str(artifacts / "pre"), "--out", str(artifacts / "model")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_epochs(client, process, epochs: int, timeout: float = 180):
    """The run, once it shows `epochs` logged epochs, while the process still trains."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "val_loss")) >= epochs:
            return client.get_run(runs[0].info.run_id)
        time.sleep(0.2)
    raise AssertionError(f"no run with {epochs} epochs logged after {timeout} s")


def test_epochs_are_visible_while_training_and_sigterm_ends_the_run_killed(artifacts):
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    process = _finetune_process(artifacts, max_epochs=500, patience=500)
    live = _wait_for_epochs(client, process, 2)
    assert live.info.status == "RUNNING" and live.data.params["finetune.max_epochs"] == "500"
    assert live.data.tags["data_fingerprint"] and live.data.tags["pipeline_runner"] == "cli"

    process.send_signal(signal.SIGTERM)  # as Kubeflow stops a pod
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in out, out
    run = client.get_run(live.info.run_id)
    logged = client.get_metric_history(run.info.run_id, "val_loss")
    assert run.info.status == "KILLED" and run.data.tags["error"] == "KeyboardInterrupt: stopped by signal 15"
    assert run.data.tags["last_finished_epoch"] == str(max(m.step for m in logged)) and len(logged) >= 2
    assert not (artifacts / "model").exists()  # nothing half-written stands as the model
    assert out.strip().splitlines()[-1] == (f"finetune: interrupted after epoch {run.data.tags['last_finished_epoch']}; "
                                            "`make run` (or `dvc repro`) continues from there")


def test_ctrl_c_is_one_line_and_exit_130(artifacts):
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    process = _finetune_process(artifacts, max_epochs=500, patience=500)
    live = _wait_for_epochs(client, process, 1)
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends the foreground process group
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in out, out
    assert out.strip().splitlines()[-1].startswith("finetune: interrupted after epoch ")
    assert client.get_run(live.info.run_id).info.status == "KILLED"


def test_a_failing_fine_tune_ends_its_run_failed_with_the_error_and_the_last_finished_epoch(artifacts):
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    process = _finetune_process(artifacts, max_epochs=500, patience=500)
    live = _wait_for_epochs(client, process, 1)
    manifest = (artifacts / "data" / "manifest.csv").read_text().splitlines()[1:]
    source = artifacts / "raw"  # the folder the dataset artifact references (conftest's image_folder)
    assert json.loads((artifacts / "data" / "source.json").read_text())["location"] == str(source)
    for row in manifest:  # the validation images vanish (a volume lost mid-run): the next validation fails
        path, _, split = row.split(",")[:3]
        if split == "val":
            (source / path).unlink()
    out, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    run = client.get_run(live.info.run_id)
    assert run.info.status == "FAILED", out
    # a file the manifest names and cannot be read: the dataset's error (exit 3), naming the file
    assert run.data.tags["error"].startswith("DatasetError: dataset: ") and f"{source}/" in run.data.tags["error"]
    finished = max(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
    assert run.data.tags["last_finished_epoch"] == str(finished)


def test_validation_completes_the_training_run_and_a_new_store_records_it_again_without_training(
        artifacts, tmp_path, monkeypatch):
    summary = finetune_step.run(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "model",
                                finetune_cfg(max_epochs=2, batch_size=16), tracking_cfg(EXPERIMENT), "test", "p-1")
    _, record = validate_step.run(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "model",
                                  artifacts / "val", validate_cfg(), register_cfg("tracked"), tracking_cfg(EXPERIMENT),
                                  "test", "p-2")
    assert record.run_id == summary["run_id"]  # one run: the fine-tune and its validation
    first = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    trained = first.get_run(summary["run_id"])
    assert trained.info.status == "FINISHED" and {"test_accuracy", "val_loss"} <= set(trained.data.metrics)

    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    _, again = validate_step.run(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "model",
                                 artifacts / "val", validate_cfg(), register_cfg("tracked"),
                                 tracking_cfg(EXPERIMENT), "test", "p-3")
    second = mlflow.MlflowClient(other)
    recorded = second.get_run(again.run_id)
    assert recorded.data.tags["trained_in_run"] == trained.info.run_id
    assert recorded.info.run_name == trained.info.run_name
    assert [(m.step, m.timestamp, m.value) for m in second.get_metric_history(again.run_id, "val_loss")] == \
        [(m.step, m.timestamp, m.value) for m in first.get_metric_history(trained.info.run_id, "val_loss")]
    assert recorded.data.params == trained.data.params
    assert json.loads((artifacts / "val" / "run.json").read_text())["run_id"] == again.run_id
    assert (tmp_path / "mlruns").is_dir()  # artifacts beside that SQLite store, not in the working directory


def test_the_tracking_target_changes_with_the_store_and_a_wiped_store(tmp_path):
    """`python -m components.tracking target`, as DVC's tracking stage runs it (a process each time)."""
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"]["experiment"] = EXPERIMENT
    params.write_text(yaml.safe_dump(raw))

    def target(store: str) -> dict:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / store}"}
        subprocess.run([sys.executable, "-m", "components.tracking", "target", "--params", str(params), "--out",
                        str(tmp_path / "target.json")], cwd=ROOT, env=env, check=True, capture_output=True)
        return json.loads((tmp_path / "target.json").read_text())

    first = target("a.db")
    assert target("a.db") == first  # nothing changed: DVC reruns nothing after it
    assert target("b.db")["tracking_uri"] != first["tracking_uri"]
    (tmp_path / "a.db").unlink()
    assert target("a.db")["experiment_created"] != first["experiment_created"]  # wiped: record the run again


@pytest.mark.parametrize("uri, shown", [("http://user:s3cret@mlflow.example:5000", "http://mlflow.example:5000")])
def test_the_tracking_target_never_records_credentials(tmp_path, monkeypatch, uri, shown):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tracking, "client", lambda: _NoServer())
    assert tracking.target(tracking_cfg(EXPERIMENT))["tracking_uri"] == shown


class _NoServer:
    """No MLflow server runs at that made-up address; the redaction is what this test checks."""

    def get_experiment_by_name(self, name):
        return type("Experiment", (), {"experiment_id": "7", "tags": {tracking.EXPERIMENT_KIND[0]: "x"}})()

    def get_experiment(self, experiment_id):
        return type("Experiment", (), {"experiment_id": experiment_id, "creation_time": 1})()


def test_two_pipelines_starting_on_a_new_sqlite_store_at_once_both_get_it(tmp_path):
    """MLflow creates a new SQLite store's tables on first use; unguarded, two processes doing it at
    once fail with `duplicate column name: step` (every time on this machine)."""
    script = "from components.tracking import store; store.client().search_experiments(max_results=1); print('ok')"
    for trial in range(3):
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / f'new-{trial}' / 'mlflow.db'}"}
        procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err[-800:] for _, err in results]


def test_a_run_is_named_by_what_differs_from_the_previous_run_of_its_model(artifacts):
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    cfg = tracking_cfg("naming-tests")

    def name(pipeline_run_id, **changes):
        summary = finetune_step.run(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "named",
                                    finetune_cfg(**{"max_epochs": 1, "batch_size": 16, **changes}), cfg, "test",
                                    pipeline_run_id)
        return client.get_run(summary["run_id"]).info.run_name

    first = name("run-aaaaaaaa")
    assert first.startswith("aaaaaaaa · resnet18 → ")  # nothing to differ from: a short unique id
    assert name("run-bbbbbbbb", lr=0.003).startswith("lr=0.003 · resnet18")  # what changed since the last
    assert name("run-cccccccc", lr=0.003).startswith("cccccccc · ")  # the same again: nothing differs
    assert name("run-dddddddd", lr=0.01, momentum=0.5, batch_size=8, patience=2, max_epochs=2).startswith(
        "lr=0.01, momentum=0.5, batch_size=8 +2 · ")  # the first three, and how many more


def test_in_a_dvc_experiment_the_names_changes_are_from_its_baseline_commit(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"finetune": {"lr": 0.01, "epochs": 5}, "validate": {"min_accuracy": 0.5}}))
    subprocess.run(["git", "-C", str(tmp_path), "add", "params.yaml"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"],
                   check=True)
    baseline = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    params.write_text(yaml.safe_dump({"finetune": {"lr": 0.003, "epochs": 5}, "validate": {"min_accuracy": 0.9}}))
    monkeypatch.chdir(tmp_path)
    from components.tracking import runs

    assert runs.experiment_changes(params) is None  # not in an experiment: named against the previous run
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
    assert runs.experiment_changes(params) == ["lr=0.003"]
    assert runs.experiment_changes(params, (*runs.TRAINING_SECTIONS, "validate")) == ["lr=0.003", "min_accuracy=0.9"]
