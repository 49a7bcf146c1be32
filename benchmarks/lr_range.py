"""Does the learning-rate range test pick a rate that trains well? `finetune.lr: auto` against fixed
rates, on the transfer benchmark's photographs (benchmarks/transfer.py: real ImageNet weights, timm's
efficientnet_lite0, 224 px, the first blocks frozen as `make init` sets them).

    .venv/bin/python benchmarks/lr_range.py                      # or make bench-lr
    .venv/bin/python benchmarks/lr_range.py --per-class 24 --seeds 0 1 --rates 0.001 0.003 0.01 0.03

For each rate (and `auto`) and seed: test accuracy, best validation loss, the diagnosis and, for `auto`,
the rate the range test chose and its seconds. Prints a Markdown table and writes
benchmarks/results/lr_range.json. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from transfer import first_per_class, photo_inputs, photo_recipe, test_accuracy  # noqa: E402

from components.config import load_params, override  # noqa: E402
from components.fetch_pretrained import fetch  # noqa: E402
from components.finetune import finetune  # noqa: E402
from components.storage.atomic import write_json  # noqa: E402
from pipelines import imagenet_zoo  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=24, help="training images per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03],
                        help="fixed rates to compare with (the photo recipe's is 0.01)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    params = load_params(ROOT / "params.yaml")
    arch, library = imagenet_zoo.ARCH, "timm"
    recipe = photo_recipe(args.epochs)
    rows, start = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        photo_inputs(t, params, 40)
        first_per_class(t / "data", t / "train", args.per_class)
        fetch(override(params.pretrained, uri=f"timm://{arch}?weights={t / 'imagenet.pt'}", library=library,
                       arch=arch, sha256=""), t / "pre")
        for lr in [*args.rates, "auto"]:
            runs = []
            for seed in args.seeds:
                began, out = time.time(), t / f"model-{lr}-{seed}"
                summary = finetune(t / "train", t / "aug", t / "pre", out,
                                   override(params.finetune, **{**recipe, "lr": lr, "seed": seed}))
                runs.append({"seed": seed, "test_accuracy": round(test_accuracy(t / "train", out), 4),
                             "best_val_loss": round(summary["best_val_loss"], 4),
                             "diagnosis": summary["diagnosis"]["tag"],
                             "lr_found": summary["lr_find"] and summary["lr_find"]["suggested_lr"],
                             "seconds": round(time.time() - began, 1)})
                print(f"lr {lr}, seed {seed}: {runs[-1]}", file=sys.stderr, flush=True)
            rows.append({"lr": lr, "runs": runs,
                         "test_accuracy": round(statistics.mean(r["test_accuracy"] for r in runs), 4),
                         "best_val_loss": round(statistics.mean(r["best_val_loss"] for r in runs), 4)})
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "lr_range.json", {"arch": arch, "per_class": args.per_class, "epochs": args.epochs,
                                            "seeds": args.seeds, "seconds": round(time.time() - start),
                                            "results": rows})
    print("| finetune.lr | test accuracy (mean) | best val loss (mean) | diagnoses | rate found | seconds |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        found = [r["lr_found"] for r in row["runs"] if r["lr_found"]]
        print(f"| {row['lr']} | {row['test_accuracy']:.3f} | {row['best_val_loss']:.3f} | "
              f"{', '.join(sorted({r['diagnosis'] for r in row['runs']}))} | "
              f"{', '.join(f'{f:.3g}' for f in found) or '-'} | "
              f"{statistics.mean(r['seconds'] for r in row['runs']):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
