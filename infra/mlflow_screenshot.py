"""PNGs of the MLflow UI as a person sees it: the runs list, the champion's run, the registered model.

    python infra/mlflow_screenshot.py --store mlflow.db --out screenshots      # or: make screenshot

Starts `mlflow server` on the store (the SQLite file `make run` fills) on a free loopback port, opens
each page in headless Chromium (Debian's `chromium`, driven by Playwright), waits until it shows
the run and the champion, saves runs.png, run.png and model.png, and stops the server. Prints what
each page showed, so a test can check it. The run is the one `register.alias` points at, or else
the newest run of the experiment.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

import mlflow
from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_stack import start_mlflow, stop  # noqa: E402 (infra/ is not a package)

from components.config import load_params  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# Headless, and quiet on a machine with no outside network (no update, sync or QUIC attempts).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
TIMEOUT_MS = 60_000  # the UI's first load compiles a large bundle
SETTLE_MS = 3_000    # charts and tables finish drawing after the text they wait for appears
# What a returning user has already dismissed: the assistant panel that opens on a first visit.
QUIET_UI = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _subject(store: str, experiment: str, model: str, alias: str) -> dict:
    """The experiment, run and (if any) champion version to show."""
    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"screenshot: no experiment '{experiment}' in {store} (run `make run` first)")
    subject = {"experiment_id": exp.experiment_id, "version": None}
    try:
        version = client.get_model_version_by_alias(model, alias)
        subject.update(run_id=version.run_id, version=version.version)
    except mlflow.exceptions.MlflowException:
        runs = client.search_runs([exp.experiment_id], order_by=["start_time DESC"], max_results=1)
        if not runs:
            raise SystemExit(f"screenshot: experiment '{experiment}' has no runs") from None
        subject["run_id"] = runs[0].info.run_id
    subject["run_name"] = client.get_run(subject["run_id"]).info.run_name
    return subject


def screenshots(store_file: Path, out: Path, experiment: str, model: str, alias: str) -> list[str]:
    """Save the three pages; returns one line per page saying what it showed."""
    store = f"sqlite:///{store_file.resolve()}"
    subject = _subject(store, experiment, model, alias)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-") as home:
        server = start_mlflow(Path(home), port, backend_store=store, env={"MLFLOW_DISABLE_TELEMETRY": "true"})
        try:
            base = f"http://127.0.0.1:{port}/#"
            pages = [("runs.png", f"{base}/experiments/{subject['experiment_id']}/runs", subject["run_name"]),
                     ("run.png", f"{base}/experiments/{subject['experiment_id']}/runs/{subject['run_id']}",
                      subject["run_name"])]
            if subject["version"]:
                pages.append(("model.png", f"{base}/models/{model}", f"@ {alias}"))
            shown = []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                context = browser.new_context(viewport={"width": 1600, "height": 1000})
                context.add_init_script(QUIET_UI)
                page = context.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                for name, url, expected in pages:
                    page.goto(url)
                    page.get_by_text(expected, exact=False).first.wait_for()
                    page.wait_for_timeout(SETTLE_MS)  # the runs page polls for ever: no network-idle moment
                    for tip in page.get_by_role("button", name="Got it").all():  # first-visit tips
                        tip.click()
                    page.screenshot(path=str(out / name), full_page=True)
                    shown.append(f"{name}: {url} shows {expected!r}")
                browser.close()
        finally:
            stop(server.pid)
    if subject["version"]:
        shown.append(f"{model} version {subject['version']} @{alias}: run {subject['run_name']!r}")
    return shown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("mlflow.db"), help="SQLite MLflow store")
    parser.add_argument("--out", type=Path, default=Path("screenshots"), help="folder for the PNGs")
    parser.add_argument("--params", default="params.yaml", help="experiment and model names come from here")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    for line in screenshots(args.store, args.out, params.tracking.experiment, params.registry.model_name,
                            params.registry.alias):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
