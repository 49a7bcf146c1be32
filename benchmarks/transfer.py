"""Does transfer learning pay on the default task? Zoo checkpoint vs random initialisation.

    .venv/bin/python benchmarks/transfer.py            # or make bench-transfer: about 2 minutes on 2 cores
    .venv/bin/python benchmarks/transfer.py --epochs 12 --fractions 0.1 0.3 1.0

The source model is trained on digits 0-4 exactly as the demo zoo does (demo section of
params.yaml); the target is digits 5-9 with 10%, 30% and 100% of its training images. Each
fraction is fine-tuned three times with the same budget (epochs, optimiser, learning rate,
schedule, augmentation), all with a new output layer:
  transfer   the finetune section as it is (freezing, and re-initialising finetune.reinit)
  keep-all   the same, but every zoo layer kept (finetune.reinit empty)
  scratch    the same architecture from random initialisation, every layer trainable
  probe      (with --probe) every zoo layer kept and frozen, only the new output layer trained
Early stopping is off so every curve runs the whole budget. Prints a Markdown table and writes benchmarks/results/transfer.json
and transfer.png. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.artifacts import dataset, model as model_artifact  # noqa: E402
from components.augment import augment  # noqa: E402
from components.config import load_params, override  # noqa: E402
from components.data import prepare  # noqa: E402
from components.fetch_pretrained import fetch  # noqa: E402
from components.finetune import finetune  # noqa: E402
from components.storage.atomic import write_json  # noqa: E402
from demo.digits import export_digits  # noqa: E402
from demo.zoo import publish_source_model  # noqa: E402

RUNS = ("transfer", "keep-all", "scratch")


def subsample(folder: Path, out: Path, fraction: float) -> int:
    """A copy of the dataset artifact keeping `fraction` of each class's training images."""
    train = dataset.rows(folder, "train")
    total = {label: sum(1 for r in train if r.label == label) for label in {r.label for r in train}}
    kept, seen = set(), {}
    for r in train:  # manifest order is file order: a deterministic subset
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] <= max(1, round(fraction * total[r.label])):
            kept.add(r.path)
    dataset.subset(folder, out, lambda r: r.split != "train" or r.path in kept)
    return len(kept)


def epochs_to(history: list[dict], target: float) -> int | None:
    return next((r["epoch"] for r in history if r["val_accuracy"] >= target), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="training budget for every run")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0],
                        help="shares of the target training images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--probe", action="store_true", help="add a linear probe of the zoo's features")
    args = parser.parse_args(argv)
    runs = RUNS + (("probe",) if args.probe else ())
    params = load_params(ROOT / "params.yaml")
    ft = params.finetune.model_copy(update={"max_epochs": args.epochs, "patience": args.epochs + 1,
                                            "checkpoint_dir": ""})
    start = time.time()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        export_digits(params.demo.source_classes, t / "source")
        export_digits(params.demo.target_classes, t / "target")
        publish_source_model(t / "source", t / "zoo.pt", params)
        prepare(t / "target", t / "data", override(params.data, source=str(t / "target")))
        augment(t / "data", t / "aug", params.augment)
        fetch(override(params.pretrained, uri=str(t / "zoo.pt"), arch=params.demo.arch, sha256=""), t / "zoo")
        scratch_ckpt = t / "random.pt"
        import torch

        from components.artifacts import checkpoint
        from components.models import architectures as models
        torch.manual_seed(params.finetune.seed)
        torch.save({"format": checkpoint.FORMAT, "arch": params.demo.arch,
                    "class_names": [str(c) for c in params.demo.target_classes],
                    "state_dict": models.build(params.demo.arch, len(params.demo.target_classes)).state_dict()},
                   scratch_ckpt)
        fetch(override(params.pretrained, uri=str(scratch_ckpt), arch=params.demo.arch, sha256=""), t / "random")

        for fraction in args.fractions:
            data = t / f"data-{fraction}"
            n_train = subsample(t / "data", data, fraction)
            row = {"fraction": fraction, "train_images": n_train}
            for name, weights, cfg in (("transfer", t / "zoo", ft),
                                       ("keep-all", t / "zoo", ft.model_copy(update={"reinit": []})),
                                       ("scratch", t / "random", ft.model_copy(update={
                                           "freeze": [], "freeze_until": "", "unfreeze": [], "reinit": []})),
                                       ("probe", t / "zoo", ft.model_copy(update={
                                           "freeze": [], "freeze_until": "fc", "unfreeze": [], "reinit": []}))):
                if name not in runs:
                    continue
                began = time.time()
                finetune(data, t / "aug", weights, t / f"{name}-{fraction}", cfg)
                history = model_artifact.read_history(t / f"{name}-{fraction}")
                row[name] = {"val_accuracy": [round(r["val_accuracy"], 4) for r in history],
                             "best": max(r["val_accuracy"] for r in history), "seconds": round(time.time() - began, 1)}
            target = 0.95 * max(row[name]["best"] for name in runs)
            for name in runs:
                curve = [{"epoch": i + 1, "val_accuracy": a} for i, a in enumerate(row[name]["val_accuracy"])]
                row[name]["epochs_to_95pct_of_best"] = epochs_to(curve, target)
            row["target_accuracy"] = round(target, 4)
            results.append(row)
            for name in runs:
                print(f"fraction {fraction}: {name:9s} {row[name]['val_accuracy']}", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "transfer.json", {"epochs": args.epochs, "seconds": round(time.time() - start),
                                            "arch": params.demo.arch, "freeze_until": ft.freeze_until,
                                            "reinit": ft.reinit, "lr": ft.lr, "results": results})
    plot(results, runs, args.out / "transfer.png")
    print(table(results, runs))
    return 0


def table(results: list[dict], runs) -> str:
    lines = ["| train images | run | val accuracy by epoch | best | epochs to 95% of best |",
             "|---|---|---|---|---|"]
    for r in results:
        for name in runs:
            curve = " ".join(f"{a:.2f}" for a in r[name]["val_accuracy"])
            reached = r[name]["epochs_to_95pct_of_best"]
            lines.append(f"| {r['train_images']} ({r['fraction']:.0%}) | {name} | {curve} | {r[name]['best']:.3f} | "
                         f"{reached if reached else 'not reached'} (target {r['target_accuracy']:.3f}) |")
    return "\n".join(lines)


def plot(results: list[dict], runs, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        for name in runs:
            acc = r[name]["val_accuracy"]
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=name)
        ax.axhline(r["target_accuracy"], color="grey", linestyle="--", label="95% of best")
        ax.set_title(f"{r['train_images']} training images ({r['fraction']:.0%})")
        ax.set_xlabel("epoch"), ax.set_ylabel("val accuracy"), ax.set_ylim(0, 1), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
