"""The fine-tuning recipe applied to a model: what is frozen, the optimizer's parameter groups and their
learning rates, the schedule (warm-up, then cosine or step), and the layers that wake at later epochs."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from tqdm import tqdm

from components.config import FinetuneConfig
from components.models import architectures


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


class Recipe:
    """The model with its frozen parts, optimizer groups and unfreezing schedule, epoch by epoch."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, quiet: bool = False):
        self.model, self.cfg, self.quiet = model, cfg, quiet
        patterns = list(cfg.freeze) + (architectures.modules_before(model, cfg.freeze_until)
                                       if cfg.freeze_until else [])
        self.frozen_bn = architectures.freeze(model, patterns)
        groups, taken = [], set()
        for g in cfg.lr_groups:
            params = [p for p in architectures.parameters_of(model, g.modules, "finetune.lr_groups")
                      if id(p) not in taken]
            taken.update(map(id, params))
            groups.append({"params": params, "base_lr": g.lr})
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        groups.insert(0, {"params": rest, "base_lr": cfg.lr})
        for step in cfg.unfreeze:  # a typo fails now, before the first epoch, not when its epoch starts
            architectures.match_modules(model, step.modules, "finetune.unfreeze")
        for g in groups:
            g["lr"] = g["base_lr"]
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def set_base_lr(self, lr: float) -> None:
        """finetune.lr as found (finetune.lr: auto): the main group's rate and unfreeze steps' default."""
        self.cfg = self.cfg.model_copy(update={"lr": lr})
        self.optimizer.param_groups[0].update(base_lr=lr, lr=lr)

    def woken_later(self) -> list[str]:
        """Names of the modules a later unfreeze step wakes (the prefix cache must stop before them)."""
        return [n for step in self.cfg.unfreeze
                for n in architectures.match_modules(self.model, step.modules, "finetune.unfreeze")]

    def unfreeze_for(self, epoch: int) -> list:
        """Apply the unfreezing steps due at `epoch`: their parameters join as a new optimizer group.
        Returns the parameters woken."""
        all_woken = []
        for step in self.cfg.unfreeze:
            if step.epoch == epoch:
                woken = architectures.unfreeze(self.model, step.modules, self.frozen_bn)
                if woken:
                    lr = step.lr or self.cfg.lr
                    self.optimizer.add_param_group({"params": woken, "base_lr": lr, "lr": lr})
                    all_woken += woken
                if not self.quiet:
                    tqdm.write(f"finetune: epoch {epoch}: unfroze {', '.join(step.modules)} "
                               f"({sum(p.numel() for p in woken):,} parameters)", file=sys.stderr)
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

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
