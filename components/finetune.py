"""finetune: pretrained backbone, new output layer, frozen layers, early stopping on validation loss.

    python -m components.finetune --params params.yaml --data data/prepared \
        --augment artifacts/augment --pretrained artifacts/pretrained --out artifacts/model

Writes model.pt (checkpoint-v1 with the best epoch's weights, the class names, the
preprocessing and the configuration that produced it), history.json (one row per epoch)
and training_curves.png.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from components import models
from components.atomic import atomic_dir, read_json, write_json
from components.augment import eval_transform, load_policy, train_transform
from components.config import AugmentConfig, FinetuneConfig, load_params
from components.dataset import ImageSplit, read_report


def make_loaders(dataset_dir, policy: AugmentConfig, cfg: FinetuneConfig, class_names: list[str]):
    train = ImageSplit(dataset_dir, "train", train_transform(policy), class_names)
    val = ImageSplit(dataset_dir, "val", eval_transform(policy), class_names)
    generator = torch.Generator().manual_seed(cfg.seed)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                  persistent_workers=cfg.num_workers > 0)
    # drop_last: a last batch of one image would break BatchNorm in training mode
    return (torch.utils.data.DataLoader(train, shuffle=True, generator=generator,
                                        drop_last=len(train) > cfg.batch_size, **common),
            torch.utils.data.DataLoader(val, shuffle=False, **common))


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def fit(model: nn.Module, train_loader, val_loader, cfg: FinetuneConfig,
        frozen_bn: list[nn.Module] = ()) -> tuple[dict, list[dict]]:
    """Train until max_epochs or until val loss stops improving by min_delta for `patience` epochs.

    Returns the best epoch's state dict (not the last one's) and the per-epoch history.
    """
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    history, best_loss, best_state, stale = [], math.inf, None, 0
    epochs = tqdm(range(1, cfg.max_epochs + 1), desc="finetune", unit="epoch", file=sys.stderr)
    for epoch in epochs:
        model.train()
        for m in frozen_bn:  # frozen BatchNorm keeps its running statistics
            m.eval()
        seen = correct = 0
        total_loss = 0.0
        batches = tqdm(train_loader, desc=f"epoch {epoch}", unit="batch", leave=False, file=sys.stderr,
                       disable=None)  # batch bars on a terminal only
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        val_logits, val_y = models.predict(model, val_loader)
        row = {
            "epoch": epoch,
            "train_loss": total_loss / seen,
            "train_accuracy": correct / seen,
            "val_loss": loss_fn(val_logits, val_y).item(),
            "val_accuracy": (val_logits.argmax(1) == val_y).float().mean().item(),
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(row)
        epochs.set_postfix(val_loss=f"{row['val_loss']:.4f}", val_acc=f"{row['val_accuracy']:.3f}")
        if row["val_loss"] < best_loss - cfg.min_delta:
            best_loss, best_state, stale = row["val_loss"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                tqdm.write(f"finetune: early stop after epoch {epoch}: val loss has not improved by "
                           f"{cfg.min_delta} for {cfg.patience} epochs", file=sys.stderr)
                break
    return best_state, history


def save_curves(history: list[dict], best_epoch: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], marker="o", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], marker="o", label="validation")
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch"), ax.set_title(metric), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finetune(dataset_dir, augment_dir, pretrained_dir, out, cfg: FinetuneConfig) -> dict:
    """Fine-tune the fetched weights on the dataset artifact; write the best model to `out`."""
    class_names = read_report(dataset_dir)["classes"]
    policy = load_policy(augment_dir)
    pretrained = read_json(Path(pretrained_dir) / "pretrained.json")
    checkpoint = torch.load(Path(pretrained_dir) / "weights.pt", map_location="cpu", weights_only=True)
    arch = checkpoint["arch"]

    model = models.build(arch, pretrained["num_classes"])
    models.load_weights(model, checkpoint["state_dict"], arch)
    # A new output layer when the old one cannot or should not be reused: another class
    # count, or known classes that differ (digits 0-4 -> 5-9 has 5 outputs either way).
    head = None
    source_classes = pretrained.get("class_names")
    if pretrained["num_classes"] != len(class_names) or (source_classes and source_classes != class_names):
        head = models.replace_head(model, len(class_names))
    frozen_bn = models.freeze(model, cfg.freeze)
    counts = models.parameter_counts(model)
    print(f"finetune: {arch}, {len(class_names)} classes, output layer "
          f"{'replaced: ' + head if head else 'kept'}; parameters trainable {counts['trainable']:,}, "
          f"frozen {counts['frozen']:,}", file=sys.stderr)

    train_loader, val_loader = make_loaders(dataset_dir, policy, cfg, class_names)
    best_state, history = fit(model, train_loader, val_loader, cfg, frozen_bn)
    best = min(history, key=lambda r: r["val_loss"])
    summary = {
        "arch": arch,
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "best_val_accuracy": best["val_accuracy"],
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.max_epochs,
        "head_replaced": head,
        "parameters": counts,
    }
    with atomic_dir(out) as tmp:
        torch.save({
            "format": models.CHECKPOINT_FORMAT,
            "arch": arch,
            "class_names": class_names,
            "state_dict": best_state,
            "preprocessing": {"image_size": policy.image_size, "mean": list(policy.mean), "std": list(policy.std)},
            "config": cfg.model_dump(mode="json"),
            "summary": summary,
        }, tmp / "model.pt")
        write_json(tmp / "history.json", history)
        write_json(tmp / "summary.json", summary)
        save_curves(history, best["epoch"], tmp / "training_curves.png")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section: finetune)")
    parser.add_argument("--data", required=True, help="dataset artifact from components.data")
    parser.add_argument("--augment", required=True, help="policy folder from components.augment")
    parser.add_argument("--pretrained", required=True, help="weights folder from components.fetch_pretrained")
    parser.add_argument("--out", required=True, help="folder for model.pt, history.json, training_curves.png")
    args = parser.parse_args(argv)
    summary = finetune(args.data, args.augment, args.pretrained, args.out, load_params(args.params).finetune)
    print(f"finetune: best epoch {summary['best_epoch']} of {summary['epochs_run']}, "
          f"val loss {summary['best_val_loss']:.4f}, val accuracy {summary['best_val_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
