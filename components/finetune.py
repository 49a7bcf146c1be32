"""finetune: pretrained backbone, new output layer, frozen layers, early stopping on validation loss.

    python -m components.finetune --params params.yaml --dataset data/prepared \
        --policy artifacts/augment --weights artifacts/pretrained --out artifacts/model

Freezing by name patterns and by depth, gradual unfreezing with its own learning rates,
discriminative learning rates, warm-up then a cosine or step schedule, and a checkpoint every
epoch: a run killed mid-epoch resumes from the last finished epoch and ends with the same weights.
Writes model.pt (checkpoint-v1 with the best epoch's weights, the class names, the preprocessing
and the configuration that produced it), history.json (one row per epoch), summary.json and
training_curves.png. Run as the pipeline runs it (`run`), the fine-tune is a live MLflow run
(components.tracking): parameters when it starts, each epoch's metrics when it ends. Device, precision
and data-parallel processes (finetune.devices): components.distributed; `run_data_parallel` starts them.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from components import cpus, distributed, models, prefix_cache, tracking
from components.atomic import atomic_dir, read_json, save_torch, write_json
from components.augment import device_transform, eval_transform, load_policy, train_transform
from components.config import AugmentConfig, FinetuneConfig, TrackingConfig, load_params, parse_section
from components.dataset import ImageSplit, read_report

RUN_MARKER = "mlflow_run.json"  # in checkpoint_dir: the MLflow run an interrupted fine-tune continues


class TrainingError(ValueError):
    """Training cannot go on (a loss that is not a finite number); the message says where and why."""


def make_loaders(dataset_dir, policy: AugmentConfig, cfg: FinetuneConfig, class_names: list[str],
                 augment_on_device: bool = False):
    """The training and validation loaders. With `augment_on_device` the training loader's workers only
    decode (uint8 tensors, as they come) and `fit` augments each batch where the model is (a GPU)."""
    train = ImageSplit(dataset_dir, "train", v2.ToImage() if augment_on_device else train_transform(policy),
                       class_names)
    val = ImageSplit(dataset_dir, "val", eval_transform(policy), class_names)
    generator = torch.Generator().manual_seed(cfg.seed)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                  persistent_workers=cfg.num_workers > 0, pin_memory=torch.cuda.is_available())
    # drop_last: a last batch of one image would break BatchNorm in training mode
    return (torch.utils.data.DataLoader(train, shuffle=True, generator=generator, drop_last=len(train) > cfg.batch_size,
                                        collate_fn=_as_list if augment_on_device else None, **common),
            torch.utils.data.DataLoader(val, shuffle=False, **common))


def _as_list(samples):
    """Images of different sizes as a list, their labels as a tensor (the batch is augmented later)."""
    return [x for x, _ in samples], torch.tensor([y for _, y in samples])


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

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, quiet: bool = False):
        self.model, self.cfg, self.quiet = model, cfg, quiet
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

    def unfreeze_for(self, epoch: int) -> list:
        """Apply the unfreezing steps due at `epoch`: their parameters join as a new optimizer group.
        Returns the parameters woken."""
        all_woken = []
        for step in self.cfg.unfreeze:
            if step.epoch == epoch:
                woken = models.unfreeze(self.model, step.modules, self.frozen_bn)
                if woken:
                    lr = step.lr or self.cfg.lr
                    self.optimizer.add_param_group({"params": woken, "base_lr": lr, "lr": lr})
                    all_woken += woken
                _say(not self.quiet, f"finetune: epoch {epoch}: unfroze {', '.join(step.modules)} "
                                     f"({sum(p.numel() for p in woken):,} parameters)")
        return all_woken

    def start_epoch(self, epoch: int) -> list:
        """Unfreeze what is due, set the learning rates and the modes; the parameters woken."""
        woken = self.unfreeze_for(epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(epoch, self.cfg)
        self.model.train()
        for m in self.frozen_bn:  # frozen BatchNorm keeps its running statistics
            m.eval()
        return woken


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
        on_epoch=None, fabric=None, augment=None) -> tuple[dict, list]:
    """Train until max_epochs or until val loss stops improving by min_delta for `patience` epochs.

    With cfg.checkpoint_dir, every finished epoch is saved there and a checkpoint with the same
    `run_key` (inputs and configuration) is resumed. `on_epoch(row)` sees each history row as its
    epoch ends (live tracking). `fabric` (components.distributed.fabric_for) says where: one device, or
    one of several data-parallel processes, each training on its share of every batch (only rank 0
    writes checkpoints and calls `on_epoch`). `augment`: the per-image training transform, when the
    loader leaves augmentation to the device (make_loaders(augment_on_device=True)). Returns the best
    epoch's state dict (not the last one's) and the per-epoch history.
    """
    fabric = fabric or distributed.fabric_for(cfg)
    rank, world, lead = fabric.global_rank, fabric.world_size, fabric.global_rank == 0
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    trainer = Trainer(model, cfg, quiet=not lead)
    loss_fn = nn.CrossEntropyLoss()
    model.to(fabric.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    prepare = _prepare(fabric, cfg, augment)
    cache, suffix = _prefix_cache(model, trainer, train_loader, val_loader, cfg, prepare, fabric.autocast, lead)
    net = suffix if cache else model
    history, best_loss, best_state, stale, first = [], math.inf, None, 0, 1
    ckpt_path = Path(cfg.checkpoint_dir) / "last.pt" if cfg.checkpoint_dir else None

    saved = _load_checkpoint(ckpt_path, lead) if ckpt_path and ckpt_path.exists() else None
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
            _say(lead, f"finetune: resuming after epoch {saved['epoch']} from {ckpt_path}")
        else:
            _say(lead, f"finetune: {ckpt_path} belongs to other inputs or settings; starting afresh")

    trained = torch.compile(net) if cfg.compile else net  # Fabric applies it again around DDP
    wrapped, optimizer = fabric.setup_module(trained), fabric.setup_optimizers(trainer.optimizer)
    compile_seconds = None
    stop = first > cfg.max_epochs or (history and stale >= cfg.patience)
    epochs = tqdm(range(first, cfg.max_epochs + 1), desc="finetune", unit="epoch", file=sys.stderr,
                  initial=first - 1, total=cfg.max_epochs, disable=not lead)
    for epoch in ([] if stop else epochs):
        if trainer.start_epoch(epoch) and world > 1:
            # DDP reduces the gradients of the parameters that trained when it wrapped the module:
            # woken ones join through a new wrapper (the old one's hooks must be gone first).
            del wrapped
            gc.collect()
            wrapped = fabric.setup_module(trained)
        seen = correct = 0
        total_loss = 0.0
        batches = [b[rank::world] for b in _epoch_batches(train_loader)] if cache or world > 1 else None
        if cache:  # the suffix on this epoch's copy of the frozen prefix's features
            feed = cache.train_copy(epoch).batches(batches)
        elif world > 1:  # this process's share of each batch the single-process loader would draw
            feed = torch.utils.data.DataLoader(train_loader.dataset, batch_sampler=batches,
                                               num_workers=cfg.num_workers, collate_fn=train_loader.collate_fn,
                                               pin_memory=train_loader.pin_memory)
        else:
            feed = train_loader
        bar = tqdm(feed, desc=f"epoch {epoch}", unit="batch", leave=False, file=sys.stderr,
                   disable=None if lead else True)  # batch bars on a terminal only
        for batch, (x, y) in enumerate(bar, 1):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            y = fabric.to_device(y)
            with fabric.autocast():
                logits = wrapped(prepare(x)).float()
            loss = loss_fn(logits, y)
            _check_finite(loss.item(), f"epoch {epoch}, batch {batch}: training loss", cfg)
            fabric.backward(loss)
            optimizer.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            if cfg.compile and compile_seconds is None:  # the first step compiles: its time, reported apart
                compile_seconds = time.perf_counter() - started
                _say(lead, f"finetune: torch.compile: first step {compile_seconds:.1f} s (compiling included)")
        if world > 1:
            total_loss, correct, seen = fabric.all_reduce(
                torch.tensor([total_loss, correct, seen], dtype=torch.float64, device=fabric.device),
                reduce_op="sum").tolist()
        with torch.no_grad(), fabric.autocast():  # every process the whole split: the same verdict everywhere
            val_logits, val_y = models.predict(net, _on_device(
                cache.val.batches(_in_order(len(cache.val), cfg)) if cache else val_loader, prepare, fabric))
        val_logits, val_y = val_logits.float().cpu(), val_y.cpu()
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
        if compile_seconds is not None and not any("compile_seconds" in r for r in history):
            row["compile_seconds"] = compile_seconds
        _check_finite(row["val_loss"], f"epoch {epoch}: validation loss", cfg)
        history.append(row)
        if on_epoch and lead:
            on_epoch(row)
        epochs.set_postfix(val_loss=f"{row['val_loss']:.4f}", val_acc=f"{row['val_accuracy']:.3f}")
        if row["val_loss"] < best_loss - cfg.min_delta:
            best_loss, best_state, stale = row["val_loss"], _cpu_copy(model.state_dict()), 0
        else:
            stale += 1
        if ckpt_path and lead:
            save_torch({"run_key": run_key, "epoch": epoch, "model": model.state_dict(),
                        "optimizer": trainer.optimizer.state_dict(), "history": history,
                        "best_loss": best_loss, "best_state": best_state, "stale": stale,
                        "rng": _rng_state(train_loader.generator)}, ckpt_path)
            write_json(ckpt_path.with_suffix(".json"), {"epoch": epoch, "run_key": run_key})
        if fabric.broadcast(stale >= cfg.patience):  # rank 0 decides, so no process waits for another
            _say(lead, f"finetune: early stop after epoch {epoch}: val loss has not improved by "
                       f"{cfg.min_delta} for {cfg.patience} epochs")
            break
    if cache:
        cache.close()
    model.cpu()
    if cfg.channels_last:  # the weights as saved: the usual layout, whatever training used
        model.to(memory_format=torch.contiguous_format)
        best_state = best_state and {k: v.contiguous() for k, v in best_state.items()}
    return best_state, history


def _say(lead: bool, message: str) -> None:
    if lead:  # one process speaks for all
        tqdm.write(message, file=sys.stderr)


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _on_device(batches, prepare, fabric):
    for x, y in batches:
        yield prepare(x), fabric.to_device(y)


def _prepare(fabric, cfg: FinetuneConfig, augment=None):
    """Input batch -> on the device (non-blocking from pinned memory), augmented there when the loader
    left it undone (a list of uint8 images), in channels_last when that is on."""
    def prepare(x):
        x = torch.stack([augment(fabric.to_device(image)) for image in x]) if isinstance(x, list) \
            else fabric.to_device(x)
        return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last and x.ndim == 4 else x

    return prepare


def _epoch_batches(train_loader) -> list[list[int]]:
    """The batches (lists of indices) the loader would give this epoch, drawn as it draws them, from its
    generator: so the cached and the uncached paths train on the same images in the same order."""
    torch.empty((), dtype=torch.int64).random_(generator=train_loader.generator)  # the loader's base seed
    return list(train_loader.batch_sampler)


def _in_order(n: int, cfg: FinetuneConfig) -> list[list[int]]:
    return [list(range(start, min(start + cfg.batch_size, n))) for start in range(0, n, cfg.batch_size)]


def _prefix_cache(model, trainer: Trainer, train_loader, val_loader, cfg: FinetuneConfig, prepare, autocast,
                  lead: bool = True):
    """(PrefixCache, suffix) when finetune.prefix_cache can apply, else (None, None) with the reason printed.
    Each data-parallel process computes the whole cache: every one draws from every image."""
    if not cfg.prefix_cache:
        return None, None
    later = [n for step in cfg.unfreeze for n in models.match_modules(model, step.modules, "finetune.unfreeze")]
    probe = prepare(next(iter(val_loader))[0][:2])
    prefix, suffix, names = prefix_cache.split(model, trainer.frozen_bn, later, probe)
    if prefix is None:
        _say(lead, f"finetune: frozen-prefix cache off: {names}")
        return None, None
    fast = prefix_cache.fused(prefix)
    if cfg.channels_last:
        fast.to(memory_format=torch.channels_last)
    cache = prefix_cache.PrefixCache(fast, train_loader, val_loader, cfg, prepare, autocast,
                                     workdir=cfg.checkpoint_dir or None)
    copies = f"{cfg.prefix_copies} augmented cop{'y' if cfg.prefix_copies == 1 else 'ies'}"
    _say(lead, f"finetune: frozen prefix {prefix_cache.describe(names)} computed once: validation, and up to "
               f"{copies} of the training split")
    return cache, suffix


def _check_finite(value: float, where: str, cfg: FinetuneConfig) -> None:
    if not math.isfinite(value):
        raise TrainingError(f"finetune: {where} is {value}: training diverged; nothing is written as the model. "
                            f"Likely cause: finetune.lr ({cfg.lr}) too high for these layers, or images that "
                            "are not what the labels say")


def _load_checkpoint(path: Path, lead: bool = True) -> dict | None:
    """The saved epoch state, or None when `path` cannot be read (cut short by a full disk, say):
    it is moved aside (by rank 0), named, and training starts afresh, since a checkpoint only saves time."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle errors... for a damaged file
        if not lead:
            return None
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
             run_record: dict | None = None, fabric=None) -> dict:
    """Fine-tune the fetched weights on the dataset artifact; write the best model to `out`.

    `on_epoch` is fit's per-epoch callback; `run_record` (which MLflow run trained it) is written
    into `out` as run.json. Of data-parallel processes (`fabric`), only rank 0 writes.
    """
    started = time.time()
    fabric = fabric or distributed.fabric_for(cfg)
    # a pod's CPU limit, not the node's, shared by the processes on this node
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cpus.available() // distributed.local_processes())))
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

    on_device = cfg.gpu_augment and fabric.device.type == "cuda"
    train_loader, val_loader = make_loaders(dataset_dir, policy, cfg, class_names, augment_on_device=on_device)
    best_state, history = fit(model, train_loader, val_loader, cfg,
                              run_key(dataset_dir, augment_dir, pretrained_dir, cfg), on_epoch, fabric,
                              augment=device_transform(policy) if on_device else None)
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
        "device": fabric.device.type,
        "processes": fabric.world_size,
        "precision": distributed.precision(cfg.precision, fabric.device.type),
        "compile_seconds": next((r["compile_seconds"] for r in history if "compile_seconds" in r), None),
        "weights_sha256": models.weights_digest(best_state),  # register refuses a copy of the champion
        "config": cfg.model_dump(mode="json"),
    }
    if fabric.global_rank != 0:  # rank 0 writes the model and ends the run
        return summary
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
    fabric = distributed.fabric_for(cfg)
    if fabric.global_rank != 0:  # one MLflow run, the lead process's
        return finetune(dataset_dir, augment_dir, pretrained_dir, out, cfg, fabric=fabric)
    key = run_key(dataset_dir, augment_dir, pretrained_dir, cfg)
    with tracking.training_run(dataset_dir, augment_dir, pretrained_dir, cfg.model_dump(mode="json"),
                               tracking_cfg, runner, pipeline_run_id, changes,
                               resume_run_id=_interrupted_run(cfg, key)) as live:
        if cfg.checkpoint_dir:
            write_json(Path(cfg.checkpoint_dir) / RUN_MARKER, {"run_key": key, "run_id": live.run_id})
        summary = finetune(dataset_dir, augment_dir, pretrained_dir, out, cfg, on_epoch=live.log_epoch,
                           run_record=tracking.run_record(live), fabric=fabric)
        tracking.log_training_outputs(out)
    return {**summary, "run_id": live.run_id}


