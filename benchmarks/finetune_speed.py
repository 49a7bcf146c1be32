"""How fast is the fine-tune step? The tutorial recipe, the training step's bound, and ours.

    .venv/bin/python benchmarks/finetune_speed.py       # or make bench-speed: resnet18, 1200 photos, 2 epochs, 3 runs
    .venv/bin/python benchmarks/finetune_speed.py --images 3000 --epochs 2 10 --archs resnet18 mobilenet_v3_large
    .venv/bin/python benchmarks/finetune_speed.py --set prefix_copies=1 --out /tmp/copies1.json  # another lever setting

Data: real-sized JPEGs (500x375, quality 85-95) cut from the two photographs scikit-learn ships,
12 classes (6 regions of each photo, with jittered position and scale); split by the data step.
The same zoo checkpoint for every run (no downloads): a randomly initialised network whose BatchNorm
statistics are measured on 256 of the photos, frozen up to layer4 (resnet18) or features.13.
  baseline  the tutorial recipe as most users write it: per-sample PIL transforms (RandomResizedCrop
            224, flip, ToTensor, Normalize) in a DataLoader, fp32, NCHW, frozen parameters by
            requires_grad=False with the model in train mode, SGD with momentum, evaluation each epoch
  ours      `python -m components.finetune` as the pipeline runs it (params.yaml's levers, MLflow on)
  bound     the same model's training step on tensors already in memory, in the precision
            finetune.precision picks here: the time a step through the whole model cannot beat
Same architecture, frozen layers, batch size, epochs, augmentation and threads for all; runs
interleaved (baseline, ours, baseline, ...), each in a fresh process. Prints a Markdown table,
writes benchmarks/results/finetune_speed.json. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = (500, 375)
FROZEN = {"resnet18": "layer4", "mobilenet_v3_large": "features.13"}  # train the last blocks and the head


def make_photos(root: Path, n: int, seed: int = 0) -> Path:
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
    """BatchNorm statistics measured on the photos, as a pretrained network has them for its data: with
    the initial 0/1 statistics a frozen random network's features are badly scaled, and the tutorial
    recipe (BatchNorm in train mode) would win on that alone."""
    import torch
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    files = sorted(photos.rglob("*.jpg"))[::max(1, len(list(photos.rglob("*.jpg"))) // n)][:n]
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


def prepare(work: Path, images: int, arch: str) -> dict:
    """The data, augment and fetch_pretrained outputs every run of `arch` shares."""
    import torch
    import yaml

    from components.artifacts import checkpoint
    from components.models import architectures as models

    raw = work / "photos"
    if not raw.exists():
        make_photos(raw, images)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source=str(raw))
    params["augment"].update(image_size=224, resize_scale=[0.08, 1.0], resize_ratio=[0.75, 4 / 3], hflip=0.5,
                             rotation=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    zoo = work / f"{arch}-zoo.pt"
    if not zoo.exists():
        torch.manual_seed(0)
        net = models.build(arch, 1000)
        _calibrate_batchnorm(net, raw)
        torch.save({"format": checkpoint.FORMAT, "arch": arch, "class_names": [str(i) for i in range(1000)],
                    "state_dict": net.state_dict()}, zoo)
    params["pretrained"].update(uri=str(zoo), arch=arch, sha256="")
    params["tracking"].update(experiment="finetune-speed", system_metrics=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "FINETUNE_CACHE": str(work / "cache")}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for step, args in (("data", ["--out", str(work / "data")]),
                       ("augment", ["--dataset", str(work / "data"), "--out", str(work / "aug")]),
                       ("fetch_pretrained", ["--out", str(work / f"pre-{arch}")])):
        if not (work / args[-1]).exists():
            subprocess.run([sys.executable, "-m", f"components.{step}", "--params", str(work / "params.yaml"), *args],
                           check=True, env=env, cwd=work, capture_output=True)
    return {"params": params, "env": env}


def run_ours(work: Path, setup: dict, arch: str, epochs: int, batch: int, frozen: str, threads: int,
             changes: dict | None = None) -> dict:
    import yaml

    params = json.loads(json.dumps(setup["params"]))
    params["finetune"].update(freeze=[], freeze_until=frozen, reinit=[], unfreeze=[], lr_groups=[], lr=0.01,
                              optimizer="sgd", schedule="constant", warmup_epochs=0, batch_size=batch,
                              max_epochs=epochs, patience=epochs, checkpoint_dir="", num_workers=0,
                              **(changes or {}))
    path = work / f"ours-{arch}-{epochs}.yaml"
    path.write_text(yaml.safe_dump(params))
    out = work / f"model-{arch}-{epochs}"
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", sys.executable, "-m", "components.finetune",
                           "--params", str(path), "--dataset", str(work / "data"), "--policy", str(work / "aug"),
                           "--weights", str(work / f"pre-{arch}"), "--out", str(out)],
                          env={**setup["env"], "OMP_NUM_THREADS": str(threads)}, cwd=work, capture_output=True,
                          text=True)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    from components.artifacts import model as model_artifact

    history = model_artifact.read_history(out)
    rss = int(proc.stderr.rsplit("maxrss_kb=", 1)[1].split()[0]) * 1024
    return {"total_s": total, "val_accuracy": history[-1]["val_accuracy"], "peak_bytes": rss,
            "epoch_s": [b["time"] - a["time"] for a, b in zip(history, history[1:])]}


def baseline_main(args) -> None:
    """One baseline run, in this (fresh) process; prints its JSON result."""
    import torch
    import torchvision
    from PIL import Image
    from torch import nn
    from torchvision import transforms

    from components.artifacts import dataset, weights
    from components.models import architectures as models

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classes = dataset.read_report(args.data)["classes"]
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                 normalize])

    class Files(torch.utils.data.Dataset):
        def __init__(self, split, tf):
            self.items = [(p, classes.index(label)) for p, label, _ in dataset.images(args.data, split)]
            self.tf = tf

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            path, label = self.items[i]
            return self.tf(Image.open(path).convert("RGB")), label

    train = torch.utils.data.DataLoader(Files("train", train_tf), batch_size=args.batch, shuffle=True,
                                        num_workers=2)
    val = torch.utils.data.DataLoader(Files("val", val_tf), batch_size=args.batch, num_workers=2)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=1000)
    model.load_state_dict(weights.load(args.weights).state_dict)
    head = models.head_name(model)
    parent, _, leaf = head.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, leaf, nn.Linear(getattr(owner, leaf).in_features, len(classes)))
    frozen = tuple(f"{name}." for name in models.modules_before(model, args.frozen))  # the same layers as ours
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(frozen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    epoch_s, acc = [], 0.0
    for _ in range(args.epochs):
        t = time.perf_counter()
        model.train()
        for x, y in train:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in val:
                correct += (model(x).argmax(1) == y).sum().item()
                seen += len(y)
        acc = correct / seen
        epoch_s.append(time.perf_counter() - t)
    print(json.dumps({"total_s": time.perf_counter() - started, "epoch_s": epoch_s, "val_accuracy": acc,
                      "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_baseline(work: Path, setup: dict, arch: str, epochs: int, batch: int, frozen: str, threads: int) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", sys.executable, __file__, "--baseline-run",
                           "--data", str(work / "data"), "--weights", str(work / f"pre-{arch}"),
                           "--arch", arch, "--frozen", frozen, "--epochs", str(epochs), "--batch", str(batch),
                           "--threads", str(threads)], env={**setup["env"], "OMP_NUM_THREADS": str(threads)},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["total_s"] = time.perf_counter() - started  # the whole process, as for ours
    result["peak_bytes"] = int(proc.stderr.rsplit("maxrss_kb=", 1)[1].split()[0]) * 1024  # the largest process
    return result


def bound(arch: str, frozen: str, batch: int, threads: int, classes: int) -> dict:
    """Images per second of the whole model's training step on in-memory tensors (frozen as configured)."""
    import torch
    from torch import nn

    from components.models import architectures as models
    from components.training.distributed import precision

    torch.set_num_threads(threads)
    model = models.build(arch, classes)
    models.freeze(model, models.modules_before(model, frozen))
    model.train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    bf16 = precision("auto", "cpu") == "bf16"

    def step():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
    step()
    started, n = time.perf_counter(), 5
    for _ in range(n):
        step()
    return {"images_per_s": batch * n / (time.perf_counter() - started), "precision": "bf16" if bf16 else "fp32"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--epochs", type=int, nargs="+", default=[2])
    parser.add_argument("--archs", nargs="+", default=["resnet18"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a finetune setting for ours only, e.g. prefix_copies=1 (YAML value; repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_speed.json")
    parser.add_argument("--work", type=Path, help="keep the generated data here (default: a temporary folder)")
    parser.add_argument("--baseline-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--frozen", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_run:
        args.epochs = args.epochs[0]
        baseline_main(args)
        return 0

    import functools

    import yaml

    from components.artifacts import dataset

    changes = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    ours_name = "ours" + (f" ({', '.join(args.set)})" if args.set else "")

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="finetune-speed-")
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for arch in args.archs:
        setup = prepare(work, args.images, arch)
        n_train = len(dataset.images(work / "data", "train"))
        top = bound(arch, FROZEN[arch], args.batch, args.threads, 12)
        for epochs in args.epochs:
            runs = {"baseline": [], ours_name: []}
            for r in range(args.repeats):
                for variant, fn in (("baseline", run_baseline), (ours_name, functools.partial(run_ours,
                                                                                             changes=changes))):
                    res = fn(work, setup, arch, epochs, args.batch, FROZEN[arch], args.threads)
                    runs[variant].append(res)
                    print(f"{arch} {epochs} epochs run {r + 1} {variant}: {res['total_s']:.1f} s, "
                          f"val acc {res['val_accuracy']:.3f}, peak {res['peak_bytes'] / 2**20:.0f} MiB", flush=True)
            bound_s = n_train * epochs / top["images_per_s"]
            for variant, rs in runs.items():
                totals = [r["total_s"] for r in rs]
                results.append({
                    "arch": arch, "frozen_until": FROZEN[arch], "epochs": epochs, "variant": variant,
                    "train_images": n_train, "total_s_median": statistics.median(totals),
                    "total_s_spread": [min(totals), max(totals)],
                    "images_per_s": n_train * epochs / statistics.median(totals),
                    "peak_mib": max(r["peak_bytes"] for r in rs) / 2**20,
                    "val_accuracy": [r["val_accuracy"] for r in rs], "runs": rs})
            base, ours = (next(x for x in results[-2:] if x["variant"] == v) for v in ("baseline", ours_name))
            results.append({"arch": arch, "epochs": epochs, "variant": "bound", "train_images": n_train,
                            "total_s_median": bound_s, "images_per_s": top["images_per_s"],
                            "precision": top["precision"],
                            "baseline_over_ours": base["total_s_median"] / ours["total_s_median"],
                            "ours_over_bound": ours["total_s_median"] / bound_s})
    out = args.out
    out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "images": args.images,
                               "repeats": args.repeats, "results": results}, indent=2) + "\n")
    print("\n| arch | epochs | run | total s (median, spread) | train img/s | peak MiB | val accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["variant"] == "bound":
            print(f"| {r['arch']} | {r['epochs']} | bound ({r['precision']}, training step only) | "
                  f"{r['total_s_median']:.1f} | {r['images_per_s']:.1f} | | baseline/ours "
                  f"{r['baseline_over_ours']:.2f}x, ours/bound {r['ours_over_bound']:.2f} |")
        else:
            lo, hi = r["total_s_spread"]
            print(f"| {r['arch']} | {r['epochs']} | {r['variant']} | {r['total_s_median']:.1f} ({lo:.1f}-{hi:.1f}) | "
                  f"{r['images_per_s']:.1f} | {r['peak_mib']:.0f} | "
                  f"{' '.join(f'{a:.3f}' for a in r['val_accuracy'])} |")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
