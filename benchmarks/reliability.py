"""What each step does with bad input and injected faults, as a user meets it: the steps' command
lines (`python -m components.<step>`), real files, real kills, a real full disk, a real MLflow server.

    .venv/bin/python benchmarks/reliability.py      # or: make reliability (about 4 minutes on 2 cores; root
                                                    #   for the full-disk and read-only rows, else skipped)

Prints a Markdown table (the README's reliability table) and writes benchmarks/results/reliability.json.
Each row: what was done, the exit code, the one line the step printed (or the outcome of a rerun),
and what was left behind. Measures; asserts nothing (tests/ holds the assertions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "infra")]

from components.artifacts import checkpoint, model as model_artifact  # noqa: E402
from components.models import architectures as models  # noqa: E402

SECRET = "Sig0123456789SECRET"
ROWS: list[dict] = []


def _images(root: Path, per_class: int = 80, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for k, label in enumerate(("bars", "dots", "edge")):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            img[k * 10: k * 10 + 6] = 230
            Image.fromarray(img).save(root / label / f"{i:03d}.png")
    return root


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Work:
    """A scratch project: params, data, zoo checkpoint, the steps' outputs, a SQLite store."""

    def __init__(self, home: Path):
        self.home = home
        self.raw = _images(home / "raw")
        zoo = home / "zoo.pt"
        torch.manual_seed(0)
        torch.save({"format": checkpoint.FORMAT, "arch": "resnet18", "class_names": ["a", "b", "c", "d"],
                    "state_dict": models.build("resnet18", 4).state_dict()}, zoo)
        self.params = yaml.safe_load((ROOT / "params.yaml").read_text())
        self.params["data"].update(source=str(self.raw))
        self.params["pretrained"].update(uri=str(zoo), sha256="")
        self.params["finetune"].update(max_epochs=5, patience=5, batch_size=32, checkpoint_dir=str(home / "ckpt"))
        self.params["validate"].update(min_accuracy=0.0, min_macro_f1=0.0, min_class_recall=0.0,
                                       compare_with_champion=False)
        self.params["register"].update(model_name="reliability")
        self.params["tracking"].update(experiment="reliability", system_metrics=False)
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
                    "FINETUNE_CACHE": str(home / "cache"), "GIT_PYTHON_REFRESH": "quiet"}

    def params_file(self, **changes) -> str:
        raw = json.loads(json.dumps(self.params))
        for key, value in changes.items():
            section, name = key.split("__")
            raw[section][name] = value
        path = Path(tempfile.mkstemp(suffix=".yaml", dir=self.home)[1])
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    def args(self, step: str, out: Path | None = None, **kw) -> list[str]:
        h = self.home
        outs = {"data": ["--out", str(out or h / "data")],
                "augment": ["--dataset", str(h / "data"), "--out", str(out or h / "aug")],
                "fetch_pretrained": ["--out", str(out or h / "pre")],
                "finetune": ["--dataset", str(h / "data"), "--policy", str(h / "aug"), "--weights", str(h / "pre"),
                             "--out", str(out or h / "model")],
                "validate": ["--dataset", str(h / "data"), "--policy", str(h / "aug"), "--weights", str(h / "pre"),
                             "--model", str(kw.pop("model", h / "model")), "--out", str(out or h / "val")],
                "register": ["--reports", str(kw.pop("reports", h / "val")),
                             "--out", str(out or h / "registration.json")]}[step]
        return [sys.executable, "-m", f"components.{step}", "--params", self.params_file(**kw), *outs]

    def run(self, step: str, out: Path | None = None, env: dict | None = None, **kw) -> dict:
        started = time.perf_counter()
        proc = subprocess.run(self.args(step, out, **kw), cwd=self.home, capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=900)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]
        error = next((i for i, line in enumerate(lines) if line.startswith(f"{step}: error: ")), None)
        if error is not None:  # the error's line, and how many lines it goes on for (a list of files)
            more = len(lines) - error - 1
            line = lines[error] + (f" (and {more} more line{'s' * (more > 1)}, one per problem)" if more else "")
        else:
            line = lines[-1] if lines else ""
        return {"exit": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
                "line": line, "traceback": "Traceback" in proc.stderr,
                "stdout": proc.stdout.strip().splitlines()[-1:] and proc.stdout.strip().splitlines()[-1],
                "stderr": proc.stderr}

    def debris(self) -> list[str]:
        return sorted(str(p.relative_to(self.home)) for p in self.home.rglob(".*.tmp-*"))


