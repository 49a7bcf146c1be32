"""The training loop: `fit` trains until max_epochs or until validation loss stops improving.

Read top to bottom as torchvision's reference trainer reads: `fit` sets up (seeds, the recipe, the way
batches are fed, a resumed state), then each epoch is `train_one_epoch`, `evaluate`, the early-stopping
verdict and a checkpoint. The early-stopping object owns the best epoch: the weights returned are those
of the epoch it names.
"""

from __future__ import annotations

import gc
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from components.config import FinetuneConfig
from components.training import distributed, lr_find, prefix_cache, resume
from components.training.layer_stats import LayerStats
from components.training.loaders import in_order, seeded
from components.training.recipe import Recipe


class TrainingError(ValueError):
    """Training cannot go on (a loss that is not a finite number); the message says where and why."""


class EarlyStopping:
    """The best epoch so far (lowest validation loss, improved by more than min_delta) and its weights;
    stop after `patience` epochs without such an improvement."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_epoch, self.best_state, self.stale = math.inf, 0, None, 0

    def update(self, epoch: int, val_loss: float, model: nn.Module) -> None:
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.best_state, self.stale = val_loss, epoch, _cpu_copy(
                model.state_dict()), 0
        else:
            self.stale += 1

    @property
    def should_stop(self) -> bool:
        return self.stale >= self.patience

    def state(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "stale": self.stale}

    def restore(self, saved: dict) -> None:
        self.best_loss, self.best_state, self.stale = saved["best_loss"], saved["best_state"], saved["stale"]
        self.best_epoch = saved.get("best_epoch", 0)


class Feed:
    """Where the batches come from, chosen once for the run: the frozen prefix's cached features
    (finetune.prefix_cache), or images from the loaders. Either way the training loader's sampler
    (loaders.EpochBatches) decides which images each epoch trains on, in which order, and with several
    processes each one's share of every batch. Yields batches on the device."""

    def __init__(self, model: nn.Module, recipe: Recipe, train_loader, val_loader, cfg: FinetuneConfig, fabric,
                 augment=None):
        self.train_loader, self.val_loader, self.cfg, self.fabric = train_loader, val_loader, cfg, fabric
        self.rank, self.world = fabric.global_rank, fabric.world_size
        self.sampler = train_loader.batch_sampler
        self.sampler.share(self.rank, self.world)
        self.prepare = _preparer(fabric, cfg, augment)
        self.cache, suffix = prefix_cache.for_model(model, recipe, train_loader, val_loader, cfg, self.prepare,
                                                    fabric.autocast, lambda m: _say(self.rank == 0, m))
        self.net = suffix if self.cache else model  # what trains on what is fed
        # bf16 has no loss scaler to skip a step whose gradients overflowed, and the CPU's bf16 kernels have
        # given an occasional NaN (distributed.precision): such a step is done again in fp32.
        self.redo_in_fp32 = distributed.precision(cfg.precision, fabric.device.type) == "bf16"
        self.redone = 0

    def train(self, epoch: int):
        if self.cache:  # the suffix on this epoch's copy of the frozen prefix's features
            return self.cache.train_copy(epoch).batches(self.sampler.shares(epoch))
        self.sampler.set_epoch(epoch)
        return self.train_loader

    def val(self):
        source = self.cache.val.batches(in_order(len(self.cache.val), self.cfg.batch_size)) if self.cache \
            else self.val_loader
        for x, y in source:
            yield self.prepare(x), self.fabric.to_device(y)

    def close(self) -> None:
        if self.cache:
            self.cache.close()


def training_step(wrapped, optimizer, feed: Feed, x, y, loss_fn, stats: LayerStats | None = None, check=None):
    """Forward, loss, backward, update: (loss, logits). `check(loss)` sees the loss before the update (in
    fp32 and bf16 before backward; in bf16 after a step that was not finite was done again in fp32)."""
    optimizer.zero_grad(set_to_none=True)
    x = feed.prepare(x)
    buffers = [(b, b.clone()) for b in feed.net.buffers()] if feed.redo_in_fp32 else []  # BatchNorm's statistics
    with feed.fabric.autocast():
        logits = wrapped(x).float()
    loss = loss_fn(logits, y)
    if check and not feed.redo_in_fp32:
        check(loss.item())
    feed.fabric.backward(loss)
    if feed.redo_in_fp32:
        if not _finite_gradients(optimizer):  # reduced already: every process agrees
            optimizer.zero_grad(set_to_none=True)
            for buffer, before in buffers:
                buffer.copy_(before)
            with torch.autocast(feed.fabric.device.type, enabled=False):
                logits = wrapped._forward_module(x.float()).float()  # past Fabric's own autocast
            loss = loss_fn(logits, y)
            feed.fabric.backward(loss)
            feed.redone += 1
        if check:
            check(loss.item())
    if stats:
        stats.before_step()
    optimizer.step()
    if stats:
        stats.after_step()
    return loss, logits


