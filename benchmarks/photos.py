"""What the speed, scale and serving benchmarks share: real-sized photographs, a zoo checkpoint made
from nothing downloaded, the pipeline's parameters for them, and a step run as its own measured process.

Photographs: JPEGs of 500x375 (quality 85-95) cut from the two photographs scikit-learn ships, 12
classes (6 regions of each photo, with jittered position and scale). Zoo: a randomly initialised
network whose BatchNorm statistics are measured on 256 of the photos (as a pretrained network has
them for its data).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
SIZE = (500, 375)


def make(root: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    photos = {name: Image.fromarray(load_sample_image(f"{name}.jpg")) for name in ("china", "flower")}  # 640x427
    classes = [(name, cx, cy) for name in photos for cx in (0.25, 0.5, 0.75) for cy in (0.3, 0.7)]
    for i in range(n):
        name, cx, cy = classes[i % len(classes)]
        photo = photos[name]
        w = int(photo.width * rng.uniform(0.35, 0.5))
        h = int(w * 0.75)
        x = int(np.clip(cx * photo.width + rng.normal(0, 20) - w / 2, 0, photo.width - w))
        y = int(np.clip(cy * photo.height + rng.normal(0, 15) - h / 2, 0, photo.height - h))
        folder = root / f"{name}-{cx}-{cy}"
        folder.mkdir(parents=True, exist_ok=True)
        crop = photo.crop((x, y, x + w, y + h)).resize(SIZE, Image.BICUBIC)
        crop.save(folder / f"{i:05d}.jpg", quality=int(rng.integers(85, 96)))
    return root


def _calibrate_batchnorm(net, photos: Path, n: int = 256) -> None:
    """BatchNorm statistics measured on the photos: with the initial 0/1 statistics a frozen random
    network's features are badly scaled, and the tutorial recipe (BatchNorm in train mode) would win on
    that alone."""
    import torch
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    files = sorted(photos.rglob("*.jpg"))
    files = files[::max(1, len(files) // n)][:n]
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for start in range(0, len(files), 32):
            net(torch.stack([tf(Image.open(f).convert("RGB")) for f in files[start:start + 32]]))
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    net.eval()


def zoo(path: Path, arch: str, photos: Path) -> Path:
    """The zoo checkpoint of `arch` (1000 classes), made once."""
    if not path.exists():
        import torch

        from components.artifacts import checkpoint
        from components.models import architectures as models

        torch.manual_seed(0)
        net = models.build(arch, 1000)
        _calibrate_batchnorm(net, photos)
        torch.save({"format": checkpoint.FORMAT, "arch": arch, "class_names": [str(i) for i in range(1000)],
                    "state_dict": net.state_dict()}, path)
    return path


def params(photos: Path, zoo_uri: str | Path, arch: str, experiment: str) -> dict:
    """params.yaml for the photographs at 224 px: ImageNet-style augmentation, the zoo file, no system metrics."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(source=str(photos))
    p["augment"].update(image_size=224, resize_scale=[0.08, 1.0], resize_ratio=[0.75, 4 / 3], hflip=0.5,
                        rotation=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    p["pretrained"].update(uri=str(zoo_uri), arch=arch, sha256="")
    p["tracking"].update(experiment=experiment, system_metrics=False)
    return p


def env(work: Path) -> dict:
    """The steps' environment: this checkout importable, MLflow in a SQLite file under `work`."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
            "FINETUNE_CACHE": str(work / "cache")}


def _tree_memory(pid: int) -> tuple[int, int]:
    """Resident bytes of process `pid` and its descendants: (all, anonymous). Anonymous memory is what
    the processes themselves hold; the rest is files mapped in (the feature cache, libraries), which
    the kernel can drop and read again."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total = anon = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if line.startswith(("VmRSS", "RssAnon")))
        except OSError:
            continue
        total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
    return total, anon


def run_step(step: str, args: list[str], env: dict, cwd: Path, wrap: list[str] | None = None) -> dict:
    """`python -m components.<step> args` as its own process (under `wrap`, e.g. a memory limit): wall
    seconds and the peak resident memory of its process tree, sampled every 50 ms."""
    started = time.perf_counter()
    proc = subprocess.Popen([*(wrap or []), sys.executable, "-m", f"components.{step}", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "anon": 0}

    def sample():
        while proc.poll() is None:
            rss, anon = _tree_memory(proc.pid)
            peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    seconds = time.perf_counter() - started
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{step} exited {proc.returncode}:\n{output[-3000:]}")
    return {"s": seconds, "peak_rss_bytes": peak["rss"], "peak_anon_bytes": peak["anon"], "output": output}
