"""How the pipeline's cost grows with the number of images, and a dataset larger than the fine-tune's memory.

    .venv/bin/python benchmarks/scale.py        # = make bench-scale, and the end of make bench-speed (~60 min)
    .venv/bin/python benchmarks/scale.py --images 500 1000 --memory-limit-mib 0   # a quick look, no limit run

For each size: real-sized JPEGs (benchmarks/photos.py, 500x375), then the steps as the pipeline runs
them, each in its own process: data (one decode worker per core), augment, fetch_pretrained,
finetune (resnet18 at 224 px, frozen up to layer4, --epochs, params.yaml's speed levers) and validate
(the test split, bootstrap and pictures included). For each step: wall time, time per image
(data: every image; finetune: each training image each epoch; validate: each test image) and the peak
resident memory of the step's process tree, all of it and the anonymous part (what the processes
hold themselves; the rest is files mapped in, such as the fine-tune's feature cache, which the
kernel drops and reads again under pressure). A line fitted through the sizes splits each step into
start-up seconds and seconds per image.

Then the largest size's fine-tune again inside a memory cgroup of --memory-limit-mib (cgroup v1 or
v2, created under this process's own): its dataset and feature cache are several times that, so it
trains only if they stream from disk. Its time against the unlimited run's is the cost.
Writes benchmarks/results/scale.json and prints a Markdown table. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import photos  # noqa: E402

ARCH, FROZEN = "resnet18", "layer4"


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@contextmanager
def memory_cgroup(limit_bytes: int):
    """A memory cgroup of `limit_bytes` (no swap) under this process's own; yields (command prefix that
    runs a command inside it, function reading its peak usage and OOM kills)."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    name = f"bench-scale-{os.getpid()}"
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # v2
        own = next(line.split("::", 1)[1] for line in lines if line.startswith("0::"))
        cg = Path("/sys/fs/cgroup") / own.lstrip("/") / name
        cg.mkdir()
        (cg / "memory.max").write_text(str(limit_bytes))
        (cg / "memory.swap.max").write_text("0")

        def usage():
            events = dict(line.split() for line in (cg / "memory.events").read_text().splitlines())
            return {"peak_bytes": int((cg / "memory.peak").read_text()), "oom_kills": int(events["oom_kill"])}
    else:  # v1
        own = next(line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory")
        cg = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / name
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(limit_bytes))

        def usage():
            oom = dict(line.split() for line in (cg / "memory.oom_control").read_text().splitlines())
            return {"peak_bytes": int((cg / "memory.max_usage_in_bytes").read_text()),
                    "oom_kills": int(oom.get("oom_kill", 0)), "limit_hits": int((cg / "memory.failcnt").read_text())}
    try:
        yield ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"], usage
    finally:
        cg.rmdir()


def finetune_args(work: Path, out: str) -> list[str]:
    return ["--dataset", str(work / "data"), "--policy", str(work / "aug"), "--weights", str(work / "pre"),
            "--out", str(work / out)]


