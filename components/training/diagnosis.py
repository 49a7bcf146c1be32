"""Why a fine-tune did or did not learn, said at the end of every run: findings from its curves, what
backpropagation did to each layer (components/training/layer_stats.py), the training split's class counts
and the learning-rate range test, each with its evidence and the setting to change.

    healthy           none of the below
    lr_too_high       training loss spiking or ending above where it started (with the layer whose
                      update-to-weight ratio is far above 1e-3), or a ratio above RATIO_ALONE by itself
    too_few_images    fewer than FEW_IMAGES training images in a class, and the curves show it: validation
                      loss that overfits or stays above WEAK of chance
    too_much_frozen   training loss stuck near chance (log of the class count) with layers frozen
    overfitting       validation loss rising from its best while training loss keeps falling (each by
                      OVERFIT: early stopping alone ends most runs with a validation loss above its best)
    class_imbalance   the largest class IMBALANCE times the smallest or more

The finding names go into the MLflow tag `diagnosis` (comma-separated), so runs can be searched by them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from components.training.layer_stats import per_layer

HEALTHY = "healthy"
SPIKE = 1.5            # a training loss this many times its best so far is a spike ...
SPIKE_SIZE = 0.25      # ... when it climbs back by this share of the first epoch's loss (not 0.01 -> 0.02)
RATIO_HIGH = 0.1       # update-to-weight ratio per step (median over epochs): 100x the usual 1e-3, named as
                       # evidence when the curves show a rate too high ...
RATIO_ALONE = 1.0      # ... and a finding by itself only when a step moves a layer by more than its weights
FEW_IMAGES = 30        # per class, in the training split
STUCK = 0.6            # final training loss above this share of chance level (ln of the class count)
OVERFIT = 1.1          # last validation loss this many times the best, and training loss fallen as much
WEAK = 0.5             # a best validation loss above this share of chance level learnt little
IMBALANCE = 3.0        # largest class over smallest


@dataclass(frozen=True)
class Finding:
    name: str
    evidence: str      # which curve, which layer, which count
    change: str        # the setting to change

    def line(self) -> str:
        return f"{self.name}: {self.evidence}; {self.change}"


def diagnose(history: list[dict], class_counts: dict[str, int], cfg: dict, lr_suggestion: float | None = None
             ) -> list[Finding]:
    """The findings for a finished run (empty: healthy). `cfg` is the finetune section as the run used it."""
    findings = []
    train = [r["train_loss"] for r in history]
    val = [r["val_loss"] for r in history]
    lr = cfg.get("lr")
    lower = (f"finetune.lr: {lr} -> {lr_suggestion:.3g} (the range test's suggestion)" if lr_suggestion
             and isinstance(lr, float) and lr_suggestion < lr else
             f"finetune.lr: {lr} -> {lr / 10:.3g} (or finetune.lr: auto)" if isinstance(lr, float)
             else "a lower finetune.lr")
    spikes = [(i, train[i], min(train[:i])) for i in range(1, len(train))
              if train[i] > SPIKE * min(train[:i]) and train[i] - min(train[:i]) > SPIKE_SIZE * train[0]]
    ratios = {}
    for row in history:
        for layer, ratio in per_layer(row, "update_ratio").items():
            ratios.setdefault(layer, []).append(ratio)
    high = {layer: sorted(r)[len(r) // 2] for layer, r in ratios.items() if sorted(r)[len(r) // 2] > RATIO_HIGH}
    layer, ratio = max(high.items(), key=lambda kv: kv[1]) if high else (None, 0.0)
    by_layer = f"layer {layer}: update-to-weight ratio {ratio:.2g} per step (healthy: about 1e-3)"
    curve = (f"training loss spiked to {spikes[0][1]:.3g} at epoch {history[spikes[0][0]]['epoch']} (best before: "
             f"{spikes[0][2]:.3g})" if spikes else
             f"training loss rose from {train[0]:.3g} (epoch 1) to {train[-1]:.3g}" if len(train) > 1 and
             train[-1] > train[0] else "")
    if curve or ratio > RATIO_ALONE:
        findings.append(Finding("lr_too_high", "; ".join(e for e in (curve, by_layer if layer else "") if e), lower))

    chance = math.log(max(len(class_counts), 2))
    frozen = bool(cfg.get("freeze_until") or cfg.get("freeze"))
    if frozen and not any(f.name == "lr_too_high" for f in findings) and train[-1] > STUCK * chance:
        where = f"finetune.freeze_until: {cfg['freeze_until']} -> an earlier layer" if cfg.get("freeze_until") \
            else "fewer finetune.freeze patterns"
        findings.append(Finding("too_much_frozen", f"training loss ended at {train[-1]:.3g}, near chance "
                                                   f"({chance:.3g} for {len(class_counts)} classes)", where))

    best = min(range(len(val)), key=val.__getitem__)
    if best < len(val) - 1 and val[-1] > OVERFIT * val[best] and train[-1] * OVERFIT < train[best]:
        findings.append(Finding("overfitting", f"validation loss rose from {val[best]:.3g} (epoch "
                                               f"{history[best]['epoch']}) to {val[-1]:.3g} while training loss "
                                               f"fell from {train[best]:.3g} to {train[-1]:.3g}",
                                "stronger augmentation (augment.*), more finetune.weight_decay, or fewer trainable "
                                f"layers; the model kept is epoch {history[best]['epoch']}'s"))
    if class_counts:
        fewest = min(class_counts, key=class_counts.get)
        overfit = any(f.name == "overfitting" for f in findings)
        if class_counts[fewest] < FEW_IMAGES and (overfit or val[best] > WEAK * chance):
            findings.append(Finding("too_few_images", f"class '{fewest}' has {class_counts[fewest]} training images "
                                                      f"(fewer than {FEW_IMAGES}); best validation loss "
                                                      f"{val[best]:.3g}{', overfitting' if overfit else ''}",
                                    f"add images to data.source (at least {FEW_IMAGES} a class, 100 or more is "
                                    "better) or more augmented copies (finetune.prefix_copies)"))
        most = max(class_counts, key=class_counts.get)
        if class_counts[most] >= IMBALANCE * max(class_counts[fewest], 1):
            findings.append(Finding("class_imbalance", f"class '{most}' has {class_counts[most]} training images, "
                                                       f"'{fewest}' {class_counts[fewest]} "
                                                       f"({class_counts[most] / max(class_counts[fewest], 1):.1f}:1)",
                                    f"add images of '{fewest}' (validate.min_class_recall guards the gate)"))
    return findings


def names(findings: list[Finding]) -> str:
    """The MLflow tag's value: `healthy`, or the findings' names, comma-separated."""
    return ",".join(dict.fromkeys(f.name for f in findings)) or HEALTHY


def report(findings: list[Finding]) -> str:
    """The short report artifact (Markdown)."""
    if not findings:
        return "# Diagnosis: healthy\n\nValidation loss fell and no cause below was found.\n"
    lines = [f"# Diagnosis: {names(findings)}", ""]
    for f in findings:
        lines += [f"## {f.name}", "", f"- evidence: {f.evidence}", f"- change: {f.change}", ""]
    return "\n".join(lines)
