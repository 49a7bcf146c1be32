"""PNGs of the MLflow UI as a person sees it: the runs list, the champion's run, two runs compared, the
registered model.

    python infra/mlflow_screenshot.py --store mlflow.db --out screenshots      # or: make screenshot

Starts `mlflow server` on the store (the SQLite file `make run` fills) on a free loopback port, opens
each page in headless Chromium (Debian's `chromium`, driven by Playwright), waits until it shows
the run and the champion, saves runs.png, run.png, compare.png (with two validated runs) and model.png, and
stops the server. Prints what each page showed, so a test can check it. The run is the one
`register.alias` points at, or else the newest run of the experiment; the compared runs are the two newest
validated ones.
"""

from __future__ import annotations

import argparse
import json
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
WIDTH, HEIGHT = 1600, 1000
# The UI scrolls inside its own panel (a full-page shot is one window): the compare view gets a window tall
# enough for its plot, run details, parameters and metrics, down to the headline metric.
HEADLINE, COMPARE_HEIGHT = "test_accuracy", 3200
FIRST_METRIC, SCROLLS = "best_epoch", 40  # a metric near the top of that table; at most this many half-box scrolls
# What a returning user has already dismissed: the assistant panel that opens on a first visit.
QUIET_UI = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scroll_metrics_to(page, metric: str) -> None:
    """The compare view's metrics table is two virtualized grids, names and values, rendering only the rows
    near the view. The values grid scrolls and the names follow it one scroll event behind (MLflow 3.17.2
    here, with a mouse wheel as well: at the table's end they stay a row apart). Scroll the values until
    `metric`'s row is rendered, then set both grids to that row, and check that it shows in the box."""
    first = page.get_by_text(FIRST_METRIC, exact=True).first
    first.wait_for()
    grids = first.evaluate_handle(
        "e => [...e.closest('.du-bois-light-collapse-content-box').querySelectorAll('.ReactVirtualized__Grid')]")
    values = "const v = gs.find(g => getComputedStyle(g).overflowY === 'auto');"
    find = ("const cell = gs.flatMap(g => [...g.querySelectorAll('a, span, div')])"
            ".filter(e => e.textContent.trim() === m).at(-1);")  # the innermost element holding the name
    for _ in range(SCROLLS):
        top = grids.evaluate(f"(gs, m) => {{ {find} if (!cell) return null;"
                             " let c = cell; while (c.parentElement && !c.parentElement.classList.contains("
                             "'ReactVirtualized__Grid__innerScrollContainer')) c = c.parentElement; return c.offsetTop; }",
                             metric)
        if top is not None:
            grids.evaluate(f"(gs, t) => {{ {values} v.scrollTop = t; }}", top)
            page.wait_for_timeout(500)  # the names follow, a step behind: then set them to the same row
            grids.evaluate(f"gs => {{ {values} gs.forEach(g => {{ g.scrollTop = v.scrollTop; }}); }}")
            page.wait_for_timeout(500)
            shown = grids.evaluate(f"(gs, m) => {{ {find} const g = gs.find(g => g.contains(cell)); if (!cell || !g) return false;"
                                   " const a = cell.getBoundingClientRect(), b = g.getBoundingClientRect();"
                                   " return a.top >= b.top - 1 && a.bottom <= b.bottom + 1; }", metric)
            offsets = grids.evaluate("gs => gs.map(g => g.scrollTop)")
            if not shown or len(set(offsets)) != 1:
                raise SystemExit(f"screenshot: the compare view's metrics do not stand at {metric!r} "
                                 f"(grids at {offsets})")
            return
        grids.evaluate(f"gs => {{ {values} v.scrollTop += v.clientHeight / 2; }}")
        page.wait_for_timeout(300)
    raise SystemExit(f"screenshot: the compare view shows no metric {metric!r}")


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
    subject["compared"] = [r.info.run_id for r in client.search_runs(
        [exp.experiment_id], "tags.validated = 'true'", order_by=["attributes.start_time DESC"], max_results=2)]
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
            pages = [("runs.png", f"{base}/experiments/{subject['experiment_id']}/runs", subject["run_name"], HEIGHT),
                     ("run.png", f"{base}/experiments/{subject['experiment_id']}/runs/{subject['run_id']}",
                      subject["run_name"], HEIGHT)]
            if len(subject["compared"]) == 2:  # what a person comparing two fine-tunes looks for first
                runs, experiments = (json.dumps(ids, separators=(",", ":"))
                                     for ids in (subject["compared"], [subject["experiment_id"]]))
                pages.append(("compare.png", f"{base}/compare-runs?runs={runs}&experiments={experiments}", HEADLINE,
                              COMPARE_HEIGHT))
            if subject["version"]:
                pages.append(("model.png", f"{base}/models/{model}", f"@ {alias}", HEIGHT))
            shown = []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
                context.add_init_script(QUIET_UI)
                page = context.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                for name, url, expected, height in pages:
                    page.set_viewport_size({"width": WIDTH, "height": height})
                    page.goto(url)
                    if name == "compare.png":
                        _scroll_metrics_to(page, expected)
                    else:
                        page.get_by_text(expected).first.wait_for()
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
