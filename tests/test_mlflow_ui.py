"""`make ui` (infra/mlflow_ui.py): says it is starting, then the URL of the experiment's runs, which answers."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from helpers import ROOT, free_port


@pytest.mark.e2e
def test_ui_says_it_is_starting_then_where_the_runs_are_and_stops_on_ctrl_c(tmp_path):
    store = tmp_path / "mlflow.db"
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("experiment: finetune-digits", "experiment: ui-test"))
    experiment = mlflow.MlflowClient(f"sqlite:///{store}").create_experiment("ui-test")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "infra" / "mlflow_ui.py"), "--store", str(store), "--port",
                             str(port), "--params", str(params)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True, env={**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:"
                                                                    f"{os.environ['PATH']}"})
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"ui: starting MLflow's UI on http://127.0.0.1:{port}")
        started = time.time()
        second = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs"
        assert second.startswith(f"ui: open {url} (the runs of experiment ui-test)"), second
        assert time.time() - started < 180
        with urllib.request.urlopen(url.split("#")[0], timeout=10) as page:
            assert page.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