def run_data_parallel(dataset_dir, augment_dir, pretrained_dir, out, cfg: FinetuneConfig,
                      tracking_cfg: TrackingConfig, runner: str, pipeline_run_id: str, changes: list[str] = ()) -> dict:
    """`run` in as many processes as finetune.devices asks for on this node, started as torchrun starts
    them (one: in this process). The processes read their arguments from a file and rank 0 writes its
    summary back beside it."""
    processes = distributed.processes_per_node(cfg)
    if processes == 1 or distributed.launched():
        return run(dataset_dir, augment_dir, pretrained_dir, out, cfg, tracking_cfg, runner, pipeline_run_id, changes)
    with tempfile.TemporaryDirectory(prefix="finetune-processes-") as tmp:
        spec = Path(tmp) / "arguments.json"
        write_json(spec, {"paths": [str(p) for p in (dataset_dir, augment_dir, pretrained_dir, out)],
                          "finetune": cfg.model_dump(mode="json"), "tracking": tracking_cfg.model_dump(mode="json"),
                          "runner": runner, "pipeline_run_id": pipeline_run_id, "changes": list(changes)})
        distributed.launch(processes, ["-m", "components.finetune", "--process", str(spec)])
        return read_json(spec.with_name("summary.json"))


def _process(spec: Path) -> int:
    """One of run_data_parallel's processes."""
    args = read_json(spec)
    summary = run(*args["paths"], parse_section(FinetuneConfig, args["finetune"], "finetune"),
                  parse_section(TrackingConfig, args["tracking"], "tracking"), args["runner"],
                  args["pipeline_run_id"], args["changes"])
    if "run_id" in summary:  # rank 0
        write_json(spec.with_name("summary.json"), summary)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--process"]:
        return _process(Path(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (sections: finetune, tracking)")
    parser.add_argument("--dataset", required=True, help="dataset artifact from components.data")
    parser.add_argument("--policy", required=True, help="policy folder from components.augment")
    parser.add_argument("--weights", required=True, help="weights folder from components.fetch_pretrained")
    parser.add_argument("--out", required=True, help="folder for model.pt, history.json, training_curves.png")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    summary = run_data_parallel(args.dataset, args.policy, args.weights, args.out, params.finetune, params.tracking,
                                *tracking.runner_identity(), changes=tracking.changed_params(args.params))
    if "run_id" not in summary:  # a process of a torchrun launch that is not rank 0
        return 0
    print(f"finetune: best epoch {summary['best_epoch']} of {summary['epochs_run']}, "
          f"val loss {summary['best_val_loss']:.4f}, val accuracy {summary['best_val_accuracy']:.3f}; "
          f"MLflow run {summary['run_id']}")
    return 0


if __name__ == "__main__":
    from components import cli

    sys.exit(cli.run(main))
