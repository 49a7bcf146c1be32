"""How fast does the data step validate a real-sized dataset, and in how much memory?

    .venv/bin/python benchmarks/data_throughput.py                  # 20,000 JPEGs of 500x375
    .venv/bin/python benchmarks/data_throughput.py --images 2000    # a quick look

Generates the JPEGs (10 classes) in a temporary folder, then measures in one run:
  verify loop   one process: Image.open(f).verify() per file (reads headers only: it passes a
                truncated JPEG, see below)
  decode loop   one process: Image.open(f).load() per file (decodes every pixel)
  data step     components.data.prepare on the folder with one worker per core: read, hash,
                fully decode, split and copy every file into the dataset artifact
Peak memory is the resident set of the data step's whole process tree, sampled every 20 ms.
Writes benchmarks/results/data_throughput.json. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.config import load_params, override  # noqa: E402
from components.data import prepare  # noqa: E402


def _make(args) -> None:
    path, seed = args
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 500)[None, :, None] * rng.uniform(80, 255, 3)
    img = (ramp + rng.normal(0, 18, (375, 500, 3))).clip(0, 255).astype(np.uint8)  # photo-like entropy
    Image.fromarray(img).save(path, "JPEG", quality=85)


def generate(root: Path, n: int) -> list[Path]:
    paths = [root / f"class{i % 10}" / f"img{i:06d}.jpg" for i in range(n)]
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_make, [(p, i) for i, p in enumerate(paths)], chunksize=64))
    return paths


def timed_loop(paths: list[Path], decode: bool) -> float:
    start = time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            img.load() if decode else img.verify()
    return len(paths) / (time.perf_counter() - start)


class PeakRSS(threading.Thread):
    """Largest sum of RSS over this process and its children, sampled until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self):
        me = psutil.Process()
        while self.running:
            try:
                total = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(0.02)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        began = time.time()
        paths = generate(root, args.images)
        size_mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"generated {len(paths)} JPEGs, {size_mb:.0f} MiB, in {time.time() - began:.0f} s", file=sys.stderr)

        verify = timed_loop(paths, decode=False)
        decode = timed_loop(paths, decode=True)
        monitor = PeakRSS()
        monitor.start()
        start = time.perf_counter()
        cfg = override(load_params(ROOT / "params.yaml").data, source=str(root), repo="", rev="", classes=[],
                       workers=cores)
        prepare(root, Path(tmp) / "dataset", cfg)
        step = len(paths) / (time.perf_counter() - start)
        monitor.running = False
        monitor.join()

        data = (root / "class0" / "img000000.jpg").read_bytes()
        truncated = io.BytesIO(data[: len(data) // 2])
        try:
            Image.open(truncated).verify()
            verify_catches_truncation = False
        except Exception:
            verify_catches_truncation = True

    result = {
        "images": len(paths), "size_mib": round(size_mb), "cores": cores,
        "verify_loop_images_per_s": round(verify), "decode_loop_images_per_s": round(decode),
        "data_step_images_per_s": round(step), "data_step_images_per_s_per_core": round(step / cores),
        "data_step_peak_rss_mib": round(monitor.peak / 2**20),
        "verify_loop_catches_truncated_jpeg": verify_catches_truncation,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
