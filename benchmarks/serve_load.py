"""The registered model served as the README says, under load: concurrent clients on loopback.

    .venv/bin/python benchmarks/serve_load.py        # = make bench-serve: 1 and 2 workers, 60 s each load (~12 min)
    .venv/bin/python benchmarks/serve_load.py --workers 2 --seconds 20 --clients 8   # a quick look

A resnet18 fine-tuned on 600 real-sized photographs (benchmarks/photos.py, 224 px, 2 epochs) goes
through validate and register as the pipeline runs them (validate's thresholds at 0 and no champion
to compare with: this measures serving, not accuracy), then `mlflow models serve -m
models:/<name>@champion --env-manager local --workers W` on loopback, its processes in a session of
their own. Against each server, in turn:
  single   --clients clients, each sending one test photograph per request, back to back
  batch    the same clients, each request 64 photographs
for --seconds seconds (no request starts later; each client also stops after --max-requests).
A request counts as an error unless it answers 200 with one prediction per photograph. MLflow answers
504 to a request not done within MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (60 s; --request-timeout),
waiting for a thread included.
Reported: requests and photographs per second, p50 and p99 latency, errors, and the peak resident
memory of the server's processes (the sum of each one's peak). Writes
benchmarks/results/serve_load.json and prints a Markdown table. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "infra"))

import photos  # noqa: E402
from local_stack import free_port, session_peak_rss, stop  # noqa: E402

MODEL = "photos-resnet18"


def register_model(work: Path, images: int) -> list[bytes]:
    """The pipeline's steps on the photographs, up to a champion in work/mlflow.db; the test photographs."""
    from components.artifacts import dataset

    raw = photos.make(work / "photos", images)
    params = photos.params(raw, photos.zoo(work / "zoo.pt", "resnet18", raw), "resnet18", "serve-load")
    params["finetune"].update(freeze_until="layer4", reinit=[], max_epochs=2, patience=2, warmup_epochs=0,
                              checkpoint_dir="")
    params["validate"].update(min_accuracy=0.0, min_macro_f1=0.0, min_class_recall=0.0, compare_with_champion=False)
    params["register"].update(model_name=MODEL, alias="champion")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = photos.env(work)
    p = ["--params", str(work / "params.yaml")]
    inputs = ["--dataset", str(work / "data"), "--policy", str(work / "aug"), "--weights", str(work / "pre")]
    for step, args in (("data", ["--out", str(work / "data")]),
                       ("augment", ["--dataset", str(work / "data"), "--out", str(work / "aug")]),
                       ("fetch_pretrained", ["--out", str(work / "pre")]),
                       ("finetune", [*inputs, "--out", str(work / "model")]),
                       ("validate", [*inputs, "--model", str(work / "model"), "--out", str(work / "validate")]),
                       ("register", ["--reports", str(work / "validate"), "--out", str(work / "registration.json")])):
        r = photos.run_step(step, p + args, env, work)
        print(f"{step}: {r['s']:.1f} s", flush=True)
    return [dataset.read_bytes(image) for image in dataset.images(work / "data", "test")]


def serve(work: Path, workers: int, log: Path, timeout_s: int | None) -> tuple[subprocess.Popen, str]:
    """The README's serve command (`mlflow models serve` from this environment, uvicorn on PATH); with
    `timeout_s`, MLflow's per-request limit (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s by default)."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        cwd=work, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**photos.env(work), "PATH": f"{bin_dir}:{os.environ['PATH']}",
             **({"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(timeout_s)} if timeout_s else {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"serve_load: the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def load(url: str, bodies: list[tuple[bytes, int]], clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` threads posting `bodies` (each with its photograph count) back to back until `seconds` pass."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    started = time.perf_counter()
    deadline = started + seconds

    def client(k: int) -> None:
        for i in range(max_requests):
            if time.perf_counter() >= deadline:
                return
            body, count = bodies[(k * 7 + i) % len(bodies)]
            request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=300) as r:
                    answer = json.load(r)
                ok = len(answer.get("predictions", [])) == count
                error = None if ok else f"{count} photographs, {len(answer.get('predictions', []))} predictions"
            except urllib.error.HTTPError as err:
                error = f"HTTP {err.code}: {err.read()[:200]!r}"
            except OSError as err:
                error = f"{type(err).__name__}: {err}"
            with lock:
                if error:
                    errors.append(error)
                else:
                    latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    images = len(latencies) * bodies[0][1]
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": len(latencies), "errors": len(errors), "error_examples": sorted(set(errors))[:3],
            "elapsed_s": elapsed, "requests_per_s": len(latencies) / elapsed, "images_per_s": images / elapsed,
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-requests", type=int, default=10_000, help="per client")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--request-timeout", type=int, help="the server's limit per request, s (MLflow: 60)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        tests = register_model(work, args.images)
        encoded = [base64.b64encode(b).decode() for b in tests]

        def body(rows: list[str]) -> bytes:
            return json.dumps({"inputs": {"image": rows}}).encode()

        loads = {"single": [(body([e]), 1) for e in encoded],
                 f"batch of {args.batch}": [(body([encoded[(i + j) % len(encoded)] for j in range(args.batch)]),
                                             args.batch) for i in range(0, len(encoded), 7)]}
        results = []
        for workers in args.workers:
            proc, url = serve(work, workers, work / f"serve-{workers}.log", args.request_timeout)
            try:
                for name, bodies in loads.items():
                    r = load(url, bodies, args.clients, args.seconds, args.max_requests)
                    r.update(workers=workers, load=name, clients=args.clients,
                             server_peak_mib=session_peak_rss(proc.pid) / 2**20, server_alive=proc.poll() is None)
                    results.append(r)
                    print(f"workers {workers}, {name}: {r['requests_per_s']:.1f} requests/s, "
                          f"{r['images_per_s']:.1f} photos/s, p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, "
                          f"errors {r['errors']} {r['error_examples']}, server peak {r['server_peak_mib']:.0f} MiB",
                          flush=True)
            finally:
                stop(proc.pid)
                proc.wait()
    args.out.write_text(json.dumps({"cores": os.cpu_count(), "clients": args.clients, "seconds": args.seconds,
                                    "request_timeout_s": args.request_timeout or 60, "results": results}, indent=2) + "\n")
    print("\n| workers | request | requests/s | photos/s | p50 s | p99 s | errors | server peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['load']} | {r['requests_per_s']:.1f} | {r['images_per_s']:.1f} | "
              f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['errors']} | {r['server_peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
