"""finetune: pretrained backbone, new output layer, frozen layers, early stopping on validation loss.

    python -m components.finetune --params params.yaml --dataset data/prepared \
        --policy artifacts/augment --weights artifacts/pretrained --out artifacts/model

Freezing by name patterns and by depth, gradual unfreezing with its own learning rates,
discriminative learning rates, warm-up then a cosine or step schedule, and a checkpoint every
epoch: a run killed mid-epoch resumes from the last finished epoch and ends with the same weights.
Writes model.pt (checkpoint-v1 with the best epoch's weights, the class names, the preprocessing
and the configuration that produced it), history.json (one row per epoch), summary.json and
training_curves.png. Run as the pipeline runs it (`run`), the fine-tune is a live MLflow run
(components.tracking): parameters when it starts, each epoch's metrics when it ends.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from components import cpus, models, prefix_cache, tracking
from components.atomic import atomic_dir, read_json, save_torch, write_json
from components.augment import eval_transform, load_policy, train_transform
from components.config import AugmentConfig, FinetuneConfig, TrackingConfig, load_params
from components.dataset import ImageSplit, read_report

RUN_MARKER = "mlflow_run.json"  # in checkpoint_dir: the MLflow run an interrupted fine-tune continues


class TrainingError(ValueError):
    """Training cannot go on (a loss that is not a finite number); the message says where and why."""


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


def lr_factor(epoch: int, cfg: FinetuneConfig) -> float:
    """Multiplier of every group's base learning rate in `epoch` (1-based): warm-up, then the schedule."""
    if epoch <= cfg.warmup_epochs:
        return epoch / (cfg.warmup_epochs + 1)
    t = epoch - cfg.warmup_epochs - 1  # epochs since warm-up ended
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t / (cfg.max_epochs - cfg.warmup_epochs)))
    if cfg.schedule == "step":
        return cfg.gamma ** (t // cfg.step_size)
    return 1.0


class Trainer:
    """The model with its frozen parts, optimizer groups and unfreezing schedule, epoch by epoch."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig):
        self.model, self.cfg = model, cfg
        patterns = list(cfg.freeze) + (models.modules_before(model, cfg.freeze_until) if cfg.freeze_until else [])
        self.frozen_bn = models.freeze(model, patterns)
        groups, taken = [], set()
        for g in cfg.lr_groups:
            params = [p for p in models.parameters_of(model, g.modules, "finetune.lr_groups") if id(p) not in taken]
            taken.update(map(id, params))
            groups.append({"params": params, "base_lr": g.lr})
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        groups.insert(0, {"params": rest, "base_lr": cfg.lr})
        for step in cfg.unfreeze:  # a typo fails now, before the first epoch, not when its epoch starts
            models.match_modules(model, step.modules, "finetune.unfreeze")
        for g in groups:
            g["lr"] = g["base_lr"]
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def unfreeze_for(self, epoch: int) -> None:
        """Apply the unfreezing steps due at `epoch`: their parameters join as a new optimizer group."""
        for step in self.cfg.unfreeze:
            if step.epoch == epoch:
                woken = models.unfreeze(self.model, step.modules, self.frozen_bn)
                if woken:
                    lr = step.lr or self.cfg.lr
                    self.optimizer.add_param_group({"params": woken, "base_lr": lr, "lr": lr})
                tqdm.write(f"finetune: epoch {epoch}: unfroze {', '.join(step.modules)} "
                           f"({sum(p.numel() for p in woken):,} parameters)", file=sys.stderr)

    def start_epoch(self, epoch: int) -> None:
        self.unfreeze_for(epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(epoch, self.cfg)
        self.model.train()
        for m in self.frozen_bn:  # frozen BatchNorm keeps its running statistics
            m.eval()


def _rng_state(generator: torch.Generator) -> dict:
    """Every random state training draws from, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "loader": generator.get_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def fit(model: nn.Module, train_loader, val_loader, cfg: FinetuneConfig, run_key: str = "",
        on_epoch=None) -> tuple[dict, list]:
    """Train until max_epochs or until val loss stops improving by min_delta for `patience` epochs.

    With cfg.checkpoint_dir, every finished epoch is saved there and a checkpoint with the same
    `run_key` (inputs and configuration) is resumed. `on_epoch(row)` sees each history row as its
    epoch ends (live tracking). Returns the best epoch's state dict (not the last one's) and the
    per-epoch history.
    """
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    trainer = Trainer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    autocast, prepare = _speed_levers(model, cfg)
    cache, suffix = _prefix_cache(model, trainer, train_loader, val_loader, cfg, prepare, autocast)
    history, best_loss, best_state, stale, first = [], math.inf, None, 0, 1
    ckpt_path = Path(cfg.checkpoint_dir) / "last.pt" if cfg.checkpoint_dir else None

    saved = _load_checkpoint(ckpt_path) if ckpt_path and ckpt_path.exists() else None
    if saved is not None:
        if saved.get("run_key") == run_key:
            for epoch in range(2, saved["epoch"] + 1):  # replay unfreezing so the optimizer groups match
                trainer.unfreeze_for(epoch)
            model.load_state_dict(saved["model"])
            trainer.optimizer.load_state_dict(saved["optimizer"])
            history, best_loss, best_state, stale = saved["history"], saved["best_loss"], saved["best_state"], \
                saved["stale"]
            _set_rng_state(saved["rng"], train_loader.generator)
            first = saved["epoch"] + 1
            tqdm.write(f"finetune: resuming after epoch {saved['epoch']} from {ckpt_path}", file=sys.stderr)
        else:
            tqdm.write(f"finetune: {ckpt_path} belongs to other inputs or settings; starting afresh", file=sys.stderr)

    stop = first > cfg.max_epochs or (history and stale >= cfg.patience)
    epochs = tqdm(range(first, cfg.max_epochs + 1), desc="finetune", unit="epoch", file=sys.stderr,
                  initial=first - 1, total=cfg.max_epochs)
    for epoch in ([] if stop else epochs):
        trainer.start_epoch(epoch)
        seen = correct = 0
        total_loss = 0.0
        if cache:  # the suffix on this epoch's copy of the frozen prefix's features
            net, feed = suffix, cache.train_copy(epoch).batches(_epoch_batches(train_loader))
        else:
            net, feed = model, train_loader
        batches = tqdm(feed, desc=f"epoch {epoch}", unit="batch", leave=False, file=sys.stderr,
                       disable=None)  # batch bars on a terminal only
        for batch, (x, y) in enumerate(batches, 1):
            trainer.optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = net(prepare(x)).float()
            loss = loss_fn(logits, y)
            _check_finite(loss.item(), f"epoch {epoch}, batch {batch}: training loss", cfg)
            loss.backward()
            trainer.optimizer.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        with autocast():
            val_logits, val_y = models.predict(suffix, cache.val.batches(_in_order(len(cache.val), cfg))) if cache \
                else models.predict(model, ((prepare(x), y) for x, y in val_loader))
        val_logits = val_logits.float()
        row = {
            "epoch": epoch,
            "train_loss": total_loss / seen,
            "train_accuracy": correct / seen,
            "val_loss": loss_fn(val_logits, val_y).item(),
            "val_accuracy": (val_logits.argmax(1) == val_y).float().mean().item(),
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "time": time.time(),  # when the epoch ended: its metrics' timestamp in MLflow
        }
        _check_finite(row["val_loss"], f"epoch {epoch}: validation loss", cfg)
        history.append(row)
        if on_epoch:
            on_epoch(row)
        epochs.set_postfix(val_loss=f"{row['val_loss']:.4f}", val_acc=f"{row['val_accuracy']:.3f}")
        if row["val_loss"] < best_loss - cfg.min_delta:
            best_loss, best_state, stale = row["val_loss"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
        if ckpt_path:
            save_torch({"run_key": run_key, "epoch": epoch, "model": model.state_dict(),
                        "optimizer": trainer.optimizer.state_dict(), "history": history,
                        "best_loss": best_loss, "best_state": best_state, "stale": stale,
                        "rng": _rng_state(train_loader.generator)}, ckpt_path)
            write_json(ckpt_path.with_suffix(".json"), {"epoch": epoch, "run_key": run_key})
        if stale >= cfg.patience:
            tqdm.write(f"finetune: early stop after epoch {epoch}: val loss has not improved by "
                       f"{cfg.min_delta} for {cfg.patience} epochs", file=sys.stderr)
            break
    if cache:
        cache.close()
    if cfg.channels_last:  # the weights as saved: the usual layout, whatever training used
        model.to(memory_format=torch.contiguous_format)
        best_state = best_state and {k: v.contiguous() for k, v in best_state.items()}
    return best_state, history


def _epoch_batches(train_loader) -> list[list[int]]:
    """The batches (lists of indices) the loader would give this epoch, drawn as it draws them, from its
    generator: so the cached and the uncached paths train on the same images in the same order."""
    torch.empty((), dtype=torch.int64).random_(generator=train_loader.generator)  # the loader's base seed
    return list(train_loader.batch_sampler)


def _in_order(n: int, cfg: FinetuneConfig) -> list[list[int]]:
    return [list(range(start, min(start + cfg.batch_size, n))) for start in range(0, n, cfg.batch_size)]


def precision(setting: str, cpuinfo: str | None = None) -> str:
    """fp32 or bf16 for this machine. auto: bf16 only on CPUs with AMX: on AVX-512 BF16 without it
    (the development machine), bf16 autocast trained resnet18 at 29 img/s against fp32's 43."""
    if setting != "auto":
        return setting
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    return "bf16" if "amx_bf16" in cpuinfo.split() else "fp32"


def _speed_levers(model: nn.Module, cfg: FinetuneConfig):
    """(autocast context factory, input preparation) for finetune.precision and finetune.channels_last."""
    bf16 = precision(cfg.precision) == "bf16"
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    def prepare(x):
        return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last and x.ndim == 4 else x

    return (lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)), prepare


def _prefix_cache(model, trainer: Trainer, train_loader, val_loader, cfg: FinetuneConfig, prepare, autocast):
    """(PrefixCache, suffix) when finetune.prefix_cache can apply, else (None, None) with the reason printed."""
    if not cfg.prefix_cache:
        return None, None
    later = [n for step in cfg.unfreeze for n in models.match_modules(model, step.modules, "finetune.unfreeze")]
    probe = prepare(next(iter(val_loader))[0][:2])
    prefix, suffix, names = prefix_cache.split(model, trainer.frozen_bn, later, probe)
    if prefix is None:
        tqdm.write(f"finetune: frozen-prefix cache off: {names}", file=sys.stderr)
        return None, None
    fast = prefix_cache.fused(prefix)
    if cfg.channels_last:
        fast.to(memory_format=torch.channels_last)
    cache = prefix_cache.PrefixCache(fast, train_loader.dataset, val_loader, cfg, prepare, autocast,
                                     workdir=cfg.checkpoint_dir or None)
    tqdm.write(f"finetune: frozen prefix {prefix_cache.describe(names)} computed once: validation, and "
               f"{cfg.prefix_copies} augmented cop{'y' if cfg.prefix_copies == 1 else 'ies'} of the training split",
               file=sys.stderr)
    return cache, suffix


def _check_finite(value: float, where: str, cfg: FinetuneConfig) -> None:
    if not math.isfinite(value):
        raise TrainingError(f"finetune: {where} is {value}: training diverged; nothing is written as the model. "
                            f"Likely cause: finetune.lr ({cfg.lr}) too high for these layers, or images that "
                            "are not what the labels say")


def _load_checkpoint(path: Path) -> dict | None:
    """The saved epoch state, or None when `path` cannot be read (cut short by a full disk, say):
    it is moved aside, named, and training starts afresh, since a checkpoint only saves time."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle errors... for a damaged file
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        path.replace(aside)
        tqdm.write(f"finetune: checkpoint {path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0]}); "
                   f"moved to {aside.name}, starting afresh", file=sys.stderr)
        return None


def save_curves(history: list[dict], best_epoch: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], marker="o", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], marker="o", label="validation")
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch"), ax.set_title(metric), ax.legend()
    axes[2].plot(epochs, [r["lr"] for r in history], marker="o")
    axes[2].set_xlabel("epoch"), axes[2].set_title("learning rate (base group)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_key(dataset_dir, augment_dir, pretrained_dir, cfg: FinetuneConfig) -> str:
    """What a checkpoint must match to be resumed: the data, policy, weights and settings."""
    parts = {"data": read_report(dataset_dir)["fingerprint"],
             "policy": read_json(Path(augment_dir) / "policy.json"),
             "weights": read_json(Path(pretrained_dir) / "pretrained.json")["sha256"],
             "config": cfg.model_dump(mode="json", exclude={"checkpoint_dir"})}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def finetune(dataset_dir, augment_dir, pretrained_dir, out, cfg: FinetuneConfig, on_epoch=None,
             run_record: dict | None = None) -> dict:
    """Fine-tune the fetched weights on the dataset artifact; write the best model to `out`.

    `on_epoch` is fit's per-epoch callback; `run_record` (which MLflow run trained it) is written
    into `out` as run.json.
    """
    started = time.time()
    torch.set_num_threads(min(torch.get_num_threads(), cpus.available()))  # a pod's CPU limit, not the node's
    class_names = read_report(dataset_dir)["classes"]
    policy = load_policy(augment_dir)
    pretrained = read_json(Path(pretrained_dir) / "pretrained.json")
    checkpoint = torch.load(Path(pretrained_dir) / "weights.pt", map_location="cpu", weights_only=True)
    arch = checkpoint["arch"]

    model = models.build(arch, pretrained["num_classes"])
    models.load_weights(model, checkpoint["state_dict"], arch)
    torch.manual_seed(cfg.seed)  # the new output layer's initial weights are part of the run's recipe
    # A new output layer when the old one cannot or should not be reused: another class
    # count, or known classes that differ (digits 0-4 -> 5-9 has 5 outputs either way).
    head = None
    source_classes = pretrained.get("class_names")
    if pretrained["num_classes"] != len(class_names) or (source_classes and source_classes != class_names):
        head = models.replace_head(model, len(class_names))

    if cfg.reinit:  # keep the generic lower layers, start the task-specific top afresh
        models.reinit(model, arch, cfg.reinit)

    train_loader, val_loader = make_loaders(dataset_dir, policy, cfg, class_names)
    best_state, history = fit(model, train_loader, val_loader, cfg,
                              run_key(dataset_dir, augment_dir, pretrained_dir, cfg), on_epoch)
    counts = models.parameter_counts(model)
    best = min(history, key=lambda r: r["val_loss"])
    summary = {
        "arch": arch,
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "best_val_accuracy": best["val_accuracy"],
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.max_epochs,
        "head_replaced": head,
        "parameters": {"trainable_at_start": history[0]["trainable_parameters"], **counts},
        "training_seconds": round(time.time() - started, 3),  # this process; a resumed run counts its part
        "weights_sha256": models.weights_digest(best_state),  # register refuses a copy of the champion
        "config": cfg.model_dump(mode="json"),
    }
    print(f"finetune: {arch}, {len(class_names)} classes, output layer "
          f"{'replaced: ' + head if head else 'kept'}; trainable parameters {history[0]['trainable_parameters']:,} "
          f"at the start, {counts['trainable']:,} of {counts['total']:,} at the end", file=sys.stderr)
    with atomic_dir(out) as tmp:
        save_torch({
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
        if run_record:
            write_json(tmp / tracking.RUN_RECORD, run_record)
    if cfg.checkpoint_dir:  # finished: a later run with the same inputs starts from scratch
        for leftover in ("last.pt", "last.json", RUN_MARKER):
            (Path(cfg.checkpoint_dir) / leftover).unlink(missing_ok=True)
    return summary


def _interrupted_run(cfg: FinetuneConfig, key: str) -> str | None:
    """The MLflow run of an interrupted fine-tune with the same inputs, to continue it."""
    if not cfg.checkpoint_dir:
        return None
    marker, last = Path(cfg.checkpoint_dir) / RUN_MARKER, Path(cfg.checkpoint_dir) / "last.pt"
    if marker.exists() and last.exists() and read_json(marker).get("run_key") == key:
        return read_json(marker)["run_id"]
    return None


def run(dataset_dir, augment_dir, pretrained_dir, out, cfg: FinetuneConfig, tracking_cfg: TrackingConfig,
        runner: str, pipeline_run_id: str, changes: list[str] = ()) -> dict:
    """The step as DVC, Kubeflow and the tests run it: `finetune` inside a live MLflow run.
    `changes` (parameters changed from the committed params.yaml) lead the run's name."""
    key = run_key(dataset_dir, augment_dir, pretrained_dir, cfg)
    with tracking.training_run(dataset_dir, augment_dir, pretrained_dir, cfg.model_dump(mode="json"),
                               tracking_cfg, runner, pipeline_run_id, changes,
                               resume_run_id=_interrupted_run(cfg, key)) as live:
        if cfg.checkpoint_dir:
            write_json(Path(cfg.checkpoint_dir) / RUN_MARKER, {"run_key": key, "run_id": live.run_id})
        summary = finetune(dataset_dir, augment_dir, pretrained_dir, out, cfg, on_epoch=live.log_epoch,
                           run_record=tracking.run_record(live))
        tracking.log_training_outputs(out)
    return {**summary, "run_id": live.run_id}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (sections: finetune, tracking)")
    parser.add_argument("--dataset", required=True, help="dataset artifact from components.data")
    parser.add_argument("--policy", required=True, help="policy folder from components.augment")
    parser.add_argument("--weights", required=True, help="weights folder from components.fetch_pretrained")
    parser.add_argument("--out", required=True, help="folder for model.pt, history.json, training_curves.png")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    summary = run(args.dataset, args.policy, args.weights, args.out, params.finetune, params.tracking,
                  *tracking.runner_identity(), changes=tracking.changed_params(args.params))
    print(f"finetune: best epoch {summary['best_epoch']} of {summary['epochs_run']}, "
          f"val loss {summary['best_val_loss']:.4f}, val accuracy {summary['best_val_accuracy']:.3f}; "
          f"MLflow run {summary['run_id']}")
    return 0


if __name__ == "__main__":
    from components import cli

    sys.exit(cli.run(main))