def _finite_gradients(optimizer) -> bool:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())


def train_one_epoch(wrapped, optimizer, batches, feed: Feed, epoch: int, cfg: FinetuneConfig, lead: bool,
                    time_first_step: bool = False, stats: LayerStats | None = None) -> tuple[dict, float | None]:
    """One pass over this epoch's batches: the mean training loss and accuracy (over every process), and
    with `time_first_step` the first step's seconds (torch.compile compiles there). `stats` measures what
    the steps do to each layer."""
    fabric, loss_fn = feed.fabric, nn.CrossEntropyLoss()
    seen = correct = 0
    total_loss, first_step = 0.0, None
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, file=sys.stderr,
               disable=None if lead else True)  # batch bars on a terminal only
    for batch, (x, y) in enumerate(bar, 1):
        started = time.perf_counter()
        y = fabric.to_device(y)
        loss, logits = training_step(wrapped, optimizer, feed, x, y, loss_fn, stats,
                                     lambda value: check_finite(value, f"epoch {epoch}, batch {batch}: training "
                                                                       "loss", cfg))
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        if time_first_step and first_step is None:
            first_step = time.perf_counter() - started
    if fabric.world_size > 1:
        total_loss, correct, seen = fabric.all_reduce(
            torch.tensor([total_loss, correct, seen], dtype=torch.float64, device=fabric.device),
            reduce_op="sum").tolist()
    return {"train_loss": total_loss / seen, "train_accuracy": correct / seen}, first_step


def evaluate(net: nn.Module, feed: Feed) -> dict:
    """Validation loss and accuracy over the whole split (every process: the same verdict everywhere)."""
    with torch.no_grad(), feed.fabric.autocast():
        logits, y = predict(net, feed.val())
    if feed.redo_in_fp32 and not logits.isfinite().all():  # as a training step that was not finite
        logits, y = predict(net, feed.val())
        feed.redone += 1
    logits, y = logits.float().cpu(), y.cpu()
    return {"val_loss": nn.CrossEntropyLoss()(logits, y).item(),
            "val_accuracy": (logits.argmax(1) == y).float().mean().item()}