def row(kind: str, done: str, result: dict, left: str) -> None:
    line = result.get("line", "")
    shown = line if result.get("exit") else (result.get("stdout") or line)
    ROWS.append({"kind": kind, "done": done, "exit": result.get("exit"), "seconds": result.get("seconds"),
                 "says": (shown or "")[:220], "traceback": result.get("traceback", False), "left": left})
    print(f"[{len(ROWS):2d}] {kind}: {done} -> exit {result.get('exit')} in {result.get('seconds')} s: "
          f"{(shown or '')[:160]} | {left}", flush=True)


def _mount(folder: Path, *options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=1m", *options]), "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def _kill_when(work: Work, step: str, ready, **kw) -> dict:
    """Start `step`, SIGKILL it once ready() holds (polled every 20 ms); returns how far it got."""
    proc = subprocess.Popen(work.args(step, **kw), cwd=work.home, env=work.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started = time.perf_counter()
    while proc.poll() is None and not ready():
        time.sleep(0.02)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"killed_after_s": round(time.perf_counter() - started, 1), "finished_first": finished}


def bad_inputs(work: Work) -> None:
    bad = work.home / "bad"
    _images(bad, per_class=5)
    (bad / "bars" / "000.png").write_bytes((bad / "bars" / "000.png").read_bytes()[:60])
    (bad / "dots" / "notes.png").write_text("not an image")
    (bad / "empty").mkdir()
    r = work.run("data", out=work.home / "data-bad", data__source=str(bad))
    row("bad input", "data: a truncated PNG, a text file named .png, an empty class folder", r,
        f"output written: {(work.home / 'data-bad').exists()}")
    r = work.run("data", out=work.home / "data-missing", data__source=str(work.home / "nowhere"))
    row("bad input", "data: data.source does not exist", r, "")
    r = work.run("finetune", out=work.home / "model-neg", finetune__lr=-0.1)
    row("bad input", "finetune.lr: -0.1", r, f"model written: {(work.home / 'model-neg').exists()}")
    r = work.run("finetune", out=work.home / "model-nan", finetune__lr=1e6)
    row("bad input", "finetune.lr: 1e6 (training diverges)", r,
        f"model written: {(work.home / 'model-nan').exists()}")
    r = work.run("finetune", out=work.home / "model-typo", finetune__freeze=["layer4"],
                 finetune__unfreeze=[{"epoch": 3, "modules": ["layer5"]}])
    row("bad input", "finetune.unfreeze names module layer5 (a typo)", r,
        f"epochs trained first: {'epoch' in r['stderr'] and 'val_loss=' in r['stderr']}")
    r = work.run("fetch_pretrained", out=work.home / "pre-arch", pretrained__arch="resnet19")
    row("bad input", "pretrained.arch: resnet19", r, "")
    marker = work.home / "code-ran"
    torch.save({"format": checkpoint.FORMAT, "arch": "resnet18", "class_names": ["a"],
                "state_dict": {"x": _RunsCode(marker)}}, work.home / "evil.pt")
    r = work.run("fetch_pretrained", out=work.home / "pre-evil", pretrained__uri=str(work.home / "evil.pt"))
    row("bad input", "pretrained.uri: a checkpoint whose pickle runs a command", r,
        f"command ran: {marker.exists()}")
    r = work.run("fetch_pretrained", out=work.home / "pre-pin", pretrained__sha256="0" * 64)
    row("bad input", "pretrained.sha256 does not match the file", r, "")
    r = work.run("fetch_pretrained", out=work.home / "pre-url", pretrained__sha256="0" * 64,
                 pretrained__uri=f"https://127.0.0.1:9/r18.pt?X-Amz-Credential=AKIA&X-Amz-Signature={SECRET}")
    row("bad input", "pretrained.uri: a presigned https URL, server down", r,
        f"signature in the output: {SECRET in r['stderr']}")


def baseline(work: Work) -> dict:
    times = {}
    for step in ("data", "augment", "fetch_pretrained", "finetune", "validate", "register"):
        r = work.run(step)
        assert r["exit"] == 0, r["stderr"][-2000:]
        times[step] = r["seconds"]
    row("baseline", "the six steps on 240 images, 3 classes (resnet18, 32 px, 5 epochs)",
        {"exit": 0, "seconds": round(sum(times.values()), 1), "stdout": ", ".join(f"{k} {v} s" for k, v in
                                                                                  times.items())}, "")
    return times


def kills(work: Work) -> None:
    h = work.home
    history = model_artifact.read_history(h / "model")
    for step, out in (("data", h / "data"), ("augment", h / "aug"), ("fetch_pretrained", h / "pre")):
        before = sorted(p.name for p in out.iterdir())
        got = _kill_when(work, step, lambda o=out: any(h.glob(f".{o.name}.tmp-*")))
        after = sorted(p.name for p in out.iterdir())
        debris = work.debris()
        r = work.run(step)
        row("kill", f"SIGKILL {step} while it writes ({got['killed_after_s']} s in), then rerun", r,
            f"old output intact: {before == after}; temporaries left by the kill: {len(debris)}, "
            f"after the rerun: {len(work.debris())}")
    ckpt = h / "ckpt" / "last.json"
    got = _kill_when(work, "finetune", lambda: ckpt.exists() and json.loads(ckpt.read_text())["epoch"] >= 2)
    r = work.run("finetune")
    resumed = model_artifact.read_history(h / "model")
    same = [r["val_loss"] for r in resumed] == [r["val_loss"] for r in history]
    row("kill", f"SIGKILL finetune after epoch 2 ({got['killed_after_s']} s in), then rerun", r,
        f"resumed from the checkpoint; validation losses identical to an uninterrupted run: {same}")
    got = _kill_when(work, "finetune", lambda: ckpt.exists() and json.loads(ckpt.read_text())["epoch"] >= 2)
    last = h / "ckpt" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    r = work.run("finetune")
    aside = [p.name for p in (h / "ckpt").glob("last.pt.corrupt-*")]
    notice = next((line for line in r["stderr"].splitlines() if "unreadable" in line), "")
    row("fault", "a truncated checkpoint (last.pt cut to a third), then rerun", {**r, "stdout": notice[:200]},
        f"set aside: {aside}")
    got = _kill_when(work, "validate", lambda: any(h.glob(".val.tmp-*")))
    r = work.run("validate")
    row("kill", f"SIGKILL validate while it writes ({got['killed_after_s']} s in), then rerun", r,
        f"temporaries after the rerun: {len(work.debris())}")
    lock = "reliability--promotion-lock"
    client = mlflow.MlflowClient(work.env["MLFLOW_TRACKING_URI"])

    def holds_lock() -> bool:
        try:
            return client.get_registered_model(lock) is not None
        except mlflow.exceptions.MlflowException:
            return False
    work.run("validate", out=h / "val-3", model=h / "model-3", finetune__seed=3)
    got = _kill_when(work, "register", holds_lock, reports=h / "val-3")
    held = holds_lock()
    r = work.run("register", reports=h / "val-3")
    row("kill", f"SIGKILL register while it holds the promotion lock ({got['killed_after_s']} s in), then rerun", r,
        f"lock left by the kill: {held}; rerun waited {r['seconds']} s in all (lease 30 s)")


def disks(work: Work) -> None:
    h = work.home
    full = h / "full"
    if not _mount(full):
        row("fault", "full disk", {"exit": None}, "skipped: mounting a tmpfs needs root")
    else:
        try:
            r = work.run("fetch_pretrained", out=full / "pre")
            row("fault", "full disk: fetch_pretrained's output on a 1 MiB file system", r,
                f"left on that disk: {sorted(p.name for p in full.iterdir())}")
            r = work.run("finetune", out=full / "model", finetune__checkpoint_dir="")
            row("fault", "full disk: finetune's output on a 1 MiB file system", r,
                f"left on that disk: {sorted(p.name for p in full.iterdir())}")
        finally:
            subprocess.run(["umount", str(full)])
    ro = h / "read-only"
    if not _mount(ro, "ro"):
        row("fault", "read-only output", {"exit": None}, "skipped: mounting a tmpfs needs root")
        return
    try:
        client = mlflow.MlflowClient(work.env["MLFLOW_TRACKING_URI"])
        before = len(client.search_model_versions("name = 'reliability'"))
        work.run("validate", out=h / "val-b", model=h / "model-1", finetune__seed=1)
        r = work.run("register", out=ro / "registration.json", reports=h / "val-b")
        after = len(client.search_model_versions("name = 'reliability'"))
        row("fault", "register's output on a read-only file system", r,
            f"versions registered: {after - before}")
    finally:
        subprocess.run(["umount", str(ro)])


def concurrent(work: Work) -> None:
    """Two registers at once, for two different validated runs, against SQLite and a server."""
    from local_stack import free_port, start_mlflow, stop

    h = work.home
    port = free_port()
    (h / "server").mkdir()
    server = start_mlflow(h / "server", port)
    stores = [("SQLite", work.env["MLFLOW_TRACKING_URI"]), ("an MLflow server", f"http://127.0.0.1:{port}")]
    try:
        for name, uri in stores:
            env = {**work.env, "MLFLOW_TRACKING_URI": uri}
            model = f"concurrent-{'sqlite' if name == 'SQLite' else 'server'}"
            for seed in (1, 2):
                subprocess.run(work.args("validate", out=h / f"val-{seed}", model=h / f"model-{seed}",
                                         finetune__seed=seed), cwd=h, env=env, capture_output=True, check=True)
            procs = [subprocess.Popen(work.args("register", out=h / f"reg-{seed}.json", reports=h / f"val-{seed}",
                                                register__model_name=model), cwd=h, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for seed in (1, 2)]
            started = time.perf_counter()
            codes = [p.wait() for p in procs]
            seconds = round(time.perf_counter() - started, 1)
            client = mlflow.MlflowClient(uri)
            versions = client.search_model_versions(f"name = '{model}'")
            champion = client.get_model_version_by_alias(model, "champion").version
            row("concurrency", f"two registers at once, two runs, against {name}",
                {"exit": max(codes), "seconds": seconds, "stdout": " / ".join(p.stdout.read().strip() for p in procs)},
                f"versions: {len(versions)}; champion: version {champion}")
    finally:
        stop(server.pid)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        work = Work(Path(tmp))
        baseline(work)
        for seed in (1, 2, 3):  # more models: for the concurrency rows and the killed register
            work.run("finetune", out=work.home / f"model-{seed}", finetune__seed=seed, finetune__checkpoint_dir="")
        bad_inputs(work)
        kills(work)
        disks(work)
        concurrent(work)
    out = ROOT / "benchmarks" / "results" / "reliability.json"
    out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "rows": ROWS}, indent=2) + "\n")
    print("\n| kind | what was done | exit | what it says / gives | left behind |\n|---|---|---|---|---|")
    for r in ROWS:
        says = r["says"].replace("|", "\\|") + (" (traceback)" if r["traceback"] else "")
        print(f"| {r['kind']} | {r['done']} | {r['exit']} | {says} | {r['left']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
