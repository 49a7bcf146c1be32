"""`make ui`: MLflow's UI on the local store, saying so while it starts and where to look once it answers.

    python infra/mlflow_ui.py --store mlflow.db [--port 5000]      # or: make ui

`mlflow ui` takes about 45 s to answer on a 2-core machine and prints nothing useful meanwhile; this
prints that it is starting, then, as soon as /health answers, the URL of the runs of params.yaml's
experiment (tracking.experiment), the page where fine-tunes are compared. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from components.config import load_params  # noqa: E402 (infra/ is not a package)


def runs_url(base: str, store: str, experiment: str) -> str:
    """The experiment's runs page, or the UI's start page while the store has no such experiment yet."""
    import mlflow

    found = mlflow.MlflowClient(store).get_experiment_by_name(experiment)
    return f"{base}/#/experiments/{found.experiment_id}/runs" if found else f"{base}/#/experiments"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "mlflow.db", help="the SQLite store `make run` fills")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="its tracking.experiment is shown")
    args = parser.parse_args(argv)
    store, base = f"sqlite:///{args.store.resolve()}", f"http://127.0.0.1:{args.port}"
    experiment = load_params(args.params).tracking.experiment
    print(f"ui: starting MLflow's UI on {base} (about 45 s on a 2-core machine)...", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                             "--port", str(args.port)], env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                            stdout=sys.stderr)  # its own lines go to stderr: ours, on stdout, say where to look
    try:
        while proc.poll() is None:
            try:
                # B310: our own loopback URL
                with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:  # nosec B310
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            print(f"ui: MLflow's UI stopped (exit {proc.returncode}) before it answered", file=sys.stderr)
            return 1
        print(f"ui: open {runs_url(base, store, experiment)} (the runs of experiment {experiment}); "
              "Ctrl-C stops it", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        return 0


if __name__ == "__main__":
    sys.exit(main())
