"""DEMO ONLY: make the embedded default's data and model zoo from what packages ship, offline.

    python -m components.demo_zoo export --source-out data/raw/digits-0-4 --target-out data/raw/digits-5-9
    python -m components.demo_zoo publish --source data/raw/digits-0-4 --out zoo/resnet18-digits-0-4.pt

`export` writes scikit-learn's UCI handwritten digits (1,797 8x8 greyscale scans) as PNG files
in ImageFolder layout, split by class into a source task (demo.source_classes) and the target
task the pipeline fine-tunes on (demo.target_classes).
`publish` trains demo.arch from random initialisation on the source task and saves it as a
checkpoint in the local zoo, where fetch_pretrained picks it up like any pretrained model.
Real projects skip both: data.source and pretrained.uri point at their own data and zoo.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from components.atomic import atomic_dir, save_torch
from components.config import ConfigError, Params, load_params, override


def export_digits(classes: list[int], out: str | Path) -> int:
    """Write every digit of `classes` to `out`/<digit>/digit-<index>.png; returns the count."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    wanted = set(classes)
    count = 0
    with atomic_dir(out) as tmp:
        for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
            if int(target) not in wanted:
                continue
            folder = tmp / str(int(target))
            folder.mkdir(exist_ok=True)
            img = np.round(pixels * (255 / 16)).astype(np.uint8)  # 0..16 ink levels -> 0..255
            Image.fromarray(img, mode="L").save(folder / f"digit-{index:04d}.png")
            count += 1
    return count


def publish_source_model(source: str | Path, out: str | Path, params: Params) -> dict:
    """Train demo.arch from scratch on the source digits and save it as a zoo checkpoint.

    The recipe is params.yaml's, changed only where training from scratch differs: nothing frozen
    or re-initialised, a higher learning rate, no early stop, demo.epochs and demo.image_size.
    """
    import torch

    from components import models
    from components.data import prepare
    from components.finetune import fit, make_loaders

    cfg = params.demo
    policy = override(params.augment, image_size=cfg.image_size)
    train_cfg = override(params.finetune, freeze=[], freeze_until="", reinit=[], unfreeze=[], lr_groups=[],
                         schedule="constant", warmup_epochs=0, lr=0.05, max_epochs=cfg.epochs,
                         patience=cfg.epochs, seed=cfg.seed, checkpoint_dir="")
    with tempfile.TemporaryDirectory() as tmp:
        data_cfg = override(params.data, source=str(source), repo="", rev="", classes=[], seed=cfg.seed)
        report = prepare(source, Path(tmp) / "dataset", data_cfg)
        class_names = report["classes"]
        torch.manual_seed(cfg.seed)
        model = models.build(cfg.arch, len(class_names))
        train_loader, val_loader = make_loaders(Path(tmp) / "dataset", policy, train_cfg, class_names)
        best_state, history = fit(model, train_loader, val_loader, train_cfg)
    save_torch({"format": models.CHECKPOINT_FORMAT, "arch": cfg.arch, "class_names": class_names,
                "state_dict": best_state}, out)
    return min(history, key=lambda r: r["val_loss"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section: demo)")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the digits as PNG files in ImageFolder layout")
    export.add_argument("--source-out", required=True, help="folder for demo.source_classes")
    export.add_argument("--target-out", required=True, help="folder for demo.target_classes")
    publish = sub.add_parser("publish", help="train the source checkpoint and put it in the zoo")
    publish.add_argument("--source", required=True, help="ImageFolder of the source task")
    publish.add_argument("--out", required=True, help="checkpoint file to write")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if params.demo is None:
        raise ConfigError(f"{args.params}: no `demo` section: the demo stages need it")
    cfg = params.demo
    if args.command == "export":
        n_source = export_digits(cfg.source_classes, args.source_out)
        n_target = export_digits(cfg.target_classes, args.target_out)
        print(f"demo_zoo: exported {n_source} source and {n_target} target digit images")
    else:
        best = publish_source_model(args.source, args.out, params)
        print(f"demo_zoo: published {args.out} (best epoch {best['epoch']}, "
              f"val accuracy {best['val_accuracy']:.3f} on the source task)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
