"""`dvc repro` as users meet it: `git clone` + `make run`, then, in a copy with tiny settings, what reruns
when nothing, a parameter, the code or the tracking store changes, and `dvc exp run --temp/--queue`."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from helpers import ROOT, commit, repository_copy

pytestmark = pytest.mark.e2e

STAGES = ["demo_digits", "demo_zoo", "data", "augment", "fetch_pretrained", "finetune", "tracking", "validate",
          "register"]
MODEL = "digits-5-9-resnet18"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}  # the default store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"               # `python` = this venv
    return {**env, **extra}


def _run(cmd: list[str], cwd: Path, **extra) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(**extra), capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _set_params(repo: Path, mutate) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    mutate(raw)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _store(repo: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def test_fresh_clone_make_run_leaves_a_finished_run_and_a_champion_and_a_second_run_retrains_nothing(tmp_path):
    """The README's quick start as written, in a `git clone` (the virtualenv is this one, as `make` built it)."""
    origin = repository_copy(tmp_path / "origin")
    _run(["git", "clone", "-q", str(origin), str(tmp_path / "clone")], tmp_path)
    clone = tmp_path / "clone"
    make = ["make", "run", f"VENV={Path(sys.executable).parent.parent}"]

    start = time.monotonic()
    first = _run(make, clone)
    first_s = time.monotonic() - start
    assert _ran(first) == STAGES

    client = _store(clone)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(champion.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["gate_passed"] == "true"
    assert run.data.tags["diagnosis"] == "healthy" and "finetune: diagnosis: healthy" in first
    assert run.info.run_name.endswith("resnet18 → digits-5-9")
    # live: the run opened when training started, each epoch logged when it ended, with its own timestamp
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert len({m.timestamp for m in history}) == len(history) > 1
    assert run.info.start_time < min(m.timestamp for m in history) <= max(m.timestamp for m in history) \
        < run.info.end_time
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics)
    assert run.info.artifact_uri.startswith((clone / "mlruns").as_uri())  # beside mlflow.db, in the workspace
    assert json.loads((clone / "artifacts" / "validate" / "run.json").read_text())["run_id"] == run.info.run_id

    start = time.monotonic()
    second = _run(make, clone)
    second_s = time.monotonic() - start
    assert _ran(second) == ["tracking"]  # resolves where runs go; nothing else has changed
    assert len(client.search_runs([run.info.experiment_id])) == 1
    print(f"\nfresh clone: first `make run` {first_s:.1f} s, second (nothing changed) {second_s:.1f} s")

    # the README's range test on what the run fetched and prepared: a rate, and its plot
    found = _run(["make", "lr-find", f"VENV={Path(sys.executable).parent.parent}"], clone)
    assert re.search(r"suggested finetune\.lr \d", found) and (clone / "lr_find.png").stat().st_size > 10_000
    assert len(client.search_runs([run.info.experiment_id])) == 1  # it trains nothing and logs nothing

    # the MLflow UI shows the run and the champion (infra/mlflow_screenshot.py, headless Chromium)
    shots = tmp_path / "screenshots"
    out = _run([sys.executable, str(ROOT / "infra" / "mlflow_screenshot.py"), "--store", str(clone / "mlflow.db"),
                "--out", str(shots)], clone)
    assert run.info.run_name in out and f"{MODEL} version 1 @champion" in out
    assert all((shots / name).stat().st_size > 20_000 for name in ("runs.png", "run.png", "model.png"))

    # `dvc plots show` renders offline: no script from a CDN, the Vega libraries inlined, every plot drawn
    _run(["dvc", "plots", "show"], clone)
    page = (clone / "dvc_plots" / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=", page) and "vegaEmbed(" in page
    assert _plots_drawn_offline(clone / "dvc_plots" / "index.html") == 4  # loss, accuracy, confusion, calibration


def _plots_drawn_offline(html: Path) -> int:
    """Vega plots drawn by headless Chromium with every request off the local file refused."""
    from mlflow_screenshot import CHROMIUM, CHROMIUM_ARGS  # infra/, on sys.path from conftest
    from playwright.sync_api import sync_playwright

    asked = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                   else (asked.append(route.request.url), route.abort()))
        page.goto(html.as_uri())
        page.wait_for_function("document.querySelectorAll('.vega-embed canvas').length >= 4",
                               timeout=30_000)
        drawn = page.evaluate("document.querySelectorAll('.vega-embed canvas').length")
        browser.close()
    assert asked == []
    return drawn


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy of the repository with tiny settings, committed (what `dvc exp run` diffs against)."""
    dest = repository_copy(tmp_path_factory.mktemp("repo"))

    def tiny(p):
        p["demo"]["epochs"] = 1
        p["augment"]["preview_images"] = 2
        p["finetune"]["max_epochs"] = 2
        p["tracking"]["system_metrics"] = False
        # the champion comparison runs, but a 2-epoch model may lose to the last one: any loss is allowed
        p["validate"].update(min_accuracy=0.3, min_macro_f1=0.0, min_class_recall=0.0, champion_margin=1.0)

    _set_params(dest, tiny)
    _run([sys.executable, "-m", "pipelines", "generate"], dest)
    commit(dest, "tiny settings")
    return dest


def test_repro_reruns_what_a_parameter_or_the_code_touches_and_records_runs_where_they_are_asked_for(
        repo, mlflow_server):
    assert _ran(_run(["dvc", "repro"], repo)) == STAGES
    client = _store(repo)
    version = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(version.run_id)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_commit"] == head == version.tags["git_commit"]
    assert run.data.params["finetune.max_epochs"] == "2" and run.data.params["pretrained.arch"] == "resnet18"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    artifacts = {f.path for folder in ("validate", "augment") for f in client.list_artifacts(run.info.run_id, folder)}
    assert {"validate/confusion_matrix.png", "augment/preview.png"} <= artifacts
    experiment = client.get_experiment_by_name("finetune-digits").experiment_id

    assert _ran(_run(["dvc", "repro"], repo)) == ["tracking"]  # nothing changed: nothing trains, nothing is logged
    assert len(client.search_runs([experiment])) == 1

    _set_params(repo, lambda p: p["finetune"].update(lr=0.02))
    assert _ran(_run(["dvc", "repro"], repo)) == ["finetune", "tracking", "validate", "register"]
    runs = client.search_runs([experiment], order_by=["start_time DESC"])
    assert len(runs) == 2 and runs[0].info.run_name == "lr=0.02 · resnet18 → digits-5-9"  # what changed, first
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 2
    gate = json.loads((repo / "artifacts" / "validate" / "gate.json").read_text())
    assert gate["champion"]["champion_version"] == "1" and "lower_bound" in gate["champion"]

    # a change to decoding reruns every stage whose step decodes images (the digits' export and the weights'
    # fetch do not)
    images = repo / "components" / "storage" / "images.py"
    images.write_text(images.read_text() + "\n# touched\n")
    touched = _run(["dvc", "repro"], repo)
    assert _ran(touched) == [s for s in STAGES if s not in ("demo_digits", "fetch_pretrained")]
    # training is bit-reproducible: the same weights as the champion, so no second copy of it is registered
    assert "nothing registered (weights identical to v2 (@champion)" in touched
    commit(repo, "lr 0.02, decoding touched")

    # another store (MLFLOW_TRACKING_URI): the run is recorded there without training again
    to_server = _run(["dvc", "repro"], repo, MLFLOW_TRACKING_URI=mlflow_server)
    assert _ran(to_server) == ["tracking", "validate", "register"]
    remote = mlflow.MlflowClient(mlflow_server)
    moved = remote.get_run(remote.get_model_version_by_alias(MODEL, "champion").run_id)
    local = client.get_run(json.loads((repo / "artifacts" / "model" / "run.json").read_text())["run_id"])
    assert moved.data.tags["trained_in_run"] == local.info.run_id and moved.info.run_name == local.info.run_name
    assert [(m.step, m.timestamp) for m in remote.get_metric_history(moved.info.run_id, "val_loss")] == \
        [(m.step, m.timestamp) for m in client.get_metric_history(local.info.run_id, "val_loss")]


def test_dvc_experiments_in_temporary_copies_log_to_the_workspace_store_and_see_its_champion(repo):
    _run(["dvc", "repro"], repo)
    client = _store(repo)
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    experiment = client.get_experiment_by_name("finetune-digits").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment])}

    _run(["dvc", "exp", "run", "--temp", "-n", "temp-lr", "-S", "finetune.lr=0.003"], repo)
    _run(["dvc", "exp", "run", "--queue", "-n", "queued-lr", "-S", "finetune.lr=0.004"], repo)
    _run(["dvc", "exp", "run", "--run-all"], repo)

    new = [r for r in client.search_runs([experiment]) if r.info.run_id not in before]
    assert sorted(r.data.tags["dvc_experiment"] for r in new) == ["queued-lr", "temp-lr"]
    # each named by the experiment, then what it changed from the baseline commit
    assert sorted(r.info.run_name for r in new) == ["queued-lr lr=0.004 · resnet18 → digits-5-9",
                                                    "temp-lr lr=0.003 · resnet18 → digits-5-9"]
    for run in new:
        assert run.info.status == "FINISHED"
        assert "accuracy_difference_lower_bound" in run.data.metrics  # compared with the workspace's champion
        assert Path(run.info.artifact_uri.removeprefix("file://")).is_dir()  # artifacts outlive the temp copy
    assert int(client.get_model_version_by_alias(MODEL, "challenger").version) > int(champion)
    # the leaderboard: every experiment's headline figures, from the file its commit carries
    done = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    headlines = {}

    def walk(node):
        if isinstance(node, dict):
            name = node.get("name")
            data = node.get("data") or {}
            metrics = (data.get("metrics") or {}).get("metrics/headline.json", {}).get("data")
            if name and metrics:
                headlines[name] = metrics
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    assert {"temp-lr", "queued-lr"} <= set(headlines), shown
    for name in ("temp-lr", "queued-lr"):
        assert 0 <= headlines[name]["test_accuracy"] <= 1 and headlines[name]["best_epoch"] >= 1
        assert isinstance(headlines[name]["gate_passed"], bool) and headlines[name]["compared_with"].startswith("v")
    assert "test_accuracy" in _run(["dvc", "metrics", "diff", "temp-lr", "queued-lr"], repo)
    # and every plot of both, the validation plots too (their copy is in DVC's cache, named by each dvc.lock)
    done = subprocess.run(["dvc", "plots", "diff", "temp-lr", "queued-lr", "--json"], cwd=repo, env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert not shown.get("errors"), shown["errors"]
    drawn = {plot: {rev for entry in entries for rev in entry.get("revisions", [])}
             for plot, entries in shown["data"].items()}
    plots = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    expected = [next(iter(p)) if isinstance(p, dict) else p for p in plots]
    # the MLflow compare view of the two newest runs, as `make screenshot` takes it, shows the headline metric
    shots = repo / "screenshots"
    out = _run([sys.executable, str(ROOT / "infra" / "mlflow_screenshot.py"), "--store", str(repo / "mlflow.db"),
                "--out", str(shots)], repo)
    assert re.search(r"compare\.png: \S+compare-runs\S+ shows 'test_accuracy'", out), out
    assert (shots / "compare.png").stat().st_size > 50_000
    assert len(expected) == 9 and {p: drawn.get(p) for p in expected} == {p: {"temp-lr", "queued-lr"}
                                                                           for p in expected}, drawn