def run_size(work: Path, n: int, zoo: Path, epochs: int, batch: int) -> dict:
    from components.artifacts import dataset, reports
    from components.artifacts import model as model_artifact

    raw = work / "photos"
    began = time.perf_counter()
    photos.make(raw, n)
    print(f"{n} photos: made in {time.perf_counter() - began:.0f} s, {_folder_bytes(raw) / 2**20:.0f} MiB",
          flush=True)
    params = photos.params(raw, zoo, ARCH, "scale")
    params["finetune"].update({"freeze": [], "freeze_until": FROZEN, "reinit": [], "unfreeze": [], "lr_groups": [],
                               "lr": 0.01, "optimizer": "sgd", "schedule": "constant", "warmup_epochs": 0,
                               "batch_size": batch, "max_epochs": epochs, "patience": epochs, "checkpoint_dir": ""})
    params["validate"].update(compare_with_champion=False)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**photos.env(work), "TMPDIR": str(work / "tmp")}  # the feature cache's files land here
    (work / "tmp").mkdir(exist_ok=True)
    p = ["--params", str(work / "params.yaml")]
    steps = {
        "data": ["--out", str(work / "data")],
        "augment": ["--dataset", str(work / "data"), "--out", str(work / "aug")],
        "fetch_pretrained": ["--out", str(work / "pre")],
        "finetune": finetune_args(work, "model"),
        "validate": ["--dataset", str(work / "data"), "--policy", str(work / "aug"), "--weights", str(work / "pre"),
                     "--model", str(work / "model"), "--out", str(work / "validate")],
    }
    result = {"images": n, "photo_mib": _folder_bytes(raw) / 2**20, "steps": {}}
    for step, args in steps.items():
        r = photos.run_step(step, p + args, env, work)
        r.pop("output")
        result["steps"][step] = r
        print(f"{n} photos: {step} {r['s']:.1f} s, peak {r['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"({r['peak_anon_bytes'] / 2**20:.0f} MiB anonymous)", flush=True)
    n_train, n_test = (len(dataset.images(work / "data", split)) for split in ("train", "test"))
    per = {"data": n, "finetune": n_train * epochs, "validate": n_test}
    for step, count in per.items():
        result["steps"][step]["per_image_ms"] = 1000 * result["steps"][step]["s"] / count
        result["steps"][step]["images"] = count
    result["val_accuracy"] = model_artifact.read_history(work / "model")[-1]["val_accuracy"]
    result["test_accuracy"] = reports.read_metrics(work / "validate")["accuracy"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--memory-limit-mib", type=int, default=1536,
                        help="the larger-than-memory run's cgroup limit; 0: no such run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--work", type=Path, help="keep the generated data here (default: a temporary folder)")
    args = parser.parse_args(argv)

    from components.artifacts import dataset

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-scale-")
    base = args.work or Path(tmp.name)
    base.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.images)
    first = base / "calibration"
    photos.make(first, min(sizes[0], 600))
    zoo = photos.zoo(base / "zoo.pt", ARCH, first)
    results = []
    for n in sizes:
        work = base / str(n)
        results.append(run_size(work, n, zoo, args.epochs, args.batch))
        if n != sizes[-1]:  # only the largest is kept for the memory-limited run
            shutil.rmtree(work)
    fits = {}
    if len(sizes) > 1:
        for step in ("data", "finetune", "validate"):  # augment and fetch_pretrained do not read the images
            counts = [r["steps"][step].get("images", r["images"]) for r in results]
            seconds = [r["steps"][step]["s"] for r in results]
            per_image, start_up = np.polyfit(counts, seconds, 1)
            fits[step] = {"start_up_s": float(start_up), "per_image_ms": float(per_image * 1000)}
    limited = None
    if args.memory_limit_mib:
        work = base / str(sizes[-1])
        env = {**photos.env(work), "TMPDIR": str(work / "tmp")}
        with memory_cgroup(args.memory_limit_mib * 2**20) as (wrap, usage):
            r = photos.run_step("finetune", ["--params", str(work / "params.yaml"), *finetune_args(work, "model-limited")],
                                env, work, wrap=wrap)
            r.pop("output")
            r.update(usage())
        free = results[-1]["steps"]["finetune"]["s"]
        n_train = results[-1]["steps"]["finetune"]["images"] // args.epochs
        n_val = len(dataset.images(work / "data", "val"))
        features = (n_train * min(args.epochs, 5) + n_val) * 256 * 14 * 14 * 2  # float16 layer3 maps, one per copy
        limited = {"images": sizes[-1], "limit_mib": args.memory_limit_mib, **r, "over_unlimited": r["s"] / free,
                   "photo_mib": results[-1]["photo_mib"], "feature_cache_mib": features / 2**20}
        print(f"{sizes[-1]} photos under {args.memory_limit_mib} MiB: finetune {r['s']:.1f} s "
              f"({r['s'] / free:.2f}x unlimited), cgroup peak {r['peak_bytes'] / 2**20:.0f} MiB, "
              f"OOM kills {r['oom_kills']}", flush=True)
    args.out.write_text(json.dumps({"cores": os.cpu_count(), "epochs": args.epochs, "batch": args.batch,
                                    "results": results, "fits": fits, "memory_limited": limited}, indent=2) + "\n")
    print("\n| images | step | s | ms per image | peak MiB (anonymous) |")
    print("|---|---|---|---|---|")
    for r in results:
        for step, s in r["steps"].items():
            per = f"{s['per_image_ms']:.1f}" if "per_image_ms" in s else ""
            print(f"| {r['images']} | {step} | {s['s']:.1f} | {per} | {s['peak_rss_bytes'] / 2**20:.0f} "
                  f"({s['peak_anon_bytes'] / 2**20:.0f}) |")
    for step, f in fits.items():
        print(f"fit {step}: {f['start_up_s']:.1f} s + {f['per_image_ms']:.2f} ms per image")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
