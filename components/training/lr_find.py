"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2015):
train for STEPS steps while the rate grows exponentially from MIN_LR to MAX_LR, record the smoothed
loss, and suggest a rate.

The sweep runs as Lightning's `Tuner.lr_find` runs it (lightning 2.x, pytorch/tuner/lr_finder.py: 100
steps of an exponential schedule, losses smoothed with beta 0.98 and debiased, the sweep stopped once the
smoothed loss passes 4x the best), from 1e-6 rather than its 1e-8 (a fine-tune's rates are not that low).
The suggestion is fastai's `minimum` (a tenth of the rate at the smoothed loss's lowest point): on short
sweeps over small data Lightning's steepest-descent point lands in the noise of the first steps, often
100x too low; it is recorded beside it (`steepest_lr`). It runs on what the fine-tune trains (the
trainable layers, on the frozen prefix's cached features when the cache is on), then puts the weights,
the optimizer and the random state back, so the fine-tune starts from where it would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

MIN_LR, MAX_LR, STEPS = 1e-6, 1.0, 100
BETA, DIVERGED = 0.98, 4.0      # loss smoothing; stop once the smoothed loss passes DIVERGED x the best
SKIP_BEGIN, SKIP_END = 10, 1    # points left out of the suggestion (the start is noise, the end diverged)


@dataclass
class Finding:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)     # smoothed
    suggestion: float | None = None
    reason: str = ""                                       # why there is no suggestion

    def summary(self) -> dict:
        return {"suggested_lr": self.suggestion, "steps": len(self.lrs), "min_lr": self.lrs[0] if self.lrs else None,
                "max_lr": self.lrs[-1] if self.lrs else None, "reason": self.reason,
                "lowest_loss_lr": self.lrs[int(np.argmin(self.losses))] if self.losses else None,
                "steepest_lr": steepest(self.lrs, self.losses)}


def suggest(lrs: list[float], losses: list[float]) -> tuple[float | None, str]:
    """A tenth of the rate at the lowest smoothed loss, or None and why."""
    if len(losses) < SKIP_BEGIN + SKIP_END + 3:
        return None, f"the loss diverged after {len(losses)} of {STEPS} steps: too few points to read"
    lowest = int(np.argmin(losses))
    if lowest < SKIP_BEGIN:
        return None, f"the loss was lowest at the sweep's start ({lrs[lowest]:.1e}): no rate made it fall"
    return float(lrs[lowest]) / 10, ""


def steepest(lrs: list[float], losses: list[float]) -> float | None:
    """Lightning's suggestion: the rate where the smoothed loss falls fastest (first 10, last 1 left out)."""
    if len(losses) < SKIP_BEGIN + SKIP_END + 3:
        return None
    return float(lrs[int(np.gradient(np.array(losses[SKIP_BEGIN:-SKIP_END])).argmin()) + SKIP_BEGIN])


def sweep(net: nn.Module, optimizer, batches, step, fabric, steps: int = STEPS, min_lr: float = MIN_LR,
          max_lr: float = MAX_LR) -> Finding:
    """`step(x, y) -> loss` trains one batch on `net` through `optimizer`; `batches()` yields (x, y) again
    each time it is called. Every process sweeps its share of each batch and reads the mean loss over all
    of them (a process that stopped alone would leave the others waiting in the next step's gradient
    reduction), so every process finds the rate one process finds on whole batches."""
    saved_net = {k: v.detach().clone() for k, v in net.state_dict().items()}
    saved_opt = optimizer.state_dict()
    saved_rng = torch.get_rng_state()
    base = [g["lr"] for g in optimizer.param_groups]
    finding, best, smoothed = Finding(), float("inf"), 0.0
    rates = np.geomspace(min_lr, max_lr, steps)
    try:
        source = iter(batches())
        for i, lr in enumerate(rates, 1):
            try:
                x, y = next(source)
            except StopIteration:  # a small training split: go round again
                source = iter(batches())
                x, y = next(source)
            optimizer.param_groups[0]["lr"] = float(lr)  # the group finetune.lr sets; others keep theirs
            loss = step(x, y)
            if fabric.world_size > 1:  # every process sees the mean loss, so all stop at the same step
                loss = fabric.all_reduce(torch.tensor(loss, dtype=torch.float64, device=fabric.device),
                                         reduce_op="mean").item()
            if not np.isfinite(loss):
                break
            smoothed = BETA * smoothed + (1 - BETA) * loss
            value = smoothed / (1 - BETA ** i)
            finding.lrs.append(float(lr))
            finding.losses.append(float(value))
            best = min(best, value)
            if value > DIVERGED * best:
                break
    finally:
        net.load_state_dict(saved_net)
        optimizer.load_state_dict(saved_opt)
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr
        torch.set_rng_state(saved_rng)
    finding.suggestion, finding.reason = suggest(finding.lrs, finding.losses)
    return finding


def save_plot(finding: Finding, path: str | Path) -> None:
    """Loss against learning rate (log axis), the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(finding.lrs, finding.losses)
    if finding.suggestion:
        ax.axvline(finding.suggestion, color="tab:red", linestyle="--", label=f"suggested {finding.suggestion:.2g}")
        ax.legend()
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)", title="Learning-rate range test")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
