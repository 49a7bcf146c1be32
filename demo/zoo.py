"""DEMO ONLY: the demo's model zoo: a network trained from scratch on the source digits.

    python -m demo.zoo data/raw/digits-0-4 zoo/resnet18-digits-0-4.pt    # the source task, the zoo file

Trains demo.arch from random initialisation on the source task and saves it as a checkpoint
(components/artifacts/checkpoint.py) in the local zoo, where fetch_pretrained picks it up like any
pretrained model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from components.artifacts import checkpoint
from components.config import Params, override
from demo import command_line


def publish_source_model(source: str | Path, out: str | Path, params: Params) -> dict:
    """Train demo.arch from scratch on the source digits and save it as a zoo checkpoint.

    The recipe is params.yaml's, changed only where training from scratch differs: nothing frozen
    or re-initialised, a higher learning rate, no early stop, demo.epochs and demo.image_size.
    """
    import torch

    from components.data import prepare
    from components.models import architectures
    from components.training.loaders import make_loaders
    from components.training.loop import fit

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
        model = architectures.build(cfg.arch, len(class_names))
        train_loader, val_loader = make_loaders(Path(tmp) / "dataset", policy, train_cfg, class_names)
        best_state, history, best_epoch = fit(model, train_loader, val_loader, train_cfg)
    checkpoint.save(checkpoint.Checkpoint(cfg.arch, class_names, best_state), out)
    return next(r for r in history if r["epoch"] == best_epoch)


def main(argv=None) -> int:
    (source, out), params = command_line(argv, __doc__.splitlines()[0], {
        "SOURCE": "ImageFolder of the source task", "OUT": "checkpoint file to write"})
    best = publish_source_model(source, out, params)
    print(f"demo: published {out} (best epoch {best['epoch']}, "
          f"val accuracy {best['val_accuracy']:.3f} on the source task)")
    return 0


if __name__ == "__main__":
    from components import cli

    cli.run_process(main)