@torch.no_grad()
def predict(net: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets for every batch, in order, with the net in eval mode."""
    was_training = net.training
    net.eval()
    logits, targets = [], []
    for x, y in batches:
        logits.append(net(x))
        targets.append(y)
    net.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def fit(model: nn.Module, train_loader, val_loader, cfg: FinetuneConfig, run_key: str = "",
        on_epoch=None, fabric=None, augment=None, on_lr_found=None) -> tuple[dict, list, int]:
    """Train until max_epochs or until val loss stops improving by min_delta for `patience` epochs.

    With cfg.checkpoint_dir, every finished epoch is saved there and a checkpoint with the same
    `run_key` (inputs and configuration) is resumed. `on_epoch(row)` sees each history row as its
    epoch ends (live tracking). `fabric` (components.training.distributed.fabric_for) says where: one
    device, or one of several data-parallel processes, each training on its share of every batch (only
    rank 0 writes checkpoints and calls `on_epoch`). `augment`: the per-image training transform, when the
    loader leaves augmentation to the device (make_loaders(augment_on_device=True)). With finetune.lr `auto`
    the range test (components/training/lr_find.py) sets the rate first; `on_lr_found(finding)` sees it
    (rank 0). Each history row carries the per-layer statistics (components/training/layer_stats.py). Returns the best
    epoch's state dict (not the last one's), the per-epoch history and the best epoch.
    """
    fabric = fabric or distributed.fabric_for(cfg)
    lead = fabric.global_rank == 0
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = distributed.sync_batchnorm(model, cfg, fabric)
    find_lr = cfg.lr == "auto"
    if find_lr:  # a rate to build the optimizer with; the range test replaces it
        cfg = cfg.model_copy(update={"lr": lr_find.MIN_LR})
    recipe = Recipe(model, cfg, quiet=not lead)
    model.to(fabric.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    feed = Feed(model, recipe, train_loader, val_loader, cfg, fabric, augment)
    try:
        history, stopping = _train(model, recipe, feed, cfg, run_key, on_epoch, lead, find_lr, on_lr_found)
    finally:
        feed.close()  # the cached features go, whatever happened
    model.cpu()
    best_state = stopping.best_state
    if cfg.channels_last:  # the weights as saved: the usual layout, whatever training used
        model.to(memory_format=torch.contiguous_format)
        best_state = best_state and {k: v.contiguous() for k, v in best_state.items()}
    return best_state, history, stopping.best_epoch


def _find_lr(model, recipe: Recipe, feed: Feed, wrapped, optimizer, lead: bool) -> lr_find.Finding:
    """The range test on what the first epoch trains; the rate it suggests becomes finetune.lr."""
    loss_fn = nn.CrossEntropyLoss()
    recipe.model.train()
    for m in recipe.frozen_bn:
        m.eval()
    finding = lr_find.sweep(model, optimizer, lambda: feed.train(1),
                            lambda x, y: training_step(wrapped, optimizer, feed, x, feed.fabric.to_device(y),
                                                       loss_fn)[0].item(), feed.fabric)
    if finding.suggestion is None:
        raise TrainingError(f"finetune: finetune.lr is auto but the learning-rate range test found no rate: "
                            f"{finding.reason}; set finetune.lr to a number")
    recipe.set_base_lr(finding.suggestion)
    _say(lead, f"finetune: learning-rate range test: {len(finding.lrs)} steps from {finding.lrs[0]:.0e}, "
               f"suggested finetune.lr {finding.suggestion:.3g} (a tenth of the rate at the lowest loss)")
    return finding


def range_test(model: nn.Module, train_loader, val_loader, cfg: FinetuneConfig, fabric=None,
               augment=None) -> lr_find.Finding:
    """The learning-rate range test alone (`python -m components.finetune --lr-find`), set up as fit sets up
    the first epoch; the model is left as it was."""
    fabric = fabric or distributed.fabric_for(cfg)
    torch.manual_seed(cfg.seed)
    cfg = cfg.model_copy(update={"lr": lr_find.MIN_LR})
    recipe = Recipe(model, cfg, quiet=fabric.global_rank != 0)
    model.to(fabric.device)
    feed = Feed(model, recipe, train_loader, val_loader, cfg, fabric, augment)
    try:
        wrapped, optimizer = fabric.setup_module(feed.net), fabric.setup_optimizers(recipe.optimizer)
        return _find_lr(model, recipe, feed, wrapped, optimizer, fabric.global_rank == 0)
    finally:
        feed.close()


def _train(model, recipe: Recipe, feed: Feed, cfg: FinetuneConfig, run_key: str, on_epoch,
           lead: bool, find_lr: bool = False, on_lr_found=None) -> tuple[list, EarlyStopping]:
    fabric, auto = feed.fabric, find_lr
    history, stopping, first = [], EarlyStopping(cfg.patience, cfg.min_delta), 1
    saved = resume.load(cfg.checkpoint_dir, run_key, lead) if cfg.checkpoint_dir else None
    if saved is not None and saved.get("lr_found"):  # the rate the interrupted run found, not a new one
        recipe.set_base_lr(saved["lr_found"])
        find_lr = False
    if saved is not None:
        for epoch in range(2, saved["epoch"] + 1):  # replay unfreezing so the optimizer groups match
            recipe.unfreeze_for(epoch)
        model.load_state_dict(saved["model"])
        recipe.optimizer.load_state_dict(saved["optimizer"])
        history = saved["history"]
        stopping.restore(saved)
        resume.set_rng_state(saved["rng"], fabric.global_rank)
        first = saved["epoch"] + 1
        _say(lead, f"finetune: resuming after epoch {saved['epoch']} from {Path(cfg.checkpoint_dir) / resume.LAST}")

    trained = torch.compile(feed.net) if cfg.compile else feed.net  # Fabric applies it again around DDP
    wrapped, optimizer = fabric.setup_module(trained), fabric.setup_optimizers(recipe.optimizer)
    if find_lr and first <= cfg.max_epochs:
        finding = _find_lr(model, recipe, feed, wrapped, optimizer, lead)
        if on_lr_found and lead:
            on_lr_found(finding)
    cfg = recipe.cfg
    stats = LayerStats(model) if lead else None
    compile_seconds = None
    stop = first > cfg.max_epochs or (history and stopping.should_stop)
    epochs = tqdm(range(first, cfg.max_epochs + 1), desc="finetune", unit="epoch", file=sys.stderr,
                  initial=first - 1, total=cfg.max_epochs, disable=not lead)
    for epoch in ([] if stop else epochs):
        if recipe.start_epoch(epoch) and fabric.world_size > 1:
            # DDP reduces the gradients of the parameters that trained when it wrapped the module:
            # woken ones join through a new wrapper (the old one's hooks must be gone first).
            del wrapped
            gc.collect()
            wrapped = fabric.setup_module(trained)
        trained_row, first_step = train_one_epoch(wrapped, optimizer, feed.train(epoch), feed, epoch, cfg, lead,
                                                  time_first_step=cfg.compile and compile_seconds is None,
                                                  stats=stats)
        if first_step is not None:  # the first step compiles: its time, reported apart
            compile_seconds = first_step
            _say(lead, f"finetune: torch.compile: first step {compile_seconds:.1f} s (compiling included)")
        row = {"epoch": epoch, **trained_row, **evaluate(feed.net, feed),
               "lr": recipe.optimizer.param_groups[0]["lr"],
               "trainable_parameters": recipe.trainable_parameters(),
               **(stats.epoch_metrics() if stats else {}),
               **({"redone_in_fp32": feed.redone} if feed.redo_in_fp32 else {}),
               "time": time.time()}  # when the epoch ended: its metrics' timestamp in MLflow
        if compile_seconds is not None and not any("compile_seconds" in r for r in history):
            row["compile_seconds"] = compile_seconds
        check_finite(row["val_loss"], f"epoch {epoch}: validation loss", cfg)
        # a layer's gradient can overflow while the loss still reads finite; rank 0 alone holds the layer
        # statistics, so its verdict is everyone's (a process stopping alone would leave the others waiting)
        bad = next((k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)), None)
        if fabric.world_size > 1:
            bad = fabric.broadcast(bad)
        if bad:
            check_finite(row.get(bad, math.nan), f"epoch {epoch}: {bad}", cfg)
        if feed.redone > (history[-1].get("redone_in_fp32", 0) if history else 0):
            _say(lead, f"finetune: epoch {epoch}: bf16 gave a result that was not finite; that step was done "
                       f"again in fp32 ({feed.redone} so far)")
        history.append(row)
        if on_epoch and lead:
            on_epoch(row)
        epochs.set_postfix(val_loss=f"{row['val_loss']:.4f}", val_acc=f"{row['val_accuracy']:.3f}")
        stopping.update(epoch, row["val_loss"], model)
        rng = resume.rng_states(fabric) if cfg.checkpoint_dir else None  # every process's, gathered
        if cfg.checkpoint_dir and lead:
            resume.save(cfg.checkpoint_dir, {"run_key": run_key, "epoch": epoch, "model": model.state_dict(),
                                             "optimizer": recipe.optimizer.state_dict(), "history": history,
                                             "lr_found": recipe.cfg.lr if auto else None,
                                             **stopping.state(), "rng": rng})
        if fabric.broadcast(stopping.should_stop):  # rank 0 decides, so no process waits for another
            _say(lead, f"finetune: early stop after epoch {epoch}: val loss has not improved by "
                       f"{cfg.min_delta} for {cfg.patience} epochs")
            break
    return history, stopping


def check_finite(value: float, where: str, cfg: FinetuneConfig) -> None:
    if not math.isfinite(value):
        raise TrainingError(f"finetune: {where} is {value}: training diverged; nothing is written as the model. "
                            f"Likely cause: finetune.lr ({cfg.lr}) too high for these layers, or images that "
                            "are not what the labels say")


def _say(lead: bool, message: str) -> None:
    if lead:  # one process speaks for all
        tqdm.write(message, file=sys.stderr)


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _preparer(fabric, cfg: FinetuneConfig, augment=None):
    """Input batch -> on the device (non-blocking from pinned memory), augmented there when the loader
    left it undone (a list of uint8 images with their augmentation seeds), in channels_last when that is on."""
    def prepare(x):
        x = torch.stack([seeded(augment, fabric.to_device(image), seed) for image, seed in x]) \
            if isinstance(x, list) else fabric.to_device(x)
        return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last and x.ndim == 4 else x

    return prepare
